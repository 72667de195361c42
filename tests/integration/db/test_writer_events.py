"""The writer's RowsBatch items: positions snapshots and stream sessions committed in the same
exactly-once batch as the rows, replays that never go back in time, first-seen positions created
in the batch's own transaction, values no column can hold, and old spools replayed."""

from __future__ import annotations

import math
import os
import socket
import struct
import uuid
import zlib
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

from config.settings import DatabaseSettings
from db.batch import Batch, days_of
from db.copy import APPLY_POSITIONS, COPY_MIN_ROWS, connect, ensure_partitions, write_batch
from db.encode import Dimensions, Prepared, positions_params
from db.migrate import migrate
from db.spool import Spool
from normalize.events import PositionsSnapshot, RowsBatch, SessionEnded, SessionStarted
from normalize.model import SNAPSHOT_FIELDS, AssetClass, Right, UnifiedPosition

from .conftest import PgTarget
from .helpers import WriterHarness, count, fetch, snapshot
from .proxy import TcpProxy
from .test_outage import FAST_RECONNECT, assert_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

ACCOUNT = "U1234567"
ORPHAN_ROWS = (
    "SELECT count(*) FROM greeks_history h WHERE NOT EXISTS "
    "(SELECT 1 FROM position_keys k WHERE k.position_id = h.position_id)"
)


def held(i: int, quantity: float | None = None) -> UnifiedPosition:
    """The position of snapshot(i)'s instrument (n_instruments=20)."""
    r = snapshot(i)
    return UnifiedPosition(
        r.broker, r.account, r.instrument, r.underlying, AssetClass(r.asset_class), Right(r.right),
        r.strike, r.expiry, r.multiplier, r.quantity if quantity is None else quantity, 2.5,
    )  # fmt: skip


def positions(as_of: float, *indexes: int) -> PositionsSnapshot:
    return PositionsSnapshot("ibkr", (ACCOUNT,), tuple(held(i) for i in indexes), as_of)


async def current_instruments(dsn: str) -> set[str]:
    return {r["instrument"] for r in await fetch(dsn, "SELECT instrument FROM greeks_current")}


async def test_positions_and_sessions_travel_with_the_rows(dsn: str, db_settings: DatabaseSettings) -> None:
    # Arrange
    rows = [snapshot(i) for i in range(6)]  # instruments 0..5 of one ibkr account
    start = SessionStarted("ibkr", "s-1", (ACCOUNT, "U7654321"), "gateway:5000", "simulated", 1_700_000_000.0)
    left_open = SessionStarted("tastytrade", "s-2", (), "dxlink:443", "simulated", 1_700_000_001.0)
    end = SessionEnded("ibkr", "s-1", 1_700_000_100.0, "closed 1001", 6)
    harness = WriterHarness(db_settings, dsn)

    # Act: rows with a snapshot holding 0..3 and two sessions starting; then a newer snapshot
    # holding 1 and 3 only (0 and 2 closed) and one session's end; then a stale snapshot (a
    # replay of an older state), which must change nothing.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                items = [
                    RowsBatch(rows, (positions(100.0, 0, 1, 2, 3),), (start, left_open)),
                    RowsBatch([], (positions(200.0, 1, 3),), (end,)),
                    RowsBatch([], (positions(150.0, 0, 1, 2, 3),), ()),
                ]
                for k, item in enumerate(items, 1):  # one batch each (queued items would merge)
                    await harness.send.send(item)
                    await harness.wait_for(lambda s, k=k: s["batches_total"] == k)

    # Assert: positions are the newest snapshot's; greeks_current holds only them.
    stored = await fetch(
        dsn, "SELECT instrument, quantity, avg_cost, as_of FROM positions ORDER BY instrument"
    )
    assert [r["instrument"] for r in stored] == [held(1).instrument, held(3).instrument]
    assert {r["as_of"] for r in stored} == {datetime.fromtimestamp(200.0, UTC)}
    assert await count(dsn, "SELECT as_of FROM position_accounts") == datetime.fromtimestamp(200.0, UTC)
    assert await current_instruments(dsn) == {held(1).instrument, held(3).instrument}
    total = await fetch(dsn, "SELECT positions FROM portfolio_greeks_total")
    assert total[0]["positions"] == 2
    # One stream_sessions row per session id; the one left open closed by the drain.
    sessions = {r["session_key"]: dict(r) for r in await fetch(dsn, "SELECT * FROM stream_sessions")}
    assert set(sessions) == {"s-1", "s-2"}
    s1 = sessions["s-1"]
    assert (s1["broker"], s1["account"], s1["host"], s1["mode"]) == (
        "ibkr",
        "U1234567,U7654321",
        "gateway:5000",
        "simulated",
    )
    assert (s1["pid"], s1["engine_host"]) == (os.getpid(), socket.gethostname())
    assert s1["started_at"] == datetime.fromtimestamp(start.started_at, UTC)
    assert s1["ended_at"] == datetime.fromtimestamp(end.ended_at, UTC)
    assert (s1["end_reason"], s1["events"]) == ("closed 1001", 6)
    assert sessions["s-2"]["end_reason"] == "engine_stopped"
    assert sessions["s-2"]["account"] is None
    assert sessions["s-2"]["ended_at"] is not None


