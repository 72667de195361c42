"""Small read/write helpers the rest of the engine uses besides the writer's batch path."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from db.copy import apply_positions
from normalize.events import PositionsSnapshot
from normalize.model import UnifiedPosition


async def upsert_positions(
    conn: asyncpg.Connection,
    broker: str,
    account: str,
    positions: Sequence[UnifiedPosition],
    *,
    as_of: float | None = None,
) -> int:
    """Replace the current positions of one broker account with ``positions``.

    Positions of that account missing from ``positions`` are deleted (closed). One transaction,
    the writer's own positions statement (:func:`db.copy.apply_positions`); ``as_of`` (POSIX
    seconds, default now) orders it against the snapshots the writer applies. Returns the
    number of positions stored.
    """
    snapshot = PositionsSnapshot(
        broker, (account,), tuple(positions), time.time() if as_of is None else as_of
    )
    if await apply_positions(conn, [snapshot]):
        return len(positions)
    return 0


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
