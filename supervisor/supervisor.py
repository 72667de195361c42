"""The supervision tree: one anyio task group, one restart loop per actor, channels, status.

Generic: it knows actor specs, restart policies, channels and the status registry, never a broker.

Lifecycle
- ``run()`` opens the channels, starts the status ticker, then each actor in spec order with
  ``await tg.start(...)``: the next actor starts once the previous one called
  ``task_status.started()`` (or its first attempt failed, so a broken actor never blocks its
  siblings).
- Each actor runs in its own cancel scope; a crash is caught in its own restart loop and never
  reaches the task group, so siblings are untouched.
- ``request_stop()`` (the composition root maps SIGINT/SIGTERM to it; a :class:`FatalError`
  calls it too) drains in reverse order: source
  actors (no inputs) are cancelled; every other actor is awaited until its inputs end
  (``EndOfStream`` once all upstream send ends are closed) so queued items are processed, bounded by
  ``shutdown_timeout_s``; after an actor stops, the supervisor closes its own original send end of
  each channel the actor fed once no live producer remains.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor.context import ActorContext
from supervisor.errors import FatalError
from supervisor.policy import next_delay
from supervisor.spec import ActorSpec, ChannelSpec, Restart
from supervisor.status import (
    ActorState,
    Overall,
    StatusRegistry,
    render_status,
    write_status_file,
)

SleepFn = Callable[[float], Awaitable[None]]


class StartTimeoutError(Exception):
    """An actor attempt did not call ``task_status.started()`` within ``start_timeout_s``."""


class _StartedFlag(TaskStatus[None]):
    """The ``task_status`` handed to an attempt: ``started()`` marks it running at once.

    ``event`` is also set when the attempt ends, so an actor that returns or raises before
    calling ``started()`` never leaves the supervisor waiting.
    """

    def __init__(self, on_started: Callable[[], None]) -> None:
        self.event = anyio.Event()
        self.was_started = False
        self._on_started = on_started

    def started(self, value: None = None) -> None:
        if not self.was_started:
            self.was_started = True
            self.event.set()
            self._on_started()


@dataclass(slots=True)
class _Runner:
    spec: ActorSpec
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    backoff: anyio.CancelScope | None = None  # set while waiting out a restart delay
    done: anyio.Event = field(default_factory=anyio.Event)
    entered: bool = False
    stopping: bool = False  # this actor's turn in the drain has come


def _unwrap(exc: BaseException) -> BaseException:
    """The most meaningful exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        fatal = exc.subgroup(lambda e: isinstance(e, FatalError))
        group = fatal if fatal is not None else exc
        exc = group.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """``Type: message`` for the status file's ``last_error``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    """Run ``specs`` joined by ``channels`` until stopped; see the module docstring."""

    def __init__(
        self,
        specs: Sequence[ActorSpec],
        channels: Sequence[ChannelSpec],
        registry: StatusRegistry,
        *,
        status_file: Path | None = None,
        status_interval_s: float = 1.0,
        shutdown_timeout_s: float = 10.0,
        sleep: SleepFn = anyio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        critical: Sequence[str] = (),
        after_start: Callable[[], None] | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate actor names in {names}")
        known = {c.name for c in channels}
        for spec in specs:
            for ch in (*spec.inputs, *spec.outputs):
                if ch not in known:
                    raise ValueError(f"actor {spec.name!r} names unknown channel {ch!r}")
        self.specs = list(specs)
        self.after_start = after_start  # called once, when every actor has started (or failed)
        self.registry = registry
        self.status_file = status_file
        self.status_interval_s = status_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self._sleep = sleep
        self._monotonic = monotonic
        self.log = structlog.get_logger().bind(actor="supervisor")
        self.exit_code = 0
        self.status_write_errors = 0
        self.fatal_error: BaseException | None = None
        self._stop = anyio.Event()
        self._startup_scope = anyio.CancelScope()
        self._status_dirty = anyio.Event()
        self._runners = {s.name: _Runner(s) for s in self.specs}
        self._senders: dict[str, MemoryObjectSendStream[Any]] = {}
        self._receivers: dict[str, MemoryObjectReceiveStream[Any]] = {}
        self._channel_specs = list(channels)
        for spec in self.specs:
            registry.add_actor(
                spec.name,
                critical=spec.name in critical,
                source=not spec.inputs and bool(spec.outputs),
            )
        registry.channel_stats = self.channel_statistics
        registry.on_change = self._mark_dirty

    # ----------------------------------------------------------------- public API

    def request_stop(self, exit_code: int | None = None) -> None:
        """Begin the drain; the first non-``None`` exit code wins."""
        if exit_code is not None and self.exit_code == 0:
            self.exit_code = exit_code
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def channel_statistics(self) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = {}
        for name, send in self._senders.items():
            s = send.statistics()
            cap = s.max_buffer_size
            stats[name] = {
                "used": s.current_buffer_used,
                "capacity": -1 if math.isinf(cap) else int(cap),
                "waiting_senders": s.tasks_waiting_send,
                "waiting_receivers": s.tasks_waiting_receive,
            }
        return stats

    async def run(self) -> int:
        """Run the tree until stopped and drained. Returns the process exit code."""
        with ExitStack() as stack:
            for ch in self._channel_specs:
                send, receive = anyio.create_memory_object_stream[Any](ch.capacity)
                self._senders[ch.name] = stack.enter_context(send)
                self._receivers[ch.name] = stack.enter_context(receive)
            self.log.info("supervisor_started", actors=[s.name for s in self.specs])
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._status_ticker)
                startup_done = anyio.Event()
                tg.start_soon(self._start_all, tg, startup_done)
                await self._stop.wait()
                self._startup_scope.cancel()  # a stop during startup starts nothing more
                await startup_done.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        self.registry.set_phase(Overall.STOPPED)
        self.write_status()
        self.log.info("supervisor_stopped", exit_code=self.exit_code)
        return self.exit_code

    def force_stop(self) -> None:
        """Cancel every actor now, without waiting for the drain (a second signal)."""
        self.request_stop()
        for runner in self._runners.values():
            runner.scope.cancel()

    async def _start_all(self, tg: anyio.abc.TaskGroup, done: anyio.Event) -> None:
        """Start the actors in spec order, each once the previous one is up (or failed)."""
        try:
            with self._startup_scope:
                for spec in self.specs:
                    if self.stopping:
                        break
                    await tg.start(self._supervise, self._runners[spec.name])
                else:
                    if self.after_start is not None:
                        self.after_start()
        finally:
            done.set()

    def write_status(self) -> None:
        """Rewrite the status file; a failure is logged once, and again once it recovers."""
        if self.status_file is None:
            return
        try:
            write_status_file(self.status_file, render_status(self.registry, self.registry.clock()))
        except OSError as exc:
            self.status_write_errors += 1
            if self.status_write_errors == 1:
                self.log.error("status_write_failed", path=str(self.status_file), error=describe(exc))
            return
        if self.status_write_errors:
            self.log.info(
                "status_write_recovered", path=str(self.status_file), failures=self.status_write_errors
            )
            self.status_write_errors = 0

    # ------------------------------------------------------------------ internals

    def _mark_dirty(self) -> None:
        self._status_dirty.set()

    async def _status_ticker(self) -> None:
        while True:
            self.write_status()
            with anyio.move_on_after(self.status_interval_s):
                await self._status_dirty.wait()
            self._status_dirty = anyio.Event()

    async def _supervise(self, runner: _Runner, *, task_status: TaskStatus[None]) -> None:
        spec = runner.spec
        reg = self.registry
        log = self.log.bind(actor=spec.name, **spec.meta)
        restarts: deque[float] = deque()
        reported = False
        attempt = 0

        def report_started() -> None:
            nonlocal reported
            if not reported:
                reported = True
                task_status.started()

        runner.entered = True
        with runner.scope:
            try:
                if self.stopping:  # the stop came before this actor's turn to start
                    report_started()
                    return
                while True:
                    attempt += 1
                    reg.set_state(spec.name, ActorState.STARTING)
                    error: BaseException | None = None
                    try:
                        await self._attempt(runner, attempt, report_started)
                    except FatalError as exc:
                        reg.set_state(spec.name, ActorState.STOPPED, error=describe(exc))
                        log.error("actor_fatal", error=describe(exc))
                        self.fatal_error = exc
                        self.request_stop(exc.exit_code)
                        return
                    except Exception as exc:
                        error = exc
                        reg.set_state(spec.name, reg.actors[spec.name].state, error=describe(exc))
                        log.error(
                            "actor_crashed",
                            attempt=attempt,
                            error=describe(exc),
                            exc_info=exc,
                        )
                    finally:
                        report_started()
                    if not self._should_restart(runner, error, log):
                        return
                    now = self._monotonic()
                    restarts.append(now)
                    while restarts and now - restarts[0] > spec.intensity.period_s:
                        restarts.popleft()
                    failed = len(restarts) > spec.intensity.max_restarts
                    delay = next_delay(spec.backoff, len(restarts), failed=failed)
                    reg.count_restart(spec.name)
                    reg.set_state(spec.name, ActorState.FAILED if failed else ActorState.RESTARTING)
                    log.warning(
                        "actor_restarting",
                        delay_s=round(delay, 3),
                        restarts_in_window=len(restarts),
                        failed=failed,
                        returned=error is None,
                    )
                    with anyio.CancelScope() as runner.backoff:
                        if not runner.stopping:  # in its drain turn an actor restarts at once
                            await self._sleep(delay)
                    runner.backoff = None
                    if self.stopping and not spec.inputs:
                        return
            finally:
                reg.set_state(spec.name, ActorState.STOPPED)
                runner.done.set()
                self._close_finished_channels()

    def _should_restart(self, runner: _Runner, error: BaseException | None, log: Any) -> bool:
        """The restart decision after an attempt ended (``error`` None: it returned)."""
        spec = runner.spec
        if runner.stopping:  # its turn in the drain
            # A consumer that crashed mid-drain runs again to finish its inbox, unless its
            # own consumers are gone (nothing could take what it produces).
            return (
                error is not None and bool(spec.inputs) and not isinstance(error, anyio.BrokenResourceError)
            )
        if self.stopping and (not spec.inputs or error is None):
            return False  # sources stop as soon as a stop is requested; a consumer that returned has drained
        if spec.restart is Restart.TEMPORARY or (spec.restart is Restart.TRANSIENT and error is None):
            log.info("actor_ended", restart=spec.restart.value)
            return False
        return True

    async def _attempt(self, runner: _Runner, attempt: int, on_running: Callable[[], None]) -> None:
        """One attempt: clone channel ends, run, translate its failure into one exception."""
        spec = runner.spec

        # The state flips inside started(), before the actor runs on; the supervisor's own
        # task_status is reported below, from this task (anyio reparents the calling task).
        flag = _StartedFlag(lambda: self.registry.set_state(spec.name, ActorState.RUNNING))
        with ExitStack() as stack:
            ctx = ActorContext(
                name=spec.name,
                attempt=attempt,
                receivers={n: stack.enter_context(self._receivers[n].clone()) for n in spec.inputs},
                senders={n: stack.enter_context(self._senders[n].clone()) for n in spec.outputs},
                log=structlog.get_logger().bind(actor=spec.name, **spec.meta),
                registry=self.registry,
            )

            async def run_actor() -> None:
                try:
                    await spec.run(ctx, flag)
                finally:
                    flag.event.set()  # ended, maybe without started(): stop waiting for it

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run_actor)
                    timeout = spec.start_timeout_s if spec.start_timeout_s is not None else math.inf
                    with anyio.move_on_after(timeout) as scope:
                        await flag.event.wait()
                    if scope.cancelled_caught:
                        raise StartTimeoutError(f"{spec.name} did not start within {timeout:g} s")
                    on_running()
            except Exception as exc:
                raise _unwrap(exc) from None

    def _close_finished_channels(self) -> None:
        """Close the supervisor's ends of channels whose producers (send) or consumers (receive)
        have all stopped: consumers then see ``EndOfStream``, producers ``BrokenResourceError``."""
        runners = self._runners.values()
        for name, send in self._senders.items():
            producers = [r for r in runners if name in r.spec.outputs]
            if producers and all(r.done.is_set() for r in producers):
                send.close()
            consumers = [r for r in runners if name in r.spec.inputs]
            if consumers and all(r.done.is_set() for r in consumers):
                self._receivers[name].close()

    async def _drain(self) -> None:
        self.registry.set_phase(Overall.STOPPING)
        self.log.info("drain_started")
        for spec in reversed(self.specs):
            runner = self._runners[spec.name]
            runner.stopping = True
            if not runner.entered:  # never started: nothing to stop
                self.registry.set_state(spec.name, ActorState.STOPPED)
                runner.done.set()
                self._close_finished_channels()
                continue
            if runner.done.is_set():
                continue
            self.registry.set_state(spec.name, ActorState.STOPPING)
            if not spec.inputs:
                runner.scope.cancel()  # sources stop reading now
            elif runner.backoff is not None:
                runner.backoff.cancel()  # restart now: its inbox still has to be drained
            with anyio.move_on_after(self.shutdown_timeout_s) as scope:
                await runner.done.wait()
            if scope.cancelled_caught:
                self.log.warning("actor_drain_timeout", actor=spec.name, timeout_s=self.shutdown_timeout_s)
                runner.scope.cancel()
                await runner.done.wait()
        left = {name: stats["used"] for name, stats in self.channel_statistics().items() if stats["used"]}
        if left:
            self.log.error("drain_incomplete", items_left=left)
            self.request_stop(1)
        self.log.info("drain_finished")
