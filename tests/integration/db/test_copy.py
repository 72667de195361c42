"""db.copy.write_batch: history rows, latest upsert and batch id committed once, by the
one-statement path (small batches) and the COPY path (large ones)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from db.batch import Batch, days_of
from db.copy import COPY_MIN_ROWS, connect, ensure_partitions, write_batch
from db.migrate import migrate

from .helpers import LATEST_SEQ_BY_INSTRUMENT, snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

TS = 1_710_000_000.0000005  # a half microsecond: rounding must match datetime.fromtimestamp


PATHS = pytest.mark.parametrize("copy_min_rows", [COPY_MIN_ROWS, 1], ids=["one-statement", "copy"])


async def test_a_writer_connection_commits_durably_and_flushes_its_writes_as_it_goes(dsn: str) -> None:
    # On whatever server DATABASE_URL names (the embedded one or TEST_DATABASE_URL's): the
    # settings are the session's own, so they hold whatever the server's configuration says.
    conn = await connect(dsn)
    try:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW backend_flush_after") == "256kB"
        # set by the connection itself, not inherited from the server's configuration (the
        # embedded server sets it too): so it holds on a server of the user's as well
        source = "SELECT source FROM pg_settings WHERE name = $1"
        assert await conn.fetchval(source, "backend_flush_after") == "client"
        assert await conn.fetchval(source, "synchronous_commit") == "client"
        assert await conn.fetchval("SHOW application_name") == "greeks-writer"
    finally:
        await conn.close()


@PATHS
@pytest.mark.parametrize("n_rows", [30, 70], ids=["flat", "nested"])  # nested: >= NEST_FROM rows
async def test_batch_written_once_with_latest_and_exact_times(
    dsn: str, copy_min_rows: int, n_rows: int
) -> None:
    await migrate(dsn)
    # Instrument i % 5; within a position the newest event wins, a tie goes to the later row.
    rows = [snapshot(i, ts=TS + (i % 3) * 0.25, n_instruments=5) for i in range(n_rows)]
    batch = Batch(uuid.uuid4(), rows)
    conn = await connect(dsn)
    try:
        await ensure_partitions(conn, days_of(rows))
        assert await write_batch(conn, batch, copy_min_rows=copy_min_rows) is True
        assert (
            await write_batch(conn, batch, copy_min_rows=copy_min_rows) is False
        )  # same id: nothing written
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == n_rows
        facts = await conn.fetchrow("SELECT * FROM ingest_batches")
        assert facts["row_count"] == n_rows
        assert facts["min_event_ts"] == datetime.fromtimestamp(TS, UTC)
        assert facts["max_event_ts"] == datetime.fromtimestamp(TS + 0.5, UTC)
        stored = await conn.fetch("SELECT seq, event_ts, received_ts FROM greeks_history ORDER BY seq")
        for rec, row in zip(stored, rows, strict=True):
            assert rec["event_ts"] == datetime.fromtimestamp(row.event_ts, UTC)
            assert rec["received_ts"] == datetime.fromtimestamp(row.received_ts, UTC)
        latest = dict(await conn.fetch(LATEST_SEQ_BY_INSTRUMENT))
        expected: dict[str, int] = {}
        for row in rows:
            best = expected.get(row.instrument)
            if best is None or row.event_ts >= rows[best].event_ts:
                expected[row.instrument] = row.seq or 0
        assert latest == expected
    finally:
        await conn.close()


async def test_latest_never_goes_back_in_time(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        newer = [snapshot(1, ts=TS + 10, n_instruments=1)]
        older = [snapshot(2, ts=TS, n_instruments=1)]
        await ensure_partitions(conn, days_of(newer))
        assert await write_batch(conn, Batch(uuid.uuid4(), newer))
        assert await write_batch(conn, Batch(uuid.uuid4(), older))
        assert await conn.fetchval("SELECT seq FROM greeks_latest") == 1
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 2
    finally:
        await conn.close()


async def test_plain_asyncpg_connection_is_prepared_on_first_use(dsn: str) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        rows = [snapshot(i, ts=TS) for i in range(3)]
        await ensure_partitions(conn, days_of(rows))
        assert await write_batch(conn, Batch(uuid.uuid4(), rows))
        stored = await conn.fetchval("SELECT max(event_ts) FROM greeks_history")
        assert stored == datetime.fromtimestamp(TS, UTC)
    finally:
        await conn.close()


async def test_before_commit_runs_inside_the_transaction(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    seen: list[int] = []

    async def hook(c: asyncpg.Connection) -> None:
        assert c.is_in_transaction()
        seen.append(await c.fetchval("SELECT count(*) FROM greeks_history"))
        raise RuntimeError("crash before commit")

    try:
        rows = [snapshot(i, ts=TS) for i in range(4)]
        await ensure_partitions(conn, days_of(rows))
        with pytest.raises(RuntimeError):
            await write_batch(conn, Batch(uuid.uuid4(), rows), before_commit=hook)
        assert seen == [4]
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 0
        assert await conn.fetchval("SELECT count(*) FROM ingest_batches") == 0
    finally:
        await conn.close()
