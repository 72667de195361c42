"""Market model: books, symbology, determinism, Greeks invariants, the seq ledger."""

from __future__ import annotations

import math
import re
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normalize.symbology import format_strike, occ_symbol, streamer_symbol
from simulator.market import BROKERS, Market, MarketConfig, SimPosition

START = 1_767_000_000.0  # a fixed instant: tests do not depend on today's date
OCC = re.compile(r"^[A-Z]{1,6} {0,5}\d{6}[CP]\d{8}$")


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(MarketConfig(seed=7), START)


def test_symbology_helpers() -> None:
    expiry = date(2025, 1, 17)
    assert occ_symbol("SPY", expiry, "C", 500.0) == "SPY   250117C00500000"
    assert occ_symbol("SPXW", expiry, "P", 5812.5) == "SPXW  250117P05812500"
    assert streamer_symbol("SPY", expiry, "C", 500.0) == ".SPY250117C500"
    assert streamer_symbol("SPXW", expiry, "P", 5812.5) == ".SPXW250117P5812.5"
    assert format_strike(412.5) == "412.5"
    assert format_strike(0.25) == "0.25"


def test_default_books(market: Market) -> None:
    for broker in BROKERS:
        positions = market.positions(broker)
        assert 20 <= len(positions) <= 60
        options = [p for p in positions if p.contract.asset_class == "OPT"]
        stocks = [p for p in positions if p.contract.asset_class == "STK"]
        assert stocks
        assert options
        assert {p.contract.right for p in options} == {"C", "P"}
        assert len({p.contract.expiry for p in options}) >= 3
        assert any(p.quantity < 0 for p in options)
        assert any(p.quantity > 0 for p in options)
        assert any(p.contract.root == "SPXW" and p.contract.underlying == "SPX" for p in options)
        assert any(p.contract.strike is not None and p.contract.strike % 1 for p in options)
        assert {p.account for p in positions} == set(market.accounts(broker))
        for p in options:
            c = p.contract
            assert OCC.match(c.key)
            assert len(c.key) == 21
            assert c.multiplier == 100.0
            assert market.by_conid[c.conid] is c
            assert market.by_streamer[c.streamer_symbol] is c
            assert c.expiry is not None
            assert c.expiry.weekday() == 4
            assert p.avg_cost > 0
    ibkr = {p.contract.key for p in market.positions("ibkr")}
    tasty = {p.contract.key for p in market.positions("tastytrade")}
    assert ibkr & tasty
    assert ibkr - tasty
    assert tasty - ibkr


def test_spx_is_an_index_underlying(market: Market) -> None:
    spx = market.contracts["SPX"]
    assert spx.asset_class == "IND"
    assert spx.streamer_symbol == "SPX"
    spxw = next(c for c in market.contracts.values() if c.root == "SPXW")
    assert market.underlying_contract(spxw) is spx


def test_conids_unique(market: Market) -> None:
    conids = [c.conid for c in market.contracts.values()]
    assert len(conids) == len(set(conids))


def test_scaled_book_and_accounts() -> None:
    m = Market(
        MarketConfig(positions=300, ibkr_accounts=("U1", "U2"), tastytrade_accounts=("5W1",)),
        START,
    )
    for broker in BROKERS:
        assert 280 <= len(m.positions(broker)) <= 320
    assert {p.account for p in m.positions("ibkr")} == {"U1", "U2"}
    keys = [p.contract.key for p in m.positions("ibkr")]
    assert len(keys) == len(set(keys))


def test_same_seed_same_book_and_values() -> None:
    a, b = Market(MarketConfig(seed=3), START), Market(MarketConfig(seed=3), START)
    assert a.positions("ibkr") == b.positions("ibkr")
    key = a.positions("ibkr")[-1].contract.key
    # evaluated in different orders: same values at the same instant
    later = b.peek(key, START + 500.0)
    assert a.peek(key, START + 3.0) == b.peek(key, START + 3.0)
    assert a.peek(key, START + 500.0) == later
    c = Market(MarketConfig(seed=4), START)
    assert c.spot("SPY", START + 60.0) != a.spot("SPY", START + 60.0)


@settings(max_examples=60, deadline=None)
@given(
    offset=st.floats(min_value=0.0, max_value=3600.0),
    index=st.integers(min_value=0, max_value=10_000),
)
def test_tick_invariants(market: Market, offset: float, index: int) -> None:
    positions = market.positions("ibkr") + market.positions("tastytrade")
    contract = positions[index % len(positions)].contract
    tick = market.peek(contract.key, START + offset)
    assert 0.0 <= tick.bid < tick.ask
    assert tick.bid <= tick.mark <= tick.ask
    assert tick.volume > 0
    assert tick.underlying_price > 0
    if contract.asset_class != "OPT":
        assert tick.delta == 1.0
        assert tick.gamma is tick.theta is tick.vega is tick.iv is None
        return
    assert tick.iv is not None
    assert 0.03 < tick.iv < 2.0
    assert tick.delta is not None
    assert tick.gamma is not None
    assert tick.theta is not None
    assert tick.vega is not None
    assert tick.rho is not None
    if contract.right == "C":
        assert 0.0 < tick.delta < 1.0
        assert tick.rho > 0
    else:
        assert -1.0 < tick.delta < 0.0
        assert tick.rho < 0
    assert tick.gamma > 0.0
    assert tick.vega > 0.0
    assert tick.theta < 0.0  # long options in the book lose value with time


