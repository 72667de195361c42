"""A broker's simulator killed then started again, and the other broker's stalled (socket open,
no data): the healthy broker keeps streaming, the failed one reconnects and resubscribes, the
status file goes degraded then ok, and every update sent while connected is stored exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from config.settings import DatabaseSettings
from db.embedded import database
from tests.chaos.harness import EngineProcess, SimProcess, check_ledger, history, max_gap, running, sessions


async def _read_back(var: Path) -> tuple[list, list]:  # type: ignore[type-arg]
    async with database(DatabaseSettings(embedded_dir=var / "postgres")) as dsn:
        return await history(dsn), await sessions(dsn)


def test_a_killed_broker_comes_back_and_a_stalled_one_reconnects_while_the_other_streams(
    tmp_path: Path, sims: tuple[SimProcess, SimProcess]
) -> None:
    ibkr, tastytrade = sims
    engine = EngineProcess.live(tmp_path, ibkr, tastytrade)
    with running(engine):
        engine.start()
        engine.wait_streaming(("ibkr", "tastytrade"))

        # 1. The IBKR simulator dies (SIGKILL), stays away ~3 s, comes back on the same port.
        ibkr.read_ledger()
        read_at = time.time()
        killed_at = ibkr.kill()
        engine.wait_status(
            "ibkr reported down", lambda d: d["actors"]["ibkr"].get("connection") != "connected"
        )
        engine.wait_status("degraded", lambda d: d["status"] == "degraded")
        time.sleep(3)  # an outage, not a detection: both are already observed
        ibkr.start()
        engine.wait_streaming(("ibkr", "tastytrade"))
        ibkr_back_at = time.time()

        # 2. The Tastytrade simulator stalls for 5 s: no data, no keepalive, socket open.
        time.sleep(1)
        stalled_at = time.time()
        tastytrade.inject("stall", duration_s=5)
        engine.wait_status(
            "tastytrade stale", lambda d: d["actors"]["tastytrade"].get("reconnects", 0) > 0, 20
        )
        engine.wait_streaming(("ibkr", "tastytrade"), timeout=30)
        tastytrade_back_at = time.time()
        time.sleep(1)

        stop_at = time.time()
        assert engine.terminate() == 0
        ibkr.read_ledger(final=True)
        tastytrade.read_ledger(final=True)

    rows, stream_sessions = anyio.run(_read_back, tmp_path / "var")
    held = {(r["broker"], r["instrument"]) for r in rows}
    check = check_ledger(
        rows,
        [ibkr, tastytrade],
        # frames in flight when the process died, frames queued on the stalled socket (ticked,
        # never sent: the engine gave that connection up), and after the engine stopped reading
        excused=[
            (read_at - 0.2, killed_at + 0.2),
            (stalled_at - 0.5, stalled_at + 0.5),
            (stop_at - 0.5, stop_at + 60),
        ],
        held=held,
    )
    assert check.duplicates == []
    assert check.unexpected == []
    assert check.missing == [], f"{len(check.missing)} of {check.expected} missing, e.g. {check.missing[:5]}"
    assert check.expected > 500
    # Both IBKR generations and the stall's both sides made it into history.
    assert {r["seq"] > SimProcess.SEQ_STRIDE for r in rows if r["broker"] == "ibkr"} == {False, True}

    # The healthy broker never paused: no gap longer than its normal cadence (5 Hz per contract,
    # dozens of contracts: a row every few ms; 1 s is generous on a loaded machine).
    tt_times = [r["received"] for r in rows if r["broker"] == "tastytrade"]
    ib_times = [r["received"] for r in rows if r["broker"] == "ibkr"]
    assert max_gap(tt_times, killed_at, ibkr_back_at) < 1.0
    assert max_gap(ib_times, stalled_at, tastytrade_back_at) < 1.0

    # degraded during each fault, ok again after it
    seen = [status for t, status in engine.statuses if t > killed_at]
    assert "degraded" in seen
    assert seen[-2:] in (["ok", "stopping"], ["ok", "stopped"]) or seen[-3:-1] == ["ok", "stopping"]
    # every connection is a stream session: IBKR twice (at least), Tastytrade twice (at least)
    by_broker = {b: [s for s in stream_sessions if s["broker"] == b] for b in ("ibkr", "tastytrade")}
    assert len(by_broker["ibkr"]) >= 2
    assert len(by_broker["tastytrade"]) >= 2
    assert all(s["ended"] is not None for s in stream_sessions)
    assert any(s["end_reason"] for s in by_broker["ibkr"][:-1])
