"""Migrations: bootstrap, idempotence, concurrent starts, refusal of a newer schema."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

from db.migrate import code_version, load_migrations, migrate
from supervisor.errors import FatalError

from .helpers import count, fetch
from .wide import (
    START,
    assert_same_rows,
    clean_rows,
    migrate_to,
    read_views,
    write_wide,
    write_wide_positions_and_sessions,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

TABLES = {
    "greeks_history", "greeks_latest", "positions", "stream_sessions", "ingest_batches", "instruments",
    "position_keys", "position_accounts",
}  # fmt: skip
VIEWS = {
    "greeks_current",
    "portfolio_greeks_now",
    "portfolio_greeks_total",
    "portfolio_greeks_minutely",
    "greeks_history_wide",
}


async def test_bootstrap_empty_database(dsn: str) -> None:
    version = await migrate(dsn)

    assert version == code_version() == len(load_migrations())
    tables = {r["tablename"] for r in await fetch(dsn, "SELECT tablename FROM pg_tables")}
    assert TABLES | {"schema_migrations"} <= tables
    views = {r["viewname"] for r in await fetch(dsn, "SELECT viewname FROM pg_views")}
    assert VIEWS <= views
    kind = await count(dsn, "SELECT relkind::text FROM pg_class WHERE relname = 'greeks_history'")
    assert kind == "p"  # partitioned


async def test_rerun_is_a_noop(dsn: str) -> None:
    await migrate(dsn)
    before = await fetch(dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY 1")

    assert await migrate(dsn) == code_version()

    after = await fetch(dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY 1")
    assert before == after


async def test_concurrent_starts(dsn: str) -> None:
    results: list[int] = []

    async def one() -> None:
        results.append(await migrate(dsn))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)

    assert results == [code_version()] * 5
    assert await count(dsn, "SELECT count(*) FROM schema_migrations") == code_version()


async def test_newer_schema_is_refused(dsn: str) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
        with pytest.raises(FatalError, match="version 999.*newer engine"):
            await migrate(conn)
        # The advisory lock is released after the refusal: another migrate does not hang.
        with anyio.fail_after(5), pytest.raises(FatalError):
            await migrate(dsn)
    finally:
        await conn.close()


async def test_edited_migration_is_refused(dsn: str) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(FatalError, match="changed after being applied"):
            await migrate(conn)
    finally:
        await conn.close()


# -- 0003: the wide history of 0001/0002 converted to the narrow form ---------------------------


async def _populate_wide(dsn: str, version: int) -> None:
    await migrate_to(dsn, version)
    rows = clean_rows(240, start=START)
    for k in range(0, len(rows), 60):
        await write_wide(dsn, rows[k : k + 60], with_source=version >= 2)
    await write_wide_positions_and_sessions(dsn, rows)


async def _snapshot(dsn: str) -> dict[str, Any]:
    return {
        "views": await read_views(dsn),
        "history": [dict(r) for r in await fetch(dsn, f"SELECT * FROM {HISTORY} ORDER BY seq")],
        "partitions": {
            r["part"]: r["n"]
            for r in await fetch(
                dsn, f"SELECT tableoid::regclass::text AS part, count(*) AS n FROM {HISTORY} GROUP BY 1"
            )
        },
        "sessions": [dict(r) for r in await fetch(dsn, "SELECT * FROM stream_sessions ORDER BY session_id")],
        "ledger": [dict(r) for r in await fetch(dsn, "SELECT * FROM ingest_batches ORDER BY batch_id")],
        "positions": await fetch(
            dsn, "SELECT broker, account, instrument, quantity, avg_cost FROM positions ORDER BY 1, 2, 3"
        ),
    }


HISTORY = "greeks_history"


@pytest.mark.parametrize("version", [1, 2], ids=["from-0001", "from-0002"])
async def test_populated_wide_database_is_converted_without_losing_a_row(dsn: str, version: int) -> None:
    # Arrange: a database at 0001 (or 0002) holding history over two days, latest rows,
    # positions and stream sessions, written the way the writer before 0003 did.
    await _populate_wide(dsn, version)
    before = await _snapshot(dsn)
    assert len(before["history"]) == 240
    assert len(before["partitions"]) == 2

    # Act
    assert await migrate(dsn) == code_version()

    # Assert: every history row, in its partition, with the same values (exposures now derived);
    # the four views give the same rows and numbers; positions, sessions and the ledger kept.
    history = [dict(r) for r in await fetch(dsn, "SELECT * FROM greeks_history_wide ORDER BY seq")]
    assert_same_rows(history, before["history"], ignore=("batch_id",))
    if version == 1:
        assert {r["greeks_source"] for r in history} == {None}
    else:
        assert {r["greeks_source"] for r in history} == {None, "broker", "model"}
    partitions = await fetch(
        dsn, "SELECT tableoid::regclass::text AS part, count(*) AS n FROM greeks_history GROUP BY 1"
    )
    assert {r["part"]: r["n"] for r in partitions} == before["partitions"]
    views = await read_views(dsn)
    for view, rows in before["views"].items():
        assert_same_rows(views[view], rows)
    assert len(views["greeks_current"]) < len({(r["broker"], r["instrument"]) for r in history})  # filtered
    assert [dict(r) for r in await fetch(dsn, "SELECT * FROM stream_sessions ORDER BY session_id")] == [
        {**s, "session_key": None, "engine_host": None} for s in before["sessions"]
    ]
    assert [dict(r) for r in await fetch(dsn, "SELECT * FROM ingest_batches ORDER BY batch_id")] == [
        {**b, "latest_pending": False}
        for b in before["ledger"]  # 0004: nothing pending
    ]
    assert (
        await fetch(
            dsn, "SELECT broker, account, instrument, quantity, avg_cost FROM positions ORDER BY 1, 2, 3"
        )
        == before["positions"]
    )
    accounts = {(r["broker"], r["account"]) for r in before["positions"]}
    assert await count(dsn, "SELECT count(*) FROM position_accounts") == len(accounts)
    assert await count(dsn, "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%0002%'") == 0


async def test_concurrent_starts_on_a_populated_wide_database(dsn: str) -> None:
    await _populate_wide(dsn, 2)
    before = await _snapshot(dsn)
    results: list[int] = []

    async def one() -> None:
        results.append(await migrate(dsn))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)

    assert results == [code_version()] * 5
    assert await count(dsn, "SELECT count(*) FROM greeks_history") == len(before["history"])
    assert await count(dsn, "SELECT count(*) FROM schema_migrations") == code_version()
    views = await read_views(dsn)
    for view, rows in before["views"].items():
        assert_same_rows(views[view], rows)
