"""What an actor attempt receives: its channel ends and a handle on its own health record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from structlog.typing import FilteringBoundLogger

    from supervisor.status import StatusRegistry


@dataclass(slots=True)
class ActorContext:
    """Handed to ``ActorSpec.run`` once per attempt.

    The channel ends are clones owned by this attempt; the supervisor closes them when the attempt
    ends, so an actor may also close them itself (``with ctx.senders["rows"]:``) without harm.
    """

    name: str
    attempt: int
    receivers: dict[str, MemoryObjectReceiveStream[Any]]
    senders: dict[str, MemoryObjectSendStream[Any]]
    log: FilteringBoundLogger
    registry: StatusRegistry

    def record_events(self, n: int = 1) -> None:
        """Count ``n`` processed events and stamp ``last_event_at`` (call per batch, not per tick)."""
        self.registry.record_events(self.name, n)

    def publish(self, section: str, data: dict[str, Any]) -> None:
        """Set a top-level section of the status file (e.g. ``writer`` or ``portfolio``)."""
        self.registry.publish(section, data)

    def set_info(self, *, changed: bool = False, **values: Any) -> None:
        """Add actor-specific keys to this actor's entry in the status file (e.g. ``connection``,
        ``subscriptions``); ``changed=True`` for a state change worth rewriting the file at once."""
        self.registry.set_info(self.name, values, changed=changed)

    def set_degraded(self, reason: str | None) -> None:
        """Mark the engine degraded for ``reason`` (e.g. spooling); ``None`` clears this actor's flag."""
        self.registry.set_degraded(self.name, reason)
