"""The pure Tastytrade mapper: SDK positions -> UnifiedPositions, the subscription plan, decoded
DXLink events -> InstrumentUpdates in canonical units."""

from __future__ import annotations

import itertools
import json
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from tastytrade.account import CurrentPosition

from actors.tastytrade.protocol import (
    EVENT_FIELDS,
    REQUESTED_FIELDS,
    DxLinkProtocol,
    FeedData,
    Greeks,
    Quote,
    Trade,
)
from normalize.events import InstrumentUpdate
from normalize.model import AssetClass, Right, UnifiedPosition
from normalize.steps import finish
from normalize.tastytrade import (
    BROKER,
    SubscriptionPlan,
    map_feed,
    map_positions,
    map_positions_steps,
    positions_snapshot,
    subscription_plan,
)
from simulator.dxlink_protocol import DxLinkServerProtocol
from simulator.market import Market, MarketConfig
from simulator.tastytrade import _DayStats, build_events

# The positions docs example (reference/dxlink.md §1.4), as the SDK parses it
DOCS_POSITION: dict[str, Any] = json.loads(
    """{"account-number":"5WT00000","symbol":"AAPL","instrument-type":"Equity","underlying-symbol":"AAPL",
    "quantity":"100","quantity-direction":"Long","close-price":"282.48","average-open-price":"288.7",
    "average-daily-market-close-price":"282.48","multiplier":1,"cost-effect":"Credit","is-suppressed":false,
    "is-frozen":false,"realized-day-gain":"0.0","realized-day-gain-effect":"None","realized-today":"0.0",
    "realized-today-effect":"None","created-at":"2022-08-22T17:56:51.872+00:00",
    "updated-at":"2022-11-01T21:49:54.095+00:00"}"""
)


def position(**overrides: Any) -> CurrentPosition:
    return CurrentPosition(**(DOCS_POSITION | overrides))


def option(symbol: str, underlying: str, quantity: str, direction: str, **extra: Any) -> CurrentPosition:
    return position(
        symbol=symbol,
        **{
            "instrument-type": "Equity Option",
            "underlying-symbol": underlying,
            "quantity": quantity,
            "quantity-direction": direction,
            "multiplier": 100,
            "average-open-price": "4.25",
            "expires-at": "2025-01-17T21:15:00.000+00:00",
            **extra,
        },
    )


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize("step", [1, 2, 5])
def test_map_positions_in_steps_maps_the_same_and_yields_every_step_rows(step: int) -> None:
    rows = [
        position(),
        option("SPY   250117C00440000", "SPY", "2", "Long"),
        option("SPY   250117P00400000", "SPY", "0", "Zero"),
        position(**{"instrument-type": "Bond", "symbol": "XYZ"}),
        option("QQQ   250117C00400000", "QQQ", "3", "Short"),
    ]
    yields = sum(1 for _ in map_positions_steps(rows, step=step))
    mapped = finish(map_positions_steps(rows, step=step))
    assert yields == len(rows) // step
    assert mapped == map_positions(rows)
    assert (len(mapped.positions), mapped.closed, len(mapped.skipped)) == (3, 1, 1)


def test_docs_stock_position() -> None:
    mapped = map_positions([position()])
    assert mapped.positions == (
        UnifiedPosition(
            broker="tastytrade",
            account="5WT00000",
            instrument="AAPL",
            underlying="AAPL",
            asset_class=AssetClass.STOCK,
            right=None,
            strike=None,
            expiry=None,
            multiplier=1.0,
            quantity=100.0,
            avg_cost=288.7,
        ),
    )
    assert mapped.skipped == ()


def test_options_long_short_fractional_and_spxw() -> None:
    rows = [
        option("SPY   250117C00500000", "SPY", "3", "Long"),
        option("SPXW  240119P04712500", "SPX", "2", "Short"),
        option("F     250117C00012500", "F", "1", "Long"),
    ]
    spy, spxw, ford = map_positions(rows).positions
    assert (spy.instrument, spy.quantity, spy.multiplier, spy.avg_cost) == (
        "SPY   250117C00500000",
        3.0,
        100.0,
        4.25,
    )
    assert (spy.right, spy.strike, spy.expiry) == (Right.CALL, 500.0, date(2025, 1, 17))
    assert spy.asset_class is AssetClass.OPTION
    assert (spxw.instrument, spxw.underlying, spxw.quantity) == ("SPXW  240119P04712500", "SPX", -2.0)
    assert (spxw.right, spxw.strike) == (Right.PUT, 4712.5)
    assert ford.strike == 12.5


