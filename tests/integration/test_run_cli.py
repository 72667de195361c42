"""`python run.py` as a user runs it: a subprocess, JSON logs, a status file, SIGTERM, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from actors.engine import speedups_loaded
from config.settings import DatabaseSettings
from db.embedded import database

ROOT = Path(__file__).resolve().parents[2]


def engine_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TT_", "IBKR_", "SIM_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        VAR_DIR=str(tmp_path / "var"),
        STATUS_INTERVAL_S="0.2",
        SIM_RATE_HZ="5",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _history_counts(dsn: str) -> tuple[int, int, dict[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        total = await conn.fetchval("SELECT count(*) FROM greeks_history")
        distinct = await conn.fetchval(
            "SELECT count(*) FROM (SELECT DISTINCT broker, account, instrument, seq"
            " FROM greeks_history_wide) d"
        )
        per_broker = dict(
            await conn.fetch("SELECT broker, count(*) FROM greeks_history_wide GROUP BY broker")
        )
        return total, distinct, per_broker
    finally:
        await conn.close()


async def history_counts(env: dict[str, str]) -> tuple[int, int, dict[str, int]]:
    """Rows the engine committed: from DATABASE_URL, or by reopening its embedded data directory."""
    if "DATABASE_URL" in env:
        return await _history_counts(env["DATABASE_URL"])
    settings = DatabaseSettings(embedded_dir=Path(env["VAR_DIR"]) / "postgres")
    async with database(settings) as dsn:
        return await _history_counts(dsn)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> Any:
    """Poll a condition on another process's output (files are the only event we can observe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"engine exited early with {proc.returncode}:\n{out.decode()[-3000:]}\n{err.decode()[-3000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"condition not met in {timeout} s:\n{out.decode()[-3000:]}\n{err.decode()[-3000:]}")


