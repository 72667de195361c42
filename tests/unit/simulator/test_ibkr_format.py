"""Pure helpers of the IBKR gateway: value formatting and cookie parsing."""

from __future__ import annotations

import time

import pytest

from simulator.ibkr import (
    IbkrOptions,
    fmt_greek,
    fmt_iv,
    fmt_volume,
    ibkr_mark,
    market_fields,
    parse_api_cookie,
    parse_cookie_header,
)
from simulator.market import Market, MarketConfig


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.53214, "0.5321"), (0.0012346, "0.001235"), (-1.97412, "-1.974"), (0.0, "0"), (12.5, "12.500")],
)
def test_fmt_greek(value: float, text: str) -> None:
    assert fmt_greek(value) == text


def test_fmt_volume_and_iv() -> None:
    assert [fmt_volume(v) for v in (870, 10_200, 24_200_000)] == ["870", "10.2K", "24.2M"]
    assert fmt_iv(0.1852, "percent") == "18.52"
    assert fmt_iv(0.1852, "percent_sign") == "18.52%"
    assert fmt_iv(0.1852, "fraction") == "0.1852"


def test_ibkr_mark_rule() -> None:
    assert ibkr_mark(1.0, 1.2, 1.5) == 1.2  # ask < last
    assert ibkr_mark(1.0, 1.2, 0.8) == 1.0  # bid > last
    assert ibkr_mark(1.0, 1.2, 1.1) == 1.1


@pytest.mark.parametrize(
    "value",
    ["abc123", '{"session":"abc123"}', '{"session": "abc123"}', '"abc123"'],
)
def test_parse_api_cookie_forms(value: str) -> None:
    assert parse_api_cookie(value) == "abc123"


def test_parse_cookie_header_keeps_json_values() -> None:
    header = 'x-sess-uuid=0.1; api={"session": "abc"}; other=1'
    cookies = parse_cookie_header(header)
    assert cookies["api"] == '{"session": "abc"}'
    assert parse_api_cookie(cookies["api"]) == "abc"
    assert parse_api_cookie("{broken") == ""


def test_market_fields_types() -> None:
    market = Market(MarketConfig(), time.time())
    option = next(p.contract for p in market.positions("ibkr") if p.contract.asset_class == "OPT")
    tick = market.peek(option.key, market.start_ts + 1)
    fields = market_fields(
        option,
        tick,
        prior_close=tick.last,
        underlying_conid=123,
        underlying_iv=0.2,
        options=IbkrOptions(last_prefix="H"),
        with_greeks=True,
    )
    assert fields["31"].startswith("H")
    assert isinstance(fields["83"], float)
    assert fields["6457"] == 123
    assert fields["201"] == option.right
    for code in ("7308", "7309", "7310", "7311", "7633", "84", "86"):
        assert isinstance(fields[code], str)
    without = market_fields(
        option, tick, prior_close=tick.last, underlying_conid=123, underlying_iv=0.2,
        options=IbkrOptions(), with_greeks=False,
    )  # fmt: skip
    assert "7308" not in without
    assert "7633" not in without
