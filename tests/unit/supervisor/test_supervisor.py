"""Supervision semantics on asyncio and trio, with an injected sleep and clock (no real waits)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from supervisor.context import ActorContext
from supervisor.errors import FatalError, TransientError
from supervisor.spec import ActorSpec, Backoff, ChannelSpec, Intensity, Restart
from supervisor.status import ActorState, StatusRegistry
from supervisor.supervisor import Supervisor

pytestmark = pytest.mark.anyio

NO_JITTER = Backoff(initial_s=0.1, max_s=5.0, jitter_s=0.0)


class FakeTime:
    """A monotonic clock the test advances; ``sleep`` records delays and advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.delays: list[tuple[str, float]] = []
        self.block_at: float | None = None  # a delay equal to this blocks forever
        self.blocked = anyio.Event()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(("sleep", delay))
        if self.block_at is not None and delay == self.block_at:
            self.blocked.set()
            await anyio.sleep_forever()
        self.now += delay
        await anyio.lowlevel.checkpoint()


def make_supervisor(
    specs: list[ActorSpec], channels: list[ChannelSpec] | None = None, fake: FakeTime | None = None, **kw: Any
) -> tuple[Supervisor, StatusRegistry, FakeTime]:
    fake = fake or FakeTime()
    registry = StatusRegistry(mode="simulated", clock=lambda: 1_700_000_000.0)
    kw.setdefault("shutdown_timeout_s", 5)
    sup = Supervisor(specs, channels or [], registry, sleep=fake.sleep, monotonic=fake.monotonic, **kw)
    return sup, registry, fake


def failing(times: int, then: Callable[[ActorContext], Awaitable[None]] | None = None) -> Any:
    """An actor that raises TransientError on its first ``times`` attempts."""
    calls: list[int] = []

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt <= times:
            raise TransientError(f"boom {ctx.attempt}")
        task_status.started()
        if then is not None:
            await then(ctx)

    run.calls = calls  # type: ignore[attr-defined]
    return run


async def test_transient_actor_restarted_with_growing_delays() -> None:
    """A transient actor failing 3 times is restarted after 0.1, 0.2, 0.4 s, then runs."""
    running = anyio.Event()

    async def then(ctx: ActorContext) -> None:
        running.set()
        await anyio.sleep_forever()

    run = failing(3, then)
    spec = ActorSpec("a", run, Restart.TRANSIENT, NO_JITTER, Intensity(max_restarts=10, period_s=60))
    sup, registry, fake = make_supervisor([spec])
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await running.wait()
        assert [d for _, d in fake.delays] == pytest.approx([0.1, 0.2, 0.4])
        assert run.calls == [1, 2, 3, 4]
        health = registry.actors["a"]
        assert health.state is ActorState.RUNNING
        assert health.restarts == 3
        assert health.last_error == "TransientError: boom 3"
        sup.request_stop()
    assert sup.exit_code == 0
    assert registry.actors["a"].state is ActorState.STOPPED


