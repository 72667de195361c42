"""The Tastytrade simulator over real sockets: REST with aiohttp, DXLink with a plain websockets
client written from reference/dxlink.md (no SDK here; the SDK has its own conformance test)."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulator.dxlink_protocol import DEFAULT_EVENT_FIELDS, iter_compact
from simulator.faults import Fault
from simulator.market import Market, MarketConfig
from simulator.tastytrade import TastytradeSim, dx_index

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

GREEKS_FIELDS = list(DEFAULT_EVENT_FIELDS["Greeks"])
QUOTE_FIELDS = list(DEFAULT_EVENT_FIELDS["Quote"])
UA = {"User-Agent": "greeks-engine-tests/1.0"}


@pytest.fixture
def market() -> Market:
    return Market(MarketConfig(rate_hz=20.0), time.time())


@pytest.fixture
async def sim(market: Market) -> AsyncIterator[TastytradeSim]:
    async with TastytradeSim(
        market, keepalive_timeout=60.0, keepalive_interval=30.0, max_message_size=64 * 1024
    ) as server:
        yield server


def _option_symbols(market: Market, n: int = 4) -> list[str]:
    options = [p.contract for p in market.positions("tastytrade") if p.contract.asset_class == "OPT"]
    return [c.streamer_symbol for c in options[:n]]


async def _until_closed(ws: ClientConnection, seen: list[str] | None = None) -> ConnectionClosed:
    """Read frames until the server closes; return the close exception."""
    with anyio.fail_after(10):
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as closed:
                return closed
            if seen is not None and isinstance(frame, str):
                message = json.loads(frame)
                seen.append(message["type"] + ":" + message.get("error", ""))


class Dx:
    """A minimal DXLink client: JSON in and out, helpers to wait for a message."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        frame = await self.ws.recv()
        assert isinstance(frame, str)
        message = json.loads(frame)
        assert isinstance(message, dict)
        return message

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], limit: int = 500
    ) -> dict[str, Any]:
        for _ in range(limit):
            message = await self.recv()
            if predicate(message):
                return message
        raise AssertionError("expected message never came")

    async def handshake(self, token: str) -> None:
        await self.send(
            {
                "type": "SETUP",
                "channel": 0,
                "keepaliveTimeout": 60,
                "acceptKeepaliveTimeout": 60,
                "version": "0.1-test/1.0",
            }
        )
        assert (await self.recv())["type"] == "SETUP"
        assert await self.recv() == {"type": "AUTH_STATE", "channel": 0, "state": "UNAUTHORIZED"}
        await self.send({"type": "AUTH", "channel": 0, "token": token})
        authorized = await self.recv()
        assert authorized["state"] == "AUTHORIZED"
        assert authorized["userId"]

    async def open_feed(
        self,
        channel: int,
        event_type: str,
        fields: list[str],
        symbols: list[str],
        data_format: str = "COMPACT",
    ) -> None:
        await self.send(
            {
                "type": "CHANNEL_REQUEST",
                "channel": channel,
                "service": "FEED",
                "parameters": {"contract": "AUTO"},
            }
        )
        opened = await self.recv_until(lambda m: m["type"] == "CHANNEL_OPENED")
        assert opened["parameters"] == {"contract": "AUTO", "subFormat": "LIST"}
        await self.send(
            {
                "type": "FEED_SETUP",
                "channel": channel,
                "acceptAggregationPeriod": 0.1,
                "acceptDataFormat": data_format,
                "acceptEventFields": {event_type: fields},
            }
        )
        config = await self.recv_until(lambda m: m["type"] == "FEED_CONFIG")
        assert config["eventFields"] == {event_type: fields}
        assert config["dataFormat"] == data_format
        await self.send(
            {
                "type": "FEED_SUBSCRIPTION",
                "channel": channel,
                "add": [{"type": event_type, "symbol": s} for s in symbols],
            }
        )

    async def feed_data(self, channel: int | None = None) -> dict[str, Any]:
        return await self.recv_until(lambda m: m["type"] == "FEED_DATA" and channel in (None, m["channel"]))


