"""Pure batching logic for the writer: rows in, COPY records, latest-state rows and batch facts out.

Rules: no I/O, no clock, no anyio/asyncpg. Time comes in as arguments (POSIX seconds); batch ids
come in as ``uuid.UUID`` values chosen by the caller.

The column order of :data:`HISTORY_COLUMNS` is the column order of ``greeks_history`` (and of the
first columns of ``greeks_latest``): ``batch_id`` first, then the fields of
:class:`~normalize.model.GreeksSnapshot` in declaration order, with ``right`` renamed to
``option_right`` (``RIGHT`` is an SQL keyword).
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterable, Sequence
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

_values = operator.attrgetter(*SNAPSHOT_FIELDS)
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


def to_records(batch: Batch) -> list[Record]:
    """One ``greeks_history`` record per row, in :data:`HISTORY_COLUMNS` order."""
    head = (batch.batch_id,)
    out = []
    for row in batch.rows:
        v = _values(row)
        out.append(
            head + v[:_EVENT] + (to_datetime(v[_EVENT]), to_datetime(v[_RECEIVED])) + v[_RECEIVED + 1 :]
        )
    return out


def latest_records(records: Iterable[Record]) -> list[Record]:
    """The newest record per (broker, account, instrument).

    Newest means the greatest (event_ts, received_ts); on a tie the later record in the batch wins.
    One record per key, as ``INSERT ... ON CONFLICT DO UPDATE`` requires.
    """
    best: dict[tuple[Any, ...], Record] = {}
    for rec in records:
        key = (rec[_KEY_FIELDS[0]], rec[_KEY_FIELDS[1]], rec[_KEY_FIELDS[2]])
        cur = best.get(key)
        if cur is None or (rec[REC_EVENT], rec[REC_RECEIVED]) >= (
            cur[REC_EVENT],
            cur[REC_RECEIVED],
        ):
            best[key] = rec
    return list(best.values())


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
    return {_EPOCH_DAY + timedelta(days=d) for d in {int(r.event_ts // 86400) for r in rows}}


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