def test_unpadded_occ_symbol_is_normalized() -> None:
    (pos,) = map_positions([option("SPY250117C00500000", "SPY", "1", "Long")]).positions
    assert pos.instrument == "SPY   250117C00500000"


def test_short_stock_closed_and_unsupported_rows() -> None:
    rows = [
        position(**{"quantity-direction": "Short", "quantity": "50"}),
        position(**{"quantity-direction": "Zero", "quantity": "0", "symbol": "MSFT"}),
        position(**{"instrument-type": "Future", "symbol": "/ESZ4", "underlying-symbol": "/ES"}),
        position(**{"instrument-type": "Cryptocurrency", "symbol": "BTC/USD"}),
        position(**{"quantity-direction": "Sideways"}),
        option("NOT AN OCC", "SPY", "1", "Long"),
    ]
    mapped = map_positions(rows)
    assert [(p.instrument, p.quantity) for p in mapped.positions] == [("AAPL", -50.0)]
    assert mapped.closed == 1
    assert mapped.skipped == (
        "5WT00000 /ESZ4: instrument type 'Future' is not streamed by this version",
        "5WT00000 BTC/USD: instrument type 'Cryptocurrency' is not streamed by this version",
        "5WT00000 AAPL: unknown quantity-direction 'Sideways'",
        "5WT00000 NOT AN OCC: option symbol 'NOT AN OCC' is not an OCC symbol",
    )


def test_positions_snapshot_names_every_account() -> None:
    (pos,) = map_positions([position()]).positions
    snap = positions_snapshot(["5WT00000", "5WT00001"], [pos], 1700000000.0)
    assert (snap.broker, snap.accounts, snap.positions, snap.as_of) == (
        BROKER,
        ("5WT00000", "5WT00001"),
        (pos,),
        1700000000.0,
    )


# --------------------------------------------------------------------------- subscriptions


def test_subscription_plan_options_underlyings_and_stocks() -> None:
    positions = map_positions(
        [
            option("SPXW  240119P04712500", "SPX", "2", "Short"),
            option("SPY   250117C00500000", "SPY", "1", "Long"),
            position(symbol="IWM", **{"underlying-symbol": "IWM"}),
        ]
    ).positions
    plan = subscription_plan(positions, {"SPY   250117C00500000": ".SPY250117C500"})
    assert plan.items == {
        ("Greeks", ".SPXW240119P4712.5"),
        ("Quote", ".SPXW240119P4712.5"),
        ("Quote", "SPX"),  # the index underlying, not held
        ("Trade", "SPX"),
        ("Greeks", ".SPY250117C500"),
        ("Quote", ".SPY250117C500"),
        ("Quote", "SPY"),
        ("Trade", "SPY"),
        ("Quote", "IWM"),
        ("Trade", "IWM"),
    }
    assert plan.keys == {
        ".SPXW240119P4712.5": "SPXW  240119P04712500",
        "SPX": "SPX",
        ".SPY250117C500": "SPY   250117C00500000",
        "SPY": "SPY",
        "IWM": "IWM",
    }


def test_the_apis_streamer_symbol_wins() -> None:
    (pos,) = map_positions([option("SPXW  240119P04712500", "SPX", "1", "Long")]).positions
    plan = subscription_plan([pos], {"SPXW  240119P04712500": ".SPXW240119P4712.5X", "SPX": "$SPX"})
    assert ("Greeks", ".SPXW240119P4712.5X") in plan.items
    assert ("Trade", "$SPX") in plan.items
    assert plan.keys[".SPXW240119P4712.5X"] == "SPXW  240119P04712500"
    assert plan.keys["$SPX"] == "SPX"
    unknown = subscription_plan([pos], {"SPXW  240119P04712500": ""})  # looked up, not found
    assert ("Greeks", ".SPXW240119P4712.5") in unknown.items


def test_plan_diff() -> None:
    old = SubscriptionPlan(frozenset({("Quote", "SPY"), ("Trade", "SPY")}), {})
    new = SubscriptionPlan(frozenset({("Quote", "SPY"), ("Quote", "QQQ")}), {})
    assert old.diff(new) == ([("Quote", "QQQ")], [("Trade", "SPY")])


