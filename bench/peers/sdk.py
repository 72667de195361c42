"""The tastytrade SDK peers: ``Session`` + ``DXLinkStreamer`` Greeks into a table of their own.

Written the way the SDK's users write it (its README: ``async with DXLinkStreamer(session) as
streamer: await streamer.subscribe(Greeks, symbols); async for greeks in streamer.listen(Greeks)``):
positions through ``Account.get_positions``, streamer symbols through ``Option.get``, one row per
Greeks event with its own event time, into ``greeks`` via asyncpg.

- ``sdk_execute``: one autocommitted ``execute`` per event.
- ``sdk_executemany``: everything the streamer has queued (one FEED_DATA message or more) in one
  ``executemany`` (one transaction).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import tastytrade.session
from tastytrade import Account, DXLinkStreamer, Session
from tastytrade.dxfeed import Greeks
from tastytrade.instruments import Option
from tastytrade.order import InstrumentType

from bench.peers._common import Stats, greeks_table

TABLE = greeks_table("greeks")
INSERT = (
    "INSERT INTO greeks (symbol, event_time, sequence, price, volatility, delta, gamma, theta, rho, vega)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
COUNT_SQL = "SELECT count(*) FROM (SELECT DISTINCT symbol, sequence FROM greeks WHERE sequence >= 1) t"


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def row(event: Greeks, occ: dict[str, str]) -> tuple[Any, ...]:
    return (
        occ.get(event.event_symbol, event.event_symbol),
        datetime.fromtimestamp(event.time / 1000, UTC),
        event.sequence,
        _f(event.price),
        _f(event.volatility),
        _f(event.delta),
        _f(event.gamma),
        _f(event.theta),
        _f(event.rho),
        _f(event.vega),
    )


async def _symbols(session: Session) -> dict[str, str]:
    """Streamer symbol -> OCC symbol of every option position."""
    occ: list[str] = []
    for account in await Account.get(session):
        positions = await account.get_positions(session)
        occ += [p.symbol for p in positions if p.instrument_type == InstrumentType.EQUITY_OPTION]
    options = await asyncio.gather(*(Option.get(session, s) for s in occ))
    return {o.streamer_symbol: o.symbol for o in options}


async def stream(ready: dict[str, Any], dsn: str, stats: Stats, *, many: bool) -> None:
    setattr(tastytrade.session, "API_URL", ready["tastytrade_api"])  # noqa: B010 - the SDK's base URL
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(TABLE)
        async with Session(ready["tt_client_secret"], ready["tt_refresh_token"]) as session:
            occ = await _symbols(session)
            async with DXLinkStreamer(session) as streamer:
                await streamer.subscribe(Greeks, list(occ))
                stats.state = "streaming"
                stats.maybe_write(force=True)
                if many:
                    while True:
                        batch = [await streamer.get_event(Greeks)]
                        while (more := streamer.get_event_nowait(Greeks)) is not None:
                            batch.append(more)
                        await conn.executemany(INSERT, [row(e, occ) for e in batch])
                        stats.record([e.time for e in batch], time.time())
                else:
                    async for event in streamer.listen(Greeks):
                        await conn.execute(INSERT, *row(event, occ))
                        stats.record([event.time], time.time())
    finally:
        conn.terminate()


async def execute(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    await stream(ready, dsn, stats, many=False)


async def executemany(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    await stream(ready, dsn, stats, many=True)
