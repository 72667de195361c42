"""Positions, stream sessions and the portfolio views."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from db.batch import Batch, days_of
from db.copy import connect, ensure_partitions, write_batch
from db.migrate import migrate
from db.queries import (
    close_open_sessions,
    close_session,
    open_session,
    portfolio_now,
    upsert_positions,
)
from normalize.model import AssetClass, Right, UnifiedPosition

from .helpers import snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def position(instrument: str, quantity: float) -> UnifiedPosition:
    return UnifiedPosition(
        broker="ibkr",
        account="U1234567",
        instrument=instrument,
        underlying="SPY",
        asset_class=AssetClass.OPTION,
        right=Right.CALL,
        strike=500.0,
        expiry=date(2025, 1, 17),
        multiplier=100.0,
        quantity=quantity,
        avg_cost=1.5,
    )


async def test_positions_sessions_and_portfolio(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        # Latest rows for 4 instruments (2 SPY, 2 QQQ).
        rows = [snapshot(i, n_instruments=4) for i in range(4)]
        await ensure_partitions(conn, days_of(rows))
        await write_batch(conn, Batch(uuid.uuid4(), rows))
        total = await portfolio_now(conn)
        assert total["total"]["positions"] == 4
        assert set(total["underlyings"]) == {"SPY", "QQQ"}
        expected_delta = sum(r.pos_delta or 0 for r in rows)
        assert total["total"]["delta"] == pytest.approx(expected_delta)

        # Once the account has a positions snapshot, only its held instruments count.
        held = [position(rows[1].instrument, rows[1].quantity)]
        assert await upsert_positions(conn, "ibkr", "U1234567", held) == 1
        now = await portfolio_now(conn)
        assert now["total"]["positions"] == 1
        assert now["total"]["delta"] == pytest.approx(rows[1].pos_delta)
        # Replacing the set deletes what is no longer held.
        await upsert_positions(conn, "ibkr", "U1234567", [position(rows[3].instrument, 1.0)])
        assert await conn.fetchval("SELECT count(*) FROM positions") == 1

        sid = await open_session(conn, "ibkr", "U1234567", mode="simulated", host="h", pid=1)
        await close_session(conn, sid, "shutdown", 123)
        await close_session(conn, sid, "again", 456)  # first close wins
        row = await conn.fetchrow("SELECT * FROM stream_sessions WHERE session_id = $1", sid)
        assert (row["end_reason"], row["events"], row["mode"]) == ("shutdown", 123, "simulated")
        await open_session(conn, "tastytrade", None, host="h", pid=1)
        assert await close_open_sessions(conn, "h", 1, "killed") == 1
    finally:
        await conn.close()
