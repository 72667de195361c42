"""The normalizer loop on asyncio and trio: per-batch forwarding and the shutdown drain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from actors.normalizer import make_normalizer
from normalize.model import GreeksSnapshot
from supervisor.context import ActorContext
from supervisor.spec import ActorSpec, ChannelSpec
from supervisor.status import StatusRegistry
from supervisor.supervisor import Supervisor

pytestmark = pytest.mark.anyio


def row(i: int) -> GreeksSnapshot:
    return GreeksSnapshot(
        broker="ibkr",
        account="U1",
        instrument="SPY",
        underlying="SPY",
        asset_class="STK",
        right=None,
        strike=None,
        expiry=None,
        multiplier=1.0,
        quantity=10.0,
        event_ts=float(i),
        received_ts=float(i),
        seq=i,
    )


async def test_normalizer_merges_queued_batches_and_drains_on_stop() -> None:
    """Everything queued on `raw` goes out as few `rows` batches, and nothing is lost at shutdown."""
    seen_batches: list[int] = []
    calls: list[int] = []
    out_batches: list[list[GreeksSnapshot]] = []
    produced = anyio.Event()

    def normalize(items: Sequence[Any]) -> list[GreeksSnapshot]:
        calls.append(len(items))
        return [r for batch in items for r in batch]

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        for b in range(50):
            await ctx.senders["raw"].send([row(b * 3 + k) for k in range(3)])
            seen_batches.append(b)
        produced.set()
        await anyio.sleep_forever()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        out_batches.extend([batch async for batch in ctx.receivers["rows"]])

    specs = [
        ActorSpec("sink", sink, inputs=("rows",)),
        ActorSpec("normalizer", make_normalizer(normalize), inputs=("raw",), outputs=("rows",)),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    sup = Supervisor(specs, [ChannelSpec("raw", 64), ChannelSpec("rows", 64)], registry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await produced.wait()
        sup.request_stop()
    rows = [r.seq for batch in out_batches for r in batch]
    assert rows == list(range(150))
    assert sum(calls) == 50
    assert registry.actors["normalizer"].events_total == 150
    assert all(n >= 1 for n in calls)
