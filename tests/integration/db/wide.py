"""The wide schema of migrations 0001/0002, as the writer before 0003 filled it: for migration tests
and for comparing the new views with the old ones on the same data."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from db.migrate import load_migrations, migrate
from normalize.model import GreeksSnapshot

from .helpers import snapshot

WIDE_FIELDS = (
    "broker", "account", "instrument", "underlying", "asset_class", "option_right", "strike", "expiry",
    "multiplier", "quantity", "event_ts", "received_ts", "bid", "ask", "last", "mark", "underlying_price",
    "iv", "delta", "gamma", "theta", "vega", "rho", "pos_delta", "pos_gamma", "pos_theta", "pos_vega", "seq",
)  # fmt: skip
VIEW_ORDER = {
    "greeks_current": "broker, account, instrument",
    "portfolio_greeks_now": "underlying",
    "portfolio_greeks_total": "positions",
    "portfolio_greeks_minutely": "bucket, underlying",
}


async def migrate_to(dsn: str, version: int) -> None:
    await migrate(dsn, migrations=load_migrations()[:version])


def clean_rows(n: int, *, start: float, n_instruments: int = 12, step: float = 7.0) -> list[GreeksSnapshot]:
    """Rows whose Greeks have at most 4 significant digits (what brokers send), with exposures
    computed as the normalizer does, a few NULLs, several brokers, days and minutes."""
    rows = []
    for i in range(n):
        r = snapshot(
            i, ts=start + i * step, n_instruments=n_instruments, broker=("ibkr", "tastytrade")[i % 2]
        )
        delta = round(0.05 + (i % 90) / 100, 2) * (1 if i % 3 else -1)
        gamma, theta, vega = (
            round(0.001 * (1 + i % 9), 3),
            round(-0.01 * (1 + i % 7), 2),
            round(0.1 + i % 5 / 10, 1),
        )
        q, m = r.quantity, r.multiplier
        rows.append(
            r._replace(
                last=None if i % 4 == 0 else 1.07,
                rho=None if i % 2 == 0 else 0.0123,
                underlying_price=500.25 + i % 10,
                delta=delta,
                gamma=gamma,
                theta=theta,
                vega=vega,
                pos_delta=delta * q * m,
                pos_gamma=gamma * q * m,
                pos_theta=theta * q * m,
                pos_vega=vega * q * m,
                greeks_source=(None, "broker", "model")[i % 3],
            )
        )
    return rows


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _values(r: GreeksSnapshot) -> list[Any]:
    d = r._asdict()
    d["option_right"] = d.pop("right")
    d["event_ts"], d["received_ts"] = _dt(r.event_ts), _dt(r.received_ts)
    return [d[f] for f in WIDE_FIELDS]


async def write_wide(dsn: str, rows: Sequence[GreeksSnapshot], *, with_source: bool = True) -> None:
    """One batch the way the pre-0003 writer committed it: ledger row, wide history rows, and the
    latest-state upsert (newest event time wins)."""
    cols = list(WIDE_FIELDS) + (["greeks_source"] if with_source else [])
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            days = {_dt(r.event_ts).date() for r in rows}
            for day in days:
                await conn.fetchval("SELECT ensure_greeks_history_partition($1)", day)
            batch_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO ingest_batches (batch_id, row_count, min_event_ts, max_event_ts) "
                "VALUES ($1, $2, $3, $4)",
                batch_id,
                len(rows),
                _dt(min(r.event_ts for r in rows)),
                _dt(max(r.event_ts for r in rows)),
            )
            args = [[batch_id, *_values(r), *([r.greeks_source] if with_source else [])] for r in rows]
            placeholders = ", ".join(f"${i + 1}" for i in range(len(cols) + 1))
            await conn.executemany(
                f"INSERT INTO greeks_history (batch_id, {', '.join(cols)}) VALUES ({placeholders})", args
            )
            update = ", ".join(
                f"{c} = EXCLUDED.{c}"
                for c in ["batch_id", *cols]
                if c not in ("broker", "account", "instrument")
            )
            await conn.executemany(
                f"INSERT INTO greeks_latest (batch_id, {', '.join(cols)}) VALUES ({placeholders}) "
                f"ON CONFLICT (broker, account, instrument) DO UPDATE SET {update} "
                "WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts) "
                ">= (greeks_latest.event_ts, greeks_latest.received_ts)",
                args,
            )
    finally:
        await conn.close()


async def write_wide_positions_and_sessions(dsn: str, rows: Sequence[GreeksSnapshot]) -> None:
    """0001's positions table (held: the first half of the instruments, one closed at 0) and two
    stream sessions (one closed)."""
    conn = await asyncpg.connect(dsn)
    try:
        seen = {}
        for r in rows:
            seen.setdefault((r.broker, r.account, r.instrument), r)
        held = list(seen.values())[: len(seen) // 2]
        await conn.executemany(
            "INSERT INTO positions (broker, account, instrument, underlying, asset_class, option_right, "
            "strike, expiry, multiplier, quantity, avg_cost) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [
                (
                    r.broker,
                    r.account,
                    r.instrument,
                    r.underlying,
                    r.asset_class,
                    r.right,
                    r.strike,
                    r.expiry,
                    r.multiplier,
                    0.0 if k == 0 else r.quantity,
                    1.25,
                )
                for k, r in enumerate(held)
            ],  # fmt: skip
        )
        await conn.execute(
            "INSERT INTO stream_sessions (broker, account, host, pid, mode, ended_at, end_reason, events) "
            "VALUES "
            "('ibkr', 'U1234567', 'h', 7, 'simulated', now(), 'closed', 12), "
            "('tastytrade', NULL, 'h', 7, 'simulated', NULL, NULL, 0)"
        )
    finally:
        await conn.close()


async def read_views(dsn: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            view: [dict(r) for r in await conn.fetch(f"SELECT * FROM {view} ORDER BY {order}")]
            for view, order in VIEW_ORDER.items()
        }
    finally:
        await conn.close()


def assert_same_rows(
    got: list[dict[str, Any]], expected: list[dict[str, Any]], *, ignore: Sequence[str] = ()
) -> None:
    """Same rows, same columns; numbers equal up to rounding (1e-12 relative, 1e-9 absolute: sums
    may add the same terms in another order)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        for key in e:
            if key in ignore:
                continue
            assert key in g, key
            a, b = g[key], e[key]
            if isinstance(b, float) and isinstance(a, float):
                assert a == b or abs(a - b) <= max(1e-12 * max(abs(a), abs(b)), 1e-9), (key, a, b)
            else:
                assert a == b, (key, a, b)


DAY = timedelta(days=1)
START = datetime(2026, 11, 30, 23, 50, tzinfo=UTC).timestamp()  # rows span midnight: two partitions
TODAY = date(2026, 12, 1)
