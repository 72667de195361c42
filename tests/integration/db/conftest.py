"""PostgreSQL fixtures: one embedded server per session (or ``TEST_DATABASE_URL``) and a fresh
database per test."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings
from db.embedded import EmbeddedServer


@dataclass
class PgTarget:
    """Where test databases are created: ``dsn(name)`` for a database on that server."""

    admin_dsn: str
    server: EmbeddedServer | None  # None: an external server from TEST_DATABASE_URL

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.admin_dsn)
        return parts.hostname or "127.0.0.1", parts.port or 5432


@pytest.fixture(scope="session")
def pg() -> Iterator[PgTarget]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield PgTarget(url, None)
        return
    root = Path(tempfile.mkdtemp(prefix="greeks-test-pg-"))
    root.chmod(root.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    # fsync off: throwaway cluster; synchronous_commit semantics are unchanged for the code.
    server = EmbeddedServer(root / "data", 0, fsync=False)
    server.start()  # restarts in outage tests keep the port it bound
    try:
        yield PgTarget(server.dsn(), server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def dsn(pg: PgTarget) -> AsyncIterator[str]:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield pg.dsn(name)
    with anyio.CancelScope(shield=True):
        if pg.server is not None and not pg.server.is_running():
            await anyio.to_thread.run_sync(pg.server.start)
        admin = await asyncpg.connect(pg.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def db_settings(tmp_path: Path) -> DatabaseSettings:
    return DatabaseSettings(
        spool_dir=tmp_path / "spool",
        batch_max_rows=1000,
        batch_max_delay_ms=50,
        buffer_max_rows=500,
        retention_days=30,
        partitions_ahead_days=1,
    )
