"""The writer's per-batch C fast paths (``db/_speedups.c``: ``transpose``, ``all_finite``,
``position_ids``, ``newest_indexes``, ``count_values``) against the pure-Python code they stand in
for, on the engine's values and on anything else (where they must decline or agree)."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db import batch as dbbatch
from db import encode, latency
from db.batch import _CHECKED_IDX, Batch, clean_rows, transpose
from db.encode import (
    POSITION_FIELDS,
    SPEEDUPS,
    Dimensions,
    Prepared,
    newest_indexes,
    newest_indexes_py,
    position_keys,
    row_position_key,
)
from normalize.model import SNAPSHOT_FIELDS, GreeksSnapshot

from .rows import row, snapshots

pytestmark = pytest.mark.skipif(not SPEEDUPS, reason="db._speedups not built (no C compiler)")

if SPEEDUPS:
    from db import _speedups as C


def _zip(rows: list[Any]) -> list[tuple[Any, ...]]:
    return list(zip(*rows, strict=True))


# -- transpose ------------------------------------------------------------------------------------


@given(st.lists(snapshots, min_size=1, max_size=30))
def test_transpose_is_zip_of_the_rows(rows: list[GreeksSnapshot]) -> None:
    got = C.transpose(rows, len(SNAPSHOT_FIELDS))
    assert got == _zip(rows)
    assert all(type(col) is tuple for col in got)
    assert transpose(rows) == got


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [(1, 2), (3,)],  # a short row
        [(1, 2), [3, 4]],  # a list, not a tuple
        [(1, 2), "ab"],
    ],
    ids=["empty", "short-row", "list-row", "text-row"],
)
def test_transpose_declines_what_is_not_a_list_of_equal_tuples(rows: list[Any]) -> None:
    assert C.transpose(rows, 2) is None


def test_transpose_of_rows_python_refuses_still_raises() -> None:
    # The C path declines; zip(strict=True) says what is wrong, as before.
    rows: list[Any] = [row(1), tuple(row(2))[:5]]
    with pytest.raises(ValueError):
        transpose(rows)


# -- all_finite (clean_rows's batch check) --------------------------------------------------------

_value = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**1100), 2**1100)
    | st.booleans()
    | st.sampled_from(["1.0", b"x", (1.0,)])
)


@given(st.lists(st.lists(_value, max_size=6).map(tuple), max_size=5))
def test_all_finite_decides_as_the_sum_over_the_batch(columns: list[tuple[Any, ...]]) -> None:
    # Where the one sum is finite, so is every value; where it is not (NaN, an infinity, a value
    # that is not a number, an int no float holds), C says so too. The one difference: finite
    # values whose sum overflows, which the sum calls suspect and C does not (the row-by-row look
    # that follows finds nothing either way).
    values = [v for col in columns for v in col]
    each_ok = all(
        v is None
        or (isinstance(v, float) and math.isfinite(v))
        or (isinstance(v, int) and abs(v) < 2**1024 - 2**970)
        for v in values
    )
    assert C.all_finite(columns) is each_ok
    try:
        summed = math.isfinite(sum(filter(None, values)))
    except (TypeError, OverflowError):
        summed = False
    if summed:
        assert each_ok


def test_all_finite_edges() -> None:
    assert C.all_finite([]) is True
    assert C.all_finite([(), [None]]) is True
    assert C.all_finite([(1.0, 2, True, None)]) is True
    assert C.all_finite([(1.0,), (math.nan,)]) is False
    assert C.all_finite([(-math.inf,)]) is False
    assert C.all_finite([(10**400,)]) is False
    assert C.all_finite([("1.0",)]) is False
    assert C.all_finite([iter([1.0])]) is False  # not a tuple or list: let Python look


@given(st.lists(snapshots, min_size=1, max_size=20))
def test_clean_rows_keeps_clears_and_rejects_as_the_python_check(rows: list[GreeksSnapshot]) -> None:
    fast = clean_rows(rows)
    saved = dbbatch._all_finite_c, dbbatch._transpose_c
    dbbatch._all_finite_c, dbbatch._transpose_c = None, None  # type: ignore[assignment]
    try:
        slow = clean_rows(rows)
    finally:
        dbbatch._all_finite_c, dbbatch._transpose_c = saved
    assert (fast.rows, fast.values_cleared, fast.rejected) == (slow.rows, slow.values_cleared, slow.rejected)


def test_clean_rows_with_an_int_no_float_holds_looks_row_by_row() -> None:
    # The one sum over the batch, and the row-by-row check after it, raised OverflowError here
    # before (the writer crashed on the batch): now the row is set aside, as a quantity no
    # float8 column holds, and the others are kept.
    rows = [row(1), row(2)._replace(quantity=10**400), row(3)._replace(delta=-(10**400))]
    saved = dbbatch._all_finite_c
    for fast in (saved, None):
        dbbatch._all_finite_c = fast  # type: ignore[assignment]
        try:
            cleaned = clean_rows(rows)
        finally:
            dbbatch._all_finite_c = saved
        assert cleaned.rejected == [rows[1]]
        assert cleaned.rows == [rows[0], rows[2]._replace(delta=None)]
        assert cleaned.values_cleared == 1


def test_the_writer_check_takes_the_c_pass() -> None:
    rows = [row(i) for i in range(10)]
    seen: list[int] = []
    real = dbbatch._all_finite_c

    def spy(columns: Any) -> bool:
        seen.append(len(columns))
        return bool(real(columns))

    dbbatch._all_finite_c = spy  # type: ignore[assignment]
    try:
        assert clean_rows(rows).rows == rows
    finally:
        dbbatch._all_finite_c = real
    assert seen == [len(_CHECKED_IDX)]


# -- position ids ---------------------------------------------------------------------------------


@given(st.lists(snapshots, min_size=0, max_size=30), st.data())
def test_position_ids_are_the_lookup_of_the_keys(rows: list[GreeksSnapshot], data: st.DataObject) -> None:
    keys = list(map(row_position_key, rows))
    known = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    positions = {k: i + 10 for i, k in enumerate(known)}
    expected = [positions.get(k) for k in keys]
    assert C.position_ids(rows, len(POSITION_FIELDS), positions) == expected
    dims = Dimensions()
    dims.add(positions)
    assert dims.lookup_rows(rows) == dims.lookup(position_keys(transpose(rows))) == expected


def test_position_ids_of_rows_sharing_their_identity_objects() -> None:
    # The book builds a position's rows from one prefix: the same objects. Rows with equal but
    # distinct objects, and rows that differ in one identity field only, still get their own id.
    base = row(1)
    prefix = tuple(base[: len(POSITION_FIELDS)])
    shared = [GreeksSnapshot(*prefix, *row(i)[len(POSITION_FIELDS) :]) for i in range(50)]
    copied = row(1)._replace(instrument="".join(list(base.instrument)))  # equal, not the same object
    other = base._replace(multiplier=10.0)
    rows = [*shared, copied, other, *shared]
    positions = {row_position_key(base): 1, row_position_key(other): 2}
    assert C.position_ids(rows, len(POSITION_FIELDS), positions) == [1] * 51 + [2] + [1] * 50


def test_position_ids_decline_rows_they_cannot_slice() -> None:
    assert C.position_ids([(1, 2)], 3, {}) is None
    assert C.position_ids([[1, 2, 3]], 2, {}) is None
    assert C.position_ids([(1, 2)], 2, _DictSubclass()) is None


class _DictSubclass(dict[Any, Any]):
    pass


def test_position_ids_pass_on_an_unhashable_key_error() -> None:
    with pytest.raises(TypeError):
        C.position_ids([(1, [2])], 2, {})


def test_prepared_builds_the_keys_only_for_unknown_positions() -> None:
    rows = [row(i) for i in range(6)]  # six positions
    assert len(set(map(row_position_key, rows))) == 6
    dims = Dimensions()
    dims.add({row_position_key(r): i + 1 for i, r in enumerate(rows[:3])})
    prepared = Prepared(Batch(uuid.uuid4(), rows), dims, 2000).run(dims)
    assert prepared.keys == list(map(row_position_key, rows))
    assert prepared.pids == [1, 2, 3, None, None, None]
    assert set(prepared.missing(dims)) == set(map(row_position_key, rows[3:]))
    all_known = Dimensions()
    all_known.add({row_position_key(r): i + 1 for i, r in enumerate(rows)})
    done = Prepared(Batch(uuid.uuid4(), rows), all_known, 2000).run(all_known)
    assert done.keys == []  # the C lookup needed no keys
    assert done.pids == [1, 2, 3, 4, 5, 6]
    assert done.missing(all_known) == []


# -- newest row per position ----------------------------------------------------------------------

_times = st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.5, 1e9])


@given(st.lists(st.tuples(st.integers(-3, 6), _times, _times), max_size=60))
def test_newest_indexes_equal_the_python_sort(spec: list[tuple[int, float, float]]) -> None:
    cols: list[Any] = [()] * len(SNAPSHOT_FIELDS)
    cols[encode.EVENT_TS] = tuple(e for _, e, _ in spec)
    cols[encode.RECEIVED_TS] = tuple(r for _, _, r in spec)
    pids = [p for p, _, _ in spec]
    expected = newest_indexes_py(cols, pids)
    assert C.newest_indexes(cols[encode.EVENT_TS], cols[encode.RECEIVED_TS], pids) == expected
    assert newest_indexes(cols, pids) == expected  # the same list, in the same order


@pytest.mark.parametrize(
    ("events", "received", "pids"),
    [
        ((1.0, math.nan), (1.0, 1.0), [1, 1]),  # NaN: Python's sort decides
        ((1.0, 2), (1.0, 1.0), [1, 1]),  # an int time
        ((1.0,), (1.0,), [1.5]),  # a non-int id
        ((1.0,), (1.0,), [2**70]),
        ((1.0, 2.0), (1.0,), [1, 2]),  # lengths differ: zip(strict=True) raises
    ],
    ids=["nan", "int-time", "float-id", "huge-id", "lengths"],
)
def test_newest_indexes_decline_what_python_decides(
    events: tuple[Any, ...], received: tuple[Any, ...], pids: list[Any]
) -> None:
    assert C.newest_indexes(events, received, pids) is None


def test_newest_indexes_of_nothing() -> None:
    assert C.newest_indexes((), (), []) == []


# -- latency: distinct receive times --------------------------------------------------------------


@given(st.lists(st.sampled_from([1.0, 1.0, 2.0, -0.0, 0.0, math.inf, "x", None]), max_size=40))
def test_count_values_is_counter(values: list[Any]) -> None:
    assert C.count_values(values) == dict(Counter(values))
    assert C.count_values(tuple(values)) == dict(Counter(values))


def test_count_values_counts_a_run_of_equal_floats_once_and_nan_by_identity() -> None:
    a, b = 1.5, float("1.5")
    nan = math.nan
    assert C.count_values([a, b, a, 2.0, a]) == {1.5: 4, 2.0: 1}
    other = float("nan")
    counted = C.count_values([nan, nan, other])  # distinct NaN objects are distinct keys, as in Counter
    assert sorted(counted.values()) == sorted(Counter([nan, nan, other]).values()) == [1, 2]


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=50), st.floats(10, 20))
def test_record_commit_with_and_without_the_c_count(received: list[float], committed_at: float) -> None:
    fast, slow = latency.LatencyTracker(), latency.LatencyTracker()
    fast.record_commit(tuple(sorted(received)), committed_at)
    saved = latency._count_values
    latency._count_values = None  # type: ignore[assignment]
    try:
        slow.record_commit(tuple(sorted(received)), committed_at)
    finally:
        latency._count_values = saved
    assert fast.total.counts == slow.total.counts
    assert (fast.total.count, fast.total.sum_us, fast.total.max_us) == (
        slow.total.count,
        slow.total.sum_us,
        slow.total.max_us,
    )


def test_count_values_counts_what_it_was_given_when_an_eq_changes_the_list() -> None:
    values: list[Any] = []

    class Meddler:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            values.clear()  # the list shrinks under the count: the count is of the input as given
            return False

    values.extend([Meddler(), Meddler(), 2.0, Meddler()])
    counted = C.count_values(values)
    assert sorted(counted.values()) == [1, 1, 1, 1]
