"""Health registry, status rendering and the atomic status file.

The registry is plain mutable state updated by the supervisor and actors (single event loop, no
locks needed). :func:`render_status` is pure: registry snapshot and time in, JSON-able dict out.
:func:`write_status_file` writes a temp file in the same directory and ``os.replace``s it, so a
concurrent reader sees either the old or the new document, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson


class ActorState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # waiting out a backoff before the next attempt
    FAILED = "failed"  # restart intensity exceeded: retried only at the slowest pace
    STOPPING = "stopping"
    STOPPED = "stopped"  # ended for good (temporary actor, or shutdown)


class Overall(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"
    STOPPING = "stopping"
    STOPPED = "stopped"


STATUS_EXIT_CODES: dict[str, int] = {"ok": 0, "degraded": 1}  # anything else: 2


@dataclass(slots=True)
class ActorHealth:
    state: ActorState = ActorState.STARTING
    restarts: int = 0
    last_error: str | None = None
    last_event_at: float | None = None
    events_total: int = 0
    critical: bool = False  # not running => overall "down"
    source: bool = False  # no inputs: when every source is down, overall "down"
    info: dict[str, Any] = field(default_factory=dict)  # actor-specific keys (connection, ...)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class StatusRegistry:
    """Everything the status file shows. ``clock`` returns POSIX seconds."""

    mode: str
    clock: Callable[[], float]
    pid: int = field(default_factory=os.getpid)
    started_at: float = 0.0
    actors: dict[str, ActorHealth] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    degraded: dict[str, str] = field(default_factory=dict)
    channel_stats: Callable[[], dict[str, dict[str, int]]] = dict
    phase: Overall | None = None  # STOPPING / STOPPED override the computed status
    on_change: Callable[[], None] | None = None
    # Error texts and reasons can carry secrets (a DSN, a token in a URL): the composition root
    # passes the log redactor, so the status file shows what the logs show.
    redact: Callable[[str], str] = str

    def __post_init__(self) -> None:
        if not self.started_at:
            self.started_at = self.clock()

    def add_actor(self, name: str, *, critical: bool = False, source: bool = False) -> None:
        self.actors[name] = ActorHealth(critical=critical, source=source)

    def set_state(self, name: str, state: ActorState, *, error: str | None = None) -> None:
        health = self.actors[name]
        changed = health.state != state
        health.state = state
        if error is not None:
            health.last_error = self.redact(error)
            changed = True
        if changed:
            self._changed()

    def count_restart(self, name: str) -> None:
        self.actors[name].restarts += 1

    def record_events(self, name: str, n: int) -> None:
        health = self.actors[name]
        health.events_total += n
        health.last_event_at = self.clock()

    def publish(self, section: str, data: dict[str, Any]) -> None:
        self.sections[section] = data

    def set_info(self, name: str, values: dict[str, Any], *, changed: bool = False) -> None:
        """Merge actor-specific keys into ``actors.<name>`` of the status file (the standard keys
        win on a clash). ``changed`` rewrites the file at once (a connection state change)."""
        self.actors[name].info.update(values)
        if changed:
            self._changed()

    def set_degraded(self, name: str, reason: str | None) -> None:
        before = self.degraded.get(name)
        if reason is None:
            self.degraded.pop(name, None)
        else:
            reason = self.degraded[name] = self.redact(reason)
        if before != reason:
            self._changed()

    def set_phase(self, phase: Overall) -> None:
        self.phase = phase
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def overall_status(registry: StatusRegistry) -> Overall:
    """ok / degraded / down from actor states and degraded flags (pure)."""
    if registry.phase is not None:
        return registry.phase
    actors = registry.actors.values()
    if any(a.critical and a.state is not ActorState.RUNNING for a in actors):
        return Overall.DOWN
    sources = [a for a in actors if a.source]
    if sources and all(a.state is not ActorState.RUNNING for a in sources):
        return Overall.DOWN
    if registry.degraded or any(a.state not in (ActorState.RUNNING, ActorState.STOPPED) for a in actors):
        return Overall.DEGRADED
    return Overall.OK


def render_status(registry: StatusRegistry, now: float) -> dict[str, Any]:
    """The status document (pure: registry and time in, dict out). Keys are a user interface."""
    doc: dict[str, Any] = {
        "status": overall_status(registry).value,
        "mode": registry.mode,
        "updated_at": iso(now),
        "pid": registry.pid,
        "started_at": iso(registry.started_at),
        "degraded_reasons": dict(registry.degraded),
        "actors": {
            name: a.info
            | {
                "state": a.state.value,
                "restarts": a.restarts,
                "last_error": a.last_error,
                "last_event_at": iso(a.last_event_at),
                "last_event_age_s": None
                if a.last_event_at is None
                else round(max(0.0, now - a.last_event_at), 3),
                "events_total": a.events_total,
            }
            for name, a in registry.actors.items()
        },
        "channels": registry.channel_stats(),
    }
    for section, data in registry.sections.items():
        doc.setdefault(section, data)
    return doc


def write_status_file(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (temp file in the same directory + replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
