"""greeks_latest deferred under load: batches committed without their latest upsert (ledger
marked), applied later in one statement, or rebuilt from history when an engine died first."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db import copy as dbcopy
from db.batch import Batch, days_of
from db.copy import connect, ensure_partitions, flush_latest, repair_latest, write_batch
from db.encode import BatchDataError, Dimensions, PendingLatest, Prepared
from db.migrate import migrate
from normalize.model import GreeksSnapshot

from .conftest import PgTarget
from .helpers import WriterHarness, count, fetch, snapshot
from .proxy import TcpProxy
from .test_outage import FAST_RECONNECT

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LATEST = """
SELECT i.instrument, l.seq, l.event_ts, l.received_ts, l.delta, l.iv, l.gamma, l.greeks_source, l.batch_id
FROM greeks_latest l
JOIN position_keys k ON k.position_id = l.position_id
JOIN instruments i ON i.instrument_id = k.instrument_id
"""
MARKED = "SELECT count(*) FROM ingest_batches WHERE latest_pending"


def _batches(base: float) -> list[list[GreeksSnapshot]]:
    """Five batches over 7 instruments, later rows newer; the last one holds only a stale row
    (an older event time) and a row whose times tie with the newest of an earlier batch."""
    batches = []
    for b in range(5):
        rows = [
            snapshot(b * 10 + j, ts=base + b + j * 0.01, received=base + b + 0.5, n_instruments=7)._replace(
                delta=round(0.1 * j + 0.01 * b, 4), greeks_source="broker" if j % 2 else "model"
            )
            for j in range(10)
        ]
        batches.append(rows)
    tie = batches[3][9]  # the newest row of its instrument so far
    batches[4] = [
        snapshot(3, ts=base - 100, received=base + 4.5, n_instruments=7),  # stale: changes nothing
        tie._replace(seq=999, delta=0.777),  # the same times as batch 3's row: a tie
    ]
    return batches


def _expected(batches: Sequence[Sequence[GreeksSnapshot]]) -> dict[str, tuple[int | None, float | None]]:
    newest: dict[str, GreeksSnapshot] = {}
    for rows in batches:
        for r in rows:
            cur = newest.get(r.instrument)
            if cur is None or (r.event_ts, r.received_ts) >= (cur.event_ts, cur.received_ts):
                newest[r.instrument] = r
    return {k: (r.seq, r.delta) for k, r in newest.items()}


async def _write_deferred(
    conn: Any, dims: Dimensions, batches: Sequence[Sequence[GreeksSnapshot]], copy_min_rows: int
) -> tuple[PendingLatest, list[uuid.UUID]]:
    pending = PendingLatest()
    ids = []
    for rows in batches:
        batch = Batch(uuid.uuid4(), rows)
        ids.append(batch.batch_id)
        p = Prepared(batch, dims, copy_min_rows, defer_latest=True).run(dims)
        assert await write_batch(conn, batch, dims=dims, prepared=p, copy_min_rows=copy_min_rows)
        pending.add(p, time.time())
    return pending, ids


@pytest.fixture(params=["one-trip", "transaction"])
def deferred_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How deferred batches whose positions are known go: in one round trip (the ledger row and
    the COPY in one Query), or as where asyncpg lacks the entry point for it (a transaction)."""
    if request.param == "transaction":
        monkeypatch.setattr(dbcopy, "_HAS_COPY_IN", False)
    return str(request.param)


