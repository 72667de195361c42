"""Pure encoding of batches for the narrow schema (migration 0003): dimension keys and the ids
cache, the parameters of the one-statement write, COPY records, positions snapshots and stream
session events.

Rules: pure. No I/O, no clock, no asyncpg: values in, values out (the SQL is in :mod:`db.copy`).

Per-batch, not per-row, work: every per-row step is one call of ``db/_speedups.c`` (the optional
C fast paths: position ids, newest rows, COPY rows) or a C-level ``map``/``zip`` over the rows (a
``GreeksSnapshot`` is a tuple, so ``itemgetter`` reads its fields), never a Python loop.

The one-statement write takes the rows' float values as one ``float8[]`` parameter of one row per
column: asyncpg checks every element of a one-dimensional array argument against three
``collections.abc`` classes (~140 ns each element), but of a multi-dimensional one only the
elements of its first innermost list, which makes the matrix about four times cheaper to encode
(measured: 48 against 190 ns per element); from :data:`NEST_FROM` rows each column is cut
further into lists of about ``sqrt(n)`` values (:func:`nested`), which leaves about ``2 sqrt(n)``
checks of ``n`` (the sequence numbers too). Times travel as POSIX seconds in that matrix and are
converted by the statement exactly as ``datetime.fromtimestamp`` rounds (see ``db.copy``); the
position id and the Greeks source travel as floats too (small integers, exact).
"""

from __future__ import annotations

import math
import struct
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from itertools import repeat, starmap
from operator import attrgetter, is_, itemgetter
from typing import Any

from db.batch import Batch, transpose
from normalize.events import PositionsSnapshot, SessionEnded, SessionEvent, SessionStarted
from normalize.model import SNAPSHOT_FIELDS, UnifiedPosition

try:  # the optional C fast paths (db/_speedups.c, built by pip where a C compiler is found)
    from db._speedups import copy_rows as _copy_rows
    from db._speedups import newest_indexes as _newest_c
    from db._speedups import position_ids as _position_ids_c
except ImportError:  # pragma: no cover - a machine without a C compiler
    _copy_rows = None  # type: ignore[assignment]
    _newest_c = None  # type: ignore[assignment]
    _position_ids_c = None  # type: ignore[assignment]

# -- dimensions ---------------------------------------------------------------------------------

POSITION_FIELDS: tuple[str, ...] = (
    "broker", "account", "instrument", "underlying", "asset_class", "right", "strike", "expiry", "multiplier",
)  # fmt: skip
assert SNAPSHOT_FIELDS[: len(POSITION_FIELDS)] == POSITION_FIELDS, (
    "GreeksSnapshot must start with the identity"
)

PositionKey = tuple[
    Any, ...
]  # (broker, account, instrument, underlying, asset_class, right, strike, expiry, multiplier)
InstrumentKey = tuple[Any, ...]  # the same without broker and account

row_position_key = itemgetter(*range(len(POSITION_FIELDS)))  # GreeksSnapshot -> PositionKey
unified_position_key = attrgetter(*POSITION_FIELDS)  # UnifiedPosition -> PositionKey


class Dimensions:
    """Position ids known to be committed, by position identity: the writer's cache.

    Add ids only once the transaction that created (or read) them has committed: ids handed out
    by a transaction that rolled back would point at nothing. Clear on reconnect (a restored
    database may have other ids).
    """

    __slots__ = ("generation", "positions")

    def __init__(self) -> None:
        self.positions: dict[PositionKey, int] = {}
        self.generation = 0  # bumped by clear(): encodings prepared before it are stale

    def __len__(self) -> int:
        return len(self.positions)

    def lookup(self, keys: Iterable[PositionKey]) -> list[int | None]:
        return list(map(self.positions.get, keys))

    def lookup_rows(self, rows: Sequence[Any]) -> list[int | None] | None:
        """The ids of the rows' positions (``lookup`` of their keys) without building the keys,
        with ``db/_speedups.c``; None without it (or for rows it does not take)."""
        if _position_ids_c is None or rows.__class__ is not list:
            return None
        return _position_ids_c(rows, len(POSITION_FIELDS), self.positions)

    def missing(self, keys: Iterable[PositionKey]) -> list[PositionKey]:
        """The unknown keys, once each, in one order every engine agrees on (``repr``), so that
        engines creating the same dimension rows at once lock them in the same order."""
        get = self.positions.get
        return sorted({k for k in keys if get(k) is None}, key=repr)

    def add(self, ids: Mapping[PositionKey, int]) -> None:
        self.positions.update(ids)

    def clear(self) -> None:
        self.positions.clear()
        self.generation += 1


def instrument_key(key: PositionKey) -> InstrumentKey:
    return key[2:]


