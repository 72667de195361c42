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

``bare_recv``: the floor under that floor: the engine's own input (both brokers, the same
subscriptions and fields as the engine asks for: IBKR ``smd`` per position, DXLink Greeks and
Quote per option, Quote and Trade per stock; not the options' underlyings the engine also
subscribes, which tick once a second), every frame received with websockets and decoded
with orjson, its ticks counted (and the receive latency of each frame kept), and nothing else: no
normalization, no database at all. Its CPU per tick is what the engine pays before it does any
of its own work; a target below it asks for less than receiving the frames costs.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import websockets

from bench.feed.probe import dxlink_open, dxlink_start, ibkr_start
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


# -- bare_recv ---------------------------------------------------------------------------------
# What the engine subscribes (actors/ibkr/protocol.py, actors/tastytrade/protocol.py and
# normalize/tastytrade.py), copied: the peers never import the engine.
IBKR_OPTION_FIELDS = ["31", "84", "86", "7635", "7308", "7309", "7310", "7311", "7633", "6457", "6509"]
IBKR_OTHER_FIELDS = ["31", "84", "86", "7635", "6509"]
DX_FIELDS = {
    "Greeks": [
        "eventSymbol", "eventTime", "time", "sequence", "price", "volatility",
        "delta", "gamma", "theta", "rho", "vega",
    ],
    "Quote": ["eventSymbol", "eventTime", "sequence", "bidTime", "askTime", "bidPrice", "askPrice"],
    "Trade": ["eventSymbol", "eventTime", "time", "sequence", "price"],
}  # fmt: skip
DX_TIME = {"Greeks": "time", "Quote": "bidTime", "Trade": "time"}


def engine_subscriptions(symbols: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The engine's DXLink subscriptions from :func:`~bench.feed.probe.dxlink_start`'s (Greeks per
    option, Quote per other position): Greeks and Quote per option, Quote and Trade per other."""
    out: list[tuple[str, str]] = []
    for event_type, symbol in symbols:
        out += [(event_type, symbol), ("Quote" if event_type == "Greeks" else "Trade", symbol)]
    return out


def ibkr_ticks(msg: Any) -> list[float]:
    """The send time (POSIX ms) of the one tick an IBKR ``smd`` frame carries (none for a
    last-value frame, sequence 0, or any other message)."""
    seq = msg.get("_seq") if type(msg) is dict else None
    return [msg["_updated"]] if seq else []


def dx_ticks(names: list[str], values: list[Any], time_field: str) -> list[float]:
    """The send times (POSIX ms) of the ticks in a COMPACT FEED_DATA's ``values`` (events of
    ``names``, each with a sequence number of at least 1)."""
    width = len(names)
    i_seq, i_time = names.index("sequence"), names.index(time_field)
    whole = values[: len(values) // width * width]  # a cut event at the end is left out
    return [t for q, t in zip(whole[i_seq::width], whole[i_time::width], strict=True) if q]


async def bare_recv(ready: dict[str, Any], dsn: str, stats: Stats) -> None:
    """See the module docstring; ``dsn`` is not used: nothing is stored."""
    del dsn
    session, conids = await ibkr_start(ready["ibkr_rest"])
    api, secret, refresh = ready["tastytrade_api"], ready["tt_client_secret"], ready["tt_refresh_token"]
    quote, symbols = await dxlink_start(api, secret, refresh)
    subscriptions = engine_subscriptions(symbols)
    layouts = {t: list(f) for t, f in DX_FIELDS.items()}
    cookie = {"Cookie": f"api={session}"}
    async with (
        websockets.connect(ready["ibkr_ws"], additional_headers=cookie, max_size=1 << 24) as ib,
        websockets.connect(quote["dxlink-url"], max_size=1 << 24) as dx,
    ):
        await dxlink_open(dx, quote["token"], subscriptions, layouts)
        stats.state = "streaming"
        stats.maybe_write(force=True)

        async def subscribe() -> None:
            for conid, asset_class in conids.items():
                fields = IBKR_OPTION_FIELDS if asset_class == "OPT" else IBKR_OTHER_FIELDS
                await ib.send(f"smd+{conid}+" + orjson.dumps({"fields": fields}).decode())

        async def ibkr_reader(tg: asyncio.TaskGroup) -> None:
            subscribed = False
            async for raw in ib:
                msg = orjson.loads(raw)
                sent = ibkr_ticks(msg)
                if sent:
                    stats.record_frame(sent, time.time())
                elif not subscribed and type(msg) is dict and msg.get("topic") == "sts":
                    if msg.get("args", {}).get("authenticated"):
                        subscribed = True
                        tg.create_task(subscribe())  # reading on meanwhile: the replies come at once

        async def dx_reader() -> None:
            async for raw in dx:
                msg = orjson.loads(raw)
                kind = msg.get("type")
                if kind == "FEED_DATA":
                    event_type, values = msg["data"]
                    sent = dx_ticks(layouts[event_type], values, DX_TIME[event_type])
                    if sent:
                        stats.record_frame(sent, time.time())
                elif kind == "FEED_CONFIG" and msg.get("eventFields"):
                    layouts.update(msg["eventFields"])
                elif kind == "KEEPALIVE":
                    await dx.send('{"type":"KEEPALIVE","channel":0}')

        async with asyncio.TaskGroup() as tg:
            tg.create_task(ibkr_reader(tg))
            tg.create_task(dx_reader())
