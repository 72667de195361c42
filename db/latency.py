"""Tick-to-commit latency histograms: HDR-style log-linear buckets, constant memory.

Rules: pure. No I/O, no clock: times come in as arguments (POSIX seconds).

Values are recorded in microseconds. Values below ``2**SUB_BITS`` get one bucket each; above,
every power-of-two range is split into ``2**(SUB_BITS-1)`` equal buckets, so a reported quantile
is within ``2**-(SUB_BITS-1)`` (about 3 %) of the true value, while ``max`` is exact. Values
above one hour are clamped into the last bucket. The whole histogram is ~900 integers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

try:  # the optional C fast path (db/_speedups.c, built by pip where a C compiler is found)
    from db._speedups import count_values as _count_values
except ImportError:  # pragma: no cover - a machine without a C compiler
    _count_values = None  # type: ignore[assignment]

SUB_BITS = 6
_SUB = 1 << SUB_BITS  # 64
_HALF = _SUB >> 1  # 32 buckets per power of two above _SUB
MAX_US = 3_600_000_000  # one hour


def bucket_index(us: int) -> int:
    """The bucket of a value in microseconds (negative values count as 0)."""
    if us < _SUB:
        return max(us, 0)
    us = min(us, MAX_US)
    shift = us.bit_length() - SUB_BITS
    return shift * _HALF + (us >> shift)


def bucket_upper(index: int) -> int:
    """The largest value (microseconds) that falls into bucket ``index``."""
    if index < _SUB:
        return index
    shift, rest = divmod(index - _SUB, _HALF)
    shift += 1
    return ((_HALF + rest + 1) << shift) - 1


N_BUCKETS = bucket_index(MAX_US) + 1


class Histogram:
    """Counts per bucket plus exact count, max and sum."""

    __slots__ = ("count", "counts", "max_us", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * N_BUCKETS
        self.count = 0
        self.max_us = 0
        self.sum_us = 0

    def record_us(self, us: int) -> None:
        self.counts[bucket_index(us)] += 1
        self.count += 1
        self.sum_us += max(us, 0)
        if us > self.max_us:
            self.max_us = us

    def record_many_s(self, seconds: Iterable[float]) -> None:
        """Record latencies given in seconds."""
        counts = self.counts
        n = 0
        total = 0
        top = self.max_us
        for s in seconds:
            us = int(s * 1_000_000)
            counts[bucket_index(us)] += 1
            n += 1
            if us > 0:
                total += us
            if us > top:
                top = us
        self.count += n
        self.sum_us += total
        self.max_us = top

    def record_counted_us(self, counted: Iterable[tuple[int, int]]) -> None:
        """Record ``n`` values of ``us`` microseconds for every ``(us, n)`` pair."""
        counts = self.counts
        n_total = 0
        total = 0
        top = self.max_us
        for us, n in counted:
            counts[bucket_index(us)] += n
            n_total += n
            if us > 0:
                total += us * n
            if us > top:
                top = us
        self.count += n_total
        self.sum_us += total
        self.max_us = top

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def clear(self) -> None:
        self.counts = [0] * N_BUCKETS
        self.count = 0
        self.max_us = 0
        self.sum_us = 0

    def quantile_us(self, q: float) -> int:
        """The upper bound of the bucket holding quantile ``q`` (0..1), capped at the exact max."""
        if self.count == 0:
            return 0
        rank = max(1, min(self.count, int(q * self.count + 0.999999999)))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_upper(index), self.max_us)
        return self.max_us  # pragma: no cover - counts always add up to count

    def summary_ms(self) -> dict[str, Any]:
        """``{count, p50, p95, p99, max, mean}`` in milliseconds (3 decimals)."""

        def ms(us: float) -> float:
            return round(us / 1000.0, 3)

        return {
            "count": self.count,
            "p50": ms(self.quantile_us(0.50)),
            "p95": ms(self.quantile_us(0.95)),
            "p99": ms(self.quantile_us(0.99)),
            "max": ms(self.max_us),
            "mean": ms(self.sum_us / self.count) if self.count else 0.0,
        }


class LatencyTracker:
    """Since-start histogram plus a sliding window made of ``slots`` rotating histograms.

    The window covers the last ``window_s`` seconds to within one slot (``window_s / slots``).
    """

    __slots__ = ("_ring", "_slot_s", "_slot_start", "total", "window_s")

    def __init__(self, window_s: float = 60.0, slots: int = 6) -> None:
        if window_s <= 0 or slots < 1:
            raise ValueError("window_s must be positive and slots at least 1")
        self.window_s = window_s
        self.total = Histogram()
        self._ring = [Histogram() for _ in range(slots)]
        self._slot_s = window_s / slots
        self._slot_start: float | None = None

    def _rotate(self, now: float) -> None:
        if self._slot_start is None:
            self._slot_start = now
            return
        elapsed = int((now - self._slot_start) // self._slot_s)
        if elapsed <= 0:
            return
        for _ in range(min(elapsed, len(self._ring))):
            oldest = self._ring.pop()
            oldest.clear()
            self._ring.insert(0, oldest)
        self._slot_start += elapsed * self._slot_s

    def record_commit(self, received: Iterable[float], committed_at: float) -> None:
        """Record ``committed_at - r`` for every receive time ``r`` in ``received``.

        Per batch, not per row: the rows of a batch share a handful of receive times (one per
        broker frame), so the distinct times are counted first (``Counter``, in C; with
        ``db/_speedups.c`` a run of equal times at once) and each is converted and bucketed
        once, with its count.
        """
        self._rotate(committed_at)
        if _count_values is not None and received.__class__ in (tuple, list):
            distinct = _count_values(received)  # a run of equal times (a frame's rows) at once
        else:
            distinct = Counter(received)
        counted = [(int((committed_at - r) * 1_000_000), n) for r, n in distinct.items()]
        self.total.record_counted_us(counted)
        self._ring[0].record_counted_us(counted)

    def window(self, now: float) -> Histogram:
        self._rotate(now)
        merged = Histogram()
        for h in self._ring:
            merged.merge(h)
        return merged

    def summary_ms(self, now: float) -> dict[str, Any]:
        """Since-start figures with a ``window`` sub-dict for the last ``window_s`` seconds."""
        out = self.total.summary_ms()
        win = self.window(now).summary_ms()
        win["seconds"] = self.window_s
        out["window"] = win
        return out