@settings(max_examples=40, deadline=None)
@given(offset=st.floats(min_value=0.0, max_value=3600.0), index=st.integers(0, 10_000))
def test_put_call_parity_on_the_path(market: Market, offset: float, index: int) -> None:
    calls = [c for c in market.universe if c.right == "C"]
    call = calls[index % len(calls)]
    put_key = call.key[:12] + "P" + call.key[13:]
    put = next((c for c in market.universe if c.key == put_key), None)
    if put is None:
        return
    market._add(put)  # noqa: SLF001 - make the universe contract queryable
    market._add(call)  # noqa: SLF001
    now = START + offset
    c, p = market.peek(call.key, now), market.peek(put.key, now)
    expiry_ts = market.expiry_ts(call)
    assert expiry_ts is not None
    t = (expiry_ts - now) / (365 * 86400)
    assert call.strike is not None
    forward_gap = c.underlying_price - call.strike * math.exp(-market.config.rate * t)
    # mids are within half a spread of the model price
    tolerance = (c.ask - c.bid + p.ask - p.bid) / 2 + 0.02
    assert c.mark - p.mark == pytest.approx(forward_gap, abs=tolerance)


def test_same_contract_same_values_for_both_brokers(market: Market) -> None:
    shared = {p.contract.key for p in market.positions("ibkr")} & {
        p.contract.key for p in market.positions("tastytrade")
    }
    key = sorted(shared)[0]
    a = market.tick("ibkr", key, START + 42.0)
    b = market.tick("tastytrade", key, START + 42.0)
    assert (a.bid, a.ask, a.delta, a.iv, a.underlying_price) == (
        b.bid,
        b.ask,
        b.delta,
        b.iv,
        b.underlying_price,
    )


def test_seq_ledger() -> None:
    m = Market(MarketConfig(), START)
    key = m.positions("ibkr")[0].contract.key
    seqs = [m.tick("ibkr", key, START + i).seq for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert m.peek(key, START + 9, broker="ibkr").seq == 5
    assert m.tick("tastytrade", key, START + 9).seq == 1
    assert m.ledger("ibkr") == {("ibkr", key): 5}
    assert m.ledger() == {("ibkr", key): 5, ("tastytrade", key): 1}
    assert m.peek(key, START + 9).seq == 5  # highest over brokers


def test_ticks_same_values_consecutive_seqs() -> None:
    m = Market(MarketConfig(), START)
    key = m.positions("tastytrade")[0].contract.key
    m.tick("tastytrade", key, START)
    greeks, quote, trade = m.ticks("tastytrade", key, START + 1, 3)
    assert [t.seq for t in (greeks, quote, trade)] == [2, 3, 4]
    assert greeks.delta == quote.delta == trade.delta
    assert greeks.bid == quote.bid
    assert m.ledger("tastytrade") == {("tastytrade", key): 4}
    assert m.ticks("tastytrade", key, START + 2, 0) == []
    timed = Market(MarketConfig(record_times=True, seq_offset=10), START)
    timed.ticks("tastytrade", key, START + 1, 2)
    timed.tick("tastytrade", key, START + 2)
    assert timed.emissions("tastytrade")[("tastytrade", key)] == [START + 1, START + 1, START + 2]
    assert timed.ledger("tastytrade") == {("tastytrade", key): 13}


def test_set_positions_at_run_time() -> None:
    m = Market(MarketConfig(), START)
    book = m.positions("tastytrade")
    new = m.option("QQQ", m.expiries[0], "P", 425.0)
    assert new.key not in m.contracts
    m.set_positions("tastytrade", [*book[1:], SimPosition("tastytrade", "5WT00001", new, -2.0, 3.1)])
    keys = [p.contract.key for p in m.positions("tastytrade")]
    assert new.key in keys
    assert len(keys) == len(book)
    assert m.contracts[new.key] is new
    assert m.by_streamer[new.streamer_symbol] is new
    assert m.tick("tastytrade", new.key, START).delta is not None
    with pytest.raises(ValueError):
        m.set_positions("ibkr", [SimPosition("tastytrade", "5WT00001", new, 1.0, 1.0)])
    with pytest.raises(ValueError):
        m.set_positions("schwab", [])


def test_path_moves_but_stays_reasonable(market: Market) -> None:
    start = market.spot("SPY", START)
    assert start == pytest.approx(500.0)
    hour = market.spot("SPY", START + 3600)
    assert hour != start
    assert 0.8 < hour / start < 1.25


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        MarketConfig(positions=-1)
    with pytest.raises(ValueError):
        MarketConfig(ibkr_accounts=())
    with pytest.raises(ValueError):
        Market(MarketConfig(), START).positions("schwab")
