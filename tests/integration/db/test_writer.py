"""The writer actor against a real PostgreSQL: rows in, exactly those rows committed."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.migrate import migrate
from supervisor.errors import FatalError

from .helpers import LATEST_SEQ_BY_INSTRUMENT, WriterHarness, count, fetch, snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def test_n_rows_in_exactly_n_rows_committed(dsn: str, db_settings: DatabaseSettings) -> None:
    # Arrange
    n = 5000
    base = time.time()
    rows = [snapshot(i, ts=base + i * 1e-4, received=time.time()) for i in range(n)]
    harness = WriterHarness(db_settings, dsn)

    # Act: items of varying size, then the upstream closes (the supervisor's shutdown drain).
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                i = 0
                size = 1
                while i < n:
                    await harness.send.send(rows[i : i + size])
                    i += size
                    size = size % 97 + 1
        # run() returned by itself once the channel ended

    # Assert
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == n
    assert await count(dsn, "SELECT count(DISTINCT seq) FROM greeks_history") == n
    assert await count(dsn, "SELECT sum(row_count) FROM ingest_batches") == n
    latest = await fetch(dsn, LATEST_SEQ_BY_INSTRUMENT)
    expected: dict[str, int] = {}
    for r in rows:
        expected[r.instrument] = r.seq or 0  # later rows have later event times
    assert {r["instrument"]: r["seq"] for r in latest} == expected
    status = harness.status
    assert status["state"] == "stopped"
    assert status["rows_total"] == n
    assert 0 < status["batches_total"] <= n
    assert status["latency_ms"]["count"] == n
    assert 0 < status["latency_ms"]["p50"] <= status["latency_ms"]["p99"] <= status["latency_ms"]["max"]
    assert status["latency_ms"]["window"]["count"] == n
    assert status["spool_rows"] == 0
    assert status["dropped_rows"] == 0
    assert harness.registry.actors["writer"].events_total == n


async def test_event_latency_counts_from_the_broker_event_time(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # Rows the broker stamped 2 s before they were received (a slow wire, or a skewed clock):
    # receive-to-commit stays small, event-to-commit carries the 2 s.
    now = time.time()
    rows = [snapshot(i, ts=now - 2.0, received=now) for i in range(200)]
    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send(rows)
    status = harness.status
    assert status["latency_ms"]["count"] == status["event_latency_ms"]["count"] == 200
    assert status["latency_ms"]["max"] < 2000
    assert 2000 <= status["event_latency_ms"]["p50"] <= status["event_latency_ms"]["max"]
    assert status["event_latency_ms"]["max"] - status["latency_ms"]["max"] == pytest.approx(2000, abs=5)


async def test_batches_grow_under_load_and_respect_the_cap(dsn: str, db_settings: DatabaseSettings) -> None:
    settings = replace(db_settings, batch_max_rows=100, batch_max_delay_ms=10_000)
    harness = WriterHarness(settings, dsn, capacity=1000)
    # 600 single-row items queued before the writer starts: it must batch them.
    for i in range(600):
        harness.send.send_nowait([snapshot(i)])
    harness.send.close()

    with anyio.fail_after(30):
        await harness.run()

    sizes = [r["row_count"] for r in await fetch(dsn, "SELECT row_count FROM ingest_batches")]
    assert sum(sizes) == 600
    assert max(sizes) == 100  # the cap
    assert len(sizes) == 6


async def test_idle_batches_are_single_ticks(dsn: str, db_settings: DatabaseSettings) -> None:
    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                for i in range(5):
                    await harness.send.send([snapshot(i)])
                    await harness.wait_for(lambda s, i=i: s.get("rows_total", 0) == i + 1)

    sizes = [r["row_count"] for r in await fetch(dsn, "SELECT row_count FROM ingest_batches")]
    assert sizes == [1] * 5


async def test_under_load_a_batch_lingers_to_carry_more_rows(dsn: str, db_settings: DatabaseSettings) -> None:
    # Lingering forced (any arrival rate counts as load): the first row's batch waits 300 ms,
    # long enough for the 50 single-row items sent one at a time after it to join it. Without
    # the linger each item is committed on its own or with a few others (see the idle test).
    settings = replace(db_settings, batch_linger_ms=300, batch_max_delay_ms=10_000)
    harness = WriterHarness(settings, dsn, kwargs={"linger_from_rows_s": 0.0})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                for i in range(51):
                    await harness.send.send([snapshot(i)])
                    await anyio.lowlevel.checkpoint()  # let the writer run between items
                await harness.wait_for(lambda s: s.get("rows_total", 0) == 51)

    sizes = [r["row_count"] for r in await fetch(dsn, "SELECT row_count FROM ingest_batches")]
    assert sizes == [51]


async def test_newer_schema_stops_the_engine(dsn: str, db_settings: DatabaseSettings) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
    finally:
        await conn.close()
    harness = WriterHarness(db_settings, dsn)

    with anyio.fail_after(30), pytest.raises(FatalError, match="newer engine"):
        await harness.run()


async def test_bad_credentials_are_fatal(pg_dsn_bad_db: str, db_settings: DatabaseSettings) -> None:
    harness = WriterHarness(db_settings, pg_dsn_bad_db)

    with anyio.fail_after(30), pytest.raises(FatalError, match="cannot use the database"):
        await harness.run()


@pytest.fixture
def pg_dsn_bad_db(dsn: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/no_such_database_here"


async def test_rejected_batch_is_kept_aside(dsn: str, db_settings: DatabaseSettings, tmp_path: Path) -> None:
    # A value PostgreSQL refuses (a NUL byte in text) must not stall or kill the writer.
    bad = snapshot(1)._replace(account="U\x00bad")
    harness = WriterHarness(db_settings, dsn)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([bad])
                await harness.send.send([snapshot(2)])

    assert harness.status["rejected_rows"] == 1
    assert harness.status["rows_total"] == 1
    assert harness.events("batch_rejected")
    assert list((db_settings.spool_dir / "rejected").glob("spool-*.seg"))


async def test_ints_beyond_the_float_range_are_set_aside(dsn: str, db_settings: DatabaseSettings) -> None:
    """A quantity no float8 holds sets its row aside (kept in rejected/), such a Greek is cleared:
    the writer keeps going (it crashed on both before)."""
    huge_quantity = snapshot(1)._replace(quantity=10**400)
    huge_delta = snapshot(2)._replace(delta=-(10**400))
    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([huge_quantity, huge_delta, snapshot(3)])

    assert harness.status["nonfinite_values"] == 1
    assert harness.status["rejected_rows"] == 1
    assert harness.status["rows_total"] == 2
    assert list((db_settings.spool_dir / "rejected").glob("spool-*.seg"))
    stored = await fetch(dsn, "SELECT seq, delta FROM greeks_history_wide ORDER BY seq")
    assert [(r["seq"], r["delta"]) for r in stored] == [(2, None), (3, snapshot(3).delta)]


async def test_nan_values_are_stored_as_no_value_and_counted(dsn: str, db_settings: DatabaseSettings) -> None:
    """A NaN Greek is stored as NULL (never a NaN that poisons portfolio sums); a NaN time is set aside."""
    import math

    nan_delta = snapshot(1)._replace(delta=math.nan, pos_delta=math.inf)
    nan_time = snapshot(2)._replace(event_ts=math.nan)
    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([nan_delta, nan_time, snapshot(3)])

    assert harness.status["nonfinite_values"] == 1  # pos_delta is not stored (derived by the views)
    assert harness.status["rejected_rows"] == 1
    assert harness.status["rows_total"] == 2
    assert harness.events("nonfinite_values_cleared")
    stored = await fetch(dsn, "SELECT seq, delta, pos_delta FROM greeks_history_wide ORDER BY seq")
    assert [(r["seq"], r["delta"], r["pos_delta"]) for r in stored] == [
        (1, None, None),
        (3, snapshot(3).delta, snapshot(3).pos_delta),
    ]
    nan_count = await fetch(
        dsn, "SELECT count(*) AS n FROM greeks_current WHERE delta = 'NaN' OR pos_delta = 'NaN'"
    )
    assert nan_count[0]["n"] == 0


async def test_items_arriving_during_a_write_join_the_next_batch(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # The first write is held inside its transaction. Item 2 is received meanwhile, then items 3
    # and 4 arrive: below the linger's rate the writer waits for the write in flight before
    # taking its batch, so 2, 3 and 4 go in one commit (taken at once, 2 would go alone).
    release = anyio.Event()

    async def hold(conn: asyncpg.Connection) -> None:
        await release.wait()

    harness = WriterHarness(db_settings, dsn, kwargs={"before_commit": hold})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([snapshot(1)])
                await anyio.wait_all_tasks_blocked()  # the first write is held
                await harness.send.send([snapshot(2)])
                await anyio.wait_all_tasks_blocked()  # item 2 received, the writer waits
                await harness.send.send([snapshot(3)])
                await harness.send.send([snapshot(4)])
                await anyio.wait_all_tasks_blocked()
                release.set()
                await harness.wait_for(lambda s: s.get("rows_total", 0) == 4)

    sizes = [
        r["row_count"] for r in await fetch(dsn, "SELECT row_count FROM ingest_batches ORDER BY committed_at")
    ]
    assert sizes == [1, 3]
