"""The book: merge, fan-out, units and exposures, fallback Greeks, positions, portfolio."""

from __future__ import annotations

import gc
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any, ClassVar
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from normalize import book as book_module
from normalize import bsm
from normalize.book import SECONDS_PER_YEAR, SPEEDUPS, Book, expiry_close_ts
from normalize.events import InstrumentUpdate, PositionsSnapshot, SessionEnded, SessionStarted
from normalize.model import AssetClass, Right, UnifiedPosition
from normalize.steps import advance, finish
from normalize.symbology import occ_symbol

EXPIRY = date(2026, 3, 20)
CALL = occ_symbol("SPY", EXPIRY, "C", 500.0)
PUT = occ_symbol("SPY", EXPIRY, "P", 480.0)
NOW = datetime(2026, 1, 15, 15, 0, tzinfo=UTC).timestamp()
GREEKS = {"delta": 0.5, "gamma": 0.02, "theta": -0.1, "vega": 0.3}


def option(instrument: str, qty: float, *, account: str = "U1", broker: str = "ibkr") -> UnifiedPosition:
    right = Right.CALL if instrument[12] == "C" else Right.PUT
    strike = int(instrument[13:]) / 1000
    return UnifiedPosition(
        broker, account, instrument, "SPY", AssetClass.OPTION, right, strike, EXPIRY, 100.0, qty, 1.0
    )


def stock(
    qty: float, *, ticker: str = "SPY", account: str = "U1", multiplier: float = 1.0
) -> UnifiedPosition:
    return UnifiedPosition(
        "ibkr", account, ticker, ticker, AssetClass.STOCK, None, None, None, multiplier, qty, 1.0
    )


def snapshot(
    *positions: UnifiedPosition, accounts: tuple[str, ...] = ("U1",), broker: str = "ibkr"
) -> PositionsSnapshot:
    return PositionsSnapshot(broker, accounts, positions, NOW)


def update(
    instrument: str, seq: int = 1, ts: float = NOW, broker: str = "ibkr", **values: float | None
) -> InstrumentUpdate:
    return InstrumentUpdate(broker, instrument, ts, ts + 0.001, seq, dict(values))


def book_with(*positions: UnifiedPosition) -> Book:
    book = Book()
    book.apply([snapshot(*positions)])
    return book


# -- units and scaling (hand-computed) -------------------------------------------------------------


def test_long_call_exposures_are_value_times_quantity_times_multiplier() -> None:
    book = book_with(option(CALL, 2))
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1, underlying_price=500.0, **GREEKS)]).rows
    assert (row.pos_delta, row.pos_gamma, row.pos_theta, row.pos_vega) == pytest.approx(
        (100.0, 4.0, -20.0, 60.0)
    )
    assert row.mark == pytest.approx(10.0)
    assert row.greeks_source == "broker"
    assert row.quantity == 2
    assert row.multiplier == 100


def test_short_call_flips_every_exposure() -> None:
    book = book_with(option(CALL, -3))
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1, **GREEKS)]).rows
    assert (row.pos_delta, row.pos_gamma, row.pos_theta, row.pos_vega) == pytest.approx(
        (-150.0, -6.0, 30.0, -90.0)
    )


def test_long_and_short_puts() -> None:
    greeks = {"delta": -0.4, "gamma": 0.01, "theta": -0.08, "vega": 0.25}
    long_put = book_with(option(PUT, 1)).apply([update(PUT, **greeks)]).rows[0]
    short_put = book_with(option(PUT, -5)).apply([update(PUT, **greeks)]).rows[0]
    assert (long_put.pos_delta, long_put.pos_gamma, long_put.pos_theta, long_put.pos_vega) == pytest.approx(
        (-40.0, 1.0, -8.0, 25.0)
    )
    assert (
        short_put.pos_delta,
        short_put.pos_gamma,
        short_put.pos_theta,
        short_put.pos_vega,
    ) == pytest.approx((200.0, -5.0, 40.0, -125.0))


