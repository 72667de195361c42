"""Writing batches with asyncpg into the narrow schema (0003), exactly once per batch id.

Three write paths, chosen per batch (the threshold measured: client plus server CPU per row):

- **One statement** (batches below ``copy_min_rows`` rows, 500, whose positions are all known): one
  ``INSERT ... SELECT FROM unnest(...)`` with the ledger row and the latest-state upsert as CTEs,
  sent outside any explicit transaction: one round trip, atomic, committed on return
  (``synchronous_commit`` on). A duplicate batch id makes it a no-op.
- **One trip by COPY** (batches whose latest rows are deferred, under load, whose positions are
  all known, whatever their size): one simple-protocol Query holding the ledger row and a binary
  COPY of the history rows, the COPY data sent right behind it; PostgreSQL commits the Query's
  statements together as one implicit transaction. A duplicate batch id makes it a no-op.
- **Transaction**: BEGIN; the dimension rows of first-seen positions; the ledger row and the latest
  upsert (with the history rows too below ``copy_min_rows``); binary COPY of the history rows
  (large batches; the stream built by :mod:`db.encode`); the positions snapshots and session
  events; COMMIT. Anything that is not plain rows
  (positions, sessions, first-seen positions, the ``before_commit`` test seam) takes this path.

Position ids come from the caller's :class:`~db.encode.Dimensions` cache; ids created by a
transaction enter the cache only once it has committed.

Also the partition upkeep the writer runs, and the classification of database errors into
"the database is away" (buffer, spool, reconnect), "the batch is bad data" (set aside) and the rest.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from db import encode
from db.batch import Batch, posix_to_us
from db.encode import HISTORY_COLUMNS, MATRIX_ROWS, BatchDataError, Dimensions, nested, nested_row
from normalize.events import PositionsSnapshot

# Below this many rows a batch goes in one statement; from it on, its history goes by COPY.
# Measured with write_batch of deferred-latest batches over 1,000 positions against the embedded
# PostgreSQL 18 (client / server CPU per row, one statement against COPY): 100 rows 4.7 / 9.2
# against 6.6 / 7.2 us; 250 rows 2.9 / 6.6 against 3.8 / 4.7; 400 rows 2.5 / 5.9 against 2.6 /
# 5.0; 600 rows 2.3 / 5.8 against 2.3 / 4.9; 1,000 rows 2.4 / 7.7 against 2.0 / 5.8. The server
# is cheaper by COPY from 250 rows on, the client from about 500 (the threshold was 2,000 while
# the COPY stream was built in Python). COPY takes four round trips (BEGIN, the ledger and latest
# statement, the COPY, COMMIT) against one, but in the engine that cost nothing measurable: 500
# against 1,000 in interleaved `python -m bench pipeline` runs, engine CPU per tick lower in 5 of
# 5 pairs (100,000 ticks/s: 6.79 / 7.12 / 6.54 against 7.17 / 7.22 / 6.70 us; 50,000: 12.65 /
# 12.75 against 12.93 / 13.58), p50 lower in 4 of 5, p99 in 4 of 5. Deferred batches have gone
# by COPY whatever their size since, in one round trip (_write_one_trip): the threshold now
# concerns batches that upsert their latest rows themselves (below the linger's rate, replays).
COPY_MIN_ROWS = 500


def _exact_ts(x: str) -> str:
    """SQL: POSIX seconds (float8) to timestamptz, rounded as ``datetime.fromtimestamp`` rounds
    (whole seconds exact, the fraction scaled and rounded half to even) and as the writer
    connection's own codec does (:func:`_encode_timestamptz`)."""
    return (
        f"(timestamptz 'epoch' + (trunc({x})::int8 * 1000000 + round(({x} - trunc({x})) * 1e6::float8)::int8)"
        " * interval '1 microsecond')"
    )


def _matrix(param: str, rows: int = len(MATRIX_ROWS)) -> str:
    """The matrix parameter ``param`` (``float8``, two or, nested, three dimensions:
    :func:`_arrays`) as one slice per row (the first ``rows`` of :data:`MATRIX_ROWS`)."""
    return ", ".join(f"({param}::float8[])[{i + 1}:{i + 1}]" for i in range(rows))


