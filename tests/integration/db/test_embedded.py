"""The embedded server: first start, reuse across runs, stale lock files, orphan servers."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings, Secret
from db.embedded import EmbeddedServer, database

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def test_database_url_starts_nothing(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=Secret("postgresql://u@db.example:5432/x"), embedded_dir=tmp_path / "pg")

    async with database(settings) as dsn:
        assert dsn == "postgresql://u@db.example:5432/x"
    assert not (tmp_path / "pg").exists()


async def test_embedded_lifecycle(tmp_path: Path) -> None:
    settings = DatabaseSettings(embedded_dir=tmp_path / "pg", name="portfolio_engine")
    pgdata = settings.embedded_dir

    # First start: cluster and database created.
    with anyio.fail_after(50):
        async with database(settings) as dsn:
            assert dsn.endswith("/portfolio_engine")
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            finally:
                await conn.close()
        assert not EmbeddedServer(pgdata).is_running()  # stopped on exit

        # A stale postmaster.pid whose PID now belongs to another program (this one).
        (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n0\n1\n\n\n\nready\n")

        # Second start: same data, same database.
        async with database(settings) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT v FROM kept") == 42
            finally:
                await conn.close()

        # A killed run leaves its postmaster running: the next start adopts it, and stops it.
        orphan = EmbeddedServer(pgdata)
        await anyio.to_thread.run_sync(orphan.start)
        async with database(settings) as dsn:
            assert f":{orphan.port}/" in dsn
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT v FROM kept") == 42
            finally:
                await conn.close()
        assert not orphan.is_running()
