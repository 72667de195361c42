"""IBKR positions rows and frame fields -> canonical keys, positions and update values."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from normalize.ibkr import (
    IbkrMappingError,
    IvScale,
    contract_from_row,
    instrument_update,
    lacking_secdef_steps,
    map_positions,
    map_positions_steps,
    needs_secdef,
    parse_iv,
    parse_last,
    parse_number,
    position_from_row,
    update_values,
)
from normalize.model import AssetClass, Right
from normalize.steps import finish
from normalize.symbology import occ_symbol

DATA = Path(__file__).resolve().parents[2] / "data" / "ibkr"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


OPTION_ROW: dict[str, Any] = load("rest_positions.json")["option_row"]


def stock_row(**overrides: Any) -> dict[str, Any]:
    """A stock row: the documented option row's shape with the stock facts recorded live."""
    row = {
        **OPTION_ROW,
        **load("rest_positions.json")["stock_row_facts"],
        "conid": 265598,
        "contractDesc": "AAPL",
        "assetClass": "STK",
        "ticker": "AAPL",
        "position": 300,
        "avgPrice": 190.25,
        "avgCost": 190.25,
        "fullName": "AAPL",
        "undSym": None,
        "lastTradingDay": None,
    }
    row.update(overrides)
    return row


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", load("ws_formats.json")["values"], ids=lambda c: f"{c['field']}={c['raw']}")
def test_recorded_value_formats(case: dict[str, Any]) -> None:
    assert parse_number(case["raw"]) == pytest.approx(case["number"])


@pytest.mark.parametrize(
    "raw", ["", "   ", None, "N/A", "-", "nan", "NaN", "inf", True, False, [], {}, "1,30", "K"]
)
def test_no_value_is_none_never_zero(raw: object) -> None:
    assert parse_number(raw) is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1,300.5", 1300.5), ("-0.282", -0.282), ("18.52%", 18.52), ("0", 0.0), (3, 3.0), ("2.5m", 2.5e6)],
)
def test_numbers(raw: object, value: float) -> None:
    assert parse_number(raw) == pytest.approx(value)


def test_last_price_prefixes() -> None:
    for case in load("ws_formats.json")["last_prefixes"]:
        assert parse_last(case["raw"]) == case["last"]
    assert parse_last("H12.30") == 12.3  # halted
    assert parse_last("271.67") == 271.67
    assert parse_last("C") is None
    assert parse_last("") is None
    assert parse_number("C271.50") is None  # the prefix belongs to field 31 only


def test_iv_readings() -> None:
    for case in load("ws_formats.json")["iv_7633"]:
        assert parse_iv(case["raw"]) == pytest.approx(case["fraction"])
    assert parse_iv("18.52%") == pytest.approx(0.1852)
    assert parse_iv("1.8%") == pytest.approx(0.018)  # a percent sign always wins
    assert parse_iv("1.85") == pytest.approx(1.85)  # 185 % as a fraction: up to 2.0
    assert parse_iv("2.5") == pytest.approx(0.025)  # above 2.0: a percent
    assert parse_iv("0.32", IvScale.PERCENT) == pytest.approx(0.0032)
    assert parse_iv("32.5", IvScale.FRACTION) == pytest.approx(32.5)
    for raw in ("", "0", "-3", None, "n/a"):
        assert parse_iv(raw) is None


def test_update_values_carry_only_present_fields() -> None:
    assert update_values({}) == {}
    assert update_values({"84": "", "7308": "0.5", "83": 0.56, "6509": "RpB"}) == {"bid": None, "delta": 0.5}
    assert update_values({"7633": "25"}) == {"iv": 0.25}
    assert update_values({"31": "C10.5", "7635": "bad"}) == {"last": 10.5, "mark": None}


def test_instrument_update_times_and_seq() -> None:
    update = instrument_update(
        "AAPL", {"31": "1"}, updated_ms=1777552110061, seq=7, received_ts=1777552110.2, broker="ibkr"
    )
    assert update.event_ts == pytest.approx(1777552110.061)
    assert update.received_ts == 1777552110.2
    assert update.seq == 7
    assert update.values == {"last": 1.0}
    no_time = instrument_update("AAPL", {}, updated_ms=None, seq=None, received_ts=5.0)
    assert no_time.event_ts == 5.0
    assert no_time.values == {}


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=16)))
def test_parsing_never_raises_and_never_returns_non_finite(raw: object) -> None:
    for value in (parse_number(raw), parse_last(raw), parse_iv(raw), parse_iv(raw, IvScale.PERCENT)):
        assert value is None or math.isfinite(value)


