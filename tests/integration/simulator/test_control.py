"""The simulators' control plane (for simulators in their own process): ledger and faults."""

from __future__ import annotations

import time

import aiohttp
import pytest

from simulator.api import run_simulators
from simulator.control import start_control
from simulator.faults import Fault
from simulator.market import MarketConfig

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_ledger_with_emission_times_and_seq_offset_and_fault_switches() -> None:
    config = MarketConfig(seed=3, seq_offset=1000, record_times=True)
    async with run_simulators(config) as sims:
        runner = await start_control(sims, 0)
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            t0 = time.time()
            sims.market.tick("ibkr", "SPY", t0)
            sims.market.tick("ibkr", "SPY", t0 + 1)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/ledger") as resp:
                    ledger = await resp.json()
                assert ledger["seq_offset"] == 1000
                assert ledger["brokers"]["ibkr"]["SPY"] == 1002  # a restarted simulator continues
                assert ledger["emissions"]["ibkr"]["SPY"] == [t0, t0 + 1]

                async with http.post(
                    f"{base}/faults/ibkr", json={"fault": "stall", "duration_s": 30}
                ) as resp:
                    assert resp.status == 200
                assert sims.ibkr is not None
                assert sims.ibkr.faults.active(Fault.STALL, time.time())
                async with http.post(f"{base}/faults/ibkr/clear", json={"fault": "stall"}) as resp:
                    assert resp.status == 200
                assert not sims.ibkr.faults.active(Fault.STALL, time.time())
                async with http.post(f"{base}/faults/ibkr", json={"fault": "no-such-fault"}) as resp:
                    assert resp.status == 400
                async with http.post(f"{base}/faults/nobody", json={"fault": "stall"}) as resp:
                    assert resp.status == 404
                async with http.get(f"{base}/stats") as resp:
                    stats = await resp.json()
                assert set(stats) == {"ibkr", "tastytrade"}
        finally:
            await runner.cleanup()