def test_stock_has_delta_one_per_share_and_no_other_greeks() -> None:
    book = book_with(stock(300), stock(-50, ticker="AAPL", multiplier=0.0))  # IBKR sends 0 for stocks
    out = book.apply([update("SPY", bid=500.0, ask=500.02), update("AAPL", last=190.0)]).rows
    spy, aapl = out
    assert (spy.delta, spy.gamma, spy.theta, spy.vega, spy.iv) == (1.0, None, None, None, None)
    assert spy.pos_delta == 300.0
    assert spy.underlying_price == pytest.approx(500.01)  # a stock's underlying is itself
    assert spy.greeks_source == "model"
    assert aapl.multiplier == 1.0
    assert aapl.pos_delta == -50.0
    assert aapl.mark == 190.0
    assert aapl.underlying_price == 190.0


def test_portfolio_sums_exposures_and_dollar_delta_per_underlying_and_in_total() -> None:
    book = book_with(option(CALL, 2), option(PUT, -1), stock(100), stock(10, ticker="AAPL"))
    book.apply(
        [
            update("SPY", bid=499.99, ask=500.01),
            update(CALL, **GREEKS),
            update(PUT, delta=-0.3, gamma=0.01, theta=-0.05, vega=0.2),
            update("AAPL", last=200.0),
        ]
    )
    pf = book.portfolio()
    spy = pf["by_underlying"]["SPY"]
    # delta: call 0.5*2*100 + put -0.3*-1*100 + stock 100 = 100 + 30 + 100
    assert spy["delta"] == pytest.approx(230.0)
    assert spy["dollar_delta"] == pytest.approx(230.0 * 500.0)
    assert spy["gamma"] == pytest.approx(4.0 - 1.0)
    assert spy["theta"] == pytest.approx(-20.0 + 5.0)
    assert spy["vega"] == pytest.approx(60.0 - 20.0)
    assert spy["positions"] == 3
    assert pf["by_underlying"]["AAPL"]["dollar_delta"] == pytest.approx(2000.0)
    assert pf["total"]["delta"] == pytest.approx(240.0)
    assert pf["total"]["positions"] == 4
    assert pf["as_of"] == NOW
    assert pf["positions_without_data"] == 0


# -- merging partial updates ----------------------------------------------------------------------


def test_absent_field_keeps_its_value_and_every_update_is_a_row() -> None:
    book = book_with(option(CALL, 1))
    rows = book.apply(
        [
            update(CALL, 1, bid=9.0, ask=9.2, iv=0.2, **GREEKS),
            update(CALL, 2, bid=9.1),  # only the bid changed
            update(CALL, 3, delta=0.55),
        ]
    ).rows
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [r.bid for r in rows] == [9.0, 9.1, 9.1]
    assert [r.ask for r in rows] == [9.2, 9.2, 9.2]
    assert [r.delta for r in rows] == [0.5, 0.5, 0.55]
    assert all(r.iv == 0.2 and r.greeks_source == "broker" for r in rows)


def test_explicit_no_value_clears_then_the_model_fills_then_the_broker_wins_again() -> None:
    book = book_with(option(CALL, 1))
    book.apply([update("SPY", bid=499.99, ask=500.01)])
    t = (expiry_close_ts(EXPIRY) - NOW) / SECONDS_PER_YEAR
    price = bsm.price(is_call=True, spot=500.0, strike=500.0, t=t, vol=0.2, rate=0.04)
    first, cleared, back = book.apply(
        [
            update(CALL, 1, bid=price - 0.01, ask=price + 0.01, iv=0.2, **GREEKS),
            update(CALL, 2, delta=None, gamma=None, theta=None, vega=None),  # IBKR "" / DXLink NaN
            update(CALL, 3, **GREEKS),
        ]
    ).rows
    assert first.greeks_source == "broker"
    assert first.delta == 0.5
    expected = bsm.greeks(is_call=True, spot=500.0, strike=500.0, t=t, vol=0.2, rate=0.04)
    assert cleared.greeks_source == "model"
    assert cleared.iv == 0.2  # the broker's IV was kept and used
    assert cleared.delta == pytest.approx(expected.delta)
    assert cleared.gamma == pytest.approx(expected.gamma)
    assert cleared.theta == pytest.approx(expected.theta)
    assert cleared.vega == pytest.approx(expected.vega)
    assert cleared.pos_delta == pytest.approx(expected.delta * 100)
    assert back.greeks_source == "broker"
    assert back.delta == 0.5


