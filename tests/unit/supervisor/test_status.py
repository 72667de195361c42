"""Status registry, rendering and the atomic status file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from supervisor.context import ActorContext
from supervisor.errors import TransientError
from supervisor.spec import ActorSpec, Backoff, ChannelSpec
from supervisor.status import (
    ActorState,
    Overall,
    StatusRegistry,
    overall_status,
    render_status,
    write_status_file,
)
from supervisor.supervisor import Supervisor


def registry_with(**states: ActorState) -> StatusRegistry:
    reg = StatusRegistry(mode="simulated", clock=lambda: 100.0)
    reg.add_actor("writer", critical=True)
    reg.add_actor("normalizer", critical=True)
    reg.add_actor("ibkr", source=True)
    reg.add_actor("tastytrade", source=True)
    for name in reg.actors:
        reg.set_state(name, states.get(name, ActorState.RUNNING))
    return reg


@pytest.mark.parametrize(
    ("states", "degraded", "expected"),
    [
        ({}, None, Overall.OK),
        ({"ibkr": ActorState.RESTARTING}, None, Overall.DEGRADED),
        ({"ibkr": ActorState.FAILED}, None, Overall.DEGRADED),
        ({}, "spooling", Overall.DEGRADED),
        ({"ibkr": ActorState.FAILED, "tastytrade": ActorState.RESTARTING}, None, Overall.DOWN),
        ({"writer": ActorState.RESTARTING}, None, Overall.DOWN),
        ({"normalizer": ActorState.STARTING}, None, Overall.DOWN),
    ],
)
def test_overall_status(states: dict[str, ActorState], degraded: str | None, expected: Overall) -> None:
    reg = registry_with(**states)
    if degraded:
        reg.set_degraded("writer", degraded)
    assert overall_status(reg) is expected


def test_phase_overrides_and_degraded_clears() -> None:
    reg = registry_with()
    reg.set_degraded("writer", "spooling")
    reg.set_degraded("writer", None)
    assert overall_status(reg) is Overall.OK
    reg.set_phase(Overall.STOPPING)
    assert overall_status(reg) is Overall.STOPPING


def test_render_has_stable_keys_and_counters() -> None:
    now = [1_700_000_000.0]
    reg = StatusRegistry(mode="simulated", clock=lambda: now[0], pid=4242)
    reg.add_actor("ibkr", source=True)
    reg.set_state("ibkr", ActorState.RUNNING)
    reg.record_events("ibkr", 5)
    reg.record_events("ibkr", 7)
    reg.count_restart("ibkr")
    reg.set_state("ibkr", ActorState.RUNNING, error="TransientError: x")
    reg.publish("writer", {"rows_total": 3})
    reg.channel_stats = lambda: {"raw": {"used": 1, "capacity": 8}}
    now[0] += 2.5
    doc = render_status(reg, now[0])
    assert doc["status"] == "ok"
    assert doc["mode"] == "simulated"
    assert doc["pid"] == 4242
    assert doc["started_at"] == "2023-11-14T22:13:20.000Z"
    assert doc["updated_at"] == "2023-11-14T22:13:22.500Z"
    assert doc["actors"]["ibkr"] == {
        "state": "running",
        "restarts": 1,
        "last_error": "TransientError: x",
        "last_event_at": "2023-11-14T22:13:20.000Z",
        "last_event_age_s": 2.5,
        "events_total": 12,
    }
    assert doc["channels"] == {"raw": {"used": 1, "capacity": 8}}
    assert doc["writer"] == {"rows_total": 3}


def test_actor_info_keys_join_the_actor_entry_and_never_hide_standard_keys() -> None:
    reg = registry_with()
    changes: list[int] = []
    reg.on_change = lambda: changes.append(1)
    reg.set_info("ibkr", {"connection": "connecting", "subscriptions": 0})
    assert changes == []
    reg.set_info("ibkr", {"connection": "connected", "state": "bogus"}, changed=True)
    assert changes == [1]
    entry = render_status(reg, 100.0)["actors"]["ibkr"]
    assert entry["connection"] == "connected"
    assert entry["subscriptions"] == 0
    assert entry["state"] == "running"
    assert "connection" not in render_status(reg, 100.0)["actors"]["tastytrade"]


def test_status_file_write_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten never sees partial JSON."""
    path = tmp_path / "status.json"
    big = {"actors": {f"a{i}": {"events_total": i, "pad": "x" * 500} for i in range(200)}}
    write_status_file(path, {"n": -1, **big})
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
                json.loads(text)
                reads[0] += 1
            except (ValueError, FileNotFoundError) as exc:  # pragma: no cover - the failure we test for
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(300):
            write_status_file(path, {"n": n, **big})
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert reads[0] > 0
    assert json.loads(path.read_text())["n"] == 299
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


