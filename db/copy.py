"""Writing batches with asyncpg: COPY history, upsert latest, record the batch, commit once.

Also the partition upkeep the writer runs, and the classification of database errors into
"the database is away" (buffer, spool, reconnect) versus everything else.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from asyncpg.pgproto.pgproto import UUID as PgUUID

from db.batch import HISTORY_COLUMNS, Batch, batch_facts, iter_records, latest_of, posix_to_us

_LATEST_UPDATE = ", ".join(
    f"{c} = EXCLUDED.{c}" for c in HISTORY_COLUMNS if c not in ("broker", "account", "instrument")
)
_COLS = ", ".join(HISTORY_COLUMNS)
_KEYS = "broker, account, instrument"
_NEWER = """WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts)
       >= (greeks_latest.event_ts, greeks_latest.received_ts)"""

# Every batch: BEGIN; this statement (batch id + latest upsert, the newest row per position
# picked in Python); COPY the rows into greeks_history; COMMIT. A batch id seen before inserts
# nothing and upserts nothing (the caller then ends the transaction before any COPY).
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
    ON CONFLICT ({_KEYS}) DO UPDATE SET {_LATEST_UPDATE}, updated_at = now()
    {_NEWER}
)
SELECT EXISTS (SELECT 1 FROM batch)
"""

# SQLSTATE classes/codes meaning "this connection or server is not usable now".
_DOWN_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "53", "58")

Hook = Callable[[asyncpg.Connection], Awaitable[None]]


# asyncpg functions that read the DSN, its options and the files it names (SSL certificates,
# passfile) before any connection is attempted: an error raised inside them is a configuration
# error, never an outage, even when it is an OSError (a missing or unreadable certificate).
_CONFIG_FUNCTIONS = frozenset({"_parse_connect_dsn_and_args", "_parse_connect_arguments"})


def is_configuration_error(exc: BaseException) -> bool:
    """True for a connection setting no retry can cure: a bad DSN option (``sslmode=bogus``,
    ``target_session_attrs=nope``) or a file it names that cannot be read (``sslrootcert``).

    A missing Unix socket is also a ``FileNotFoundError`` but means "server down", so OSErrors
    count only when raised while asyncpg parses the connection arguments."""
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _CONFIG_FUNCTIONS:
                return True
            tb = tb.tb_next
    return False


def is_database_down(exc: BaseException) -> bool:
    """True for errors a reconnect may cure (network, shutdown, too many connections)."""
    if is_configuration_error(exc):
        return False
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


# -- timestamptz as POSIX seconds -------------------------------------------------------------
# PostgreSQL's binary timestamptz is int64 microseconds since 2000-01-01 UTC.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in microseconds since 1970
_PG_EPOCH_US_F = float(_PG_EPOCH_US)
# Adding and subtracting 1.5 * 2**52 rounds a double below 2**51 to an integer, half to even.
_RNE = 6755399441055744.0
_FAST_MAX_S = 9.0e9  # below this, seconds * 1e6 stays under 2**53: float arithmetic is exact
_INFINITY_US = 2**63 - 1
_ONE_US = timedelta(microseconds=1)
# asyncpg's own mapping of the infinities (naive datetime.max/min).
_INFINITY = datetime.max
_NEG_INFINITY = datetime.min


def _encode_timestamptz(value: Any) -> tuple[int]:
    """POSIX seconds (float or int) or a ``datetime`` to PostgreSQL microseconds.

    Floats take the fast path: ~0.3 us against ~2.4 us for ``datetime.fromtimestamp`` plus
    asyncpg's datetime encoder. Datetimes behave as with asyncpg's codec (naive = local time).
    """
    if value.__class__ is float and 0.0 <= value < _FAST_MAX_S:
        # posix_to_us in exact float arithmetic: the whole seconds scaled, plus the fraction
        # scaled and rounded half to even; every intermediate is an integer below 2**53.
        frac = value % 1.0
        return (int((value - frac) * 1e6 + (((frac * 1e6) + _RNE) - _RNE) - _PG_EPOCH_US_F),)
    kind = type(value)
    if kind is float or kind is int:
        return (posix_to_us(value) - _PG_EPOCH_US,)
    if not isinstance(value, datetime):
        raise TypeError(f"expected POSIX seconds or a datetime for timestamptz, got {kind.__name__}")
    if value.tzinfo is None:
        if value == _INFINITY:
            return (_INFINITY_US,)
        if value == _NEG_INFINITY:
            return (-_INFINITY_US - 1,)
    return ((value.astimezone(UTC) - _PG_EPOCH) // _ONE_US,)


def _decode_timestamptz(value: tuple[int]) -> datetime:
    us = value[0]
    if us == _INFINITY_US:
        return _INFINITY
    if us == -_INFINITY_US - 1:
        return _NEG_INFINITY
    return _PG_EPOCH + timedelta(microseconds=us)


_prepared: weakref.WeakSet[Any] = weakref.WeakSet()


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Let ``conn`` take POSIX seconds for ``timestamptz`` (what :func:`db.batch.to_records`
    produces); reads still return aware UTC datetimes. Idempotent; :func:`connect` calls it."""
    if conn in _prepared:
        return
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_timestamptz,
        decoder=_decode_timestamptz,
        format="tuple",
    )
    _prepared.add(conn)


async def connect(dsn: str, *, connect_timeout_s: float = 10.0, command_timeout: float = 30.0) -> Any:
    """A writer connection: synchronous commit on, named for ``pg_stat_activity``, taking POSIX
    seconds for ``timestamptz`` (:func:`prepare_connection`)."""
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout_s,
        command_timeout=command_timeout,
        server_settings={"synchronous_commit": "on", "application_name": "greeks-writer"},
    )
    try:
        await prepare_connection(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def write_batch(
    conn: asyncpg.Connection,
    batch: Batch,
    *,
    replayed: bool = False,
    before_commit: Hook | None = None,
) -> bool:
    """Commit ``batch`` exactly once; False when its id was already committed (nothing written).

    One transaction, committed once (``synchronous_commit`` on): BEGIN; one statement that
    records the batch id and upserts the newest row per position, never replacing a newer row (a
    duplicate id makes it a no-op and ends the transaction); COPY the rows into
    ``greeks_history`` (``copy_records_to_table``); COMMIT. ``before_commit`` runs after the
    writes, inside the transaction (a test seam for crashing before COMMIT). ``conn`` is prepared on first use
    (:func:`prepare_connection`) if it was not opened with :func:`connect`.
    """
    if conn not in _prepared:
        await prepare_connection(conn)
    facts = batch_facts(batch.rows)
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
            latest_of(batch),
        )
        if not fresh:
            return False
        if batch.rows:
            # Lazy records: built while encoded, so that the server digests each chunk sent
            # while the next is built (COPY streams in ~512 kB chunks).
            await conn.copy_records_to_table(
                "greeks_history",
                # asyncpg's own UUID encodes in C; a uuid.UUID costs a Python call per row.
                records=iter_records(batch, PgUUID(batch.batch_id.bytes)),
                columns=HISTORY_COLUMNS,
            )
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
