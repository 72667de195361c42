"""``bare_copy``: the floor, not a peer a user would pick: the least a streaming consumer can do.

The issue's "bare loop" (websockets receive -> JSON decode -> one channel -> COPY + commit,
nothing else), on the DXLink feed: the feed's REST start-up and handshake
(:func:`bench.feed.probe.dxlink_start`, :func:`~bench.feed.probe.dxlink_open`, Greeks of the
option positions only, as the SDK peers subscribe), then a reader task that decodes every frame
with orjson and puts each FEED_DATA's values on one ``asyncio.Queue``, and a writer task that
takes everything queued, turns the COMPACT values into records and commits them with one
autocommitted ``copy_records_to_table`` into ``bare_ticks`` (the SDK peers' columns). No
normalization, no positions, no latest state, no exactly-once ledger: its CPU per tick is what
any consumer of this feed into this database pays at least, a reference for the others' figures.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import websockets

from bench.feed.probe import dxlink_open, dxlink_start
from bench.peers._common import Stats, greeks_table

TABLE = greeks_table("bare_ticks")
COLUMNS = (
    "symbol", "event_time", "sequence", "price", "volatility", "delta", "gamma", "theta", "rho", "vega",
)  # fmt: skip
FIELDS = ["eventSymbol", "time", *COLUMNS[2:]]  # the DXLink Greeks fields, in COLUMNS order
COUNT_SQL = "SELECT count(*) FROM (SELECT DISTINCT symbol, sequence FROM bare_ticks WHERE sequence >= 1) t"


def _f(value: Any) -> float | None:
    """A COMPACT number: JSON numbers as they are, the strings DXLink sends for NaN and the
    infinities as NULL (a consumer stores no NaN)."""
    return float(value) if isinstance(value, int | float) else None


def records(names: list[str], values: list[Any]) -> tuple[list[tuple[Any, ...]], list[float]]:
    """The COMPACT ``values`` of one FEED_DATA (``names`` per event) as ``bare_ticks`` records,
    and the events' send times (POSIX ms)."""
    width = len(names)
    at = [names.index(f) for f in FIELDS]
    out = []
    sent = []
    for i in range(0, len(values) - width + 1, width):
        v = [values[i + j] for j in at]
        ms = v[1]
        sent.append(ms)
        out.append(
            (v[0], datetime.fromtimestamp(ms / 1000, UTC), v[2], *(_f(x) for x in v[3:])),
        )
    return out, sent


async def bare_copy(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    api, secret, refresh = ready["tastytrade_api"], ready["tt_client_secret"], ready["tt_refresh_token"]
    quote, symbols = await dxlink_start(api, secret, refresh)
    greeks = [(t, s) for t, s in symbols if t == "Greeks"]
    conn = await asyncpg.connect(dsn)
    queue: asyncio.Queue[tuple[str, list[Any]]] = asyncio.Queue()
    layouts = {"Greeks": FIELDS}
    try:
        await conn.execute(TABLE)
        async with websockets.connect(quote["dxlink-url"], max_size=1 << 24) as ws:
            await dxlink_open(ws, quote["token"], greeks, {"Greeks": FIELDS})
            stats.state = "streaming"
            stats.maybe_write(force=True)

            async def reader() -> None:
                async for raw in ws:
                    msg = orjson.loads(raw)
                    kind = msg.get("type")
                    if kind == "FEED_DATA":
                        queue.put_nowait(msg["data"])
                    elif kind == "FEED_CONFIG" and msg.get("eventFields"):
                        layouts.update(msg["eventFields"])
                    elif kind == "KEEPALIVE":
                        await ws.send('{"type":"KEEPALIVE","channel":0}')

            async def writer() -> None:
                while True:
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    batch: list[tuple[Any, ...]] = []
                    sent: list[float] = []
                    for event_type, values in items:
                        if event_type == "Greeks":
                            recs, ms = records(layouts["Greeks"], values)
                            batch += recs
                            sent += ms
                    if batch:
                        await conn.copy_records_to_table("bare_ticks", records=batch, columns=COLUMNS)
                        stats.record(sent, time.time())

            async with asyncio.TaskGroup() as tg:
                tg.create_task(reader())
                tg.create_task(writer())
    finally:
        conn.terminate()
