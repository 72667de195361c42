"""The normalizer's book: broker-neutral events in, position-aligned ``GreeksSnapshot`` rows out.

Rules: pure (h11-style). No I/O, no clock, no anyio: :meth:`Book.apply` takes events, returns
what to write. All state lives here: positions per broker account, the latest merged fields per
(broker, instrument), and who holds each instrument.

What :meth:`Book.apply` does with each event:

- :class:`~normalize.events.PositionsSnapshot`: replaces the positions of the accounts it covers
  (a position missing from it, or with quantity 0, is closed: it produces no more rows and leaves
  the portfolio). Passed on to the writer for the ``positions`` table.
- :class:`~normalize.events.InstrumentUpdate`: merged into that instrument's state (an absent field
  keeps its value, ``None`` clears it), then **one row per position holding the instrument** at that
  broker (the same contract in two accounts, or long here and short there, gives two rows). Every
  update becomes its own row(s): history keeps every tick. An update for an instrument nobody holds
  (an underlying subscribed for its price) only updates the state.
- :class:`~normalize.events.SessionStarted` / :class:`~normalize.events.SessionEnded`: passed on.

Derived values (the same rule whatever the broker):

- ``mark``: the mid of bid and ask when both are present (and ask >= bid), else the broker's mark,
  else the last price.
- ``underlying_price``: the update's own, else the latest price of the underlying instrument at
  the same broker (its mark, or the mid, or its last). A stock's underlying price is its own price.
- Greeks: the broker's when it sent all of delta, gamma, theta and vega (``greeks_source`` =
  ``broker``). Otherwise the missing ones are computed with Black-Scholes-Merton
  (:mod:`normalize.bsm`) from the mark, the underlying price, the time to expiry
  (:func:`expiry_close_ts`), the broker's IV if present else the IV implied by the mark,
  ``risk_free_rate`` and zero dividend yield; the broker's values are kept where present and the
  row says ``model``. No underlying price, no price, or an expired option: no model values (and
  ``greeks_source`` is ``None`` when no Greek is known at all). A stock has delta 1 per share, other
  Greeks ``None``, source ``model``.
- Exposures: ``pos_x = x * quantity * multiplier`` (quantity signed); dollar delta (portfolio) =
  ``pos_delta * underlying_price``.

A malformed event (a mapper bug, a non-number value) is counted in :attr:`Book.bad_events` and
skipped, never raised: one bad tick must not take the book down.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from normalize import bsm
from normalize.events import (
    InstrumentUpdate,
    PositionsSnapshot,
    RowsBatch,
    SessionEnded,
    SessionEvent,
    SessionStarted,
)
from normalize.model import AssetClass, GreeksSnapshot, GreeksSource, UnifiedPosition
from normalize.steps import finish

SECONDS_PER_YEAR = 365.0 * 86400.0
MODEL = GreeksSource.MODEL.value
BROKER = GreeksSource.BROKER.value
_new_row = tuple.__new__
_STOCK_LIKE = frozenset({AssetClass.STOCK.value, "IND", "ETF", "CASH"})

try:  # the optional C fast path of Book.apply (built by pip where a C compiler is found)
    from normalize._speedups import apply_updates as _apply_updates
except ImportError:  # pragma: no cover - a machine without a C compiler
    _apply_updates = None  # type: ignore[assignment]
SPEEDUPS = _apply_updates is not None


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> date:
    first = date(year, month, 1)
    return first + timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))


def new_york_utc_offset_hours(day: date) -> int:
    """-4 while US daylight saving time is in force on ``day`` (second Sunday of March to first
    Sunday of November), else -5. Pure: no time-zone database needed."""
    start = _nth_weekday(day.year, 3, 6, 2)
    end = _nth_weekday(day.year, 11, 6, 1)
    return -4 if start <= day < end else -5


def expiry_close_ts(expiry: date) -> float:
    """The instant an option expiring on ``expiry`` stops trading, for the model's time to expiry:
    16:00 New York time on the expiry date (20:00 or 21:00 UTC), as POSIX seconds. AM-settled
    contracts (SPX monthlies) are treated the same; the model is a fallback, not a settlement."""
    offset = new_york_utc_offset_hours(expiry)
    close = datetime(expiry.year, expiry.month, expiry.day, 16, tzinfo=UTC) - timedelta(hours=offset)
    return close.timestamp()


@dataclass(slots=True)
class _Holder:
    """One open position as the portfolio sees it: the position and its exposure factor."""

    position: UnifiedPosition
    factor: float  # quantity x multiplier


@dataclass(slots=True)
class _Contract:
    """What the model and the derivations need about an instrument (from its positions)."""

    is_call: bool
    strike: float | None
    expiry_ts: float | None
    stock_like: bool  # its own price is its underlying price; delta 1, no model
    underlying_record: _Instrument | None  # the underlying's record at the same broker


@dataclass(slots=True, eq=False)
class _Instrument:
    """Everything the book keeps about one (broker, instrument): one dict lookup per update.

    ``price`` (the underlying-price rule: the mid, else the mark, else the last) is kept up to
    date on every update once another instrument names this one as its underlying
    (``feeds_price``), so an option reads its underlying's price as one attribute. ``last_row``
    (a row of the last update with holders: its derived values) and ``source`` are what the
    portfolio reads.
    """

    state: dict[str, float | None] = field(default_factory=dict)
    holders: list[_Holder] = field(default_factory=list)  # open positions in it (non-zero quantity)
    # per holder, what its rows are made of: (GreeksSnapshot fields broker .. quantity, factor)
    fan: tuple[tuple[tuple[Any, ...], float], ...] = ()
    contract: _Contract | None = None  # set while it has holders
    feeds_price: bool = False
    price: float | None = None
    last_row: tuple[Any, ...] | None = None  # a GreeksSnapshot
    source: str | None = None


# Positions in ``_Instrument.last_row``: what the portfolio reads.
_T_EVENT_TS, _T_UND, _T_DELTA, _T_GAMMA, _T_THETA, _T_VEGA = (
    GreeksSnapshot._fields.index(name)
    for name in ("event_ts", "underlying_price", "delta", "gamma", "theta", "vega")
)


@dataclass(slots=True)
class BookOutput:
    """What one :meth:`Book.apply` produced: rows, positions snapshots, session events."""

    rows: list[GreeksSnapshot] = field(default_factory=list)
    positions: list[PositionsSnapshot] = field(default_factory=list)
    sessions: list[SessionEvent] = field(default_factory=list)
    model_rows: int = 0  # rows whose Greeks the model filled in

    def batch(self) -> RowsBatch:
        return RowsBatch(self.rows, tuple(self.positions), tuple(self.sessions))


class Book:
    """See the module docstring. ``risk_free_rate`` is a fraction (0.04 = 4 %)."""

    def __init__(self, *, risk_free_rate: float = 0.04) -> None:
        self.rate = risk_free_rate
        # (broker, account) -> instrument -> position
        self._accounts: dict[tuple[str, str], dict[str, UnifiedPosition]] = {}
        # (broker, instrument) -> what the book knows of it (never removed: a few per contract)
        self._instruments: dict[tuple[str, str], _Instrument] = {}
        self.bad_events = 0
        self.last_bad_event: str | None = None
        self.updates_total = 0
        self.rows_total = 0
        self.model_rows_total = 0

    # ------------------------------------------------------------------------------ events

    def apply(self, events: Iterable[Any]) -> BookOutput:
        """Apply events in order; return the rows and pass-through events they produced.

        With the C fast path (:data:`SPEEDUPS`) runs of usual instrument updates (the broker's
        Greeks, or a stock-like instrument) are applied in C; each event it leaves (a new
        instrument, the model's case, an unusual value, another event) takes the code below."""
        out = BookOutput()
        rows = out.rows
        updates = 0
        if _apply_updates is None:
            self._apply_events(events, out)
        else:
            events = events if type(events) is list else list(events)
            i, n = 0, len(events)
            instruments = self._instruments
            while i < n:
                i, handled = _apply_updates(
                    instruments, events, i, rows, InstrumentUpdate, GreeksSnapshot, BROKER, MODEL
                )
                updates += handled
                if i < n:
                    self._apply_events((events[i],), out)
                    i += 1
        self.rows_total += len(rows)
        self.model_rows_total += out.model_rows
        self.updates_total += updates
        return out

    def _apply_events(self, events: Iterable[Any], out: BookOutput) -> None:
        """Apply events in order, in Python."""
        rows = out.rows
        update = self._update
        updates = 0
        for event in events:
            try:
                if type(event) is InstrumentUpdate:
                    updates += 1
                    update(event, rows, out)
                elif isinstance(event, PositionsSnapshot):
                    self._positions(event)
                    out.positions.append(event)
                elif isinstance(event, SessionStarted | SessionEnded):
                    out.sessions.append(event)
                else:
                    raise TypeError(f"not a broker event: {type(event).__name__}")
            except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError) as exc:
                self.bad_events += 1
                self.last_bad_event = f"{type(exc).__name__}: {exc}"[:200]
                if type(event) is InstrumentUpdate:
                    self._sanitize((event.broker, event.instrument))
        self.updates_total += updates

    def _record(self, key: tuple[str, str]) -> _Instrument:
        rec = self._instruments.get(key)
        if rec is None:
            rec = self._instruments[key] = _Instrument()
        return rec

    def _positions(self, snap: PositionsSnapshot) -> None:
        """Replace the positions of the accounts ``snap`` covers; rebuild only the instruments
        whose positions changed (a refresh usually changes none: 500 unchanged positions cost
        about 3 ms to rebuild, 5,000 about 30, for nothing)."""
        broker = snap.broker
        news: dict[str, dict[str, UnifiedPosition]] = {}  # accounts in the order they come
        for p in snap.positions:  # checked before anything changes: a bad snapshot leaves the book
            if p.broker != broker:
                raise ValueError(f"position of broker {p.broker!r} in a {broker!r} snapshot")
            if p.quantity == 0 or not math.isfinite(p.quantity) or not math.isfinite(p.multiplier):
                continue
            news.setdefault(p.account, {})[p.instrument] = p
        accounts = set(snap.accounts) | {p.account for p in snap.positions}
        olds = {account: self._accounts.pop((broker, account), {}) for account in accounts}
        for account, new in news.items():
            self._accounts[(broker, account)] = new
        touched: set[str] = set()
        for account, old in olds.items():
            new = news.get(account, {})
            touched.update(i for i, p in old.items() if new.get(i) != p)
            touched.update(i for i, p in new.items() if old.get(i) != p)
        for instrument in touched:
            self._rebuild(broker, instrument)

    def _rebuild(self, broker: str, instrument: str) -> None:
        holders: list[_Holder] = []
        fan: list[tuple[tuple[Any, ...], float]] = []
        for (b, _account), positions in self._accounts.items():
            if b != broker:
                continue
            p = positions.get(instrument)
            if p is None:
                continue
            multiplier = p.multiplier or 1.0
            prefix = (
                p.broker,
                p.account,
                p.instrument,
                p.underlying,
                str(p.asset_class),
                None if p.right is None else str(p.right),
                p.strike,
                p.expiry,
                multiplier,
                p.quantity,
            )
            factor = float(p.quantity * multiplier)
            holders.append(_Holder(p, factor))
            fan.append((prefix, factor))
        rec = self._record((broker, instrument))
        rec.holders = holders
        rec.fan = tuple(fan)
        if not holders:
            rec.contract = None
            return
        p = holders[0].position
        stock_like = str(p.asset_class) in _STOCK_LIKE
        underlying = None
        if not stock_like and p.underlying:
            underlying = self._record((broker, p.underlying))
            if not underlying.feeds_price:
                underlying.feeds_price = True
                underlying.price = _price(underlying.state)
        rec.contract = _Contract(
            is_call=str(p.right) == "C",
            strike=p.strike,
            expiry_ts=None if p.expiry is None else expiry_close_ts(p.expiry),
            stock_like=stock_like,
            underlying_record=underlying,
        )

    def _update(self, u: InstrumentUpdate, rows: list[GreeksSnapshot], out: BookOutput) -> None:
        rec = self._instruments.get((u.broker, u.instrument))
        if rec is None:
            rec = self._record((u.broker, u.instrument))
        state = rec.state
        state.update(u.values)
        get = state.get
        if rec.feeds_price:
            rec.price = _price(state)
        holders = rec.holders
        if not holders:
            return
        contract: _Contract = rec.contract  # type: ignore[assignment]  # set with the holders
        bid = get("bid")
        ask = get("ask")
        last = get("last")
        if bid is not None and ask is not None and ask >= bid:
            mark: float | None = (bid + ask) * 0.5
        else:
            mark = get("mark")
            if mark is None:
                mark = last
        und = get("underlying_price")
        if und is None:
            if contract.stock_like:
                und = mark
            elif contract.underlying_record is not None:
                und = contract.underlying_record.price
        iv = get("iv")
        delta = get("delta")
        gamma = get("gamma")
        theta = get("theta")
        vega = get("vega")
        rho = get("rho")
        if delta is not None and gamma is not None and theta is not None and vega is not None:
            source: str | None = BROKER
        elif contract.stock_like:
            delta, source = 1.0, MODEL
        else:
            model = self._model(contract, u.event_ts, mark, und, iv)
            if model is None:
                source = BROKER if delta is not None or gamma is not None else None
            else:
                m_iv, g = model
                if iv is None:
                    iv = m_iv
                if delta is None:
                    delta = g.delta
                if gamma is None:
                    gamma = g.gamma
                if theta is None:
                    theta = g.theta
                if vega is None:
                    vega = g.vega
                if rho is None:
                    rho = g.rho
                source = MODEL
                out.model_rows += len(holders)
        event_ts = u.event_ts
        tail = (
            event_ts, u.received_ts, bid, ask, last, mark, und, iv, delta, gamma, theta, vega, rho,
        )  # fmt: skip
        seq = u.seq
        append = rows.append
        for prefix, f in rec.fan:
            append(
                _new_row(
                    GreeksSnapshot,
                    prefix
                    + tail
                    + (
                        None if delta is None else delta * f,
                        None if gamma is None else gamma * f,
                        None if theta is None else theta * f,
                        None if vega is None else vega * f,
                        seq,
                        source,
                    ),
                )
            )
        rec.last_row = rows[-1]
        rec.source = source

    def _sanitize(self, key: tuple[str, str]) -> None:
        """Drop state values that are not finite numbers (after a bad update), so that one bad
        value cannot poison every later update of the instrument."""
        rec = self._instruments.get(key)
        if rec is not None:
            state = rec.state
            for name, value in list(state.items()):
                if value is not None and not (
                    isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                ):
                    del state[name]
            if rec.feeds_price:
                rec.price = _price(state)

    def _model(
        self, c: _Contract, now: float, mark: float | None, und: float | None, iv: float | None
    ) -> tuple[float, bsm.BsmGreeks] | None:
        """(IV, Greeks) of the model, or None when it cannot say (see the module docstring)."""
        if c.expiry_ts is None or c.strike is None or und is None or not und > 0 or not c.strike > 0:
            return None
        t = (c.expiry_ts - now) / SECONDS_PER_YEAR
        if not t > 0:
            return None
        vol = iv
        if vol is None or not vol > 0:
            if mark is None or not mark > 0:
                return None
            vol = bsm.implied_volatility(
                mark, is_call=c.is_call, spot=und, strike=c.strike, t=t, rate=self.rate, tol=1e-8
            )
            if vol is None:
                return None
        g = bsm.greeks(is_call=c.is_call, spot=und, strike=c.strike, t=t, vol=vol, rate=self.rate)
        return vol, g

    # ----------------------------------------------------------------------------- queries

    def positions(self) -> list[UnifiedPosition]:
        """Every open position (non-zero quantity), all brokers."""
        return [p for positions in self._accounts.values() for p in positions.values()]

    def portfolio(self) -> dict[str, Any]:
        """Portfolio Greeks from the latest state of every open position, per underlying and in
        total, across brokers: ``{"as_of", "total", "by_underlying", "positions_without_data"}``.
        Totals are position exposures (see the module docstring); ``as_of`` is the newest event
        time that went into them (POSIX seconds, or None)."""
        return finish(self.portfolio_steps())

    def portfolio_steps(self, step: int = 0) -> Generator[None, None, dict[str, Any]]:
        """:meth:`portfolio` as a step generator (:mod:`normalize.steps`): it yields after every
        ``step`` instruments (0: never), over the instruments held when it starts. A large book's
        sum (about 2 us an instrument: 20 ms for 10,000) can so be spread over several rounds of
        the normalizer instead of holding up the event loop at once; an instrument's state is
        read when its turn comes (the figures stay a sum of each position's latest row)."""
        records = list(self._instruments.values())
        sums: dict[str, list[float]] = {}
        as_of: float | None = None
        missing = 0
        for i, rec in enumerate(records):
            if step and i and not i % step:  # after every step instruments, never after the last
                yield
            holders = rec.holders
            if not holders:
                continue
            t = rec.last_row
            if t is None:
                missing += len(holders)
                continue
            if as_of is None or t[_T_EVENT_TS] > as_of:
                as_of = t[_T_EVENT_TS]
            delta, gamma, theta, vega, und = t[_T_DELTA], t[_T_GAMMA], t[_T_THETA], t[_T_VEGA], t[_T_UND]
            if not isinstance(und, int | float):  # the underlying price is copied, never computed
                und = None  # with: a non-number (a mapper bug) must not take the portfolio down
            for h in holders:
                s = sums.get(h.position.underlying)
                if s is None:
                    s = sums[h.position.underlying] = [0.0] * 6
                f = h.factor
                s[0] += 1
                if delta is not None:
                    s[1] += delta * f
                    if und is not None:
                        s[2] += delta * f * und
                if gamma is not None:
                    s[3] += gamma * f
                if theta is not None:
                    s[4] += theta * f
                if vega is not None:
                    s[5] += vega * f
        by_underlying = {u: _exposure(s) for u, s in sorted(sums.items())}
        total = [0.0] * 6
        for s in sums.values():
            for i, v in enumerate(s):
                total[i] += v
        return {
            "as_of": as_of,
            "total": _exposure(total),
            "by_underlying": by_underlying,
            "positions_without_data": missing,
        }


def _price(state: dict[str, float | None]) -> float | None:
    """An instrument's price as an underlying: the mid of a positive bid and an ask at or above
    it, else its mark, else its last."""
    get = state.get
    bid, ask = get("bid"), get("ask")
    if bid is not None and ask is not None and ask >= bid > 0:
        return (bid + ask) * 0.5
    mark = get("mark")
    return mark if mark is not None else get("last")


def _exposure(s: list[float]) -> dict[str, float | int]:
    """Summed position Greeks (per-contract value x quantity x multiplier)."""
    return {
        "positions": int(s[0]),
        "delta": s[1],
        "dollar_delta": s[2],
        "gamma": s[3],
        "theta": s[4],
        "vega": s[5],
    }