# --------------------------------------------------------------------------- contracts


def test_documented_option_row() -> None:
    assert not needs_secdef(OPTION_ROW)
    c = contract_from_row(OPTION_ROW)
    assert c.conid == 584891614
    assert c.key == "SPY   250117C00440000"
    assert c.asset_class is AssetClass.OPTION
    assert (c.right, c.strike, c.expiry, c.multiplier) == (Right.CALL, 440.0, date(2025, 1, 17), 100.0)
    assert (c.underlying, c.underlying_conid) == ("SPY", 756733)
    p = position_from_row(OPTION_ROW, c)
    assert (p.broker, p.account, p.instrument, p.quantity) == ("ibkr", "DU123456", c.key, 1.0)
    assert p.avg_cost == pytest.approx(58.010401)  # per share (avgPrice)


@pytest.mark.parametrize(
    ("desc", "key"),
    [
        ("SPY    JAN2025 440 C [SPY   250117C00440000 100]", "SPY   250117C00440000"),
        ("SPY    JAN2025 440 C [SPY250117C00440000 100]", "SPY   250117C00440000"),  # padding collapsed
        ("SPY    JAN2025 440 C [SPY   250117C00440000]", "SPY   250117C00440000"),  # no multiplier
        ("SPX    JAN2024 4712.5 P [SPXW  240119P04712500 100]", "SPXW  240119P04712500"),
        ("IWM    FEB2025 212.5 C [IWM   250221C00212500 100]", "IWM   250221C00212500"),
    ],
)
def test_contract_desc_forms(desc: str, key: str) -> None:
    assert contract_from_row({**OPTION_ROW, "contractDesc": desc}).key == key


def test_spxw_on_spx_without_a_bracket_takes_the_root_from_the_full_name() -> None:
    row = {
        **OPTION_ROW,
        "conid": 1,
        "contractDesc": "SPX    JAN2024 4712.5 P",
        "ticker": "SPX",
        "undSym": "SPX",
        "undConid": 416904,
        "expiry": "20240119",
        "putOrCall": "P",
        "strike": "4712.5",
        "fullName": "SPXW Jan19'24 4712.5 Put",
    }
    assert not needs_secdef(row)
    c = contract_from_row(row)
    assert c.key == occ_symbol("SPXW", date(2024, 1, 19), "P", 4712.5) == "SPXW  240119P04712500"
    assert (c.underlying, c.underlying_conid, c.strike) == ("SPX", 416904, 4712.5)


def test_fractional_strikes_as_strings_or_numbers() -> None:
    base = {**OPTION_ROW, "contractDesc": "AAPL", "fullName": "AAPL Jan17'25 212.5 Call", "ticker": "AAPL"}
    for strike in ("212.5", 212.5, "1,212.5"):
        c = contract_from_row({**base, "strike": strike})
        expected = 1212.5 if strike == "1,212.5" else 212.5
        assert c.key == occ_symbol("AAPL", date(2025, 1, 17), "C", expected)
        assert c.strike == expected


def test_stock_rows_have_multiplier_one() -> None:
    row = stock_row()
    c = contract_from_row(row)
    assert (c.key, c.asset_class, c.multiplier, c.underlying, c.underlying_conid) == (
        "AAPL",
        AssetClass.STOCK,
        1.0,
        "AAPL",
        265598,
    )
    assert (c.right, c.strike, c.expiry) == (None, None, None)
    p = position_from_row(row, c)
    assert (p.quantity, p.multiplier, p.avg_cost) == (300.0, 1.0, 190.25)


def test_short_positions_are_negative_and_avg_cost_falls_back_to_avg_cost_per_multiplier() -> None:
    row = {**OPTION_ROW, "position": -3, "avgPrice": None, "avgCost": 5801.0401}
    p = position_from_row(row, contract_from_row(row))
    assert p.quantity == -3.0
    assert p.avg_cost == pytest.approx(58.010401)


