"""db.latency: bucket layout, quantile accuracy, the sliding window."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.latency import (
    MAX_US,
    N_BUCKETS,
    SUB_BITS,
    Histogram,
    LatencyTracker,
    bucket_index,
    bucket_upper,
)

REL = 2 ** -(SUB_BITS - 1)


@given(st.integers(min_value=0, max_value=MAX_US))
def test_every_value_is_inside_its_bucket(us: int) -> None:
    i = bucket_index(us)
    assert 0 <= i < N_BUCKETS
    assert us <= bucket_upper(i)
    assert i == 0 or us > bucket_upper(i - 1)
    assert bucket_upper(i) - us <= max(1, us * REL)


def test_constant_memory_and_clamping() -> None:
    assert N_BUCKETS < 1000
    assert bucket_index(10 * MAX_US) == N_BUCKETS - 1
    assert bucket_index(-5) == 0


@given(st.lists(st.integers(min_value=0, max_value=10_000_000), min_size=1, max_size=300))
def test_quantiles_are_within_bucket_precision(values: list[int]) -> None:
    h = Histogram()
    for v in values:
        h.record_us(v)
    ordered = sorted(values)
    assert h.max_us == ordered[-1]
    assert h.count == len(values)
    for q in (0.5, 0.95, 0.99, 1.0):
        exact = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        got = h.quantile_us(q)
        assert exact <= got <= max(exact + 1, exact * (1 + REL))
        assert got <= h.max_us


def test_summary_in_milliseconds() -> None:
    h = Histogram()
    h.record_many_s([0.001, 0.002, 0.004])
    s = h.summary_ms()
    assert s["count"] == 3
    assert s["max"] == 4.0
    assert s["p50"] == pytest.approx(2.0, rel=REL)
    assert Histogram().summary_ms()["p99"] == 0.0


def test_window_forgets_old_commits() -> None:
    t = LatencyTracker(window_s=60, slots=6)
    t.record_commit([99.9], committed_at=100.0)  # 100 ms
    t.record_commit([129.999], committed_at=130.0)  # 1 ms
    assert t.window(130.0).count == 2
    assert t.window(165.0).count == 1  # the first commit's slot has rotated out
    assert t.window(1000.0).count == 0
    s = t.summary_ms(1000.0)
    assert s["count"] == 2  # since start keeps everything
    assert s["max"] == pytest.approx(100.0, abs=0.01)
    assert s["window"] == {**s["window"], "count": 0, "seconds": 60}


def test_merge() -> None:
    a, b = Histogram(), Histogram()
    a.record_us(5)
    b.record_us(5000)
    a.merge(b)
    assert (a.count, a.max_us) == (2, 5000)
    with pytest.raises(ValueError):
        LatencyTracker(window_s=0)


@given(
    st.lists(st.floats(min_value=0.0, max_value=5.0, allow_nan=False), min_size=1, max_size=200),
    st.floats(min_value=5.0, max_value=10.0),
)
def test_record_commit_matches_per_row_recording(received: list[float], committed_at: float) -> None:
    """Counting duplicate receive times first records exactly what per-row recording would."""
    received = received + received[: len(received) // 2]  # duplicates, as rows of one frame
    t = LatencyTracker()
    t.record_commit(iter(received), committed_at)
    per_row = Histogram()
    per_row.record_many_s([committed_at - r for r in received])
    for h in (t.total, t.window(committed_at)):
        assert (h.counts, h.count, h.max_us, h.sum_us) == (
            per_row.counts,
            per_row.count,
            per_row.max_us,
            per_row.sum_us,
        )