_ROW_VALUES = f"""{_exact_ts("u.event_ts")} AS event_ts,
           {_exact_ts("u.received_ts")} AS received_ts,
           u.quantity, u.bid, u.ask, u.last, u.mark, u.underlying_price,
           u.iv, u.delta, u.gamma, u.theta, u.vega, u.rho, u.seq,
           CASE u.greeks_source WHEN 1 THEN 'broker' WHEN 2 THEN 'model' END AS greeks_source"""
_VALUES = "quantity, bid, ask, last, mark, underlying_price, iv, delta, gamma, theta, vega, rho"
_LATEST_COLUMNS = f"position_id, batch_id, event_ts, received_ts, {_VALUES}, seq, greeks_source, updated_at"
_LATEST_UPDATE = ", ".join(
    f"{c} = EXCLUDED.{c}" for c in _LATEST_COLUMNS.split(", ") if c not in ("position_id", "updated_at")
)

# $1 batch id, $2..$6 row count and min/max event and receive times, $7 replayed, $8 the
# float8 matrix (db.encode.matrix), $9 the seq int8 array (both nested from NEST_FROM rows, the
# padding skipped: _arrays). Deferred batches never take it (WRITE_LEDGER_MARKED, _write_one_trip).
_LEDGER_AND_ROWS = f"""
WITH batch AS (
    INSERT INTO ingest_batches (batch_id, row_count, min_event_ts, max_event_ts,
                                min_received_ts, max_received_ts, replayed)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (batch_id) DO NOTHING
    RETURNING batch_id
), r AS MATERIALIZED (
    SELECT u.position_id::int4 AS position_id,
           {_ROW_VALUES},
           u.newest
    FROM unnest({_matrix("$8")}, $9::int8[]) AS u({", ".join(MATRIX_ROWS)}, seq)
    WHERE u.position_id IS NOT NULL AND EXISTS (SELECT 1 FROM batch)
), latest AS (
    INSERT INTO greeks_latest AS l ({_LATEST_COLUMNS})
    SELECT position_id, $1, event_ts, received_ts, {_VALUES}, seq, greeks_source, now()
    FROM r WHERE newest IS NOT NULL
    ON CONFLICT (position_id) DO UPDATE SET {_LATEST_UPDATE}, updated_at = now()
    WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts) >= (l.event_ts, l.received_ts)
)"""


# Half float4's smallest subnormal (2**-150, exact in float8): a float8 of at most this magnitude
# rounds to zero in float4, which PostgreSQL refuses ("value out of range: underflow") where
# binary COPY (struct's "f", the C packer) stores zero.
FLOAT4_UNDERFLOW = 2.0**-150


def _real(column: str) -> str:
    """SQL: a float8 ``column`` as history's ``real`` takes it: too small for float4 -> zero of
    its sign (as the COPY path stores it); NULL, NaN and the rest as they are (beyond float4's
    range still fails: a value no column can hold)."""
    return f"CASE WHEN abs({column}) <= {FLOAT4_UNDERFLOW!r}::float8 THEN {column} * 0 ELSE {column} END"


# The one-statement write: ledger row, history rows and latest upsert; true unless the batch id
# was committed before (then nothing is written). greeks_latest keeps float8 as it came.
WRITE_ROWS = f"""{_LEDGER_AND_ROWS}, history AS (
    INSERT INTO greeks_history ({", ".join(HISTORY_COLUMNS)})
    SELECT event_ts, received_ts, quantity, bid, ask, last, mark, underlying_price, seq,
           position_id, {", ".join(_real(c) for c in ("iv", "delta", "gamma", "theta", "vega", "rho"))},
           CASE greeks_source WHEN 'broker' THEN 'b' WHEN 'model' THEN 'm' END::"char"
    FROM r
)
SELECT EXISTS (SELECT 1 FROM batch)
"""

# The one-trip write of a batch whose latest rows are deferred (db.encode.Prepared.defer_latest,
# positions known): one simple-protocol Query holding the ledger row (marked) and the COPY of the
# history rows, the COPY data right behind it (see _write_one_trip). The ledger's values are
# literals the engine made (a UUID, counts, timestamps, a boolean), never text from a broker.
_ONE_TRIP_COPY = f"COPY greeks_history ({', '.join(HISTORY_COLUMNS)}) FROM STDIN (FORMAT binary)"
_ONE_TRIP_LEDGER = (
    "INSERT INTO ingest_batches (batch_id, row_count, min_event_ts, max_event_ts, min_received_ts,"
    " max_received_ts, replayed, latest_pending) VALUES ('{}', {}, {}, {}, {}, {}, {}, true)"
)
# asyncpg's COPY entry point that takes the statement as written (a private method, present
# from asyncpg 0.18 to 0.32 at least); without it deferred batches take the transaction path.
_HAS_COPY_IN = hasattr(asyncpg.Connection, "_copy_in")

