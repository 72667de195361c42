"""db.batch: days and partitions, the batch builder (rows and RowsBatch items), clean_rows."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.batch import (
    Batch,
    BatchBuilder,
    clean_rows,
    days_of,
    partition_days,
    posix_to_us,
    retention_cutoff,
    utc_day,
)
from normalize.events import PositionsSnapshot, RowsBatch, SessionEnded, SessionStarted

from .rows import row


@given(st.floats(min_value=-1e10, max_value=1e10))
def test_posix_to_us_rounds_like_fromtimestamp(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert posix_to_us(ts) == expected // timedelta(microseconds=1)


@pytest.mark.parametrize("ts", [0.0, 0.5e-6, 1.5e-6, 2.5e-6, 0.9999995, 1_700_000_000.0000005, 86399.999])
def test_posix_to_us_half_even_edges(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert posix_to_us(ts) == expected // timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("ts", "day"),
    [
        (0.0, date(1970, 1, 1)),
        (86399.999, date(1970, 1, 1)),
        (86400.0, date(1970, 1, 2)),
        (datetime(2024, 3, 10, 23, 59, 59, 999000, tzinfo=UTC).timestamp(), date(2024, 3, 10)),
        (datetime(2024, 3, 11, tzinfo=UTC).timestamp(), date(2024, 3, 11)),
    ],
)
def test_utc_day_boundaries(ts: float, day: date) -> None:
    assert utc_day(ts) == day


@given(st.floats(min_value=0, max_value=4e9))
def test_utc_day_matches_datetime(ts: float) -> None:
    assert utc_day(ts) == datetime.fromtimestamp(ts, UTC).date()


def test_days_of_and_partition_window() -> None:
    midnight = datetime(2024, 3, 11, tzinfo=UTC).timestamp()
    assert days_of([row(ts=midnight - 0.001), row(ts=midnight)]) == {
        date(2024, 3, 10),
        date(2024, 3, 11),
    }
    assert days_of([row(ts=midnight), row(ts=midnight + 5)]) == {date(2024, 3, 11)}
    # Days without rows between the first and the last are not included.
    assert days_of([row(ts=midnight), row(ts=midnight + 3 * 86400)]) == {
        date(2024, 3, 11),
        date(2024, 3, 14),
    }
    assert days_of([]) == set()
    assert partition_days(date(2024, 3, 11), 2) == [
        date(2024, 3, 10),
        date(2024, 3, 11),
        date(2024, 3, 12),
        date(2024, 3, 13),
    ]
    assert retention_cutoff(date(2024, 3, 11), 30) == date(2024, 2, 10)


def test_builder_caps_rows_and_time() -> None:
    b = BatchBuilder(max_rows=5, max_delay_s=0.05)
    b.start([row(0), row(1)], now=100.0)
    assert not b.full(100.0)
    b.add([row(2), row(3), row(4), row(5)])
    assert b.full(100.0)  # 6 rows >= 5: the item that reaches the cap is kept whole
    assert len(b.take().rows) == 6
    b.start([row(0)], now=200.0)
    assert not b.full(200.04)
    assert b.full(200.05)
    assert b.take().rows == [row(0)]
    assert b.take().empty
    with pytest.raises(ValueError):
        BatchBuilder(0, 1.0)


def _batches(b: BatchBuilder, start: float, per_batch: int, every_s: float, count: int) -> float:
    """Start and take ``count`` batches of ``per_batch`` rows, ``every_s`` apart; the last time."""
    t = start
    for _ in range(count):
        b.start([row(i) for i in range(per_batch)], now=t)
        b.take()
        t += every_s
    return t


def test_builder_lingers_only_while_rows_arrive_fast() -> None:
    b = BatchBuilder(max_rows=5000, max_delay_s=0.05, linger_s=0.004, linger_from_rows_s=10_000)
    # quiet: 2 rows every 2 ms = 1,000 rows/s: never waits
    t = _batches(b, 100.0, 2, 0.002, 400)
    b.start([row(0)], now=t)
    assert b.rate_rows_s == pytest.approx(1000, rel=0.05)
    assert b.linger(t) == 0.0
    b.take()
    # busy: 50 rows every 2 ms = 25,000 rows/s: the batch waits until 4 ms after its first item
    t = _batches(b, t + 0.002, 50, 0.002, 400)
    b.start([row(0)], now=t)
    assert b.rate_rows_s == pytest.approx(25_000, rel=0.05)
    assert b.linger(t) == pytest.approx(0.004)
    assert b.linger(t + 0.003) == pytest.approx(0.001)
    assert b.linger(t + 0.005) == 0.0
    b.add([row(i) for i in range(5000)])  # full: take it now
    assert b.linger(t) == 0.0
    b.take()
    # quiet again: after a second of silence the rate falls and batches stop waiting
    b.start([row(0)], now=t + 1.0)
    assert b.linger(t + 1.0) == 0.0


def test_builder_linger_counts_from_the_oldest_rows_receive_time() -> None:
    # A row that already waited in the channel (the writer was busy) waits only what is left of
    # the linger; one older than the linger is committed at once.
    b = BatchBuilder(max_rows=5000, max_delay_s=0.05, linger_s=0.004, linger_from_rows_s=0)
    b.start([row(0)._replace(received_ts=100.0 - 0.003)], now=100.0)
    assert b.linger(100.0) == pytest.approx(0.001)
    b.take()
    b.start([row(0)._replace(received_ts=100.0 - 0.010)], now=100.0)
    assert b.linger(100.0) == 0.0
    b.take()
    b.start(RowsBatch([], (PositionsSnapshot("ibkr", ("U1",), (), 1.0),)), now=100.0)  # no rows
    assert b.linger(100.0) == pytest.approx(0.004)
    b.take()
    b.start([row(0)._replace(received_ts=200.0)], now=100.0)  # a clock step: from the start
    assert b.linger(100.0) == pytest.approx(0.004)


def test_builder_linger_off_and_capped_by_the_max_delay() -> None:
    off = BatchBuilder(max_rows=5000, max_delay_s=0.05, linger_s=0.0, linger_from_rows_s=0)
    off.start([row(0)], now=1.0)
    assert off.linger(1.0) == 0.0
    capped = BatchBuilder(max_rows=5000, max_delay_s=0.01, linger_s=0.5, linger_from_rows_s=0)
    capped.start([row(0)], now=1.0)
    assert capped.linger(1.0) == pytest.approx(0.01)


def test_builder_takes_rows_batches_and_plain_rows_in_order() -> None:
    snap = PositionsSnapshot("ibkr", ("U1",), (), 10.0)
    start = SessionStarted("ibkr", "s1", ("U1",), "gw:5000", "simulated", 1.0)
    end = SessionEnded("ibkr", "s1", 2.0, "closed 1001", 7)
    b = BatchBuilder(max_rows=100, max_delay_s=1.0)
    b.start(RowsBatch([row(0)], (snap,), (start,)), now=0.0)
    b.add([row(1)])
    b.add(RowsBatch([], (), (end,)))  # no rows, still carried
    assert not b.full(0.0)
    taken = b.take()
    assert taken.rows == [row(0), row(1)]
    assert taken.positions == [snap]
    assert taken.sessions == [start, end]
    assert not taken.empty
    assert Batch(uuid.uuid4(), [], (snap,)).empty is False
    assert Batch(uuid.uuid4(), []).empty


class TestCleanRows:
    """NaN and infinities are "no value": cleared, counted, never written as numbers."""

    def test_finite_rows_pass_through_untouched(self) -> None:
        rows = [row(i) for i in range(5)]
        cleaned = clean_rows(rows)
        assert cleaned.rows is rows
        assert (cleaned.values_cleared, cleaned.rejected) == (0, [])

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_nonfinite_optional_values_become_none(self, bad: float) -> None:
        good = row(1)
        # pos_* exposures are not stored (the views derive them): not cleared, not counted.
        dirty = row(2)._replace(delta=bad, iv=bad, bid=bad, rho=bad, pos_vega=bad)
        cleaned = clean_rows([good, dirty])
        assert cleaned.values_cleared == 4
        assert cleaned.rejected == []
        assert cleaned.rows[0] is good
        fixed = cleaned.rows[1]
        assert (fixed.delta, fixed.iv, fixed.bid, fixed.rho) == (None, None, None, None)
        assert fixed.gamma == dirty.gamma
        assert fixed.seq == dirty.seq

    def test_finite_values_that_overflow_a_sum_are_kept(self) -> None:
        big = row(1)._replace(bid=1e308, ask=1e308)
        cleaned = clean_rows([big])
        assert cleaned.rows == [big]
        assert cleaned.values_cleared == 0

    def test_rows_with_an_unknown_greeks_source_are_set_aside(self) -> None:
        good = [row(1)._replace(greeks_source="broker"), row(2)._replace(greeks_source="model"), row(3)]
        bad = [row(4)._replace(greeks_source="guess"), row(5)._replace(greeks_source=["x"])]  # type: ignore[arg-type]
        cleaned = clean_rows([*good, *bad])
        assert cleaned.rows == good
        assert cleaned.rejected == bad
        assert cleaned.values_cleared == 0

    @pytest.mark.parametrize("field", ["event_ts", "received_ts", "quantity", "multiplier"])
    def test_rows_without_a_finite_time_or_size_are_set_aside(self, field: str) -> None:
        bad = row(2)._replace(**{field: math.nan})
        cleaned = clean_rows([row(1), bad, row(3)])
        assert [r.seq for r in cleaned.rows] == [1, 3]
        assert cleaned.rejected == [bad]
