"""bench.capacity.search: doubling, then bisection, and the feed's ceiling as the last step up."""

from __future__ import annotations

from typing import Any

import pytest

from bench.capacity import search


class _Run:
    def __init__(self, rate: float, limit: float) -> None:
        self.rate = rate
        self.ok = rate <= limit
        self.ticks_per_s = min(rate, limit)
        self.lost = 0
        self.latency_ms = {"p99": 1.0}
        self.offered_per_s = rate
        self.error = None

    def sustained(self, rate: float) -> bool:
        return self.ok

    def keys(self) -> dict[str, Any]:
        return {"ticks_per_s": self.ticks_per_s}

    def detail(self) -> dict[str, Any]:
        return {}


class _Bench:
    """A contestant that sustains any rate up to ``limit``."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.rates: list[float] = []

    def run(self, name: str, rate: float, seconds: float) -> _Run:
        self.rates.append(rate)
        return _Run(rate, self.limit)


@pytest.mark.parametrize(
    ("limit", "best", "tried"),
    [
        # Sustains the feed's ceiling: doubling stops at 200k (400k is above the ceiling), the
        # ceiling itself is tried and passes.
        (10**9, 399_700, [100_000, 200_000, 399_700]),
        # Between the last doubling and the ceiling: the ceiling fails, bisection finds it.
        (260_000, 249_900, [100_000, 200_000, 399_700, 299_800, 249_900]),
        # Fails a doubling below the ceiling: bisection between the last two doublings.
        (130_000, 125_000, [100_000, 200_000, 150_000, 125_000]),
    ],
    ids=["feed-bound", "between-doubling-and-ceiling", "below-a-doubling"],
)
def test_search_goes_up_to_the_feeds_ceiling(limit: float, best: float, tried: list[float]) -> None:
    bench = _Bench(limit)
    log: list[dict[str, Any]] = []
    found = search(bench, "engine", 6.0, 399_780.0, 2, log, start=100_000)  # type: ignore[arg-type]
    assert found is not None
    assert bench.rates == tried
    assert found.rate == best
    assert [e["rate"] for e in log] == tried