# The ledger row alone, marked (a deferred batch whose history follows by COPY in a transaction):
# true unless the batch id was committed before. greeks_latest is not touched (no lock taken on it).
WRITE_LEDGER_MARKED = """
INSERT INTO ingest_batches (batch_id, row_count, min_event_ts, max_event_ts,
                            min_received_ts, max_received_ts, replayed, latest_pending)
VALUES ($1, $2, $3, $4, $5, $6, $7, true)
ON CONFLICT (batch_id) DO NOTHING
RETURNING true
"""

# The ledger row and the latest upsert only (the history follows by COPY): the matrix holds the
# newest row of each position only.
WRITE_LEDGER_AND_LATEST = f"""{_LEDGER_AND_ROWS}
SELECT EXISTS (SELECT 1 FROM batch)
"""

# The deferred latest rows (db.encode.PendingLatest): $1 the matrix (its last row: the 1-based
# index into $3 of the row's batch), $2 seq int8[], $3 the batch ids, whose ledger marks it clears.
# One statement, atomic: the rows and the cleared marks commit together.
FLUSH_LATEST = f"""
WITH done AS (
    UPDATE ingest_batches SET latest_pending = false
    WHERE batch_id = ANY($3::uuid[]) AND latest_pending
)
INSERT INTO greeks_latest AS l ({_LATEST_COLUMNS})
SELECT u.position_id::int4, ($3::uuid[])[u.newest::int4],
       {_ROW_VALUES}, now()
FROM unnest({_matrix("$1")}, $2::int8[]) AS u({", ".join(MATRIX_ROWS)}, seq)
WHERE u.position_id IS NOT NULL
ON CONFLICT (position_id) DO UPDATE SET {_LATEST_UPDATE}, updated_at = now()
WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts) >= (l.event_ts, l.received_ts)
"""

# After an engine died with deferred latest rows (ledger rows still marked): the newest history
# row of every position received since $1 (the oldest marked batch's first receive time), where
# newer than its latest row, then the marks cleared. History keeps the Greeks as real: their
# text form (the digits the broker sent) comes back as double precision. The batch id is that of
# the marked batch whose receive-time range holds the row (the nil UUID should none: another
# engine's row).
REPAIR_LATEST = f"""
WITH pending AS MATERIALIZED (
    SELECT batch_id, min_received_ts, max_received_ts FROM ingest_batches WHERE latest_pending
), newest AS (
    SELECT DISTINCT ON (h.position_id) h.*
    FROM greeks_history h
    WHERE h.received_ts >= $1::timestamptz
    ORDER BY h.position_id, h.event_ts DESC, h.received_ts DESC, h.seq DESC NULLS LAST
), repaired AS (
    INSERT INTO greeks_latest AS l ({_LATEST_COLUMNS})
    SELECT n.position_id,
           coalesce((SELECT p.batch_id FROM pending p
                     WHERE n.received_ts BETWEEN p.min_received_ts AND p.max_received_ts
                     ORDER BY p.min_received_ts LIMIT 1), '00000000-0000-0000-0000-000000000000'),
           n.event_ts, n.received_ts, n.quantity, n.bid, n.ask, n.last, n.mark, n.underlying_price,
           n.iv::text::float8, n.delta::text::float8, n.gamma::text::float8, n.theta::text::float8,
           n.vega::text::float8, n.rho::text::float8, n.seq,
           CASE n.greeks_source WHEN 'b' THEN 'broker' WHEN 'm' THEN 'model' END, now()
    FROM newest n
    ON CONFLICT (position_id) DO UPDATE SET {_LATEST_UPDATE}, updated_at = now()
    WHERE (EXCLUDED.event_ts, EXCLUDED.received_ts) > (l.event_ts, l.received_ts)
    RETURNING 1
), cleared AS (
    UPDATE ingest_batches b SET latest_pending = false FROM pending p WHERE b.batch_id = p.batch_id
)
SELECT (SELECT count(*) FROM pending) AS batches, (SELECT count(*) FROM repaired) AS rows
"""

