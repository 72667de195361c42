"""The engine itself under stress: stopped mid-stream (SIGTERM), flooded with malformed frames on
both feeds, and writing to a database too slow for the tick rate."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import anyio
import asyncpg

from config.settings import DatabaseSettings
from db.embedded import EmbeddedServer, database, ensure_database
from tests.chaos.harness import EngineProcess, SimProcess, check_ledger, history, running


async def _read_back(var: Path) -> list[asyncpg.Record]:
    async with database(DatabaseSettings(embedded_dir=var / "postgres")) as dsn:
        return await history(dsn)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_sigterm_mid_stream_commits_everything_received(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    engine = EngineProcess.live(tmp_path, *sims)
    with running(engine):
        engine.start()
        engine.wait_streaming(("ibkr", "tastytrade"))
        time.sleep(2)
        signalled_at = time.time()
        assert engine.terminate() == 0
        final = engine.status()
        for sim in sims:
            sim.read_ledger(final=True)
    assert final is not None
    assert final["status"] == "stopped"
    rows = anyio.run(_read_back, tmp_path / "var")
    # Everything the brokers handed over became a row, and every row was committed.
    assert final["actors"]["normalizer"]["events_total"] == final["writer"]["rows_total"] == len(rows)
    assert final["writer"]["spool_rows"] == 0
    assert not [e for e in engine.logs() if e.get("event") == "drain_incomplete"]
    held = {(r["broker"], r["instrument"]) for r in rows}
    check = check_ledger(rows, list(sims), held=held, excused=[(signalled_at - 0.3, signalled_at + 60)])
    assert check.duplicates == []
    assert check.unexpected == []
    assert check.missing == [], f"{len(check.missing)} of {check.expected} missing"


FLOOD = {
    "ibkr": [
        "malformed",
        "truncated",
        "unknown_message",
        "huge_frame",
        "wrong_types",
        "nan_values",
        "bad_utf8",
    ],
    "tastytrade": [
        "malformed",
        "truncated",
        "unknown_message",
        "wrong_value_count",
        "huge_frame",
        "wrong_types",
        "nan_values",
        "bad_utf8",
        "binary_frame",
    ],
}


def test_a_flood_of_malformed_frames_on_both_feeds(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    engine = EngineProcess.live(tmp_path, *sims)
    with running(engine):
        engine.start()
        before = engine.wait_streaming(("ibkr", "tastytrade"))
        for sim in sims:
            for fault in FLOOD[sim.broker]:
                sim.inject(fault, count=25)
        sims[0].inject("binary_frame", duration_s=2)  # IBKR: every frame binary for a while
        doc = engine.wait_status(
            "malformed frames counted on both feeds",
            lambda d: all(d["actors"][b]["malformed_total"] >= 50 for b in ("ibkr", "tastytrade")),
            60,
        )
        time.sleep(2)  # and streaming on after the flood
        doc = engine.wait_streaming(("ibkr", "tastytrade"))
        stop_at = time.time()
        assert engine.terminate() == 0
        for sim in sims:
            sim.read_ledger(final=True)
    for broker in ("ibkr", "tastytrade"):
        actor = doc["actors"][broker]
        assert actor["restarts"] == before["actors"][broker]["restarts"] == 0  # no crash
        assert actor["reconnects"] == 0  # no connection given up over bad frames
        assert actor["frames_total"] > before["actors"][broker]["frames_total"]
    assert doc["actors"]["normalizer"]["bad_events"] == 0
    assert doc["writer"]["rejected_rows"] == 0
    assert doc["writer"]["nonfinite_values"] == 0
    rows = anyio.run(_read_back, tmp_path / "var")
    held = {(r["broker"], r["instrument"]) for r in rows}
    check = check_ledger(rows, list(sims), held=held, excused=[(stop_at - 0.5, stop_at + 60)])
    assert check.duplicates == []  # no corrupt copy made a second row
    assert check.unexpected == []  # no invented row
    assert check.missing == [], f"{len(check.missing)} of {check.expected} missing"  # corruption only adds
    for r in rows:  # no bad values
        for name in ("delta", "iv", "bid", "ask"):
            value = r[name]
            assert value is None or math.isfinite(value), (name, r)
        assert r["seq"] is not None


def test_a_database_too_slow_for_the_tick_rate_conflates_with_bounded_memory(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "pg")
    server.start()
    anyio.run(ensure_database, server.dsn(), "chaos")
    dsn = server.dsn("chaos")
    ibkr = SimProcess("ibkr", tmp_path, rate=40)
    tastytrade = SimProcess("tastytrade", tmp_path, rate=40)
    engine = EngineProcess.live(
        tmp_path, ibkr, tastytrade, DATABASE_URL=dsn, CHANNEL_ROWS_CAPACITY="4", CONFLATE_AFTER_ROWS="2000"
    )
    lock_s = 8.0
    try:
        with running(ibkr, tastytrade, engine):
            ibkr.start()
            tastytrade.start()
            engine.start()
            engine.wait_streaming(("ibkr", "tastytrade"))
            assert engine.proc is not None
            locked = threading.Event()
            release = threading.Event()

            def hold_lock() -> None:
                async def hold() -> None:
                    conn = await asyncpg.connect(dsn)
                    try:
                        async with conn.transaction():
                            await conn.execute("LOCK TABLE greeks_latest IN ACCESS EXCLUSIVE MODE")
                            locked.set()
                            await anyio.to_thread.run_sync(release.wait)
                    finally:
                        await conn.close()

                anyio.run(hold)

            holder = threading.Thread(target=hold_lock, daemon=True)
            holder.start()
            assert locked.wait(20)
            rss: list[float] = []
            deadline = time.monotonic() + lock_s
            while time.monotonic() < deadline:
                rss.append(_rss_mb(engine.proc.pid))
                time.sleep(0.25)
            during = engine.status()
            release.set()
            holder.join(20)
            engine.wait_status(
                "caught up",
                lambda d: d["status"] == "ok" and d["channels"]["rows"]["used"] == 0,
                60,
            )
            stop_at = time.time()
            assert engine.terminate() == 0
            final = engine.status()
            ibkr.read_ledger(final=True)
            tastytrade.read_ledger(final=True)
        assert during is not None
        assert final is not None
        conflated = final["actors"]["normalizer"]["conflated_total"]
        assert conflated > 0
        assert [e for e in engine.logs() if e.get("event") == "rows_conflated"]
        # Memory is bounded by positions, not by ticks: flat while the database is stuck.
        third = max(len(rss) // 3, 1)
        assert max(rss[-third:]) < max(rss[:third]) * 1.25 + 20, rss
        assert max(rss) < 400, rss
        rows = anyio.run(history, dsn)
        # Every row the normalizer handed over (made, minus conflated) is in history, exactly once.
        made = final["actors"]["normalizer"]["events_total"]
        assert made - conflated == final["writer"]["rows_total"] == len(rows)
        held = {(r["broker"], r["instrument"]) for r in rows}
        check = check_ledger(rows, [ibkr, tastytrade], held=held, excused=[(stop_at - 0.5, stop_at + 60)])
        assert check.duplicates == []
        assert check.unexpected == []
        assert 0 < len(check.missing) <= conflated  # what is missing is what was counted
    finally:
        server.stop()