async def test_replays_never_let_an_older_snapshot_or_a_second_close_win(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    dims = Dimensions()
    try:
        newer = Batch(
            uuid.uuid4(), [], (positions(200.0, 1),), (SessionEnded("ibkr", "s", 50.0, "stale", 3),)
        )
        older = Batch(
            uuid.uuid4(),
            [],
            (positions(100.0, 0, 1),),
            (
                SessionStarted("ibkr", "s", (ACCOUNT,), "h", "live", 10.0),
                SessionEnded("ibkr", "s", 40.0, "x", 9),
            ),
        )
        assert await write_batch(conn, newer, dims=dims)
        assert await write_batch(conn, older, dims=dims)  # committed after, but older
        assert not await write_batch(conn, newer, dims=dims)  # a replay: skipped whole

        assert [r["instrument"] for r in await conn.fetch("SELECT instrument FROM positions")] == [
            held(1).instrument
        ]
        session = await conn.fetchrow("SELECT * FROM stream_sessions WHERE session_key = 's'")
        assert session["end_reason"] == "stale"  # the first close wins
        assert session["started_at"] == datetime.fromtimestamp(10.0, UTC)  # the start filled in later
        assert session["account"] == ACCOUNT
        assert await conn.fetchval("SELECT count(*) FROM stream_sessions") == 1
    finally:
        await conn.close()


async def test_an_account_snapshot_with_no_positions_closes_them_all(dsn: str) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        rows = [snapshot(i) for i in range(4)]
        await ensure_partitions(conn, days_of(rows))
        await write_batch(conn, Batch(uuid.uuid4(), rows, (positions(1.0, 0, 1),)))
        assert await current_instruments(dsn) == {held(0).instrument, held(1).instrument}
        await write_batch(conn, Batch(uuid.uuid4(), [], (PositionsSnapshot("ibkr", (ACCOUNT,), (), 2.0),)))
        assert await current_instruments(dsn) == set()
        assert await conn.fetchval("SELECT count(*) FROM positions") == 0
    finally:
        await conn.close()


def many_held(count: int, quantity: float = 1.0) -> tuple[UnifiedPosition, ...]:
    """``count`` distinct option positions of one ibkr account."""
    return tuple(
        UnifiedPosition(
            "ibkr",
            ACCOUNT,
            f"SPY   270115C{i:08d}",
            "SPY",
            AssetClass.OPTION,
            Right.CALL,
            float(i),
            date(2027, 1, 15),
            100.0,
            quantity,
            2.5,
        )
        for i in range(1, count + 1)
    )


async def test_a_positions_refresh_finds_the_closed_ones_by_a_hash_not_a_scan_per_position(dsn: str) -> None:
    # Arrange: 400 positions stored, then a newer snapshot of the same account listing all of
    # them but the first (one closed) and the quantities changed.
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        dims = Dimensions()  # the writer's cache: the ids the first snapshot created
        first = PositionsSnapshot("ibkr", (ACCOUNT,), many_held(400), 1.0)
        await write_batch(conn, Batch(uuid.uuid4(), [], (first,)), dims=dims)
        refreshed = PositionsSnapshot("ibkr", (ACCOUNT,), many_held(400, 2.0)[1:], 2.0)
        newer = Batch(uuid.uuid4(), [], (refreshed,))
        prepared = Prepared(newer, dims, COPY_MIN_ROWS).run(dims)
        params = positions_params(prepared.accounts, dims.positions)

        # Act: the plan of the statement that applies it, then the statement itself.
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + APPLY_POSITIONS, *params))
        await write_batch(conn, newer, dims=dims)

        # Assert: the held ids are hashed once (a nested-loop anti join scans every held position
        # for every stored one: 36 ms for 500 positions, 3 s for 5,000); the refresh applied.
        assert "hashed SubPlan" in plan, plan
        assert "Nested Loop Anti Join" not in plan, plan
        stored = await conn.fetch("SELECT instrument, quantity, as_of FROM positions")
        assert len(stored) == 399
        assert many_held(1)[0].instrument not in {r["instrument"] for r in stored}
        assert {r["quantity"] for r in stored} == {2.0}
        assert {r["as_of"] for r in stored} == {datetime.fromtimestamp(2.0, UTC)}
    finally:
        await conn.close()


