"""Versioned SQL migrations, applied under a PostgreSQL advisory lock.

Files live in ``db/migrations/`` as ``NNNN_name.sql``; version ``NNNN`` is applied in one
transaction together with its row in ``schema_migrations`` (version, name, sha256, applied_at).
A session advisory lock serialises concurrent engines: the second one waits, then finds nothing
to do. A database that records a version this code does not know is refused with
:class:`~supervisor.errors.FatalError`: running old code against a newer schema would write rows
the newer code misreads.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from supervisor.errors import FatalError

# Arbitrary constant shared by every engine process ("greeks" as bytes, fits in a bigint).
ADVISORY_LOCK_KEY = 0x677265656B73
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Every migration shipped with the code, in version order (versions must be 1..N)."""
    found = []
    for entry in (resources.files("db") / "migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise FatalError(f"migration versions are not contiguous: {[m.version for m in found]}")
    return found


def code_version() -> int:
    """The newest schema version this code knows."""
    return len(load_migrations())


async def migrate(conn_or_dsn: asyncpg.Connection | str, *, migrations: list[Migration] | None = None) -> int:
    """Bring the schema up to date; return the resulting version.

    Idempotent and safe to run from several processes at once.

    Raises:
        FatalError: the database records a newer version than the code knows (upgrade the engine),
            or an applied migration's file changed since it was applied.
    """
    if isinstance(conn_or_dsn, str):
        conn = await asyncpg.connect(conn_or_dsn)
        try:
            return await migrate(conn, migrations=migrations)
        finally:
            await conn.close()
    conn = conn_or_dsn
    known = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        applied = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        newest_known = max((m.version for m in known), default=0)
        newer = sorted(v for v in applied if v > newest_known)
        if newer:
            raise FatalError(
                f"database schema is at version {max(newer)} but this engine only knows versions "
                f"up to {newest_known}: the database was migrated by a newer engine. Upgrade the "
                "engine (or point DATABASE_URL at another database); refusing to write."
            )
        for migration in known:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise FatalError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "being applied; ship schema changes as a new migration file"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return int(version)
    finally:
        # A broken connection has released the lock with its session already.
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
