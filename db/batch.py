"""Pure batching logic for the writer: channel items in, cleaned exactly-once batches out.

Rules: no I/O, no clock, no anyio/asyncpg. Time comes in as arguments (POSIX seconds); batch ids
come in as ``uuid.UUID`` values chosen by the caller.

A :class:`Batch` is the exactly-once unit: the rows of one or more ``rows`` channel items plus the
positions snapshots and stream session events that travelled with them
(:class:`~normalize.events.RowsBatch`), committed in one transaction under one batch id.

Times stay POSIX seconds (floats) all the way to the database: building two ``datetime``
objects per row, and asyncpg encoding them, was more than half of the writer's CPU per row. The
database side rounds them exactly as ``datetime.fromtimestamp`` does (:func:`posix_to_us`). The
encoding for the tables is in :mod:`db.encode`.
"""

from __future__ import annotations

import math
import operator
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import chain
from typing import Any

from normalize.events import PositionsSnapshot, RowsBatch, SessionEvent
from normalize.model import SNAPSHOT_FIELDS, GreeksSnapshot, GreeksSource

_event_ts = operator.attrgetter("event_ts")
_EPOCH_DAY = date(1970, 1, 1)

try:  # the optional C fast paths (db/_speedups.c, built by pip where a C compiler is found)
    from db._speedups import all_finite as _all_finite_c
    from db._speedups import transpose as _transpose_c
