"""The database goes away under a streaming engine: stopped (an external server), killed (the
engine's own embedded server), or the engine itself killed while spooling. Every update is
committed exactly once in the end, the spool is empty, the status file returns to ok."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import asyncpg

from config.settings import DatabaseSettings
from db.embedded import EmbeddedServer, database, ensure_database
from tests.chaos.harness import (
    EngineProcess,
    SimProcess,
    check_ledger,
    history,
    running,
    wait_until,
)


def external_server(path: Path) -> tuple[EmbeddedServer, str]:
    """A PostgreSQL the test owns (the engine gets it as DATABASE_URL and never starts it)."""
    server = EmbeddedServer(path)
    server.start()
    anyio.run(ensure_database, server.dsn(), "chaos")
    return server, server.dsn("chaos")


def spool_segments(var: Path) -> list[Path]:
    return list((var / "spool").glob("*.seg"))


def assert_exactly_once(rows: list[asyncpg.Record], sims: tuple[SimProcess, SimProcess], **kw: object) -> int:
    held = {(r["broker"], r["instrument"]) for r in rows}
    check = check_ledger(rows, list(sims), held=held, **kw)  # type: ignore[arg-type]
    assert check.duplicates == []
    assert check.unexpected == []
    assert check.missing == [], f"{len(check.missing)} of {check.expected} missing, e.g. {check.missing[:5]}"
    return check.expected


def test_postgres_stopped_mid_stream_spools_then_replays_exactly_once(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    server, dsn = external_server(tmp_path / "pg")
    engine = EngineProcess.live(tmp_path, *sims, DATABASE_URL=dsn, BUFFER_MAX_ROWS="200")
    try:
        with running(engine):
            engine.start()
            engine.wait_streaming(("ibkr", "tastytrade"))
            server.stop()
            engine.wait_status(
                "writer spooling to disk",
                lambda d: d["writer"]["state"] == "spooling" and d["writer"]["spool_rows"] > 0,
                30,
            )
            assert engine.status()["status"] == "degraded"  # type: ignore[index]
            time.sleep(2)
            server.start()
            doc = engine.wait_status(
                "replayed and back to ok",
                lambda d: (
                    d["status"] == "ok"
                    and d["writer"]["state"] == "running"
                    and d["writer"]["spool_rows"] == 0
                ),
                60,
            )
            assert doc["writer"]["replayed_rows"] > 0
            assert doc["writer"]["dropped_rows"] == 0
            stop_at = time.time()
            assert engine.terminate() == 0
            for sim in sims:
                sim.read_ledger(final=True)
        rows = anyio.run(history, dsn)
        assert assert_exactly_once(rows, sims, excused=[(stop_at - 0.5, stop_at + 60)]) > 300
        assert spool_segments(tmp_path / "var") == []
    finally:
        server.stop()


def test_engine_killed_while_spooling_comes_back_replays_and_stores_no_duplicates(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    server, dsn = external_server(tmp_path / "pg")
    engine = EngineProcess.live(tmp_path, *sims, DATABASE_URL=dsn, BUFFER_MAX_ROWS="50")
    try:
        with running(engine):
            engine.start()
            engine.wait_streaming(("ibkr", "tastytrade"))
            server.stop()
            engine.wait_status("spooling", lambda d: d["writer"]["spool_rows"] > 100, 30)
            killed_at = time.time()
            engine.kill()  # SIGKILL: no drain, whatever is in memory is gone; the spool is on disk
            assert spool_segments(tmp_path / "var")
            server.start()
            engine.start()  # same VAR_DIR: finds the spool of the killed run
            doc = engine.wait_status(
                "the killed run's spool replayed",
                lambda d: (
                    d["status"] == "ok"
                    and d["writer"]["spool_rows"] == 0
                    and d["writer"]["replayed_rows"] > 0
                ),
                60,
            )
            engine.wait_streaming(("ibkr", "tastytrade"))
            restarted_at = time.time()
            time.sleep(1)
            stop_at = time.time()
            assert engine.terminate() == 0
            for sim in sims:
                sim.read_ledger(final=True)
        assert doc["writer"]["dropped_rows"] == 0
        rows = anyio.run(history, dsn)
        # Lost by design: what the killed process held in memory (at most BUFFER_MAX_ROWS rows
        # and its in-flight batches). Never duplicated, never invented.
        assert_exactly_once(
            rows, sims, excused=[(killed_at - 5, restarted_at), (stop_at - 0.5, stop_at + 60)]
        )
        assert spool_segments(tmp_path / "var") == []
    finally:
        server.stop()


def test_the_embedded_server_killed_under_the_engine_is_restarted_by_it(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    engine = EngineProcess.live(tmp_path, *sims, BUFFER_MAX_ROWS="200")
    var = tmp_path / "var"
    with running(engine):
        engine.start()
        engine.wait_streaming(("ibkr", "tastytrade"))
        pid = int((var / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        engine.wait_status("writer lost the database", lambda d: d["writer"]["db"] == "down", 30)
        wait_until(
            "the engine restarted its server",
            lambda: any(e.get("event") == "embedded_db_restarted" for e in engine.logs()),
            60,
            context=engine.context,
        )
        engine.wait_status(
            "replayed and ok",
            lambda d: (
                d["status"] == "ok" and d["writer"]["db"] == "connected" and d["writer"]["spool_rows"] == 0
            ),
            60,
        )
        stop_at = time.time()
        assert engine.terminate() == 0
        for sim in sims:
            sim.read_ledger(final=True)

    async def read() -> list[asyncpg.Record]:
        async with database(DatabaseSettings(embedded_dir=var / "postgres")) as dsn:
            return await history(dsn)

    rows = anyio.run(read)
    assert assert_exactly_once(rows, sims, excused=[(stop_at - 0.5, stop_at + 60)]) > 300
    assert [e for e in engine.logs() if e.get("event") == "embedded_db_down"]
    assert spool_segments(var) == []