@contextlib.asynccontextmanager
async def _database(dsn: str, rows: Sequence[GreeksSnapshot]) -> AsyncIterator[Any]:
    """A writer connection to the migrated database, with the partitions of ``rows``."""
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        await ensure_partitions(conn, days_of(rows))
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("copy_min_rows", [2000, 1], ids=["one-statement", "copy"])
async def test_flush_applies_what_the_per_batch_upserts_would_have(
    dsn: str, copy_min_rows: int, deferred_path: str
) -> None:
    # Arrange: the first batch upserts as usual, the other four defer.
    batches = _batches(time.time() - 60)
    async with _database(dsn, [r for rows in batches for r in rows]) as conn:
        dims = Dimensions()
        assert await write_batch(
            conn, Batch(uuid.uuid4(), batches[0]), dims=dims, copy_min_rows=copy_min_rows
        )
        before = {r["instrument"]: r["seq"] for r in await conn.fetch(LATEST)}
        pending, ids = await _write_deferred(conn, dims, batches[1:], copy_min_rows)

        # Assert: history complete, latest untouched, the four batches marked
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == sum(map(len, batches))
        assert {r["instrument"]: r["seq"] for r in await conn.fetch(LATEST)} == before
        assert await conn.fetchval(MARKED) == 4

        # Act
        assert await flush_latest(conn, pending) == 7
        latest = {r["instrument"]: r for r in await conn.fetch(LATEST)}
        assert await conn.fetchval(MARKED) == 0

    assert {k: (r["seq"], r["delta"]) for k, r in latest.items()} == _expected(batches)
    # each row names the batch it came from: the tie went to the later batch (seq 999, batch 5)
    tied = batches[4][-1].instrument
    assert (latest[tied]["seq"], latest[tied]["batch_id"]) == (999, ids[3])


async def test_a_flush_of_many_positions_applies_each_once(dsn: str) -> None:
    # 70 positions pending (nested parameters, padded): every one applied, the padding nowhere.
    base = time.time() - 60
    first = [snapshot(i, ts=base, n_instruments=70) for i in range(70)]
    second = [snapshot(i + 70, ts=base + 1, n_instruments=70) for i in range(70)]
    async with _database(dsn, first + second) as conn:
        dims = Dimensions()
        assert await write_batch(conn, Batch(uuid.uuid4(), first), dims=dims)
        pending, _ = await _write_deferred(conn, dims, [second], 2000)
        assert await flush_latest(conn, pending) == 70
        latest = {r["instrument"]: r["seq"] for r in await conn.fetch(LATEST)}
        assert await conn.fetchval("SELECT count(*) FROM greeks_latest") == 70
    assert latest == {r.instrument: r.seq for r in second}


async def test_repair_rebuilds_the_latest_rows_a_dead_engine_left_pending(dsn: str) -> None:
    batches = _batches(time.time() - 60)
    async with _database(dsn, [r for rows in batches for r in rows]) as conn:
        dims = Dimensions()
        assert await write_batch(conn, Batch(uuid.uuid4(), batches[0]), dims=dims)
        await _write_deferred(conn, dims, batches[1:], 2000)  # never flushed: the engine "died"
        assert await conn.fetchval(MARKED) == 4

    conn = await connect(dsn)
    try:
        marked, repaired = await repair_latest(conn)
        again = await repair_latest(conn)
        latest = {r["instrument"]: r for r in await conn.fetch(LATEST)}
        assert await conn.fetchval(MARKED) == 0
    finally:
        await conn.close()

    assert (marked, repaired) == (4, 7)
    assert again == (0, 0)
    # The Greeks come back as the digits sent (history keeps them as real), the source spelled out.
    assert {k: (r["seq"], r["delta"]) for k, r in latest.items()} == _expected(batches)
    assert {r["greeks_source"] for r in latest.values()} == {"broker", "model"}
    assert {(r["iv"], r["gamma"]) for r in latest.values()} == {(0.2, 0.01)}


