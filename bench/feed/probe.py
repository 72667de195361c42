"""A bare consumer of the feed: REST start-up, then count every tick and its wire latency.

It speaks both protocols with nothing but aiohttp, websockets and orjson (IBKR: tickle ->
accounts -> positions pages -> ``/v1/api/ws`` with the ``api`` cookie -> ``smd`` per position;
Tastytrade: OAuth token -> positions -> streamer symbols -> quote token -> DXLink handshake ->
COMPACT Greeks/Quote), so it shows the feed serves both, and how many ticks per second the feed
itself can deliver (``python -m bench capacity`` runs it as the feed's ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import websockets

IBKR_FIELDS = ["31", "84", "86", "7635", "7308", "7309", "7310", "7311", "7633", "6457"]
GREEKS_FIELDS = ["eventSymbol", "eventTime", "time", "sequence", "price", "volatility", "delta"]
QUOTE_FIELDS = ["eventSymbol", "eventTime", "sequence", "bidTime", "askTime", "bidPrice", "askPrice"]
UA = {"User-Agent": "bench-probe/1.0"}


@dataclass
class Counts:
    ticks: int = 0
    frames: int = 0
    subscribed: int = 0
    latency_ms: list[float] = field(default_factory=list)  # a sample: every 64th tick
    seqs: dict[str, int] = field(default_factory=dict)  # key -> highest seq seen


async def ibkr_start(rest: str) -> tuple[str, dict[int, str]]:
    """The Client Portal's REST start-up: the session (the websocket's ``api`` cookie) and every
    position's conid with its asset class (``OPT``, ``STK``, ...)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{rest}/tickle") as r:
            session = (await r.json())["session"]
        async with http.get(f"{rest}/iserver/accounts") as r:
            accounts = (await r.json())["accounts"]
        conids: dict[int, str] = {}
        for account in accounts:
            page = 0
            while True:
                async with http.get(f"{rest}/portfolio/{account}/positions/{page}") as r:
                    rows = await r.json()
                conids.update({row["conid"]: str(row.get("assetClass", "")) for row in rows})
                if len(rows) < 100:
                    break
                page += 1
    return str(session), conids


async def ibkr(rest: str, ws_url: str, counts: Counts, stop: asyncio.Event) -> None:
    session, conids = await ibkr_start(rest)
    async with websockets.connect(ws_url, additional_headers={"Cookie": f"api={session}"}) as ws:
        fields = orjson.dumps({"fields": IBKR_FIELDS}).decode()
        authenticated = False
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.25)
            except TimeoutError:
                continue
            msg = orjson.loads(raw)
            if msg.get("topic") == "sts" and msg.get("args", {}).get("authenticated") and not authenticated:
                authenticated = True
                for conid in conids:
                    await ws.send(f"smd+{conid}+{fields}")
                counts.subscribed += len(conids)
            seq = msg.get("_seq")
            if seq is not None:
                _count(counts, msg["conid"], seq, msg["_updated"])


def _text(message: Any) -> str:
    return orjson.dumps(message).decode()  # a text frame: DXLink refuses binary ones


def _count(counts: Counts, key: Any, seq: int, sent_ms: int) -> None:
    counts.ticks += 1
    if seq > counts.seqs.get(key, 0):
        counts.seqs[key] = seq
    if counts.ticks % 64 == 0:
        counts.latency_ms.append(time.time() * 1000 - sent_ms)


