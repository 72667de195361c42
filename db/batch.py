"""Pure batching logic for the writer: rows in, COPY records, latest-state rows and batch facts out.

Rules: no I/O, no clock, no anyio/asyncpg. Time comes in as arguments (POSIX seconds); batch ids
come in as ``uuid.UUID`` values chosen by the caller.

Records keep ``event_ts`` and ``received_ts`` as POSIX seconds (floats): building two ``datetime``
objects per row, and asyncpg encoding them, was more than half of the writer's CPU per row. The
writer's connection encodes POSIX seconds for ``timestamptz`` itself (:func:`db.copy.connect`),
rounding exactly as ``datetime.fromtimestamp`` does (:func:`posix_to_us`).

The column order of :data:`HISTORY_COLUMNS` is the column order of ``greeks_history`` (and of the
first columns of ``greeks_latest``): ``batch_id`` first, then the fields of
:class:`~normalize.model.GreeksSnapshot` in declaration order, with ``right`` renamed to
``option_right`` (``RIGHT`` is an SQL keyword).
"""

from __future__ import annotations

import math
import operator
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from normalize.model import SNAPSHOT_FIELDS, GreeksSnapshot

COLUMN_FOR_FIELD: dict[str, str] = {"right": "option_right"}
HISTORY_COLUMNS: tuple[str, ...] = ("batch_id",) + tuple(
    COLUMN_FOR_FIELD.get(name, name) for name in SNAPSHOT_FIELDS
)
KEY_COLUMNS: tuple[str, ...] = ("broker", "account", "instrument")

_EVENT = SNAPSHOT_FIELDS.index("event_ts")
_RECEIVED = SNAPSHOT_FIELDS.index("received_ts")
assert _RECEIVED == _EVENT + 1, "event_ts and received_ts must stay adjacent in GreeksSnapshot"
# Offsets inside a record (batch_id comes first).
REC_EVENT = _EVENT + 1
REC_RECEIVED = _RECEIVED + 1
_KEY_FIELDS = tuple(SNAPSHOT_FIELDS.index(k) + 1 for k in KEY_COLUMNS)
assert _KEY_FIELDS == tuple(range(_KEY_FIELDS[0], _KEY_FIELDS[0] + 3)), "key fields must be adjacent"
_KEY_SLICE = (_KEY_FIELDS[0], _KEY_FIELDS[-1] + 1)  # rec[slice] is the (broker, account, instrument) key
_TIME_SLICE = (REC_EVENT, REC_RECEIVED + 1)  # rec[slice] is (event_ts, received_ts)

_values = operator.attrgetter(*SNAPSHOT_FIELDS)
_key = operator.attrgetter(*KEY_COLUMNS)
_times = operator.attrgetter("event_ts", "received_ts")
_event_ts = operator.attrgetter("event_ts")
_EPOCH_DAY = date(1970, 1, 1)

