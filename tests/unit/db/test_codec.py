"""db.copy's timestamptz codec: POSIX seconds in, the same microseconds as asyncpg's datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.copy import _decode_timestamptz, _encode_timestamptz

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def pg_us(dt: datetime) -> int:
    return (dt - PG_EPOCH) // US


@given(st.floats(min_value=0, max_value=1.2e10) | st.floats(min_value=-1e10, max_value=0))
def test_float_seconds_encode_like_fromtimestamp(ts: float) -> None:
    (us,) = _encode_timestamptz(ts)
    assert us == pg_us(datetime.fromtimestamp(ts, UTC))
    assert _decode_timestamptz((us,)) == datetime.fromtimestamp(ts, UTC)


@pytest.mark.parametrize("ts", [0.5e-6, 2.5e-6, 1_700_000_000.0000005, 1_700_000_000.9999995, 8.99e9])
def test_half_microsecond_edges(ts: float) -> None:
    assert _encode_timestamptz(ts) == (pg_us(datetime.fromtimestamp(ts, UTC)),)


def test_ints_and_datetimes() -> None:
    assert _encode_timestamptz(946_684_800) == (0,)
    aware = datetime(2024, 3, 10, 12, 0, 0, 250, tzinfo=timezone(timedelta(hours=2)))
    assert _encode_timestamptz(aware) == (pg_us(aware),)
    assert _decode_timestamptz(_encode_timestamptz(aware)) == aware
    assert _decode_timestamptz(_encode_timestamptz(datetime.max)) == datetime.max
    assert _decode_timestamptz(_encode_timestamptz(datetime.min)) == datetime.min
    with pytest.raises(TypeError):
        _encode_timestamptz("2024-03-10")