def test_model_implies_the_volatility_from_the_mark_when_the_broker_sends_no_iv() -> None:
    book = book_with(option(CALL, 1))
    book.apply([update("SPY", last=500.0)])
    t = (expiry_close_ts(EXPIRY) - NOW) / SECONDS_PER_YEAR
    price = bsm.price(is_call=True, spot=500.0, strike=500.0, t=t, vol=0.3, rate=0.04)
    (row,) = book.apply([update(CALL, bid=price, ask=price)]).rows
    assert row.greeks_source == "model"
    assert row.iv == pytest.approx(0.3, abs=1e-6)
    assert row.underlying_price == 500.0  # taken from the underlying's own updates
    assert row.delta == pytest.approx(
        bsm.greeks(is_call=True, spot=500.0, strike=500.0, t=t, vol=0.3, rate=0.04).delta
    )


def test_broker_greeks_fill_only_what_the_model_misses() -> None:
    book = book_with(option(CALL, 1))
    book.apply([update("SPY", last=500.0)])
    (row,) = book.apply([update(CALL, bid=20.0, ask=20.2, iv=0.2, delta=0.51)]).rows
    assert row.delta == 0.51  # the broker's value is kept
    assert row.gamma is not None
    assert row.greeks_source == "model"


def test_no_model_without_an_underlying_price_and_none_after_expiry() -> None:
    book = book_with(option(CALL, 1))
    (row,) = book.apply([update(CALL, bid=1.0, ask=1.2)]).rows
    assert (row.delta, row.greeks_source, row.underlying_price) == (None, None, None)
    book.apply([update("SPY", last=500.0)])
    late = expiry_close_ts(EXPIRY) + 60
    (expired,) = book.apply([update(CALL, ts=late, bid=1.0, ask=1.2)]).rows
    assert expired.delta is None
    assert expired.greeks_source is None


def test_several_updates_of_one_instrument_in_a_batch_and_one_instrument_in_two_accounts() -> None:
    book = Book()
    book.apply(
        [snapshot(option(CALL, 2, account="U1"), option(CALL, -1, account="U2"), accounts=("U1", "U2"))]
    )
    rows = book.apply([update(CALL, 1, **GREEKS), update(CALL, 2, delta=0.6)]).rows
    assert [(r.account, r.seq, r.pos_delta) for r in rows] == [
        ("U1", 1, pytest.approx(100.0)),
        ("U2", 1, pytest.approx(-50.0)),
        ("U1", 2, pytest.approx(120.0)),
        ("U2", 2, pytest.approx(-60.0)),
    ]


def test_same_instrument_at_two_brokers_has_separate_state() -> None:
    book = Book()
    book.apply(
        [snapshot(option(CALL, 1)), snapshot(option(CALL, 1, broker="tastytrade"), broker="tastytrade")]
    )
    (ib,) = book.apply([update(CALL, bid=1.0, ask=1.2, **GREEKS)]).rows
    (tt,) = book.apply([update(CALL, broker="tastytrade", bid=2.0)]).rows
    assert ib.broker == "ibkr"
    assert tt.broker == "tastytrade"
    assert tt.ask is None
    assert tt.delta is None


