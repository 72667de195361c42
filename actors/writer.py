"""The writer actor: row batches from the ``rows`` channel into PostgreSQL, one commit per batch.

Items on ``rows`` are :class:`~normalize.events.RowsBatch` values (rows, positions snapshots,
stream session events: one per normalizer flush) or plain sequences of ``GreeksSnapshot`` rows.
Loop: wait for one item, drain what is already queued (up to ``batch_max_rows`` rows or
``batch_max_delay_ms`` of draining), then write it as one exactly-once batch
(:func:`db.copy.write_batch`: one statement for small batches, a transaction with COPY for large
ones or when positions, sessions or first-seen positions come along), record tick-to-commit
latency per row, report. Position ids are cached for the connection's life. Under load the
latest-state upsert is deferred: batches commit history only (their ledger rows marked) and the
newest row of each position is applied at most every ``LATEST_INTERVAL_MS`` in one statement;
marks an engine left behind are repaired from history at connect.

Database away (network, restart, too many connections): the failed batch and every following
one go to a bounded in-memory buffer; past ``buffer_max_rows`` the buffer is moved to the fsync'ed
spool under ``spool_dir``. A recovery task reconnects with tenacity backoff, re-runs migrations,
replays the spool (oldest segment first) and then the buffer, and only then hands live batches
back to the direct path. Batch ids make every replay exactly-once. The engine is ``degraded``
while this lasts.

Start: one connection attempt (``connect_timeout_s``). Reachable: migrate (a newer schema is a
``FatalError``), create partitions, drop expired ones, then ``started()``. Unreachable: the actor
still calls ``started()`` right away, in the spooling state, so that brokers keep streaming and
nothing is lost; the engine is degraded until the database appears. A spool left by an earlier
run is replayed in the background after connecting.

Stop: when the channel ends (the supervisor's drain) everything received is committed, or
spooled if the database is away, and ``run`` returns. Stream sessions this run saw start and
never saw end are closed with reason ``engine_stopped`` in that last batch. On cancellation the
same happens within ``shutdown_budget_s`` under a shielded scope; what cannot be committed in
time is spooled.
"""

from __future__ import annotations

import operator
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
from anyio.abc import TaskStatus
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from config.settings import DatabaseSettings
from db import copy as dbcopy
from db.batch import (
    LINGER_FROM_ROWS_S,
    Batch,
    BatchBuilder,
    Pending,
    clean_rows,
    days_between,
    days_of,
    partition_days,
    retention_cutoff,
    utc_day,
)
from db.encode import (
    EVENT_TS,
    RECEIVED_TS,
    BatchDataError,
    Dimensions,
    PendingLatest,
    Prepared,
    pending_positions,
    session_ok,
    snapshot_ok,
)
from db.latency import LatencyTracker
from db.migrate import migrate
from db.spool import Spool
from normalize.events import SessionEnded, SessionStarted
from supervisor.context import ActorContext
from supervisor.errors import FatalError
from supervisor.spec import RunFn

UPKEEP_INTERVAL_S = 3600.0
MAX_FLUSH_FAILURES = 3  # latest flushes beside the writes failing in a row before a reconnect
SMALL_BATCH_ROWS = 250  # encoded in one go, without yielding to the event loop (~0.3 ms)
ENGINE_STOPPED = "engine_stopped"  # end_reason of the sessions the writer closes at its drain
_received_ts = operator.attrgetter("received_ts")
_event_ts = operator.attrgetter("event_ts")
_MAX_REPLAY_ERRORS = 5  # unclassified PostgreSQL errors retried per recovery before crashing


def make_writer(
    settings: DatabaseSettings,
    dsn: str,
    *,
    clock: Callable[[], float] = time.time,
    connect_timeout_s: float = 5.0,
    reconnect_initial_s: float = 0.2,
    reconnect_max_s: float = 5.0,
    publish_interval_s: float = 0.25,
    shutdown_budget_s: float = 5.0,
    before_commit: dbcopy.Hook | None = None,
    copy_min_rows: int = dbcopy.COPY_MIN_ROWS,
    pipeline: bool = True,
    linger_from_rows_s: float = LINGER_FROM_ROWS_S,
    latest_from_rows_s: float = LINGER_FROM_ROWS_S,
) -> RunFn:
    """The writer's ``RunFn``. ``before_commit`` is a test seam (runs inside each batch's
    transaction after the writes); ``clock`` must be the clock of ``GreeksSnapshot.received_ts``;
    ``copy_min_rows``: batches of at least this many rows go by COPY; ``pipeline=False``: the
    next batch is gathered only once the previous one is committed (tests, benchmarks);
    ``linger_from_rows_s``: the arrival rate from which batches linger (``BATCH_LINGER_MS``);
    ``latest_from_rows_s``: the one from which the latest upsert is deferred (``LATEST_INTERVAL_MS``)."""

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        writer = _Writer(
            settings,
            dsn,
            ctx,
            clock=clock,
            connect_timeout_s=connect_timeout_s,
            reconnect_initial_s=reconnect_initial_s,
            reconnect_max_s=reconnect_max_s,
            publish_interval_s=publish_interval_s,
            shutdown_budget_s=shutdown_budget_s,
            before_commit=before_commit,
            copy_min_rows=copy_min_rows,
            pipeline=pipeline,
            linger_from_rows_s=linger_from_rows_s,
            latest_from_rows_s=latest_from_rows_s,
        )
        await writer.run(task_status)

    return run


