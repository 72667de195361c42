"""The engine's wiring: which actors run, joined by which channels (the composition root's body).

Start order: writer (database ready, schema migrated) -> normalizer -> broker actors; the
supervisor stops them in reverse order with a drain.

A simulated broker (no credentials, or ``--simulate``) is the project's own simulator of that
broker, started here on a free loopback port (:func:`broker_simulators`), and the broker's real
wire-protocol actor runs against it: the settings the actor sees point at the simulator.
"""

from __future__ import annotations

import asyncio
import platform
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc

from config.logging import get_logger, redact_text
from config.settings import Secret, Settings
from supervisor.errors import FatalError
from supervisor.heap import freeze_startup_heap
from supervisor.spec import ActorSpec, Backoff, ChannelSpec, Intensity, Restart, RunFn
from supervisor.status import StatusRegistry
from supervisor.supervisor import Supervisor


def _policy(settings: Settings) -> tuple[Backoff, Intensity]:
    r = settings.restart
    return (
        Backoff(initial_s=r.backoff_initial_s, max_s=r.backoff_max_s, jitter_s=min(1.0, r.backoff_initial_s)),
        Intensity(max_restarts=r.max_restarts, period_s=r.period_s),
    )


SIMULATED_SECRET = "simulated"  # the credentials handed to the local Tastytrade simulator


def with_simulators(settings: Settings, sims: Any) -> Settings:
    """``settings`` with each simulated broker pointed at its simulator in ``sims``
    (:class:`simulator.api.Simulators`); live brokers are left as they are."""
    if sims.ibkr is not None:
        settings = replace(
            settings,
            ibkr=replace(
                settings.ibkr,
                gateway_url=sims.ibkr.base_url,
                ws_url=None,
                ca_file=None,
                verify_tls=True,
                session_cookie=None,
            ),
        )
    if sims.tastytrade is not None:
        settings = replace(
            settings,
            tastytrade=replace(
                settings.tastytrade,
                api_url=sims.tastytrade.api_url,
                client_secret=Secret(SIMULATED_SECRET),
                refresh_token=Secret(SIMULATED_SECRET),
            ),
        )
    return settings


@asynccontextmanager
async def broker_simulators(settings: Settings, modes: dict[str, str]) -> AsyncIterator[Settings]:
    """Start the simulators of the brokers that ``modes`` marks ``simulated`` (one shared market
    from the ``SIM_*`` settings, free loopback ports); yield the settings the actors should use."""
    simulated = [b for b, m in modes.items() if m == "simulated"]
    if not simulated:
        yield settings
        return
    from simulator.api import run_simulators
    from simulator.market import MarketConfig

    config = MarketConfig(
        seed=settings.sim.seed, positions=settings.sim.positions, rate_hz=settings.sim.rate_hz
    )
    async with run_simulators(config, brokers=simulated) as sims:
        get_logger(actor="engine").info(
            "simulators_started",
            brokers=simulated,
            seed=config.seed,
            market_start_ts=sims.market.start_ts,  # with the seed: the market can be recomputed
            **sims.urls(),
        )
        yield with_simulators(settings, sims)


def speedups_loaded() -> bool:
    """Whether the optional C fast paths (``db/_speedups.c``, ``normalize/_speedups.c``) were
    built and loaded; without them the same pure-Python code runs, slower."""
    from db import encode
    from normalize import book

    return encode.SPEEDUPS and book.SPEEDUPS


