"""Writing batches with asyncpg: COPY history, upsert latest, record the batch, commit once.

Also the partition upkeep the writer runs, and the classification of database errors into
"the database is away" (buffer, spool, reconnect) versus everything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import date
from typing import Any

import asyncpg

from db.batch import HISTORY_COLUMNS, Batch, batch_facts, latest_records, to_records

_LATEST_UPDATE = ", ".join(
    f"{c} = EXCLUDED.{c}" for c in HISTORY_COLUMNS if c not in ("broker", "account", "instrument")
)
_COLS = ", ".join(HISTORY_COLUMNS)
# One round trip records the batch id and upserts the latest rows; a batch id seen before
# inserts nothing and upserts nothing (the caller then rolls back before any COPY).
RECORD_BATCH_AND_UPSERT_LATEST = f"""
WITH batch AS (
    INSERT INTO ingest_batches (batch_id, row_count, min_event_ts, max_event_ts,
                                min_received_ts, max_received_ts, replayed)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (batch_id) DO NOTHING
    RETURNING batch_id
), latest AS (
    INSERT INTO greeks_latest ({_COLS}, updated_at)
    SELECT {_COLS}, now() FROM unnest($8::greeks_history[])
    WHERE EXISTS (SELECT 1 FROM batch)
    ON CONFLICT (broker, account, instrument) DO UPDATE SET {_LATEST_UPDATE}, updated_at = now()
    WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts)
       >= (greeks_latest.event_ts, greeks_latest.received_ts)
)
SELECT EXISTS (SELECT 1 FROM batch)
"""

# SQLSTATE classes/codes meaning "this connection or server is not usable now".
_DOWN_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "53", "58")

Hook = Callable[[asyncpg.Connection], Awaitable[None]]


def is_database_down(exc: BaseException) -> bool:
    """True for errors a reconnect may cure (network, shutdown, too many connections)."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError  # protocol state broken by a dying connection
        | asyncpg.ConnectionDoesNotExistError
        | asyncpg.PostgresConnectionError
        | ConnectionError,
    ):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return any(code.startswith(prefix) for prefix in _DOWN_SQLSTATES)
    return False


async def connect(dsn: str, *, connect_timeout_s: float = 10.0, command_timeout: float = 30.0) -> Any:
    """A writer connection: synchronous commit on, named for ``pg_stat_activity``."""
    return await asyncpg.connect(
        dsn,
        timeout=connect_timeout_s,
        command_timeout=command_timeout,
        server_settings={"synchronous_commit": "on", "application_name": "greeks-writer"},
    )


async def write_batch(
    conn: asyncpg.Connection,
    batch: Batch,
    *,
    replayed: bool = False,
    before_commit: Hook | None = None,
) -> bool:
    """Commit ``batch`` exactly once; False when its id was already committed (nothing written).

    One transaction, four round trips: BEGIN; one statement that records the batch id and
    upserts the newest row per position into ``greeks_latest`` (never replacing a newer one; a
    duplicate id makes it a no-op and ends the transaction); COPY the rows into
    ``greeks_history``; COMMIT. ``before_commit`` runs after the
    writes, inside the transaction (a test seam for crashing between COPY and COMMIT).
    """
    facts = batch_facts(batch.rows)
    records = to_records(batch)
    async with conn.transaction():
        fresh = await conn.fetchval(
            RECORD_BATCH_AND_UPSERT_LATEST,
            batch.batch_id,
            facts.row_count,
            facts.min_event_ts,
            facts.max_event_ts,
            facts.min_received_ts,
            facts.max_received_ts,
            replayed,
            latest_records(records),
        )
        if not fresh:
            return False
        if records:
            await conn.copy_records_to_table("greeks_history", records=records, columns=HISTORY_COLUMNS)
        if before_commit is not None:
            await before_commit(conn)
    return True


async def ensure_partitions(conn: asyncpg.Connection, days: Iterable[date]) -> list[date]:
    """Create the daily history partitions for ``days``; return the ones that were missing."""
    return [
        day
        for day in sorted(set(days))
        if await conn.fetchval("SELECT ensure_greeks_history_partition($1)", day)
    ]


async def existing_partition_days(conn: asyncpg.Connection) -> set[date]:
    rows = await conn.fetch(
        """
        SELECT to_date(substr(c.relname, 17), 'YYYYMMDD') AS day
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'greeks_history' AND c.relname ~ '^greeks_history_p[0-9]{8}$'
        """
    )
    return {r["day"] for r in rows}


async def drop_partitions_before(conn: asyncpg.Connection, cutoff: date) -> int:
    """Drop history partitions of days before ``cutoff``; return how many were dropped."""
    return int(await conn.fetchval("SELECT drop_greeks_history_partitions_before($1)", cutoff))