# --------------------------------------------------------------------------- REST


class TestRest:
    async def _token(self, http: aiohttp.ClientSession, sim: TastytradeSim) -> str:
        body = {"grant_type": "refresh_token", "client_secret": "s", "refresh_token": "r"}
        async with http.post(f"{sim.api_url}/oauth/token", json=body) as resp:
            assert resp.status == 200
            data = await resp.json()
        assert data["token_type"] == "Bearer"
        assert data["expires_in"] == 900
        token = data["access_token"]
        assert isinstance(token, str)
        return token

    async def test_oauth_accounts_positions_quote_token(self, sim: TastytradeSim, market: Market) -> None:
        """OAuth refresh, then the wrapped bodies the SDK reads, with numbers as strings."""
        async with aiohttp.ClientSession(headers=UA) as http:
            token = await self._token(http, sim)
            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{sim.api_url}/customers/me/accounts", headers=auth) as resp:
                body = await resp.json()
            assert body["context"] == "/customers/me/accounts"
            (item,) = body["data"]["items"]
            assert item["account"]["account-number"] == "5WT00001"
            url = f"{sim.api_url}/accounts/5WT00001/positions"
            async with http.get(url, headers=auth) as resp:
                positions = (await resp.json())["data"]["items"]
            assert len(positions) == len(market.positions("tastytrade"))
            option = next(p for p in positions if p["instrument-type"] == "Equity Option")
            assert isinstance(option["quantity"], str)
            assert isinstance(option["average-open-price"], str)
            assert option["multiplier"] == 100
            assert option["quantity-direction"] in ("Long", "Short")
            assert len(option["symbol"]) == 21
            async with http.get(f"{sim.api_url}/api-quote-tokens", headers=auth) as resp:
                quote = (await resp.json())["data"]
            assert quote["dxlink-url"] == sim.dxlink_url
            assert quote["level"] == "api"
            assert quote["token"]

    async def test_auth_is_required(self, sim: TastytradeSim) -> None:
        """No token, a bad token, a bad grant or no User-Agent: 401 with an error body."""
        async with aiohttp.ClientSession(headers=UA) as http:
            async with http.get(f"{sim.api_url}/customers/me/accounts") as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
            headers = {"Authorization": "Bearer nope"}
            async with http.get(f"{sim.api_url}/api-quote-tokens", headers=headers) as resp:
                assert resp.status == 401
            body = {"grant_type": "password", "client_secret": "s", "refresh_token": "r"}
            async with http.post(f"{sim.api_url}/oauth/token", json=body) as resp:
                assert resp.status == 400
            token = await self._token(http, sim)
        async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as bare:
            headers = {"Authorization": f"Bearer {token}"}
            async with bare.get(f"{sim.api_url}/customers/me/accounts", headers=headers) as resp:
                assert resp.status == 401

    async def test_instruments(self, sim: TastytradeSim, market: Market) -> None:
        """Streamer symbols come from the instrument endpoints; unknown symbols are 404."""
        option = next(p.contract for p in market.positions("tastytrade") if p.contract.root == "SPXW")
        async with aiohttp.ClientSession(headers=UA) as http:
            auth = {"Authorization": f"Bearer {await self._token(http, sim)}"}
            url = f"{sim.api_url}/instruments/equity-options"
            async with http.get(url, params={"symbol[]": option.key}, headers=auth) as resp:
                (item,) = (await resp.json())["data"]["items"]
            assert item["streamer-symbol"] == option.streamer_symbol
            assert item["root-symbol"] == "SPXW"
            assert item["underlying-symbol"] == "SPX"
            async with http.get(f"{sim.api_url}/instruments/equities/SPX", headers=auth) as resp:
                equity = (await resp.json())["data"]
            assert equity["is-index"] is True
            assert equity["streamer-symbol"] == "SPX"
            async with http.get(f"{sim.api_url}/instruments/equities/NOPE", headers=auth) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "record_not_found"
            url = f"{sim.api_url}/option-chains/SPX/nested"
            async with http.get(url, headers=auth) as resp:
                (chain,) = (await resp.json())["data"]["items"]
            assert chain["root-symbol"] == "SPXW"
            strikes = [s for e in chain["expirations"] for s in e["strikes"]]
            assert any(s["call-streamer-symbol"] == option.streamer_symbol for s in strikes) or any(
                s["put-streamer-symbol"] == option.streamer_symbol for s in strikes
            )

    async def test_refuse_and_unauthenticated_faults(self, sim: TastytradeSim) -> None:
        """REFUSE answers 503 once per occurrence; UNAUTHENTICATED answers 401 while active."""
        async with aiohttp.ClientSession(headers=UA) as http:
            auth = {"Authorization": f"Bearer {await self._token(http, sim)}"}
            sim.faults.inject(Fault.REFUSE, count=1)
            async with http.get(f"{sim.api_url}/customers/me/accounts", headers=auth) as resp:
                assert resp.status == 503
            async with http.get(f"{sim.api_url}/customers/me/accounts", headers=auth) as resp:
                assert resp.status == 200
            sim.faults.inject(Fault.UNAUTHENTICATED)
            async with http.get(f"{sim.api_url}/customers/me/accounts", headers=auth) as resp:
                assert resp.status == 401
            sim.faults.clear(Fault.UNAUTHENTICATED)
            async with http.get(f"{sim.api_url}/customers/me/accounts", headers=auth) as resp:
                assert resp.status == 200


