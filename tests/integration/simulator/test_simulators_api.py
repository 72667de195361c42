"""The in-process API (``run_simulators``) and the ``python -m simulator`` CLI."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import aiohttp
import anyio
import pytest

from simulator.api import run_simulators
from simulator.market import MarketConfig

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[3]


async def test_run_simulators_ibkr_only() -> None:
    async with run_simulators(MarketConfig(seed=5), brokers=("ibkr",)) as sims:
        assert sims.ibkr is not None
        assert sims.tastytrade is None
        assert sims.ibkr.rest_url.startswith("http://127.0.0.1:")
        assert sims.ibkr.ws_url.endswith("/v1/api/ws")
        async with aiohttp.ClientSession() as http, http.post(f"{sims.ibkr.rest_url}/tickle") as r:
            assert r.status == 200
        assert set(sims.urls()) == {"ibkr_rest", "ibkr_ws"}
        assert sims.ledger() == {}


async def test_run_simulators_both_share_one_market() -> None:
    async with run_simulators(MarketConfig()) as sims:
        assert sims.ibkr is not None
        assert sims.tastytrade is not None
        assert sims.ibkr.market is sims.market is sims.tastytrade.market
        assert set(sims.urls()) == {"ibkr_rest", "ibkr_ws", "tastytrade_api", "tastytrade_dxlink"}


async def test_unknown_broker() -> None:
    with pytest.raises(ValueError):
        async with run_simulators(MarketConfig(), brokers=("schwab",)):
            pass


async def test_cli_serves_until_sigint() -> None:
    command = [sys.executable, "-m", "simulator", "ibkr", "--port", "0", "--rate", "5"]
    async with await anyio.open_process(command, cwd=ROOT) as process:
        assert process.stdout is not None
        buffer = b""
        ready = None
        with anyio.fail_after(20):
            async for chunk in process.stdout:
                buffer += chunk
                lines = buffer.split(b"\n")
                buffer = lines.pop()
                for line in lines:
                    event = json.loads(line)
                    assert "timestamp" in event
                    assert "level" in event
                    if event["event"] == "simulators_ready":
                        ready = event
                if ready:
                    break
        assert ready is not None
        assert ready["ibkr_rest"].startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http, http.post(f"{ready['ibkr_rest']}/tickle") as r:
            assert r.status == 200
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            assert await process.wait() == 0