def instrument_params(keys: Sequence[PositionKey]) -> list[list[Any]]:
    """Columns (instrument, underlying, asset_class, option_right, strike, expiry, multiplier)
    of the distinct instruments of ``keys``, in first-seen order."""
    unique = list(dict.fromkeys(map(instrument_key, keys)))
    instrument, underlying, asset_class, right, strike, expiry, multiplier = (
        (list(col) for col in zip(*unique, strict=True)) if unique else ([], [], [], [], [], [], [])
    )
    return [
        list(map(str, instrument)),
        list(map(str, underlying)),
        list(map(str, asset_class)),
        [None if r is None else str(r) for r in right],
        [None if s is None else float(s) for s in strike],
        expiry,
        [float(m) for m in multiplier],
    ]


def instrument_ids(records: Iterable[Sequence[Any]]) -> dict[InstrumentKey, int]:
    """``(instrument_id, instrument, underlying, asset_class, option_right, strike, expiry,
    multiplier)`` records (the resolving statement's output) by instrument key."""
    return {tuple(r[1:8]): int(r[0]) for r in records}


def position_params(keys: Sequence[PositionKey], instruments: Mapping[InstrumentKey, int]) -> list[list[Any]]:
    """Columns (broker, account, instrument_id) of ``keys``."""
    return [
        [str(k[0]) for k in keys],
        [str(k[1]) for k in keys],
        [instruments[instrument_key(k)] for k in keys],
    ]


def position_ids(
    keys: Sequence[PositionKey], instruments: Mapping[InstrumentKey, int], records: Iterable[Sequence[Any]]
) -> dict[PositionKey, int]:
    """Match ``(position_id, broker, account, instrument_id)`` records back to ``keys``."""
    by_ids = {(r[1], r[2], int(r[3])): int(r[0]) for r in records}
    return {k: by_ids[(str(k[0]), str(k[1]), instruments[instrument_key(k)])] for k in keys}


# -- history rows -------------------------------------------------------------------------------
# Functions here take a batch's rows transposed (``db.batch.transpose``: ~0.04 us a row for all 29
# fields with the C fast path, ~0.2 with ``zip``, against ~0.4 us for 17 separate
# ``map(itemgetter)`` passes), shared by every step.

Columns = Sequence[Sequence[Any]]  # transpose(rows)[i]: field i of every row
_IDX = {name: i for i, name in enumerate(SNAPSHOT_FIELDS)}
EVENT_TS = _IDX["event_ts"]
RECEIVED_TS = _IDX["received_ts"]
SEQ = _IDX["seq"]
SOURCE = _IDX["greeks_source"]


def position_keys(cols: Columns) -> list[PositionKey]:
    return list(zip(*cols[: len(POSITION_FIELDS)], strict=True))


# Rows of the ``float8[][]`` parameter of the one-statement write (db.copy), in this order.
MATRIX_FIELDS: tuple[str, ...] = (
    "event_ts", "received_ts", "quantity", "bid", "ask", "last", "mark", "underlying_price",
    "iv", "delta", "gamma", "theta", "vega", "rho",
)  # fmt: skip
MATRIX_ROWS: tuple[str, ...] = ("position_id", *MATRIX_FIELDS, "greeks_source", "newest")
_MATRIX_IDX = tuple(_IDX[name] for name in MATRIX_FIELDS)
SOURCE_CODES: dict[str | None, float] = {"broker": 1.0, "model": 2.0}  # the statement decodes them
SOURCE_CHARS: dict[str | None, bytes] = {"broker": b"b", "model": b"m"}  # greeks_history."char"

# greeks_history's columns, in table order (the COPY column list).
HISTORY_COLUMNS: tuple[str, ...] = (
    "event_ts", "received_ts", "quantity", "bid", "ask", "last", "mark", "underlying_price", "seq",
    "position_id", "iv", "delta", "gamma", "theta", "vega", "rho", "greeks_source",
)  # fmt: skip


def newest_indexes(cols: Columns, position_ids: Sequence[int]) -> list[int]:
    """Index of the newest row of each position: the greatest ``(event_ts, received_ts)``, the
    later row on a tie (``INSERT ... ON CONFLICT`` takes one row per key).

    With ``db/_speedups.c``: one pass keeping each position's greatest and least ``(event_ts,
    received_ts, index)``, then the positions sorted by the least. Without it (or for times that
    are not floats), all in C-level Python: the row indexes sorted by time (a stable sort: on a
    tie the later row stays later), then a dict from position to index built in that order
    keeps each position's last, i.e. newest, row. Both list the positions in the order of their
    oldest row.
    """
    if _newest_c is not None:  # one pass in C; None: a value outside it (a non-float time)
        found = _newest_c(cols[EVENT_TS], cols[RECEIVED_TS], position_ids)
        if found is not None:
            return found
    return newest_indexes_py(cols, position_ids)


