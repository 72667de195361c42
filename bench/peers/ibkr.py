"""The IBKR peers, built on ``ibind`` (the most used Client Portal client), into ``ibkr_ticks``.

- ``ibind_ws``: ``IbkrClient`` for the session and positions, ``IbkrWsClient`` streaming one
  ``MarketDataSubscription`` per option position into a ``QueueSink`` (ibind's defaults: 10,000
  events, oldest dropped when full); the asyncio side drains the queue and writes every drained
  batch with one ``executemany``. The router keeps the raw frames (``unwrap_market_data=False``)
  so that ``_updated``, the event time, reaches the table; ibind 0.2.2 then fails every frame
  (its ``MarketData.conid`` is a ``str``, the raw frame's an ``int``), so :class:`RawRouter` is the
  two-line workaround a user would write.
- ``poll``: what the engine replaces: ``IbkrClient.live_marketdata_snapshot`` for every
  position (100 conids a call, the documented maximum) once a second, ``executemany`` per round.
  A row per contract per round: whatever ticked in between is never seen.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from ibind import IbkrClient, IbkrWsClient, QueueSink
from ibind.events import MarketData
from ibind.ibkr_ws.ibkr_router import IbkrRouter
from ibind.ibkr_ws.ibkr_subscriptions import MarketDataSubscription

from bench.peers._common import Stats, to_float

FIELDS = ["31", "84", "86", "7635", "7308", "7309", "7310", "7311", "7633"]
TABLE = """
CREATE TABLE IF NOT EXISTS ibkr_ticks (
    conid     bigint NOT NULL,
    updated   timestamptz NOT NULL,
    seq       bigint NOT NULL,
    last      double precision,
    bid       double precision,
    ask       double precision,
    mark      double precision,
    delta     double precision,
    gamma     double precision,
    theta     double precision,
    vega      double precision,
    iv        double precision
)"""
INSERT = (
    "INSERT INTO ibkr_ticks (conid, updated, seq, last, bid, ask, mark, delta, gamma, theta, vega, iv)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
COUNT_SQL = "SELECT count(*) FROM (SELECT DISTINCT conid, seq FROM ibkr_ticks WHERE seq >= 1) t"


class RawRouter(IbkrRouter):  # type: ignore[misc]
    """ibind's router keeping raw market data frames (``_updated`` included), conid as ``str``."""

    def __init__(self) -> None:
        super().__init__(unwrap_market_data=False)

    def _preprocess_market_data_message(self, data: dict[str, Any]) -> Any:
        if "conid" not in data:
            return []
        return MarketData(conid=str(data["conid"]), data=data)


def row(data: dict[str, Any]) -> tuple[Any, ...]:
    return (
        int(data["conid"]),
        datetime.fromtimestamp(data["_updated"] / 1000, UTC),
        int(data.get("_seq", 0)),
        *(to_float(data.get(f)) for f in FIELDS),
    )


def _client(ready: dict[str, Any]) -> tuple[IbkrClient, str, list[str]]:
    """The REST client, its account and the conids of every option position (all pages)."""
    client = IbkrClient(url=ready["ibkr_rest"] + "/", cacert=False, auto_register_shutdown=False)
    client.tickle()
    account = client.portfolio_accounts().data[0]["accountId"]
    client.account_id = account
    conids: list[str] = []
    page = 0
    while True:
        rows = client.positions(account, page=page).data
        conids += [str(r["conid"]) for r in rows if r.get("assetClass") == "OPT"]
        if len(rows) < 100:
            return client, account, conids
        page += 1


async def ibind_ws(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLE)
    client, account, conids = await asyncio.to_thread(_client, ready)
    sink = QueueSink()
    ws = IbkrWsClient(
        url=ready["ibkr_ws"],
        ibkr_client=client,
        account_id=account,
        cacert=False,
        sink=sink,
        router=RawRouter(),
    )
    queue = sink.new_queue_accessor(MarketData)
    try:
        await asyncio.to_thread(ws.start)
        for conid in conids:
            ws.subscribe(MarketDataSubscription(conid=conid, fields=FIELDS))
        stats.state = "streaming"
        stats.maybe_write(force=True)
        while True:
            first = await asyncio.to_thread(queue.get, True, 0.25)
            if first is None:
                continue
            batch = [first.data]
            while (more := queue.get()) is not None:
                batch.append(more.data)
            rows = [row(d) for d in batch if "_updated" in d]
            if rows:
                await conn.executemany(INSERT, rows)
                stats.record([d["_updated"] for d in batch if "_updated" in d], time.time())
    finally:
        await asyncio.to_thread(ws.shutdown)
        conn.terminate()


async def poll(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLE)
    client, _account, conids = await asyncio.to_thread(_client, ready)
    chunks = [conids[i : i + 100] for i in range(0, len(conids), 100)]
    try:
        await asyncio.to_thread(client.receive_brokerage_accounts)  # required before snapshots
        for chunk in chunks:  # the pre-flight: the first snapshot of a conid carries no data
            await asyncio.to_thread(client.live_marketdata_snapshot, chunk, FIELDS)
        stats.state = "streaming"
        stats.maybe_write(force=True)
        next_round = time.monotonic()
        seen: dict[Any, Any] = {}  # conid -> _updated of the row stored last: store changes only
        while True:
            rows, sent = [], []
            for chunk in chunks:
                result = await asyncio.to_thread(client.live_marketdata_snapshot, chunk, FIELDS)
                for data in result.data:
                    updated = data.get("_updated")
                    if updated is not None and seen.get(data["conid"]) != updated:
                        seen[data["conid"]] = updated
                        rows.append(row(data))
                        sent.append(updated)
            if rows:
                await conn.executemany(INSERT, rows)
                stats.record(sent, time.time())
            next_round += 1.0
            await asyncio.sleep(max(next_round - time.monotonic(), 0.0))
    finally:
        conn.terminate()
