"""db.encode: position keys and the ids cache, the newest row per position, the statement matrix,
the binary COPY stream (decoded back here), positions snapshots and session events folding."""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import sysconfig
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.batch import Batch, transpose
from db.encode import (
    COPY_SIGNATURE,
    FLOAT4_MAX,
    HISTORY_COLUMNS,
    MATRIX_ROWS,
    NEST_FROM,
    SPEEDUPS,
    BatchDataError,
    Dimensions,
    Prepared,
    copy_chunk,
    copy_chunk_py,
    copy_payload,
    facts,
    fold_positions,
    fold_sessions,
    instrument_ids,
    instrument_params,
    matrix,
    nested,
    nested_row,
    newest_indexes,
    pg_timestamp_us,
    position_ids,
    position_keys,
    position_params,
    row_position_key,
    unified_position_key,
)
from normalize.events import PositionsSnapshot, SessionEnded, SessionStarted
from normalize.model import AssetClass, GreeksSnapshot, Right, UnifiedPosition

from .rows import row

# -- COPY decoding (the reference for the encoder) --------------------------------------------

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_DECODE = {
    "event_ts": ">q", "received_ts": ">q", "quantity": ">d", "bid": ">d", "ask": ">d", "last": ">d",
    "mark": ">d", "underlying_price": ">d", "seq": ">q", "position_id": ">i", "iv": ">f", "delta": ">f",
    "gamma": ">f", "theta": ">f", "vega": ">f", "rho": ">f", "greeks_source": "c",
}  # fmt: skip


def decode_copy(data: bytes) -> list[dict[str, Any]]:
    """PostgreSQL's binary COPY format, read back (signature, tuples, trailer)."""
    assert data.startswith(COPY_SIGNATURE)
    pos = len(COPY_SIGNATURE)
    out = []
    while True:
        (nfields,) = struct.unpack_from(">h", data, pos)
        pos += 2
        if nfields == -1:
            assert pos == len(data)
            return out
        assert nfields == len(HISTORY_COLUMNS)
        rec: dict[str, Any] = {}
        for name in HISTORY_COLUMNS:
            (length,) = struct.unpack_from(">i", data, pos)
            pos += 4
            if length == -1:
                rec[name] = None
                continue
            raw = data[pos : pos + length]
            pos += length
            rec[name] = raw if name == "greeks_source" else struct.unpack(_DECODE[name], raw)[0]
        out.append(rec)


def f4(value: float | None) -> float | None:
    return None if value is None else struct.unpack(">f", struct.pack(">f", value))[0]


maybe_price = st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False).map(lambda v: round(v, 2))
maybe_greek = st.none() | st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
history_rows = st.builds(
    lambda i, ts, rc, q, prices, greeks, seq, src: row(i, ts=ts)._replace(
        received_ts=rc,
        quantity=q,
        bid=prices[0],
        ask=prices[1],
        last=prices[2],
        mark=prices[3],
        underlying_price=prices[4],
        iv=greeks[0],
        delta=greeks[1],
        gamma=greeks[2],
        theta=greeks[3],
        vega=greeks[4],
        rho=greeks[5],
        seq=seq,
        greeks_source=src,
    ),
    st.integers(0, 20),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.tuples(*[maybe_price] * 5),
    st.tuples(*[maybe_greek] * 6),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([None, "broker", "model"]),
)


@given(st.lists(history_rows, max_size=40), st.integers(1, 7))
def test_copy_stream_decodes_to_the_rows(rows: list[GreeksSnapshot], chunk_rows: int) -> None:
    # Arrange
    pids = [100 + i for i in range(len(rows))]

    # Act
    data = b"".join(copy_payload(transpose(rows), pids, chunk_rows))

    # Assert: every row once (grouped by NULL pattern, so in any order), every value exact
    # (Greeks as float4, times as microseconds since 2000 rounded like fromtimestamp).
    decoded = sorted(decode_copy(data), key=lambda r: r["position_id"])
    assert len(decoded) == len(rows)
    for rec, (pid, r) in zip(decoded, zip(pids, rows, strict=True), strict=True):
        assert rec["position_id"] == pid
        for name in ("event_ts", "received_ts"):
            expected = datetime.fromtimestamp(getattr(r, name), UTC) - _PG_EPOCH
            assert rec[name] == expected // timedelta(microseconds=1)
        for name in ("quantity", "bid", "ask", "last", "mark", "underlying_price", "seq"):
            assert rec[name] == getattr(r, name)
        for name in ("iv", "delta", "gamma", "theta", "vega", "rho"):
            assert rec[name] == f4(getattr(r, name))
        assert rec["greeks_source"] == {"broker": b"b", "model": b"m", None: None}[r.greeks_source]


