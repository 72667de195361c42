"""Tastytrade -> broker-neutral events: positions from the SDK, DXLink events from the codec.

Rules: pure. No I/O, no clock: the receive time is passed in. Nothing here raises on bad broker
data; an unusable row is skipped and reported.

Positions (SDK ``CurrentPosition`` rows, any object with the same attributes):

- ``quantity`` is unsigned; ``quantity-direction`` gives the sign (``Long`` +, ``Short`` -,
  ``Zero`` = closed, left out). ``multiplier`` as sent (100 for equity options, 1 for stock);
  ``average-open-price`` per share is ``avg_cost``.
- ``Equity Option`` rows carry the OCC symbol, which is the canonical key
  (:mod:`normalize.symbology`); ``Equity`` rows the ticker. Futures, futures options and crypto
  are reported as skipped (this version streams equity and index options and stock).

Streaming (:func:`subscription_plan`): Greeks and Quote for every option position, Quote and
Trade for every underlying (the underlying's key is its ticker, e.g. ``SPX`` for ``SPXW``
options), subscribed whether or not it is held, so the normalizer has underlying prices. The
streamer symbol of an option is the API's (``/instruments/equity-options``) when known, else
:func:`normalize.symbology.occ_to_streamer`.

DXLink events (:func:`map_feed`) in canonical units (``normalize/events.py``):

- Greeks: ``price`` -> ``mark``, ``volatility`` (already a fraction) -> ``iv``, ``delta``,
  ``gamma``, ``theta`` (per day), ``vega`` (per volatility point), ``rho``. Tastytrade does not
  document the Greeks' units; the published samples fit per day and per point
  (reference/dxlink.md §3), which are the canonical units, so no scaling is applied.
- Quote: ``bidPrice`` -> ``bid``, ``askPrice`` -> ``ask``. Trade: ``price`` -> ``last``.
- ``"NaN"``/``"Infinity"`` (``None`` from the codec) is an explicit no-value and clears the
  field; a field the channel does not carry at all is left out (unchanged).
- Event time: the event's ``eventTime`` when non-zero, else its ``time`` (Quote: the later of
  ``bidTime``/``askTime``), else the receive time; milliseconds -> POSIX seconds.
- ``sequence`` -> ``seq`` (the simulator numbers every update it sends per contract).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

from actors.tastytrade.protocol import EVENT_FIELDS
from normalize.events import InstrumentUpdate, PositionsSnapshot
from normalize.model import AssetClass, Right, UnifiedPosition
from normalize.steps import finish
from normalize.symbology import occ_symbol, occ_to_streamer, parse_occ

if TYPE_CHECKING:
    from actors.tastytrade.protocol import FeedData, Subscription

BROKER = "tastytrade"
_MAX_MS = 10**13  # event times past year 2286 are not times
_MAX_SEQ = (1 << 63) - 1
_new_update = tuple.__new__  # InstrumentUpdate from a tuple, without the NamedTuple's Python __new__

try:  # the optional C fast path of map_feed (normalize/_speedups.c)
    from normalize._speedups import map_events as _map_events
except ImportError:  # pragma: no cover - a machine without a C compiler
    _map_events = None  # type: ignore[assignment]

#: DXLink field -> canonical update field, per event type
VALUE_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "Greeks": (
        ("price", "mark"),
        ("volatility", "iv"),
        ("delta", "delta"),
        ("gamma", "gamma"),
        ("theta", "theta"),
        ("vega", "vega"),
        ("rho", "rho"),
    ),
    "Quote": (("bidPrice", "bid"), ("askPrice", "ask")),
    "Trade": (("price", "last"),),
}
#: the event's own time fields, most specific first (after eventTime)
_TIME_FIELDS: dict[str, tuple[str, ...]] = {
    "Greeks": ("time",),
    "Quote": ("bidTime", "askTime"),
    "Trade": ("time",),
}
OPTION_TYPES: tuple[str, ...] = ("Greeks", "Quote")
UNDERLYING_TYPES: tuple[str, ...] = ("Quote", "Trade")


# --------------------------------------------------------------------------- positions


class PositionRow(Protocol):
    """What the mapper reads of a position (the SDK's ``CurrentPosition`` has all of it)."""

    @property
    def account_number(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def instrument_type(self) -> str: ...
    @property
    def underlying_symbol(self) -> str: ...
    @property
    def quantity(self) -> Decimal | float: ...
    @property
    def quantity_direction(self) -> str: ...
    @property
    def multiplier(self) -> Decimal | float: ...
    @property
    def average_open_price(self) -> Decimal | float | None: ...


@dataclass(frozen=True, slots=True)
class MappedPositions:
    positions: tuple[UnifiedPosition, ...]
    closed: int  # rows with quantity-direction Zero (left out)
    skipped: tuple[str, ...]  # "account symbol: reason" for rows this version cannot stream


def _text(value: object) -> str:
    """An enum's value or a string (InstrumentType is a StrEnum in the SDK)."""
    raw = getattr(value, "value", value)
    return raw if isinstance(raw, str) else str(raw)


def _float(value: Decimal | float | None) -> float | None:
    if value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if result == result and abs(result) != float("inf") else None


def map_position(row: PositionRow) -> UnifiedPosition | str | None:
    """One SDK position as a :class:`UnifiedPosition`; ``None`` when closed (direction Zero);
    a reason string when this version cannot stream it."""
    direction = _text(row.quantity_direction)
    quantity = _float(row.quantity)
    if quantity is None:
        return "quantity is not a number"
    if direction == "Zero" or quantity == 0:
        return None
    if direction not in ("Long", "Short"):
        return f"unknown quantity-direction {direction!r}"
    signed = -abs(quantity) if direction == "Short" else abs(quantity)
    multiplier = _float(row.multiplier)
    kind = _text(row.instrument_type)
    account, symbol = str(row.account_number), str(row.symbol)
    avg = _float(row.average_open_price)
    if kind == "Equity Option":
        try:
            occ = parse_occ(symbol)
        except ValueError:
            return f"option symbol {symbol!r} is not an OCC symbol"
        key = occ_symbol(occ.root, occ.expiry, occ.right, occ.strike)
        return UnifiedPosition(
            broker=BROKER,
            account=account,
            instrument=key,
            underlying=str(row.underlying_symbol) or occ.root,
            asset_class=AssetClass.OPTION,
            right=Right(occ.right),
            strike=occ.strike,
            expiry=occ.expiry,
            multiplier=multiplier if multiplier else 100.0,
            quantity=signed,
            avg_cost=avg,
        )
    if kind == "Equity":
        ticker = symbol.strip()
        if not ticker:
            return "empty equity symbol"
        return UnifiedPosition(
            broker=BROKER,
            account=account,
            instrument=ticker,
            underlying=ticker,
            asset_class=AssetClass.STOCK,
            right=None,
            strike=None,
            expiry=None,
            multiplier=multiplier if multiplier else 1.0,
            quantity=signed,
            avg_cost=avg,
        )
    return f"instrument type {kind!r} is not streamed by this version"


def map_positions(rows: Iterable[PositionRow]) -> MappedPositions:
    """SDK positions -> canonical positions (closed rows left out, unsupported ones reported)."""
    return finish(map_positions_steps(rows, step=0))


def map_positions_steps(
    rows: Iterable[PositionRow], *, step: int = 500
) -> Generator[None, None, MappedPositions]:
    """:func:`map_positions`, yielding after every ``step`` rows (0: never), its result the
    generator's return value: a caller with an event loop lets other work run in between. The
    same rows give the same result, whatever the step."""
    positions: list[UnifiedPosition] = []
    skipped: list[str] = []
    closed = 0
    for n, row in enumerate(rows, 1):
        if step and not n % step:
            yield
        result = map_position(row)
        if result is None:
            closed += 1
        elif isinstance(result, str):
            skipped.append(f"{row.account_number} {row.symbol}: {result}")
        else:
            positions.append(result)
    return MappedPositions(tuple(positions), closed, tuple(skipped))


def positions_snapshot(
    accounts: Sequence[str], positions: Iterable[UnifiedPosition], as_of: float
) -> PositionsSnapshot:
    """The complete positions of ``accounts`` (an account without positions is still named)."""
    return PositionsSnapshot(BROKER, tuple(accounts), tuple(positions), as_of)


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    """What to subscribe for a set of positions, and how to read the symbols back."""

    items: frozenset[Subscription]
    keys: dict[str, str]  # streamer symbol -> canonical key

    def diff(self, new: SubscriptionPlan) -> tuple[list[Subscription], list[Subscription]]:
        """``(add, remove)`` turning this plan's subscriptions into ``new``'s (sorted)."""
        return sorted(new.items - self.items), sorted(self.items - new.items)


def option_streamer_symbol(key: str, known: Mapping[str, str]) -> str:
    """The API's streamer symbol for an option key when known, else the symbology's."""
    return known.get(key) or occ_to_streamer(key)


def subscription_plan(
    positions: Iterable[UnifiedPosition], streamer_symbols: Mapping[str, str] | None = None
) -> SubscriptionPlan:
    """Greeks + Quote per option, Quote + Trade per underlying and per stock.

    ``streamer_symbols`` maps canonical keys to the API's streamer symbols (options: from
    ``/instruments/equity-options``); missing ones are derived from the key.
    """
    known = streamer_symbols or {}
    items: set[Subscription] = set()
    keys: dict[str, str] = {}
    for pos in positions:
        if pos.asset_class is AssetClass.OPTION:
            symbol = option_streamer_symbol(pos.instrument, known)
            keys[symbol] = pos.instrument
            items.update((t, symbol) for t in OPTION_TYPES)
            underlying = pos.underlying
        else:
            underlying = pos.instrument
        if underlying:
            u_symbol = known.get(underlying) or underlying
            keys[u_symbol] = underlying
            items.update((t, u_symbol) for t in UNDERLYING_TYPES)
    return SubscriptionPlan(frozenset(items), keys)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class _Plan:
    values: Callable[[Sequence[Any]], dict[str, Any]]  # event tuple -> the update's values
    event_time: int | None  # tuple index of eventTime, if carried
    times: tuple[int, ...]  # tuple indexes of the event's own time fields that are carried
    seq: int | None
    value_columns: tuple[int, ...]  # what ``values`` reads, for the C fast path
    value_keys: tuple[str, ...]


def _values_of(pairs: list[tuple[int, str]]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """A function building an update's values from an event tuple. For the usual shapes (every
    value field of the type carried) a dict display, three times faster than ``dict(zip(...))``."""
    keys = tuple(key for _, key in pairs)
    idx = [i for i, _ in pairs]
    if keys == ("mark", "iv", "delta", "gamma", "theta", "vega", "rho"):
        a, b, c, d, e, f, g = idx
        return lambda ev: {
            "mark": ev[a], "iv": ev[b], "delta": ev[c], "gamma": ev[d], "theta": ev[e], "vega": ev[f],
            "rho": ev[g],
        }  # fmt: skip
    if keys == ("bid", "ask"):
        a, b = idx
        return lambda ev: {"bid": ev[a], "ask": ev[b]}
    if keys == ("last",):
        (a,) = idx
        return lambda ev: {"last": ev[a]}
    getter = itemgetter(*idx, idx[0]) if len(idx) == 1 else itemgetter(*idx)  # always a tuple
    return lambda ev: dict(zip(keys, getter(ev), strict=False))


@lru_cache(maxsize=64)
def _plan(event_type: str, fields: frozenset[str]) -> _Plan | None:
    names = EVENT_FIELDS.get(event_type)
    pairs = VALUE_FIELDS.get(event_type)
    if names is None or pairs is None:
        return None
    index = {name: i for i, name in enumerate(names)}
    carried = [(index[wire], key) for wire, key in pairs if wire in fields]
    if not carried:
        return None
    return _Plan(
        values=_values_of(carried),
        event_time=index["eventTime"] if "eventTime" in fields else None,
        times=tuple(index[f] for f in _TIME_FIELDS[event_type] if f in fields),
        seq=index["sequence"] if "sequence" in fields else None,
        value_columns=tuple(i for i, _ in carried),
        value_keys=tuple(key for _, key in carried),
    )


def _seconds(ms: object) -> float | None:
    if (ms.__class__ is int or ms.__class__ is float) and 0 < ms < _MAX_MS:
        return ms / 1000.0
    return None


def _seq(value: object) -> int | None:
    if value.__class__ is int:
        return value if 0 <= value <= _MAX_SEQ else None
    if value.__class__ is float and value == value and 0 <= value <= _MAX_SEQ:
        as_int = int(value)
        return as_int if as_int == value else None
    return None


def _event_time(ev: Sequence[Any], plan: _Plan, received_ts: float) -> float:
    """eventTime when non-zero, else the latest of the event's own times, else the receive time."""
    ts = _seconds(ev[plan.event_time]) if plan.event_time is not None else None
    if ts is None:
        for i in plan.times:
            t = _seconds(ev[i])
            if t is not None and (ts is None or t > ts):
                ts = t
    return received_ts if ts is None else ts


def map_feed(
    data: FeedData,
    symbols: Mapping[str, str],
    received_ts: float,
    append: Callable[[InstrumentUpdate], object],
) -> int:
    """Pass one :class:`InstrumentUpdate` per event of ``data`` whose symbol is in ``symbols``
    (streamer symbol -> key) to ``append`` (a batch's ``list.append``); returns how many events
    had a symbol not in it.

    The hot path: per event one dict lookup, one dict display for the values and a tuple;
    the common shapes (Greeks with ``time``, Quote with ``bidTime``/``askTime``, an int
    ``sequence``) are checked inline, anything else goes through the helpers above."""
    plan = _plan(data.event_type, data.fields)
    if plan is None:
        return 0
    times = plan.times
    if _map_events is not None and 1 <= len(times) <= 2:  # the C fast path: every event, or None
        unknown_fast = _map_events(
            InstrumentUpdate, BROKER, data.events, symbols, received_ts, times[0],
            times[1] if len(times) == 2 else -1, -1 if plan.event_time is None else plan.event_time,
            -1 if plan.seq is None else plan.seq, plan.value_columns, plan.value_keys, append,
        )  # fmt: skip
        if unknown_fast is not None:
            return unknown_fast
    values = plan.values
    seq_i = plan.seq
    # the usual cases: no eventTime (or 0) and one own time field (Greeks ``time``, Trade) or
    # two (Quote ``bidTime``/``askTime``: the later one), whole milliseconds in range
    single = times[0] if len(times) == 1 else None
    first, second = times if len(times) == 2 else (None, None)
    event_time = plan.event_time
    lookup = symbols.get
    new = _new_update
    unknown = 0
    for ev in data.events:
        key = lookup(ev[0])
        if key is None:
            unknown += 1
            continue
        if single is not None:
            ms = ev[single]
        elif first is not None:
            ms = ev[first]
            other = ev[second]
            if other.__class__ is int:
                if ms.__class__ is int and ms < other < _MAX_MS:
                    ms = other
            elif other is not None:
                ms = None  # not whole milliseconds: the general rule below
        else:
            ms = None
        if ms.__class__ is int and 0 < ms < _MAX_MS and (event_time is None or ev[event_time] == 0):
            ts = ms / 1000.0
        else:
            ts = _event_time(ev, plan, received_ts)
        if seq_i is None:
            seq = None
        else:
            seq = ev[seq_i]
            if seq.__class__ is not int or not 0 <= seq <= _MAX_SEQ:
                seq = _seq(seq)
        append(new(InstrumentUpdate, (BROKER, key, ts, received_ts, seq, values(ev))))
    return unknown
