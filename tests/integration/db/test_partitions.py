"""Daily history partitions: created on demand and ahead, dropped past retention."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

import anyio
import pytest

from config.settings import DatabaseSettings
from db.copy import connect, drop_partitions_before, ensure_partitions, existing_partition_days
from db.migrate import migrate

from .helpers import WriterHarness, count, fetch, snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

MIDNIGHT = datetime(2024, 3, 11, tzinfo=UTC).timestamp()


async def test_rows_across_a_day_boundary_land_in_their_partitions(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    # The writer's clock says 2024-03-11 00:00:30 UTC; rows straddle midnight.
    now = MIDNIGHT + 30
    rows = [snapshot(i, ts=MIDNIGHT - 2 + i * 0.5, received=now) for i in range(8)]
    settings = replace(db_settings, partitions_ahead_days=2, retention_days=30)
    harness = WriterHarness(settings, dsn, kwargs={"clock": lambda: now})

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send(rows)

    per_partition = {
        r["part"]: r["n"]
        for r in await fetch(
            dsn, "SELECT tableoid::regclass::text AS part, count(*) AS n FROM greeks_history GROUP BY 1"
        )
    }
    assert per_partition == {"greeks_history_p20240310": 4, "greeks_history_p20240311": 4}
    conn = await connect(dsn)
    try:
        days = await existing_partition_days(conn)
    finally:
        await conn.close()
    # Yesterday through two days ahead exist from the start.
    assert {date(2024, 3, d) for d in (10, 11, 12, 13)} <= days


async def test_far_out_of_range_rows_get_a_partition_on_demand(
    dsn: str, db_settings: DatabaseSettings
) -> None:
    now = MIDNIGHT
    late = datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()  # a replayed row, days old
    harness = WriterHarness(db_settings, dsn, kwargs={"clock": lambda: now})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            async with harness.send:
                await harness.send.send([snapshot(0, ts=late, received=now)])

    assert await count(dsn, "SELECT count(*) FROM greeks_history_p20240301") == 1


async def test_retention_drops_old_partitions(dsn: str, db_settings: DatabaseSettings) -> None:
    await migrate(dsn)
    conn = await connect(dsn)
    try:
        old = [date(2024, 2, d) for d in range(1, 6)]
        assert await ensure_partitions(conn, old) == old
        assert await ensure_partitions(conn, old) == []  # idempotent
        await conn.execute(
            "INSERT INTO greeks_history (position_id, quantity, event_ts, received_ts) "
            "VALUES (1, 1, '2024-02-01T12:00Z', now())"
        )
    finally:
        await conn.close()
    # The writer's clock says 2024-03-11; 30 days of retention: cutoff 2024-02-10.
    settings = replace(db_settings, retention_days=30)
    harness = WriterHarness(settings, dsn, kwargs={"clock": lambda: MIDNIGHT})

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(harness.run)
            harness.send.close()

    conn = await connect(dsn)
    try:
        days = await existing_partition_days(conn)
        assert not [d for d in days if d < date(2024, 2, 10)]
        assert date(2024, 3, 11) in days
        assert await drop_partitions_before(conn, date(2024, 2, 10)) == 0
    finally:
        await conn.close()
    (event,) = harness.events("partitions_maintained")
    assert event["dropped"] == 5
