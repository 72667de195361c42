"""Conformance: the installed ``tastytrade`` SDK's own Session and DXLinkStreamer work against the
simulator. This is the proof that the REST shapes and the DXLink side are faithful; keep it."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import pytest
import tastytrade.session
from tastytrade import Account, DXLinkStreamer, Session
from tastytrade.dxfeed import Greeks, Quote
from tastytrade.instruments import Equity, NestedOptionChain, Option, get_option_chain
from tastytrade.order import InstrumentType
from tastytrade.utils import TastytradeError

from simulator.faults import Fault
from simulator.market import Market, MarketConfig
from simulator.tastytrade import TastytradeSim

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def market() -> Market:
    return Market(MarketConfig(rate_hz=10.0), time.time())


@pytest.fixture
async def sim(market: Market, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TastytradeSim]:
    async with TastytradeSim(
        market, provider_secret="provider-secret", refresh_token="refresh-token"
    ) as server:
        # Session() reads its base URL from this module constant
        monkeypatch.setattr(tastytrade.session, "API_URL", server.api_url)
        yield server


@pytest.fixture
async def session(sim: TastytradeSim) -> AsyncIterator[Session]:
    async with Session("provider-secret", "refresh-token") as s:
        yield s


def _close_streams(streamer: DXLinkStreamer) -> None:
    # the SDK never closes its per-type memory streams; close them so no ResourceWarning fires
    for send in streamer._send.values():
        send.close()
    for recv in streamer._recv.values():
        recv.close()


async def test_session_accounts_positions_instruments(session: Session, market: Market) -> None:
    """OAuth refresh, accounts, positions and the streamer-symbol lookups through the SDK."""
    accounts = await Account.get(session)
    assert [a.account_number for a in accounts] == market.accounts("tastytrade")
    positions = await accounts[0].get_positions(session)
    expected = {p.contract.key: p for p in market.positions("tastytrade")}
    assert {p.symbol for p in positions} == set(expected)
    for pos in positions:
        sim_pos = expected[pos.symbol]
        signed = pos.quantity if pos.quantity_direction == "Long" else -pos.quantity
        assert signed == Decimal(str(sim_pos.quantity))
        assert pos.multiplier == Decimal(int(sim_pos.contract.multiplier))
        assert pos.average_open_price == pytest.approx(Decimal(str(sim_pos.avg_cost)))
        if sim_pos.contract.asset_class == "OPT":
            assert pos.instrument_type == InstrumentType.EQUITY_OPTION
            option = await Option.get(session, pos.symbol)
            assert option.streamer_symbol == sim_pos.contract.streamer_symbol
            assert Option.occ_to_streamer_symbol(pos.symbol) == sim_pos.contract.streamer_symbol
        else:
            assert pos.instrument_type == InstrumentType.EQUITY
    spx = await Equity.get(session, "SPX")
    assert spx.is_index
    assert spx.streamer_symbol == "SPX"
    (chain,) = await NestedOptionChain.get(session, "SPX")
    assert chain.root_symbol == "SPXW"
    assert chain.expirations
    assert chain.expirations[0].strikes[0].call_streamer_symbol.startswith(".SPXW")
    flat = await get_option_chain(session, "SPY")
    assert all(o.underlying_symbol == "SPY" for options in flat.values() for o in options)
    assert await session.validate()


async def test_wrong_credentials_raise(sim: TastytradeSim) -> None:
    """A wrong refresh token is an SDK TastytradeError, not a crash."""
    async with Session("provider-secret", "wrong") as bad:
        with pytest.raises(TastytradeError, match="invalid_grant"):
            await Account.get(bad)


async def test_streamer_greeks_and_quotes(session: Session, market: Market) -> None:
    """DXLinkStreamer subscribes to Greeks and Quote and receives valid, consistent events."""
    options = [p.contract for p in market.positions("tastytrade") if p.contract.asset_class == "OPT"]
    by_symbol = {c.streamer_symbol: c for c in options}
    streamer = DXLinkStreamer(session)
    greeks: dict[str, list[Greeks]] = {}
    quotes: dict[str, Quote] = {}
    try:
        async with streamer:
            await streamer.subscribe(Greeks, list(by_symbol))
            await streamer.subscribe(Quote, list(by_symbol) + ["SPY", "SPX"])
            with anyio.fail_after(20):
                while len(greeks) < len(by_symbol) or any(len(v) < 2 for v in greeks.values()):
                    event = await streamer.get_event(Greeks)
                    greeks.setdefault(event.event_symbol, []).append(event)
                while len(quotes) < len(by_symbol) + 2:
                    quote = await streamer.get_event(Quote)
                    quotes[quote.event_symbol] = quote
            await streamer.unsubscribe(Quote, ["SPY"])
            await streamer.unsubscribe_all(Greeks)
    finally:
        _close_streams(streamer)

    for symbol, events in greeks.items():
        contract = by_symbol[symbol]
        sequences = [e.sequence for e in events]
        assert sequences == sorted(sequences)
        assert len(set(sequences)) == len(sequences)
        last = events[-1]
        # values are the market model's at the event's time (Black-Scholes on the same path)
        tick = market.peek(contract.key, last.time / 1000.0)
        assert float(last.delta) == pytest.approx(tick.delta, rel=1e-3, abs=1e-4)
        assert float(last.volatility) == pytest.approx(market.model_iv(contract.key))
        if contract.right == "C":
            assert 0 < last.delta < 1
        else:
            assert -1 < last.delta < 0
        assert last.gamma > 0
        assert last.vega > 0
        assert last.theta < 0
        assert math.isfinite(float(last.price))
    for symbol, quote in quotes.items():
        assert quote.bid_price <= quote.ask_price
        if symbol == "SPX":
            assert quote.bid_size == 0  # "NaN" sizes for an index become the SDK default
        else:
            assert quote.bid_size > 0


async def test_sdk_follows_switch_to_full(session: Session, sim: TastytradeSim, market: Market) -> None:
    """After an unsolicited switch to FULL the SDK keeps parsing (it reads both formats)."""
    symbol = next(
        p.contract.streamer_symbol for p in market.positions("tastytrade") if p.contract.asset_class == "OPT"
    )
    streamer = DXLinkStreamer(session)
    try:
        async with streamer:
            await streamer.subscribe(Greeks, [symbol])
            with anyio.fail_after(10):
                first = await streamer.get_event(Greeks)
                sim.faults.inject(Fault.SWITCH_TO_FULL, count=1)
                while (await streamer.get_event(Greeks)).sequence <= first.sequence + 3:
                    pass
            assert sim.faults.triggered[Fault.SWITCH_TO_FULL] == 1
    finally:
        _close_streams(streamer)


async def test_oversized_subscription_is_1009_for_the_sdk(session: Session, sim: TastytradeSim) -> None:
    """A subscription frame above the cap closes with 1009, which the SDK reports as such."""
    sim.max_message_size = 4096
    streamer = DXLinkStreamer(session)

    async def subscribe_too_much() -> None:
        async with streamer:
            await streamer.subscribe(Quote, [f"SYM{i}" for i in range(1000)])
            with anyio.fail_after(10):
                await streamer.get_event(Quote)

    try:
        with pytest.raises(TastytradeError, match="too long"):
            await subscribe_too_much()
    finally:
        _close_streams(streamer)