# Dimension rows of first-seen positions (in a transaction; the ids are returned). DO UPDATE, not
# DO NOTHING, so that a row another engine created concurrently is returned too.
RESOLVE_INSTRUMENTS = """
INSERT INTO instruments AS i (instrument, underlying, asset_class, option_right, strike, expiry, multiplier)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::date[], $7::float8[])
ON CONFLICT ON CONSTRAINT instruments_identity DO UPDATE SET multiplier = EXCLUDED.multiplier
RETURNING i.instrument_id, i.instrument, i.underlying, i.asset_class, i.option_right, i.strike, i.expiry,
          i.multiplier
"""
RESOLVE_POSITIONS = """
INSERT INTO position_keys AS k (broker, account, instrument_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::int4[])
ON CONFLICT ON CONSTRAINT position_keys_identity DO UPDATE SET broker = EXCLUDED.broker
RETURNING k.position_id, k.broker, k.account, k.instrument_id
"""

# Positions snapshots (db.encode.fold_positions): an account's snapshot applies only if it is at
# least as new as the one applied last; it then replaces that account's positions (the ones it
# no longer lists are deleted: closed). The closed ones are found with NOT IN, which PostgreSQL
# runs as a hashed subplan (one hash of the held ids); the NOT EXISTS it replaces was planned as a
# nested-loop anti join (the unnest estimates are tiny), one scan of the held positions per
# position stored: a refresh of 500 positions took 36 ms in the database and of 5,000 about 3 s,
# against 8 and 70 ms now (timed on PostgreSQL 15, each refresh blocking the writer). The held
# ids are never NULL (resolved before), so NOT IN means what NOT EXISTS meant.
APPLY_POSITIONS = """
WITH snap AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS s(broker, account, as_of)
), applied AS (
    INSERT INTO position_accounts AS a (broker, account, as_of)
    SELECT broker, account, as_of FROM snap
    ON CONFLICT (broker, account) DO UPDATE SET as_of = EXCLUDED.as_of, updated_at = now()
    WHERE EXCLUDED.as_of >= a.as_of
    RETURNING a.broker, a.account, a.as_of
), held AS (
    SELECT * FROM unnest($4::text[], $5::text[], $6::int4[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::float8[], $12::date[], $13::float8[], $14::float8[], $15::float8[])
        AS n(broker, account, position_id, instrument, underlying, asset_class, option_right, strike, expiry,
             multiplier, quantity, avg_cost)
), closed AS (
    DELETE FROM positions p USING applied a
    WHERE p.broker = a.broker AND p.account = a.account
      AND p.position_id NOT IN (SELECT n.position_id FROM held n)
), upserted AS (
    INSERT INTO positions AS p (position_id, broker, account, instrument, underlying, asset_class,
                                option_right, strike, expiry, multiplier, quantity, avg_cost, as_of,
                                updated_at)
    SELECT n.position_id, n.broker, n.account, n.instrument, n.underlying, n.asset_class, n.option_right,
           n.strike, n.expiry, n.multiplier, n.quantity, n.avg_cost, a.as_of, now()
    FROM held n JOIN applied a ON a.broker = n.broker AND a.account = n.account
    ON CONFLICT (position_id) DO UPDATE SET
        broker = EXCLUDED.broker, account = EXCLUDED.account, instrument = EXCLUDED.instrument,
        underlying = EXCLUDED.underlying, asset_class = EXCLUDED.asset_class,
        option_right = EXCLUDED.option_right, strike = EXCLUDED.strike, expiry = EXCLUDED.expiry,
        multiplier = EXCLUDED.multiplier, quantity = EXCLUDED.quantity, avg_cost = EXCLUDED.avg_cost,
        as_of = EXCLUDED.as_of, updated_at = now()
)
SELECT count(*) FROM applied
"""