async def test_intensity_exceeded_marks_failed_while_sibling_keeps_producing() -> None:
    """Past N restarts in T s an actor is `failed` and retried at the slowest pace; its sibling streams on."""
    fake = FakeTime()
    fake.block_at = NO_JITTER.max_s
    received: list[int] = []
    enough = anyio.Event()

    async def always_fails(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        raise TransientError("broker down")

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        send = ctx.senders["c"]
        i = 0
        while True:
            await send.send([i])
            i += 1

    async def consumer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for batch in ctx.receivers["c"]:
            received.extend(batch)
            ctx.record_events(len(batch))
            if fake.blocked.is_set() and len(received) > 50:
                enough.set()

    specs = [
        ActorSpec("consumer", consumer, inputs=("c",)),
        ActorSpec(
            "flaky", always_fails, Restart.PERMANENT, NO_JITTER, Intensity(max_restarts=3, period_s=60)
        ),
        ActorSpec("producer", producer, outputs=("c",)),
    ]
    sup, registry, fake = make_supervisor(specs, [ChannelSpec("c", 4)], fake)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await fake.blocked.wait()
            assert registry.actors["flaky"].state is ActorState.FAILED
            await enough.wait()
        assert [d for _, d in fake.delays] == pytest.approx([0.1, 0.2, 0.4, 5.0])
        assert registry.actors["flaky"].restarts == 4
        assert registry.actors["producer"].state is ActorState.RUNNING
        assert registry.actors["consumer"].events_total == len(received) > 50
        sup.request_stop()
    assert received == list(range(len(received)))


async def test_permanent_returning_actor_is_restarted_temporary_and_transient_are_not() -> None:
    counts = {"perm": 0, "temp": 0, "trans": 0}
    perm_again = anyio.Event()

    def returning(name: str) -> Any:
        async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            counts[name] += 1
            task_status.started()
            if name == "perm" and counts[name] == 3:
                perm_again.set()
                await anyio.sleep_forever()

        return run

    specs = [
        ActorSpec("perm", returning("perm"), Restart.PERMANENT, NO_JITTER),
        ActorSpec("temp", returning("temp"), Restart.TEMPORARY, NO_JITTER),
        ActorSpec("trans", returning("trans"), Restart.TRANSIENT, NO_JITTER),
    ]
    sup, registry, _ = make_supervisor(specs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await perm_again.wait()
            while registry.actors["trans"].state is not ActorState.STOPPED:
                await anyio.lowlevel.checkpoint()
        assert counts == {"perm": 3, "temp": 1, "trans": 1}
        assert registry.actors["perm"].restarts == 2
        assert registry.actors["temp"].state is ActorState.STOPPED
        assert registry.actors["temp"].restarts == 0
        sup.request_stop()


async def test_temporary_actor_that_crashes_is_not_restarted() -> None:
    run = failing(1)
    sup, registry, fake = make_supervisor([ActorSpec("t", run, Restart.TEMPORARY, NO_JITTER)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            while registry.actors["t"].state is not ActorState.STOPPED:
                await anyio.lowlevel.checkpoint()
        sup.request_stop()
    assert run.calls == [1]
    assert fake.delays == []
    assert registry.actors["t"].last_error == "TransientError: boom 1"


async def test_fatal_error_stops_tree_with_nonzero_exit() -> None:
    sibling_stopped = anyio.Event()

    async def sibling(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            sibling_stopped.set()

    async def fatal(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.lowlevel.checkpoint()
        raise FatalError("schema is newer than the code", exit_code=3)

    sup, registry, _ = make_supervisor([ActorSpec("sib", sibling), ActorSpec("fatal", fatal)])
    with anyio.fail_after(5):
        code = await sup.run()
    assert code == 3
    assert sibling_stopped.is_set()
    assert registry.actors["fatal"].last_error == "FatalError: schema is newer than the code"
    assert isinstance(sup.fatal_error, FatalError)


async def test_stop_drains_pipeline_without_losing_queued_items() -> None:
    """On stop the producer stops, and everything it managed to send is processed downstream."""
    sent: list[int] = []
    processed: list[int] = []
    stored: list[int] = []
    gate = anyio.Event()
    queued = anyio.Event()

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        i = 0
        while True:
            await ctx.senders["raw"].send([i, i + 1])
            sent.extend([i, i + 1])
            i += 2
            if i >= 40:
                queued.set()

    async def middle(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await gate.wait()  # slow: let items queue up in both channels
        async with ctx.senders["rows"] as out:
            async for batch in ctx.receivers["raw"]:
                processed.extend(batch)
                await out.send(batch)

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for batch in ctx.receivers["rows"]:
            stored.extend(batch)

    specs = [
        ActorSpec("sink", sink, inputs=("rows",)),
        ActorSpec("middle", middle, inputs=("raw",), outputs=("rows",)),
        ActorSpec("producer", producer, outputs=("raw",)),
    ]
    sup, registry, _ = make_supervisor(specs, [ChannelSpec("raw", 30), ChannelSpec("rows", 2)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await queued.wait()
            assert sup.channel_statistics()["raw"]["used"] > 0
            sup.request_stop()
            gate.set()
    assert sup.exit_code == 0
    assert stored == processed == sent
    assert len(sent) >= 40
    assert all(a.state is ActorState.STOPPED for a in registry.actors.values())


async def test_start_order_and_failed_start_does_not_block_siblings() -> None:
    order: list[str] = []
    later_started = anyio.Event()

    def actor(name: str, fail: bool = False) -> Any:
        async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            order.append(f"{name}:begin")
            if fail:
                raise TransientError("cannot connect")
            await anyio.lowlevel.checkpoint()
            order.append(f"{name}:started")
            task_status.started()
            if name == "c":
                later_started.set()
            await anyio.sleep_forever()

        return run

    fake = FakeTime()
    fake.block_at = 0.1  # the broken actor stays in its first backoff
    specs = [
        ActorSpec("a", actor("a"), backoff=NO_JITTER),
        ActorSpec("b", actor("b", fail=True), backoff=NO_JITTER),
        ActorSpec("c", actor("c"), backoff=NO_JITTER),
    ]
    sup, registry, _ = make_supervisor(specs, fake=fake)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await later_started.wait()
        assert order == ["a:begin", "a:started", "b:begin", "c:begin", "c:started"]
        assert registry.actors["b"].state is ActorState.RESTARTING
        sup.request_stop()


async def test_actor_that_never_starts_times_out_and_is_restarted() -> None:
    attempts: list[int] = []
    second = anyio.Event()

    async def stuck(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 2:
            second.set()
        await anyio.sleep_forever()

    spec = ActorSpec("stuck", stuck, backoff=NO_JITTER, start_timeout_s=0.01)
    sup, registry, _ = make_supervisor([spec])
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await second.wait()
        assert registry.actors["stuck"].last_error == "StartTimeoutError: stuck did not start within 0.01 s"
        sup.request_stop()


async def test_restart_gets_fresh_channel_clones_and_shared_stream_survives() -> None:
    """A crashing producer closes only its own clone: the consumer keeps receiving from the next attempt."""
    received: list[int] = []
    done = anyio.Event()

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async with ctx.senders["c"] as send:
            await send.send([ctx.attempt])
        if ctx.attempt < 3:
            raise TransientError("drop")
        await anyio.sleep_forever()

    async def consumer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for batch in ctx.receivers["c"]:
            received.extend(batch)
            if len(received) == 3:
                done.set()

    specs = [
        ActorSpec("consumer", consumer, inputs=("c",)),
        ActorSpec("producer", producer, backoff=NO_JITTER, outputs=("c",)),
    ]
    sup, _, _ = make_supervisor(specs, [ChannelSpec("c", 1)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await done.wait()
        sup.request_stop()
    assert received == [1, 2, 3]


def test_unknown_channel_and_duplicate_names_are_rejected() -> None:
    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()

    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    with pytest.raises(ValueError, match="unknown channel 'x'"):
        Supervisor([ActorSpec("a", run, inputs=("x",))], [], registry)
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor([ActorSpec("a", run), ActorSpec("a", run)], [], registry)


async def test_fatal_error_at_startup_exits_without_starting_the_rest() -> None:
    """A writer that finds a newer schema at start: exit non-zero at once, later actors never run."""
    started: list[str] = []

    async def fatal_at_start(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        raise FatalError("database schema is newer than this engine", exit_code=1)

    async def later(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        started.append(ctx.name)
        task_status.started()
        await anyio.sleep_forever()

    specs = [
        ActorSpec("writer", fatal_at_start, inputs=("rows",)),
        ActorSpec("normalizer", later, inputs=("raw",), outputs=("rows",)),
        ActorSpec("ibkr", later, outputs=("raw",)),
    ]
    sup, registry, _ = make_supervisor(specs, [ChannelSpec("raw", 4), ChannelSpec("rows", 4)])
    with anyio.fail_after(5):
        code = await sup.run()
    assert code == 1
    assert started == []
    assert all(a.state is ActorState.STOPPED for a in registry.actors.values())


async def test_stop_while_an_actor_is_still_starting_returns_promptly() -> None:
    """SIGTERM while the writer is still migrating: no wait for its start timeout, no hang."""
    entered = anyio.Event()
    cancelled = anyio.Event()

    async def slow_start(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        entered.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async def never(ctx: ActorContext, task_status: TaskStatus[None]) -> None:  # pragma: no cover
        raise AssertionError("must not start")

    specs = [
        ActorSpec("writer", slow_start, start_timeout_s=3600),
        ActorSpec("ibkr", never, outputs=("raw",)),
    ]
    sup, registry, _ = make_supervisor(specs, [ChannelSpec("raw", 4)], shutdown_timeout_s=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await entered.wait()
            sup.request_stop()
    assert cancelled.is_set()
    assert registry.actors["ibkr"].state is ActorState.STOPPED
    assert registry.actors["ibkr"].events_total == 0


@pytest.mark.parametrize("when", ["crash_during_drain", "in_backoff_at_stop"])
async def test_consumer_failing_around_shutdown_still_drains_everything(when: str) -> None:
    """A downstream actor that crashes during the drain, or waits out a backoff when the stop
    comes, runs again at once and processes everything queued: nothing is lost."""
    fake = FakeTime()
    fake.block_at = NO_JITTER.initial_s if when == "in_backoff_at_stop" else None
    sent: list[int] = []
    stored: list[int] = []
    queued = anyio.Event()
    go = anyio.Event()
    crashed = {"done": False}

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        for i in range(40):
            await ctx.senders["c"].send([i])
            sent.append(i)
        queued.set()
        await anyio.sleep_forever()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        if when == "in_backoff_at_stop" and ctx.attempt == 1:
            raise TransientError("database hiccup")
        await go.wait()  # consume only once the stop has been requested
        async for batch in ctx.receivers["c"]:
            if when == "crash_during_drain" and sup.stopping and not crashed["done"]:
                crashed["done"] = True
                raise TransientError("crash while draining")  # this batch is lost with the attempt
            stored.extend(batch)

    specs = [
        ActorSpec("sink", sink, backoff=NO_JITTER, inputs=("c",)),
        ActorSpec("producer", producer, outputs=("c",)),
    ]
    sup, registry, _ = make_supervisor(specs, [ChannelSpec("c", 64)], fake)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            if when == "in_backoff_at_stop":
                await fake.blocked.wait()
            await queued.wait()
            sup.request_stop()
            go.set()
    lost = 1 if when == "crash_during_drain" else 0
    assert len(stored) == len(sent) - lost
    assert sup.exit_code == 0
    assert registry.actors["sink"].restarts == 1


async def test_actor_returning_before_started_is_a_plain_return_not_a_timeout() -> None:
    ended = anyio.Event()

    async def nothing_to_do(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        ended.set()

    async def after(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()

    specs = [
        ActorSpec("idle", nothing_to_do, Restart.TEMPORARY, start_timeout_s=None),
        ActorSpec("after", after),
    ]
    sup, registry, _ = make_supervisor(specs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await ended.wait()
            while registry.actors["after"].state is not ActorState.RUNNING:  # noqa: ASYNC110
                await anyio.lowlevel.checkpoint()
        assert registry.actors["idle"].state is ActorState.STOPPED
        assert registry.actors["idle"].last_error is None
        sup.request_stop()


async def test_producer_learns_at_once_when_its_consumer_is_gone_and_loss_is_reported() -> None:
    """The writer stops for good: the normalizer's send fails instead of blocking, and the items
    left in the channel make the exit code non-zero."""
    blocked_send = anyio.Event()

    async def fatal_consumer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await blocked_send.wait()
        raise FatalError("schema mismatch")

    async def producer(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        for i in range(10):
            if i == 2:
                blocked_send.set()
            await ctx.senders["c"].send([i])
        await anyio.sleep_forever()

    specs = [
        ActorSpec("writer", fatal_consumer, inputs=("c",)),
        ActorSpec("normalizer", producer, outputs=("c",)),
    ]
    sup, registry, _ = make_supervisor(specs, [ChannelSpec("c", 2)], shutdown_timeout_s=3600)
    with anyio.fail_after(5):
        code = await sup.run()
    assert code == 1
    assert registry.actors["normalizer"].state is ActorState.STOPPED


async def test_after_start_runs_once_when_every_actor_has_started() -> None:
    """The ``after_start`` hook (the engine freezes its start-up heap there) runs once, after the
    last actor called ``started()``, not before; a failed first attempt does not block it."""
    order: list[str] = []
    release = anyio.Event()

    def actor(name: str, fail_first: bool = False) -> Any:
        async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            if fail_first and ctx.attempt == 1:
                raise TransientError("first attempt fails")
            if name == "b":
                await release.wait()  # "b" is slow to start
            order.append(f"started {name}")
            task_status.started()
            await anyio.sleep_forever()

        return run

    specs = [
        ActorSpec("a", actor("a"), Restart.PERMANENT, NO_JITTER),
        ActorSpec("b", actor("b"), Restart.PERMANENT, NO_JITTER),
        ActorSpec("c", actor("c", fail_first=True), Restart.PERMANENT, NO_JITTER),
    ]
    hooked = anyio.Event()

    def after_start() -> None:
        order.append("after_start")
        hooked.set()

    sup, _registry, _fake = make_supervisor(specs, after_start=after_start)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert "after_start" not in order  # "b" has not started yet
        release.set()
        with anyio.fail_after(5):
            await hooked.wait()
        sup.request_stop()
    assert order.count("after_start") == 1
    assert order.index("after_start") > order.index("started b")


async def test_after_start_skipped_when_stopped_during_start_up() -> None:
    called: list[bool] = []
    entered = anyio.Event()

    async def never_starts(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        entered.set()
        await anyio.sleep_forever()

    async def quick(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()

    specs = [
        ActorSpec("slow", never_starts, Restart.PERMANENT, NO_JITTER),
        ActorSpec("quick", quick, Restart.PERMANENT, NO_JITTER),
    ]
    sup, _registry, _fake = make_supervisor(specs, after_start=lambda: called.append(True))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await entered.wait()
        sup.request_stop()
    assert called == []