# --------------------------------------------------------------------------- DXLink


class TestDxLink:
    async def test_handshake_and_compact_data(self, sim: TastytradeSim, market: Market) -> None:
        """Full handshake, then COMPACT Greeks in the requested field order with per-contract
        sequences 1, 2, 3... that the market's ledger records."""
        symbols = _option_symbols(market)
        fields = ["eventSymbol", "sequence", "time", "index", "delta", "volatility", "vega"]
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.open_feed(3, "Greeks", fields, symbols)
            seqs: dict[str, list[int]] = {s: [] for s in symbols}
            with anyio.fail_after(10):
                while min(len(v) for v in seqs.values()) < 3:
                    message = await dx.feed_data(3)
                    event_type, values = message["data"]
                    assert event_type == "Greeks"
                    for row in iter_compact(fields, values):
                        seqs[str(row["eventSymbol"])].append(int(row["sequence"]))  # type: ignore[call-overload]
                        time_ms = row["time"]
                        assert isinstance(time_ms, int)
                        assert row["index"] == dx_index(time_ms, int(row["sequence"]))  # type: ignore[call-overload]
                        contract = market.by_streamer[str(row["eventSymbol"])]
                        assert row["volatility"] == pytest.approx(market.model_iv(contract.key))
        ledger = market.ledger("tastytrade")
        for symbol, received in seqs.items():
            assert received == list(range(1, len(received) + 1))
            key = market.by_streamer[symbol].key
            assert ledger[("tastytrade", key)] >= received[-1]

    async def test_every_event_has_its_own_sequence(self, sim: TastytradeSim, market: Market) -> None:
        """Greeks and Quote of one contract: each event consumes its own seq
        (same instant, same values), so together they number 1, 2, 3... with no repeats."""
        (symbol,) = _option_symbols(market, 1)
        fields = {
            "Greeks": ["eventSymbol", "sequence", "time"],
            "Quote": ["eventSymbol", "sequence", "bidTime"],
        }
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.send({"type": "CHANNEL_REQUEST", "channel": 3, "service": "FEED", "parameters": {}})
            await dx.recv_until(lambda m: m["type"] == "CHANNEL_OPENED")
            await dx.send({"type": "FEED_SETUP", "channel": 3, "acceptEventFields": fields})
            items = [{"type": t, "symbol": symbol} for t in fields]
            await dx.send({"type": "FEED_SUBSCRIPTION", "channel": 3, "add": items})
            seqs: dict[str, dict[int, int]] = {"Greeks": {}, "Quote": {}}  # seq -> time
            with anyio.fail_after(10):
                while min(len(v) for v in seqs.values()) < 4:
                    message = await dx.feed_data()
                    event_type, values = message["data"]
                    for seq, time_ms in (row[1:] for row in zip(*[iter(values)] * 3, strict=True)):
                        seqs[event_type][int(seq)] = int(time_ms)
        greeks, quotes = seqs["Greeks"], seqs["Quote"]
        assert not set(greeks) & set(quotes)
        both = sorted([*greeks, *quotes])
        assert both[: len(both) - 2] == list(range(1, len(both) - 1))  # the last pair may be in flight
        for seq, time_ms in greeks.items():  # ticked together: Greeks seq n, Quote seq n+1, same instant
            if seq + 1 in quotes:
                assert quotes[seq + 1] == time_ms
        key = market.by_streamer[symbol].key
        assert market.ledger("tastytrade")[("tastytrade", key)] >= both[-1]

    async def test_expired_quote_token_deauthorizes_an_open_connection(self, market: Market) -> None:
        async with TastytradeSim(market, quote_token_ttl_s=0.5) as sim:
            async with connect(sim.dxlink_url) as ws:
                dx = Dx(ws)
                await dx.handshake(sim.issue_quote_token())
                await dx.open_feed(3, "Greeks", GREEKS_FIELDS, _option_symbols(market))
                with anyio.fail_after(5):
                    await dx.recv_until(lambda m: m.get("state") == "UNAUTHORIZED")
                assert sim.tokens_expired == 1
                await dx.send({"type": "AUTH", "channel": 0, "token": sim.issue_quote_token()})
                with anyio.fail_after(5):
                    await dx.recv_until(lambda m: m.get("state") == "AUTHORIZED")
                    await dx.feed_data(3)
            assert sim.quote_tokens_issued == 2

    async def test_several_events_per_message_and_quotes(self, sim: TastytradeSim, market: Market) -> None:
        """Quote and Greeks on their own channels; one FEED_DATA carries several events."""
        symbols = _option_symbols(market, 8)
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.open_feed(7, "Quote", QUOTE_FIELDS, symbols)
            with anyio.fail_after(10):
                while True:
                    message = await dx.feed_data(7)
                    rows = list(iter_compact(QUOTE_FIELDS, message["data"][1]))
                    for row in rows:
                        assert row["bidPrice"] <= row["askPrice"]  # type: ignore[operator]
                    if len(rows) > 1:
                        break

    async def test_underlying_index_quote_has_nan_sizes(self, sim: TastytradeSim) -> None:
        """An index (SPX) quote has "NaN" sizes and empty exchange codes."""
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.open_feed(7, "Quote", QUOTE_FIELDS, ["SPX", "NO_SUCH_SYMBOL"])
            with anyio.fail_after(10):
                message = await dx.feed_data(7)
            (row, *_) = iter_compact(QUOTE_FIELDS, message["data"][1])
            assert row["eventSymbol"] == "SPX"
            assert row["bidSize"] == "NaN"
            assert row["bidExchangeCode"] == ""

    async def test_full_format_on_request(self, sim: TastytradeSim, market: Market) -> None:
        """FEED_SETUP with FULL gets objects with eventType."""
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.open_feed(3, "Greeks", GREEKS_FIELDS, _option_symbols(market, 1), "FULL")
            with anyio.fail_after(10):
                message = await dx.feed_data(3)
            row = message["data"][0]
            assert row["eventType"] == "Greeks"
            assert 0 < abs(row["delta"]) < 1

    async def test_unsubscribe_and_channel_cancel(self, sim: TastytradeSim, market: Market) -> None:
        """remove stops a symbol; CHANNEL_CANCEL gets CHANNEL_CLOSED."""
        symbols = _option_symbols(market, 2)
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await dx.open_feed(3, "Greeks", GREEKS_FIELDS, symbols)
            with anyio.fail_after(10):
                await dx.feed_data(3)
                await dx.send(
                    {
                        "type": "FEED_SUBSCRIPTION",
                        "channel": 3,
                        "remove": [{"type": "Greeks", "symbol": symbols[0]}],
                    }
                )
                await dx.send({"type": "CHANNEL_CANCEL", "channel": 3})
                await dx.recv_until(lambda m: m["type"] == "CHANNEL_CLOSED")
        assert sim.subscribed_symbols() == set()

    async def test_errors_bad_json_and_bad_token(self, sim: TastytradeSim) -> None:
        """Non-JSON gets ERROR INVALID_MESSAGE; a bad token gets ERROR UNAUTHORIZED and a close."""
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await ws.send("this is not json")
            error = await dx.recv()
            assert (error["type"], error["error"]) == ("ERROR", "INVALID_MESSAGE")
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.send({"type": "SETUP", "channel": 0, "version": "0.1-test/1.0"})
            await dx.recv()
            await dx.recv()
            await dx.send({"type": "AUTH", "channel": 0, "token": "forged"})
            error = await dx.recv()
            assert (error["type"], error["error"]) == ("ERROR", "UNAUTHORIZED")
            with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                await ws.recv()

    async def test_oversized_frame_closes_1009(self, sim: TastytradeSim) -> None:
        """A frame above the size cap closes the socket with 1009."""
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.handshake(sim.issue_quote_token())
            await ws.send(json.dumps({"type": "KEEPALIVE", "channel": 0, "pad": "x" * 100_000}))
            await _until_closed(ws)
            assert ws.close_code == 1009

    async def test_keepalive_then_timeout(self, market: Market) -> None:
        """A silent client gets server KEEPALIVEs, then ERROR TIMEOUT and a close."""
        async with TastytradeSim(market, keepalive_timeout=0.6, keepalive_interval=0.15) as sim:
            async with connect(sim.dxlink_url) as ws:
                dx = Dx(ws)
                await dx.handshake(sim.issue_quote_token())
                seen: list[str] = []
                await _until_closed(ws, seen)
                assert "KEEPALIVE:" in seen
                assert seen[-1] == "ERROR:TIMEOUT"

    async def test_client_keepalives_keep_it_open(self, market: Market) -> None:
        """KEEPALIVE from the client resets the timeout."""
        async with TastytradeSim(market, keepalive_timeout=0.5, keepalive_interval=0.1) as sim:
            async with connect(sim.dxlink_url) as ws:
                dx = Dx(ws)
                await dx.handshake(sim.issue_quote_token())
                with anyio.fail_after(10):
                    for _ in range(12):  # about 1.2 s, twice the timeout
                        message = await dx.recv()
                        assert message["type"] == "KEEPALIVE"
                        await dx.send({"type": "KEEPALIVE", "channel": 0})


