"""The IBKR gateway simulator's ``/iserver/marketdata/snapshot`` (what a polling client uses)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from simulator.ibkr import IbkrGateway
from simulator.market import Market, MarketConfig

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
async def gateway() -> AsyncIterator[IbkrGateway]:
    market = Market(MarketConfig(positions=150), time.time())
    async with IbkrGateway(market) as gw:
        yield gw


async def snapshot(gw: IbkrGateway, conids: list[int], fields: str) -> tuple[int, Any]:
    params = {"conids": ",".join(map(str, conids)), "fields": fields}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.rest_url}/iserver/marketdata/snapshot", params=params) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_preflight_then_fields(gateway: IbkrGateway) -> None:
    option = next(p.contract for p in gateway.market.positions("ibkr") if p.contract.asset_class == "OPT")
    stock = next(p.contract for p in gateway.market.positions("ibkr") if p.contract.asset_class == "STK")
    conids = [option.conid, stock.conid]
    status, first = await snapshot(gateway, conids, "31,84,86,7308,7633")
    assert status == 200
    assert first == [{"conidEx": str(c), "conid": c} for c in conids]  # the pre-flight: no data
    before = int(time.time() * 1000)
    status, rows = await snapshot(gateway, conids, "31,84,86,7308,7633")
    assert status == 200
    by_conid = {row["conid"]: row for row in rows}
    opt = by_conid[option.conid]
    assert opt["conidEx"] == str(option.conid)
    assert float(opt["84"]) <= float(opt["86"])
    assert 0.0 < abs(float(opt["7308"])) <= 1.0
    assert float(opt["7633"]) > 1.0  # percent, as in smd frames
    assert opt["_updated"] >= before
    assert opt["6509"] == "RpB"
    assert isinstance(opt["_seq"], int)
    stk = by_conid[stock.conid]
    assert "7308" not in stk  # no Greeks for a stock
    assert set(stk) >= {"31", "84", "86", "_updated", "server_id"}


async def test_limits_and_bad_requests(gateway: IbkrGateway) -> None:
    conids = [c.conid for c in gateway.market.contracts.values()][:101]
    assert len(conids) == 101
    status, body = await snapshot(gateway, conids, "31")
    assert status == 400
    assert "100" in body["error"]
    status, body = await snapshot(gateway, [1, 2], ",".join(str(i) for i in range(51)))
    assert status == 400
    status, body = await snapshot(gateway, [], "31")
    assert status == 400
    async with aiohttp.ClientSession() as http:
        url = f"{gateway.rest_url}/iserver/marketdata/snapshot?conids=abc&fields=31"
        async with http.get(url) as r:
            assert r.status == 400
    status, body = await snapshot(gateway, [123], "31")  # unknown conid: no object
    assert (status, body) == (200, [])
    gateway.expire_session()
    status, body = await snapshot(gateway, conids[:2], "31")
    assert status == 401
