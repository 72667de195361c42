"""The normalizer actor on asyncio and trio with real memory channels: events in, one rows batch per
flush out, the shutdown drain, conflation under a full channel, portfolio in the status file."""

from __future__ import annotations

from datetime import date
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from actors.normalizer import make_normalizer
from normalize.book import Book
from normalize.events import InstrumentUpdate, PositionsSnapshot, RowsBatch
from normalize.model import AssetClass, Right, UnifiedPosition
from supervisor.context import ActorContext
from supervisor.spec import ActorSpec, ChannelSpec
from supervisor.status import StatusRegistry, render_status
from supervisor.supervisor import Supervisor

pytestmark = pytest.mark.anyio

KEYS = ("SPY   261218C00500000", "SPY   261218P00480000")
POSITIONS = tuple(
    UnifiedPosition(
        "ibkr",
        "U1",
        k,
        "SPY",
        AssetClass.OPTION,
        Right(k[12]),
        int(k[13:]) / 1000,
        date(2026, 12, 18),
        100.0,
        q,
        None,
    )
    for k, q in zip(KEYS, (2.0, -1.0), strict=True)
)
SNAPSHOT = PositionsSnapshot("ibkr", ("U1",), POSITIONS, 0.0)
GREEKS = {"delta": 0.5, "gamma": 0.01, "theta": -0.1, "vega": 0.2}


def update(key: str, seq: int) -> InstrumentUpdate:
    return InstrumentUpdate("ibkr", key, float(seq), float(seq), seq, {"bid": 1.0, "ask": 1.2, **GREEKS})


