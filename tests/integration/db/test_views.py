"""The views over the narrow schema give the numbers the wide form gave on the same data, and
the indexes serve the real queries."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from db.batch import Batch, days_of
from db.copy import COPY_MIN_ROWS, connect, ensure_partitions, write_batch
from db.encode import Dimensions
from db.migrate import migrate
from db.queries import upsert_positions
from normalize.model import AssetClass, Right, UnifiedPosition

from .conftest import PgTarget
from .helpers import fetch
from .wide import START, assert_same_rows, clean_rows, migrate_to, read_views, write_wide

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def _second_database(pg: PgTarget) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return pg.dsn(name)


async def _drop(pg: PgTarget, dsn: str) -> None:
    admin = await asyncpg.connect(pg.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.parametrize("copy_min_rows", [COPY_MIN_ROWS, 1], ids=["one-statement", "copy"])
async def test_views_give_the_wide_numbers_on_the_same_data(
    pg: PgTarget, dsn: str, copy_min_rows: int
) -> None:
    # Arrange: the same rows, in the same batches, into a wide (0002) database the way the old
    # writer stored them, and through the new write path; the same held positions in both.
    rows = clean_rows(300, start=START)
    batches = [rows[k : k + 50] for k in range(0, len(rows), 50)]
    held = {}
    for r in rows[:40]:
        held[(r.broker, r.account, r.instrument)] = r
    wide = await _second_database(pg)
    try:
        await migrate_to(wide, 2)
        for b in batches:
            await write_wide(wide, b)
        conn = await asyncpg.connect(wide)
        try:
            await conn.executemany(
                "INSERT INTO positions (broker, account, instrument, underlying, asset_class, option_right, "
                "strike, expiry, multiplier, quantity) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                [
                    (*k, r.underlying, r.asset_class, r.right, r.strike, r.expiry, r.multiplier, r.quantity)
                    for k, r in held.items()
                ],
            )
        finally:
            await conn.close()
        expected = await read_views(wide)
        expected_history = [dict(r) for r in await fetch(wide, "SELECT * FROM greeks_history ORDER BY seq")]
    finally:
        await _drop(pg, wide)

    await migrate(dsn)
    conn = await connect(dsn)
    dims = Dimensions()
    try:
        await ensure_partitions(conn, days_of(rows))
        for b in batches:
            assert await write_batch(conn, Batch(uuid.uuid4(), b), dims=dims, copy_min_rows=copy_min_rows)
        by_account: dict[tuple[str, str], list[UnifiedPosition]] = {}
        for (broker, account, instrument), r in held.items():
            by_account.setdefault((broker, account), []).append(
                UnifiedPosition(
                    broker,
                    account,
                    instrument,
                    r.underlying,
                    AssetClass(r.asset_class),
                    Right(r.right) if r.right else None,
                    r.strike,
                    r.expiry,
                    r.multiplier,
                    r.quantity,
                    None,
                )  # fmt: skip
            )
        for (broker, account), positions in by_account.items():
            await upsert_positions(conn, broker, account, positions)
    finally:
        await conn.close()

    # Act
    got = await read_views(dsn)
    history = [dict(r) for r in await fetch(dsn, "SELECT * FROM greeks_history_wide ORDER BY seq")]

    # Assert
    for view, want in expected.items():
        assert want, view
        assert_same_rows(got[view], want, ignore=("batch_id", "updated_at"))
    assert_same_rows(history, expected_history, ignore=("batch_id",))


async def test_history_indexes_serve_the_real_queries(dsn: str) -> None:
    """One position over a time range (btree on the id AND the BRIN on time); a day (its
    partition); latest per position is greeks_latest's primary key."""
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        rows = clean_rows(2000, start=START, n_instruments=50, step=0.5)
        await ensure_partitions(conn, days_of(rows))
        await write_batch(conn, Batch(uuid.uuid4(), rows), dims=Dimensions())
        await conn.execute("ANALYZE greeks_history")
        await conn.execute("SET enable_seqscan = off")  # tiny table: ask which index would be used
        day = datetime.fromtimestamp(START, UTC).date()
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT * FROM greeks_history_wide WHERE broker = 'ibkr' AND account = 'U1234567' "
                "AND instrument = 'SPY   250117C00500000' AND event_ts >= $1 AND event_ts < $2",
                datetime.fromtimestamp(START + 60, UTC),
                datetime.fromtimestamp(START + 600, UTC),
            )
        )
        assert "greeks_history_p20261130_position_id_idx" in plan, plan  # the btree on the id
        assert "p20261201" not in plan, plan  # the other day's partition is pruned
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT count(*) FROM greeks_history WHERE event_ts >= $1 AND event_ts < $2",
                datetime.fromtimestamp(START + 60, UTC),
                datetime.fromtimestamp(START + 120, UTC),
            )
        )
        assert "greeks_history_p20261130_event_ts_idx" in plan, plan  # the BRIN on time
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT count(*) FROM greeks_history WHERE event_ts >= $1 AND event_ts < $2",
                datetime(day.year, day.month, day.day, tzinfo=UTC),
                datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1),
            )
        )
        assert set(re.findall(r"greeks_history_p\d{8}", plan)) == {"greeks_history_p20261130"}, plan
    finally:
        await conn.close()


async def test_minutely_between_equals_the_view_over_that_range(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        rows = clean_rows(400, start=START, n_instruments=9, step=2.5)  # ~17 minutes over midnight
        await ensure_partitions(conn, days_of(rows))
        await write_batch(conn, Batch(uuid.uuid4(), rows), dims=Dimensions())
        lo = datetime.fromtimestamp(START, UTC).replace(second=0, microsecond=0) + timedelta(minutes=4)
        hi = lo + timedelta(minutes=9)
        view = await conn.fetch(
            "SELECT * FROM portfolio_greeks_minutely WHERE bucket >= $1 AND bucket < $2 ORDER BY 1, 2", lo, hi
        )
        func = await conn.fetch(
            "SELECT * FROM portfolio_greeks_minutely_between($1, $2) ORDER BY 1, 2", lo, hi
        )
        assert len(view) == 9 * 2  # nine minutes, two underlyings
        assert_same_rows([dict(r) for r in func], [dict(r) for r in view])
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT * FROM portfolio_greeks_minutely_between($1, $2)",
                lo,
                lo + timedelta(minutes=2),
            )
        )
        assert set(re.findall(r"greeks_history_p\d{8}", plan)) == {"greeks_history_p20261130"}, plan
    finally:
        await conn.close()