# Stream sessions, by the broker actor's session id: starts fill in the start fields (a replay
# writes the same values), ends close a session once (the first close wins).
SESSION_STARTS = """
INSERT INTO stream_sessions AS s
    (session_key, broker, account, host, engine_host, pid, mode, started_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::text[],
                     $8::timestamptz[])
ON CONFLICT (session_key) DO UPDATE SET
    broker = EXCLUDED.broker, account = EXCLUDED.account, host = EXCLUDED.host,
    engine_host = EXCLUDED.engine_host, pid = EXCLUDED.pid, mode = EXCLUDED.mode,
    started_at = EXCLUDED.started_at
"""
SESSION_ENDS = """
INSERT INTO stream_sessions AS s
    (session_key, broker, engine_host, pid, started_at, ended_at, end_reason, events)
SELECT u.k, u.b, u.h, u.p, u.e, u.e, u.r, u.n
FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::text[], $7::int8[])
    AS u(k, b, h, p, e, r, n)
ON CONFLICT (session_key) DO UPDATE SET
    ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason,
    events = greatest(s.events, EXCLUDED.events)
WHERE s.ended_at IS NULL
"""

# SQLSTATE classes: data exception, integrity violation: the batch itself is bad.
_DATA_SQLSTATES = ("22", "23")