def test_copy_stream_with_every_optional_column_mixed() -> None:
    # 13 optional columns NULL in some rows and not in others (more than 8: the grouping key
    # then takes two bytes a row), in many patterns.
    optional = ("bid", "ask", "last", "mark", "underlying_price", "iv", "delta", "gamma", "theta",
                "vega", "rho", "seq", "greeks_source")  # fmt: skip
    full = dict.fromkeys(optional, 1.5) | {"seq": 7, "greeks_source": "model"}
    rows = [
        row(i)._replace(**{name: (None if (i >> b) & 1 else full[name]) for b, name in enumerate(optional)})
        for i in range(300)
    ]
    decoded = sorted(
        decode_copy(b"".join(copy_payload(transpose(rows), list(range(300))))), key=lambda r: r["position_id"]
    )
    assert [r["position_id"] for r in decoded] == list(range(300))
    for rec, r in zip(decoded, rows, strict=True):
        for name in optional:
            got = rec[name]
            if getattr(r, name) is None:
                assert got is None
            elif name == "greeks_source":
                assert got == b"m"
            else:
                assert got == full[name]


# -- the C fast path (db/_speedups.c) against the Python encoder --------------------------------


def split_copy_rows(data: bytes) -> list[bytes]:
    """Binary COPY rows (no signature, no trailer) cut into one byte string per row."""
    rows, pos = [], 0
    while pos < len(data):
        start = pos
        (nfields,) = struct.unpack_from(">h", data, pos)
        pos += 2
        for _ in range(nfields):
            (length,) = struct.unpack_from(">i", data, pos)
            pos += 4 + max(length, 0)
        rows.append(data[start:pos])
    assert pos == len(data)
    return rows