@pytest.mark.anyio
async def test_supervisor_writes_status_file_on_state_change(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    crashed = anyio.Event()
    release = anyio.Event()

    async def flaky(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        if ctx.attempt == 1:
            task_status.started()
            ctx.record_events(3)
            crashed.set()
            raise TransientError("feed dropped")
        task_status.started()
        await anyio.sleep_forever()

    async def sleep(delay: float) -> None:
        await release.wait()

    registry = StatusRegistry(mode="simulated", clock=lambda: 1_700_000_000.0)
    sup = Supervisor(
        [ActorSpec("ibkr", flaky, backoff=Backoff(0.1, 1, 0), outputs=("raw",))],
        [ChannelSpec("raw", 8)],
        registry,
        status_file=path,
        status_interval_s=3600,  # only state changes trigger writes here
        sleep=sleep,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            await crashed.wait()
            # the file is the observable here: poll it at every scheduler checkpoint
            while (  # noqa: ASYNC110
                not path.exists() or json.loads(path.read_text())["actors"]["ibkr"]["state"] != "restarting"
            ):
                await anyio.lowlevel.checkpoint()
        doc = json.loads(path.read_text())
        assert doc["status"] == "down"  # the only source is down
        assert doc["actors"]["ibkr"]["restarts"] == 1
        assert doc["actors"]["ibkr"]["events_total"] == 3
        assert doc["actors"]["ibkr"]["last_error"] == "TransientError: feed dropped"
        assert doc["channels"]["raw"] == {
            "used": 0,
            "capacity": 8,
            "waiting_senders": 0,
            "waiting_receivers": 0,
        }
        release.set()
        with anyio.fail_after(5):
            while json.loads(path.read_text())["status"] != "ok":  # noqa: ASYNC110
                await anyio.lowlevel.checkpoint()
        sup.request_stop()
    assert json.loads(path.read_text())["status"] == "stopped"


@pytest.mark.anyio
async def test_unwritable_status_file_is_logged_once_and_recovery_noted(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    registry = StatusRegistry(mode="simulated", clock=lambda: 0.0)
    sup = Supervisor([], [], registry, status_file=blocker / "status.json")
    with capture_logs() as logs:
        for _ in range(3):
            sup.write_status()
        blocker.unlink()
        sup.write_status()
    events = [(e["event"], e.get("failures")) for e in logs]
    assert events == [("status_write_failed", None), ("status_write_recovered", 3)]
    assert (blocker / "status.json").exists()


def test_errors_and_reasons_are_redacted_in_the_status_document() -> None:
    from config.logging import redact_text

    reg = StatusRegistry(mode="simulated", clock=lambda: 0.0, redact=redact_text)
    reg.add_actor("writer", critical=True)
    reg.set_state(
        "writer",
        ActorState.RESTARTING,
        error="OSError: connect postgresql://app:hunter2@db/x?token=SECRET123",
    )
    reg.set_degraded("writer", "spooling: Authorization: Bearer abcdefSECRET")
    text = json.dumps(render_status(reg, 0.0))
    for secret in ("hunter2", "SECRET123", "abcdefSECRET"):
        assert secret not in text
    assert "postgresql://app:[REDACTED]@db/x" in text