async def test_under_load_the_writer_applies_latest_at_the_interval(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # Deferral forced (any arrival rate counts as load), 50 ms interval: every committed batch
    # leaves its latest rows pending; they are applied by a later batch's write or, once the
    # feed is idle, on their own. At the end every position's latest row is its newest.
    settings = replace(db_settings, latest_interval_ms=50)
    harness = WriterHarness(settings, dsn, kwargs={"latest_from_rows_s": 0.0, "pipeline": False})
    base = time.time()
    rows = [snapshot(i, ts=base + i * 1e-3, n_instruments=13) for i in range(400)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            for i in range(0, 400, 20):
                await harness.send.send(rows[i : i + 20])
                await harness.wait_for(lambda s, i=i: s.get("rows_total", 0) >= i + 20)
            # idle now: the pending rows go on their own within the interval
            status = await harness.wait_for(lambda s: s.get("latest_pending_positions") == 0)
            assert status["rows_total"] == 400
            assert status["latest_flushes"] >= 1
            assert await count(dsn, MARKED) == 0
            latest = {r["instrument"]: r["seq"] for r in await fetch(dsn, LATEST)}
            assert latest == {k: seq for k, (seq, _) in _expected([rows]).items()}
            harness.send.close()


async def test_below_the_rate_every_batch_upserts_latest(dsn: str, db_settings: DatabaseSettings) -> None:
    # default: deferral from 10,000 rows/s only
    harness = WriterHarness(db_settings, dsn, kwargs={"pipeline": False})
    rows = [snapshot(i, n_instruments=5) for i in range(30)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            for i in range(0, 30, 3):
                await harness.send.send(rows[i : i + 3])
                await harness.wait_for(lambda s, i=i: s.get("rows_total", 0) >= i + 3)
                seqs = {r["instrument"]: r["seq"] for r in await fetch(dsn, LATEST)}
                assert seqs == {k: seq for k, (seq, _) in _expected([rows[: i + 3]]).items()}
            harness.send.close()
    assert harness.status["latest_flushes"] == 0


async def test_a_writer_starting_repairs_what_a_dead_one_left(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    batches = _batches(time.time() - 60)
    async with _database(dsn, [r for rows in batches for r in rows]) as conn:
        await _write_deferred(conn, Dimensions(), batches, 2000)
    assert await count(dsn, "SELECT count(*) FROM greeks_latest") == 0

    harness = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            harness.send.close()

    assert [(e["batches"], e["rows"]) for e in harness.events("latest_repaired")] == [(5, 7)]
    assert harness.status["latest_repaired_rows"] == 7
    latest = {r["instrument"]: (r["seq"], r["delta"]) for r in await fetch(dsn, LATEST)}
    assert latest == _expected(batches)
    assert await count(dsn, MARKED) == 0


@pytest.mark.integration
async def test_latest_rows_pending_across_an_outage_are_repaired_at_reconnect(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    # Deferral forced, an interval longer than the test: the rows of the first phase are still
    # pending (only their ledger marks in the database) when the connection is cut. The reconnect
    # repairs them from history, the spooled batches upsert their own, and the last phase's are
    # applied by the shutdown drain.
    settings = replace(db_settings, latest_interval_ms=60_000)
    await migrate(dsn)
    rows = [snapshot(i, n_instruments=11) for i in range(300)]
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            kwargs = {**FAST_RECONNECT, "latest_from_rows_s": 0.0, "pipeline": False}
            harness = WriterHarness(settings, proxy.route(dsn), kwargs=kwargs)
            await tg.start(harness.run)
            async with harness.send:
                for i in range(0, 100, 10):
                    await harness.send.send(rows[i : i + 10])
                await harness.wait_for(lambda s: s["rows_total"] == 100)
                assert harness.status["latest_pending_positions"] == 11
                assert await count(dsn, "SELECT count(*) FROM greeks_latest") == 0
                marked = await count(dsn, MARKED)
                assert marked >= 1
                proxy.cut()
                for i in range(100, 200, 10):
                    await harness.send.send(rows[i : i + 10])
                await harness.wait_for(lambda s: s["state"] == "spooling")
                proxy.restore()
                await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == 200)
                for i in range(200, 300, 10):
                    await harness.send.send(rows[i : i + 10])
                await harness.wait_for(lambda s: s["rows_total"] == 300)
                assert harness.status["latest_pending_positions"] == 11
            await harness.finished.wait()  # the drain applies what is pending
            proxy.stop()

    assert [e["batches"] for e in harness.events("latest_repaired")] == [marked]
    assert harness.status["rows_total"] == 300
    latest = {r["instrument"]: r["seq"] for r in await fetch(dsn, LATEST)}
    assert latest == {k: seq for k, (seq, _) in _expected([rows]).items()}
    assert await count(dsn, MARKED) == 0


@pytest.mark.parametrize("copy_min_rows", [2000, 1], ids=["one-statement", "copy"])
@pytest.mark.parametrize("n_rows", [30, 70], ids=["flat", "nested"])  # nested: >= NEST_FROM rows
async def test_a_deferred_batch_stores_the_same_history(
    dsn: str, copy_min_rows: int, n_rows: int, deferred_path: str
) -> None:
    # The same rows (seq apart) written with the upsert and deferred: every history value equal,
    # times rounded as datetime.fromtimestamp rounds them (a half microsecond), NULLs and sources,
    # and the same ledger facts (the one-trip write sends them as SQL literals).
    ts = 1_710_000_000.0000005
    rows = [
        snapshot(i, ts=ts + i * 0.25, n_instruments=5)._replace(
            last=None if i % 3 else 1.07,
            rho=None if i % 2 else 0.01,
            greeks_source=(None, "broker", "model")[i % 3],
        )
        for i in range(n_rows)
    ]
    again = [r._replace(seq=(r.seq or 0) + 1000) for r in rows]
    async with _database(dsn, rows) as conn:
        dims = Dimensions()
        assert await write_batch(conn, Batch(uuid.uuid4(), rows), dims=dims, copy_min_rows=copy_min_rows)
        queries: list[str] = []

        def logged(record: Any) -> None:
            queries.append(record.query)

        conn.add_query_logger(logged)
        await _write_deferred(conn, dims, [again], copy_min_rows)
        conn.remove_query_logger(logged)
        stored = [dict(r) for r in await conn.fetch("SELECT * FROM greeks_history ORDER BY seq")]
        ledger = [
            dict(r)
            for r in await conn.fetch(
                "SELECT row_count, min_event_ts, max_event_ts, min_received_ts, max_received_ts,"
                " replayed, latest_pending FROM ingest_batches ORDER BY latest_pending"
            )
        ]
    # one trip: no statement but the COPY Query (which asyncpg's query loggers do not see)
    assert (queries == []) == (deferred_path == "one-trip")
    assert ledger[0]["latest_pending"] is False
    assert ledger[1] == {**ledger[0], "latest_pending": True}
    assert ledger[0]["min_event_ts"] == datetime.fromtimestamp(ts, UTC)
    assert len(stored) == 2 * n_rows
    for plain, deferred in zip(stored[:n_rows], stored[n_rows:], strict=True):
        assert deferred["seq"] == plain["seq"] + 1000
        assert {**deferred, "seq": plain["seq"]} == plain
    assert stored[0]["event_ts"] == datetime.fromtimestamp(ts, UTC)


async def _lock_latest(blocker: Any) -> Any:
    """A transaction of ``blocker`` holding greeks_latest in EXCLUSIVE mode (reads pass, upserts
    wait); roll it back to let them go."""
    lock = blocker.transaction()
    await lock.start()
    await blocker.execute("LOCK TABLE greeks_latest IN EXCLUSIVE MODE")
    return lock


async def _waiting_on_a_lock(dsn: str) -> int:
    """The pid of the backend of this database that waits on a lock (bounded by fail_after)."""
    sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    while (pid := await count(dsn, sql)) is None:  # noqa: ASYNC110 (the server's state: no event)
        await anyio.sleep(0.01)
    return int(pid)


def _flushing_every_write(
    dsn: str, db_settings: DatabaseSettings, n_rows: int, **kwargs: Any
) -> tuple[WriterHarness, list[GreeksSnapshot]]:
    """A writer deferring every batch's latest rows with a 1 ms interval (every write makes them
    due), and ``n_rows`` rows over 7 instruments, later rows newer."""
    settings = replace(db_settings, latest_interval_ms=1)
    harness = WriterHarness(settings, dsn, kwargs={"latest_from_rows_s": 0.0, "pipeline": False, **kwargs})
    base = time.time()
    return harness, [snapshot(i, ts=base + i * 1e-3, n_instruments=7) for i in range(n_rows)]


async def test_history_keeps_committing_while_a_latest_flush_waits(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # Deferral forced, a 1 ms interval: every write makes the pending latest rows due. A lock on
    # greeks_latest holds the flush, which runs on a connection of its own: the history batches
    # that follow still commit (on one connection they waited behind the flush). The waiting
    # flush's backend is then terminated: its rows go back and a later flush applies them with
    # the newer ones, so at the end every position's latest row is its newest and no ledger mark
    # is left.
    harness, rows = _flushing_every_write(dsn, db_settings, 100)
    await migrate(dsn)
    blocker = await connect(dsn)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(harness.run)
                await harness.send.send(rows[:10])
                await harness.wait_for(lambda s: s.get("rows_total", 0) == 10)
                lock = await _lock_latest(blocker)
                await harness.send.send(rows[10:20])
                flusher = await _waiting_on_a_lock(dsn)
                for i in range(20, 60, 10):
                    await harness.send.send(rows[i : i + 10])
                    await harness.wait_for(lambda s, i=i: s["rows_total"] == i + 10)
                assert harness.status["latest_pending_positions"] == 7
                assert await count(dsn, MARKED) >= 5
                assert await count(dsn, "SELECT pg_terminate_backend($1)", flusher)
                await harness.wait_for(lambda s: bool(harness.events("latest_flush_failed")))
                await lock.rollback()
                for i in range(60, 100, 10):
                    await harness.send.send(rows[i : i + 10])
                await harness.wait_for(lambda s: (s["rows_total"], s["latest_pending_positions"]) == (100, 0))
                harness.send.close()
    finally:
        await blocker.close()

    assert [e.get("beside") for e in harness.events("latest_flush_failed")] == [True]
    assert harness.status["latest_flushes"] >= 1
    latest = {r["instrument"]: r["seq"] for r in await fetch(dsn, LATEST)}
    assert latest == {k: seq for k, (seq, _) in _expected([rows]).items()}
    assert await count(dsn, MARKED) == 0


async def test_a_latest_flush_failing_again_and_again_sends_the_writer_through_a_repair(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # Every flush beside the writes is held by a lock and its backend terminated: the first
    # failures put the rows back, the third in a row sends the writer through a reconnect, whose
    # repair (from the ledger marks and history) applies them once the lock is gone. Nothing
    # piles up in memory meanwhile, and at the end every position's latest row is its newest.
    harness, rows = _flushing_every_write(dsn, db_settings, 40, **FAST_RECONNECT)
    await migrate(dsn)
    blocker = await connect(dsn)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(harness.run)
                lock = await _lock_latest(blocker)
                for i in range(0, 40, 10):
                    await harness.send.send(rows[i : i + 10])
                await harness.wait_for(lambda s: s["rows_total"] == 40)
                for failures in (1, 2, 3):
                    flusher = await _waiting_on_a_lock(dsn)
                    assert await count(dsn, "SELECT pg_terminate_backend($1)", flusher)
                    await harness.wait_for(
                        lambda s, n=failures: len(harness.events("latest_flush_failed")) == n
                    )
                await harness.wait_for(lambda s: s["state"] != "running")  # reconnecting
                await lock.rollback()
                await harness.wait_for(lambda s: s["state"] == "running" and s["latest_repaired_rows"] == 7)
                harness.send.close()
    finally:
        await blocker.close()

    assert [e["in_a_row"] for e in harness.events("latest_flush_failed")] == [1, 2, 3]
    assert harness.status["latest_flushes"] == 0
    assert harness.status["latest_pending_positions"] == 0
    latest = {r["instrument"]: r["seq"] for r in await fetch(dsn, LATEST)}
    assert latest == {k: seq for k, (seq, _) in _expected([rows]).items()}
    assert await count(dsn, MARKED) == 0


async def _positions_known(conn: Any, rows: Sequence[GreeksSnapshot]) -> Dimensions:
    """Write ``rows`` as usual (their positions created) and return the ids, so that a deferred
    batch of the same positions takes the one-trip write."""
    dims = Dimensions()
    assert await write_batch(conn, Batch(uuid.uuid4(), rows), dims=dims)
    return dims


async def test_a_deferred_batch_sent_twice_in_one_trip_is_written_once(dsn: str) -> None:
    # The second time the ledger row fails (the id is taken): nothing else is written, and the
    # COPY data sent behind the Query is dropped by the server, so the connection goes on.
    rows = [snapshot(i, ts=time.time() - 60 + i * 0.01, n_instruments=7) for i in range(20)]
    async with _database(dsn, rows) as conn:
        dims = await _positions_known(conn, rows[:7])
        batch = Batch(uuid.uuid4(), rows[7:])
        for fresh in (True, False, False):
            p = Prepared(batch, dims, 2000, defer_latest=True).run(dims, eager=True)
            assert await write_batch(conn, batch, dims=dims, prepared=p, copy_min_rows=2000) is fresh
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 20
        assert await conn.fetchval(MARKED) == 1
        _, ids = await _write_deferred(conn, dims, [rows[:3]], 2000)  # the connection goes on
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 23
        assert await conn.fetchval("SELECT count(*) FROM ingest_batches") == 3


async def test_a_one_trip_write_whose_copy_fails_leaves_no_ledger_row(dsn: str) -> None:
    # The ledger row and the COPY commit together: a row the COPY refuses (its day has no
    # partition) takes the ledger row with it, and the batch can be written once it can be.
    now = time.time() - 60
    rows = [snapshot(i, ts=now + i * 0.01, n_instruments=7) for i in range(14)]
    later = [r._replace(event_ts=now + 10 * 86400, seq=100 + i) for i, r in enumerate(rows[7:])]
    async with _database(dsn, rows) as conn:
        dims = await _positions_known(conn, rows[:7])
        batch = Batch(uuid.uuid4(), [*rows[7:], *later])
        p = Prepared(batch, dims, 2000, defer_latest=True).run(dims, eager=True)
        with pytest.raises(asyncpg.PostgresError) as caught:
            await write_batch(conn, batch, dims=dims, prepared=p, copy_min_rows=2000)
        assert dbcopy.is_data_error(caught.value)  # set aside by the writer, never retried
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 7
        assert await conn.fetchval("SELECT count(*) FROM ingest_batches") == 1
        await ensure_partitions(conn, days_of(later))
        assert await write_batch(conn, batch, dims=dims, prepared=p, copy_min_rows=2000)
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 21


async def test_a_value_no_column_holds_stops_a_one_trip_write_before_it_is_sent(dsn: str) -> None:
    rows = [snapshot(i, ts=time.time() - 60 + i * 0.01, n_instruments=7) for i in range(14)]
    bad = [*rows[7:13], rows[13]._replace(gamma=1e39)]  # beyond float4, where Greeks are stored
    async with _database(dsn, rows) as conn:
        dims = await _positions_known(conn, rows[:7])
        batch = Batch(uuid.uuid4(), bad)
        p = Prepared(batch, dims, 2000, defer_latest=True)
        with pytest.raises(BatchDataError):
            p.run(dims, eager=True)  # the writer's preparation refuses it
        with pytest.raises(BatchDataError):  # and so does the write, before sending anything
            await write_batch(conn, batch, dims=dims, prepared=p, copy_min_rows=2000)
        assert await conn.fetchval("SELECT count(*) FROM ingest_batches") == 1
        assert await conn.fetchval("SELECT count(*) FROM greeks_history") == 7