class _Writer:
    def __init__(
        self,
        settings: DatabaseSettings,
        dsn: str,
        ctx: ActorContext,
        *,
        clock: Callable[[], float],
        connect_timeout_s: float,
        reconnect_initial_s: float,
        reconnect_max_s: float,
        publish_interval_s: float,
        shutdown_budget_s: float,
        before_commit: dbcopy.Hook | None,
        copy_min_rows: int,
        pipeline: bool,
        linger_from_rows_s: float,
        latest_from_rows_s: float,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.ctx = ctx
        self.log = ctx.log
        self.clock = clock
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.publish_interval_s = publish_interval_s
        self.shutdown_budget_s = shutdown_budget_s
        self.before_commit = before_commit
        self.copy_min_rows = copy_min_rows
        self.pipeline = pipeline

        self.conn: Any = None  # asyncpg.Connection while we hold one
        # A second connection, opened at the first deferred flush: the due latest rows are applied
        # on it while batches keep committing on ``conn`` (a flush of 1,000 positions took 24 ms
        # on a slow host, every batch waiting meanwhile when both shared one connection).
        self.flush_conn: Any = None
        self.db_up = False  # live batches go straight to the database
        self.recovering = False
        self.stopped = False
        self.stopping = False  # the shutdown drain has begun: no new recovery, no more retries
        self.memory: deque[Batch] = deque()
        self.memory_rows = 0
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes)
        self.rejected = Spool(settings.spool_dir / "rejected", settings.spool_max_bytes)
        self.spool_lock = anyio.Lock()
        self.builder = BatchBuilder(
            settings.batch_max_rows,
            settings.batch_max_delay_ms / 1000,
            settings.batch_linger_ms / 1000,
            linger_from_rows_s,
        )
        # Under load, greeks_latest is upserted at most every latest_interval_s (the newest row
        # of each position of the batches in between, in one statement); the ledger marks the
        # batches whose latest rows are pending, repaired at connect if an engine died first.
        self.latest = PendingLatest()
        self.latest_interval_s = settings.latest_interval_ms / 1000
        self.latest_from_rows_s = latest_from_rows_s
        self.latency = LatencyTracker()
        # Broker event time (the broker's clock: the wire's own stamp) to commit, so the wire,
        # the decoding and the normalizer count too; skew between the clocks shows here.
        self.event_latency = LatencyTracker()
        self.known_days: set[Any] = set()
        self.dims = Dimensions()  # position ids, cleared on every (re)connect
        self.pid = os.getpid()
        self.engine_host = socket.gethostname()
        self.open_sessions: dict[str, SessionStarted] = {}  # started in this run, not yet ended
        self.next_upkeep = 0.0
        self.down_since: float | None = None

        self.rows_total = 0
        self.batches_total = 0
        self.duplicate_batches = 0
        self.dropped_rows = 0
        self.rejected_rows = 0
        self.nonfinite_values = 0
        self.replayed_rows = 0
        self.latest_flushes = 0
        self.latest_repaired_rows = 0
        self.last_publish = 0.0

        self._tg: Any = None
        self._in_flight: anyio.Event | None = None  # set once the direct write in flight is done
        self._flush_beside: anyio.Event | None = None  # set once the flush on flush_conn is done
        self._flushing: PendingLatest | None = None  # what that flush carries
        self._flush_failures = 0  # flushes beside that failed in a row
        self._recovery_scope: anyio.CancelScope | None = None
        self._recovery_done = anyio.Event()
        self._spool_lost_seen = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, task_status: TaskStatus[None]) -> None:
        await anyio.to_thread.run_sync(self._open_spools)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._start()
                task_status.started()
                tg.start_soon(self._ticker)
                try:
                    await self._loop()
                finally:
                    with anyio.CancelScope(shield=True) as scope:
                        scope.deadline = anyio.current_time() + self.shutdown_budget_s
                        await self._drain()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Surface a lone child error (FatalError from a re-migration, say) as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_conn()
                self.stopped = True
                self._publish()

    def _open_spools(self) -> None:
        self.spool.open()
        self.rejected.open()
        for note in self.spool.repaired:
            self.log.warning("spool_repaired", detail=note)

    async def _start(self) -> None:
        pending = self.spool.rows
        try:
            self.conn = await self._connect_and_prepare()
        except Exception as exc:
            if not dbcopy.is_database_down(exc):
                raise _fatal("cannot use the database", exc) from exc
            self.log.warning(
                "db_unavailable_at_start", error=_err(exc), spool_rows=pending, dsn_host=_host(self)
            )
            self._go_down(exc, log=False)
        else:
            if pending:
                self._start_recovery("replaying spool from an earlier run")
            else:
                self.db_up = True
        self.log.info(
            "writer_started",
            db="connected" if self.conn is not None else "down",
            spool_rows=pending,
            batch_max_rows=self.settings.batch_max_rows,
        )
        self._publish()

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self._publish()

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        rx = self.ctx.receivers["rows"]
        while True:
            wait = self._latest_wait()
            try:
                if wait is None:
                    first = await rx.receive()
                else:
                    first = None
                    with anyio.move_on_after(wait):
                        first = await rx.receive()
                    if first is None:  # idle with latest rows pending: apply them now
                        # (never beside a write in flight: it may upsert greeks_latest itself)
                        await self._write_done()
                        if self._latest_wait() is not None and not self._flushing_beside():
                            self._start_flush_beside()
                        continue
            except anyio.EndOfStream:
                return
            self.builder.start(first, self.clock())
            eof = self._gather(rx)
            delay = 0.0 if eof else self.builder.linger(self.clock())
            if delay > 0:  # under load: let the batch grow (BATCH_LINGER_MS)
                await anyio.sleep(delay)
                eof = self._gather(rx)
            elif not eof and self._write_in_flight() and self._small_and_quiet(len(self.builder.rows)):
                # Below the linger's rate a small batch (cheap to encode) waits for the write in
                # flight, and what arrives meanwhile joins it instead of waiting for one more
                # commit: fewer commits, no added wait.
                await self._write_done()
                eof = self._gather(rx)
            # The batch is in the buffer before any await: cancelled or crashed from here on,
            # the shutdown drain commits or spools it.
            batch, cols = await self._clean_and_buffer(self.builder.take())
            if batch is not None:
                # Encoded while the previous batch is still in the database; then written once
                # that one is done (one write at a time on the connection, in order).
                prepared = await self._prepare(batch, cols)
                await self._write_done()
                if self.pipeline and not self._small_and_quiet(len(batch.rows)):
                    self._start_submit(batch, prepared)
                else:
                    # Below the linger's rate the next small batch waits for this write anyway
                    # (above): written in this task, what arrives meanwhile waits on the
                    # channel, and no task is started, nor woken twice, per commit.
                    await self._submit(batch, prepared)
            self._maybe_publish()
            if eof:
                return

    def _gather(self, rx: Any) -> bool:
        """Add what is queued on ``rx`` to the batch being built (up to its cap); True at the
        end of the stream."""
        builder = self.builder
        while not builder.full(self.clock()):
            try:
                item = rx.receive_nowait()
            except anyio.WouldBlock:
                return False
            except anyio.EndOfStream:
                return True
            builder.add(item)
        return False

    async def _prepare(self, batch: Batch, cols: Any) -> Prepared | None:
        """The batch's encoding (COPY stream included), yielding to the write in flight between
        chunks; None when it will not be written directly (it is then encoded when replayed)."""
        if not self.db_up or self.recovering:
            return None
        # A small batch is encoded in one go (well under a millisecond: an event-loop round per
        # step would cost more than the step); a large one yields between its parts (COPY
        # chunks of ``COPY_CHUNK_ROWS``) while the previous write is still in flight, so that
        # write is served. Once that write is done there is nothing to serve: yielding would
        # only hand every round to the brokers and the normalizer, which under load made a
        # large batch (after a slow commit) take longer still, and the next one larger.
        large = len(batch.rows) >= SMALL_BATCH_ROWS
        if large and self._write_in_flight():
            await anyio.lowlevel.checkpoint()  # cleaning took its share: let the write in flight go on
        prepared = Prepared(
            batch, self.dims, self.copy_min_rows, cols, defer_latest=self._defer_latest(batch)
        )
        try:
            for _ in prepared.steps(self.dims, eager=True):
                if large and self._write_in_flight():
                    await anyio.lowlevel.checkpoint()
        except BatchDataError:
            return None  # raised again by the write, which sets the batch aside
        return prepared

    def _small_and_quiet(self, rows: int) -> bool:
        """A batch of ``rows`` is small (encoded in one go) and rows arrive below the linger's
        rate: it waits for the write in flight, and is itself written in the loop's task (a
        larger one, or any under load, is written beside the loop, which meanwhile gathers and
        encodes the next)."""
        return rows < SMALL_BATCH_ROWS and self.builder.rate_rows_s < self.builder.linger_from_rows_s

    def _write_in_flight(self) -> bool:
        return self._in_flight is not None and not self._in_flight.is_set()

    def _start_submit(self, batch: Batch, prepared: Prepared | None) -> None:
        async def submit() -> None:
            await self._submit(batch, prepared)

        self._start_task(submit)

    def _start_task(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run ``write`` (the one use of the connection at a time) as the write in flight."""
        done = self._in_flight = anyio.Event()

        async def run() -> None:
            try:
                await write()
            finally:
                done.set()

        self._tg.start_soon(run)

    # -- greeks_latest, deferred under load --------------------------------------------------

    def _defer_latest(self, batch: Batch) -> bool:
        return bool(
            self.latest_interval_s > 0 and batch.rows and self.builder.rate_rows_s >= self.latest_from_rows_s
        )

    def _latest_wait(self) -> float | None:
        """Seconds until the pending latest rows are due (None: none, or no direct path)."""
        if not self.db_up or self.recovering:
            return None
        if self._flushing_beside():  # look again then: the next flush starts once this one is
            return max(self.latest_interval_s, 0.001)  # done (a failed one puts its rows back)
        if not self.latest:
            return None
        return self.latest.wait_s(self.clock(), self.latest_interval_s)

    async def _flush_latest(self) -> None:
        """Apply the pending latest rows (one statement) on the writer's connection, once the
        flush beside it is done (the shutdown drain). A failure sends the writer into recovery:
        the ledger marks stay, and the reconnect repairs those rows from history."""
        await self._flush_beside_done()  # two upserts of greeks_latest at once could deadlock
        if not self.latest or not self.db_up or self.recovering or self.conn is None:
            return
        try:
            await dbcopy.flush_latest(self.conn, self.latest)
        except Exception as exc:
            if not (dbcopy.is_database_down(exc) or isinstance(exc, asyncpg.PostgresError)):
                self.db_up = False
                self._drop_conn()
                raise
            self.log.warning("latest_flush_failed", error=_err(exc), sqlstate=getattr(exc, "sqlstate", None))
            self._go_down(exc, log=False)
        except BaseException:
            self.db_up = False
            self._drop_conn()
            raise
        else:
            self.latest_flushes += 1
            self.latest.clear()
            self._maybe_publish()

    def _flushing_beside(self) -> bool:
        return self._flush_beside is not None and not self._flush_beside.is_set()

    async def _flush_beside_done(self) -> None:
        if self._flush_beside is not None:
            await self._flush_beside.wait()

    def _start_flush_beside(self) -> None:
        """Apply the due latest rows on ``flush_conn`` while the writes go on on ``conn``. Only
        deferred batches (history and ledger rows, no greeks_latest) are written meanwhile:
        anything else that upserts greeks_latest or repairs it waits for this flush first."""
        pending, self.latest = self.latest, PendingLatest()
        self._flushing = pending
        done = self._flush_beside = anyio.Event()

        async def run() -> None:
            try:
                await self._apply_beside(pending)
            finally:
                self._flushing = None
                done.set()

        self._tg.start_soon(run)

    async def _apply_beside(self, pending: PendingLatest) -> None:
        try:
            if self.flush_conn is None:
                self.flush_conn = await dbcopy.connect(self.dsn, connect_timeout_s=self.connect_timeout_s)
            await dbcopy.flush_latest(self.flush_conn, pending)
        except Exception as exc:
            self._drop_flush_conn()
            if not (dbcopy.is_database_down(exc) or isinstance(exc, asyncpg.PostgresError)):
                raise
            self._flush_failures += 1
            self.log.warning(
                "latest_flush_failed",
                error=_err(exc),
                sqlstate=getattr(exc, "sqlstate", None),
                beside=True,
                in_a_row=self._flush_failures,
            )
            if self._flush_failures < MAX_FLUSH_FAILURES:
                # Not applied: the rows go back ahead of the newer ones, for the next flush
                # (their ledger marks stay until then).
                self.latest.requeue(pending)
            elif self.db_up and not self.recovering:
                # Failing for good, it seems: the writer reconnects, and the reconnect repairs
                # the pending rows from history (their marks), as when any write fails. The
                # pending rows are not kept meanwhile, so they cannot pile up.
                self._flush_failures = 0
                self._go_down(exc, log=False)
        except BaseException:
            self._drop_flush_conn()  # cancelled mid-statement: the connection's state is unknown
            raise
        else:
            self._flush_failures = 0
            self.latest_flushes += 1
            self._maybe_publish()

    def _drop_flush_conn(self) -> None:
        if self.flush_conn is not None:
            self.flush_conn.terminate()
            self.flush_conn = None

    async def _write_done(self) -> None:
        if self._in_flight is not None:
            await self._in_flight.wait()

    async def _clean_and_buffer(self, taken: Pending) -> tuple[Batch | None, Any]:
        """NaN/inf values become None (counted); the storable rows, positions snapshots and
        session events become a batch, appended to the in-memory buffer at once (returned, None
        if there is nothing, with the rows transposed when that was computed on the way); the
        rest is set aside."""
        rows = taken.rows
        cleaned = clean_rows(rows)
        if cleaned.values_cleared:
            self.nonfinite_values += cleaned.values_cleared
            self.log.warning("nonfinite_values_cleared", values=cleaned.values_cleared, rows=len(rows))
        positions = [p for p in taken.positions if snapshot_ok(p)]
        sessions = [e for e in taken.sessions if session_ok(e)]
        bad_positions = [p for p in taken.positions if not snapshot_ok(p)]
        bad_sessions = [e for e in taken.sessions if not session_ok(e)]
        for event in sessions:
            if isinstance(event, SessionStarted):
                self.open_sessions[event.session_id] = event
            else:
                self.open_sessions.pop(event.session_id, None)
        batch = None
        if cleaned.rows or positions or sessions:
            batch = self._batch(cleaned.rows, tuple(positions), tuple(sessions))
            self._buffer(batch)
        if cleaned.rejected or bad_positions or bad_sessions:
            reason = ValueError(
                "a non-finite time, quantity or multiplier, an unknown greeks_source, or a positions "
                "snapshot or session event that cannot be stored"
            )
            await self._reject(
                self._batch(cleaned.rejected, tuple(bad_positions), tuple(bad_sessions)), reason
            )
        return batch, cleaned.columns

    def _batch(self, rows: Any, positions: tuple[Any, ...] = (), sessions: tuple[Any, ...] = ()) -> Batch:
        if sessions:
            return Batch(uuid.uuid4(), rows, positions, sessions, self.pid, self.engine_host)
        return Batch(uuid.uuid4(), rows, positions)

    async def _submit(self, batch: Batch, prepared: Prepared | None = None) -> None:
        """``batch`` is already in the buffer: it leaves it only once committed (or set aside as
        bad data). On the direct path it is the oldest batch in the buffer (the next one may be
        buffered already, being prepared)."""
        if self.db_up and not self.recovering and self.memory and self.memory[0] is batch:
            try:
                await self._write(batch, prepared=prepared)
            except Exception as exc:
                if _is_data_error(exc):
                    self._unbuffer(batch)
                    await self._reject(batch, exc)
                    return
                if dbcopy.is_database_down(exc):
                    self._go_down(exc)
                elif isinstance(exc, asyncpg.PostgresError):
                    # Statement timeout, serialization failure, deadlock, ...: not the batch's
                    # fault; reconnect and replay it (its id keeps that exactly-once).
                    self.log.error(
                        "db_write_failed",
                        error=_err(exc),
                        sqlstate=getattr(exc, "sqlstate", None),
                        rows=len(batch.rows),
                        batch_id=str(batch.batch_id),
                    )
                    self._go_down(exc, log=False)
                else:
                    # Unexpected: the batch stays buffered and the drain spools it (the
                    # connection is not trusted again), so the restarted writer replays it.
                    self.db_up = False
                    self._drop_conn()
                    raise
            except BaseException:
                # Cancelled mid-write: the connection's state is unknown; the batch is still
                # buffered, the drain spools it.
                self.db_up = False
                self._drop_conn()
                raise
            else:
                self._unbuffer(batch)
                if self.latest and (
                    prepared is None
                    or not prepared.defer_latest
                    or self.latest.due(self.clock(), self.latest_interval_s)
                ):
                    if not self._flushing_beside():
                        self._start_flush_beside()  # the next write does not wait for it
                return
        if self.memory_rows > self.settings.buffer_max_rows:
            await self._spill()

    async def _write(self, batch: Batch, *, replayed: bool = False, prepared: Prepared | None = None) -> bool:
        if prepared is None or not prepared.defer_latest:
            await self._flush_beside_done()  # this write upserts greeks_latest too
        conn = self.conn
        if conn is None:
            raise ConnectionError("no database connection")
        now = self.clock()
        if now >= self.next_upkeep:
            await self._upkeep(conn, now)
        days = None
        if prepared is not None and batch.rows:
            days = days_between(prepared.facts.min_event_ts, prepared.facts.max_event_ts)  # type: ignore[arg-type]
        missing = (days or days_of(batch.rows)) - self.known_days
        if missing:
            await dbcopy.ensure_partitions(conn, missing)
            self.known_days |= missing
        fresh = await dbcopy.write_batch(
            conn,
            batch,
            dims=self.dims,
            replayed=replayed,
            before_commit=self.before_commit,
            copy_min_rows=self.copy_min_rows,
            prepared=prepared,
        )
        committed_at = self.clock()
        n = len(batch.rows)
        if fresh:
            if (
                prepared is not None
                and prepared.defer_latest
                and prepared.valid_for(self.dims)
                and not replayed
            ):
                self.latest.add(prepared, committed_at)  # (a stale one was encoded again, not deferred)
            self.rows_total += n
            self.batches_total += 1
            if replayed:
                self.replayed_rows += n
            if n:
                received = (
                    prepared.cols[RECEIVED_TS] if prepared is not None else map(_received_ts, batch.rows)
                )
                self.latency.record_commit(received, committed_at)
                events = prepared.cols[EVENT_TS] if prepared is not None else map(_event_ts, batch.rows)
                self.event_latency.record_commit(events, committed_at)
                self.ctx.record_events(n)
            self.log.debug("batch_committed", rows=n, batch_id=str(batch.batch_id))
        else:
            self.duplicate_batches += 1
            self.log.info("batch_already_committed", rows=n, batch_id=str(batch.batch_id))
        return fresh

    # -- outage handling ------------------------------------------------------------------------

    def _buffer(self, batch: Batch) -> None:
        self.memory.append(batch)
        self.memory_rows += len(batch.rows)

    def _unbuffer(self, batch: Batch) -> None:
        for i, item in enumerate(self.memory):
            if item is batch:
                del self.memory[i]
                self.memory_rows -= len(batch.rows)
                return

    async def _spill(self) -> None:
        """Move the whole in-memory buffer (oldest first) to the spool, fsync'ed."""
        async with self.spool_lock:
            batches = list(self.memory)
            self.memory.clear()
            self.memory_rows = 0
            if not batches:
                return
            rows = sum(len(b.rows) for b in batches)
            try:
                result = await anyio.to_thread.run_sync(self.spool.append, batches)
            except OSError as exc:
                self.dropped_rows += rows
                self.log.error("spool_write_failed", error=_err(exc), dropped_rows=rows)
                return
        self.log.info(
            "batches_spooled",
            batches=len(batches),
            rows=rows,
            spool_rows=self.spool.rows,
            spool_bytes=self.spool.bytes,
        )
        if result.dropped_rows:
            self.dropped_rows += result.dropped_rows
            self.log.error(
                "spool_full_dropped_oldest",
                dropped_rows=result.dropped_rows,
                dropped_bytes=result.dropped_bytes,
                dropped_rows_total=self.dropped_rows,
                spool_max_bytes=self.settings.spool_max_bytes,
            )
        self._publish()

    async def _reject(self, batch: Batch, exc: BaseException) -> None:
        """A batch PostgreSQL refuses as data (never retried): keep it aside, loudly."""
        self.rejected_rows += len(batch.rows)
        self.log.error(
            "batch_rejected",
            error=_err(exc),
            rows=len(batch.rows),
            positions_snapshots=len(batch.positions),
            session_events=len(batch.sessions),
            batch_id=str(batch.batch_id),
            kept_in=str(self.rejected.directory),
        )
        async with self.spool_lock:
            try:
                await anyio.to_thread.run_sync(self.rejected.append, [batch])
            except OSError as err:
                self.log.error("rejected_batch_lost", error=_err(err), rows=len(batch.rows))

    def _go_down(self, exc: BaseException, *, log: bool = True) -> None:
        self.db_up = False
        self.latest.clear()  # their ledger marks stay: the reconnect repairs them from history
        self._drop_flush_conn()  # a flush in flight fails at once (its rows: repaired likewise)
        if self.down_since is None:
            self.down_since = self.clock()
        if log:
            self.log.warning(
                "db_connection_lost",
                error=_err(exc),
                buffer_rows=self.memory_rows,
                spool_rows=self.spool.rows,
            )
        self._drop_conn()
        self._start_recovery("database unreachable: buffering and spooling")

    def _start_recovery(self, reason: str) -> None:
        self.ctx.set_degraded(f"writer: {reason}")
        if not self.recovering and not self.stopping and self._tg is not None:
            self.recovering = True
            self._recovery_done = anyio.Event()
            # The scope exists before the task starts: the drain can cancel a recovery that
            # is scheduled but not yet running.
            scope = self._recovery_scope = anyio.CancelScope()
            self._tg.start_soon(self._recover, scope)
        self._publish()

    async def _recover(self, scope: anyio.CancelScope) -> None:
        try:
            odd_errors = 0
            with scope:
                while not self.stopping:
                    if self.conn is None:
                        self.conn = await self._reconnect()
                        self._publish()
                    try:
                        await self._replay()
                    except Exception as exc:
                        if dbcopy.is_database_down(exc):
                            self.log.warning("db_connection_lost", error=_err(exc), during="replay")
                        elif isinstance(exc, asyncpg.PostgresError) and odd_errors < _MAX_REPLAY_ERRORS:
                            # Statement timeout, deadlock, ...: retry on a fresh connection.
                            odd_errors += 1
                            self.log.error(
                                "db_write_failed",
                                error=_err(exc),
                                sqlstate=getattr(exc, "sqlstate", None),
                                during="replay",
                                attempt=odd_errors,
                            )
                            await anyio.sleep(self.reconnect_initial_s * 2**odd_errors)
                        else:
                            raise  # the drain spools the buffer; the restarted writer replays it
                        self._drop_conn()
                        continue
                    async with self.spool_lock:
                        # Synchronous from here: no live batch can slip in between the final
                        # emptiness check and switching back to the direct path.
                        if self.memory or self.spool.segments:
                            continue
                        self.db_up = True
                        self.recovering = False
                    outage_s = None if self.down_since is None else self.clock() - self.down_since
                    self.down_since = None
                    self.ctx.set_degraded(None)
                    self.log.info(
                        "db_recovered",
                        replayed_rows=self.replayed_rows,
                        outage_s=None if outage_s is None else round(outage_s, 3),
                    )
                    self._publish()
                    return
        finally:
            if self._recovery_scope is scope:
                self._recovery_scope = None
            self.recovering = False
            self._recovery_done.set()

    async def _reconnect(self) -> Any:
        attempts = 0

        def before_sleep(state: Any) -> None:
            nonlocal attempts
            attempts = state.attempt_number
            if attempts == 1 or attempts % 20 == 0:
                exc = state.outcome.exception() if state.outcome else None
                self.log.info("db_reconnect_failed", attempt=attempts, error=_err(exc))

        retrying = AsyncRetrying(
            sleep=anyio.sleep,
            retry=retry_if_exception(dbcopy.is_database_down),
            wait=wait_exponential_jitter(
                multiplier=self.reconnect_initial_s,
                max=self.reconnect_max_s,
                jitter=self.reconnect_initial_s,
            ),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    conn = await self._connect_and_prepare()
        except Exception as exc:
            if isinstance(exc, FatalError):
                raise
            raise _fatal("cannot use the database", exc) from exc
        self.log.info("db_reconnected", attempts=attempts + 1)
        return conn

    async def _replay(self) -> None:
        """Spool segments oldest first, then the in-memory buffer, each batch exactly once."""
        while True:
            async with self.spool_lock:
                leased = await anyio.to_thread.run_sync(self.spool.lease_oldest)
            if leased is not None:
                path, batches = leased
                if self.spool.lease_error is not None:
                    lost = self.spool.lost_rows - self._spool_lost_seen
                    self._spool_lost_seen = self.spool.lost_rows
                    self.dropped_rows += lost
                    self.log.error(
                        "spool_segment_corrupt",
                        detail=self.spool.lease_error,
                        dropped_rows=lost,
                        dropped_rows_total=self.dropped_rows,
                    )
                fresh_rows = skipped = 0
                for batch in batches:
                    if await self._replay_one(batch):
                        fresh_rows += len(batch.rows)
                    else:
                        skipped += 1
                async with self.spool_lock:
                    await anyio.to_thread.run_sync(self.spool.release, path)
                self.log.info(
                    "spool_replayed",
                    segment=path.name,
                    batches=len(batches),
                    rows=fresh_rows,
                    already_committed_batches=skipped,
                    spool_rows=self.spool.rows,
                )
                self._publish()
                continue
            if not self.memory:
                return
            batch = self.memory.popleft()
            self.memory_rows -= len(batch.rows)
            try:
                await self._replay_one(batch)
            except BaseException:
                self.memory.appendleft(batch)
                self.memory_rows += len(batch.rows)
                raise
            self._maybe_publish()

    async def _replay_one(self, batch: Batch) -> bool:
        try:
            return await self._write(batch, replayed=True)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            await self._reject(batch, exc)
            return False

    # -- database plumbing ----------------------------------------------------------------------

    async def _connect_and_prepare(self) -> Any:
        conn = await dbcopy.connect(self.dsn, connect_timeout_s=self.connect_timeout_s)
        self.dims.clear()  # ids are re-read from this database
        try:
            await migrate(conn)
            self.known_days = await dbcopy.existing_partition_days(conn)
            await self._upkeep(conn, self.clock())
            await self._flush_beside_done()  # the repair upserts greeks_latest too
            batches, rows = await dbcopy.repair_latest(conn)
            self.latest.clear()  # pending rows of this writer were among them
            if batches:
                self.latest_repaired_rows += rows
                self.log.warning("latest_repaired", batches=batches, rows=rows)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _upkeep(self, conn: Any, now: float) -> None:
        """Create partitions ahead and drop the ones past retention (hourly, and at connect)."""
        today = utc_day(now)
        wanted = set(partition_days(today, self.settings.partitions_ahead_days))
        created = await dbcopy.ensure_partitions(conn, wanted - self.known_days)
        self.known_days |= wanted
        cutoff = retention_cutoff(today, self.settings.retention_days)
        dropped = await dbcopy.drop_partitions_before(conn, cutoff)
        if dropped:
            self.known_days = {d for d in self.known_days if d >= cutoff}
        if created or dropped:
            self.log.info(
                "partitions_maintained",
                created=[d.isoformat() for d in created],
                dropped=dropped,
                retention_cutoff=cutoff.isoformat(),
            )
        self.next_upkeep = now + UPKEEP_INTERVAL_S

    def _drop_conn(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def _close_conn(self) -> None:
        self._drop_flush_conn()  # no statement of its own outlives the writer's drain
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            with anyio.fail_after(2):
                await conn.close()
        except Exception:
            conn.terminate()

    # -- shutdown -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Commit what is queued, or spool it; called shielded, within the shutdown budget.

        Whatever happens (budget spent, a recovery that never ends, an error), what is still
        buffered is spooled at the end, under its own shield."""
        self.stopping = True
        committed = 0
        try:
            with anyio.move_on_after(max(0.1, self.shutdown_budget_s / 4)):
                await self._write_done()  # the batch in flight is committed, or back to buffer
            taken = self.builder.take()
            self._drain_channel_nowait(taken)
            now = self.clock()
            taken.sessions.extend(
                SessionEnded(s.broker, s.session_id, now, ENGINE_STOPPED, 0)
                for s in self.open_sessions.values()
            )
            await self._clean_and_buffer(taken)
            if self._recovery_scope is not None:
                self._recovery_scope.cancel()  # also one scheduled but not yet running
            if self.recovering:
                with anyio.move_on_after(max(0.1, self.shutdown_budget_s / 4)):
                    await self._recovery_done.wait()  # its in-flight batch is back in the buffer
            if self.db_up and self.conn is not None:
                try:
                    with anyio.move_on_after(max(0.0, self.shutdown_budget_s - 1.0)):
                        while self.memory:
                            batch = self.memory[0]
                            await self._write(batch)
                            self.memory.popleft()
                            self.memory_rows -= len(batch.rows)
                            committed += len(batch.rows)
                        await self._flush_latest()
                except Exception as exc:
                    self.log.warning("db_write_failed_at_shutdown", error=_err(exc))
                    self._drop_conn()
        finally:
            with anyio.CancelScope(shield=True):
                spooled = self.memory_rows
                if self.memory:
                    await self._spill()
                self.log.info(
                    "writer_drained",
                    committed_rows=committed,
                    spooled_rows=spooled,
                    spool_rows=self.spool.rows,
                    rows_total=self.rows_total,
                )

    def _drain_channel_nowait(self, into: Pending) -> None:
        rx = self.ctx.receivers.get("rows")
        if rx is None:
            return
        while True:
            try:
                item = rx.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            into.add(item)

    # -- status ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        if self.db_up:
            return "running"
        if self.conn is not None and self.recovering:
            return "replaying"
        return "spooling"

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "state": self.state,
            "db": "connected" if self.conn is not None else "down",
            "rows_total": self.rows_total,
            "batches_total": self.batches_total,
            "latency_ms": self.latency.summary_ms(now),
            "event_latency_ms": self.event_latency.summary_ms(now),
            "buffer_rows": self.memory_rows,
            "spool_rows": self.spool.rows,
            "spool_bytes": self.spool.bytes,
            "dropped_rows": self.dropped_rows,
            "rejected_rows": self.rejected_rows,
            "nonfinite_values": self.nonfinite_values,
            "replayed_rows": self.replayed_rows,
            "duplicate_batches": self.duplicate_batches,
            "latest_pending_positions": pending_positions(
                self.latest, *(() if self._flushing is None else (self._flushing,))
            ),
            "latest_flushes": self.latest_flushes,
            "latest_repaired_rows": self.latest_repaired_rows,
        }

    def _publish(self) -> None:
        self.last_publish = self.clock()
        self.ctx.publish("writer", self.status())

    def _maybe_publish(self) -> None:
        if self.clock() - self.last_publish >= self.publish_interval_s:
            self._publish()


def _is_data_error(exc: BaseException) -> bool:
    return dbcopy.is_data_error(exc)


def _err(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fatal(what: str, exc: BaseException) -> FatalError:
    return FatalError(f"{what}: {_err(exc)}")


def _host(writer: _Writer) -> str:
    """The DSN's host part only: never log credentials."""
    dsn = writer.dsn
    at = dsn.rfind("@")
    rest = dsn[at + 1 :] if at >= 0 else dsn.split("://", 1)[-1]
    return rest.split("/", 1)[0]
