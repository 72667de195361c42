"""`python run.py` in live mode for Tastytrade: credentials set and ``TT_API_URL`` pointing at a
Tastytrade simulator that this test runs (the engine starts none itself), rows in PostgreSQL for
every option position."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.embedded import database
from simulator.api import run_simulators
from simulator.market import MarketConfig
from tests.integration.test_run_cli import _admin, engine_env, engine_process, read_status

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.anyio]

SECRET, REFRESH = "live-client-s3cret", "live-refresh-t0ken"


async def _history(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch(
                "SELECT account, instrument, seq, quantity, delta, bid, ask, mark, greeks_source "
                "FROM greeks_history_wide WHERE broker = 'tastytrade'"
            )
        )
    finally:
        await conn.close()


async def history(env: dict[str, str]) -> list[asyncpg.Record]:
    if "DATABASE_URL" in env:
        return await _history(env["DATABASE_URL"])
    async with database(DatabaseSettings(embedded_dir=Path(env["VAR_DIR"]) / "postgres")) as dsn:
        return await _history(dsn)


async def test_live_mode_against_the_simulator_writes_rows_for_every_option_position(tmp_path: Path) -> None:
    async with run_simulators(MarketConfig(seed=11, rate_hz=4.0), brokers=("tastytrade",)) as sims:
        sim = sims.tastytrade
        assert sim is not None
        positions = sims.market.positions("tastytrade")
        options = {p.contract.key for p in positions if p.contract.asset_class == "OPT"}
        env = engine_env(
            tmp_path,
            BROKERS="tastytrade",
            TT_CLIENT_SECRET=SECRET,
            TT_REFRESH_TOKEN=REFRESH,
            TT_API_URL=sim.api_url,
            TT_KEEPALIVE_S="2",
        )
        if url := os.environ.get("TEST_DATABASE_URL"):
            name = f"tt_live_{os.getpid()}_{time.monotonic_ns()}"
            await _admin(url, f'CREATE DATABASE "{name}"')
            env["DATABASE_URL"] = url.rsplit("/", 1)[0] + "/" + name
        status_file = tmp_path / "var" / "status.json"
        with engine_process(env) as proc:
            doc: dict[str, Any] | None = None
            deadline = time.monotonic() + 45
            while True:  # the status file is the only thing another process lets us watch
                assert proc.poll() is None, proc.communicate()
                doc = read_status(status_file)
                portfolio = (doc or {}).get("portfolio", {})
                if (
                    doc
                    and doc["actors"]["tastytrade"].get("connection") == "connected"
                    and portfolio.get("total", {}).get("positions", 0) == len(positions)
                    and not portfolio.get("positions_without_data")
                    and doc["writer"]["rows_total"] > 3 * len(positions)
                ):
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    pytest.fail(
                        f"not streaming in time; status: {doc}\n"
                        f"{out.decode()[-4000:]}\n{err.decode()[-2000:]}"
                    )
                await anyio.sleep(0.1)
            assert doc["mode"] == "live"
            assert doc["brokers"] == {"tastytrade": "live"}
            tt = doc["actors"]["tastytrade"]
            assert tt["state"] == "running"
            assert tt["accounts"] == ["5WT00001"]
            assert tt["subscriptions"] == len(sim.subscribed_symbols())
            assert tt["malformed_total"] == 0
            assert tt["frames_total"] > 0
            assert sim.connections_total == 1
            proc.send_signal(signal.SIGTERM)
            out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        assert proc.returncode == 0, err.decode()[-3000:]
        for secret in (SECRET, REFRESH, *sim._quote_tokens, *sim._access_tokens):
            assert secret not in out.decode() + err.decode()
            assert secret not in status_file.read_text()
        ledger = sims.market.ledger("tastytrade")

    rows = await history(env)
    held = {(p.account, p.contract.key): p for p in positions}
    instruments = {r["instrument"] for r in rows}
    assert options <= instruments  # every option position has rows
    assert instruments == {key for _, key in held}
    keys = [(r["account"], r["instrument"], r["seq"]) for r in rows]
    assert len(keys) == len(set(keys))  # every update once
    for r in rows:
        pos = held[(r["account"], r["instrument"])]
        assert r["quantity"] == pos.quantity
        assert 1 <= r["seq"] <= ledger[("tastytrade", r["instrument"])]
    option_rows = [r for r in rows if r["instrument"] in options]
    assert all(r["greeks_source"] in ("broker", "model") for r in option_rows)
    assert any(r["greeks_source"] == "broker" and r["delta"] is not None for r in option_rows)
    assert all(r["bid"] is None or r["ask"] is None or r["bid"] <= r["ask"] for r in rows)
    if "DATABASE_URL" in env and (url := os.environ.get("TEST_DATABASE_URL")):
        await _admin(url, f'DROP DATABASE IF EXISTS "{env["DATABASE_URL"].rsplit("/", 1)[1]}" WITH (FORCE)')
