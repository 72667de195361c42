"""Small read/write helpers the rest of the engine uses besides the writer's batch path."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import asyncpg

from normalize.model import UnifiedPosition

_UPSERT_POSITIONS = """
INSERT INTO positions (broker, account, instrument, underlying, asset_class, option_right,
                       strike, expiry, multiplier, quantity, avg_cost, updated_at)
SELECT $1, $2, p.instrument, p.underlying, p.asset_class, p.option_right, p.strike, p.expiry,
       p.multiplier, p.quantity, p.avg_cost, now()
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::float8[], $8::date[],
            $9::float8[], $10::float8[], $11::float8[])
     AS p(instrument, underlying, asset_class, option_right, strike, expiry, multiplier,
          quantity, avg_cost)
ON CONFLICT (broker, account, instrument) DO UPDATE SET
    underlying = EXCLUDED.underlying, asset_class = EXCLUDED.asset_class,
    option_right = EXCLUDED.option_right, strike = EXCLUDED.strike, expiry = EXCLUDED.expiry,
    multiplier = EXCLUDED.multiplier, quantity = EXCLUDED.quantity,
    avg_cost = EXCLUDED.avg_cost, updated_at = now()
"""


async def upsert_positions(
    conn: asyncpg.Connection, broker: str, account: str, positions: Sequence[UnifiedPosition]
) -> int:
    """Replace the current positions of one broker account with ``positions``.

    Positions of that account missing from ``positions`` are deleted (closed). One transaction.
    Returns the number of positions stored.
    """
    instruments = [p.instrument for p in positions]
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM positions WHERE broker = $1 AND account = $2 AND NOT (instrument = ANY($3::text[]))",
            broker,
            account,
            instruments,
        )
        if positions:
            await conn.execute(
                _UPSERT_POSITIONS,
                broker,
                account,
                instruments,
                [p.underlying for p in positions],
                [str(p.asset_class) for p in positions],
                [None if p.right is None else str(p.right) for p in positions],
                [p.strike for p in positions],
                [p.expiry for p in positions],
                [p.multiplier for p in positions],
                [p.quantity for p in positions],
                [p.avg_cost for p in positions],
            )
    return len(positions)


async def open_session(
    conn: asyncpg.Connection,
    broker: str,
    account: str | None = None,
    *,
    mode: str = "live",
    host: str | None = None,
    pid: int | None = None,
) -> int:
    """Record the start of a broker connection; returns its ``session_id``."""
    session_id = await conn.fetchval(
        "INSERT INTO stream_sessions (broker, account, host, pid, mode) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING session_id",
        broker,
        account,
        socket.gethostname() if host is None else host,
        os.getpid() if pid is None else pid,
        mode,
    )
    return int(session_id)


async def close_session(conn: asyncpg.Connection, session_id: int, reason: str, events: int) -> None:
    """Record the end of a broker connection (first close wins)."""
    await conn.execute(
        "UPDATE stream_sessions SET ended_at = now(), end_reason = $2, events = $3 "
        "WHERE session_id = $1 AND ended_at IS NULL",
        session_id,
        reason,
        events,
    )


async def close_open_sessions(conn: asyncpg.Connection, host: str, pid: int, reason: str) -> int:
    """Close sessions a killed run of this host/pid left open; returns how many."""
    status = await conn.execute(
        "UPDATE stream_sessions SET ended_at = now(), end_reason = $3 "
        "WHERE host = $1 AND pid = $2 AND ended_at IS NULL",
        host,
        pid,
        reason,
    )
    return int(status.split()[-1])


async def portfolio_now(conn: asyncpg.Connection) -> dict[str, Any]:
    """Portfolio Greeks now: ``{"underlyings": {sym: {...}}, "total": {...}}`` (floats or None)."""
    keys = ("positions", "delta", "dollar_delta", "gamma", "theta", "vega")
    rows = await conn.fetch("SELECT * FROM portfolio_greeks_now ORDER BY underlying")
    total = await conn.fetchrow("SELECT * FROM portfolio_greeks_total")
    return {
        "underlyings": {r["underlying"]: {k: r[k] for k in keys} for r in rows},
        "total": {k: (total[k] if total is not None else None) for k in keys},
    }
