"""`python run.py` with no configuration at all: embedded PostgreSQL, both broker simulators on
loopback, both wire-protocol actors streaming from them. Health, tables, logs, and the same
contract at both brokers carrying the same key and the same values."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from db.embedded import read_password
from simulator.market import Market, MarketConfig
from tests.chaos.harness import EngineProcess, _clean_env, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def _query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def test_the_embedded_default_does_the_whole_job(tmp_path: Path) -> None:
    env = {
        **_clean_env(),
        "VAR_DIR": str(tmp_path / "var"),
        "PYTHONUNBUFFERED": "1",
        "STATUS_INTERVAL_S": "0.2",
    }
    env.pop("TEST_DATABASE_URL", None)
    engine = EngineProcess(tmp_path, env)
    with running(engine):
        started = time.monotonic()
        engine.start()
        doc = engine.wait_streaming(("ibkr", "tastytrade"), timeout=60)
        time_to_ok = time.monotonic() - started
        assert doc["mode"] == "simulated"
        assert doc["brokers"] == {"ibkr": "simulated", "tastytrade": "simulated"}
        first_rows = doc["writer"]["rows_total"]
        doc = engine.wait_status("rows growing", lambda d: d["writer"]["rows_total"] > first_rows + 100)
        database = doc["database"]
        password = read_password(tmp_path / "var" / "postgres.pgpass")
        dsn = f"postgresql://postgres:{password}@{database['host']}:{database['port']}/{database['name']}"

        def both(sql: str) -> bool:
            return {r["broker"] for r in anyio.run(_query, dsn, sql)} == {"ibkr", "tastytrade"}

        wait_until("positions of both brokers", lambda: both("SELECT broker FROM positions"), 30)
        wait_until("stream sessions of both brokers", lambda: both("SELECT broker FROM stream_sessions"), 30)
        latest = anyio.run(_query, dsn, "SELECT * FROM greeks_current")
        assert engine.terminate() == 0
    logs = engine.logs()
    simulated = [e for e in logs if e.get("event") == "simulated_data"]
    assert len(simulated) == 1
    assert simulated[0]["level"] == "warning"
    assert time_to_ok < 60  # the target is 10 s; measured and reported, the test allows for load
    started_line = next(e for e in logs if e.get("event") == "simulators_started")
    _check_cross_broker(latest, started_line)


def _check_cross_broker(latest: list[asyncpg.Record], started: dict[str, Any]) -> None:
    """Every latest row is the shared market model at that row's instant, within what each wire
    carries: so a contract held at both brokers has, at any one instant, the same values at both."""
    market = Market(MarketConfig(seed=int(started["seed"])), float(started["market_start_ts"]))
    by_key: dict[str, set[str]] = {}
    for r in latest:
        by_key.setdefault(r["instrument"], set()).add(r["broker"])
    shared = {
        k
        for k, brokers in by_key.items()
        if brokers == {"ibkr", "tastytrade"} and market.contracts[k].asset_class == "OPT"
    }
    assert len(shared) >= 5
    checked = 0
    for r in latest:
        if r["instrument"] not in shared:
            continue
        ts = round(r["event_ts"].timestamp() * 1000) / 1000  # both wires carry whole milliseconds
        model = market.peek(r["instrument"], ts)
        assert (r["bid"], r["ask"]) == (model.bid, model.ask), r
        ibkr = r["broker"] == "ibkr"
        # IBKR: IV as a percent with 2 decimals, Greeks ~4 significant digits; DXLink: the values,
        # stored as 4-byte reals (about 6 significant digits).
        assert r["iv"] == pytest.approx(model.iv, abs=0.5e-4 if ibkr else 1e-6)
        for name in ("delta", "gamma", "theta", "vega"):
            assert math.isclose(
                r[name], getattr(model, name), rel_tol=2e-3 if ibkr else 2e-6, abs_tol=1e-7
            ), (
                name,
                r,
            )
        assert r["greeks_source"] == "broker"
        checked += 1
    assert checked >= 10
