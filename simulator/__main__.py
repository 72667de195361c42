"""``python -m simulator ibkr|tastytrade|both``: run the broker simulators standalone.

Logs JSON lines (the engine's format) naming the URLs served, then runs until SIGINT/SIGTERM.
``--port`` is the REST port: the IBKR gateway's (REST and ``/v1/api/ws``), or Tastytrade's when
it runs alone. With ``both``, Tastytrade takes ``--tastytrade-port`` (default: ``--port + 1``, or
any free port when ``--port`` is 0). DXLink is served where ``/api-quote-tokens`` says.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from config.logging import configure_logging
from config.settings import LogFormat
from simulator.api import run_simulators
from simulator.market import MarketConfig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n")[0])
    parser.add_argument("broker", choices=("ibkr", "tastytrade", "both"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="REST port (0: any free port)")
    parser.add_argument("--tastytrade-port", type=int, default=None)
    parser.add_argument("--rate", type=float, default=2.0, help="updates per contract per second")
    parser.add_argument("--burstiness", type=float, default=0.0, help="0 even .. 1 very bursty")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--positions", type=int, default=0, help="contracts per broker (0: default)")
    parser.add_argument("--hb-interval", type=float, default=10.0, help="IBKR system hb (s)")
    parser.add_argument("--sub-ttl", type=float, default=600.0, help="IBKR smd lifetime (s)")
    parser.add_argument("--certfile", default=None, help="IBKR: serve TLS with this certificate")
    parser.add_argument("--keyfile", default=None)
    parser.add_argument(
        "--control-port", type=int, default=None, help="serve the control plane (ledger, faults)"
    )
    parser.add_argument(
        "--seq-offset", type=int, default=0, help="first seq is this + 1 (a restart continues)"
    )
    parser.add_argument("--record-times", action="store_true", help="keep every emission time (GET /ledger)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    log = structlog.get_logger("simulator").bind(actor="simulator")
    brokers = ("ibkr", "tastytrade") if args.broker == "both" else (args.broker,)
    config = MarketConfig(
        seed=args.seed,
        positions=args.positions,
        rate_hz=args.rate,
        burstiness=args.burstiness,
        seq_offset=args.seq_offset,
        record_times=args.record_times,
    )
    if args.broker == "tastytrade":
        ibkr_port, tasty_port = 0, args.port
    else:
        ibkr_port = args.port
        default_tasty = args.port + 1 if args.port else 0
        tasty_port = args.tastytrade_port if args.tastytrade_port is not None else default_tasty
    ibkr_options: dict[str, Any] = {
        "hb_interval_s": args.hb_interval,
        "subscription_ttl_s": args.sub_ttl,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
    }
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with run_simulators(
            config,
            brokers=brokers,
            host=args.host,
            ibkr_port=ibkr_port,
            tastytrade_port=tasty_port,
            ibkr_options=ibkr_options,
        ) as sims:
            control = None
            urls = sims.urls()
            if args.control_port is not None:
                from simulator.control import start_control

                control = await start_control(sims, args.control_port)
                urls["control"] = f"http://127.0.0.1:{control.addresses[0][1]}"
            log.info(
                "simulators_ready",
                seed=args.seed,
                rate_hz=args.rate,
                positions={b: len(sims.market.positions(b)) for b in brokers},
                **urls,
            )
            async for signum in signals:
                log.info("simulators_stopping", signal=signal.Signals(signum).name)
                break
            if control is not None:
                await control.cleanup()
    log.info("simulators_stopped", ledger_updates=sum(sims.ledger().values()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, LogFormat(args.log_format))
    anyio.run(serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
