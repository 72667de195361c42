"""Restart delays from tenacity's ``wait_exponential_jitter`` (pure apart from its jitter)."""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import wait_exponential_jitter

from supervisor.spec import Backoff


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The one attribute of tenacity's ``RetryCallState`` that ``wait_exponential_jitter`` reads."""

    attempt_number: int


def next_delay(backoff: Backoff, restarts_in_window: int, *, failed: bool) -> float:
    """Delay before the next attempt.

    ``restarts_in_window`` counts restarts inside the intensity window, this one included, so the
    delay grows with consecutive crashes and resets once the actor has been healthy for a whole
    window. A ``failed`` actor is retried only at the slowest pace, ``backoff.max_s``.
    """
    if failed:
        return backoff.max_s
    wait = wait_exponential_jitter(multiplier=backoff.initial_s, max=backoff.max_s, jitter=backoff.jitter_s)
    return float(wait(_Attempt(max(1, restarts_in_window))))  # type: ignore[arg-type]
