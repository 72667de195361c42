"""Helpers for the database tests: synthetic rows, the writer harness, one-shot queries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from structlog.testing import LogCapture

from actors.writer import make_writer
from config.settings import DatabaseSettings
from normalize.model import GreeksSnapshot
from supervisor.context import ActorContext
from supervisor.status import StatusRegistry


def snapshot(
    i: int,
    *,
    ts: float | None = None,
    n_instruments: int = 20,
    received: float | None = None,
    broker: str = "ibkr",
) -> GreeksSnapshot:
    """A synthetic row: instrument ``i % n_instruments``, ``seq = i``, event time ``ts``."""
    now = time.time() if ts is None else ts
    k = i % n_instruments
    quantity = float(k % 5 - 2 or 1)
    delta = 0.01 * (i % 100)
    return GreeksSnapshot(
        broker=broker,
        account="U1234567",
        instrument=f"SPY   250117C{500 + k:05d}000",
        underlying="SPY" if k % 2 else "QQQ",
        asset_class="OPT",
        right="C",
        strike=500.0 + k,
        expiry=date(2025, 1, 17),
        multiplier=100.0,
        quantity=quantity,
        event_ts=now,
        received_ts=now if received is None else received,
        bid=1.0,
        ask=1.1,
        mark=1.05,
        underlying_price=500.0,
        iv=0.2,
        delta=delta,
        gamma=0.01,
        theta=-0.05,
        vega=0.1,
        pos_delta=delta * quantity * 100,
        pos_gamma=0.01 * quantity * 100,
        pos_theta=-0.05 * quantity * 100,
        pos_vega=0.1 * quantity * 100,
        seq=i,
    )


@dataclass
class WriterHarness:
    """Runs the writer actor in a task group, as the supervisor would, and watches its status."""

    settings: DatabaseSettings
    dsn: str
    capacity: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    registry: StatusRegistry = field(init=False)
    logs: LogCapture = field(default_factory=LogCapture)
    send: MemoryObjectSendStream[Sequence[GreeksSnapshot]] = field(init=False)
    receive: MemoryObjectReceiveStream[Sequence[GreeksSnapshot]] = field(init=False)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.registry = StatusRegistry(mode="test", clock=time.time)
        self.registry.add_actor("writer", critical=True)
        self.registry.on_change = self._notify
        self.send, self.receive = anyio.create_memory_object_stream[Sequence[GreeksSnapshot]](self.capacity)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def context(self) -> ActorContext:
        log = structlog.wrap_logger(
            None,
            processors=[self.logs],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        ).bind(actor="writer")
        harness = self

        class _Ctx(ActorContext):
            __slots__ = ()

            def publish(self, section: str, data: dict[str, Any]) -> None:
                super().publish(section, data)
                harness._notify()

        return _Ctx(
            name="writer",
            attempt=1,
            receivers={"rows": self.receive.clone()},
            senders={},
            log=log,
            registry=self.registry,
        )

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        run = make_writer(self.settings, self.dsn, **{"publish_interval_s": 0.0, **self.kwargs})
        ctx = self.context()
        try:
            with ctx.receivers["rows"]:
                await run(ctx, task_status)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.receive.close()  # the harness owns both original ends
            self.send.close()
            self.finished.set()

    @property
    def status(self) -> dict[str, Any]:
        return self.registry.sections.get("writer", {})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs.entries if e["event"] == name]

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait (bounded by the caller's fail_after) until the published status satisfies it."""
        while not predicate(self.status):
            await self._changed.wait()
        return self.status


# The newest row's seq per instrument, read from the tables (not through a view).
LATEST_SEQ_BY_INSTRUMENT = """
SELECT i.instrument, l.seq
FROM greeks_latest l
JOIN position_keys k ON k.position_id = l.position_id
JOIN instruments i ON i.instrument_id = k.instrument_id
"""


async def count(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