@pytest.mark.parametrize(
    ("values", "mark"),
    [
        ({"bid": 1.0, "ask": 1.2, "mark": 5.0, "last": 7.0}, 1.1),  # mid wins
        ({"bid": 1.3, "ask": 1.2, "mark": 5.0}, 5.0),  # crossed quote: the broker's mark
        ({"bid": 1.0, "mark": 5.0, "last": 7.0}, 5.0),
        ({"last": 7.0}, 7.0),
        ({}, None),
    ],
)
def test_mark_rule(values: dict[str, float], mark: float | None) -> None:
    (row,) = book_with(option(CALL, 1)).apply([update(CALL, **values)]).rows
    assert row.mark == (None if mark is None else pytest.approx(mark))


# -- positions ------------------------------------------------------------------------------------


def test_positions_open_change_and_close() -> None:
    book = book_with(option(CALL, 1))
    assert book.apply([update("SPY", last=500.0), update(PUT, 1, delta=-0.4)]).rows == []  # not held yet
    out = book.apply([snapshot(option(CALL, 3), option(PUT, 2))])  # PUT opened, CALL changed
    assert out.positions
    assert out.rows == []
    rows = book.apply([update(CALL, 2, **GREEKS), update(PUT, 2, delta=-0.4)]).rows
    assert [(r.instrument, r.quantity, r.pos_delta) for r in rows] == [
        (CALL, 3, pytest.approx(150.0)),
        (PUT, 2, pytest.approx(-80.0)),
    ]
    book.apply([snapshot(option(PUT, 2))])  # CALL closed
    assert [
        r.instrument for r in book.apply([update(CALL, 3, delta=0.6), update(PUT, 3, delta=-0.5)]).rows
    ] == [PUT]
    assert book.portfolio()["total"]["positions"] == 1
    assert book.portfolio()["total"]["delta"] == pytest.approx(-100.0)


def test_a_snapshot_replaces_only_its_accounts_and_zero_quantity_is_closed() -> None:
    book = Book()
    book.apply(
        [snapshot(option(CALL, 1, account="U1"), option(CALL, 1, account="U2"), accounts=("U1", "U2"))]
    )
    book.apply([snapshot(option(CALL, 0, account="U2"), accounts=("U2",))])
    rows = book.apply([update(CALL, **GREEKS)]).rows
    assert [r.account for r in rows] == ["U1"]
    assert {p.account for p in book.positions()} == {"U1"}


def test_positions_without_data_are_reported_not_summed() -> None:
    book = book_with(option(CALL, 1), option(PUT, 1))
    book.apply([update(CALL, **GREEKS)])
    pf = book.portfolio()
    assert pf["positions_without_data"] == 1
    assert pf["total"]["positions"] == 1


# -- pass-through and bad input -------------------------------------------------------------------


def test_session_events_pass_through_in_order() -> None:
    started = SessionStarted("ibkr", "s1", ("U1",), "127.0.0.1:5000", "simulated", NOW)
    ended = SessionEnded("ibkr", "s1", NOW + 5, "closed 1001", 42)
    out = Book().apply([started, ended])
    assert out.sessions == [started, ended]
    assert out.batch().sessions == (started, ended)


def test_underlying_price_follows_the_underlying_whenever_its_option_position_appears() -> None:
    # The underlying ticks before anyone holds an option on it, then the position arrives: the
    # option's rows read the underlying's price from that earlier state, then follow it.
    book = Book()
    book.apply([update("SPY", bid=499.0, ask=501.0)])
    book.apply([snapshot(option(CALL, 1))])
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1, **GREEKS)]).rows
    assert row.underlying_price == 500.0  # the mid
    book.apply([update("SPY", bid=0.0, ask=502.0)])  # no positive bid: the mark, else the last
    book.apply([update("SPY", last=503.0)])
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1)]).rows
    assert row.underlying_price == 503.0
    book.apply([update("SPY", mark=504.0)])
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1)]).rows
    assert row.underlying_price == 504.0