def newest_indexes_py(cols: Columns, position_ids: Sequence[int]) -> list[int]:
    """:func:`newest_indexes` in pure Python (the reference its C fast path is tested against)."""
    times = list(zip(cols[EVENT_TS], cols[RECEIVED_TS], strict=True))
    order = sorted(range(len(times)), key=times.__getitem__)
    return list(dict(zip(map(position_ids.__getitem__, order), order, strict=True)).values())


# The fields the statement parameters read (matrix(), seqs()): select() copies only these.
_STATEMENT_IDX = frozenset((*_MATRIX_IDX, SEQ, SOURCE))


def select(cols: Columns, indexes: Sequence[int]) -> list[Sequence[Any]]:
    """The columns of the rows at ``indexes`` (those the statement parameters read; the others
    are left empty)."""
    pick = _picker(indexes)
    return [pick(col) if f in _STATEMENT_IDX else () for f, col in enumerate(cols)]


def _picker(indexes: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function taking the items at ``indexes`` (at least one) of a sequence, as a tuple."""
    if len(indexes) == 1:
        (i,) = indexes
        return lambda seq: (seq[i],)
    return itemgetter(*indexes)


def matrix(cols: Columns, position_ids: Sequence[int], newest: Iterable[int] | None) -> list[list[Any]]:
    """The ``float8[][]`` parameter: one list per :data:`MATRIX_ROWS` entry, one value per row.

    ``newest`` holds the indexes of the rows that update ``greeks_latest`` (1.0 in the last row
    of the matrix, NULL elsewhere); ``None`` flags every row.
    """
    n = len(position_ids)
    if not n:
        return []
    if newest is None:
        flags: list[float | None] = [1.0] * n
    else:
        flags = [None] * n
        for i in newest:
            flags[i] = 1.0
    return [
        list(map(float, position_ids)),
        *(list(cols[i]) for i in _MATRIX_IDX),
        list(map(SOURCE_CODES.get, cols[SOURCE])),
        flags,
    ]


def seqs(cols: Columns) -> list[int | None]:
    return list(cols[SEQ])


NEST_FROM = 64  # rows per array parameter from which it goes three-dimensional (nested)


def nested(rows: Sequence[Sequence[Any]]) -> Sequence[Any]:
    """An array parameter of equal-length rows (the matrix, or ``[seqs]``) as asyncpg encodes it
    cheapest: from :data:`NEST_FROM` values a row, each row cut into lists of ``ceil(sqrt(n))``
    values, the last one padded with NULLs.

    asyncpg checks each value of the first innermost list of an array argument against three
    ``collections.abc`` classes (~0.3 us a value), the other lists only for their length: a flat
    row of ``n`` values costs ``n`` checks, a nested one about ``2 sqrt(n)`` (measured with a
    1,000-row batch: 1.79 against 1.15 ms of client CPU for the matrix and the sequence numbers).
    The statements unnest the arrays flat (``unnest`` takes every element, whatever the
    dimensions) and skip the padding (a NULL ``position_id``).
    """
    if not rows or len(rows[0]) < NEST_FROM:
        return rows
    n = len(rows[0])
    width = math.isqrt(n - 1) + 1
    pad = [None] * (-n % width)
    out = []
    for row in rows:
        flat = [*row, *pad]
        out.append([flat[i : i + width] for i in range(0, len(flat), width)])
    return out


def nested_row(values: Sequence[Any]) -> Sequence[Any]:
    """A one-dimensional array parameter (the sequence numbers) nested as :func:`nested` nests a
    matrix row (unchanged below :data:`NEST_FROM` values)."""
    return values if len(values) < NEST_FROM else nested([values])


@dataclass(frozen=True, slots=True)
class Facts:
    """What ``ingest_batches`` records about a batch (times as POSIX seconds)."""

    row_count: int
    min_event_ts: float | None
    max_event_ts: float | None
    min_received_ts: float | None
    max_received_ts: float | None


def facts(cols: Columns) -> Facts:
    events, received = cols[EVENT_TS], cols[RECEIVED_TS]
    if not events:
        return Facts(0, None, None, None, None)
    return Facts(len(events), min(events), max(events), min(received), max(received))


# -- COPY (binary format) ----------------------------------------------------------------------
# PostgreSQL's binary COPY: a signature, flags and header extension length, then per row an int16
# field count and per field an int32 length (-1: NULL) and the value in network byte order; an
# int16 -1 ends the data. Built here rather than by asyncpg's record encoder, which costs a Python
# call per timestamptz value and a C call per field (about 2.7 against 1 us a row).

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
# Rows per chunk of the COPY stream: the server digests one while the next is built, and the
# writer yields to the write in flight between chunks (~1.3 ms of work each). Every yield is a
# whole round of the event loop, which under load means a round of the brokers and the
# normalizer too: with 250-row chunks a 5,000-row batch waited that many rounds, and the
# writer fell behind at 100,000 ticks/s that it keeps up with at 1,000.
COPY_CHUNK_ROWS = 1000

# (field, struct code, width) in HISTORY_COLUMNS order; None: position_id comes from the caller.
_COPY_LAYOUT: tuple[tuple[str | None, str, int], ...] = (
    ("event_ts", "q", 8), ("received_ts", "q", 8), ("quantity", "d", 8), ("bid", "d", 8),
    ("ask", "d", 8), ("last", "d", 8), ("mark", "d", 8), ("underlying_price", "d", 8), ("seq", "q", 8),
    (None, "i", 4), ("iv", "f", 4), ("delta", "f", 4), ("gamma", "f", 4), ("theta", "f", 4),
    ("vega", "f", 4), ("rho", "f", 4), ("greeks_source", "c", 1),
)  # fmt: skip
assert tuple(name or "position_id" for name, _, _ in _COPY_LAYOUT) == HISTORY_COLUMNS
_COPY_IDX = tuple(None if name is None else _IDX[name] for name, _, _ in _COPY_LAYOUT)
_REQUIRED_COPY = frozenset({"event_ts", "received_ts", "quantity", None})
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in microseconds since 1970
_PG_EPOCH_US_F = float(_PG_EPOCH_US)
_RNE = 6755399441055744.0  # 1.5 * 2**52: adding and subtracting it rounds half to even
_FAST_MAX_S = 9.0e9
_structs: dict[tuple[bool, ...], struct.Struct] = {}

SPEEDUPS = _copy_rows is not None  # with normalize.book.SPEEDUPS: the status's runtime.speedups


def pg_timestamp_us(ts: float) -> int:
    """POSIX seconds to PostgreSQL's timestamptz (microseconds since 2000-01-01 UTC), rounded as
    ``datetime.fromtimestamp`` rounds (the fraction scaled, then half to even)."""
    if ts.__class__ is float and 0.0 <= ts < _FAST_MAX_S:
        frac = ts % 1.0  # every intermediate is an integer below 2**53: exact float arithmetic
        return int((ts - frac) * 1e6 + (((frac * 1e6) + _RNE) - _RNE) - _PG_EPOCH_US_F)
    whole = int(ts)
    return whole * 1_000_000 + round((ts - whole) * 1e6) - _PG_EPOCH_US


def _timestamps(values: Sequence[Any]) -> list[int]:
    """:func:`pg_timestamp_us` of every value, converted once per distinct value when values
    repeat (the rows of a batch share their receive times: one per broker frame)."""
    if len(set(values[:64])) * 2 < min(len(values), 64):  # a sample says: values repeat
        conv = {v: pg_timestamp_us(v) for v in set(values)}
        return list(map(conv.__getitem__, values))
    if not (0.0 <= min(values) and max(values) < _FAST_MAX_S):
        return list(map(pg_timestamp_us, values))
    # pg_timestamp_us's fast path inlined (a comprehension, no call per value): ~240 against 350 ns.
    rne, epoch = _RNE, _PG_EPOCH_US_F
    return [int((v - (f := v % 1.0)) * 1e6 + (((f * 1e6) + rne) - rne) - epoch) for v in values]


def _struct(present: tuple[bool, ...]) -> struct.Struct:
    st = _structs.get(present)
    if st is None:
        fmt = ">h" + "".join(
            f"i{code}" if here else "i" for (_, code, _), here in zip(_COPY_LAYOUT, present, strict=True)
        )
        st = _structs[present] = struct.Struct(fmt)
    return st


def _pack(columns: Sequence[Sequence[Any]], present: tuple[bool, ...], n: int) -> bytes:
    """Rows with one NULL pattern: one precompiled struct per pattern, packed in C (starmap)."""
    args: list[Iterable[Any]] = [repeat(len(_COPY_LAYOUT), n)]
    for (_, _, width), here, col in zip(_COPY_LAYOUT, present, columns, strict=True):
        if here:
            args.append(repeat(width, n))
            args.append(col)
        else:
            args.append(repeat(-1, n))
    return b"".join(starmap(_struct(present).pack, zip(*args, strict=False)))


_WIDE = ((0).to_bytes(2, sys.byteorder), (1).to_bytes(2, sys.byteorder))  # a flag as a 2-byte digit


def copy_chunk(cols: Columns, position_ids: Sequence[int], start: int = 0, end: int | None = None) -> bytes:
    """The binary COPY rows (no signature, no trailer) of rows ``start:end``, in
    :data:`HISTORY_COLUMNS` order.

    With the C fast path (:data:`SPEEDUPS`, ``db/_speedups.c``) the rows are packed in one pass
    in input order; a chunk holding a value outside its fast path (an int where a float is
    expected, a value out of its column's range, a time outside [0, 9e9) s) and a machine
    without the module take :func:`copy_chunk_py`, which writes the same bytes for each row.

    Raises:
        BatchDataError: a value its column cannot hold (a Greek beyond the float4 range, a
            sequence number beyond int8).
    """
    end = len(position_ids) if end is None else min(end, len(position_ids))
    if _copy_rows is not None and end > start:
        columns = [position_ids if i is None else cols[i] for i in _COPY_IDX]
        data = _copy_rows(columns, start, end)
        if data is not None:
            return data
    return copy_chunk_py(cols, position_ids, start, end)


def copy_chunk_py(
    cols: Columns, position_ids: Sequence[int], start: int = 0, end: int | None = None
) -> bytes:
    """:func:`copy_chunk` in pure Python (the reference the C fast path is tested against).

    Rows are grouped by their pattern of NULL fields (columns all NULL or all present in the
    chunk need no grouping; usually a handful of patterns), each group packed by one struct.

    Raises:
        BatchDataError: a value its column cannot hold (a Greek beyond the float4 range, a
            sequence number beyond int8).
    """
    end = len(position_ids) if end is None else min(end, len(position_ids))
    n = end - start
    if n <= 0:
        return b""
    columns: list[Sequence[Any]] = []
    for name, code, _ in _COPY_LAYOUT:
        if name is None:
            columns.append(position_ids[start:end])
        elif code == "c":
            columns.append(list(map(SOURCE_CHARS.get, cols[SOURCE][start:end])))
        elif code == "q" and name != "seq":
            columns.append(_timestamps(cols[_IDX[name]][start:end]))
        else:
            columns.append(cols[_IDX[name]][start:end])
    present = []
    mixed = []
    for i, ((name, _, _), col) in enumerate(zip(_COPY_LAYOUT, columns, strict=True)):
        nulls = 0 if name in _REQUIRED_COPY else col.count(None)
        present.append(nulls == 0)
        if 0 < nulls < n:
            mixed.append(i)
    try:
        if not mixed:
            return _pack(columns, tuple(present), n)
        # One number per row naming its NULL pattern over the mixed columns (bit ``b`` set when
        # mixed column ``b`` is NULL), built a column at a time in C: each column's NULL flags
        # as bytes (one per row) are read as one big integer, shifted into place and summed, so
        # every row's byte of the sum holds its pattern (at most 8 mixed columns: bytes never
        # carry into each other; more than that, a wider digit per row). The rows sorted by it
        # (a C sort) make each pattern a contiguous run of every column.
        width = 1 if len(mixed) <= 8 else 2
        total = 0
        for bit, i in enumerate(mixed):
            flags = bytes(map(is_, columns[i], repeat(None)))
            if width == 2:
                flags = b"".join(map(_WIDE.__getitem__, flags))
            total += int.from_bytes(flags, sys.byteorder) << bit
        packed = total.to_bytes(n * width, sys.byteorder)
        key: Sequence[int] = packed if width == 1 else memoryview(packed).cast("H")
        order = sorted(range(n), key=key.__getitem__)
        pick = itemgetter(*order)
        columns = [pick(col) for col in columns]  # tuples (n > 1: a mixed column needs two rows)
        key = pick(key)
        parts = []
        start = 0
        while start < n:
            pattern = key[start]
            end = bisect_right(key, pattern, start)
            here = list(present)
            for bit, i in enumerate(mixed):
                here[i] = not pattern >> bit & 1
            parts.append(_pack([col[start:end] for col in columns], tuple(here), end - start))
            start = end
        return b"".join(parts)
    except (struct.error, OverflowError, TypeError) as exc:
        raise BatchDataError(f"a history value does not fit its column: {exc}") from exc


def copy_payload(
    cols: Columns, position_ids: Sequence[int], chunk_rows: int = COPY_CHUNK_ROWS
) -> Iterator[bytes]:
    """The whole binary COPY stream of the rows, lazily, in chunks of ``chunk_rows`` rows."""
    yield COPY_SIGNATURE
    for start in range(0, len(position_ids), chunk_rows):
        yield copy_chunk(cols, position_ids, start, start + chunk_rows)
    yield COPY_TRAILER


class BatchDataError(ValueError):
    """A batch that can never be stored as it is (a value out of its column's range): set aside,
    never retried."""


# -- a batch's encoding -------------------------------------------------------------------------


class Prepared:
    """Everything a batch's write sends, computed ahead of it (pure): position ids, the newest
    row of each position, the ledger facts, the statement parameters, and for a large batch the
    latest upsert's parameters and (``eager``) the whole COPY stream.

    The writer prepares the next batch while the previous one is in the database
    (:meth:`steps` yields between chunks so that the write in flight keeps being served);
    :func:`db.copy.write_batch` prepares inline otherwise, streaming the COPY as it builds it.
    Rows whose position id is unknown leave the encoding to :meth:`resolve`, once the write's
    transaction has created the ids. ``cols``: ``transpose(batch.rows)`` if the caller has it.
    """

    __slots__ = (
        "accounts", "batch", "cols", "defer_latest", "facts", "generation", "keys", "large",
        "latest_args", "newest", "payload", "pids", "rows_args",
    )  # fmt: skip

    def __init__(
        self,
        batch: Batch,
        dims: Dimensions,
        copy_min_rows: int,
        cols: Columns | None = None,
        *,
        defer_latest: bool = False,
    ) -> None:
        self.batch = batch
        # True: the write leaves greeks_latest alone and marks the ledger row (latest_pending);
        # the writer applies ``newest`` later (:class:`PendingLatest`).
        self.defer_latest = defer_latest
        self.generation = dims.generation
        # History by COPY: from ``copy_min_rows`` rows, and always when the latest rows are
        # deferred (:func:`db.copy.write_batch` then sends the batch in one round trip).
        self.large = defer_latest or len(batch.rows) >= copy_min_rows
        self.accounts = fold_positions(batch.positions) if batch.positions else []
        self.cols = transpose(batch.rows) if cols is None else cols
        self.facts = facts(self.cols)
        self.keys: list[PositionKey] = []
        self.pids: list[int | None] = []
        self.rows_args: tuple[list[list[Any]], list[int | None]] | None = None
        self.latest_args: tuple[list[list[Any]], list[int | None]] | None = None
        self.payload: list[bytes] | None = None
        self.newest: list[int] = []  # index of each position's newest row (once encoded)

    def valid_for(self, dims: Dimensions) -> bool:
        return self.generation == dims.generation

    def steps(self, dims: Dimensions, *, eager: bool) -> Iterator[None]:
        """Compute the encoding, yielding between its parts (once per COPY chunk)."""
        pids = dims.lookup_rows(self.batch.rows)
        if pids is None or None in pids:  # the keys are needed (to create the unknown ones)
            self.keys = position_keys(self.cols)
            yield
            pids = dims.lookup(self.keys)
        self.pids = pids
        if None not in self.pids:
            yield
            yield from self._encode(eager)

    def run(self, dims: Dimensions, *, eager: bool = False) -> Prepared:
        for _ in self.steps(dims, eager=eager):
            pass
        return self

    def missing(self, dims: Dimensions) -> list[PositionKey]:
        """Unknown positions of the rows and the positions snapshots (empty when all are known)."""
        if None not in self.pids and not self.accounts:
            return []
        return dims.missing([*self.keys, *positions_keys(self.accounts)])

    def resolve(self, ids: Mapping[PositionKey, int]) -> None:
        """Fill in the ids created by the write's transaction, and encode (COPY streamed)."""
        if None in self.pids:
            self.pids = list(map(ids.__getitem__, self.keys))
            for _ in self._encode(eager=False):
                pass

    def _encode(self, eager: bool) -> Iterator[None]:
        cols = self.cols
        pids: list[int] = self.pids  # type: ignore[assignment]  # complete here
        newest = self.newest = newest_indexes(cols, pids)
        upsert = () if self.defer_latest else newest
        if not self.large:
            self.rows_args = (matrix(cols, pids, upsert), seqs(cols))
            return
        if upsert:
            chosen = select(cols, upsert)
            self.latest_args = (matrix(chosen, [pids[i] for i in upsert], None), seqs(chosen))
        else:
            self.latest_args = ([], [])
        if not eager:
            return
        yield
        chunks = [COPY_SIGNATURE]
        for start in range(0, len(pids), COPY_CHUNK_ROWS):
            yield
            chunks.append(copy_chunk(cols, pids, start, start + COPY_CHUNK_ROWS))
        chunks.append(COPY_TRAILER)
        self.payload = chunks


# -- greeks_latest, deferred ----------------------------------------------------------------------


def pending_positions(*pending: PendingLatest) -> int:
    """Positions with a row pending in any of ``pending``."""
    return len({pids[i] for p in pending for _, pids, newest in p.parts for i in newest})


class PendingLatest:
    """The committed batches whose ``greeks_latest`` upsert was deferred
    (:attr:`Prepared.defer_latest`): their ids and the newest row of each of their positions,
    what the next :data:`db.copy.FLUSH_LATEST` applies. Pure: the writer says when (``now``).

    Across batches a row replaces a position's row when it is at least as new (``(event_ts,
    received_ts)``, the later batch on a tie), as the upsert itself decides. Per batch only
    references are kept (the batch's columns and its newest indexes); the merge runs once per
    flush, in C (a stable sort and a dict), not per row in Python.
    """

    __slots__ = ("batch_ids", "parts", "since")

    def __init__(self) -> None:
        self.parts: list[tuple[Columns, Sequence[int], list[int]]] = []  # (cols, pids, newest)
        self.batch_ids: list[Any] = []
        self.since: float | None = None  # when the oldest pending batch was committed

    def __bool__(self) -> bool:
        return bool(self.batch_ids)

    def __len__(self) -> int:
        """Positions with a pending row."""
        return pending_positions(self)

    def add(self, prepared: Prepared, now: float) -> None:
        """Take a committed deferred batch."""
        if not self.batch_ids:
            self.since = now
        self.batch_ids.append(prepared.batch.batch_id)
        self.parts.append((prepared.cols, prepared.pids, prepared.newest))  # type: ignore[arg-type]

    def requeue(self, earlier: PendingLatest) -> None:
        """Put back ``earlier``'s batches (taken for a flush that failed) ahead of the ones
        pending now: the next flush carries both, a newer row still winning."""
        if not earlier:
            return
        self.parts[:0] = earlier.parts
        self.batch_ids[:0] = earlier.batch_ids
        self.since = earlier.since if self.since is None else min(self.since, earlier.since or self.since)

    def due(self, now: float, interval_s: float) -> bool:
        return self.since is not None and now - self.since >= interval_s

    def wait_s(self, now: float, interval_s: float) -> float | None:
        """Seconds until :meth:`due` (None: nothing pending)."""
        return None if self.since is None else max(0.0, self.since + interval_s - now)

    def params(self) -> tuple[list[list[Any]], list[int | None], list[Any]]:
        """:data:`db.copy.FLUSH_LATEST`'s parameters: the matrix (its last row: the 1-based index
        of each row's batch), the sequence numbers, the batch ids."""
        # The candidates, every batch's newest rows in commit order, by their times and position
        # ids only; the newest of those per position as within one batch (newest_indexes: a tie
        # to the later, i.e. the later batch); then the fields the statement reads of the chosen
        # rows only, batch by batch (a flush chooses about one candidate in five at 50,000
        # ticks/s: copying every field of every candidate cost 3.6 against 1.2 ms a flush).
        event_ts: list[Any] = []
        received_ts: list[Any] = []
        pids: list[int] = []
        part_of: list[int] = []
        index: list[int] = []
        for b, (part_cols, part_pids, newest) in enumerate(self.parts):
            if not newest:
                continue
            pick = _picker(newest)
            event_ts.extend(pick(part_cols[EVENT_TS]))
            received_ts.extend(pick(part_cols[RECEIVED_TS]))
            pids.extend(pick(part_pids))
            part_of.extend(repeat(b, len(newest)))
            index.extend(newest)
        if not pids:
            return [], [], list(self.batch_ids)
        times: list[Sequence[Any]] = [()] * len(SNAPSHOT_FIELDS)
        times[EVENT_TS], times[RECEIVED_TS] = event_ts, received_ts
        by_part: dict[int, list[int]] = {}
        for c in newest_indexes(times, pids):
            rows = by_part.get(part_of[c])
            if rows is None:
                by_part[part_of[c]] = [index[c]]
            else:
                rows.append(index[c])
        cols: list[list[Any]] = [[] for _ in SNAPSHOT_FIELDS]
        chosen_pids: list[int] = []
        batches: list[float] = []
        for b in sorted(by_part):
            rows = by_part[b]
            part_cols, part_pids, _ = self.parts[b]
            pick = _picker(rows)
            for f in _STATEMENT_IDX:
                cols[f].extend(pick(part_cols[f]))
            chosen_pids.extend(pick(part_pids))
            batches.extend(repeat(float(b + 1), len(rows)))
        m = matrix(cols, chosen_pids, None)
        m[-1] = batches
        return m, seqs(cols), list(self.batch_ids)

    def clear(self) -> None:
        self.parts.clear()
        self.batch_ids.clear()
        self.since = None


# -- positions snapshots ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountPositions:
    """One account's positions as of one snapshot."""

    broker: str
    account: str
    as_of: float
    positions: tuple[UnifiedPosition, ...]


def fold_positions(snapshots: Iterable[PositionsSnapshot]) -> list[AccountPositions]:
    """Per (broker, account), the newest snapshot's positions (a tie goes to the later one).

    An account a snapshot names but holds nothing in gets an empty list (everything closed); a
    position naming an account the snapshot does not list adds that account. Duplicate positions
    (same identity) within one snapshot: the last one counts.
    """
    best: dict[tuple[str, str], AccountPositions] = {}
    for snap in snapshots:
        held: dict[tuple[str, str], dict[PositionKey, UnifiedPosition]] = {
            (snap.broker, account): {} for account in snap.accounts
        }
        for p in snap.positions:
            held.setdefault((p.broker, p.account), {})[unified_position_key(p)] = p
        for (broker, account), positions in held.items():
            cur = best.get((broker, account))
            if cur is None or snap.as_of >= cur.as_of:
                best[broker, account] = AccountPositions(
                    broker, account, snap.as_of, tuple(positions.values())
                )
    return [best[k] for k in sorted(best)]


def positions_keys(accounts: Iterable[AccountPositions]) -> list[PositionKey]:
    return [unified_position_key(p) for a in accounts for p in a.positions]


def positions_params(accounts: Sequence[AccountPositions], ids: Mapping[PositionKey, int]) -> list[list[Any]]:
    """Parameters of the positions statement: accounts (broker, account, as_of), then the held
    positions (broker, account, position_id, instrument, underlying, asset_class, option_right,
    strike, expiry, multiplier, quantity, avg_cost)."""
    held = [p for a in accounts for p in a.positions]
    return [
        [a.broker for a in accounts],
        [a.account for a in accounts],
        [a.as_of for a in accounts],
        [str(p.broker) for p in held],
        [str(p.account) for p in held],
        [ids[unified_position_key(p)] for p in held],
        [str(p.instrument) for p in held],
        [str(p.underlying) for p in held],
        [str(p.asset_class) for p in held],
        [None if p.right is None else str(p.right) for p in held],
        [p.strike for p in held],
        [p.expiry for p in held],
        [p.multiplier for p in held],
        [p.quantity for p in held],
        [p.avg_cost for p in held],
    ]


# -- stream sessions ----------------------------------------------------------------------------


def fold_sessions(events: Iterable[SessionEvent]) -> tuple[list[SessionStarted], list[SessionEnded]]:
    """One start and one end per session id (the first of each: a session starts once, and the
    first close wins), in session id order."""
    starts: dict[str, SessionStarted] = {}
    ends: dict[str, SessionEnded] = {}
    for event in events:
        if isinstance(event, SessionStarted):
            starts.setdefault(event.session_id, event)
        elif isinstance(event, SessionEnded):
            ends.setdefault(event.session_id, event)
    return [starts[k] for k in sorted(starts)], [ends[k] for k in sorted(ends)]


def accounts_text(accounts: Sequence[str]) -> str | None:
    """``stream_sessions.account``: the accounts, comma-separated (NULL for none)."""
    return ",".join(accounts) or None


def session_start_params(starts: Sequence[SessionStarted], batch: Batch) -> list[list[Any]]:
    return [
        [s.session_id for s in starts],
        [s.broker for s in starts],
        [accounts_text(s.accounts) for s in starts],
        [s.host for s in starts],
        [batch.engine_host] * len(starts),
        [batch.pid] * len(starts),
        [s.mode for s in starts],
        [s.started_at for s in starts],
    ]


def session_end_params(ends: Sequence[SessionEnded], batch: Batch) -> list[list[Any]]:
    return [
        [e.session_id for e in ends],
        [e.broker for e in ends],
        [batch.engine_host] * len(ends),
        [batch.pid] * len(ends),
        [e.ended_at for e in ends],
        [e.reason for e in ends],
        [int(e.events) for e in ends],
    ]


# -- checks -------------------------------------------------------------------------------------

FLOAT4_MAX = 3.4028234663852886e38


def _finite(value: Any) -> bool:
    """A finite number a float8 column can hold (an int beyond the float range cannot)."""
    try:
        return isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:
        return False


def position_ok(p: UnifiedPosition) -> bool:
    """A position that can be stored: finite quantity and multiplier, a text identity."""
    return (
        _finite(p.quantity)
        and _finite(p.multiplier)
        and all(isinstance(v, str) for v in (p.broker, p.account, p.instrument, p.underlying, p.asset_class))
        and (p.right is None or isinstance(p.right, str))
        and (p.strike is None or _finite(p.strike))
        and (p.expiry is None or isinstance(p.expiry, date))
        and (p.avg_cost is None or _finite(p.avg_cost))
    )


def snapshot_ok(snap: PositionsSnapshot) -> bool:
    return (
        _finite(snap.as_of)
        and all(isinstance(a, str) for a in snap.accounts)
        and all(map(position_ok, snap.positions))
    )


def session_ok(event: SessionEvent) -> bool:
    if isinstance(event, SessionStarted):
        return _finite(event.started_at) and isinstance(event.session_id, str)
    if isinstance(event, SessionEnded):
        return _finite(event.ended_at) and isinstance(event.session_id, str) and isinstance(event.events, int)
    return False
