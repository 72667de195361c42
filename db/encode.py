"""Pure encoding of batches for the narrow schema (migration 0003): dimension keys and the ids
cache, the parameters of the one-statement write, COPY records, positions snapshots and stream
session events.

Rules: pure. No I/O, no clock, no asyncpg: values in, values out (the SQL is in :mod:`db.copy`).

Per-batch, not per-row, work: every per-row step is a C-level ``map``/``zip`` over the rows (a
``GreeksSnapshot`` is a tuple, so ``itemgetter`` reads its fields), never a Python loop, except
where rows are out of time order (:func:`newest_indexes`).

The one-statement write takes the rows' float values as one two-dimensional ``float8[][]``
parameter (one inner list per column): asyncpg checks every element of a one-dimensional array
argument against three ``collections.abc`` classes (~140 ns each element), but only the first
inner list of a two-dimensional one, which makes the matrix about four times cheaper to encode
(measured: 48 against 190 ns per element). Times travel as POSIX seconds in that matrix and are
converted by the statement exactly as ``datetime.fromtimestamp`` rounds (see ``db.copy``); the
position id and the Greeks source travel as floats too (small integers, exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from operator import attrgetter, itemgetter
from typing import Any

from db.batch import Batch
from normalize.events import PositionsSnapshot, SessionEnded, SessionEvent, SessionStarted
from normalize.model import SNAPSHOT_FIELDS, GreeksSnapshot, UnifiedPosition

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

    __slots__ = ("positions",)

    def __init__(self) -> None:
        self.positions: dict[PositionKey, int] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def lookup(self, keys: Iterable[PositionKey]) -> list[int | None]:
        return list(map(self.positions.get, keys))

    def missing(self, keys: Iterable[PositionKey]) -> list[PositionKey]:
        """The unknown keys, once each, in one order every engine agrees on (``repr``), so that
        engines creating the same dimension rows at once lock them in the same order."""
        get = self.positions.get
        return sorted({k for k in keys if get(k) is None}, key=repr)

    def add(self, ids: Mapping[PositionKey, int]) -> None:
        self.positions.update(ids)

    def clear(self) -> None:
        self.positions.clear()


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

_FIELD = {name: itemgetter(i) for i, name in enumerate(SNAPSHOT_FIELDS)}
_event_ts = _FIELD["event_ts"]
_received_ts = _FIELD["received_ts"]
_seq = _FIELD["seq"]
_source = _FIELD["greeks_source"]

# Rows of the ``float8[][]`` parameter of the one-statement write (db.copy), in this order.
MATRIX_FIELDS: tuple[str, ...] = (
    "event_ts", "received_ts", "quantity", "bid", "ask", "last", "mark", "underlying_price",
    "iv", "delta", "gamma", "theta", "vega", "rho",
)  # fmt: skip
MATRIX_ROWS: tuple[str, ...] = ("position_id", *MATRIX_FIELDS, "greeks_source", "newest")
_MATRIX_GETTERS = tuple(_FIELD[name] for name in MATRIX_FIELDS)
SOURCE_CODES: dict[str | None, float] = {"broker": 1.0, "model": 2.0}  # the statement decodes them
SOURCE_CHARS: dict[str | None, bytes] = {"broker": b"b", "model": b"m"}  # greeks_history."char"

# greeks_history's columns, in table order (the COPY column list).
HISTORY_COLUMNS: tuple[str, ...] = (
    "event_ts", "received_ts", "quantity", "bid", "ask", "last", "mark", "underlying_price", "seq",
    "position_id", "iv", "delta", "gamma", "theta", "vega", "rho", "greeks_source",
)  # fmt: skip


def newest_indexes(rows: Sequence[GreeksSnapshot], position_ids: Sequence[int]) -> list[int]:
    """Index of the newest row of each position: the greatest ``(event_ts, received_ts)``, the
    later row on a tie (``INSERT ... ON CONFLICT`` takes one row per key).

    Rows in time order (the usual case) need no comparison: the last row of each position is
    the newest, found by a dict built in C (the order check is a C sort of presorted data).
    """
    times = list(zip(map(_event_ts, rows), map(_received_ts, rows), strict=True))
    if times == sorted(times):
        return list(dict(zip(position_ids, range(len(rows)), strict=True)).values())
    newest: dict[int, tuple[float, float]] = {}
    best: dict[int, int] = {}
    get = newest.get
    for i, (pid, t) in enumerate(zip(position_ids, times, strict=True)):
        cur = get(pid)
        if cur is None or t >= cur:
            newest[pid] = t
            best[pid] = i
    return list(best.values())


def matrix(
    rows: Sequence[GreeksSnapshot], position_ids: Sequence[int], newest: Iterable[int] | None
) -> list[list[Any]]:
    """The ``float8[][]`` parameter: one list per :data:`MATRIX_ROWS` entry, one value per row.

    ``newest`` holds the indexes of the rows that update ``greeks_latest`` (1.0 in the last row
    of the matrix, NULL elsewhere); ``None`` flags every row.
    """
    if not rows:
        return []
    n = len(rows)
    if newest is None:
        flags: list[float | None] = [1.0] * n
    else:
        flags = [None] * n
        for i in newest:
            flags[i] = 1.0
    return [
        list(map(float, position_ids)),
        *(list(map(get, rows)) for get in _MATRIX_GETTERS),
        list(map(SOURCE_CODES.get, map(_source, rows))),
        flags,
    ]


def seqs(rows: Sequence[GreeksSnapshot]) -> list[int | None]:
    return list(map(_seq, rows))


@dataclass(frozen=True, slots=True)
class Facts:
    """What ``ingest_batches`` records about a batch (times as POSIX seconds)."""

    row_count: int
    min_event_ts: float | None
    max_event_ts: float | None
    min_received_ts: float | None
    max_received_ts: float | None


def facts(rows: Sequence[GreeksSnapshot]) -> Facts:
    if not rows:
        return Facts(0, None, None, None, None)
    events = list(map(_event_ts, rows))
    received = list(map(_received_ts, rows))
    return Facts(len(rows), min(events), max(events), min(received), max(received))


def copy_records(rows: Sequence[GreeksSnapshot], position_ids: Iterable[int]) -> Iterator[tuple[Any, ...]]:
    """``greeks_history`` records in :data:`HISTORY_COLUMNS` order, built lazily (in C) while
    COPY encodes them. Times stay POSIX seconds (the writer connection's ``timestamptz`` codec)."""
    f = _FIELD
    return zip(
        map(f["event_ts"], rows),
        map(f["received_ts"], rows),
        map(f["quantity"], rows),
        map(f["bid"], rows),
        map(f["ask"], rows),
        map(f["last"], rows),
        map(f["mark"], rows),
        map(f["underlying_price"], rows),
        map(f["seq"], rows),
        position_ids,
        map(f["iv"], rows),
        map(f["delta"], rows),
        map(f["gamma"], rows),
        map(f["theta"], rows),
        map(f["vega"], rows),
        map(f["rho"], rows),
        map(SOURCE_CHARS.get, map(_source, rows)),
        strict=False,  # iterators of one length; strict would cost a check per row
    )


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
    return isinstance(value, int | float) and math.isfinite(value)


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