def test_a_bad_underlying_update_is_dropped_from_its_price_too() -> None:
    book = book_with(option(CALL, 1))
    book.apply([update("SPY", bid=499.0, ask=501.0)])
    book.apply([update("SPY", bid="bad", ask=600.0)])  # type: ignore[arg-type]  # a mapper bug
    assert book.bad_events == 1
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1, **GREEKS)]).rows
    assert row.underlying_price is None  # the bad bid is gone: an ask alone is no price
    book.apply([update("SPY", bid=599.0)])
    (row,) = book.apply([update(CALL, bid=9.9, ask=10.1)]).rows
    assert row.underlying_price == 599.5
    assert book.bad_events == 1


def test_bad_events_are_counted_and_skipped_and_never_poison_the_state() -> None:
    book = book_with(option(CALL, 1))
    out = book.apply(
        [
            "not an event",
            update(CALL, 1, bid="1.0", ask=1.2),  # type: ignore[arg-type]  # a mapper bug
            update(CALL, 2, bid=1.0, ask=1.2, **GREEKS),
        ]
    )
    assert book.bad_events == 2
    assert book.last_bad_event is not None
    assert [r.seq for r in out.rows] == [2]
    assert out.rows[0].mark == pytest.approx(1.1)


def test_expiry_close_is_four_pm_new_york_through_daylight_saving() -> None:
    assert datetime.fromtimestamp(expiry_close_ts(date(2026, 1, 16)), UTC).hour == 21  # EST
    assert datetime.fromtimestamp(expiry_close_ts(date(2026, 6, 19)), UTC).hour == 20  # EDT
    assert datetime.fromtimestamp(expiry_close_ts(date(2026, 3, 6)), UTC).hour == 21  # before 2nd Sunday
    assert datetime.fromtimestamp(expiry_close_ts(date(2026, 3, 9)), UTC).hour == 20  # after it
    assert datetime.fromtimestamp(expiry_close_ts(date(2026, 11, 2)), UTC).hour == 21  # after 1st Sunday


# -- the C fast path (normalize/_speedups.c) against the Python code --------------------------------

_FIELDS = ("bid", "ask", "last", "mark", "underlying_price", "iv", "delta", "gamma", "theta", "vega", "rho")
_value = (
    st.none()
    | st.floats(min_value=-1e6, max_value=1e6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-3, 3)
    | st.just("1.5")
)
_updates = st.lists(
    st.tuples(
        st.sampled_from([CALL, PUT, "SPY", "QQQ"]),
        st.dictionaries(st.sampled_from(_FIELDS), _value, max_size=len(_FIELDS)),
        st.floats(min_value=NOW - 86400, max_value=NOW + 86400 * 90),
        st.none() | st.integers(0, 2**63),
    ),
    max_size=30,
)


def _run(
    updates: list[tuple[str, dict[str, Any], float, int | None]], quantities: list[float], change_at: int
) -> str:
    def book_of(q: list[float]) -> PositionsSnapshot:
        return snapshot(
            option(CALL, q[0]),
            option(CALL, q[1], account="U2"),
            option(PUT, q[2]),
            stock(q[3]),
            accounts=("U1", "U2"),
        )

    book = Book()
    book.apply([book_of(quantities)])
    events: list[Any] = [
        InstrumentUpdate("ibkr", key, ts, ts + 0.25, seq, values) for key, values, ts, seq in updates
    ]
    # mid-stream: the positions change (another fan-out), a session event, a non-event
    events[change_at:change_at] = [book_of(quantities[::-1]), SessionEnded("ibkr", "s", NOW, "x", 1), "junk"]
    out = book.apply(events)
    return repr((out.rows, out.model_rows, book.bad_events, book.updates_total, book.portfolio()))