except ImportError:  # pragma: no cover - a machine without a C compiler
    _all_finite_c = None  # type: ignore[assignment]
    _transpose_c = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows, positions snapshots and session events committed together, under one id (the
    exactly-once unit). ``pid`` and ``engine_host`` name the engine process that received the
    session events (``stream_sessions.pid``, ``engine_host``), kept when a later run replays it."""

    batch_id: uuid.UUID
    rows: Sequence[GreeksSnapshot]
    positions: tuple[PositionsSnapshot, ...] = ()
    sessions: tuple[SessionEvent, ...] = ()
    pid: int | None = None
    engine_host: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def empty(self) -> bool:
        return not (self.rows or self.positions or self.sessions)


def transpose(rows: Sequence[GreeksSnapshot]) -> list[tuple[Any, ...]]:
    """``rows`` by field: ``transpose(rows)[i]`` holds field ``i`` of every row (one C call).

    With the C fast path (``db/_speedups.c``) a list of rows is copied straight from the row
    tuples (~40 against ~200 ns a row for ``zip``); anything else, and a machine without the
    module, takes ``zip``, which builds the same tuples.
    """
    if not rows:
        return [() for _ in SNAPSHOT_FIELDS]
    if _transpose_c is not None and rows.__class__ is list:
        cols = _transpose_c(rows, len(SNAPSHOT_FIELDS))
        if cols is not None:
            return cols
    return list(zip(*rows, strict=True))


def posix_to_us(ts: float) -> int:
    """POSIX seconds to integer microseconds since 1970, rounded exactly like
    ``datetime.fromtimestamp`` (the fraction alone is scaled, then rounded half to even)."""
    whole = int(ts)
    return whole * 1_000_000 + round((ts - whole) * 1e6)


def utc_day(ts: float) -> date:
    """The UTC calendar day of POSIX time ``ts`` (the history partition it belongs to)."""
    return _EPOCH_DAY + timedelta(days=int(ts // 86400))


def days_between(first_ts: float, last_ts: float) -> set[date] | None:
    """The one UTC day of both times, or None when they fall on different days."""
    first, last = utc_day(first_ts), utc_day(last_ts)
    return {first} if first == last else None


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


Item = RowsBatch | Sequence[GreeksSnapshot]
"""What the writer accepts on ``rows``: a :class:`~normalize.events.RowsBatch` (the normalizer's
items) or a plain sequence of rows (tests, tools)."""


@dataclass(slots=True)
class Pending:
    """What a :class:`BatchBuilder` collected: rows, positions snapshots and session events, in
    arrival order."""

    rows: list[GreeksSnapshot]
    positions: list[PositionsSnapshot]
    sessions: list[SessionEvent]

    def add(self, item: Item) -> None:
        if isinstance(item, RowsBatch):
            self.rows.extend(item.rows)
            self.positions.extend(item.positions)
            self.sessions.extend(item.sessions)
        else:
            self.rows.extend(item)

    @property
    def empty(self) -> bool:
        return not (self.rows or self.positions or self.sessions)


def pending(*items: Item) -> Pending:
    p = Pending([], [], [])
    for item in items:
        p.add(item)
    return p


RATE_WINDOW_S = 0.5  # the arrival rate behind the linger decision is measured over this long
LINGER_FROM_ROWS_S = 10_000.0  # arrival rate from which batches linger (when lingering is on)


class BatchBuilder:
    """Accumulates queued items into one batch.

    The writer starts a batch with the first item it receives, adds whatever is already queued,
    and stops at ``max_rows`` rows (cut after the item that reaches the cap; items are never
    split) or once ``max_delay_s`` has passed since the start, whichever comes first. Idle, a
    batch is one tick; under load it grows to the cap. Positions snapshots and session events
    ride along with the rows of their item.

    Lingering (``linger_s`` > 0): while rows arrive at ``linger_from_rows_s`` or more (measured
    over the last :data:`RATE_WINDOW_S` of batch starts), a batch is taken only once its oldest
    row is ``linger_s`` old (:meth:`linger`: counted from that row's receive time, so a row that
    already waited in the channel that long waits no more), so that under load every commit
    carries more rows: the per-commit work of the client and the server is paid less often.
    Below that rate batches never wait, so a quiet feed keeps its lowest latency.
    """

    __slots__ = (
        "_taken",
        "_window_rows",
        "_window_start",
        "linger_from_rows_s",
        "linger_s",
        "max_delay_s",
        "max_rows",
        "oldest_ts",
        "pending",
        "rate_rows_s",
        "started_at",
    )

    def __init__(
        self,
        max_rows: int,
        max_delay_s: float,
        linger_s: float = 0.0,
        linger_from_rows_s: float = LINGER_FROM_ROWS_S,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.linger_s = min(linger_s, max_delay_s)
        self.linger_from_rows_s = linger_from_rows_s
        self.pending = pending()
        self.started_at = 0.0
        self.oldest_ts = 0.0  # receive time of the batch's first row (the start time without rows)
        self.rate_rows_s = 0.0  # rows taken per second, over the last window
        self._taken = 0
        self._window_start: float | None = None
        self._window_rows = 0

    @property
    def rows(self) -> list[GreeksSnapshot]:
        return self.pending.rows

    def start(self, item: Item, now: float) -> None:
        self.pending = pending(item)
        self.started_at = now
        rows = self.pending.rows
        received = rows[0].received_ts if rows else now
        self.oldest_ts = received if received.__class__ is float and received < now else now
        if self._window_start is None:
            self._window_start, self._window_rows = now, self._taken
        elif now - self._window_start >= RATE_WINDOW_S:
            self.rate_rows_s = (self._taken - self._window_rows) / (now - self._window_start)
            self._window_start, self._window_rows = now, self._taken

    def add(self, item: Item) -> None:
        self.pending.add(item)

    def full(self, now: float) -> bool:
        return len(self.pending.rows) >= self.max_rows or now - self.started_at >= self.max_delay_s

    def linger(self, now: float) -> float:
        """Seconds to wait for more items before taking the batch (0: take it now)."""
        if (
            self.linger_s <= 0
            or self.rate_rows_s < self.linger_from_rows_s
            or len(self.pending.rows) >= self.max_rows
        ):
            return 0.0
        return max(0.0, self.oldest_ts + self.linger_s - now)

    def take(self) -> Pending:
        taken, self.pending = self.pending, pending()
        self._taken += len(taken.rows)
        return taken


# -- non-finite values ------------------------------------------------------------------------
# NaN and infinities are "no value" in the canonical model (None). One slipping through would turn
# every portfolio sum it touches into NaN, so the writer checks each batch before writing.

# The stored ones: pos_* exposures are derived by the views, not stored (non-finite ones pass).
NULLABLE_FLOAT_FIELDS: tuple[str, ...] = (
    "strike", "bid", "ask", "last", "mark", "underlying_price", "iv", "delta", "gamma", "theta",
    "vega", "rho",
)  # fmt: skip
REQUIRED_FLOAT_FIELDS: tuple[str, ...] = ("multiplier", "quantity", "event_ts", "received_ts")
# itemgetter, not attrgetter: a GreeksSnapshot is a tuple (about half the cost per row).
_CHECKED_IDX = tuple(SNAPSHOT_FIELDS.index(f) for f in (*REQUIRED_FLOAT_FIELDS, *NULLABLE_FLOAT_FIELDS))
_SOURCE_IDX = SNAPSHOT_FIELDS.index("greeks_source")
_checked = operator.itemgetter(
    *(SNAPSHOT_FIELDS.index(f) for f in (*REQUIRED_FLOAT_FIELDS, *NULLABLE_FLOAT_FIELDS))
)


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
    rejected: list[GreeksSnapshot]  # no finite time, quantity or multiplier, or an unknown greeks_source
    columns: list[tuple[Any, ...]] | None = None  # transpose(rows), when it was computed


GREEKS_SOURCES = frozenset({None, *(s.value for s in GreeksSource)})


def clean_rows(rows: list[GreeksSnapshot]) -> Cleaned:
    """Replace non-finite optional values by ``None``; set aside rows that cannot be stored (a
    non-finite time, quantity or multiplier; a ``greeks_source`` that is not a
    :class:`~normalize.model.GreeksSource` value or ``None``).

    The fast path is one check of every float value of the batch (finite: nothing to do; NaN,
    an infinity, a value that is not a number, or finite values whose sum overflows in the
    pure-Python check: look row by row), one C pass over the columns with ``db/_speedups.c``,
    one sum without it, and one set of the batch's sources; only a suspect row is looked at
    field by field.
    """
    cols = transpose(rows)
    if _all_finite_c is not None:  # the same decision in one C pass over those columns
        batch_ok = _all_finite_c([cols[i] for i in _CHECKED_IDX])
    else:
        batch_ok = _sum_finite(cols)
    suspects = set() if batch_ok else {i for i, row in enumerate(rows) if not _all_finite(_checked(row))}
    try:
        sources_ok = set(cols[_SOURCE_IDX]) <= GREEKS_SOURCES
    except TypeError:  # an unhashable value
        sources_ok = False
    if not sources_ok:
        suspects.update(i for i, row in enumerate(rows) if not _known_source(row.greeks_source))
    if not suspects:
        return Cleaned(rows, 0, [], cols)
    kept: list[GreeksSnapshot] = []
    rejected: list[GreeksSnapshot] = []
    cleared = 0
    for i, row in enumerate(rows):
        if i not in suspects:
            kept.append(row)
        elif not _known_source(row.greeks_source) or not all(_finite(v) for v in _required(row)):
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


def _sum_finite(cols: Sequence[Sequence[Any]]) -> bool:
    """Every checked value of the batch a finite number (or None): one sum over them all."""
    try:
        return math.isfinite(sum(filter(None, chain.from_iterable(cols[i] for i in _CHECKED_IDX))))
    except (TypeError, OverflowError):  # a value that is not a number, an int no float holds
        return False


def _known_source(value: Any) -> bool:
    try:
        return value in GREEKS_SOURCES
    except TypeError:
        return False


def _finite(value: Any) -> bool:
    """A finite number a float8 column can hold (an int beyond the float range cannot)."""
    try:
        return isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:
        return False


_required = operator.itemgetter(*(SNAPSHOT_FIELDS.index(f) for f in REQUIRED_FLOAT_FIELDS))