@pytest.mark.parametrize("copy_min_rows", [COPY_MIN_ROWS, 1], ids=["one-statement", "copy"])
async def test_first_seen_positions_and_a_replayed_batch_in_one_transaction(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings, copy_min_rows: int
) -> None:
    # Arrange: the connection dies inside the transaction that creates the dimension rows of
    # first-seen positions (the 2nd batch brings instruments 20..29), before COMMIT.
    calls = 0

    async def kill_second(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            admin = await asyncpg.connect(pg.admin_dsn)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            finally:
                await admin.close()

    harness = WriterHarness(
        db_settings,
        dsn,
        kwargs={**FAST_RECONNECT, "before_commit": kill_second, "copy_min_rows": copy_min_rows},
    )

    # Act
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([snapshot(j, n_instruments=20) for j in range(20)])
                await harness.wait_for(lambda s: s["rows_total"] == 20)
                await harness.send.send([snapshot(j, n_instruments=30) for j in range(20, 30)])
                await harness.wait_for(lambda s: s["rows_total"] == 30)
                await harness.send.send([snapshot(j, n_instruments=30) for j in range(30, 60)])
                await harness.wait_for(lambda s: s["rows_total"] == 60)

    # Assert: replayed once; the ids of the rolled-back transaction were not kept (no row points
    # at a position that does not exist); one dimension row per instrument.
    assert calls > 2
    await assert_exactly_once(dsn, 60)
    assert await count(dsn, ORPHAN_ROWS) == 0
    assert await count(dsn, "SELECT count(*) FROM instruments") == 30
    assert await count(dsn, "SELECT count(*) FROM position_keys") == 30
    assert await count(dsn, "SELECT count(*) FROM greeks_latest") == 30

    # A later engine (empty id cache) replaying an already-committed batch: skipped, nothing new.
    spooled = Batch(uuid.uuid4(), [snapshot(j + 10, n_instruments=40)._replace(seq=j) for j in range(60, 70)])
    conn = await connect(dsn)
    try:
        assert await write_batch(conn, spooled, dims=Dimensions())
    finally:
        await conn.close()
    Spool(db_settings.spool_dir, db_settings.spool_max_bytes).open().append([spooled])
    second = WriterHarness(db_settings, dsn)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(second.run)
            await second.wait_for(lambda s: s["state"] == "running")
            second.send.close()
    assert second.status["duplicate_batches"] == 1
    await assert_exactly_once(dsn, 70)
    assert await count(dsn, "SELECT count(*) FROM instruments") == 40


async def test_engines_creating_the_same_positions_at_once(dsn: str) -> None:
    await migrate(dsn)
    conns = [await connect(dsn) for _ in range(3)]
    try:
        rows = [snapshot(i, n_instruments=50) for i in range(50)]
        await ensure_partitions(conns[0], days_of(rows))

        async def engine(conn: Any, k: int) -> None:
            mine = [r._replace(seq=k * 1000 + (r.seq or 0)) for r in rows[k::2]] + rows[:10]
            assert await write_batch(conn, Batch(uuid.uuid4(), mine), dims=Dimensions())

        async with anyio.create_task_group() as tg:
            for k, conn in enumerate(conns):
                tg.start_soon(engine, conn, k)
        assert await conns[0].fetchval("SELECT count(*) FROM instruments") == 50
        assert await conns[0].fetchval("SELECT count(*) FROM position_keys") == 50
        assert await conns[0].fetchval(ORPHAN_ROWS) == 0
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.parametrize("copy_min_rows", [COPY_MIN_ROWS, 1], ids=["one-statement", "copy"])
async def test_a_greek_beyond_float4_sets_its_batch_aside(
    dsn: str, db_settings: DatabaseSettings, copy_min_rows: int
) -> None:
    harness = WriterHarness(db_settings, dsn, kwargs={"copy_min_rows": copy_min_rows})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([snapshot(0), snapshot(1)._replace(gamma=1e39)])
                await harness.send.send([snapshot(2)])
                await harness.wait_for(lambda s: s["rows_total"] == 1)

    assert harness.status["rejected_rows"] == 2
    assert harness.events("batch_rejected")
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == 1
    assert await count(dsn, "SELECT max(seq) FROM greeks_history") == 2


@pytest.mark.parametrize("copy_min_rows", [COPY_MIN_ROWS, 1], ids=["one-statement", "copy"])
async def test_a_greek_too_small_for_float4_is_stored_as_zero_with_its_batch(
    dsn: str, db_settings: DatabaseSettings, copy_min_rows: int
) -> None:
    # A deep out-of-the-money option's gamma can be 1e-50: below float4's smallest value, not
    # out of its range. History keeps it as (signed) zero, the latest state (float8) as it is;
    # nothing is set aside.
    harness = WriterHarness(db_settings, dsn, kwargs={"copy_min_rows": copy_min_rows})
    tiny = snapshot(1)._replace(gamma=1e-50, rho=-1e-300, vega=2e-45, theta=7.006492321624085e-46)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([snapshot(0), tiny])
                await harness.wait_for(lambda s: s["rows_total"] + s["rejected_rows"] == 2)

    assert harness.status["rejected_rows"] == 0
    assert not harness.events("batch_rejected")
    history = await fetch(dsn, "SELECT gamma, rho, vega, theta, delta FROM greeks_history WHERE seq = 1")
    (row,) = history
    assert (row["gamma"], row["rho"], row["theta"]) == (0.0, 0.0, 0.0)
    assert math.copysign(1.0, row["rho"]) == -1.0  # the sign kept
    assert row["vega"] == pytest.approx(2.8e-45)  # a float4 subnormal: kept, rounded to 2 x 2**-149
    assert row["delta"] == pytest.approx(tiny.delta, rel=1e-6)
    (latest,) = await fetch(dsn, "SELECT gamma, rho FROM greeks_latest WHERE seq = 1")
    assert (latest["gamma"], latest["rho"]) == (1e-50, -1e-300)


def _old_frame(fields: tuple[str, ...], rows: list[Any]) -> bytes:
    """A spool frame as the engine before 0002/0003 wrote it: no greeks_source field, no
    positions or sessions keys."""
    payload = orjson.dumps(
        {
            "batch_id": str(uuid.uuid4()),
            "fields": fields,
            "rows": [[getattr(r, name) for name in fields] for r in rows],
        }
    )
    return struct.pack(">4sII", b"GSP1", len(payload), zlib.crc32(payload)) + payload


async def test_a_spool_written_before_the_upgrade_replays(dsn: str, db_settings: DatabaseSettings) -> None:
    # Arrange: a spool left by an engine of the wide-schema days (0001 model fields).
    old_fields = tuple(f for f in SNAPSHOT_FIELDS if f != "greeks_source")
    spool_dir = db_settings.spool_dir
    spool_dir.mkdir(parents=True)
    frames = [_old_frame(old_fields, [snapshot(j) for j in range(k * 10, k * 10 + 10)]) for k in range(3)]
    (spool_dir / "spool-000000000001.seg").write_bytes(b"".join(frames))
    harness = WriterHarness(db_settings, dsn)

    # Act
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == 30)
            harness.send.close()

    # Assert
    await assert_exactly_once(dsn, 30)
    assert harness.status["replayed_rows"] == 30
    assert not list(spool_dir.glob("spool-*.seg"))


