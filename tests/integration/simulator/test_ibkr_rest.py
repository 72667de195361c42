"""The IBKR gateway simulator's REST subset (documented shapes, pagination, errors)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from simulator.ibkr import IbkrGateway
from simulator.market import Market, MarketConfig

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DESC = re.compile(r"^(\S+)\s+([A-Z]{3}\d{4}) (\S+) ([CP]) \[(.{21}) (\d+)\]$")


@pytest.fixture
async def gateway() -> AsyncIterator[IbkrGateway]:
    market = Market(MarketConfig(positions=250, ibkr_accounts=("U1111111", "U2222222")), time.time())
    gw = IbkrGateway(market)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def get(gw: IbkrGateway, path: str, method: str = "GET", **kw: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, gw.rest_url + path, **kw) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_tickle_and_auth_status(gateway: IbkrGateway) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{gateway.rest_url}/tickle") as r:
        body = await r.json()
        assert r.cookies["x-sess-uuid"].value == body["session"]
    assert body["iserver"]["authStatus"]["authenticated"] is True
    assert body["collission"] is False
    assert "ssoExpires" in body
    for method in ("GET", "POST"):
        status, auth = await get(gateway, "/iserver/auth/status", method)
        assert status == 200
        assert auth["authenticated"]
        assert auth["connected"]
        assert not auth["competing"]


async def test_accounts(gateway: IbkrGateway) -> None:
    status, accounts = await get(gateway, "/iserver/accounts")
    assert status == 200
    assert accounts["accounts"] == ["U1111111", "U2222222"]
    assert accounts["selectedAccount"] == "U1111111"
    status, portfolio = await get(gateway, "/portfolio/accounts")
    assert [a["id"] for a in portfolio] == ["U1111111", "U2222222"]
    assert all(a["currency"] == "USD" for a in portfolio)


async def test_positions_paginate_by_100(gateway: IbkrGateway) -> None:
    market = gateway.market
    for account in market.accounts("ibkr"):
        expected = [p for p in market.positions("ibkr") if p.account == account]
        rows: list[dict[str, Any]] = []
        page = 0
        while True:
            status, chunk = await get(gateway, f"/portfolio/{account}/positions/{page}")
            assert status == 200
            assert len(chunk) <= 100
            if not chunk:
                break
            rows += chunk
            page += 1
        assert page == (len(expected) + 99) // 100
        assert [r["conid"] for r in rows] == [p.contract.conid for p in expected]
        assert {r["acctId"] for r in rows} == {account}


async def test_position_fields(gateway: IbkrGateway) -> None:
    market = gateway.market
    account = market.accounts("ibkr")[0]
    _, rows = await get(gateway, f"/portfolio/{account}/positions/0")
    by_conid = {p.contract.conid: p for p in market.positions("ibkr")}
    seen_classes = set()
    for row in rows:
        position = by_conid[row["conid"]]
        contract = position.contract
        seen_classes.add(row["assetClass"])
        assert row["position"] == position.quantity
        assert isinstance(row["mktPrice"], float)
        assert row["mktPrice"] > 0
        if contract.asset_class == "OPT":
            match = DESC.match(row["contractDesc"])
            assert match, row["contractDesc"]
            assert match.group(5) == contract.key  # the OCC symbol, for the canonical key
            assert row["putOrCall"] == contract.right
            assert isinstance(row["strike"], str)
            assert float(row["strike"]) == contract.strike
            assert row["expiry"] == f"{contract.expiry:%Y%m%d}"
            assert row["multiplier"] == 100
            assert row["undConid"] == market.contracts[contract.underlying].conid
            assert row["ticker"] == contract.underlying
            assert row["avgCost"] == pytest.approx(position.avg_cost * 100)
            assert row["avgPrice"] == pytest.approx(position.avg_cost)
        else:
            assert row["contractDesc"] == contract.key
            assert row["putOrCall"] is None
            assert row["expiry"] is None
            assert row["strike"] == "0"
            assert row["undConid"] == 0
    assert seen_classes == {"STK", "OPT"}
    spxw = [r for r in rows if "[SPXW " in r["contractDesc"]]
    assert spxw
    assert all(r["ticker"] == "SPX" for r in spxw)


async def test_single_position_and_invalidate(gateway: IbkrGateway) -> None:
    position = gateway.market.positions("ibkr")[0]
    status, rows = await get(gateway, f"/portfolio/{position.account}/position/{position.contract.conid}")
    assert status == 200
    assert [r["conid"] for r in rows] == [position.contract.conid]
    status, body = await get(gateway, f"/portfolio/{position.account}/positions/invalidate", "POST")
    assert status == 200


async def test_secdef(gateway: IbkrGateway) -> None:
    market = gateway.market
    option = next(p.contract for p in market.positions("ibkr") if p.contract.asset_class == "OPT")
    conids = f"{option.conid},{market.contracts['SPY'].conid},{market.contracts['SPX'].conid}"
    status, body = await get(gateway, f"/trsrv/secdef?conids={conids}")
    assert status == 200
    rows = {r["conid"]: r for r in body["secdef"]}
    assert rows[option.conid]["assetClass"] == "OPT"
    assert rows[option.conid]["undConid"] == market.contracts[option.underlying].conid
    assert rows[option.conid]["putOrCall"] == option.right
    assert rows[market.contracts["SPX"].conid]["assetClass"] == "IND"
    assert rows[market.contracts["SPY"].conid]["ticker"] == "SPY"
    too_many = ",".join(str(c) for c in list(market.by_conid)[:201])
    if len(too_many.split(",")) == 201:
        status, _ = await get(gateway, f"/trsrv/secdef?conids={too_many}")
        assert status == 400
    status, _ = await get(gateway, "/trsrv/secdef?conids=abc")
    assert status == 400


async def test_errors_and_reauthenticate(gateway: IbkrGateway) -> None:
    status, _ = await get(gateway, "/portfolio/NOPE/positions/0")
    assert status == 400
    status, _ = await get(gateway, "/portfolio/U1111111/positions/x")
    assert status == 400
    status, body = await get(gateway, "/logout", "POST")
    assert status == 200
    assert gateway.authenticated is False
    status, body = await get(gateway, "/iserver/reauthenticate", "POST")
    assert body == {"message": "triggered"}
    assert gateway.authenticated is True
    status, body = await get(gateway, "/sso/validate")
    assert body["RESULT"] is True