async def dxlink_start(api: str, secret: str, refresh: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Tastytrade's REST start-up: the quote token (``dxlink-url``, ``token``) and what to
    subscribe, ``(event type, streamer symbol)``: Greeks for every option position, Quote for
    the rest."""
    async with aiohttp.ClientSession() as http:
        body = {"grant_type": "refresh_token", "client_secret": secret, "refresh_token": refresh}
        async with http.post(f"{api}/oauth/token", json=body) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}", **UA}

        async def get(path: str, **params: Any) -> Any:
            async with http.get(f"{api}{path}", headers=headers, params=params) as r:
                return (await r.json())["data"]

        accounts = [a["account"]["account-number"] for a in (await get("/customers/me/accounts"))["items"]]
        symbols: list[tuple[str, str]] = []  # (event type, streamer symbol)
        options: list[str] = []
        for account in accounts:
            for pos in (await get(f"/accounts/{account}/positions"))["items"]:
                if pos["instrument-type"] == "Equity Option":
                    options.append(pos["symbol"])
                else:
                    symbols.append(("Quote", pos["symbol"]))
        for i in range(0, len(options), 100):
            chunk = [("symbol[]", s) for s in options[i : i + 100]]
            async with http.get(f"{api}/instruments/equity-options", headers=headers, params=chunk) as r:
                items = (await r.json())["data"]["items"]
            symbols += [("Greeks", item["streamer-symbol"]) for item in items]
        return await get("/api-quote-tokens"), symbols


async def dxlink_open(
    ws: Any, token: str, symbols: list[tuple[str, str]], fields: dict[str, list[str]]
) -> None:
    """The DXLink handshake on ``ws``: SETUP, AUTH, a FEED channel in COMPACT with ``fields``,
    then one FEED_SUBSCRIPTION of ``symbols``."""
    await ws.send(_text({"type": "SETUP", "channel": 0, "version": "0.1-probe", "keepaliveTimeout": 60}))
    await ws.send(_text({"type": "AUTH", "channel": 0, "token": token}))
    channel = {"type": "CHANNEL_REQUEST", "channel": 1, "service": "FEED", "parameters": {"contract": "AUTO"}}
    await ws.send(_text(channel))
    setup = {
        "type": "FEED_SETUP",
        "channel": 1,
        "acceptAggregationPeriod": 0.1,
        "acceptDataFormat": "COMPACT",
        "acceptEventFields": fields,
    }
    await ws.send(_text(setup))
    add = [{"type": t, "symbol": s} for t, s in symbols]
    await ws.send(_text({"type": "FEED_SUBSCRIPTION", "channel": 1, "add": add}))


async def dxlink(api: str, secret: str, refresh: str, counts: Counts, stop: asyncio.Event) -> None:
    quote, symbols = await dxlink_start(api, secret, refresh)
    async with websockets.connect(quote["dxlink-url"], max_size=1 << 24) as ws:
        await dxlink_open(ws, quote["token"], symbols, {"Greeks": GREEKS_FIELDS, "Quote": QUOTE_FIELDS})
        counts.subscribed += len(symbols)
        layouts = {"Greeks": GREEKS_FIELDS, "Quote": QUOTE_FIELDS}
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.25)
            except TimeoutError:
                continue
            msg = orjson.loads(raw)
            if msg.get("type") == "FEED_CONFIG" and msg.get("eventFields"):
                layouts.update(msg["eventFields"])
            elif msg.get("type") == "FEED_DATA":
                event_type, values = msg["data"]
                names = layouts[event_type]
                width = len(names)
                i_sym, i_seq = names.index("eventSymbol"), names.index("sequence")
                i_time = names.index("time") if "time" in names else names.index("bidTime")
                counts.frames += 1
                for i in range(0, len(values), width):
                    _count(counts, values[i + i_sym], values[i + i_seq], values[i + i_time])
            elif msg.get("type") == "KEEPALIVE":
                await ws.send('{"type":"KEEPALIVE","channel":0}')


async def probe(
    ready: dict[str, Any], seconds: float, brokers: tuple[str, ...], start: bool = True
) -> dict[str, Any]:
    """Consume ``brokers`` from the feed described by ``ready`` for ``seconds`` after the feed
    was started; returns ticks, frames and a latency sample per broker."""
    stop = asyncio.Event()
    counts = {b: Counts() for b in brokers}
    tasks: list[asyncio.Task[None]] = []
    if "ibkr" in brokers:
        tasks.append(asyncio.create_task(ibkr(ready["ibkr_rest"], ready["ibkr_ws"], counts["ibkr"], stop)))
    if "tastytrade" in brokers:
        tasks.append(
            asyncio.create_task(
                dxlink(
                    ready["tastytrade_api"],
                    ready["tt_client_secret"],
                    ready["tt_refresh_token"],
                    counts["tastytrade"],
                    stop,
                )
            )
        )
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _subscribed(http, ready["control"], brokers, ready["positions"]), 30.0)
        before = {b: counts[b].ticks for b in brokers}
        t0 = time.time()
        if start:
            async with http.post(f"{ready['control']}/start") as r:
                r.raise_for_status()
        await asyncio.sleep(seconds)
        ticks = {b: counts[b].ticks - before[b] for b in brokers}
        elapsed = time.time() - t0
        async with http.post(f"{ready['control']}/stop") as r:
            r.raise_for_status()
        stop.set()
        await asyncio.gather(*tasks)
        async with http.get(f"{ready['control']}/feed") as r:
            described = await r.json()
    out: dict[str, Any] = {"seconds": elapsed, "feed": described}
    for b in brokers:
        lat = sorted(counts[b].latency_ms)
        out[b] = {
            "ticks": counts[b].ticks,
            "ticks_per_s": ticks[b] / elapsed,
            "frames": counts[b].frames,
            "subscribed": counts[b].subscribed,
            "contracts_seen": len(counts[b].seqs),
            "latency_ms_p50": lat[len(lat) // 2] if lat else None,
            "latency_ms_p99": lat[int(len(lat) * 0.99)] if lat else None,
        }
    return out


async def _subscribed(
    http: aiohttp.ClientSession, control: str, brokers: tuple[str, ...], positions: dict[str, int]
) -> bool:
    async with http.get(f"{control}/feed") as r:
        held = (await r.json())["subscribed_held"]
    return all(held[b] >= positions[b] for b in brokers)


async def _until(check: Callable[[], Awaitable[bool]], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the feed never saw every position subscribed")
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feed.probe", description=__doc__.splitlines()[0])
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--brokers", default="ibkr,tastytrade")
    args = p.parse_args(argv)
    ready = orjson.loads(args.ready_file.read_bytes())
    result = asyncio.run(probe(ready, args.seconds, tuple(args.brokers.split(","))))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