@pytest.mark.integration
async def test_positions_and_sessions_survive_an_outage(
    pg: PgTarget, dsn: str, db_settings: DatabaseSettings
) -> None:
    settings = replace(db_settings, buffer_max_rows=5)  # spooled to disk, not only buffered
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            proxy = TcpProxy(*pg.host_port)
            await proxy.start(tg)
            proxy.cut()
            harness = WriterHarness(settings, proxy.route(dsn), kwargs=FAST_RECONNECT)
            await tg.start(harness.run)
            async with harness.send:
                start = SessionStarted("ibkr", "s-9", (ACCOUNT,), "gw", "live", 5.0)
                await harness.send.send(
                    RowsBatch([snapshot(j) for j in range(10)], (positions(1.0, 0, 1, 2),), (start,))
                )
                await harness.send.send(
                    RowsBatch([snapshot(j) for j in range(10, 20)], (positions(2.0, 2),), ())
                )
                await harness.wait_for(lambda s: s["spool_rows"] > 0)
                proxy.restore()
                await harness.wait_for(lambda s: s["state"] == "running" and s["rows_total"] == 20)
            await harness.finished.wait()  # the drain closes the open session through the proxy
            proxy.stop()

    await assert_exactly_once(dsn, 20)
    assert [r["instrument"] for r in await fetch(dsn, "SELECT instrument FROM positions")] == [
        held(2).instrument
    ]
    session = (await fetch(dsn, "SELECT * FROM stream_sessions"))[0]
    assert (session["session_key"], session["pid"], session["end_reason"]) == (
        "s-9",
        os.getpid(),
        "engine_stopped",
    )
