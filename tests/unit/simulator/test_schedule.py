"""Update schedule: mean rate, burstiness, determinism."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.schedule import UpdateSchedule


def _gaps(schedule: UpdateSchedule, key: str, n: int) -> list[float]:
    clock = schedule.clock(key, 0.0)
    times = [clock.next_time] + [clock.advance() for _ in range(n)]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_even_spacing_without_burstiness() -> None:
    gaps = _gaps(UpdateSchedule(rate_hz=4.0), "SPY", 50)
    assert all(g == pytest.approx(0.25) for g in gaps)


def test_first_update_within_one_interval() -> None:
    clock = UpdateSchedule(rate_hz=2.0).clock("SPY", 100.0)
    assert 100.0 <= clock.next_time < 100.5


@settings(max_examples=20, deadline=None)
@given(rate=st.floats(0.5, 1000.0), burstiness=st.floats(0.0, 1.0))
def test_mean_rate_is_kept(rate: float, burstiness: float) -> None:
    gaps = _gaps(UpdateSchedule(rate_hz=rate, burstiness=burstiness, seed=1), "QQQ", 4000)
    assert statistics.fmean(gaps) == pytest.approx(1.0 / rate, rel=0.25)


def test_burstiness_raises_dispersion() -> None:
    calm = _gaps(UpdateSchedule(rate_hz=10.0, burstiness=0.1), "SPY", 3000)
    bursty = _gaps(UpdateSchedule(rate_hz=10.0, burstiness=1.0), "SPY", 3000)
    cv = [statistics.stdev(g) / statistics.fmean(g) for g in (calm, bursty)]
    assert cv[0] < 0.6 < 1.5 < cv[1]


def test_deterministic_by_seed_key_and_salt() -> None:
    s = UpdateSchedule(rate_hz=5.0, burstiness=0.5, seed=9)
    assert _gaps(s, "A", 20) == _gaps(s, "A", 20)
    assert _gaps(s, "A", 20) != _gaps(s, "B", 20)
    assert s.clock("A", 0.0, salt="1").next_time != s.clock("A", 0.0, salt="2").next_time


def test_overrides_zero_rate_and_resync() -> None:
    s = UpdateSchedule(rate_hz=2.0, rates={"SLOW": 0.0, "FAST": 100.0})
    assert s.rate("FAST") == 100.0
    assert math.isinf(s.clock("SLOW", 0.0).next_time)
    clock = s.clock("SPY", 0.0)
    assert clock.resync(100.0) > 100.0  # far behind: skip ahead
    with pytest.raises(ValueError):
        UpdateSchedule(burstiness=2.0)
    with pytest.raises(ValueError):
        UpdateSchedule(rate_hz=-1.0)