# --------------------------------------------------------------------------- events

KEY = "SPY   250117C00500000"
SYMBOLS = {".SPY250117C500": KEY, "SPY": "SPY"}
RECEIVED = 1_700_000_000.5


def mapped(data: FeedData, symbols: dict[str, str] = SYMBOLS) -> tuple[list[InstrumentUpdate], int]:
    out: list[InstrumentUpdate] = []
    unknown = map_feed(data, symbols, RECEIVED, out.append)
    return out, unknown


def greeks(**values: Any) -> Greeks:
    base: dict[str, Any] = dict.fromkeys(Greeks._fields)
    return Greeks(**(base | {"event_symbol": ".SPY250117C500"} | values))


ALL_GREEKS = frozenset(EVENT_FIELDS["Greeks"])


def test_greeks_to_canonical_fields() -> None:
    ev = greeks(
        event_time=0,
        time=1684559855338,
        sequence=7,
        price=26.338,
        volatility=0.397,
        delta=0.9999,
        gamma=4.8e-12,
        theta=-2.5e-12,
        rho=0.0183,
        vega=3.7e-12,
    )
    (update,), unknown = mapped(FeedData(1, "Greeks", [ev], ALL_GREEKS))
    assert unknown == 0
    assert update == InstrumentUpdate(
        "tastytrade",
        KEY,
        1684559855.338,
        RECEIVED,
        7,
        {
            "mark": 26.338,
            "iv": 0.397,
            "delta": 0.9999,
            "gamma": 4.8e-12,
            "theta": -2.5e-12,
            "vega": 3.7e-12,
            "rho": 0.0183,
        },
    )


def test_nan_clears_and_fields_not_carried_are_absent() -> None:
    ev = greeks(volatility=0.859, delta=0.679, gamma=None, theta=-0.026, rho=0.006, vega=0.015)
    carried = frozenset({"eventSymbol", "volatility", "delta", "gamma", "theta", "rho", "vega"})
    (update,), _ = mapped(FeedData(1, "Greeks", [ev], carried))
    assert update.values == {
        "iv": 0.859,
        "delta": 0.679,
        "gamma": None,
        "theta": -0.026,
        "vega": 0.015,
        "rho": 0.006,
    }
    assert "mark" not in update.values  # price not carried: unchanged, not cleared
    assert (update.event_ts, update.seq) == (RECEIVED, None)  # no times carried: receive time


@pytest.mark.parametrize(
    ("event_time", "time", "expected"),
    [
        (1700000001000, 1700000000000, 1700000001.0),  # eventTime wins when non-zero
        (0, 1700000000250, 1700000000.25),  # else the event's time
        (0, 0, RECEIVED),  # else the receive time
        (None, None, RECEIVED),
        (0, 10**14, RECEIVED),  # not a time
        (0, -5, RECEIVED),
    ],
)
def test_event_time(event_time: int | None, time: int | None, expected: float) -> None:
    (update,), _ = mapped(
        FeedData(1, "Greeks", [greeks(event_time=event_time, time=time, delta=0.5)], ALL_GREEKS)
    )
    assert update.event_ts == expected


_TIMES = [1700000000100, 1700000000300, 0, -5, 10**14, 1700000000250.0, None, "NaN", True]


@pytest.mark.parametrize("event_time", [0, None, 1700000001000])
def test_quote_time_is_the_later_valid_time_whatever_the_types(event_time: Any) -> None:
    # The mapper reads the usual shapes inline; every shape must give what the general rule gives:
    # eventTime when non-zero, else the later of bidTime and askTime that is a time, else receive.
    def valid(ms: Any) -> float | None:
        ok = type(ms) in (int, float) and 0 < ms < 10**13
        return ms / 1000.0 if ok else None

    for bid, ask in itertools.product(_TIMES, _TIMES):
        quote = Quote("SPY", event_time, 12, None, bid, ask, 500.01, 500.03, None, None, None, None)
        (q,), _ = mapped(FeedData(1, "Quote", [quote], frozenset(EVENT_FIELDS["Quote"])))
        times = [t for t in (valid(bid), valid(ask)) if t is not None]
        expected = valid(event_time) or (max(times) if times else RECEIVED)
        assert q.event_ts == expected, (event_time, bid, ask)