def is_data_error(exc: BaseException) -> bool:
    """True when the batch itself can never be stored (PostgreSQL refuses its data, or asyncpg or
    the encoder refuses a value before sending it): set it aside, never retry it."""
    if isinstance(exc, BatchDataError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return code.startswith(_DATA_SQLSTATES)
    return False


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
    if is_configuration_error(exc) or is_data_error(exc):
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
    """Let ``conn`` take POSIX seconds for ``timestamptz`` parameters (the ledger's times,
    positions snapshots, sessions); reads still return aware UTC datetimes. Idempotent;
    :func:`connect` calls it."""
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
    seconds for ``timestamptz`` (:func:`prepare_connection`), generic plans only (the write
    statements take whole batches as array parameters: a custom plan would be planned again, the
    arrays folded in, at every execution), and the pages its backend writes out handed to the
    kernel's write-back every 256 kB (``backend_flush_after``, a per-session setting any role may
    set; on any server, as the embedded one does for all its backends: left dirty, they piled up
    for the kernel's 30 s write-back, which every commit's WAL flush then waited behind)."""
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout_s,
        command_timeout=command_timeout,
        server_settings={
            "synchronous_commit": "on",
            "application_name": "greeks-writer",
            "plan_cache_mode": "force_generic_plan",
            "backend_flush_after": "256kB",
        },
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
    dims: Dimensions | None = None,
    replayed: bool = False,
    before_commit: Hook | None = None,
    copy_min_rows: int = COPY_MIN_ROWS,
    prepared: encode.Prepared | None = None,
) -> bool:
    """Commit ``batch`` exactly once; False when its id was already committed (nothing written).

    ``dims`` caches position ids across calls (pass the same one for a connection's life;
    None: resolve every position). ``prepared``: the batch's encoding built ahead
    (:class:`db.encode.Prepared`; ignored when ``dims`` was cleared since). ``before_commit``
    runs after the writes, inside the transaction (a test seam for crashing before COMMIT); it
    forces the transaction path. ``conn`` is prepared on first use (:func:`prepare_connection`)
    if it was not opened with :func:`connect`.

    Raises:
        BatchDataError: a value no column can hold (a Greek beyond the float4 range).
    """
    if conn not in _prepared:
        await prepare_connection(conn)
    if dims is None:
        dims = Dimensions()
    p = prepared
    if (
        p is None
        or p.batch is not batch
        or not p.valid_for(dims)
        or p.large != (p.defer_latest or len(batch.rows) >= copy_min_rows)
    ):
        p = encode.Prepared(batch, dims, copy_min_rows).run(dims)
    missing = p.missing(dims)
    if not missing:
        p.resolve(dims.positions)  # ids that arrived since it was prepared (a no-op usually)
    if not (missing or p.accounts or batch.sessions or before_commit):
        if not p.large:
            assert p.rows_args is not None
            return bool(await conn.fetchval(*_rows_statement(p, replayed)))
        if p.defer_latest and _HAS_COPY_IN:
            return await _write_one_trip(conn, p, replayed)
    created: dict[encode.PositionKey, int] = {}
    async with conn.transaction():
        if missing:
            created = await resolve_positions(conn, missing)
            p.resolve({**dims.positions, **created})
        fresh = await _write_rows(conn, p, replayed)
        if fresh:
            if p.accounts:
                ids = {**dims.positions, **created}
                await conn.fetchval(APPLY_POSITIONS, *encode.positions_params(p.accounts, ids))
            if batch.sessions:
                starts, ends = encode.fold_sessions(batch.sessions)
                if starts:
                    await conn.execute(SESSION_STARTS, *encode.session_start_params(starts, batch))
                if ends:
                    await conn.execute(SESSION_ENDS, *encode.session_end_params(ends, batch))
            if before_commit is not None:
                await before_commit(conn)
    dims.add(created)  # committed: the ids exist for good
    return fresh


def _ledger(p: encode.Prepared, replayed: bool) -> tuple[Any, ...]:
    f = p.facts
    return (
        p.batch.batch_id,
        f.row_count,
        f.min_event_ts,
        f.max_event_ts,
        f.min_received_ts,
        f.max_received_ts,
        replayed,
    )


def _rows_statement(p: encode.Prepared, replayed: bool) -> tuple[Any, ...]:
    """The one-statement write of ``p`` and its arguments."""
    assert p.rows_args is not None
    assert not p.defer_latest  # deferred batches go by COPY
    matrix, seq = p.rows_args
    return (WRITE_ROWS, *_ledger(p, replayed), *_arrays(matrix, seq))


def _ts_literal(value: Any) -> str:
    """A ledger time (POSIX seconds, as the writer connection's codec takes them) as an exact
    SQL literal, or NULL."""
    if value is None:
        return "NULL"
    us = _encode_timestamptz(value)[0]
    return f"(timestamptz '2000-01-01 00:00:00+00' + {us} * interval '1 microsecond')"


def _one_trip_statement(p: encode.Prepared, replayed: bool) -> str:
    """The Query text of :func:`_write_one_trip`: the marked ledger row, then the COPY."""
    f = p.facts
    batch_id = p.batch.batch_id
    ledger = _ONE_TRIP_LEDGER.format(
        batch_id if type(batch_id) is uuid.UUID else uuid.UUID(str(batch_id)),  # a UUID's text form
        int(f.row_count),
        _ts_literal(f.min_event_ts),
        _ts_literal(f.max_event_ts),
        _ts_literal(f.min_received_ts),
        _ts_literal(f.max_received_ts),
        "true" if replayed else "false",
    )
    return f"{ledger};\n{_ONE_TRIP_COPY}"


async def _write_one_trip(conn: asyncpg.Connection, p: encode.Prepared, replayed: bool) -> bool:
    """A deferred batch in one round trip: the ledger row and the COPY in one simple Query, the
    COPY data and CopyDone sent right behind it without waiting for the server's CopyInResponse
    (asyncpg does so for a buffer source). PostgreSQL runs a Query of several statements as one
    implicit transaction, committed once the COPY is done. A duplicate batch id fails the ledger
    row, so nothing is written (False), and the server drops the COPY messages that follow (it
    ignores CopyData and CopyDone outside COPY). Against the one-statement write, timed in a
    scratch loop of 1,000 batches of 200 rows (two alternations, embedded PostgreSQL, fsync on):
    client 381 / 536 against 506 / 587 us a batch, server 720 / 830 against 1,020 / 1,140 us,
    1.24 / 1.50 against 1.75 / 1.92 ms a commit; at 10 and 40 rows level; the transaction path
    (BEGIN, ledger, COPY, COMMIT) cost more than either.

    Raises:
        BatchDataError: a value no column can hold (raised before anything is sent).
    """
    chunks = p.payload if p.payload is not None else list(encode.copy_payload(p.cols, p.pids))  # type: ignore[arg-type]
    try:
        await conn._copy_in(_one_trip_statement(p, replayed), memoryview(b"".join(chunks)), None)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "ingest_batches_pkey":
            return False  # committed before (a replay): nothing written
        raise
    return True


def _arrays(matrix: list[list[Any]], seq: list[int | None]) -> tuple[Any, Any]:
    """The matrix and sequence-number parameters as sent (nested from ``NEST_FROM`` rows: the
    statements skip rows whose ``position_id`` is NULL, the padding)."""
    return nested(matrix), nested_row(seq)


async def flush_latest(conn: asyncpg.Connection, pending: encode.PendingLatest) -> int:
    """Apply the deferred latest rows and clear their batches' marks (one statement, committed
    on return); how many positions it carried. The caller clears ``pending`` once it returns."""
    matrix, seq, batch_ids = pending.params()
    await conn.execute(FLUSH_LATEST, *_arrays(matrix, seq), batch_ids)
    return len(pending)


async def repair_latest(conn: asyncpg.Connection) -> tuple[int, int]:
    """Rebuild the latest rows of batches left marked (an engine died before applying them);
    (marked batches, latest rows written). Cheap when nothing is marked (a partial index)."""
    marked = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(min(min_received_ts), 'infinity') AS since"
        " FROM ingest_batches WHERE latest_pending"
    )
    assert marked is not None
    if not marked["n"]:
        return 0, 0
    since = marked["since"]
    async with conn.transaction():
        # Planned for this value: the BRIN on received_ts then reads the recent history only.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        record = await conn.fetchrow(REPAIR_LATEST, since)
    assert record is not None
    return int(record["batches"]), int(record["rows"])


async def _write_rows(conn: asyncpg.Connection, p: encode.Prepared, replayed: bool) -> bool:
    """Ledger row, latest upsert and history rows (by COPY when large); False: a duplicate."""
    if not p.large:
        assert p.rows_args is not None
        return bool(await conn.fetchval(*_rows_statement(p, replayed)))
    if p.defer_latest:
        if not await conn.fetchval(WRITE_LEDGER_MARKED, *_ledger(p, replayed)):
            return False
    else:
        assert p.latest_args is not None
        if not await conn.fetchval(WRITE_LEDGER_AND_LATEST, *_ledger(p, replayed), *_arrays(*p.latest_args)):
            return False
    refused: list[BatchDataError] = []
    # Prepared ahead, or built chunk by chunk while sent (the server digests each chunk while
    # the next is built).
    source = _sent(p.payload) if p.payload is not None else _chunks(p, refused)
    await conn.copy_to_table("greeks_history", source=source, columns=HISTORY_COLUMNS, format="binary")
    if refused:
        raise refused[0]  # rolls the transaction back
    return True


async def _sent(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _chunks(p: encode.Prepared, refused: list[BatchDataError]) -> AsyncIterator[bytes]:
    """The COPY stream, built as sent. A value the encoder refuses ends the stream early, without
    an exception inside asyncpg's COPY (which would send CopyFail plus an out-of-band cancel
    request that can hit a later statement): the caller raises it after COPY returns, and the
    transaction rolls back."""
    chunks = encode.copy_payload(p.cols, p.pids)  # type: ignore[arg-type]  # complete here
    try:
        for chunk in chunks:
            yield chunk
    except BatchDataError as exc:
        refused.append(exc)
        yield encode.COPY_TRAILER


async def apply_positions(
    conn: asyncpg.Connection, snapshots: Iterable[PositionsSnapshot], *, dims: Dimensions | None = None
) -> int:
    """Apply positions snapshots outside a writer batch (one transaction); returns how many
    accounts they replaced (an account whose stored snapshot is newer is left alone)."""
    if conn not in _prepared:
        await prepare_connection(conn)
    dims = Dimensions() if dims is None else dims
    accounts = encode.fold_positions(snapshots)
    created: dict[encode.PositionKey, int] = {}
    async with conn.transaction():
        missing = dims.missing(encode.positions_keys(accounts))
        if missing:
            created = await resolve_positions(conn, missing)
        applied = await conn.fetchval(
            APPLY_POSITIONS, *encode.positions_params(accounts, {**dims.positions, **created})
        )
    dims.add(created)
    return int(applied)


async def resolve_positions(
    conn: asyncpg.Connection, keys: list[encode.PositionKey]
) -> dict[encode.PositionKey, int]:
    """Create (or find) the instrument and position rows of ``keys`` (unique, in
    :meth:`~db.encode.Dimensions.missing` order); their position ids. Commit before caching them."""
    instruments = encode.instrument_ids(
        await conn.fetch(RESOLVE_INSTRUMENTS, *encode.instrument_params(keys))
    )
    records = await conn.fetch(RESOLVE_POSITIONS, *encode.position_params(keys, instruments))
    return encode.position_ids(keys, instruments, records)


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
