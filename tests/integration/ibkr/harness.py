"""Run the IBKR actor under the real supervisor against the IBKR gateway simulator (real sockets).

A collector actor consumes ``raw`` like the normalizer does and keeps every event, so tests wait on
what the actor emitted (no sleeps): :meth:`Harness.wait_for` wakes on every batch.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskStatus

from actors.ibkr.actor import make_ibkr_actor
from config.settings import IbkrSettings
from normalize.events import BrokerEvent, InstrumentUpdate, PositionsSnapshot, SessionEnded, SessionStarted
from simulator.ibkr import IbkrGateway
from simulator.market import Market, MarketConfig, SimPosition
from supervisor.context import ActorContext
from supervisor.spec import ActorSpec, Backoff, ChannelSpec, Intensity
from supervisor.status import StatusRegistry
from supervisor.supervisor import Supervisor

FAST = IbkrSettings(
    tic_interval_s=0.5,
    tickle_interval_s=3600.0,
    resubscribe_s=540.0,
    hb_timeout_s=1.0,
    positions_refresh_s=3600.0,
)


@dataclass
class Collector:
    events: list[BrokerEvent] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def add(self, batch: list[BrokerEvent]) -> None:
        self.events.extend(batch)
        self.poke()

    def poke(self) -> None:
        """Wake the waiters (on every batch, and on every status-registry change)."""
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], Any], within_s: float = 10.0) -> Any:
        with anyio.fail_after(within_s):
            while not (value := predicate()):
                await self._changed.wait()
            return value

    def updates(self, key: str | None = None) -> list[InstrumentUpdate]:
        return [
            e for e in self.events if isinstance(e, InstrumentUpdate) and (key is None or e.instrument == key)
        ]

    def snapshots(self) -> list[PositionsSnapshot]:
        return [e for e in self.events if isinstance(e, PositionsSnapshot)]

    def sessions(self) -> list[SessionStarted]:
        return [e for e in self.events if isinstance(e, SessionStarted)]

    def ended(self) -> list[SessionEnded]:
        return [e for e in self.events if isinstance(e, SessionEnded)]

    def keys(self) -> set[str]:
        return {u.instrument for u in self.updates()}

    def run_fn(self) -> Any:
        async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            task_status.started()
            async for batch in ctx.receivers["raw"]:
                self.add(batch)

        return run


@dataclass
class Harness:
    gateway: IbkrGateway
    market: Market
    collector: Collector
    registry: StatusRegistry
    supervisor: Supervisor

    async def wait_for(self, predicate: Callable[[], Any], within_s: float = 10.0) -> Any:
        return await self.collector.wait_for(predicate, within_s)

    def info(self) -> dict[str, Any]:
        actor = self.registry.actors["ibkr"]
        return {**actor.info, "restarts": actor.restarts, "state": actor.state.value}

    def options(self) -> list[SimPosition]:
        return [p for p in self.market.positions("ibkr") if p.contract.asset_class == "OPT"]

    def expected_conids(self) -> set[int]:
        """Every option position and each underlying (stocks held included), once."""
        book = self.market.positions("ibkr")
        underlyings = {self.market.underlying_contract(p.contract).conid for p in book}
        return {p.contract.conid for p in self.options()} | underlyings

    def all_streaming(self, after: float = 0.0) -> bool:
        """Every option and underlying key has an update received after ``after``."""
        seen = {u.instrument for u in self.collector.updates() if u.received_ts > after}
        return self.option_keys() | self.underlying_keys() <= seen

    def option_keys(self) -> set[str]:
        return {p.contract.key for p in self.market.positions("ibkr") if p.contract.asset_class == "OPT"}

    def underlying_keys(self) -> set[str]:
        return {p.contract.underlying for p in self.market.positions("ibkr")}


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The captured log entries of one event."""
    return [e for e in logs if e.get("event") == event]


def market(**config: Any) -> Market:
    return Market(MarketConfig(**{"rate_hz": 20.0, **config}), time.time())


@asynccontextmanager
async def gateway(market: Market, **options: Any) -> AsyncIterator[IbkrGateway]:
    gw = IbkrGateway(market, **{"hb_interval_s": 0.1, **options})
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@asynccontextmanager
async def running(gw: IbkrGateway, settings: IbkrSettings = FAST, **overrides: Any) -> AsyncIterator[Harness]:
    """The actor (against ``gw``) and a collector under one supervisor; stopped with a drain."""
    settings = replace(settings, gateway_url=gw.base_url, **overrides)
    collector = Collector()
    registry = StatusRegistry(mode="live", clock=time.time)
    backoff = Backoff(initial_s=0.02, max_s=0.2, jitter_s=0.01)
    intensity = Intensity(max_restarts=1000, period_s=60.0)
    supervisor = Supervisor(
        [
            ActorSpec("sink", collector.run_fn(), backoff=backoff, intensity=intensity, inputs=("raw",)),
            ActorSpec(
                "ibkr",
                make_ibkr_actor(settings, mode="live"),
                backoff=backoff,
                intensity=intensity,
                outputs=("raw",),
            ),
        ],
        [ChannelSpec("raw", 64)],
        registry,
        shutdown_timeout_s=5.0,
    )
    supervisor_changed = registry.on_change

    def on_change() -> None:
        if supervisor_changed is not None:
            supervisor_changed()
        collector.poke()

    registry.on_change = on_change
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        try:
            yield Harness(gw, gw.market, collector, registry, supervisor)
        finally:
            supervisor.request_stop()
