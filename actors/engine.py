"""The engine's wiring: which actors run, joined by which channels (the composition root's body).

Start order: writer (database ready, schema migrated) -> normalizer -> broker feeds; the
supervisor stops them in reverse order with a drain.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from config.logging import get_logger
from config.settings import Settings
from supervisor.errors import FatalError
from supervisor.spec import ActorSpec, Backoff, ChannelSpec, Intensity, Restart
from supervisor.status import StatusRegistry
from supervisor.supervisor import Supervisor


def _policy(settings: Settings) -> tuple[Backoff, Intensity]:
    r = settings.restart
    return (
        Backoff(initial_s=r.backoff_initial_s, max_s=r.backoff_max_s, jitter_s=min(1.0, r.backoff_initial_s)),
        Intensity(max_restarts=r.max_restarts, period_s=r.period_s),
    )


def live_unavailable(settings: Settings) -> str | None:
    """The setting that asks for live streaming this version cannot do yet, if any."""
    if "ibkr" in settings.brokers and settings.broker_mode("ibkr") == "live":
        return "IBKR_GATEWAY_URL"
    if "tastytrade" in settings.brokers and settings.broker_mode("tastytrade") == "live":
        return "TT_CLIENT_SECRET"
    return None


async def run_engine(settings: Settings) -> int:
    """Start the database, build the tree, run it until SIGINT/SIGTERM. Returns the exit code."""
    from actors.demo import make_demo_feed
    from actors.normalizer import make_normalizer
    from actors.writer import make_writer
    from db.embedded import EmbeddedError, database
    from simulator.market import Market, MarketConfig

    log = get_logger(actor="engine")
    brokers = {b: settings.broker_mode(b) for b in settings.brokers}
    log.info("engine_starting", mode=settings.mode, brokers=brokers, status_file=str(settings.status_file))
    log.warning(
        "simulated_data",
        brokers=[b for b, m in brokers.items() if m == "simulated"],
        detail="rows come from the seeded market simulator, not from a broker",
        seed=settings.sim.seed,
    )
    registry = StatusRegistry(mode=settings.mode, clock=time.time)
    registry.publish("brokers", dict(brokers))
    backoff, intensity = _policy(settings)
    market = Market(
        MarketConfig(seed=settings.sim.seed, positions=settings.sim.positions, rate_hz=settings.sim.rate_hz),
        start_ts=time.time(),
    )
    async with AsyncExitStack() as stack:
        try:
            dsn = await stack.enter_async_context(database(settings.db))
        except EmbeddedError as exc:
            raise FatalError(f"embedded PostgreSQL could not start: {exc}") from None
        specs = [
            ActorSpec(
                "writer",
                make_writer(settings.db, dsn),
                Restart.PERMANENT,
                backoff,
                intensity,
                inputs=("rows",),
            ),
            ActorSpec(
                "normalizer",
                make_normalizer(),
                Restart.PERMANENT,
                backoff,
                intensity,
                inputs=("raw",),
                outputs=("rows",),
            ),
        ]
        specs += [
            ActorSpec(
                broker,
                make_demo_feed(broker, market, settings.sim.rate_hz),
                Restart.PERMANENT,
                backoff,
                intensity,
                outputs=("raw",),
                meta={"broker": broker},
            )
            for broker in settings.brokers
        ]
        channels = [
            ChannelSpec("raw", settings.channels.raw_capacity),
            ChannelSpec("rows", settings.channels.rows_capacity),
        ]
        supervisor = Supervisor(
            specs,
            channels,
            registry,
            status_file=settings.status_file,
            status_interval_s=settings.status_interval_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            handle_signals=True,
            critical=("writer", "normalizer"),
        )
        return await supervisor.run()
    return 1  # pragma: no cover - unreachable, keeps mypy happy about the async with