def can_build_extensions(tmp: Path) -> bool:
    """Whether this machine's C compiler (``CC``, as setuptools picks it) compiles against the
    Python headers."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        return False
    source = tmp / "probe.c"
    source.write_text("#include <Python.h>\nint probe(void) { return Py_IsNone(Py_None); }\n")
    include = sysconfig.get_paths()["include"]
    done = subprocess.run([*cc, "-c", f"-I{include}", str(source), "-o", str(tmp / "probe.o")], check=False)
    return done.returncode == 0


def test_the_c_fast_paths_are_built_where_a_compiler_is(tmp_path: Path) -> None:
    # pip builds the C fast paths as optional extensions: a machine that can compile one must
    # have them (a broken build would silently fall back to Python).
    from normalize.book import SPEEDUPS as BOOK_SPEEDUPS

    if not can_build_extensions(tmp_path):
        pytest.skip("no working C compiler here: the pure-Python code runs")
    assert SPEEDUPS, "db._speedups was not built: reinstall (pip install -e .) and read its error"
    assert BOOK_SPEEDUPS, "normalize._speedups was not built: reinstall and read its error"


_any_float = st.floats(allow_nan=True, allow_infinity=True)
wild_rows = st.builds(
    lambda r, ts, rc, q, extra, seq, src: r._replace(
        event_ts=ts,
        received_ts=rc,
        quantity=q,
        bid=extra[0],
        delta=extra[1],
        iv=extra[2],
        seq=seq,
        greeks_source=src,
    ),  # fmt: skip
    history_rows,
    st.floats(min_value=-1e10, max_value=1.2e10) | st.integers(0, 2**33),
    st.floats(min_value=0, max_value=1e10),
    _any_float | st.integers(-(2**40), 2**40),
    st.tuples(
        st.none() | _any_float | st.integers(-5, 5),
        st.none() | _any_float | st.sampled_from([FLOAT4_MAX * 2, -1e39, 3.4e38]),
        st.none() | st.floats(min_value=-1e6, max_value=1e6) | st.booleans(),
    ),
    st.none() | st.integers(-(2**64), 2**64) | st.booleans(),
    st.sampled_from([None, "broker", "model", "other", "broker\x00x"]),
)


@pytest.mark.skipif(not SPEEDUPS, reason="db._speedups not built (no C compiler)")
@given(st.lists(history_rows, max_size=30), st.integers(0, 5), st.integers(0, 40))
def test_c_fast_path_writes_the_rows_the_python_encoder_writes(
    rows: list[GreeksSnapshot], start: int, end: int
) -> None:
    # The engine's values (floats, None, int sequences): the C path takes every chunk and each
    # row's bytes equal the Python encoder's (which groups rows by NULL pattern: any order).
    cols = transpose(rows)
    pids = [7 + i * 1_000_003 for i in range(len(rows))]
    from db._speedups import copy_rows

    direct = copy_rows(
        [
            pids if name == "position_id" else cols[GreeksSnapshot._fields.index(name)]
            for name in HISTORY_COLUMNS
        ],
        min(start, len(rows)),
        min(end, len(rows)) if end >= start else min(start, len(rows)),
    )
    assert direct is not None
    fast = copy_chunk(cols, pids, start, end)
    assert sorted(split_copy_rows(fast)) == sorted(split_copy_rows(copy_chunk_py(cols, pids, start, end)))
    if end > start and rows[start:end]:
        assert fast == direct


@given(st.lists(wild_rows, min_size=1, max_size=8))
def test_c_fast_path_and_python_encoder_agree_on_any_values(rows: list[GreeksSnapshot]) -> None:
    # Ints where floats go, NaN and infinities, values beyond float4 or int8, booleans, unknown
    # sources, times outside the fast range: the same rows, or the same refusal.
    cols = transpose(rows)
    pids = list(range(len(rows)))
    try:
        expected = sorted(split_copy_rows(copy_chunk_py(cols, pids)))
    except BatchDataError:
        with pytest.raises(BatchDataError):
            copy_chunk(cols, pids)
        return
    assert sorted(split_copy_rows(copy_chunk(cols, pids))) == expected


@given(st.floats(min_value=0, max_value=1.2e10) | st.floats(min_value=-1e10, max_value=0))
def test_pg_timestamp_us_rounds_like_fromtimestamp(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC) - _PG_EPOCH
    assert pg_timestamp_us(ts) == expected // timedelta(microseconds=1)


@pytest.mark.parametrize(
    "bad",
    [{"delta": FLOAT4_MAX * 2}, {"iv": -1e39}, {"seq": 2**63}, {"bid": "1.05"}],
    ids=["delta-beyond-float4", "iv-beyond-float4", "seq-beyond-int8", "text-price"],
)
def test_values_no_column_can_hold_refuse_the_chunk(bad: dict[str, Any]) -> None:
    rows = [row(1), row(2)._replace(**bad), row(3)]
    with pytest.raises(BatchDataError):
        copy_chunk(transpose(rows), [1, 2, 3])


def test_empty_stream_is_signature_and_trailer() -> None:
    assert decode_copy(b"".join(copy_payload(transpose([]), []))) == []


# -- newest row per position, matrix, facts --------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from([0.0, 0.5])),
        max_size=40,
    )
)
def test_newest_index_is_the_greatest_time_and_the_later_row_on_a_tie(
    spec: list[tuple[int, float, float]],
) -> None:
    rows = [row(i, ts=ts)._replace(received_ts=ts + rc) for i, (_, ts, rc) in enumerate(spec)]
    pids = [p for p, _, _ in spec]

    got = newest_indexes(transpose(rows), pids)

    expected = {}
    for i, (pid, r) in enumerate(zip(pids, rows, strict=True)):
        if pid not in expected or (r.event_ts, r.received_ts) >= (
            rows[expected[pid]].event_ts,
            rows[expected[pid]].received_ts,
        ):
            expected[pid] = i
    assert sorted(got) == sorted(expected.values())


def test_matrix_has_one_list_per_row_name_and_flags_the_newest() -> None:
    rows = [row(i, ts=100.0 + i)._replace(greeks_source=s) for i, s in enumerate(["broker", "model", None])]
    m = matrix(transpose(rows), [7, 8, 7], [1, 2])
    assert len(m) == len(MATRIX_ROWS)
    by_name = dict(zip(MATRIX_ROWS, m, strict=True))
    assert by_name["position_id"] == [7.0, 8.0, 7.0]
    assert by_name["event_ts"] == [100.0, 101.0, 102.0]
    assert by_name["greeks_source"] == [1.0, 2.0, None]
    assert by_name["newest"] == [None, 1.0, 1.0]
    assert all(isinstance(col, list) for col in m)  # lists, not tuples (tuples are records to asyncpg)
    assert matrix(transpose([]), [], None) == []


def test_facts() -> None:
    f = facts(transpose([row(0, ts=100.0), row(1, ts=50.0)]))
    assert (f.row_count, f.min_event_ts, f.max_event_ts) == (2, 50.0, 100.0)
    assert f.max_received_ts == pytest.approx(100.001)
    assert facts(transpose([])).row_count == 0


# -- dimensions ---------------------------------------------------------------------------------


def position(instrument: str, quantity: float, account: str = "U1", **kw: Any) -> UnifiedPosition:
    fields: dict[str, Any] = {
        "broker": "ibkr",
        "account": account,
        "instrument": instrument,
        "underlying": "SPY",
        "asset_class": AssetClass.OPTION,
        "right": Right.CALL,
        "strike": 500.0,
        "expiry": date(2025, 1, 17),
        "multiplier": 100.0,
        "quantity": quantity,
        "avg_cost": 1.5,
        **kw,
    }
    return UnifiedPosition(**fields)


def test_position_keys_of_rows_and_positions_agree() -> None:
    r = row(1)
    u = UnifiedPosition(
        r.broker, r.account, r.instrument, r.underlying, AssetClass(r.asset_class),
        Right(r.right) if r.right else None, r.strike, r.expiry, r.multiplier, 5.0, None,
    )  # fmt: skip
    assert row_position_key(r) == unified_position_key(u)  # enums equal their text
    assert position_keys(transpose([r, r])) == [row_position_key(r)] * 2


def test_dimensions_cache_lookup_missing_and_generation() -> None:
    a, b, c = (row_position_key(row(i)) for i in (0, 1, 3))
    dims = Dimensions()
    dims.add({a: 1})
    assert dims.lookup([a, b, a]) == [1, None, 1]
    assert dims.missing([c, b, a, b]) == sorted({b, c}, key=repr)  # once each, one order for all
    gen = dims.generation
    dims.clear()
    assert len(dims) == 0
    assert dims.generation == gen + 1


def test_resolve_parameters_and_results_round_trip() -> None:
    keys = [row_position_key(row(i)) for i in range(4)]  # instruments repeat (i % 7), accounts too
    params = instrument_params(keys)
    assert len(params) == 7
    unique = list(dict.fromkeys(k[2:] for k in keys))
    assert len(params[0]) == len(unique)
    # What the database returns: ids, then the instrument columns as stored.
    inst = instrument_ids((10 + i, *u) for i, u in enumerate(unique))
    broker, account, instrument_id = position_params(keys, inst)
    assert instrument_id == [inst[k[2:]] for k in keys]
    returned = [(500 + i, *cols) for i, cols in enumerate(zip(broker, account, instrument_id, strict=True))]
    assert set(position_ids(keys, inst, returned)) == set(keys)


# -- Prepared ---------------------------------------------------------------------------------


def test_prepared_small_and_large_and_unknown_positions() -> None:
    rows = [row(i, ts=10.0 + i) for i in range(6)]
    batch = Batch(uuid.uuid4(), rows)
    keys = [row_position_key(r) for r in rows]
    dims = Dimensions()
    dims.add({k: 1 + hash(k) % 1000 for k in keys})

    small = Prepared(batch, dims, copy_min_rows=100).run(dims, eager=True)
    assert small.rows_args is not None
    assert small.payload is None
    assert not small.large
    large = Prepared(batch, dims, copy_min_rows=1).run(dims, eager=True)
    assert large.large
    assert large.latest_args is not None
    assert large.payload is not None
    assert len(decode_copy(b"".join(large.payload))) == 6
    lazy = Prepared(batch, dims, copy_min_rows=1).run(dims)
    assert lazy.payload is None  # streamed by the write instead

    unknown = Prepared(batch, Dimensions(), copy_min_rows=100).run(Dimensions())
    assert unknown.rows_args is None
    assert unknown.missing(Dimensions()) == sorted(set(keys), key=repr)
    unknown.resolve(dims.positions)
    assert unknown.rows_args is not None
    assert large.valid_for(dims)
    dims.clear()
    assert not large.valid_for(dims)


# -- positions snapshots and sessions ----------------------------------------------------------


def test_fold_positions_keeps_the_newest_snapshot_per_account() -> None:
    old = PositionsSnapshot("ibkr", ("U1", "U2"), (position("A", 1), position("B", 2, "U2")), 100.0)
    new = PositionsSnapshot("ibkr", ("U1",), (position("C", 3),), 200.0)
    stale = PositionsSnapshot("ibkr", ("U1",), (position("A", 9),), 150.0)  # older than new
    empty = PositionsSnapshot("tastytrade", ("5WT1",), (), 50.0)  # everything closed
    dup = PositionsSnapshot("ibkr", ("U3",), (position("D", 1, "U3"), position("D", 4, "U3")), 10.0)

    folded = {(a.broker, a.account): a for a in fold_positions([old, new, stale, empty, dup])}

    assert [p.instrument for p in folded["ibkr", "U1"].positions] == ["C"]
    assert folded["ibkr", "U1"].as_of == 200.0
    assert [p.instrument for p in folded["ibkr", "U2"].positions] == ["B"]
    assert folded["tastytrade", "5WT1"].positions == ()
    assert [p.quantity for p in folded["ibkr", "U3"].positions] == [4]  # the last duplicate counts


def test_fold_sessions_first_start_and_first_end_per_session() -> None:
    s1 = SessionStarted("ibkr", "a", ("U1",), "gw:5000", "simulated", 1.0)
    s1_again = SessionStarted("ibkr", "a", ("U1",), "gw:5000", "simulated", 9.0)
    e1 = SessionEnded("ibkr", "a", 5.0, "closed 1001", 42)
    e1_later = SessionEnded("ibkr", "a", 6.0, "engine_stopped", 0)
    s2 = SessionStarted("tastytrade", "b", (), "dx:443", "live", 2.0)

    starts, ends = fold_sessions([s2, s1, e1, s1_again, e1_later])

    assert starts == [s1, s2]
    assert ends == [e1]


def test_nan_times_are_not_finite() -> None:
    from db.encode import session_ok, snapshot_ok

    assert session_ok(SessionStarted("ibkr", "a", (), "h", "live", 1.0))
    assert not session_ok(SessionStarted("ibkr", "a", (), "h", "live", math.nan))
    assert not session_ok(SessionEnded("ibkr", "a", 1.0, "x", 1.5))  # type: ignore[arg-type]
    assert snapshot_ok(PositionsSnapshot("ibkr", ("U1",), (position("A", 1),), 1.0))
    assert not snapshot_ok(PositionsSnapshot("ibkr", ("U1",), (position("A", math.inf),), 1.0))
    assert not snapshot_ok(PositionsSnapshot("ibkr", ("U1",), (), math.nan))


@given(n=st.integers(min_value=0, max_value=3000), rows=st.integers(min_value=1, max_value=4))
def test_nested_parameters_flatten_back_to_the_rows_and_null_padding(n: int, rows: int) -> None:
    matrix_rows = [[float(r * 10_000 + i) for i in range(n)] for r in range(rows)]
    out = nested(matrix_rows)
    if n < NEST_FROM:
        assert out is matrix_rows  # small: as it was
        assert nested_row(matrix_rows[0]) is matrix_rows[0]
        return
    width = math.isqrt(n - 1) + 1
    assert width * width >= n > (width - 1) * (width - 1)
    for original, row3 in zip(matrix_rows, out, strict=True):
        assert all(len(inner) == width for inner in row3)  # rectangular, as a PostgreSQL array
        flat = [v for inner in row3 for v in inner]
        assert flat[:n] == original  # unnest's order: the rows as they were
        assert flat[n:] == [None] * (len(flat) - n)  # padding only, NULLs
        assert len(flat) - n < width
    assert nested_row(matrix_rows[0]) == [out[0]]
