"""`python run.py` in live mode against the IBKR gateway simulator running in its own process.

The engine sees a gateway URL and nothing else: the IBKR actor streams from it exactly as from a
real Client Portal gateway, and every option position ends up as rows in PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.embedded import database
from normalize.symbology import occ_from_ibkr_description
from tests.integration.test_run_cli import ROOT, _admin, engine_env, engine_process, read_status, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@contextmanager
def simulator_process() -> Iterator[dict[str, Any]]:
    """`python -m simulator ibkr` on free ports; yields its `simulators_ready` log line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TT_", "IBKR_", "SIM_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "ibkr", "--port", "0", "--rate", "5", "--control-port", "0"],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready: dict[str, Any] | None = None
        for _ in range(200):
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"simulator exited: {proc.communicate()[1].decode()[-2000:]}")
            entry = json.loads(line)
            if entry.get("event") == "simulators_ready":
                ready = entry
                break
        assert ready is not None
        yield ready
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # the simulator, on loopback
        return json.loads(response.read())


def gateway_option_positions(rest_url: str) -> set[tuple[str, str]]:
    """(account, OCC key) of every option position the gateway reports (read as a client would)."""
    held: set[tuple[str, str]] = set()
    for account in get_json(f"{rest_url}/portfolio/accounts"):
        page = 0
        while True:
            rows = get_json(f"{rest_url}/portfolio/{account['id']}/positions/{page}")
            for row in rows:
                if row["assetClass"] == "OPT":
                    key = occ_from_ibkr_description(row["contractDesc"])
                    assert key is not None
                    held.add((row["acctId"], key))
            if len(rows) < 100:
                break
            page += 1
    return held


async def history(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch(
                "SELECT account, instrument, count(*) AS n, count(DISTINCT seq) AS seqs, "
                "max(seq) AS last_seq, count(delta) AS with_delta FROM greeks_history_wide "
                "WHERE broker = 'ibkr' "
                "GROUP BY account, instrument"
            )
        )
    finally:
        await conn.close()


async def committed_rows(env: dict[str, str]) -> list[asyncpg.Record]:
    if "DATABASE_URL" in env:
        return await history(env["DATABASE_URL"])
    async with database(DatabaseSettings(embedded_dir=Path(env["VAR_DIR"]) / "postgres")) as dsn:
        return await history(dsn)


def test_live_mode_against_the_gateway_simulator_stores_every_option_position(tmp_path: Path) -> None:
    with simulator_process() as sim:
        rest_url = sim["ibkr_rest"]
        options = gateway_option_positions(rest_url)
        assert len(options) > 10
        env = engine_env(
            tmp_path,
            IBKR_GATEWAY_URL=rest_url.removesuffix("/v1/api"),
            BROKERS="ibkr",
            EVENT_LOOP="uvloop",  # the optional loop (the dev extra installs it), end to end
        )
        if url := os.environ.get("TEST_DATABASE_URL"):
            name = f"ibkr_live_{os.getpid()}_{time.monotonic_ns()}"
            anyio.run(_admin, url, f'CREATE DATABASE "{name}"')
            env["DATABASE_URL"] = url.rsplit("/", 1)[0] + "/" + name
        status_file = tmp_path / "var" / "status.json"
        with engine_process(env) as proc:

            def streamed() -> dict[str, Any] | None:
                doc = read_status(status_file)
                if not doc or doc["status"] != "ok" or doc["actors"]["ibkr"].get("connection") != "connected":
                    return None
                return doc if doc["writer"]["rows_total"] >= 10 * len(options) else None

            doc = wait_for(streamed, 90, proc)
            assert doc["mode"] == "live"
            assert doc["brokers"] == {"ibkr": "live"}
            assert doc["runtime"]["event_loop"] == "uvloop"
            ibkr = doc["actors"]["ibkr"]
            assert ibkr["accounts"] == ["U1234567"]
            assert ibkr["subscriptions"] >= len({key for _, key in options})
            assert (ibkr["reconnects"], ibkr["malformed_total"], ibkr["subscriptions_left_out"]) == (0, 0, 0)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-3000:]
        ledger = get_json(f"{sim['control']}/ledger")["brokers"]["ibkr"]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
    events = {line["event"] for line in lines}
    assert "subscriptions_sent" in events
    assert "simulated_data" not in events  # live: nothing says the data is simulated
    rows = {(r["account"], r["instrument"]): r for r in anyio.run(committed_rows, env)}
    missing = options - set(rows)
    assert missing == set(), f"option positions without rows: {sorted(missing)}"
    for position in options:
        r = rows[position]
        assert r["n"] == r["seqs"]  # each simulator update once
        assert r["last_seq"] <= ledger[position[1]]
        assert r["with_delta"] > 0  # broker Greeks came through
    if "DATABASE_URL" in env and (url := os.environ.get("TEST_DATABASE_URL")):
        anyio.run(
            _admin, url, f'DROP DATABASE IF EXISTS "{env["DATABASE_URL"].rsplit("/", 1)[1]}" WITH (FORCE)'
        )