def test_rows_lacking_details_are_completed_by_secdef() -> None:
    row = {"acctId": "U1", "conid": 667629330, "contractDesc": "AAPL", "position": 2, "assetClass": None}
    assert needs_secdef(row)
    with pytest.raises(IbkrMappingError):
        contract_from_row(row)
    # the /trsrv/secdef fields the reference lists, for the documented secdef/info contract
    info = load("rest_positions.json")["secdef_info"][0]
    secdef = {
        "conid": info["conid"],
        "assetClass": info["secType"],
        "ticker": info["symbol"],
        "expiry": info["maturityDate"],
        "putOrCall": info["right"],
        "strike": info["strike"],
        "undConid": 265598,
        "multiplier": info["multiplier"],
        "tradingClass": info["tradingClass"],
    }
    c = contract_from_row(row, secdef)
    assert c.key == "AAPL  240105P00195000"
    assert (c.underlying, c.underlying_conid, c.multiplier) == ("AAPL", 265598, 100.0)


@pytest.mark.parametrize("step", [0, 1, 2, 5])
def test_the_conids_lacking_details_once_each_sorted_whatever_the_step(step: int) -> None:
    lacking = {"acctId": "U1", "conid": 667629330, "contractDesc": "AAPL", "position": 2, "assetClass": None}
    rows = [
        {**lacking, "conid": 900},
        OPTION_ROW,  # complete: left out
        lacking,
        {**lacking, "acctId": "U2"},  # the same contract in another account: once
        {**lacking, "conid": "667629331"},  # no integer conid: the mapping reports it
        "not a row",
    ]
    yields = sum(1 for _ in lacking_secdef_steps(rows, step=step))  # type: ignore[arg-type]
    assert yields == (len(rows) // step if step else 0)
    assert finish(lacking_secdef_steps(rows, step=step)) == [900, 667629330]  # type: ignore[arg-type]


def test_option_row_without_bracket_or_root_needs_secdef() -> None:
    row = {**OPTION_ROW, "contractDesc": "SPY", "fullName": None}
    assert needs_secdef(row)
    assert contract_from_row(row).key == "SPY   250117C00440000"  # the ticker as a last resort


def test_futures_are_keyed_and_other_classes_refused() -> None:
    fut = {**OPTION_ROW, "assetClass": "FUT", "ticker": "ES", "expiry": "20241220", "multiplier": 50}
    c = contract_from_row(fut)
    assert (c.key, c.asset_class, c.multiplier) == ("/ES:202412", AssetClass.FUTURE, 50.0)
    for kind in ("FOP", "CASH", "BOND", None):
        with pytest.raises(IbkrMappingError):
            contract_from_row({**OPTION_ROW, "assetClass": kind, "contractDesc": "X"})


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_map_positions_in_steps_maps_the_same_and_yields_every_step_rows(step: int) -> None:
    rows = [
        OPTION_ROW,
        {**OPTION_ROW, "acctId": "DU999999", "position": -2},
        stock_row(acctId="DU123456"),
        stock_row(conid=756733, ticker="SPY", contractDesc="SPY", position=0),
        {**OPTION_ROW, "conid": 5, "assetClass": "FOP"},
        "not a row",
    ]
    yields = sum(1 for _ in map_positions_steps(rows, step=step))  # type: ignore[arg-type]
    mapped = finish(map_positions_steps(rows, step=step))  # type: ignore[arg-type]
    assert yields == len(rows) // step
    assert mapped == map_positions(rows)  # type: ignore[arg-type]
    assert len(mapped.positions) == 3


def test_map_positions_same_contract_in_two_accounts_and_skips() -> None:
    rows = [
        OPTION_ROW,
        {**OPTION_ROW, "acctId": "DU999999", "position": -2},
        stock_row(acctId="DU123456"),
        stock_row(conid=756733, ticker="SPY", contractDesc="SPY", position=0),  # closed today
        {**OPTION_ROW, "conid": 5, "assetClass": "FOP"},
        {**OPTION_ROW, "conid": None},
        "not a row",
    ]
    mapped = map_positions(rows)  # type: ignore[arg-type]
    assert [(p.account, p.instrument, p.quantity) for p in mapped.positions] == [
        ("DU123456", "SPY   250117C00440000", 1.0),
        ("DU999999", "SPY   250117C00440000", -2.0),
        ("DU123456", "AAPL", 300.0),
    ]
    assert set(mapped.contracts) == {584891614, 265598}
    assert mapped.underlyings == {756733: "SPY", 265598: "AAPL"}
    assert mapped.skipped == {"closed": 1, "FOP": 1, "OPT": 1, "not an object": 1}
