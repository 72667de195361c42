"""Fault controller: counts, durations, lazy windows, listeners."""

from __future__ import annotations

import pytest

from simulator.faults import Fault, FaultController


def test_count_limited_fault_is_consumed() -> None:
    fc = FaultController()
    fc.inject(Fault.DROP, count=2)
    assert fc.active(Fault.DROP, 0.0)
    assert fc.consume(Fault.DROP, 0.0)
    assert fc.consume(Fault.DROP, 0.0)
    assert not fc.consume(Fault.DROP, 0.0)
    assert not fc.active(Fault.DROP, 0.0)
    assert fc.triggered[Fault.DROP] == 2


def test_duration_with_now() -> None:
    fc = FaultController()
    fc.inject(Fault.STALL, duration_s=5.0, now=100.0)
    assert fc.active(Fault.STALL, 104.9)
    assert fc.consume(Fault.STALL, 104.9)  # not count-limited: stays active
    assert not fc.active(Fault.STALL, 105.0)


def test_duration_without_now_starts_at_first_check() -> None:
    fc = FaultController()
    fc.inject(Fault.REFUSE, duration_s=2.0)
    assert fc.active(Fault.REFUSE, 50.0)
    assert fc.active(Fault.REFUSE, 51.9)
    assert not fc.active(Fault.REFUSE, 52.0)


def test_count_and_duration_whichever_first() -> None:
    fc = FaultController()
    fc.inject(Fault.MALFORMED, count=10, duration_s=1.0, now=0.0)
    assert fc.consume(Fault.MALFORMED, 0.5)
    assert not fc.consume(Fault.MALFORMED, 1.5)


def test_until_cleared_and_listeners() -> None:
    fc = FaultController()
    seen: list[tuple[Fault, bool]] = []
    fc.add_listener(lambda f, injected: seen.append((f, injected)))
    fc.inject(Fault.BINARY_FRAME)
    fc.inject(Fault.ABORT, count=1)
    assert fc.active_faults(1e9) == [Fault.BINARY_FRAME, Fault.ABORT]
    fc.clear(Fault.BINARY_FRAME)
    fc.clear()
    assert fc.active_faults(0.0) == []
    assert seen == [
        (Fault.BINARY_FRAME, True),
        (Fault.ABORT, True),
        (Fault.BINARY_FRAME, False),
        (Fault.ABORT, False),
    ]


def test_string_values_and_validation() -> None:
    fc = FaultController()
    fc.inject(Fault("drop"), count=1)
    assert fc.consume(Fault.DROP, 0.0)
    with pytest.raises(ValueError):
        fc.inject(Fault.DROP, count=-1)
    with pytest.raises(ValueError):
        fc.inject(Fault.DROP, duration_s=-1.0)
