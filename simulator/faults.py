"""Run-time fault switches shared by the simulators.

Rules: pure. No clock and no I/O: every call that needs the time takes ``now`` (POSIX seconds).

A fault is *active* from the moment it is injected until it is cleared, its duration has passed,
or its count is used up, whichever comes first. With neither ``duration_s`` nor ``count`` it stays
active until :meth:`FaultController.clear`. ``count`` counts *occurrences*: each
:meth:`FaultController.consume` that returns ``True`` uses one (one dropped connection, one
refused handshake, one malformed frame...). When ``duration_s`` is given without ``now``, the
window starts at the first :meth:`~FaultController.active`/:meth:`~FaultController.consume`
call, whose ``now`` anchors it.

Servers apply faults where they happen: a handshake checks ``REFUSE``/``BAD_TOKEN``, an emission
loop checks ``DROP``/``ABORT``/``STALL``/``MALFORMED``... Listeners added with
:meth:`FaultController.add_listener` are called on every inject/clear so that a server can wake
its loops instead of polling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    DROP = "drop"  # close the connection with a close frame
    ABORT = "abort"  # drop the TCP connection without a close frame
    STALL = "stall"  # keep the socket open, send nothing
    REFUSE = "refuse"  # refuse new connections (HTTP 503 for REST / rejected WS handshake)
    MALFORMED = "malformed"  # send a frame that is not valid JSON
    TRUNCATED = "truncated"  # send a frame cut in the middle
    UNKNOWN_MESSAGE = "unknown_message"  # send a message of an unknown type/topic
    WRONG_VALUE_COUNT = "wrong_value_count"  # DXLink COMPACT data with a wrong number of values
    BAD_TOKEN = "bad_token"  # credentials are rejected
    UNAUTHENTICATED = "unauthenticated"  # the session loses its authentication
    SWITCH_TO_FULL = "switch_to_full"  # DXLink: unsolicited FEED_CONFIG switching to FULL
    BINARY_FRAME = "binary_frame"  # IBKR: send JSON in binary frames
    RATE_LIMITED = "rate_limited"  # IBKR: answer REST requests with HTTP 429 and Retry-After
    HUGE_FRAME = "huge_frame"  # send a ~1 MB frame the client has no use for
    WRONG_TYPES = "wrong_types"  # send a frame whose values have the wrong JSON types
    NAN_VALUES = "nan_values"  # send a frame whose numbers are NaN/Infinity
    BAD_UTF8 = "bad_utf8"  # send a text frame that is not valid UTF-8


@dataclass(slots=True)
class _Injection:
    duration_s: float | None
    until: float | None
    remaining: int | None

    def expired(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        if self.duration_s is not None and self.until is None:
            self.until = now + self.duration_s  # lazily anchored window
        return self.until is not None and now >= self.until


FaultListener = Callable[[Fault, bool], None]
"""Called with ``(fault, injected)``: ``injected`` is ``False`` for a clear."""


class FaultController:
    """Holds the currently injected faults; time is always passed in."""

    def __init__(self) -> None:
        self._faults: dict[Fault, _Injection] = {}
        self._listeners: list[FaultListener] = []
        self.triggered: dict[Fault, int] = {}  # how many times each fault fired (consume -> True)

    def inject(
        self,
        fault: Fault,
        *,
        duration_s: float | None = None,
        count: int | None = None,
        now: float | None = None,
    ) -> None:
        """Activate ``fault`` (replacing an earlier injection of the same fault).

        Raises:
            ValueError: negative ``duration_s`` or ``count``.
        """
        if duration_s is not None and duration_s < 0:
            raise ValueError("duration_s must be >= 0")
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        until = now + duration_s if duration_s is not None and now is not None else None
        self._faults[Fault(fault)] = _Injection(duration_s, until, count)
        self._notify(Fault(fault), True)

    def clear(self, fault: Fault | None = None) -> None:
        """Deactivate one fault, or all of them."""
        cleared = list(self._faults) if fault is None else [Fault(fault)]
        for f in cleared:
            if self._faults.pop(f, None) is not None:
                self._notify(f, False)

    def active(self, fault: Fault, now: float) -> bool:
        """Whether ``fault`` is active at ``now``, without using up a count."""
        injection = self._faults.get(fault)
        if injection is None:
            return False
        if injection.expired(now):
            del self._faults[fault]
            return False
        return True

    def consume(self, fault: Fault, now: float) -> bool:
        """Like :meth:`active`, and use up one occurrence of a count-limited fault."""
        if not self.active(fault, now):
            return False
        injection = self._faults[fault]
        if injection.remaining is not None:
            injection.remaining -= 1
            if injection.remaining <= 0:
                del self._faults[fault]
        self.triggered[fault] = self.triggered.get(fault, 0) + 1
        return True

    def active_faults(self, now: float) -> list[Fault]:
        """Every fault active at ``now``."""
        return [f for f in list(self._faults) if self.active(f, now)]

    def add_listener(self, listener: FaultListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: FaultListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, fault: Fault, injected: bool) -> None:
        for listener in list(self._listeners):
            listener(fault, injected)