# --------------------------------------------------------------------------- faults


async def _streaming(sim: TastytradeSim, market: Market, ws: ClientConnection) -> Dx:
    dx = Dx(ws)
    await dx.handshake(sim.issue_quote_token())
    await dx.open_feed(3, "Greeks", GREEKS_FIELDS, _option_symbols(market, 3))
    with anyio.fail_after(10):
        await dx.feed_data(3)
    return dx


class TestFaults:
    async def test_drop_with_close_frame(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            await _streaming(sim, market, ws)
            sim.faults.inject(Fault.DROP, count=1)
            await _until_closed(ws)
            assert ws.close_code == 1001

    async def test_abort_without_close_frame(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            await _streaming(sim, market, ws)
            sim.faults.inject(Fault.ABORT, count=1)
            closed = await _until_closed(ws)
            assert closed.rcvd is None  # no close frame

    async def test_refuse_handshake(self, sim: TastytradeSim) -> None:
        sim.faults.inject(Fault.REFUSE, count=1)
        with pytest.raises(InvalidStatus) as info:
            async with connect(sim.dxlink_url):
                pass
        assert info.value.response.status_code == 503
        async with connect(sim.dxlink_url) as ws:
            await Dx(ws).handshake(sim.issue_quote_token())

    async def test_stall_then_resume(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            dx = await _streaming(sim, market, ws)
            sim.faults.inject(Fault.STALL)
            # drain what was in flight, then nothing arrives while stalled
            with anyio.move_on_after(0.3):
                while True:
                    await ws.recv()
            with anyio.move_on_after(0.4) as quiet:
                await ws.recv()
            assert quiet.cancelled_caught
            sim.faults.clear(Fault.STALL)
            with anyio.fail_after(5):
                await dx.feed_data(3)

    @pytest.mark.parametrize("fault", [Fault.MALFORMED, Fault.TRUNCATED])
    async def test_invalid_json_frames(self, sim: TastytradeSim, market: Market, fault: Fault) -> None:
        async with connect(sim.dxlink_url) as ws:
            await _streaming(sim, market, ws)
            sim.faults.inject(fault, count=1)
            with anyio.fail_after(5):
                while True:
                    frame = await ws.recv()
                    assert isinstance(frame, str)
                    try:
                        json.loads(frame)
                    except ValueError:
                        break

    async def test_unknown_message(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            dx = await _streaming(sim, market, ws)
            sim.faults.inject(Fault.UNKNOWN_MESSAGE, count=1)
            known = {"FEED_DATA", "FEED_CONFIG", "KEEPALIVE"}
            with anyio.fail_after(5):
                message = await dx.recv_until(lambda m: m["type"] not in known)
            assert message["type"] == "SIM_UNKNOWN"

    async def test_wrong_value_count(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            dx = await _streaming(sim, market, ws)
            sim.faults.inject(Fault.WRONG_VALUE_COUNT, count=1)
            with anyio.fail_after(5):
                await dx.recv_until(
                    lambda m: m["type"] == "FEED_DATA" and len(m["data"][1]) % len(GREEKS_FIELDS) != 0
                )

    async def test_switch_to_full(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            dx = await _streaming(sim, market, ws)
            sim.faults.inject(Fault.SWITCH_TO_FULL, count=1)
            with anyio.fail_after(5):
                config = await dx.recv_until(lambda m: m["type"] == "FEED_CONFIG")
                assert config["dataFormat"] == "FULL"
                data = await dx.feed_data(3)
            assert isinstance(data["data"][0], dict)

    async def test_unauthenticated_then_reauth(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            dx = await _streaming(sim, market, ws)
            sim.faults.inject(Fault.UNAUTHENTICATED, count=1)
            with anyio.fail_after(5):
                await dx.recv_until(lambda m: m.get("state") == "UNAUTHORIZED")
                await dx.send({"type": "AUTH", "channel": 0, "token": sim.issue_quote_token()})
                await dx.recv_until(lambda m: m.get("state") == "AUTHORIZED")
                await dx.feed_data(3)

    async def test_bad_token_rejects_a_valid_token(self, sim: TastytradeSim) -> None:
        sim.faults.inject(Fault.BAD_TOKEN, count=1)
        async with connect(sim.dxlink_url) as ws:
            dx = Dx(ws)
            await dx.send({"type": "SETUP", "channel": 0, "version": "0.1-test/1.0"})
            await dx.recv()
            await dx.recv()
            await dx.send({"type": "AUTH", "channel": 0, "token": sim.issue_quote_token()})
            with anyio.fail_after(5):
                assert (await dx.recv())["error"] == "UNAUTHORIZED"

    async def test_binary_frame(self, sim: TastytradeSim, market: Market) -> None:
        async with connect(sim.dxlink_url) as ws:
            await _streaming(sim, market, ws)
            sim.faults.inject(Fault.BINARY_FRAME, count=1)
            with anyio.fail_after(5):
                while not isinstance(frame := await ws.recv(), bytes):
                    pass
            assert json.loads(frame)["type"]


async def test_tls(market: Market) -> None:
    """With an SSL context the simulator serves https and wss (a CA file verifies it)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with TastytradeSim(market, ssl_context=server_ctx) as sim:
        assert sim.api_url.startswith("https://")
        assert sim.dxlink_url.startswith("wss://")
        body = {"grant_type": "refresh_token", "client_secret": "s", "refresh_token": "r"}
        async with (
            aiohttp.ClientSession(headers=UA) as http,
            http.post(f"{sim.api_url}/oauth/token", json=body, ssl=client_ctx) as resp,
        ):
            assert resp.status == 200
        async with connect(sim.dxlink_url, ssl=client_ctx) as ws:
            await Dx(ws).handshake(sim.issue_quote_token())
