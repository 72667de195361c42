"""The REST side through the real SDK against the simulator: session, accounts, positions, streamer
symbols, quote tokens, errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pydantic
import pytest
import tastytrade.session

from actors.tastytrade.rest import (
    QUOTE_TOKEN_LIFETIME_S,
    QuoteToken,
    RestError,
    TastytradeRest,
    current_positions_steps,
    new_session,
)
from config.settings import Secret, TastytradeSettings
from normalize.steps import finish
from normalize.tastytrade import map_positions
from simulator.faults import Fault
from simulator.market import Market, MarketConfig
from simulator.tastytrade import TastytradeSim
from supervisor.errors import FatalError, TransientError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def market() -> Market:
    return Market(MarketConfig(tastytrade_accounts=("5WT00001", "5WT00002")), time.time())


@pytest.fixture
async def sim(market: Market) -> AsyncIterator[TastytradeSim]:
    async with TastytradeSim(
        market, provider_secret="secret", refresh_token="refresh", quote_token_ttl_s=600
    ) as s:
        yield s


def settings(sim: TastytradeSim, **kw: object) -> TastytradeSettings:
    base: dict[str, object] = {
        "client_secret": Secret("secret"),
        "refresh_token": Secret("refresh"),
        "api_url": sim.api_url,
    }
    return TastytradeSettings(**(base | kw))  # type: ignore[arg-type]


async def test_accounts_positions_symbols_and_token(sim: TastytradeSim, market: Market) -> None:
    before = tastytrade.session.API_URL
    async with TastytradeRest(settings(sim), clock=time.time) as rest:
        assert tastytrade.session.API_URL == before  # the override lives in the session only
        assert await rest.load_accounts() == ["5WT00001", "5WT00002"]
        rows = await rest.positions()
        mapped = map_positions(rows)
        expected = {(p.account, p.contract.key): p.quantity for p in market.positions("tastytrade")}
        assert {(p.account, p.instrument): p.quantity for p in mapped.positions} == expected
        options = [p.instrument for p in mapped.positions if p.strike is not None]
        found = await rest.streamer_symbols([*options, "SPX", "SPY", "NOPE"])
        assert {k: found[k] for k in options} == {k: market.contracts[k].streamer_symbol for k in options}
        assert (found["SPX"], found["SPY"]) == ("SPX", "SPY")
        assert "NOPE" not in found
        token = await rest.quote_token()
        assert token.dxlink_url == sim.dxlink_url
        assert sim.quote_token_expiry(token.token.get()) == pytest.approx(token.expires_at, abs=2)
        assert token.expires_at - token.issued_at == pytest.approx(600, abs=1)
        assert token.refresh_at() == pytest.approx(token.expires_at - 120, abs=0.01)
        assert "sim-quote" not in repr(token)


async def test_selected_accounts_and_an_unknown_one(sim: TastytradeSim) -> None:
    async with TastytradeRest(settings(sim, accounts=("5WT00002",)), clock=time.time) as rest:
        assert await rest.load_accounts() == ["5WT00002"]
        assert {r.account_number for r in await rest.positions()} <= {"5WT00002"}
    async with TastytradeRest(settings(sim, accounts=("5WT00002", "X1")), clock=time.time) as rest:
        with pytest.raises(FatalError, match="TT_ACCOUNTS: account\\(s\\) X1 not found"):
            await rest.load_accounts()


async def test_bad_credentials_and_a_refusing_server_are_transient(sim: TastytradeSim) -> None:
    async with TastytradeRest(settings(sim, refresh_token=Secret("wrong")), clock=time.time) as rest:
        with pytest.raises(RestError, match="invalid_grant") as info:
            await rest.load_accounts()
    assert isinstance(info.value, TransientError)
    assert "wrong" not in str(info.value)
    sim.faults.inject(Fault.REFUSE, count=1)
    async with TastytradeRest(settings(sim), clock=time.time) as rest:
        with pytest.raises(RestError, match="Tastytrade REST GET /customers/me/accounts failed"):
            await rest.load_accounts()


def test_missing_credentials_are_a_configuration_error() -> None:
    with pytest.raises(FatalError, match="TT_CLIENT_SECRET"):
        new_session(TastytradeSettings())


def test_quote_token_refresh_time() -> None:
    day = QuoteToken(Secret("t"), "wss://x", 1000.0, 1000.0 + QUOTE_TOKEN_LIFETIME_S)
    assert day.refresh_at() == 1000.0 + QUOTE_TOKEN_LIFETIME_S - 3600  # an hour early at most
    short = QuoteToken(Secret("t"), "wss://x", 1000.0, 1010.0)
    assert short.refresh_at() == 1008.0  # a fifth of its lifetime early


async def test_positions_are_what_the_sdk_call_gives(sim: TastytradeSim) -> None:
    """Decoded with orjson and validated in steps, the positions equal the SDK's own
    ``Account.get_positions`` on the same session, account by account."""
    async with TastytradeRest(settings(sim), clock=time.time) as rest:
        await rest.load_accounts()
        ours = await rest.positions()
        theirs = [p for a in rest.accounts for p in await a.get_positions(rest.session)]
    assert len(ours) > 2
    assert ours == theirs


def _items(n: int, market: Market) -> list[dict[str, object]]:
    """``n`` position objects as the simulator's positions endpoint writes them."""
    sim = TastytradeSim(market, provider_secret="secret", refresh_token="refresh")  # not started
    base = [sim._position_json(p) for p in market.positions("tastytrade")]
    return [dict(base[i % len(base)], quantity=i + 1) for i in range(n)]


def test_positions_steps_slice_the_items(market: Market) -> None:
    items = _items(7, market)
    steps = current_positions_steps({"items": items}, 3)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            rows = stop.value
            break
        pauses += 1
    assert pauses == 2  # 3 + 3 + 1 items: a pause between slices, none after the last
    assert [r.quantity for r in rows] == [i + 1 for i in range(7)]
    assert finish(current_positions_steps({"items": []}, 3)) == []
    assert finish(current_positions_steps({"items": items}, 0)) == rows  # a step of at least 1


def test_bad_positions_bodies_raise_what_the_sdk_parse_raises(market: Market) -> None:
    good = _items(2, market)
    with pytest.raises(KeyError):
        finish(current_positions_steps({}, 500))
    with pytest.raises(TypeError):
        finish(current_positions_steps({"items": {"a": 1}}, 500))
    with pytest.raises(TypeError):
        finish(current_positions_steps({"items": [*good, "not an object"]}, 500))
    with pytest.raises(pydantic.ValidationError):
        finish(current_positions_steps({"items": [*good, {"symbol": "X"}]}, 500))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"data": {"items": [', "JSONDecodeError"),
        (b'{"data": {"items": [{"symbol": "X"}]}}', "validation error"),
        (b'{"data": {}}', "No data present"),
        (b'{"data": {"items": 3}}', "items is int"),
        (b"[1, 2]", "No data present"),
    ],
)
async def test_a_bad_positions_body_is_a_rest_error(sim: TastytradeSim, body: bytes, error: str) -> None:
    sim.positions_body = body  # the simulator answers it instead of the positions
    async with TastytradeRest(settings(sim), clock=time.time) as rest:
        await rest.load_accounts()
        with pytest.raises(RestError, match=f"GET /accounts/5WT00001/positions failed: .*{error}"):
            await rest.positions()
