"""The IBKR actor: REST start-up, then one Client Portal WebSocket session, as a thin loop.

One attempt (one call of the run function) is one gateway session and one WebSocket connection:

1. REST (:mod:`actors.ibkr.rest`): ``/tickle``, accounts, every positions page, secdef for rows
   lacking details -> one :class:`~normalize.events.PositionsSnapshot` on ``raw``.
2. Subscription plan (:func:`~actors.ibkr.protocol.plan_subscriptions`): every option position
   and each underlying, one subscription per conid, options first within
   ``IBKR_MAX_SUBSCRIPTIONS`` (the rest counted in ``subscriptions_left_out`` and logged).
3. WebSocket (``websockets``): the ``api`` cookie on the upgrade (and ``{"session":..}`` when the
   server asks for it); after ``sts`` says authenticated, a
   :class:`~normalize.events.SessionStarted` and the ``smd``s. Each frame: decode
   (:class:`~actors.ibkr.protocol.IbkrProtocol`) -> map (:mod:`normalize.ibkr`) -> at most one
   ``await send(list)`` on ``raw``. Counters per frame, nothing logged per frame.
4. Side tasks: timers (``tic``, ``smd`` renewals, the heartbeat check), ``/tickle`` every
   ``IBKR_TICKLE_INTERVAL_S``, a positions refresh every ``IBKR_POSITIONS_REFRESH_S`` (new
   snapshot, ``smd`` for new conids, ``umd`` for closed ones), status keys twice a second.

Any end of the connection ends the attempt with a :class:`~supervisor.errors.TransientError`
(closed or dropped socket, no heartbeat for ``IBKR_HB_TIMEOUT_S``, ``sts`` unauthenticated or
competing after asking ``/iserver/auth/ssodh/init`` to reopen the session, network and TLS
failures) and a :class:`~normalize.events.SessionEnded` with the reason; the supervisor restarts
the actor with backoff, which reconnects from scratch and resubscribes everything (the gateway
keeps nothing across connections). Only bad configuration is a
:class:`~supervisor.errors.FatalError`. Counters that outlive attempts (``frames_total``,
``malformed_total``, ``errors_total``, ``reconnects``) and the REST rate limiter live in the
closure of :func:`make_ibkr_actor`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from actors.ibkr.protocol import (
    AccountsMessage,
    Authenticated,
    IbkrEvent,
    IbkrProtocol,
    IbkrProtocolError,
    MarketData,
    Notice,
    ServerError,
    Stale,
    SubscriptionError,
    SubscriptionPlan,
    Unauthenticated,
    UnknownMessage,
    WaitingForSession,
    plan_subscriptions,
    session_from_cookie,
)
from actors.ibkr.rest import (
    TLS_HINT,
    IbkrRest,
    RateLimiter,
    TlsVerificationError,
    client_ssl_context,
    fetch_positions,
    is_certificate_error,
    start_session,
)
from config.settings import IbkrSettings
from normalize.events import BrokerEvent, PositionsSnapshot, SessionEnded, SessionStarted
from normalize.ibkr import IvScale, instrument_update
from supervisor.context import ActorContext
from supervisor.errors import FatalError, TransientError
from supervisor.spec import RunFn

BROKER = "ibkr"
STATUS_EVERY_S = 0.5
MAX_FRAME_BYTES = 4 << 20
MAX_QUEUED_FRAMES = 1024
OPEN_TIMEOUT_S = 10.0
PING_INTERVAL_S = 30.0  # websocket-level pings: a half-open TCP connection is noticed too
EXCERPT_CHARS = 200


class LogThrottle:
    """True for the first ``first`` calls, then for every ``every``-th (rate-limited logging)."""

    def __init__(self, first: int = 10, every: int = 1000) -> None:
        self.first = first
        self.every = every
        self.count = 0

    def __call__(self) -> bool:
        self.count += 1
        return self.count <= self.first or self.count % self.every == 0


@dataclass(slots=True)
class Counters:
    """Per actor, across attempts (they survive restarts)."""

    attempts: int = 0
    reconnects: int = 0
    frames_total: int = 0
    malformed_total: int = 0
    errors_total: int = 0
    updates_total: int = 0


def make_ibkr_actor(
    settings: IbkrSettings,
    *,
    mode: str,
    clock: Callable[[], float] = time.time,
    broker: str = BROKER,
) -> RunFn:
    """The IBKR actor's run function (see the module docstring).

    Raises:
        FatalError: ``settings`` name no gateway, or an unknown IV scale.
    """
    if settings.rest_url is None or settings.websocket_url is None:
        raise FatalError("IBKR_GATEWAY_URL: no gateway to connect to")
    try:
        iv_scale = IvScale(settings.iv_scale)
    except ValueError:
        raise FatalError(f"IBKR_IV_SCALE: unknown scale {settings.iv_scale!r}") from None
    shared = _Shared(
        settings=settings,
        mode=mode,
        clock=clock,
        broker=broker,
        iv_scale=iv_scale,
        counters=Counters(),
        limiter=RateLimiter(10, 1.0),
        malformed_log=LogThrottle(),
        error_log=LogThrottle(),
        unknown_topics=set(),
    )

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        shared.counters.attempts += 1
        if shared.counters.attempts > 1:
            shared.counters.reconnects += 1
        await _Attempt(shared, ctx, task_status).run()

    return run


@dataclass(slots=True)
class _Shared:
    settings: IbkrSettings
    mode: str
    clock: Callable[[], float]
    broker: str
    iv_scale: IvScale
    counters: Counters
    limiter: RateLimiter
    malformed_log: LogThrottle
    error_log: LogThrottle
    unknown_topics: set[str]


def _close_text(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "without a close frame"
    return f"{frame.code}" + (f" ({frame.reason})" if frame.reason else "")


class _Attempt:
    """One gateway session and one WebSocket connection."""

    def __init__(self, shared: _Shared, ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.ctx = ctx
        self.log = ctx.log
        self.task_status = task_status
        self.clock = shared.clock
        self.counters = shared.counters
        self.out = ctx.senders["raw"]
        self.connection = "connecting"
        self.accounts: tuple[str, ...] = ()
        self.keys: dict[int, str] = {}  # conid -> canonical key (updated in place)
        self.plan = SubscriptionPlan({}, 0, 0, ())
        self.rest: IbkrRest | None = None
        self.ws: ClientConnection | None = None
        self.proto: IbkrProtocol | None = None
        self.session_id: str | None = None  # the gateway session (never logged)
        self.stream_id: str | None = None  # the SessionStarted id, once sent
        self.stream_events = 0
        self.blocked = False  # the reader waits on a full raw channel
        self.stale_check_skipped = False
        self.ending: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self._left_out_logged: int | None = None

    # ----------------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        s = self.settings
        assert s.rest_url is not None
        self.publish(changed=True)
        ca_file = str(s.ca_file) if s.ca_file else None
        rest_tls = client_ssl_context(s.rest_url, verify=s.verify_tls, ca_file=ca_file)
        ws_tls = client_ssl_context(s.websocket_url or "", verify=s.verify_tls, ca_file=ca_file)
        if (rest_tls is not None or ws_tls is not None) and not s.verify_tls:
            self.log.warning(
                "tls_verification_disabled",
                setting="IBKR_VERIFY_TLS=false",
                detail="the gateway's certificate is not verified",
            )
        try:
            async with IbkrRest(
                s.rest_url, ssl_context=rest_tls, limiter=self.shared.limiter, log=self.log
            ) as rest:
                self.rest = rest
                gateway = await start_session(rest, s.accounts, self.log)
                self.accounts = gateway.accounts
                self.session_id = gateway.session
                self.log.info(
                    "gateway_session_started", accounts=list(gateway.accounts), reported=len(gateway.reported)
                )
                await self.load_positions(refresh=False)
                await self.stream()
        except TlsVerificationError as exc:
            self.log.error("tls_verification_failed", url=s.base_url, detail=TLS_HINT, error=str(exc))
            raise
        finally:
            self.connection = "disconnected"
            self.publish(changed=True)

    async def stream(self) -> None:
        s = self.settings
        url = s.websocket_url
        assert url is not None
        known = s.session_cookie.get() if s.session_cookie else None
        cookie = known.strip().removeprefix("api=") if known else self.session_id
        session = session_from_cookie(known) if known else self.session_id
        kwargs: dict[str, Any] = {
            "additional_headers": {"Cookie": f"api={cookie}"} if cookie else {},
            "open_timeout": OPEN_TIMEOUT_S,
            "ping_interval": PING_INTERVAL_S,
            "ping_timeout": PING_INTERVAL_S,
            "close_timeout": 2.0,
            "max_size": MAX_FRAME_BYTES,
            # Frames buffered before reading from the socket pauses (TCP backpressure reaches the
            # gateway). Above websockets' 16, so that the close handshake at shutdown is not stuck
            # behind a paused transport while ticks keep arriving.
            "max_queue": MAX_QUEUED_FRAMES,
            "proxy": None,
        }
        ws_tls = client_ssl_context(url, verify=s.verify_tls, ca_file=str(s.ca_file) if s.ca_file else None)
        if ws_tls is not None:
            kwargs["ssl"] = ws_tls
        parts = urlsplit(url)
        host = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'wss' else 80)}"
        try:
            ws = await connect(url, **kwargs)
        except InvalidStatus as exc:
            raise TransientError(f"websocket handshake refused: HTTP {exc.response.status_code}") from exc
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
            if is_certificate_error(exc):
                raise TlsVerificationError(
                    f"websocket {url}: certificate verification failed: {exc}"
                ) from exc
            raise TransientError(f"websocket connect to {host} failed: {type(exc).__name__}: {exc}") from exc
        self.ws = ws
        now = self.clock()
        proto = self.proto = IbkrProtocol(
            session=session,
            now=now,
            tic_interval_s=s.tic_interval_s,
            hb_timeout_s=s.hb_timeout_s,
            resubscribe_s=s.resubscribe_s,
        )
        proto.set_subscriptions(self.plan.wanted, now)
        self.log.info("ws_connected", host=host, attempt=self.counters.attempts, cookie_auth=bool(cookie))
        try:
            async with anyio.create_task_group() as tg:
                self.scope = tg.cancel_scope
                for task in (self._timers, self._keepalive, self._refresher, self._publisher):
                    tg.start_soon(self._guarded, task)
                await self._guarded(self._reader)
        finally:
            reason = "stopped" if self.ending is None else str(self.ending)
            with anyio.CancelScope(shield=True):
                await ws.close()
                if self.stream_id is not None:
                    await self._send_quietly(
                        [
                            SessionEnded(
                                self.shared.broker, self.stream_id, self.clock(), reason, self.stream_events
                            )
                        ]
                    )
            self.log.info(
                "ws_closed",
                reason=reason,
                updates=self.stream_events,
                frames=proto.frames,
                duplicate_frames=proto.duplicate_frames,
                seconds=round(self.clock() - now, 3),
            )
        if self.ending is not None:
            raise self.ending

    async def _guarded(self, task: Callable[[], Any]) -> None:
        """Run a task of the connection; the first one to fail ends the connection."""
        try:
            await task()
        except Exception as exc:
            if self.ending is None:
                self.ending = exc
            if self.scope is not None:
                self.scope.cancel()

    # ----------------------------------------------------------------------- hot path

    async def _reader(self) -> None:
        ws, proto, counters, keys = self.ws, self.proto, self.counters, self.keys
        assert ws is not None
        assert proto is not None
        out, clock, record = self.out, self.clock, self.ctx.record_events
        iv_scale, broker = self.shared.iv_scale, self.shared.broker
        while True:
            try:
                data = await ws.recv(decode=False)  # bytes for text and binary frames: no UTF-8 check
            except ConnectionClosed as exc:
                raise TransientError(f"websocket closed {_close_text(exc)}") from exc
            now = clock()
            counters.frames_total += 1
            try:
                proto.receive_text(data, now)
            except IbkrProtocolError as exc:
                self._malformed(data, exc)
                continue
            batch: list[BrokerEvent] | None = None
            for event in proto.events_received():
                if type(event) is MarketData:
                    key = keys.get(event.conid)
                    if key is None:
                        continue
                    update = instrument_update(
                        key,
                        event.fields,
                        updated_ms=event.updated_ms,
                        seq=event.seq,
                        received_ts=now,
                        iv_scale=iv_scale,
                        broker=broker,
                    )
                    if batch is None:
                        batch = [update]
                    else:
                        batch.append(update)
                else:
                    await self._on_event(event, now)
            if batch is not None:
                # At once when there is room: no event-loop round per frame (one contract per
                # frame); else wait (backpressure: the socket is not read meanwhile).
                try:
                    out.send_nowait(batch)
                except anyio.WouldBlock:
                    self.blocked = True
                    await out.send(batch)
                    self.blocked = False
                if self.stale_check_skipped:
                    self.stale_check_skipped = False
                    proto.backpressure_ended(clock())
                n = len(batch)
                counters.updates_total += n
                self.stream_events += n
                record(n)
            if proto.has_data_to_send:
                await self._flush()

    def _malformed(self, data: str | bytes, exc: IbkrProtocolError) -> None:
        self.counters.malformed_total += 1
        if self.shared.malformed_log():
            self.log.warning(
                "frame_malformed",
                error=str(exc),
                frame=self._excerpt(data),
                malformed_total=self.counters.malformed_total,
            )

    def _excerpt(self, data: str | bytes) -> str:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        text = text[:EXCERPT_CHARS]
        if self.session_id:
            text = text.replace(self.session_id, "[REDACTED]")
        return text

    # ----------------------------------------------------------------------- rare events

    async def _on_event(self, event: IbkrEvent, now: float) -> None:
        if isinstance(event, Authenticated):
            await self._on_authenticated(event, now)
        elif isinstance(event, Unauthenticated):
            await self._on_unauthenticated(event)
        elif isinstance(event, SubscriptionError | ServerError):
            self.counters.errors_total += 1
            if self.shared.error_log():
                conid = event.conid if isinstance(event, SubscriptionError) else None
                self.log.warning(
                    "subscription_error" if isinstance(event, SubscriptionError) else "server_error",
                    conid=conid,
                    message=event.message[:EXCERPT_CHARS],
                    code=event.code,
                    errors_total=self.counters.errors_total,
                )
        elif isinstance(event, WaitingForSession):
            self.log.info("ws_session_requested", answered=self.session_id is not None)
        elif isinstance(event, AccountsMessage):
            missing = [a for a in self.accounts if event.accounts and a not in event.accounts]
            if missing:
                self.log.warning("accounts_missing_from_act", missing=missing)
        elif isinstance(event, Notice):
            if self.shared.error_log():
                self.log.info("gateway_notice", topic=event.topic, text=event.text[:EXCERPT_CHARS])
        elif isinstance(event, UnknownMessage) and event.topic not in self.shared.unknown_topics:
            self.shared.unknown_topics.add(event.topic)
            self.log.info("unknown_message", topic=event.topic[:40])

    async def _on_authenticated(self, event: Authenticated, now: float) -> None:
        self.stream_id = uuid.uuid4().hex
        url = urlsplit(self.settings.websocket_url or "")
        host = f"{url.hostname}:{url.port or (443 if url.scheme == 'wss' else 80)}"
        await self.out.send(
            [SessionStarted(self.shared.broker, self.stream_id, self.accounts, host, self.shared.mode, now)]
        )
        self.connection = "connected"
        self.publish(changed=True)
        self.log.info(
            "subscriptions_sent",
            subscriptions=event.subscriptions,
            options=self.plan.options,
            underlyings=self.plan.underlyings,
            left_out=len(self.plan.left_out),
        )
        self.task_status.started()

    async def _on_unauthenticated(self, event: Unauthenticated) -> None:
        self.log.warning(
            "session_unauthenticated",
            reason=event.reason,
            detail="requesting POST /iserver/auth/ssodh/init, then reconnecting",
        )
        assert self.rest is not None
        try:
            await self.rest.ssodh_init()
        except TransientError as exc:
            self.log.warning("reauthentication_failed", error=str(exc))
        raise TransientError(f"brokerage session {event.reason}; reauthentication requested")

    # ----------------------------------------------------------------------- side tasks

    async def _timers(self) -> None:
        proto = self.proto
        assert proto is not None
        renewed = 0
        while True:
            delay = proto.next_deadline() - self.clock()
            await anyio.sleep(max(min(delay, 1.0), 0.05 if self.blocked else 0.0))
            blocked = self.blocked
            proto.on_timer(self.clock(), check_stale=not blocked)
            if blocked:
                self.stale_check_skipped = True
            for event in proto.events_received():
                if isinstance(event, Stale):
                    self.log.warning(
                        "heartbeat_stale", reason=event.reason, silent_s=round(event.silent_s, 3)
                    )
                    raise TransientError(f"stale: {event.reason}")
            if proto.resubscribed > renewed:
                self.log.info("subscriptions_renewed", count=proto.resubscribed - renewed)
                renewed = proto.resubscribed
            await self._flush()

    async def _keepalive(self) -> None:
        assert self.rest is not None
        while True:
            await anyio.sleep(self.settings.tickle_interval_s)
            try:
                await self.rest.tickle()
            except TransientError as exc:
                self.log.warning("tickle_failed", error=str(exc))

    async def _refresher(self) -> None:
        proto = self.proto
        assert proto is not None
        while True:
            await anyio.sleep(self.settings.positions_refresh_s)
            try:
                await self.load_positions(refresh=True)
            except FatalError:
                raise
            except TransientError as exc:
                self.log.warning("positions_refresh_failed", error=str(exc))
                continue
            subscribed, unsubscribed = proto.set_subscriptions(self.plan.wanted, self.clock())
            if subscribed or unsubscribed:
                self.log.info(
                    "subscriptions_changed",
                    subscribed=len(subscribed),
                    unsubscribed=len(unsubscribed),
                    subscriptions=proto.subscriptions,
                )
            await self._flush()

    async def _publisher(self) -> None:
        while True:
            self.publish()
            await anyio.sleep(STATUS_EVERY_S)

    # ----------------------------------------------------------------------- helpers

    async def load_positions(self, *, refresh: bool) -> None:
        """Fetch and map every position, emit the snapshot, plan the subscriptions."""
        assert self.rest is not None
        fetched = await fetch_positions(self.rest, self.accounts, refresh=refresh)
        mapped = fetched.mapped
        keys: dict[int, str] = dict(mapped.underlyings)
        keys.update((conid, c.key) for conid, c in mapped.contracts.items())
        options = [conid for conid, c in mapped.contracts.items() if c.is_option]
        plan = plan_subscriptions(options, mapped.underlyings, self.settings.max_subscriptions)
        snapshot = PositionsSnapshot(self.shared.broker, self.accounts, mapped.positions, self.clock())
        await self.out.send([snapshot])
        self.keys.clear()
        self.keys.update(keys)
        self.plan = plan
        self.log.info(
            "positions_loaded",
            refresh=refresh,
            accounts=len(self.accounts),
            positions=len(mapped.positions),
            options=len(options),
            underlyings=len(mapped.underlyings),
            rows=fetched.rows,
            pages=fetched.pages,
            secdef_lookups=fetched.secdef_lookups,
        )
        if mapped.skipped:
            self.log.warning("positions_skipped", by_reason=mapped.skipped)
        if plan.left_out and len(plan.left_out) != self._left_out_logged:
            left_options = sum(
                1 for c in plan.left_out if c in mapped.contracts and mapped.contracts[c].is_option
            )
            self.log.warning(
                "subscriptions_over_limit",
                limit=self.settings.max_subscriptions,
                left_out=len(plan.left_out),
                options_left_out=left_options,
                detail="raise IBKR_MAX_SUBSCRIPTIONS if the account has more market data lines",
            )
        self._left_out_logged = len(plan.left_out)

    async def _flush(self) -> None:
        if self.ws is None or self.proto is None:
            return
        for message in self.proto.data_to_send():
            await self.ws.send(message)

    async def _send_quietly(self, events: list[BrokerEvent]) -> None:
        """Send at shutdown without waiting long or failing when the consumer is gone."""
        try:
            self.out.send_nowait(events)
        except anyio.WouldBlock:
            with anyio.move_on_after(1.0):
                try:
                    await self.out.send(events)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def publish(self, *, changed: bool = False) -> None:
        proto = self.proto
        c = self.counters
        last_hb = proto.last_hb_at if proto is not None else None
        info: Mapping[str, Any] = {
            "connection": self.connection,
            "subscriptions": proto.subscriptions
            if proto is not None and self.connection == "connected"
            else 0,
            "subscriptions_left_out": len(self.plan.left_out),
            "frames_total": c.frames_total,
            "malformed_total": c.malformed_total,
            "errors_total": c.errors_total,
            "reconnects": c.reconnects,
            "last_hb_age_s": None if last_hb is None else round(max(self.clock() - last_hb, 0.0), 3),
            "accounts": list(self.accounts),
        }
        self.ctx.set_info(changed=changed, **info)
