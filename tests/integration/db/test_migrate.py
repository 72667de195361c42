"""Migrations: bootstrap, idempotence, concurrent starts, refusal of a newer schema."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from db.migrate import code_version, load_migrations, migrate
from supervisor.errors import FatalError

from .helpers import count, fetch

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

TABLES = {"greeks_history", "greeks_latest", "positions", "stream_sessions", "ingest_batches"}
VIEWS = {"portfolio_greeks_now", "portfolio_greeks_total", "portfolio_greeks_minutely"}


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
