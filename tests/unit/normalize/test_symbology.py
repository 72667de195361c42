"""Canonical instrument keys and the brokers' symbols: the references' real examples, round trips,
and agreement with the tastytrade SDK's own conversion."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tastytrade.instruments import Option

from normalize.symbology import (
    OptionSymbol,
    format_strike,
    future_key,
    future_option_key,
    is_option_key,
    occ_from_ibkr_description,
    occ_symbol,
    occ_to_streamer,
    parse_occ,
    streamer_symbol,
    streamer_to_occ,
)

# (OCC key, DXLink streamer symbol): examples from reference/dxlink.md §4 and §1.4
PAIRS = [
    ("SPY   250117C00500000", ".SPY250117C500"),
    ("SPXW  240119P04712500", ".SPXW240119P4712.5"),
    ("AAPL  240119C00190000", ".AAPL240119C190"),
    ("TSLA  261002C00357500", ".TSLA261002C357.5"),
    ("SPY   240324P00480500", ".SPY240324P480.5"),
    ("SPXW  240119P04975000", ".SPXW240119P4975"),
    ("SPX   260320C05700000", ".SPX260320C5700"),
    ("MCD   260320P00305000", ".MCD260320P305"),
    ("F     250117C00012500", ".F250117C12.5"),
    ("SPY   250117C00500250", ".SPY250117C500.25"),  # two decimals: the SDK's reverse gets this wrong
    ("GOOGLX260116C00150000", ".GOOGLX260116C150"),  # six-letter root
    ("AAPL1 240119C00190000", ".AAPL1240119C190"),  # adjusted option: a digit in the root
]


@pytest.mark.parametrize(("occ", "streamer"), PAIRS)
def test_occ_and_streamer_symbols_map_both_ways(occ: str, streamer: str) -> None:
    assert len(occ) == 21
    assert occ_to_streamer(occ) == streamer
    assert streamer_to_occ(streamer) == occ


@pytest.mark.parametrize(("occ", "streamer"), PAIRS)
def test_sdk_occ_to_streamer_agrees(occ: str, streamer: str) -> None:
    assert Option.occ_to_streamer_symbol(occ) == occ_to_streamer(occ)


def test_parse_occ_parts_and_unpadded_form() -> None:
    expected = OptionSymbol("SPXW", date(2024, 1, 19), "P", 4712.5)
    assert parse_occ("SPXW  240119P04712500") == expected
    assert parse_occ("SPXW240119P04712500") == expected
    assert occ_symbol("SPXW", date(2024, 1, 19), "P", 4712.5) == "SPXW  240119P04712500"


@pytest.mark.parametrize(
    "bad",
    [
        "SPY",
        "",
        "SPY   251317C00500000",  # month 13
        "SPY   250117X00500000",  # right X
        "SPY   250117C0050000",  # 7 strike digits
        "TOOLONGR250117C00500000",
        ".SPY250117C500",  # a streamer symbol is not an OCC key
    ],
)
def test_parse_occ_rejects_what_is_not_an_option_key(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_occ(bad)
    assert not is_option_key(bad)


@pytest.mark.parametrize("bad", ["SPY", ".SPY250117", ".SPY250117Q500", "./ESZ24C5000", "SPY250117C500"])
def test_streamer_to_occ_rejects_other_symbols(bad: str) -> None:
    with pytest.raises(ValueError):
        streamer_to_occ(bad)


@pytest.mark.parametrize(
    ("description", "occ"),
    [
        # reference/ibkr-cp-websocket.md §6, IBKR's own example
        ("SPY    JAN2025 440 C [SPY   250117C00440000 100]", "SPY   250117C00440000"),
        ("SPXW   JAN2024 4712.5 P [SPXW  240119P04712500 100]", "SPXW  240119P04712500"),
        ("AAPL   JAN2024 195 P [AAPL  240105P00195000 100]", "AAPL  240105P00195000"),
        ("SPY    JAN2025 440 C [SPY250117C00440000 100]", "SPY   250117C00440000"),  # collapsed padding
    ],
)
def test_ibkr_contract_description_carries_the_occ_symbol(description: str, occ: str) -> None:
    assert occ_from_ibkr_description(description) == occ


@pytest.mark.parametrize("description", ["SPY", "APPLE INC", "SPY    JAN2025 440 C", ""])
def test_ibkr_description_without_brackets_gives_none(description: str) -> None:
    assert occ_from_ibkr_description(description) is None


def test_format_strike() -> None:
    assert [format_strike(s) for s in (500.0, 4712.5, 500.25, 0.125, 5812.5)] == [
        "500",
        "4712.5",
        "500.25",
        "0.125",
        "5812.5",
    ]


def test_futures_forms() -> None:
    assert future_key("ES", "202412") == "/ES:202412"
    assert future_key("/es", "202412") == "/ES:202412"
    assert (
        future_option_key("ES", "202409", "EW4", date(2024, 8, 23), "C", 5750)
        == "./ES:202409 EW4 240823C5750"
    )
    assert (
        future_option_key("ZN", "202603", "OZN", date(2026, 1, 23), "P", 111.5)
        == "./ZN:202603 OZN 260123P111.5"
    )
    with pytest.raises(ValueError):
        future_key("ES", "202413")
    with pytest.raises(ValueError):
        future_option_key("ES", "202409", "EW4", date(2024, 8, 23), "X", 5750)


@pytest.mark.parametrize(
    ("strike", "ok"), [(0.0, False), (-5.0, False), (100_000.0, False), (0.0001, False), (1.5, True)]
)
def test_strikes_outside_the_occ_range_are_refused(strike: float, ok: bool) -> None:
    if ok:
        assert parse_occ(occ_symbol("X", date(2025, 1, 17), "C", strike)).strike == strike
    else:
        with pytest.raises(ValueError):
            occ_symbol("X", date(2025, 1, 17), "C", strike)


roots = st.from_regex(r"[A-Z][A-Z0-9]{0,5}", fullmatch=True)
expiries = st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31))
strikes = st.integers(min_value=1, max_value=99_999_999).map(lambda milli: milli / 1000)


@given(roots, expiries, st.sampled_from("CP"), strikes)
def test_round_trip_key_to_streamer_to_key(root: str, expiry: date, right: str, strike: float) -> None:
    key = occ_symbol(root, expiry, right, strike)
    assert parse_occ(key) == OptionSymbol(root, expiry, right, strike)
    assert streamer_to_occ(occ_to_streamer(key)) == key
    assert streamer_symbol(root, expiry, right, strike) == occ_to_streamer(key)


@given(roots, expiries, st.sampled_from("CP"), strikes)
def test_round_trip_key_to_ibkr_description_to_key(
    root: str, expiry: date, right: str, strike: float
) -> None:
    key = occ_symbol(root, expiry, right, strike)
    description = f"{root:<6} {expiry:%b%Y}".upper() + f" {format_strike(strike)} {right} [{key} 100]"
    assert occ_from_ibkr_description(description) == key


@given(roots.filter(lambda r: r.isalpha()), expiries, st.sampled_from("CP"), strikes)
def test_sdk_agrees_on_every_case_it_handles(root: str, expiry: date, right: str, strike: float) -> None:
    key = occ_symbol(root, expiry, right, strike)
    assert Option.occ_to_streamer_symbol(key) == occ_to_streamer(key)
