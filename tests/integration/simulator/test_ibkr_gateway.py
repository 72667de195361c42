"""The IBKR gateway simulator over real sockets, driven by a client written from the reference."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulator.faults import Fault
from simulator.ibkr import SEQ_FIELD, IbkrGateway
from simulator.market import Market, MarketConfig
from tests.integration.simulator.ibkr_client import IbkrWsClient, is_smd

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

OPTION_FIELDS = ["31", "84", "86", "7635", "7308", "7309", "7310", "7311", "7633", "6457", "83"]
GatewayFactory = Callable[..., Any]


@pytest.fixture
def market() -> Market:
    return Market(MarketConfig(rate_hz=20.0), time.time())


@asynccontextmanager
async def running(market: Market, **options: Any) -> AsyncIterator[IbkrGateway]:
    gateway = IbkrGateway(market, **options)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def tickle(gateway: IbkrGateway) -> str:
    async with aiohttp.ClientSession() as http, http.post(f"{gateway.rest_url}/tickle") as r:
        assert r.status == 200
        body = await r.json()
    session = body["session"]
    assert isinstance(session, str)
    assert len(session) == 32
    return session


@asynccontextmanager
async def client(gateway: IbkrGateway, cookie: str | None = "plain") -> AsyncIterator[IbkrWsClient]:
    session = await tickle(gateway)
    headers = {}
    if cookie == "plain":
        headers["Cookie"] = f"api={session}"
    elif cookie == "json":
        headers["Cookie"] = "api=" + json.dumps({"session": session})  # ibind: with a space
    elif cookie == "sess-uuid":
        headers["Cookie"] = f"x-sess-uuid={session}"
    async with connect(gateway.ws_url, additional_headers=headers, open_timeout=5) as ws:
        yield IbkrWsClient(ws)


def option_conid(market: Market) -> int:
    return next(p.contract.conid for p in market.positions("ibkr") if p.contract.asset_class == "OPT")


def stock_conid(market: Market) -> int:
    return next(p.contract.conid for p in market.positions("ibkr") if p.contract.asset_class == "STK")


@pytest.mark.parametrize("cookie", ["plain", "json", "sess-uuid"])
async def test_cookie_handshake(market: Market, cookie: str) -> None:
    async with running(market) as gw, client(gw, cookie) as c:
        messages = await c.handshake()
        assert [m["topic"] for m in messages] == ["system", "act", "sts"]
        assert messages[0]["success"] == "SIMUSER"
        assert messages[1]["args"]["accounts"] == market.accounts("ibkr")
        assert messages[2]["args"]["authenticated"] is True


async def test_session_message_handshake(market: Market) -> None:
    async with running(market) as gw, client(gw, cookie=None) as c:
        assert await c.recv() == {"message": "waiting for session"}
        await c.ws.send(json.dumps({"session": gw.session_id}))
        sts = await c.recv()
        assert sts == {"topic": "sts", "args": {"authenticated": True}}
        _system, _ = await c.recv_until(lambda m: m.get("topic") == "system")
        conid = option_conid(market)
        await c.subscribe(conid, ["31"])
        await c.recv_until(is_smd(conid))


async def test_bad_session_is_rejected(market: Market) -> None:
    async with running(market) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with connect(gw.ws_url, additional_headers={"Cookie": "api=nope"}):
                pass
        assert info.value.response.status_code == 401
        async with client(gw, cookie=None) as c:
            await c.recv()
            await c.ws.send(json.dumps({"session": "wrong"}))
            with anyio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008


async def test_full_frame_then_deltas_with_seq(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        conid = option_conid(market)
        await c.subscribe(conid, OPTION_FIELDS)
        first, _ = await c.recv_until(is_smd(conid))
        for key in ("server_id", "conidEx", "conid", "_updated", "6119", "6509", SEQ_FIELD):
            assert key in first
        assert first["conid"] == conid
        assert first["conidEx"] == str(conid)
        for f in ("31", "84", "86", "7308", "7309", "7310", "7311", "7633"):
            assert isinstance(first[f], str), f
            float(first[f])
        assert isinstance(first["83"], float)
        assert first["6457"] == market.specs[market.by_conid[conid].underlying].conid
        assert 1.0 < float(first["7633"]) < 200.0  # a percent
        deltas = []
        with anyio.fail_after(10):
            while len(deltas) < 5:
                message, _ = await c.recv_until(is_smd(conid))
                deltas.append(message)
        seqs = [first[SEQ_FIELD]] + [d[SEQ_FIELD] for d in deltas]
        assert seqs == list(range(seqs[0], seqs[0] + 6))
        assert all("6509" not in d for d in deltas)  # unchanged fields are not repeated
        assert all(set(d) < set(first) | {"87_raw"} for d in deltas)
        await c.unsubscribe(conid)
        await c.sync()  # frames in flight before the umd
        after = await c.sync()
        assert not [m for m in after if is_smd(conid)(m)]  # umd: silent, and data stops
        key = market.by_conid[conid].key
        assert market.ledger("ibkr")[("ibkr", key)] >= seqs[-1]


async def test_tic_answered_and_heartbeat(market: Market) -> None:
    async with running(market, hb_interval_s=0.1, tic_replies=4) as gw, client(gw) as c:
        await c.handshake()
        await c.tic()
        replies = []
        with anyio.fail_after(5):
            while len(replies) < 4:
                message = await c.recv()
                if message.get("topic") == "tic":
                    replies.append(message)
        assert all(r["alive"] is True and r["id"] == gw.session_id for r in replies)
        assert len({r["lastAccessed"] for r in replies}) == 1
        hbs: list[int] = []
        with anyio.fail_after(5):
            while len(hbs) < 3:
                message = await c.recv()
                if message.get("topic") == "system" and "hb" in message:
                    hbs.append(message["hb"])
        assert hbs == sorted(hbs)
        assert hbs[-1] > 1_000_000_000_000


async def test_subscription_expires(market: Market) -> None:
    async with running(market, subscription_ttl_s=0.3) as gw, client(gw) as c:
        await c.handshake()
        conid = stock_conid(market)
        await c.subscribe(conid, ["31", "84", "86"])
        await c.recv_until(is_smd(conid))
        await gw.wait_for(lambda: not gw.subscribed_conids())
        await c.sync()
        assert not [m for m in await c.sync() if is_smd(conid)(m)]
        await c.subscribe(conid, ["31"])  # re-sending smd restarts it
        await c.recv_until(is_smd(conid))


async def test_resubscribe_adds_fields_and_sends_full(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        conid = stock_conid(market)
        await c.subscribe(conid, ["84"])
        first, _ = await c.recv_until(is_smd(conid))
        assert "86" not in first
        assert "84" in first
        await c.subscribe(conid, ["86"])
        full, _ = await c.recv_until(lambda m: is_smd(conid)(m) and "86" in m)
        assert "84" in full
        assert gw.subscriptions() == {next(iter(gw.subscriptions())): {conid}}


async def test_options_prefix_greeks_delay_duplicates_binary(market: Market) -> None:
    options = {
        "last_prefix": "C",
        "greeks_delay_s": 0.3,
        "duplicate_first_frame": True,
        "binary_frames": True,
        "iv_format": "fraction",
    }
    async with running(market, **options) as gw, client(gw) as c:
        await c.handshake()
        assert all(isinstance(f, bytes) for f in c.raw)
        conid = option_conid(market)
        await c.subscribe(conid, OPTION_FIELDS)
        first, _ = await c.recv_until(is_smd(conid))
        again, _ = await c.recv_until(is_smd(conid))
        assert again == first  # the first frame arrives twice, same seq
        assert first["31"].startswith("C")
        assert "7308" not in first
        assert "7633" not in first
        later, _ = await c.recv_until(lambda m: is_smd(conid)(m) and "7308" in m)
        assert 0.0 < float(later["7633"]) < 2.0  # IV as a fraction in this mode


async def test_fault_drop_with_close_frame(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        gw.faults.inject(Fault.DROP, count=1)
        closed = await c.until_closed()
        assert closed.rcvd is not None
        assert closed.rcvd.code == 1011
        await gw.wait_for(lambda: gw.client_count == 0)
        async with client(gw) as again:  # the count is used up: new connections work
            await again.handshake()


async def test_fault_abort_without_close_frame(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        gw.faults.inject(Fault.ABORT, count=1)
        closed = await c.until_closed()
        assert closed.rcvd is None  # no close frame


async def test_drop_all_connections_helper(market: Market) -> None:
    async with running(market) as gw, client(gw) as a, client(gw) as b:
        await a.handshake()
        await b.handshake()
        assert gw.client_count == 2
        await gw.drop_all_connections(close_frame=False)
        for c in (a, b):
            closed = await c.until_closed()
            assert closed.rcvd is None
        await gw.wait_for(lambda: gw.client_count == 0)


async def test_fault_malformed_truncated_unknown(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        conid = stock_conid(market)
        gw.faults.inject(Fault.MALFORMED, count=1)
        gw.faults.inject(Fault.TRUNCATED, count=1)
        gw.faults.inject(Fault.UNKNOWN_MESSAGE, count=1)
        await c.subscribe(conid, ["31", "84", "86"])
        bad = []
        with anyio.fail_after(5):
            while len(bad) < 2:
                frame = await c.ws.recv()
                try:
                    json.loads(frame)
                except json.JSONDecodeError:
                    bad.append(frame)
        unknown, _ = await c.recv_until(lambda m: m.get("topic") == "zzq")
        assert unknown["topic"] == "zzq"
        first, _ = await c.recv_until(is_smd(conid))  # corruption adds frames, loses no seq
        second, _ = await c.recv_until(is_smd(conid))  # and the stream goes on
        assert (first[SEQ_FIELD], second[SEQ_FIELD]) == (1, 2)


async def test_fault_refuse_then_accept(market: Market) -> None:
    async with running(market) as gw:
        session = await tickle(gw)
        gw.faults.inject(Fault.REFUSE, count=2)
        with pytest.raises(InvalidStatus) as info:
            async with connect(gw.ws_url, additional_headers={"Cookie": f"api={session}"}):
                pass
        assert info.value.response.status_code == 503
        async with aiohttp.ClientSession() as http, http.post(f"{gw.rest_url}/tickle") as r:
            assert r.status == 503
        async with client(gw) as c:
            await c.handshake()


async def test_fault_stall(market: Market) -> None:
    async with running(market, hb_interval_s=0.05) as gw, client(gw) as c:
        await c.handshake()
        gw.faults.inject(Fault.STALL)
        await c.tic()
        received: list[dict[str, Any]] = []
        with anyio.move_on_after(0.3) as scope:
            while True:
                received.append(await c.recv())
        assert scope.cancelled_caught
        assert len(received) <= 1  # at most one hb already in flight; no tic answer
        assert not [m for m in received if m.get("topic") == "tic"]
        gw.faults.clear(Fault.STALL)
        await c.sync()


async def test_unauthenticated_fault_and_reauth(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        conid = stock_conid(market)
        await c.subscribe(conid, ["31"])
        await c.recv_until(is_smd(conid))
        gw.faults.inject(Fault.UNAUTHENTICATED, count=1)
        sts, _ = await c.recv_until(lambda m: m.get("topic") == "sts")
        assert sts["args"] == {"authenticated": False}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gw.rest_url}/iserver/auth/status") as r:
                assert (await r.json())["authenticated"] is False
            async with http.get(f"{gw.rest_url}/iserver/accounts") as r:
                assert r.status == 401
            payload = {"publish": True, "compete": True}
            async with http.post(f"{gw.rest_url}/iserver/auth/ssodh/init", json=payload) as r:
                assert (await r.json())["authenticated"] is True
        sts, _ = await c.recv_until(lambda m: m.get("topic") == "sts" and m["args"].get("authenticated"))
        await c.subscribe(conid, ["31"])  # subscriptions were lost: subscribe again
        await c.recv_until(is_smd(conid))


async def test_session_expires_without_tickle(market: Market) -> None:
    async with running(market, session_timeout_s=0.3) as gw, client(gw) as c:
        await c.handshake()
        sts, _ = await c.recv_until(lambda m: m.get("topic") == "sts", within_s=5)
        assert sts["args"]["authenticated"] is False
        assert gw.authenticated is False


async def test_competing_session(market: Market) -> None:
    async with running(market, sts_fragments=False) as gw, client(gw) as c:
        await c.handshake()
        gw.set_competing()
        sts, _ = await c.recv_until(lambda m: m.get("topic") == "sts")
        assert sts["args"] == {"competing": True}
        sts, _ = await c.recv_until(lambda m: m.get("topic") == "sts")
        assert sts["args"]["authenticated"] is False
        assert sts["args"]["competing"] is True


async def test_tls_with_a_ca_file(market: Market, tmp_path: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with running(market, ssl_context=server_ctx) as gw:
        assert gw.base_url.startswith("https://")
        assert gw.ws_url.startswith("wss://")
        connector = aiohttp.TCPConnector(ssl=client_ctx)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{gw.rest_url}/tickle") as r:
                session = (await r.json())["session"]
        headers = {"Cookie": f"api={session}"}
        async with connect(gw.ws_url, ssl=client_ctx, additional_headers=headers) as ws:
            c = IbkrWsClient(ws)
            await c.handshake()


async def test_idle_socket_is_dropped_without_close_frame(market: Market) -> None:
    async with running(market, ws_idle_timeout_s=0.3) as gw, client(gw) as c:
        await c.handshake()
        closed = await c.until_closed()
        assert closed.rcvd is None


async def test_unknown_topic_and_conid(market: Market) -> None:
    async with running(market) as gw, client(gw) as c:
        await c.handshake()
        await c.ws.send("xyz+1+{}")
        error, _ = await c.recv_until(lambda m: "error" in m)
        assert error["code"] == 1
        await c.subscribe(1, ["31"])
        error, _ = await c.recv_until(lambda m: "error" in m)
        assert error["topic"] == "smd+1"
        assert gw.subscribed_conids() == set()