@pytest.mark.skipif(not SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
@given(
    _updates,
    st.lists(st.sampled_from([0.0, 1.0, -2.0, 3.5, 7]), min_size=4, max_size=4),
    st.integers(0, 30),
)
def test_c_fast_path_and_python_code_make_the_same_rows(
    updates: list[tuple[str, dict[str, Any], float, int | None]], quantities: list[float], change_at: int
) -> None:
    # Any mix of values (floats, None, NaN, infinities, ints, text), instruments held or not,
    # positions changing mid-stream: the same rows, model rows, bad events, counts and portfolio
    # with the C fast path as with the Python code alone.
    fast = _run(updates, quantities, change_at)
    with mock.patch.object(book_module, "_apply_updates", None):
        assert _run(updates, quantities, change_at) == fast


@pytest.mark.skipif(not SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
def test_c_fast_path_takes_the_usual_updates() -> None:
    # The usual updates (an option with the broker's Greeks, a stock) are applied in C, none in
    # Python: the rows the Python code makes (tested above).
    book = book_with(option(CALL, 2), option(CALL, -1, account="U2"), stock(10))
    calls = mock.Mock(wraps=book_module._apply_updates)
    python_path = mock.Mock(wraps=book._update)
    with (
        mock.patch.object(book, "_update", python_path),
        mock.patch.object(book_module, "_apply_updates", calls),
    ):
        out = book.apply(
            [
                update(CALL, 5, bid=1.0, ask=1.2, underlying_price=500.0, **GREEKS),
                update("SPY", 6, bid=500.0, ask=500.2),
            ]
        )
    assert calls.call_count == 1
    assert python_path.call_count == 0
    assert [r.seq for r in out.rows] == [5, 5, 6]
    assert (out.rows[2].delta, out.rows[2].pos_delta, out.rows[2].greeks_source) == (1.0, 10.0, "model")
    assert [r.pos_delta for r in out.rows] == [0.5 * 200, 0.5 * -100, 10.0]
    assert out.rows[0].mark == pytest.approx(1.1)
    assert out.rows[0].greeks_source == "broker"
    assert book.portfolio()["total"]["delta"] == pytest.approx(60.0)


def test_a_refresh_rebuilds_only_the_instruments_whose_positions_changed() -> None:
    book = book_with(option(CALL, 2), option(PUT, -1), stock(100))
    before = {k: book._instruments[("ibkr", k)].holders for k in (CALL, PUT, "SPY")}

    # The same call, the put's quantity changed, the stock closed (no longer listed).
    book.apply([snapshot(option(CALL, 2), option(PUT, -3))])

    assert book._instruments[("ibkr", CALL)].holders is before[CALL]  # not rebuilt
    assert book._instruments[("ibkr", PUT)].holders is not before[PUT]
    assert [h.factor for h in book._instruments[("ibkr", PUT)].holders] == [-300.0]
    assert book._instruments[("ibkr", "SPY")].holders == []  # closed: no holder left
    rows = book.apply([update(CALL, **GREEKS), update(PUT, **GREEKS), update("SPY", last=500.0)]).rows
    assert [(r.instrument, r.quantity, r.pos_delta) for r in rows] == [(CALL, 2, 100.0), (PUT, -3, -150.0)]


def test_a_snapshot_refused_for_a_foreign_position_leaves_the_book_as_it_was() -> None:
    book = book_with(option(CALL, 2), option(PUT, -1))
    out = book.apply([snapshot(option(CALL, 5), option(PUT, -1, broker="tastytrade"))])
    assert book.bad_events == 1
    assert out.positions == []
    assert sorted((p.instrument, p.quantity) for p in book.positions()) == [(CALL, 2), (PUT, -1)]
    (row,) = book.apply([update(CALL, **GREEKS)]).rows
    assert row.pos_delta == pytest.approx(100.0)


def test_the_portfolio_summed_in_steps_is_the_portfolio_and_each_step_is_bounded() -> None:
    book = book_with(option(CALL, 2), option(PUT, -1), stock(100), stock(10, ticker="AAPL"))
    book.apply([update("SPY", bid=499.99, ask=500.01), update(CALL, **GREEKS), update("AAPL", last=200.0)])
    whole = book.portfolio()
    records = len(book._instruments)
    assert records >= 4

    steps = book.portfolio_steps(1)
    taken = 1
    assert advance(steps) is None  # not complete yet: one instrument read
    while (done := advance(steps)) is None:
        taken += 1  # one instrument a step, no more
    assert taken == records - 1  # the last step reads the last instrument and returns
    assert done.value == whole
    assert whole["positions_without_data"] == 1  # the put: no row yet
    assert advance(book.portfolio_steps(2)) is None  # 2 of 4 or more: not done
    assert sum(1 for _ in book.portfolio_steps(2)) == (records - 1) // 2
    assert finish(book.portfolio_steps(3)) == whole


def test_a_portfolio_sum_in_progress_reads_each_instrument_when_its_turn_comes() -> None:
    book = book_with(option(CALL, 2), option(PUT, -1))
    book.apply([update(CALL, **GREEKS), update(PUT, delta=-0.3, gamma=0.01, theta=-0.05, vega=0.2)])
    first = next(iter(book._instruments.values()))  # the first instrument the sum reads
    steps = book.portfolio_steps(1)
    assert advance(steps) is None  # one instrument read: its row as of now
    book.apply([update(CALL, delta=0.6), update(PUT, delta=-0.4)])
    # Each position counted once, from the row it had when its turn came: the call's delta 0.5
    # or 0.6 (x 2 x 100), the put's -0.3 or -0.4 (x -1 x 100).
    call = 100.0 if first is book._instruments[("ibkr", CALL)] else 120.0
    put = 30.0 if first is book._instruments[("ibkr", PUT)] else 40.0
    total = finish(steps)["total"]
    assert total["positions"] == 2
    assert total["delta"] == pytest.approx(call + put)


def test_a_non_number_price_never_takes_the_portfolio_down() -> None:
    # A mapper bug's text price is copied into the rows (the writer clears it) and the stock's
    # underlying price: the portfolio leaves it out of the dollar delta instead of raising.
    book = book_with(stock(100))
    book.apply([update("SPY", 1, last="1.5")])  # type: ignore[arg-type]  # a mapper bug
    total = book.portfolio()["total"]
    assert (total["delta"], total["dollar_delta"]) == (100.0, 0.0)


_EDGE_CASES = {
    "underlying-bid-zero": [("SPY", {"bid": 0.0, "ask": 1.0, "last": 2.0}), (CALL, dict(GREEKS, bid=1.0))],
    "underlying-crossed": [("SPY", {"bid": 1.0, "ask": 0.5, "mark": 0.7}), (CALL, dict(GREEKS, ask=1.0))],
    "underlying-int-bid": [("SPY", {"bid": 1, "ask": 2.0}), (CALL, dict(GREEKS))],
    "option-int-bid": [(CALL, dict(GREEKS, bid=1, ask=1.2))],
    "option-crossed": [(CALL, dict(GREEKS, bid=1.3, ask=1.2, last=1.25))],
    "option-int-delta": [(CALL, dict(GREEKS, delta=1))],
    "option-nan-greek": [(CALL, dict(GREEKS, vega=float("nan")))],
    "stock-own-greeks": [("SPY", {"bid": 500.0, "ask": 500.5, "gamma": 0.1, "theta": None})],
    "stock-text-gamma": [("SPY", {"bid": 500.0, "gamma": "x"})],
    "unheld-then-held": [("QQQ", {"bid": 1.0}), (PUT, dict(GREEKS, underlying_price=480.0))],
}


@pytest.mark.skipif(not SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
@pytest.mark.parametrize("case", list(_EDGE_CASES), ids=list(_EDGE_CASES))
def test_c_fast_path_edge_cases_match_the_python_code(case: str) -> None:
    def run() -> tuple[str, list[Any]]:
        book = book_with(option(CALL, 2), option(PUT, -1), stock(10))
        out = book.apply([update(key, i, **values) for i, (key, values) in enumerate(_EDGE_CASES[case])])
        return repr((out.rows, out.model_rows, book.bad_events, book.portfolio())), out.rows

    fast, rows = run()
    with mock.patch.object(book_module, "_apply_updates", None):
        assert run()[0] == fast
    if case == "underlying-bid-zero":  # the underlying's price: no mid of a zero bid, its last
        assert rows[-1].underlying_price == 2.0


class _WatchedInstrument(book_module._Instrument):
    """A record type with its own attribute access: the C fast path must not read its slots
    directly (it goes through getattr / setattr, which count here)."""

    __slots__ = ()
    reads: ClassVar[Counter[str]] = Counter()

    def __getattribute__(self, name: str) -> Any:
        _WatchedInstrument.reads[name] += 1
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        _WatchedInstrument.reads["set " + name] += 1
        object.__setattr__(self, name, value)


@pytest.mark.skipif(not SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
def test_c_fast_path_reads_the_slots_of_plain_records_only() -> None:
    # The usual records (slotted dataclasses) are read and written through their slots; a record
    # type that overrides attribute access gets its getattr / setattr, and the same rows.
    def run(watched: bool) -> str:
        book = book_with(option(CALL, 2), option(CALL, -1, account="U2"), stock(10))
        if watched:
            for key, rec in list(book._instruments.items()):
                twin = _WatchedInstrument()
                for name in book_module._Instrument.__slots__:
                    object.__setattr__(twin, name, getattr(rec, name))
                book._instruments[key] = twin
            for rec in book._instruments.values():  # the underlying record the options point at
                contract = object.__getattribute__(rec, "contract")
                if contract is not None and contract.underlying_record is not None:
                    contract.underlying_record = book._instruments[("ibkr", "SPY")]
        out = book.apply(
            [
                update("SPY", 1, bid=500.0, ask=500.2),
                update(CALL, 2, bid=1.0, ask=1.2, **GREEKS),
                update(CALL, 3, mark=1.15, **GREEKS),
            ]
        )
        return repr((out.rows, book.portfolio()))

    _WatchedInstrument.reads.clear()
    plain = run(watched=False)
    assert not _WatchedInstrument.reads
    assert run(watched=True) == plain
    reads = _WatchedInstrument.reads
    assert reads["state"] >= 3, reads
    assert reads["fan"] >= 3, reads
    assert reads["set last_row"] >= 3, reads


class _Account(str):
    """An account name of a str subclass with instance attributes: a garbage-collected object."""

    note: str


@pytest.mark.skipif(not SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
def test_c_rows_of_atomic_values_are_not_tracked_by_the_garbage_collector() -> None:
    # A row holds str, float, int, None and date values only: it can be in no reference cycle,
    # so the C path untracks it (CPython untracks such plain tuples itself, never a NamedTuple's)
    # and the collector never walks a backlog of pending rows. A row holding a collected object
    # stays tracked, as before; the Python path's rows are left as they are.
    account = _Account("U2")
    account.note = "a collected object"
    assert gc.is_tracked(account)
    book = book_with(option(CALL, 2), option(CALL, -1, account=account))  # type: ignore[arg-type]
    rows = book.apply([update(CALL, 1, bid=1.0, ask=1.2, **GREEKS)]).rows
    assert [r.account for r in rows] == ["U1", "U2"]
    plain, collected = rows
    assert not gc.is_tracked(plain)
    assert gc.is_tracked(collected)
    assert (plain.expiry, plain.seq, plain.greeks_source) == (EXPIRY, 1, "broker")
    with mock.patch.object(book_module, "_apply_updates", None):
        python_rows = book.apply([update(CALL, 2, bid=1.0, ask=1.2, **GREEKS)]).rows
    assert all(gc.is_tracked(r) for r in python_rows)
    assert [r._replace(seq=1) for r in python_rows] == rows