Record = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows committed together, under one id (the exactly-once unit)."""

    batch_id: uuid.UUID
    rows: Sequence[GreeksSnapshot]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, slots=True)
class BatchFacts:
    """What ``ingest_batches`` records about a batch."""

    row_count: int
    min_event_ts: datetime | None
    max_event_ts: datetime | None
    min_received_ts: datetime | None
    max_received_ts: datetime | None


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def posix_to_us(ts: float) -> int:
    """POSIX seconds to integer microseconds since 1970, rounded exactly like
    ``datetime.fromtimestamp`` (the fraction alone is scaled, then rounded half to even)."""
    whole = int(ts)
    return whole * 1_000_000 + round((ts - whole) * 1e6)


def to_records(batch: Batch) -> list[Record]:
    """One ``greeks_history`` record per row, in :data:`HISTORY_COLUMNS` order.

    Times stay POSIX seconds (see the module docstring): a record is the batch id followed by the
    row's field values, nothing converted.
    """
    return list(iter_records(batch))


def iter_records(batch: Batch, batch_id: Any = None) -> Iterator[Record]:
    """:func:`to_records`, lazily (all in C: no Python frame per row). Handed to COPY, the
    records are built as they are encoded, while the server digests the chunks already sent.
    ``batch_id`` replaces ``batch.batch_id`` as the records' first value (the same id in a type
    the driver encodes faster)."""
    head = (batch.batch_id if batch_id is None else batch_id,)
    return map(head.__add__, map(_values, batch.rows))


def latest_records(records: Iterable[Record]) -> list[Record]:
    """The newest record per (broker, account, instrument).

    Newest means the greatest (event_ts, received_ts); on a tie the later record in the batch wins.
    One record per key, as ``INSERT ... ON CONFLICT DO UPDATE`` requires.
    """
    best: dict[tuple[Any, ...], Record] = {}
    get = best.get
    k0, k1 = _KEY_SLICE
    t0, t1 = _TIME_SLICE
    for rec in records:
        key = rec[k0:k1]
        cur = get(key)
        if cur is None or rec[t0:t1] >= cur[t0:t1]:
            best[key] = rec
    return list(best.values())


def latest_of(batch: Batch) -> list[Record]:
    """``latest_records(to_records(batch))`` without building a record for every row: the newest
    row per position is picked from the rows, and only those become records.

    Usual case, rows in time order: the last row per position is the newest, and a dict built
    in C finds it (the order check is a C sort of presorted data). Otherwise a compare per row.
    """
    rows = batch.rows
    times = list(map(_times, rows))
    best: dict[tuple[Any, ...], GreeksSnapshot]
    if times == sorted(times):
        best = dict(zip(map(_key, rows), rows, strict=True))
    else:
        best = {}
        newest: dict[tuple[Any, ...], tuple[float, float]] = {}
        get = newest.get
        for key, t, row in zip(map(_key, rows), times, rows, strict=True):
            cur = get(key)
            if cur is None or t >= cur:
                newest[key] = t
                best[key] = row
    head = (batch.batch_id,)
    return [head + v for v in map(_values, best.values())]


def batch_facts(rows: Sequence[GreeksSnapshot]) -> BatchFacts:
    if not rows:
        return BatchFacts(0, None, None, None, None)
    events = [r.event_ts for r in rows]
    received = [r.received_ts for r in rows]
    return BatchFacts(
        len(rows),
        to_datetime(min(events)),
        to_datetime(max(events)),
        to_datetime(min(received)),
        to_datetime(max(received)),
    )


def utc_day(ts: float) -> date:
    """The UTC calendar day of POSIX time ``ts`` (the history partition it belongs to)."""
    return _EPOCH_DAY + timedelta(days=int(ts // 86400))


def days_of(rows: Iterable[GreeksSnapshot]) -> set[date]:
    """Every UTC day the rows' event times fall on."""
    events = list(map(_event_ts, rows))
    if not events:
        return set()
    first, last = int(min(events) // 86400), int(max(events) // 86400)
    if first == last:  # the usual case: one day, found without a set over every row
        return {_EPOCH_DAY + timedelta(days=first)}
    return {_EPOCH_DAY + timedelta(days=d) for d in {int(ts // 86400) for ts in events}}


def partition_days(today: date, ahead: int) -> list[date]:
    """Days whose partitions should exist now: yesterday (late ticks) through ``ahead`` days on."""
    return [today + timedelta(days=i) for i in range(-1, ahead + 1)]


def retention_cutoff(today: date, retention_days: int) -> date:
    """Partitions of days before this date are dropped (``retention_days`` full days are kept)."""
    return today - timedelta(days=retention_days)


class BatchBuilder:
    """Accumulates queued items into one batch.

    The writer never waits to fill a batch: it starts a batch with the first item it receives,
    adds whatever is already queued, and stops at ``max_rows`` rows (cut after the item that
    reaches the cap; items are never split) or once ``max_delay_s`` has passed since the start,
    whichever comes first. Idle, a batch is one tick; under load it grows to the cap.
    """

    __slots__ = ("max_delay_s", "max_rows", "rows", "started_at")

    def __init__(self, max_rows: int, max_delay_s: float) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.rows: list[GreeksSnapshot] = []
        self.started_at = 0.0

    def start(self, item: Sequence[GreeksSnapshot], now: float) -> None:
        self.rows = list(item)
        self.started_at = now

    def add(self, item: Sequence[GreeksSnapshot]) -> None:
        self.rows.extend(item)

    def full(self, now: float) -> bool:
        return len(self.rows) >= self.max_rows or now - self.started_at >= self.max_delay_s

    def take(self) -> list[GreeksSnapshot]:
        rows, self.rows = self.rows, []
        return rows


# -- non-finite values ------------------------------------------------------------------------
# NaN and infinities are "no value" in the canonical model (None). One slipping through would turn
# every portfolio sum it touches into NaN, so the writer checks each batch before writing.

NULLABLE_FLOAT_FIELDS: tuple[str, ...] = (
    "strike", "bid", "ask", "last", "mark", "underlying_price", "iv", "delta", "gamma", "theta",
    "vega", "rho", "pos_delta", "pos_gamma", "pos_theta", "pos_vega",
)  # fmt: skip
REQUIRED_FLOAT_FIELDS: tuple[str, ...] = ("multiplier", "quantity", "event_ts", "received_ts")
_checked = operator.attrgetter(*REQUIRED_FLOAT_FIELDS, *NULLABLE_FLOAT_FIELDS)


def _all_finite(values: tuple[Any, ...]) -> bool:
    try:
        return math.isfinite(math.fsum(filter(None, values)))
    except (OverflowError, ValueError, TypeError):  # inf - inf, overflow, a non-number
        return False


@dataclass(frozen=True, slots=True)
class Cleaned:
    """A batch's rows after :func:`clean_rows`."""

    rows: list[GreeksSnapshot]
    values_cleared: int  # NaN/inf values replaced by None
    rejected: list[GreeksSnapshot]  # rows whose time, quantity or multiplier is not a finite number


def clean_rows(rows: list[GreeksSnapshot]) -> Cleaned:
    """Replace non-finite optional values by ``None``; set aside rows that cannot be stored.

    The fast path is one ``fsum`` per row over its float fields; only a row whose sum is not
    finite (NaN, an infinity, or finite values that overflow) is looked at field by field.
    """
    suspects = {i for i, row in enumerate(rows) if not _all_finite(_checked(row))}
    if not suspects:
        return Cleaned(rows, 0, [])
    kept: list[GreeksSnapshot] = []
    rejected: list[GreeksSnapshot] = []
    cleared = 0
    for i, row in enumerate(rows):
        if i not in suspects:
            kept.append(row)
        elif not all(_finite(v) for v in _required(row)):
            rejected.append(row)
        else:
            bad: dict[str, Any] = {
                name: None
                for name in NULLABLE_FLOAT_FIELDS
                if (v := getattr(row, name)) is not None and not _finite(v)
            }
            cleared += len(bad)
            kept.append(row._replace(**bad))
    return Cleaned(kept, cleared, rejected)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


_required = operator.attrgetter(*REQUIRED_FLOAT_FIELDS)