@contextmanager
def engine_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python run.py` as a subprocess, killed if the test leaves it running."""
    proc = subprocess.Popen(
        [sys.executable, "run.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run_status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run.py", "status", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.integration
@pytest.mark.postgres
def test_engine_streams_reports_health_and_drains_on_sigterm(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    if url := os.environ.get("TEST_DATABASE_URL"):  # a fresh database on that server
        name = f"cli_{os.getpid()}_{time.monotonic_ns()}"
        anyio.run(_admin, url, f'CREATE DATABASE "{name}"')
        env["DATABASE_URL"] = url.rsplit("/", 1)[0] + "/" + name
    status_file = tmp_path / "var" / "status.json"
    with engine_process(env) as proc:

        def healthy() -> dict[str, Any] | None:
            doc = read_status(status_file)
            if (
                doc
                and doc["status"] == "ok"
                and doc["actors"]["writer"]["events_total"] > 0
                and doc.get("portfolio", {}).get("total", {}).get("positions", 0) > 0
                and all(doc["actors"][b].get("connection") == "connected" for b in ("ibkr", "tastytrade"))
            ):
                return doc
            return None

        doc = wait_for(healthy, 90, proc)
        assert doc["mode"] == "simulated"
        assert doc["pid"] == proc.pid
        assert set(doc["actors"]) == {"ibkr", "tastytrade", "normalizer", "writer"}
        for actor in doc["actors"].values():
            assert actor["state"] == "running"
            assert actor["restarts"] == 0
        assert doc["channels"]["raw"]["capacity"] == 256
        assert doc["channels"]["rows"]["capacity"] == 256
        assert doc["brokers"] == {"ibkr": "simulated", "tastytrade": "simulated"}
        assert doc["runtime"]["event_loop"] == "asyncio"  # the default
        assert doc["runtime"]["speedups"] is speedups_loaded()  # the C fast paths, where built
        assert doc["writer"]["db"] == "connected"
        if "DATABASE_URL" not in env:
            assert doc["database"]["embedded"] is True
            assert doc["database"]["host"] == "127.0.0.1"
            assert doc["database"]["name"] == "portfolio_engine"

        human = run_status(env=env)
        assert human.returncode == 0, human.stdout + human.stderr
        assert human.stdout.startswith("status: ok")
        portfolio = doc["portfolio"]
        assert portfolio["total"]["positions"] > 0
        assert set(portfolio["by_underlying"]) >= {"SPY", "SPX"}
        assert "portfolio (as of 20" in human.stdout
        assert "\ndatabase: " in human.stdout
        for broker in ("ibkr", "tastytrade"):
            assert f"\n{broker}: connected (simulated), accounts " in human.stdout
        assert "\n  total " in human.stdout
        raw = run_status("--json", env=env)
        assert raw.returncode == 0
        assert json.loads(raw.stdout)["pid"] == proc.pid

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    events = [line["event"] for line in lines]
    for line in lines:
        assert {"timestamp", "level", "event"} <= set(line)
        datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).astimezone(UTC)
    assert "simulated_data" in events
    assert "stop_requested" in events
    # once every actor is up, the start-up heap leaves the collector's sight (supervisor.heap)
    (frozen,) = [line for line in lines if line["event"] == "startup_heap_frozen"]
    assert frozen["objects"] > 10_000
    engine_events = [e for e in events if e != "simulator_stopped"]  # simulators stop last
    assert engine_events[-1] == "supervisor_stopped"
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
    final = read_status(status_file)
    assert final is not None
    assert final["status"] == "stopped"
    assert all(a["state"] == "stopped" for a in final["actors"].values())
    assert run_status(env=env).returncode == 2  # stopped

    # The drain lost nothing: every row the normalizer made is committed, exactly once. (Broker
    # events are not rows one for one: an underlying that is not held, such as SPX for SPXW
    # options, updates the book without a row of its own; a contract in two accounts makes two.)
    produced = final["actors"]["normalizer"]["events_total"]
    total, distinct, per_broker = anyio.run(history_counts, env)
    assert set(per_broker) == {"ibkr", "tastytrade"}
    assert all(final["actors"][b]["events_total"] > 0 for b in ("ibkr", "tastytrade"))
    assert total == distinct == produced == final["writer"]["rows_total"] == sum(per_broker.values())
    if "DATABASE_URL" in env and (url := os.environ.get("TEST_DATABASE_URL")):
        anyio.run(
            _admin, url, f'DROP DATABASE IF EXISTS "{env["DATABASE_URL"].rsplit("/", 1)[1]}" WITH (FORCE)'
        )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "STATUS_INTERVAL_S",
            "abc",
            "config error: STATUS_INTERVAL_S (got 'abc'): expected a number > 0 and <= 5",
        ),
        (
            "DATABASE_URL",
            "postgresql://me:hunter2@db:notaport/x",
            "config error: DATABASE_URL: expected a PostgreSQL URL such as "
            "postgresql://user:password@host:5432/dbname (value not shown)",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, variable: str, value: str, message: str) -> None:
    env = engine_env(tmp_path, **{variable: value})
    result = subprocess.run(
        [sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message]
    assert result.stdout == ""
    assert "hunter2" not in result.stderr


@pytest.mark.integration
def test_status_exit_codes(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    path = tmp_path / "var" / "status.json"
    missing = run_status(env=env)
    assert missing.returncode == 2
    assert "no status file" in missing.stdout
    path.parent.mkdir(parents=True)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    base = {"mode": "simulated", "pid": 1, "started_at": now, "updated_at": now, "actors": {}, "channels": {}}
    for status, code in [("ok", 0), ("degraded", 1), ("down", 2), ("stopping", 2), ("stopped", 2)]:
        path.write_text(json.dumps({**base, "status": status}))
        result = run_status(env=env)
        assert result.returncode == code, (status, result.stdout)
        assert result.stdout.startswith(f"status: {status}")
    path.write_text(json.dumps({**base, "status": "ok", "updated_at": "2020-01-01T00:00:00Z"}))
    stale = run_status(env=env)
    assert stale.returncode == 2
    assert "STALE" in stale.stdout
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({**base, "status": "degraded"}))
    assert run_status("--file", str(other), env=env).returncode == 1


@pytest.mark.integration
def test_help_documents_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    for word in ("run", "status", "--simulate", "--env-file", "STATUS_FILE", "DATABASE_URL"):
        assert word in out.stdout
    status_help = subprocess.run(
        [sys.executable, "run.py", "status", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert "--json" in status_help.stdout
    assert "exit code" in status_help.stdout.lower()


@pytest.mark.integration
@pytest.mark.postgres
def test_sigterm_while_the_embedded_database_starts_exits_0_and_stops_it(tmp_path: Path) -> None:
    """`docker stop` right after start: no orphaned postmaster, no traceback, exit 0."""
    env = engine_env(tmp_path)
    env.pop("DATABASE_URL", None)
    with engine_process(env) as proc:
        assert proc.stdout is not None
        # engine_starting is logged before the database starts (other lines, e.g. asyncio debug
        # warnings under PYTHONASYNCIODEBUG=1, may come first)
        seen = [json.loads(proc.stdout.readline())["event"]]
        while seen[-1] != "engine_starting" and len(seen) < 50:
            seen.append(json.loads(proc.stdout.readline())["event"])
        assert seen[-1] == "engine_starting", seen
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    events = [json.loads(line)["event"] for line in out.decode().splitlines()]
    assert "stop_requested" in events
    assert not list((tmp_path / "var" / "postgres").rglob("postmaster.pid"))


@pytest.mark.integration
@pytest.mark.postgres
def test_psql_opens_the_embedded_database_and_stops_what_it_started(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    query = "select current_database(), current_user"
    result = subprocess.run(
        [sys.executable, "run.py", "psql", "-At", "-c", query],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "portfolio_engine|postgres"
    password = (tmp_path / "var" / "postgres.pgpass").read_text().strip().rsplit(":", 1)[1]
    assert password not in result.stdout + result.stderr
    assert "starting the embedded server" in result.stderr
    from db.embedded import EmbeddedServer

    assert not EmbeddedServer(tmp_path / "var" / "postgres").is_running()  # stopped again
    # A psql error is psql's exit status.
    bad = subprocess.run(
        [sys.executable, "run.py", "psql", "-c", "select * from no_such_table"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert bad.returncode != 0
    assert "no_such_table" in bad.stderr


def test_psql_with_database_url_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    import run
    from config.loader import load_settings

    settings = load_settings(
        {"DATABASE_URL": "postgresql://alice:s3cr%3At@db.example:6543/prod?sslmode=require"}
    )
    with contextlib.ExitStack() as stack:
        target, pgpass = run._psql_target(settings, tmp_path, stack)
    assert target == "postgresql://alice@db.example:6543/prod?sslmode=require"
    assert "s3cr" not in target
    assert Path(pgpass).read_text() == "*:*:*:alice:s3cr\\:t\n"
    assert Path(pgpass).stat().st_mode & 0o077 == 0
