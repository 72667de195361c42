"""Database outages: buffer, spool, reconnect, replay, exactly once."""

from __future__ import annotations

import uuid
from dataclasses import replace

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.batch import Batch, days_of
from db.copy import connect, ensure_partitions, write_batch
from db.migrate import migrate
from db.spool import Spool

from .conftest import PgTarget
from .helpers import WriterHarness, count, snapshot
from .proxy import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

FAST_RECONNECT = {"reconnect_initial_s": 0.02, "reconnect_max_s": 0.1, "connect_timeout_s": 2.0}


async def assert_exactly_once(dsn: str, n: int) -> None:
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == n
    assert await count(dsn, "SELECT count(DISTINCT seq) FROM greeks_history") == n
    assert await count(dsn, "SELECT min(seq) FROM greeks_history") == 0
    assert await count(dsn, "SELECT max(seq) FROM greeks_history") == n - 1
    assert await count(dsn, "SELECT sum(row_count) FROM ingest_batches") == n


def db_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


@pytest.mark.integration
async def test_connection_cut_mid_stream(pg: PgTarget, dsn: str, db_settings: DatabaseSettings) -> None:
    # Arrange: the writer talks to PostgreSQL through a proxy we can cut.
    settings = replace(db_settings, buffer_max_rows=50)  # small: the spool file gets used
    await migrate(dsn)
    n_before, n_during, n_after = 300, 400, 300
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            harness = WriterHarness(settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(harness.run)
            i = 0
            async with harness.send:
                for _ in range(n_before // 10):
                    await harness.send.send([snapshot(j) for j in range(i, i + 10)])
                    i += 10
                await harness.wait_for(lambda s: s["rows_total"] == n_before)

                # Act: cut, keep sending, restore.
                proxy.cut()
                for _ in range(n_during // 10):
                    await harness.send.send([snapshot(j) for j in range(i, i + 10)])
                    i += 10
                status = await harness.wait_for(lambda s: s["state"] == "spooling" and s["spool_rows"] > 0)
                assert status["db"] == "down"
                assert "writer" in harness.registry.degraded
                proxy.restore()
                for _ in range(n_after // 10):
                    await harness.send.send([snapshot(j) for j in range(i, i + 10)])
                    i += 10
                await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == i)
            proxy.stop()

    # Assert
    n = n_before + n_during + n_after
    await assert_exactly_once(dsn, n)
    assert harness.status["spool_rows"] == 0
    assert harness.status["buffer_rows"] == 0
    assert harness.status["dropped_rows"] == 0
    assert not list(settings.spool_dir.glob("spool-*.seg"))
    assert "writer" not in harness.registry.degraded
    assert harness.events("db_connection_lost")
    assert harness.events("spool_replayed")
    assert harness.events("db_recovered")


async def test_server_stopped_and_restarted(pg: PgTarget, dsn: str, db_settings: DatabaseSettings) -> None:
    if pg.server is None:
        pytest.skip("needs the embedded server (it is stopped and started again)")
    server = pg.server
    settings = replace(db_settings, buffer_max_rows=100)
    harness = WriterHarness(settings, dsn, kwargs=FAST_RECONNECT)
    i = 0
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                for _ in range(10):
                    await harness.send.send([snapshot(j) for j in range(i, i + 20)])
                    i += 20
                await harness.wait_for(lambda s: s["rows_total"] == i)

                await anyio.to_thread.run_sync(server.stop)
                for _ in range(20):
                    await harness.send.send([snapshot(j) for j in range(i, i + 20)])
                    i += 20
                await harness.wait_for(lambda s: s["spool_rows"] > 0)
                await anyio.to_thread.run_sync(server.start)
                await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == i)

    await assert_exactly_once(dsn, i)
    assert harness.status["spool_rows"] == 0


async def test_crash_between_copy_and_commit(dsn: str, db_settings: DatabaseSettings, pg: PgTarget) -> None:
    # The connection dies after COPY and the upsert, before COMMIT, on the 3rd batch.
    calls = 0

    async def kill_before_commit(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            admin = await asyncpg.connect(pg.admin_dsn)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            finally:
                await admin.close()

    harness = WriterHarness(db_settings, dsn, kwargs={**FAST_RECONNECT, "before_commit": kill_before_commit})
    n = 0
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                for _ in range(6):
                    await harness.send.send([snapshot(j) for j in range(n, n + 50)])
                    n += 50
                    await harness.wait_for(lambda s, n=n: s["rows_total"] == n)

    assert calls > 3  # the killed batch was written again after reconnecting
    await assert_exactly_once(dsn, n)
    assert harness.events("db_connection_lost")


async def test_replayed_batch_already_committed_is_skipped(dsn: str, db_settings: DatabaseSettings) -> None:
    # A commit whose acknowledgement was lost: the batch is in the database AND in the spool.
    await migrate(dsn)
    batches = [Batch(uuid.uuid4(), [snapshot(j) for j in range(k * 10, k * 10 + 10)]) for k in range(4)]
    conn = await connect(dsn)
    try:
        await ensure_partitions(conn, days_of(batches[0].rows))
        assert await write_batch(conn, batches[0]) is True
        assert await write_batch(conn, batches[1]) is True
        assert await write_batch(conn, batches[1]) is False  # same id: no effect
    finally:
        await conn.close()
    spool = Spool(db_settings.spool_dir, db_settings.spool_max_bytes).open()
    spool.append(batches)

    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            await harness.wait_for(lambda s: s["state"] == "running")
            harness.send.close()

    await assert_exactly_once(dsn, 40)
    assert harness.status["duplicate_batches"] == 2
    assert harness.status["replayed_rows"] == 20
    assert not list(db_settings.spool_dir.glob("spool-*.seg"))


async def test_start_with_database_down_then_recovery(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            proxy.cut()
            harness = WriterHarness(db_settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(harness.run)  # starts even though the database is unreachable
            assert harness.status["db"] == "down"
            assert harness.status["state"] == "spooling"
            assert "writer" in harness.registry.degraded
            async with harness.send:
                await harness.send.send([snapshot(j) for j in range(100)])
                await harness.wait_for(lambda s: s["buffer_rows"] == 100)
                proxy.restore()
                await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == 100)
            proxy.stop()

    await assert_exactly_once(dsn, 100)
    assert harness.events("db_unavailable_at_start")


async def test_spool_survives_a_restart(pg: PgTarget, dsn: str, db_settings: DatabaseSettings) -> None:
    # Run 1: the database is unreachable for the whole run; shutdown spools what is buffered.
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            proxy.cut()
            first = WriterHarness(db_settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(first.run)
            async with first.send:
                for k in range(10):
                    await first.send.send([snapshot(j) for j in range(k * 77, k * 77 + 77)])
            await first.finished.wait()
            proxy.stop()
    assert first.status["state"] == "stopped"
    assert first.status["spool_rows"] == 770
    # Everything is on disk once the drain is over (spilled during the run or by the drain).
    assert first.events("writer_drained")[0]["spool_rows"] == 770

    # Run 2: the database is back; the spool is replayed before live rows.
    second = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(second.run)
            async with second.send:
                await second.send.send([snapshot(j) for j in range(770, 800)])
                await second.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == 800)

    await assert_exactly_once(dsn, 800)
    assert second.status["spool_rows"] == 0


async def test_cancellation_spools_what_it_cannot_commit(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            proxy.cut()
            harness = WriterHarness(db_settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(harness.run)
            await harness.send.send([snapshot(j) for j in range(25)])
            await harness.wait_for(lambda s: s["buffer_rows"] == 25)
            tg.cancel_scope.cancel()  # no orderly drain: the supervisor cancelled the writer

    spool = Spool(db_settings.spool_dir, db_settings.spool_max_bytes).open()
    assert spool.rows == 25


async def test_full_spool_drops_the_oldest_loudly(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    settings = replace(db_settings, buffer_max_rows=10, spool_max_bytes=1)  # every spill overflows
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            proxy.cut()
            harness = WriterHarness(settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(harness.run)
            async with harness.send:
                for k in range(5):
                    await harness.send.send([snapshot(j) for j in range(k * 20, k * 20 + 20)])
                await harness.wait_for(lambda s: s["dropped_rows"] > 0)
            await harness.finished.wait()
            proxy.stop()

    assert harness.events("spool_full_dropped_oldest")
    assert harness.events("spool_full_dropped_oldest")[0]["log_level"] == "error"
    # What survives is the newest data.
    assert harness.status["dropped_rows"] + harness.status["spool_rows"] == 100