async def run_tree(
    specs: list[ActorSpec], registry: StatusRegistry, rows_capacity: int, until: anyio.Event
) -> None:
    sup = Supervisor(specs, [ChannelSpec("raw", 64), ChannelSpec("rows", rows_capacity)], registry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await until.wait()
        sup.request_stop()


async def test_events_become_rows_in_few_batches_and_nothing_is_lost_at_shutdown() -> None:
    produced = anyio.Event()
    out: list[RowsBatch] = []

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await ctx.senders["raw"].send([SNAPSHOT])
        for b in range(50):  # one frame = one list of events
            await ctx.senders["raw"].send([update(KEYS[0], 2 * b), update(KEYS[1], 2 * b + 1)])
        produced.set()
        await anyio.sleep_forever()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        out.extend([batch async for batch in ctx.receivers["rows"]])

    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    specs = [
        ActorSpec("sink", sink, inputs=("rows",)),
        ActorSpec("normalizer", make_normalizer(), inputs=("raw",), outputs=("rows",)),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    await run_tree(specs, registry, 64, produced)
    rows = [r for batch in out for r in batch.rows]
    assert [r.seq for r in rows] == list(range(100))
    assert {r.instrument: r.pos_delta for r in rows} == {KEYS[0]: 100.0, KEYS[1]: -50.0}
    assert [p for batch in out for p in batch.positions] == [SNAPSHOT]
    assert len(out) < 100  # batches, not one send per tick
    assert registry.actors["normalizer"].events_total == 100
    doc = render_status(registry, 0.0)
    assert doc["actors"]["normalizer"]["conflated_total"] == 0
    assert doc["actors"]["normalizer"]["positions"] == 2
    assert doc["portfolio"]["total"]["delta"] == pytest.approx(50.0)
    assert doc["portfolio"]["by_underlying"]["SPY"]["positions"] == 2


async def test_the_portfolio_is_summed_over_rounds_and_only_a_whole_one_is_published() -> None:
    # One instrument a round and a publication due at every round: the sum of the two options
    # and their underlying takes three rounds, and the status only ever shows a whole portfolio.
    produced = anyio.Event()
    seen: list[dict[str, Any]] = []
    ticks = iter(range(0, 10**6, 10))
    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await ctx.senders["raw"].send([SNAPSHOT])
        for b in range(20):
            await ctx.senders["raw"].send([update(KEYS[b % 2], b)])
            await ctx.senders["raw"].send([])  # a round boundary the normalizer waits for below
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            portfolio = render_status(registry, 0.0).get("portfolio")
            if portfolio:
                seen.append(portfolio)
        produced.set()
        await anyio.sleep_forever()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for _batch in ctx.receivers["rows"]:
            pass

    specs = [
        ActorSpec("sink", sink, inputs=("rows",)),
        ActorSpec(
            "normalizer",
            make_normalizer(max_portfolio_step=1, clock=lambda: float(next(ticks))),
            inputs=("raw",),
            outputs=("rows",),
        ),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    await run_tree(specs, registry, 64, produced)
    assert seen, "no portfolio published"
    for portfolio in seen:  # both positions (with a row or without), never a part of the sum
        assert portfolio["total"]["positions"] + portfolio["positions_without_data"] == 2
    final = render_status(registry, 0.0)["portfolio"]["total"]
    assert final["delta"] == pytest.approx(50.0)


@pytest.mark.parametrize("keep_rows", [0, 1000], ids=["conflate-at-once", "backlog-kept"])
async def test_a_full_rows_channel_conflates_newest_per_position_and_never_blocks_the_broker(
    keep_rows: int,
) -> None:
    # keep_rows (CONFLATE_AFTER_ROWS): rows kept, all of them, while the channel is full; the
    # 400 rows of this backlog fit in 1000, so then nothing is conflated.
    book = Book()
    sent_all = anyio.Event()
    release = anyio.Event()
    received: list[RowsBatch] = []
    done = anyio.Event()
    n = 400

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await ctx.senders["raw"].send([SNAPSHOT])
        for i in range(n):  # far more frames than the rows channel holds
            await ctx.senders["raw"].send([update(KEYS[i % 2], i)])
            await anyio.lowlevel.checkpoint()
        # Reaching here means the broker was never blocked: with nothing read from `rows` (capacity
        # 1), a normalizer waiting on it would have let `raw` (capacity 64) fill up and stop us.
        sent_all.set()
        await anyio.sleep_forever()

    async def slow_sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await release.wait()  # the database is "slow": nothing is read until released
        async for batch in ctx.receivers["rows"]:
            received.append(batch)
            if any(r.seq == n - 1 for r in batch.rows):
                done.set()

    async def driver() -> None:
        await sent_all.wait()
        release.set()

    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    specs = [
        ActorSpec("sink", slow_sink, inputs=("rows",)),
        ActorSpec(
            "normalizer",
            make_normalizer(book=book, conflate_after_rows=keep_rows),
            inputs=("raw",),
            outputs=("rows",),
        ),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver)
        await run_tree(specs, registry, 1, done)
    rows = [r for batch in received for r in batch.rows]
    seqs = [r.seq for r in rows]
    assert len(seqs) == len(set(seqs))  # no row twice
    conflated = registry.actors["normalizer"].info["conflated_total"]
    if keep_rows >= n:
        assert conflated == 0
        assert seqs == list(range(n))  # every row, in order
    else:
        assert conflated > 0
    assert len(rows) + conflated == n  # every row was either sent or counted
    assert {n - 2, n - 1} <= set(seqs)  # the newest row of each position was kept


async def test_rounds_are_bounded_in_events_and_items_in_rows() -> None:
    # 20 frames of 100 events queued at once: the receiver applies at most ~max_events per round
    # (then lets the other actors run), and every item it sends holds at most max_rows_per_item
    # rows, in order, nothing lost.
    applied: list[int] = []

    class CountingBook(Book):
        def apply(self, events):  # type: ignore[no-untyped-def]
            events = list(events)
            applied.append(len(events))
            return super().apply(events)

    done = anyio.Event()
    out: list[RowsBatch] = []
    frames = [[update(KEYS[i % 2], f * 100 + i) for i in range(100)] for f in range(20)]

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await ctx.senders["raw"].send([SNAPSHOT])
        for frame in frames:
            ctx.senders["raw"].send_nowait(frame)  # all queued before the normalizer's next round
        await anyio.sleep_forever()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for batch in ctx.receivers["rows"]:
            out.append(batch)
            if sum(len(b.rows) for b in out) == 2000:
                done.set()

    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    normalizer = make_normalizer(book=CountingBook(), max_events=300, max_rows_per_item=120)
    specs = [
        ActorSpec("sink", sink, inputs=("rows",)),
        ActorSpec("normalizer", normalizer, inputs=("raw",), outputs=("rows",)),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    await run_tree(specs, registry, rows_capacity=64, until=done)
    assert max(applied) <= 300 + 100  # a round stops at the frame that reaches max_events
    assert sum(applied) == 1 + 2000
    assert all(len(b.rows) <= 120 for b in out)
    assert [r.seq for b in out for r in b.rows] == list(range(2000))


async def test_a_rows_channel_now_full_now_free_keeps_every_row_in_order() -> None:
    # A writer that reads in fits (the rows channel holds one item): the receiver sends itself
    # while there is room and hands over to the sender when the channel is full; across those
    # hand-overs every row arrives once, in order, and nothing is conflated (backlog kept).
    n = 300
    done = anyio.Event()
    out: list[RowsBatch] = []

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await ctx.senders["raw"].send([SNAPSHOT])
        for i in range(n):
            await ctx.senders["raw"].send([update(KEYS[i % 2], i)])
            if i % 7 == 0:
                await anyio.lowlevel.checkpoint()
        await anyio.sleep_forever()

    async def fitful_sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        received = 0
        async for batch in ctx.receivers["rows"]:
            out.append(batch)
            received += len(batch.rows)
            if received == n:
                done.set()
            for _ in range(len(out) % 5):  # now slow (the channel fills), now quick
                await anyio.lowlevel.checkpoint()

    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    specs = [
        ActorSpec("sink", fitful_sink, inputs=("rows",)),
        ActorSpec(
            "normalizer", make_normalizer(conflate_after_rows=10 * n), inputs=("raw",), outputs=("rows",)
        ),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    await run_tree(specs, registry, rows_capacity=1, until=done)
    assert [r.seq for b in out for r in b.rows] == list(range(n))
    assert [p for b in out for p in b.positions] == [SNAPSHOT]
    assert registry.actors["normalizer"].info["conflated_total"] == 0
