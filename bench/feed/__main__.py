"""``python -m bench.feed``: the benchmark feed as a process of its own.

Serves the IBKR gateway (REST + ``/v1/api/ws``), the Tastytrade REST API and DXLink (see
:mod:`bench.feed.server`) and a loopback control plane (``simulator.control`` plus):

- ``POST /start`` / ``POST /stop``: begin / end streaming at the configured rate (before
  ``/start`` only the last-value frames that answer a subscription are sent);
- ``GET /feed``: rates, offered ticks per broker, frames, ``behind``, subscribed held contracts;
- ``GET /ledger``: ``{"brokers": {broker: {key: last_seq}}}``, the ticks offered.

When everything listens, one JSON object with the URLs is written to ``--ready-file`` (and the
ledger to ``--ledger-out`` on exit). Logs (JSON lines) go to stderr. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bench.feed.server import MIXES, FastIbkrGateway, FastTastytradeSim, Feed, FeedConfig, FeedSimulators
from config.logging import configure_logging
from config.settings import LogFormat
from simulator.control import build_app
from simulator.market import Market, MarketConfig

SECRET = "bench-secret"  # the Tastytrade credentials the feed accepts (TT_CLIENT_SECRET ...)
REFRESH = "bench-refresh"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2000.0, help="ticks/s offered in total")
    p.add_argument("--mix", choices=MIXES, default="both")
    p.add_argument("--ibkr-share", type=float, default=0.5, help="mix both: IBKR's share of the rate")
    p.add_argument("--ibkr-max", type=float, default=2000.0, help="mix both: IBKR frames/s at most")
    p.add_argument("--positions", type=int, default=500, help="contracts per broker")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--unheld-hz", type=float, default=1.0, help="ticks/s of each subscribed non-position")
    p.add_argument("--events-per-frame", type=int, default=100, help="DXLink events per FEED_DATA, at most")
    p.add_argument("--start", action="store_true", help="stream at once (no POST /start needed)")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("--ledger-out", type=Path, default=None)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    market = Market(MarketConfig(seed=args.seed, positions=args.positions), time.time())
    config = FeedConfig(
        rate=args.rate,
        mix=args.mix,
        ibkr_share=args.ibkr_share,
        ibkr_max=args.ibkr_max,
        unheld_hz=args.unheld_hz,
        max_events_per_frame=args.events_per_frame,
    )
    feed = Feed(config, market)
    ibkr = FastIbkrGateway(market, feed, session_timeout_s=3600.0)
    tasty = FastTastytradeSim(market, feed, provider_secret=SECRET, refresh_token=REFRESH)
    await ibkr.start()
    await tasty.start()
    sims = FeedSimulators(market=market, ibkr=ibkr, tastytrade=tasty)
    sims.feed = feed
    app = build_app(sims)

    async def start(_request: web.Request) -> web.Response:
        feed.start(time.time())
        return web.json_response(feed.describe())

    async def stop(_request: web.Request) -> web.Response:
        feed.stop(time.time())
        return web.json_response(feed.describe())

    async def describe(_request: web.Request) -> web.Response:
        body: dict[str, Any] = feed.describe()
        body["subscribed_held"] = {"ibkr": ibkr.subscribed_held(), "tastytrade": tasty.subscribed_held()}
        body["clients"] = {"ibkr": ibkr.client_count, "tastytrade": len(tasty.connections)}
        return web.json_response(body)

    app.router.add_post("/start", start)
    app.router.add_post("/stop", stop)
    app.router.add_get("/feed", describe)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.control_port).start()
    control = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ready = {
        "pid": os.getpid(),
        "control": control,
        "ibkr_base": ibkr.base_url,
        "ibkr_rest": ibkr.rest_url,
        "ibkr_ws": ibkr.ws_url,
        "tastytrade_api": tasty.api_url,
        "tastytrade_dxlink": tasty.dxlink_url,
        "tt_client_secret": SECRET,
        "tt_refresh_token": REFRESH,
        "positions": {b: len(market.positions(b)) for b in ("ibkr", "tastytrade")},
        "options": {
            b: sum(1 for p in market.positions(b) if p.contract.asset_class == "OPT")
            for b in ("ibkr", "tastytrade")
        },
        "rates": feed.rates,
    }
    if args.start:
        feed.start(time.time())
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(ready))
        tmp.replace(args.ready_file)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        feed.stop(time.time())
        if args.ledger_out is not None:
            brokers: dict[str, dict[str, int]] = {}
            for (broker, key), seq in feed.ledger().items():
                brokers.setdefault(broker, {})[key] = seq
            args.ledger_out.write_bytes(orjson.dumps({"brokers": brokers, "feed": feed.describe()}))
        await runner.cleanup()
        await tasty.stop()
        await ibkr.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, LogFormat.JSON, stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