def running_event_loop() -> str:
    """The event loop running this task: ``uvloop``, ``asyncio`` (the standard library's), or
    ``other`` (not an asyncio loop: trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "other"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def run_engine(settings: Settings) -> int:
    """Start the database, build the tree, run it until SIGINT/SIGTERM. Returns the exit code."""
    from db.embedded import EmbeddedError, keep_alive, open_database

    log = get_logger(actor="engine")
    brokers = {b: settings.broker_mode(b) for b in settings.brokers}
    registry = StatusRegistry(mode=settings.mode, clock=time.time, redact=redact_text)
    registry.publish("brokers", dict(brokers))
    event_loop = running_event_loop()
    speedups = speedups_loaded()
    registry.publish(
        "runtime", {"event_loop": event_loop, "python": platform.python_version(), "speedups": speedups}
    )
    backoff, intensity = _policy(settings)
    supervisor: Supervisor | None = None
    stop_before_start = anyio.Event()

    async def watch_signals(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        # The engine owns SIGINT/SIGTERM for its whole life, the database start and stop
        # included, so a signal never kills it without a drain or leaves a postmaster behind.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if supervisor is None:
                    log.info("stop_requested", signal=name, phase="startup")
                    stop_before_start.set()
                elif supervisor.stopping:
                    log.warning("second_signal_forcing_exit", signal=name)
                    supervisor.force_stop()
                else:
                    log.info("stop_requested", signal=name)
                    supervisor.request_stop()

    fatal: FatalError | None = None
    code = 0
    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        log.info(
            "engine_starting",
            mode=settings.mode,
            brokers=brokers,
            event_loop=event_loop,
            speedups=speedups,
            status_file=str(settings.status_file),
        )
        if simulated := [b for b, m in brokers.items() if m == "simulated"]:
            log.warning(
                "simulated_data",
                brokers=simulated,
                detail="these brokers are the local simulators (seeded market), not real brokers",
                seed=settings.sim.seed,
            )
        async with AsyncExitStack() as stack:
            try:
                with anyio.CancelScope(shield=True):  # a started server is always stopped again
                    db = await stack.enter_async_context(open_database(settings.db))
            except EmbeddedError as exc:
                fatal = FatalError(f"embedded PostgreSQL could not start: {exc}")
            else:
                registry.publish("database", db.describe())
                if db.server is not None:
                    # The engine owns this server: if it dies (killed, crashed) it is started
                    # again on the same port; the writer reconnects and replays its spool.
                    server = db.server

                    def on_db_event(event: str, fields: dict[str, object]) -> None:
                        level = log.info if event == "embedded_db_restarted" else log.error
                        level(event, **fields)

                    async def watch_database() -> None:
                        with stack_scope:
                            await keep_alive(server, on_event=on_db_event)

                    stack_scope = anyio.CancelScope()
                    stack.callback(stack_scope.cancel)
                    tg.start_soon(watch_database)
            if fatal is None and stop_before_start.is_set():
                log.info("engine_stopped_before_start")
            elif fatal is None:
                effective = await stack.enter_async_context(broker_simulators(settings, brokers))
                supervisor = Supervisor(
                    _specs(effective, db.dsn, brokers, backoff, intensity),
                    [
                        ChannelSpec("raw", settings.channels.raw_capacity),
                        ChannelSpec("rows", settings.channels.rows_capacity),
                    ],
                    registry,
                    status_file=settings.status_file,
                    status_interval_s=settings.status_interval_s,
                    shutdown_timeout_s=settings.shutdown_timeout_s,
                    critical=("writer", "normalizer"),
                    after_start=lambda: log.info("startup_heap_frozen", objects=freeze_startup_heap()),
                )
                code = await supervisor.run()
        tg.cancel_scope.cancel()
    if fatal is not None:
        raise fatal
    return code


def _broker_run(broker: str, settings: Settings, mode: str) -> RunFn:
    """The wire-protocol actor of one broker, live or against its simulator (``settings`` already
    point a simulated broker at its simulator)."""
    if broker == "ibkr":
        from actors.ibkr.actor import make_ibkr_actor

        return make_ibkr_actor(settings.ibkr, mode=mode)
    if broker == "tastytrade":
        from actors.tastytrade import make_tastytrade_actor

        return make_tastytrade_actor(settings.tastytrade, mode=mode)
    raise ValueError(f"unknown broker {broker!r}")


def _specs(
    settings: Settings,
    dsn: str,
    modes: dict[str, str],
    backoff: Backoff,
    intensity: Intensity,
) -> list[ActorSpec]:
    from actors.normalizer import make_normalizer
    from actors.writer import make_writer

    specs = [
        ActorSpec(
            "writer", make_writer(settings.db, dsn), Restart.PERMANENT, backoff, intensity, inputs=("rows",)
        ),
        ActorSpec(
            "normalizer",
            make_normalizer(
                risk_free_rate=settings.risk_free_rate,
                conflate_after_rows=settings.channels.conflate_after_rows,
            ),
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
            _broker_run(broker, settings, modes[broker]),
            Restart.PERMANENT,
            backoff,
            intensity,
            outputs=("raw",),
            meta={"broker": broker},
        )
        for broker in settings.brokers
    ]
    return specs
