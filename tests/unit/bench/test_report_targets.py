"""bench._report: the CPU target with the floors beside it; the cores each process kept busy."""

from __future__ import annotations

from bench._harness import Run
from bench._report import pipeline_targets, table


def _run(name: str, us_per_tick: float, committed: int = 1000) -> Run:
    return Run(name, 2000.0, 10.0, ticks_committed=committed, cpu_us_per_tick=us_per_tick)


def _cpu_target(engine: Run, peers: dict[str, Run]) -> dict[str, object]:
    (target,) = [t for t in pipeline_targets(engine, peers, "cmd") if t["target"].startswith("CPU")]
    return target


def test_the_best_streaming_peer_is_the_cheapest_and_the_floors_never_are() -> None:
    peers = {
        "sdk_executemany": _run("sdk_executemany", 200.0),
        "sdk_execute": _run("sdk_execute", 900.0),
        "poll": _run("poll", 1.0),  # samples, does not stream: never the best peer
        "bare_copy": _run("bare_copy", 100.0),
        "bare_recv": _run("bare_recv", 44.0),
    }
    target = _cpu_target(_run("engine", 50.0), peers)
    assert target["met"] is False
    assert target["measured"] == {
        "engine_us_per_tick": 50.0,
        "best_peer": "sdk_executemany",
        "best_peer_us_per_tick": 200.0,
        "ratio": 4.0,
        "bare_copy_us_per_tick": 100.0,
        "best_peer_over_bare_copy": 2.0,
        "target_us_per_tick": 40.0,
        "bare_recv_us_per_tick": 44.0,
        "bare_recv_share_of_target": 1.1,  # receiving alone costs more than the target allows
    }
    assert _cpu_target(_run("engine", 40.0), peers)["met"] is True


def test_a_floor_that_did_not_run_or_received_nothing_is_left_out() -> None:
    peers = {"sdk_executemany": _run("sdk_executemany", 200.0), "bare_recv": _run("bare_recv", 0.0, 0)}
    measured = _cpu_target(_run("engine", 50.0), peers)["measured"]
    assert isinstance(measured, dict)
    assert "bare_recv_us_per_tick" not in measured
    assert "bare_copy_us_per_tick" not in measured


def test_cores_used_are_each_process_cpu_over_the_busy_window() -> None:
    run = Run("engine", 2000.0, 10.0, cpu_s=4.0, feed_cpu_s=1.5, db_cpu_s=2.5, busy_s=10.0)
    assert run.cores_used() == {"contestant": 0.4, "feed": 0.15, "database": 0.25}
    assert Run("engine", 2000.0, 10.0, cpu_s=4.0).cores_used() == {}  # no run: no window


def test_the_table_shows_the_cores_of_each_run_and_a_dash_before_one() -> None:
    ran = Run("engine", 2000.0, 10.0, cpu_s=4.0, feed_cpu_s=1.5, db_cpu_s=2.5, busy_s=10.0)
    ran.cores = ran.cores_used()
    header, _rule, ran_line, idle_line = table([ran, Run("bare_recv", 2000.0, 10.0)]).splitlines()
    assert header.rstrip().endswith("cores c/f/db")
    assert ran_line.rstrip().endswith("0.40/0.15/0.25")
    assert idle_line.rstrip().endswith("-")