def test_quote_and_trade() -> None:
    quote = Quote("SPY", 0, 12, None, 1700000000100, 1700000000300, 500.01, None, None, None, None, None)
    fields = frozenset(REQUESTED_FIELDS["Quote"])
    (q,), _ = mapped(FeedData(1, "Quote", [quote], fields))
    assert (q.instrument, q.values, q.seq, q.event_ts) == (
        "SPY",
        {"bid": 500.01, "ask": None},
        12,
        1700000000.3,
    )
    trade = Trade("SPY", 0, 1700000000500, None, 13, None, 500.02, None, None, None, None, None, None, None)
    (t,), _ = mapped(FeedData(1, "Trade", [trade], frozenset(REQUESTED_FIELDS["Trade"])))
    assert (t.values, t.seq, t.event_ts) == ({"last": 500.02}, 13, 1700000000.5)


def test_unknown_symbols_are_counted_not_mapped() -> None:
    events = [greeks(delta=0.1), greeks(event_symbol=".QQQ250117C400", delta=0.2)]
    out, unknown = mapped(FeedData(1, "Greeks", events, ALL_GREEKS))
    assert [u.instrument for u in out] == [KEY]
    assert unknown == 1


@pytest.mark.parametrize(
    ("raw", "seq"), [(5, 5), (5.0, 5), (5.5, None), (-1, None), (2**64, None), (None, None)]
)
def test_sequence(raw: Any, seq: int | None) -> None:
    (update,), _ = mapped(FeedData(1, "Greeks", [greeks(sequence=raw, delta=0.1)], ALL_GREEKS))
    assert update.seq == seq


def test_frames_without_value_fields_map_to_nothing() -> None:
    out, _ = mapped(FeedData(1, "Greeks", [greeks(delta=0.1)], frozenset({"eventSymbol", "time"})))
    assert out == []


def test_simulator_events_through_the_codec_equal_the_market_values() -> None:
    """The simulator's own Greeks and Quote events for a contract, encoded as COMPACT by its server
    protocol and decoded by the client codec, map to the market model's values at that instant."""
    market = Market(MarketConfig(seed=3), start_ts=1_750_000_000.0)
    contract = next(p.contract for p in market.positions("tastytrade") if p.contract.asset_class == "OPT")
    tick = market.tick("tastytrade", contract.key, 1_750_000_010.0)
    stats = _DayStats(tick.last, tick.last, tick.last, tick.last, tick.last)
    events = build_events(contract, tick, stats, ("Greeks", "Quote"))
    server = DxLinkServerProtocol(validate_token=lambda t: "u", now=0.0)
    client = DxLinkProtocol(token="t", subscriptions=[], now=0.0)
    for text in client.data_to_send():
        server.receive_text(text, 0.0)
    for _ in range(3):  # AUTH, CHANNEL_REQUEST, FEED_SETUP go back and forth
        for text in server.data_to_send():
            client.receive_text(text, 0.0)
        for text in client.data_to_send():
            server.receive_text(text, 0.0)
    assert client.streaming
    client.events_received()
    for event_type in ("Greeks", "Quote"):
        server.feed_data(1, event_type, [events[event_type]], 0.0)
    for text in server.data_to_send():
        client.receive_text(text, 0.0)
    out: list[InstrumentUpdate] = []
    for ev in client.events_received():
        if isinstance(ev, FeedData):
            map_feed(ev, {contract.streamer_symbol: contract.key}, RECEIVED, out.append)
    g, q = out
    assert g.instrument == q.instrument == contract.key
    assert g.values == {
        "mark": tick.mark,
        "iv": tick.iv,
        "delta": tick.delta,
        "gamma": tick.gamma,
        "theta": tick.theta,
        "vega": tick.vega,
        "rho": tick.rho,
    }
    assert q.values == {"bid": tick.bid, "ask": tick.ask}
    assert g.event_ts == q.event_ts == pytest.approx(tick.ts)
    assert g.seq == q.seq == tick.seq


def test_decimal_quantities_from_the_sdk() -> None:
    (pos,) = map_positions([position(quantity=Decimal("2.5"))]).positions  # fractional shares
    assert pos.quantity == 2.5
