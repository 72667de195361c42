"""Actor specifications: what to run, how to restart it, which channels it touches.

Rules: pure data. The supervisor turns these into running tasks; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from supervisor.context import ActorContext


class Restart(StrEnum):
    """OTP-style restart policies."""

    PERMANENT = "permanent"  # always restarted, whether it returned or raised
    TRANSIENT = "transient"  # restarted only when it raised
    TEMPORARY = "temporary"  # never restarted


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay between restarts: tenacity ``wait_exponential_jitter(initial, max, jitter=jitter)``."""

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter_s: float = 0.5


@dataclass(frozen=True, slots=True)
class Intensity:
    """More than ``max_restarts`` restarts within ``period_s`` marks the actor ``failed``.

    A failed actor is still retried, but only at the slowest pace (``Backoff.max_s``).
    """

    max_restarts: int = 5
    period_s: float = 60.0


RunFn = Callable[["ActorContext", "TaskStatus[None]"], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A bounded memory channel owned by the supervisor."""

    name: str
    capacity: int


@dataclass(frozen=True, slots=True)
class ActorSpec:
    """One supervised actor.

    ``run(ctx, task_status)`` is called once per attempt. It must call ``task_status.started()``
    once it is really ready (connected, migrated...). ``inputs``/``outputs`` name the channels
    whose receive/send ends it gets, cloned per attempt, in ``ctx.receivers``/``ctx.senders``.
    Actors are started in list order and stopped in reverse order.
    """

    name: str
    run: RunFn
    restart: Restart = Restart.PERMANENT
    backoff: Backoff = field(default_factory=Backoff)
    intensity: Intensity = field(default_factory=Intensity)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    start_timeout_s: float | None = 60.0
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"broker": "ibkr"} for log context
