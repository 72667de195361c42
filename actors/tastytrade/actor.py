"""The Tastytrade actor: a thin loop around the SDK (REST), the DXLink codec and the mapper.

One attempt (one call of the run function the supervisor restarts)::

    SDK session -> accounts -> positions (+ streamer symbols) -> PositionsSnapshot on raw
    -> quote token -> websocket -> DxLinkProtocol handshake -> SessionStarted
    -> per frame: decode -> map -> one `await send(batch)` on raw
    -> timers: KEEPALIVE, stale, handshake timeout; quote token refresh; positions refresh
    -> connection ended -> SessionEnded -> reconnect (new token first after UNAUTHORIZED)

Reconnects happen inside the attempt: a connection that streamed and then ended (server close,
drop without a close frame, stale, ERROR TIMEOUT, UNAUTHORIZED, the planned quote-token
refresh) is replaced at once, with a full handshake and a ``reset`` resubscription. Two
connections in a row that never reached streaming raise :class:`TransientError`, and the
supervisor restarts the actor with backoff (the IBKR actor is untouched). Only bad
configuration raises :class:`FatalError`.

Counters that survive restarts (frames, malformed, reconnects) and the streamer-symbol cache
live in the closure of :func:`make_tastytrade_actor`. Status keys (``actors.tastytrade``):
``connection`` (``connecting``, ``connected`` = authenticated and subscribed, ``disconnected``;
the IBKR actor's values), ``subscriptions``, ``frames_total``, ``malformed_total``,
``errors_total`` (informational ERRORs), ``reconnects``, ``accounts``; published at most twice a
second, and at once on a state change. Nothing is logged per tick; malformed frames are logged
truncated, the first 10 and then every 1000th.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from actors.steps import MAP_STEP_ROWS, finish_in_steps
from actors.tastytrade.protocol import (
    MAX_CHUNK_BYTES,
    Authorized,
    ChannelClosed,
    DxLinkProtocol,
    ErrorMessage,
    Event,
    FeedConfig,
    FeedData,
    FeedReady,
    HandshakeTimeout,
    Malformed,
    ServerTimeout,
    Stale,
    Subscription,
    Unauthorized,
)
from actors.tastytrade.rest import QuoteToken, RestError, TastytradeRest
from config.settings import TastytradeSettings
from normalize.events import BrokerEvent, SessionEnded, SessionStarted
from normalize.tastytrade import (
    BROKER,
    SubscriptionPlan,
    map_feed,
    map_positions_steps,
    positions_snapshot,
    subscription_plan,
)
from supervisor.context import ActorContext
from supervisor.errors import FatalError, TransientError
from supervisor.spec import RunFn

PUBLISH_INTERVAL_S = 0.5
MAX_MESSAGE_BYTES = 16 * 2**20  # largest FEED_DATA frame accepted
MAX_FAILED_CONNECTIONS = 2  # in a row, without streaming, before the supervisor takes over
LOG_FIRST, LOG_EVERY = 10, 1000  # malformed / error log rate limit
_ENDED = (Unauthorized, ServerTimeout, ChannelClosed, HandshakeTimeout, Stale)


@dataclass(slots=True)
class _Counters:
    """Survive restarts (they live in the factory's closure)."""

    frames_total: int = 0
    malformed_total: int = 0
    errors_total: int = 0
    reconnects: int = 0
    connections: int = 0


@dataclass(slots=True)
class _Outcome:
    reason: str
    streamed: bool
    new_token: bool = False


@dataclass(slots=True)
class _Connection:
    ws: ClientConnection
    proto: DxLinkProtocol
    host: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    rearm: anyio.Event = field(default_factory=anyio.Event)  # the codec's deadlines moved earlier
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: bool = False
    updates: int = 0
    outcome: _Outcome | None = None


def make_tastytrade_actor(
    settings: TastytradeSettings,
    *,
    mode: str,
    clock: Callable[[], float] = time.time,
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> RunFn:
    """The run function of the Tastytrade actor (see the module docstring).

    :param settings: credentials, ``TT_API_URL`` (the simulator's URL in simulated mode) and the
        DXLink timings.
    :param mode: ``live`` or ``simulated`` (recorded with each stream session).
    :param clock: POSIX time of received frames and events (tests may fix it).
    :param chunk_bytes: the largest FEED_SUBSCRIPTION message.
    """
    counters = _Counters()
    streamer_cache: dict[str, str] = {}  # canonical key -> API streamer symbol ("" = unknown)

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        attempt = _Attempt(settings, mode, clock, chunk_bytes, ctx, counters, streamer_cache)
        await attempt.run(task_status)

    return run


class _Attempt:
    def __init__(
        self,
        settings: TastytradeSettings,
        mode: str,
        clock: Callable[[], float],
        chunk_bytes: int,
        ctx: ActorContext,
        counters: _Counters,
        streamer_cache: dict[str, str],
    ) -> None:
        self.settings = settings
        self.mode = mode
        self.clock = clock
        self.chunk_bytes = chunk_bytes
        self.ctx = ctx
        self.log = ctx.log
        self.out = ctx.senders["raw"]
        self.counters = counters
        self.streamer_cache = streamer_cache
        self.accounts: list[str] = []
        self.plan = SubscriptionPlan(frozenset(), {})
        self.positions_count = 0
        self.conn: _Connection | None = None
        self.send_lock = anyio.Lock()
        self.reading_blocked = False  # the reader waits on a full raw channel
        self.connection_state = "connecting"
        self.task_status: TaskStatus[None] | None = None

    # ----------------------------------------------------------------- the attempt

    async def run(self, task_status: TaskStatus[None]) -> None:
        self.task_status = task_status
        self._publish(changed=True)
        try:
            async with TastytradeRest(self.settings, clock=self.clock) as rest:
                self.rest = rest
                self.accounts = await rest.load_accounts()
                await self._load_positions()
                self.log.info(
                    "tastytrade_ready",
                    mode=self.mode,
                    accounts=self.accounts,
                    positions=self.positions_count,
                    subscriptions=len(self.plan.items),
                )
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._publish_loop)
                        tg.start_soon(self._positions_loop)
                        await self._stream()
                except BaseExceptionGroup as group:
                    raise _first(group) from None
        finally:
            self.connection_state = "disconnected"
            self._publish(changed=True)

    async def _stream(self) -> None:
        token = await self.rest.quote_token()
        failures = 0
        while True:
            if token.refresh_at() <= self.clock():
                token = await self.rest.quote_token()
            outcome = await self._connect_and_stream(token)
            self.log.info("ws_disconnected", reason=outcome.reason, streamed=outcome.streamed)
            failures = 0 if outcome.streamed else failures + 1
            if failures >= MAX_FAILED_CONNECTIONS:
                raise TransientError(f"DXLink: {failures} connections failed in a row: {outcome.reason}")
            if outcome.new_token:
                token = await self.rest.quote_token()
                self.log.info("quote_token_refreshed", reason=outcome.reason)
            self.connection_state = "disconnected"
            self._publish(changed=True)

    # ----------------------------------------------------------------- positions

    async def _load_positions(self) -> tuple[list[Subscription], list[Subscription]]:
        """Fetch positions, send the snapshot, switch to the new plan; ``(add, remove)``."""
        rows = await self.rest.positions()
        mapped = await finish_in_steps(map_positions_steps(rows, step=MAP_STEP_ROWS))
        if mapped.skipped:
            self.log.warning(
                "positions_skipped", count=len(mapped.skipped), examples=list(mapped.skipped[:5])
            )
        wanted = {p.instrument for p in mapped.positions} | {p.underlying for p in mapped.positions}
        unknown = sorted(k for k in wanted if k and k not in self.streamer_cache)
        if unknown:
            try:
                found = await self.rest.streamer_symbols(unknown)
            except RestError as exc:  # the symbology gives the same symbols for equity options
                self.log.warning("streamer_symbols_unavailable", error=str(exc), symbols=len(unknown))
            else:
                self.streamer_cache.update({k: found.get(k, "") for k in unknown})
        plan = subscription_plan(mapped.positions, self.streamer_cache)
        self.positions_count = len(mapped.positions)
        await self.out.send([positions_snapshot(self.accounts, mapped.positions, self.clock())])
        old, self.plan = self.plan, plan
        return old.diff(plan)

    async def _positions_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.positions_refresh_s)
            try:
                add, remove = await self._load_positions()
            except RestError as exc:
                self.log.warning("positions_refresh_failed", error=str(exc))
                continue
            if not add and not remove:
                continue
            self.log.info(
                "subscriptions_changed", added=len(add), removed=len(remove), total=len(self.plan.items)
            )
            conn = self.conn
            if conn is not None:
                conn.proto.update_subscriptions(add, remove, now=anyio.current_time())
                await self._flush(conn, quiet=True)

    # ----------------------------------------------------------------- one connection

    async def _connect_and_stream(self, token: QuoteToken) -> _Outcome:
        counters = self.counters
        if counters.connections:
            counters.reconnects += 1
        counters.connections += 1
        self.connection_state = "connecting"
        self._publish(changed=True)
        host = urlsplit(token.dxlink_url).netloc
        timeout = self.settings.handshake_timeout_s
        try:
            ws = await connect(
                token.dxlink_url,
                open_timeout=timeout,
                ping_interval=None,  # DXLink has its own KEEPALIVE
                close_timeout=1.0,
                max_size=MAX_MESSAGE_BYTES,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            return _Outcome(f"connect to {host} failed: {type(exc).__name__}: {exc}"[:300], streamed=False)
        s = self.settings
        proto = DxLinkProtocol(
            token=token.token.get(),
            subscriptions=self.plan.items,
            now=anyio.current_time(),
            keepalive_s=s.keepalive_s,
            stale_s=s.stale_s,
            handshake_timeout_s=timeout,
            aggregation_s=s.aggregation_s,
            chunk_bytes=self.chunk_bytes,
        )
        conn = self.conn = _Connection(ws, proto, host)
        self.log.info("ws_connected", host=host, subscriptions=len(proto.subscriptions))
        reason = "stopped"
        try:
            refresh_in = max(token.refresh_at() - self.clock(), 0.0)
            with anyio.move_on_after(refresh_in) as refresh_scope, conn.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._timers, conn)
                    conn.outcome = await self._read(conn)
                    tg.cancel_scope.cancel()
            if conn.outcome is None and refresh_scope.cancelled_caught:
                conn.outcome = _Outcome("quote token refresh", conn.started, new_token=True)
            if conn.outcome is None:  # pragma: no cover - every path above sets it
                conn.outcome = _Outcome("connection ended", conn.started)
            reason = conn.outcome.reason
            return conn.outcome
        finally:
            self.conn = None
            proto.close()
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(2.0):
                    await ws.close()
                if conn.started:
                    await self._send_session_event(
                        SessionEnded(BROKER, conn.session_id, self.clock(), reason, conn.updates)
                    )

    async def _read(self, conn: _Connection) -> _Outcome:
        proto, clock, mono = conn.proto, self.clock, anyio.current_time
        counters, ctx = self.counters, self.ctx
        try:
            await self._flush(conn)  # SETUP
            while True:
                # bytes for text frames too: a frame that is not UTF-8 is then one malformed
                # message (counted), not a connection the library fails with 1007
                message = await conn.ws.recv(decode=False)
                received = clock()
                counters.frames_total += 1
                proto.receive_text(message, mono())
                batch: list[BrokerEvent] = []
                ended, updates = self._handle(conn, proto.events_received(), received, batch)
                try:
                    await self._flush(conn)  # before SessionStarted: it means "subscribed"
                finally:  # even when the socket just closed: what was decoded is delivered
                    if batch:
                        await self._deliver(batch)
                        if updates:
                            conn.updates += updates  # counted once on the channel
                            ctx.record_events(updates)
                if conn.started and self.task_status is not None:
                    self.task_status.started()
                    self.task_status = None
                if ended is not None:
                    return ended
        except ConnectionClosed as exc:  # a clean close too (ConnectionClosedOK)
            return _Outcome(_describe_close(exc), conn.started)

    async def _timers(self, conn: _Connection) -> None:
        proto = conn.proto
        while True:
            deadline = proto.next_deadline()
            if math.isinf(deadline):
                return
            with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)):
                await conn.rearm.wait()  # the feed came up: the stale deadline now applies
            if conn.rearm.is_set():
                conn.rearm = anyio.Event()
                continue
            now = anyio.current_time()
            if self.reading_blocked:
                proto.note_backpressure(now)
            proto.on_timer(now)
            if not await self._flush(conn, quiet=True):
                return  # the reader sees the close
            ended, _ = self._handle(conn, proto.events_received(), self.clock(), [])
            if ended is not None:
                conn.outcome = ended
                conn.scope.cancel()
                return

    def _handle(
        self, conn: _Connection, events: list[Event], received: float, batch: list[BrokerEvent]
    ) -> tuple[_Outcome | None, int]:
        """React to the codec's events; instrument updates go into ``batch``. Returns how the
        connection ended (if it did) and how many updates were added."""
        ended: _Outcome | None = None
        start = len(batch)
        sessions = 0
        for ev in events:
            if type(ev) is FeedData:
                map_feed(ev, self.plan.keys, received, batch.append)
            elif isinstance(ev, Malformed):
                self.counters.malformed_total += 1
                n = self.counters.malformed_total
                if n <= LOG_FIRST or n % LOG_EVERY == 0:
                    self.log.warning("dxlink_malformed", reason=ev.reason, frame=ev.excerpt, total=n)
            elif isinstance(ev, FeedReady):
                conn.started = True
                conn.rearm.set()
                sessions += 1
                batch.append(
                    SessionStarted(
                        BROKER, conn.session_id, tuple(self.accounts), conn.host, self.mode, received
                    )
                )
                self.connection_state = "connected"
                self._publish(changed=True)
                self.log.info(
                    "subscriptions_sent",
                    subscriptions=ev.subscriptions,
                    messages=ev.messages,
                    host=conn.host,
                    session_id=conn.session_id,
                )
            elif isinstance(ev, FeedConfig):
                if ev.previous_format is not None and ev.previous_format != ev.data_format:
                    self.log.warning(
                        "feed_format_changed", channel=ev.channel, old=ev.previous_format, new=ev.data_format
                    )
            elif isinstance(ev, ErrorMessage):
                self.counters.errors_total += 1
                n = self.counters.errors_total
                if n <= LOG_FIRST or n % LOG_EVERY == 0:
                    self.log.warning(
                        "dxlink_error_received",
                        error=ev.error,
                        message=ev.message,
                        channel=ev.channel,
                        total=n,
                    )
            elif isinstance(ev, Authorized):
                self.log.info("dxlink_authorized", host=conn.host)
            elif isinstance(ev, _ENDED) and ended is None:
                ended = _Outcome(ev.reason, conn.started, new_token=isinstance(ev, Unauthorized))
        return ended, len(batch) - start - sessions

    async def _flush(self, conn: _Connection, *, quiet: bool = False) -> bool:
        """Send what the codec queued. With ``quiet``, a closed socket returns False instead of
        raising (the reader reports the close)."""
        if not conn.proto.pending_output:
            return True
        try:
            async with self.send_lock:  # taken inside the lock: frames go out in codec order
                for text in conn.proto.data_to_send():
                    await conn.ws.send(text)
        except ConnectionClosed:
            if not quiet:
                raise
            return False
        return True

    async def _deliver(self, batch: list[BrokerEvent]) -> None:
        """One frame's events onto ``raw``. At once when there is room (no checkpoint, so a
        cancellation cannot drop it); else wait (backpressure: the socket is not read meanwhile),
        and if the connection or the actor is cancelled during that wait, keep trying for a
        second, shielded, so what was decoded still reaches the normalizer."""
        try:
            self.out.send_nowait(batch)
            return
        except anyio.WouldBlock:
            pass
        self.reading_blocked = True
        try:
            await self.out.send(batch)
        except anyio.get_cancelled_exc_class():
            with anyio.move_on_after(1.0, shield=True):
                await self.out.send(batch)
            raise
        finally:
            self.reading_blocked = False

    # ----------------------------------------------------------------- status and sessions

    async def _send_session_event(self, event: SessionEnded) -> None:
        with (
            anyio.move_on_after(1.0),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
        ):
            await self.out.send([event])

    def _publish(self, *, changed: bool = False) -> None:
        c = self.counters
        self.ctx.set_info(
            changed=changed,
            connection=self.connection_state,
            subscriptions=len(self.plan.items),
            frames_total=c.frames_total,
            malformed_total=c.malformed_total,
            errors_total=c.errors_total,
            reconnects=c.reconnects,
            accounts=list(self.accounts),
        )

    async def _publish_loop(self) -> None:
        while True:
            await anyio.sleep(PUBLISH_INTERVAL_S)
            self._publish()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for a failed task group: a FatalError if any, else the first
    that is not a cancellation (the supervisor restarts on it)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for exc in leaves:
        if isinstance(exc, FatalError):
            return exc
    cancelled = anyio.get_cancelled_exc_class()
    return next((e for e in leaves if not isinstance(e, cancelled)), leaves[0])


def _describe_close(exc: ConnectionClosed) -> str:
    if exc.rcvd is None:
        return "dropped: no close frame"
    return f"closed {exc.rcvd.code} {exc.rcvd.reason}".strip()
