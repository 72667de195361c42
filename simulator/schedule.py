"""When each contract updates: a per-contract rate and a seeded burstiness.

Rules: pure. No clock, no I/O; the caller passes times (POSIX seconds) in and sleeps itself.

Inter-arrival times follow a gamma distribution with mean ``1 / rate``. Burstiness ``b`` sets its
coefficient of variation to ``3 b``: ``b = 0`` gives evenly spaced updates, ``b = 1`` gives
clusters of near-simultaneous updates separated by long gaps (a gamma shape of 1/9). Each
contract's clock has its own random stream derived from ``(seed, key, salt)``, so runs with the
same seed produce the same gaps, and contracts start at different phases instead of firing
together.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

BURST_CV = 3.0  # coefficient of variation of the gaps at burstiness 1
DEFAULT_MAX_LAG_S = 1.0


class ContractClock:
    """The update times of one contract: read :attr:`next_time`, call :meth:`advance` after it."""

    __slots__ = ("_rng", "_shape", "burstiness", "next_time", "rate_hz")

    def __init__(self, *, rate_hz: float, burstiness: float, rng: random.Random, start: float) -> None:
        self.rate_hz = rate_hz
        self.burstiness = burstiness
        self._rng = rng
        cv = BURST_CV * burstiness
        self._shape = 1.0 / (cv * cv) if cv > 1e-3 else math.inf  # ~even below 0.03 %
        if rate_hz <= 0:
            self.next_time = math.inf
        else:
            self.next_time = start + rng.random() / rate_hz  # random phase within one interval

    def gap(self) -> float:
        """Draw the next inter-arrival time, in seconds."""
        if self.rate_hz <= 0:
            return math.inf
        mean = 1.0 / self.rate_hz
        if math.isinf(self._shape):
            return mean
        return self._rng.gammavariate(self._shape, mean / self._shape)

    def advance(self) -> float:
        """Move to the following update time and return it."""
        self.next_time += self.gap()
        return self.next_time

    def resync(self, now: float, max_lag_s: float = DEFAULT_MAX_LAG_S) -> float:
        """Skip missed updates when more than ``max_lag_s`` behind ``now`` (a slow consumer).

        Returns:
            The (possibly moved) next update time.
        """
        if self.next_time < now - max_lag_s:
            self.next_time = now + self.gap()
        return self.next_time


@dataclass(frozen=True, slots=True)
class UpdateSchedule:
    """Rates and burstiness for every contract; makes one :class:`ContractClock` per stream.

    Attributes:
        rate_hz: updates per contract per second (``0`` stops updates).
        burstiness: 0 (evenly spaced) .. 1 (very bursty).
        seed: random seed.
        rates: per-key rate overrides (canonical instrument key -> Hz).
    """

    rate_hz: float = 2.0
    burstiness: float = 0.0
    seed: int = 42
    rates: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_hz < 0:
            raise ValueError("rate_hz must be >= 0")
        if not 0.0 <= self.burstiness <= 1.0:
            raise ValueError("burstiness must be within [0, 1]")

    def rate(self, key: str) -> float:
        return self.rates.get(key, self.rate_hz)

    def clock(self, key: str, start: float, salt: str = "") -> ContractClock:
        """A clock for ``key`` starting at ``start``; ``salt`` separates streams (per connection)."""
        rng = random.Random(f"{self.seed}:{key}:{salt}")
        return ContractClock(rate_hz=self.rate(key), burstiness=self.burstiness, rng=rng, start=start)
