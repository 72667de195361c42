"""Cross-broker consistency: the same contract held at both simulated brokers, ticked at the same
instant, goes through each broker's wire encoding (the simulators' own), codec and mapper, and the
book: the same key and the same values within the precision each wire carries."""

from __future__ import annotations

import math

import orjson
import pytest
from tastytrade.account import CurrentPosition

from actors.tastytrade.protocol import DxLinkProtocol, FeedData
from normalize.book import Book
from normalize.events import InstrumentUpdate, PositionsSnapshot
from normalize.ibkr import instrument_update, map_positions
from normalize.model import GreeksSnapshot
from normalize.tastytrade import map_feed
from normalize.tastytrade import map_positions as tt_map_positions
from simulator.dxlink_protocol import DxLinkServerProtocol
from simulator.ibkr import IbkrGateway, IbkrOptions, market_fields
from simulator.market import Market, MarketConfig, SimContract
from simulator.tastytrade import TastytradeSim, _DayStats, build_events

START = 1_767_000_000.0
T = START + 42.0


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(MarketConfig(seed=11), START)


def shared_contracts(market: Market) -> list[SimContract]:
    ib = {p.contract.key for p in market.positions("ibkr")}
    return [p.contract for p in market.positions("tastytrade") if p.contract.key in ib]


def ibkr_updates(
    market: Market, contracts: list[SimContract]
) -> tuple[PositionsSnapshot, list[InstrumentUpdate]]:
    """IBKR: positions rows as the gateway serves them, smd frames as it sends them (JSON text)."""
    gateway = IbkrGateway(market)
    rows = [gateway._position_row(p, T) for p in market.positions("ibkr")]
    mapped = map_positions(orjson.loads(orjson.dumps(rows)))
    snapshot = PositionsSnapshot("ibkr", tuple(market.accounts("ibkr")), mapped.positions, T)
    by_key = {c.key: conid for conid, c in mapped.contracts.items()}
    updates = []
    for contract in [
        *{market.underlying_contract(c).key: market.underlying_contract(c) for c in contracts}.values(),
        *contracts,
    ]:
        tick = market.tick("ibkr", contract.key, T)
        underlying = market.underlying_contract(contract)
        fields = market_fields(
            contract,
            tick,
            prior_close=tick.last,
            underlying_conid=underlying.conid,
            underlying_iv=market.specs[contract.underlying].vol,
            options=IbkrOptions(),
            with_greeks=True,
        )
        frame = orjson.loads(
            orjson.dumps(
                {
                    "topic": f"smd+{contract.conid}",
                    "conid": contract.conid,
                    "_updated": int(T * 1000),
                    **fields,
                }
            )
        )
        key = mapped.underlyings.get(frame["conid"]) or mapped.contracts[frame["conid"]].key
        assert key == contract.key
        if contract.asset_class == "OPT":
            assert by_key[key] == contract.conid  # conid <-> key both ways
        updates.append(
            instrument_update(key, frame, updated_ms=frame["_updated"], seq=tick.seq, received_ts=T)
        )
    return snapshot, updates


def tastytrade_updates(
    market: Market, contracts: list[SimContract]
) -> tuple[PositionsSnapshot, list[InstrumentUpdate]]:
    """Tastytrade: positions as the REST API serves them (through the SDK's model), events as the
    DXLink server encodes them (COMPACT), decoded by the engine's codec."""
    sim = TastytradeSim(market)
    positions = [
        CurrentPosition(**orjson.loads(orjson.dumps(sim._position_json(p))))
        for p in market.positions("tastytrade")
    ]
    mapped = tt_map_positions(positions)
    snapshot = PositionsSnapshot("tastytrade", tuple(market.accounts("tastytrade")), mapped.positions, T)
    server = DxLinkServerProtocol(validate_token=lambda _t: "user", now=0.0)
    client = DxLinkProtocol(token="t", subscriptions=[], now=0.0)
    for _ in range(4):
        for text in client.data_to_send():
            server.receive_text(text, 0.0)
        for text in server.data_to_send():
            client.receive_text(text, 0.0)
    assert client.streaming
    client.events_received()
    underlyings = {market.underlying_contract(c).key: market.underlying_contract(c) for c in contracts}
    symbols = {c.streamer_symbol: c.key for c in [*underlyings.values(), *contracts]}
    for contract in [*underlyings.values(), *contracts]:
        tick = market.tick("tastytrade", contract.key, T)
        stats = _DayStats(tick.last, tick.last, tick.last, tick.last, tick.last)
        types = ("Greeks", "Quote") if contract.asset_class == "OPT" else ("Quote", "Trade")
        events = build_events(contract, tick, stats, types)
        for event_type in types:
            server.feed_data(1, event_type, [events[event_type]], 0.0)
    for text in server.data_to_send():
        client.receive_text(text, 0.0)
    updates: list[InstrumentUpdate] = []
    for event in client.events_received():
        if isinstance(event, FeedData):
            map_feed(event, symbols, T, updates.append)
    return snapshot, updates


def latest(rows: list[GreeksSnapshot]) -> dict[tuple[str, str], GreeksSnapshot]:
    return {(r.account, r.instrument): r for r in rows}


def test_the_same_contract_has_the_same_key_and_values_at_both_brokers(market: Market) -> None:
    contracts = shared_contracts(market)
    assert any(c.root == "SPXW" for c in contracts)  # SPXW on SPX, fractional strikes: the hard cases
    assert any(c.strike is not None and not float(c.strike).is_integer() for c in contracts)
    book = Book()
    ib_snapshot, ib_updates = ibkr_updates(market, contracts)
    tt_snapshot, tt_updates = tastytrade_updates(market, contracts)
    ib_rows = book.apply([ib_snapshot, *ib_updates]).rows
    tt_rows = book.apply([tt_snapshot, *tt_updates]).rows
    ib_last = {r.instrument: r for r in ib_rows}
    tt_last = {r.instrument: r for r in tt_rows}
    keys = {c.key for c in contracts}
    assert sum(c.asset_class == "OPT" for c in contracts) >= 5
    assert keys <= set(ib_last)
    assert keys <= set(tt_last)
    for key in keys:
        a, b = ib_last[key], tt_last[key]
        assert (a.underlying, a.asset_class, a.right, a.strike, a.expiry, a.multiplier) == (
            b.underlying,
            b.asset_class,
            b.right,
            b.strike,
            b.expiry,
            b.multiplier,
        )
        # Prices: both wires carry cents.
        assert (a.bid, a.ask) == (b.bid, b.ask)
        assert a.mark == pytest.approx(b.mark, abs=1e-9)
        assert a.underlying_price == pytest.approx(
            b.underlying_price, abs=0.011
        )  # IBKR quotes the index to cents
        if a.asset_class != "OPT":  # a stock held at both: delta 1 per share, nothing else
            assert (a.delta, a.gamma, a.iv) == (b.delta, b.gamma, b.iv) == (1.0, None, None)
            continue
        # IV: IBKR sends a percent with two decimals, DXLink the fraction itself.
        assert a.iv == pytest.approx(b.iv, abs=0.5e-4 + 1e-12)
        # Greeks: IBKR sends about four significant digits; theta per day and vega per point on both.
        for name in ("delta", "gamma", "theta", "vega"):
            x, y = getattr(a, name), getattr(b, name)
            assert x is not None
            assert y is not None
            assert math.isclose(x, y, rel_tol=2e-3, abs_tol=1e-9), (key, name, x, y)
        assert a.greeks_source == b.greeks_source == "broker"
        assert a.rho is None  # IBKR sends no rho...
        assert b.rho is not None  # ...DXLink does
