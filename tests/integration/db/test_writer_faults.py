"""The writer never loses a batch: unclassified errors, crashes and cancellation mid-write, a
database that dies during the shutdown drain, and bad connection settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.spool import Spool
from supervisor.errors import FatalError

from .conftest import PgTarget
from .helpers import WriterHarness, count, snapshot
from .proxy import TcpProxy
from .test_outage import FAST_RECONNECT, assert_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def spooled_rows(settings: DatabaseSettings) -> int:
    return Spool(settings.spool_dir, settings.spool_max_bytes).open().rows


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),  # 57014
        asyncpg.SerializationError("could not serialize access"),  # 40001
        asyncpg.DeadlockDetectedError("deadlock detected"),  # 40P01
    ],
    ids=["57014", "40001", "40P01"],
)
async def test_unclassified_postgres_error_retries_the_batch(
    dsn: str, db_settings: DatabaseSettings, error: asyncpg.PostgresError
) -> None:
    # Arrange: the 2nd batch's transaction fails once, inside the transaction, before COMMIT.
    calls = 0

    async def fail_once(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error

    harness = WriterHarness(db_settings, dsn, kwargs={**FAST_RECONNECT, "before_commit": fail_once})

    # Act
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                for k in range(3):
                    await harness.send.send([snapshot(j) for j in range(k * 10, k * 10 + 10)])
                    await harness.wait_for(lambda s, k=k: s["rows_total"] == (k + 1) * 10)

    # Assert: committed once, by a replay, and the writer did not crash.
    assert harness.error is None
    await assert_exactly_once(dsn, 30)
    assert harness.status["replayed_rows"] >= 10  # later batches may queue behind it
    assert harness.events("db_write_failed")[0]["sqlstate"] == error.sqlstate


async def test_crash_mid_write_spools_the_batch_for_the_next_attempt(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # Arrange: a bug (not a database error) in the 2nd batch's transaction.
    calls = 0

    async def crash_once(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")

    first = WriterHarness(db_settings, dsn, kwargs={"before_commit": crash_once})

    async def first_attempt(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await first.run(task_status=task_status)

    # Act: the writer crashes (the supervisor would restart it) ...
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(first_attempt)
            await first.send.send([snapshot(j) for j in range(10)])
            await first.wait_for(lambda s: s["rows_total"] == 10)
            await first.send.send([snapshot(j) for j in range(10, 20)])
            await first.finished.wait()

    # ... having spooled the batch; the next attempt replays it.
    assert spooled_rows(db_settings) == 10
    second = WriterHarness(db_settings, dsn, kwargs={"before_commit": crash_once})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(second.run)
            await second.wait_for(lambda s: s["state"] == "running")
            second.send.close()

    await assert_exactly_once(dsn, 20)
    assert spooled_rows(db_settings) == 0


async def test_cancelled_mid_write_keeps_the_batch(dsn: str, db_settings: DatabaseSettings) -> None:
    # Arrange: the 1st batch's transaction blocks before COMMIT until the writer is cancelled.
    in_commit = anyio.Event()

    async def block(conn: asyncpg.Connection) -> None:
        in_commit.set()
        await anyio.sleep_forever()

    harness = WriterHarness(db_settings, dsn, kwargs={"before_commit": block})

    # Act: no orderly drain, the supervisor cancels the writer mid-write.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            await harness.send.send([snapshot(j) for j in range(10)])
            await in_commit.wait()
            tg.cancel_scope.cancel()

    # Assert: not committed, so spooled for the next run.
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == 0
    assert spooled_rows(db_settings) == 10


async def test_database_dying_on_the_last_batch_before_shutdown(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    # Arrange: the database goes away while the last batch is written, and the channel is
    # already closed (host shutdown: PostgreSQL and the engine stop together).
    calls = 0
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            harness = WriterHarness(
                db_settings, proxy.route(dsn), kwargs={**FAST_RECONNECT, "shutdown_budget_s": 2.0}
            )

            async def die_on_second(conn: asyncpg.Connection) -> None:
                nonlocal calls
                calls += 1
                if calls == 2:
                    proxy.cut()
                    raise asyncpg.ConnectionDoesNotExistError(
                        "connection was closed in the middle of operation"
                    )

            harness.kwargs["before_commit"] = die_on_second
            await tg.start(harness.run)
            await harness.send.send([snapshot(j) for j in range(10)])
            await harness.wait_for(lambda s: s["rows_total"] == 10)
            # The last batch and the end of the channel together: the writer sees both in
            # one pass, and drains right after the failed write, before recovery ever ran.
            harness.send.send_nowait([snapshot(j) for j in range(10, 20)])
            harness.send.close()

            # Act: the writer drains while its recovery cannot reconnect.
            await harness.finished.wait()
            proxy.stop()

    # Assert: the last batch is spooled, not lost.
    assert harness.error is None
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == 10
    assert spooled_rows(db_settings) == 10
    assert harness.events("writer_drained")[0]["spooled_rows"] == 10


def _with_password(dsn: str, password: str) -> str:
    return dsn.replace("://postgres@", f"://postgres:{password}@", 1)


@pytest.mark.parametrize(
    "options",
    [
        "sslmode=verify-full&sslrootcert=/no/such/root.pem",
        "sslmode=verify-full&sslrootcert={tmp}",  # a directory
        "sslmode=bogus",
        "target_session_attrs=nope",
    ],
    ids=["missing-root-cert", "root-cert-is-a-directory", "bad-sslmode", "bad-session-attrs"],
)
async def test_bad_connection_settings_are_fatal(
    dsn: str, db_settings: DatabaseSettings, tmp_path: Path, options: str
) -> None:
    url = _with_password(dsn, "s3cret-pw") + "?" + options.format(tmp=tmp_path)
    harness = WriterHarness(replace(db_settings, spool_dir=tmp_path / "spool"), url, kwargs=FAST_RECONNECT)

    with anyio.fail_after(10), pytest.raises(FatalError, match="cannot use the database") as info:
        await harness.run()

    assert "s3cret-pw" not in str(info.value)
    assert not harness.events("db_unavailable_at_start")
