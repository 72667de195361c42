"""Tastytrade REST + DXLink simulator.

Two aiohttp servers on loopback (or any host): the REST API (``api_url``; the SDK's
``tastytrade.session.API_URL``) and the DXLink WebSocket (``dxlink_url``, handed out by
``GET /api-quote-tokens`` exactly as the real API does). The DXLink wire logic lives in the pure
:mod:`simulator.dxlink_protocol`; this module only does I/O, the emission schedule and faults.

REST subset (bodies ``{"data": ..., "context": path}``, numbers as strings where the real API
sends strings, errors ``{"error": {"code", "message"}}``):

- ``POST /oauth/token`` (refresh-token grant, as ``tastytrade.Session.refresh`` sends it)
- ``POST /sessions/validate``
- ``GET /api-quote-tokens`` (``token``, ``dxlink-url``, ``level``, ``issued-at``, ``expires-at``)
- ``GET /customers/me/accounts``, ``GET /customers/me/accounts/{n}``
- ``GET /accounts/{n}/positions`` (filters ``symbol``, ``underlying-symbol[]``, ``instrument-type``)
- ``GET /instruments/equities/{symbol}``, ``GET /instruments/equities?symbol[]=``
- ``GET /instruments/equity-options/{occ}``, ``GET /instruments/equity-options?symbol[]=``
- ``GET /option-chains/{symbol}``, ``GET /option-chains/{symbol}/nested``

Every request but ``/oauth/token`` needs ``Authorization: Bearer <access token>`` and a
``User-Agent`` of the form ``product/version`` (the real API answers 401 without it).

Sequence numbers: every emitted update *event* has its own: for each due contract the emitter
calls ``market.tick("tastytrade", key, t)`` once per event type it sends (Greeks, Quote, Trade,
TheoPrice), all at the same ``t`` so they carry the same values, and puts the resulting
per-contract ``seq`` in that event's ``sequence`` field (a field the SDK parses as ``int``; the
real feed puts a within-millisecond counter there), and its low 22 bits in ``index``
(``time<<22`` layout). So each event the client turns into an update is one ``(contract, seq)``
of the market's ledger. Summary has no sequence field; Summary events use ``market.peek`` (no
seq consumed), so the ledger counts only events that carry one. Emission instants are whole
milliseconds (DXLink's time unit), so ``market.peek(key, event.time / 1000)`` gives an event's
values back exactly.

Emission: one task for the server. Each subscribed contract (over every authorized, non-stalled
connection) has a :class:`~simulator.schedule.ContractClock`; every cycle the due updates are
ticked in time order and all due events of one type for one channel go out as one FEED_DATA
message. A new subscription makes its contract due at once (the last-value snapshot).

Faults (:class:`~simulator.faults.FaultController`, applied at run time):
``DROP`` close frame 1001 (one connection per occurrence), ``ABORT`` TCP close without a close
frame, ``STALL`` socket open and nothing sent while active, ``REFUSE`` HTTP 503 for REST requests
and WebSocket handshakes, ``MALFORMED`` a frame that is not JSON, ``TRUNCATED`` a copy of a FEED_DATA
frame cut in half, ``UNKNOWN_MESSAGE`` a message of an unknown type, ``WRONG_VALUE_COUNT`` a COMPACT
FEED_DATA copy with one value missing (corruption faults add a bad frame before the real one, they
never alter or swallow it: every sequence number still arrives intact), ``HUGE_FRAME`` a ~1 MB
FEED_DATA of junk, ``WRONG_TYPES`` FEED_DATA with values of the wrong JSON types, ``NAN_VALUES``
bare ``NaN``/``Infinity`` tokens (not JSON), ``BAD_UTF8`` a text frame that is not UTF-8,
``BAD_TOKEN`` OAuth refresh and DXLink AUTH rejected,
``UNAUTHENTICATED`` REST answers 401 while active and open DXLink connections get AUTH_STATE
UNAUTHORIZED (the client must AUTH again), ``SWITCH_TO_FULL`` an unsolicited FEED_CONFIG to FULL
on every configured channel of a connection, ``BINARY_FRAME`` the next frame goes out binary.

Run-time changes: quote tokens live ``quote_token_ttl_s`` (``expires-at`` says when) and an open
connection whose token has expired gets AUTH_STATE UNAUTHORIZED (``enforce_token_expiry``);
``market.set_positions("tastytrade", ...)`` changes the book the positions endpoint serves;
``positions_body`` (bytes, None by default) is answered instead, as it is, by the positions
endpoint of a known account: a malformed or unexpected body, for the client's error handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import ssl
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import anyio
import structlog
from aiohttp import WSMsgType, web

from normalize.symbology import occ_symbol, streamer_symbol
from simulator.dxlink_protocol import Authorized, DxLinkServerProtocol, Event, Subscribed
from simulator.faults import Fault, FaultController
from simulator.market import Market, SimContract, SimPosition, Tick
from simulator.schedule import ContractClock, UpdateSchedule

log = structlog.get_logger("simulator.tastytrade")

BROKER = "tastytrade"
_INDEX_SEQ_MASK = (1 << 22) - 1
_SUPPORTED = {
    "OPT": frozenset({"Greeks", "Quote", "Trade", "Summary", "TheoPrice"}),
    "STK": frozenset({"Quote", "Trade", "Summary"}),
    "IND": frozenset({"Quote", "Trade", "Summary"}),
}
_CASH_SETTLED_ROOTS = frozenset({"SPX", "SPXW", "NDX", "NDXP", "RUT", "RUTW", "XSP", "VIX"})


# --------------------------------------------------------------------------- pure helpers


def dx_index(time_ms: int, sequence: int) -> int:
    """DXLink ``index`` of a time-series event: ``seconds<<32 | millis<<22 | sequence``."""
    return ((time_ms // 1000) << 32) | ((time_ms % 1000) << 22) | (sequence & _INDEX_SEQ_MASK)


def _num(value: float, places: int = 4) -> str:
    """A number as the API writes it: ``"100"``, ``"288.7"``."""
    text = f"{round(value, places):.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class _DayStats:
    """Per-contract session statistics kept by the emitter (Trade change, Summary OHLC)."""

    prev_close: float
    open: float
    high: float
    low: float
    last: float
    direction: str = "ZERO"

    def update(self, price: float) -> None:
        if price > self.last:
            self.direction = "UP"
        elif price < self.last:
            self.direction = "DOWN"
        self.last = price
        self.high = max(self.high, price)
        self.low = min(self.low, price)


def build_events(
    contract: SimContract, tick: Tick, stats: _DayStats, event_types: Iterable[str]
) -> dict[str, dict[str, object]]:
    """DXLink events (field name -> value) for one tick, for each requested supported type."""
    time_ms = int(tick.ts * 1000)
    day_id = int(tick.ts // 86400)
    salt = zlib.crc32(f"{tick.key}:{tick.seq}".encode())
    is_index = contract.asset_class == "IND"
    exchange = "" if is_index else ("C" if contract.asset_class == "OPT" else "Q")
    size: float | None = None if is_index else float(1 + salt % 50)
    events: dict[str, dict[str, object]] = {}
    for event_type in event_types:
        if event_type == "Greeks":
            events[event_type] = {
                "eventSymbol": contract.streamer_symbol,
                "eventTime": 0,
                "eventFlags": 0,
                "index": dx_index(time_ms, tick.seq),
                "time": time_ms,
                "sequence": tick.seq,
                "price": tick.mark,
                "volatility": tick.iv,
                "delta": tick.delta,
                "gamma": tick.gamma,
                "theta": tick.theta,
                "rho": tick.rho,
                "vega": tick.vega,
            }
        elif event_type == "Quote":
            events[event_type] = {
                "eventSymbol": contract.streamer_symbol,
                "eventTime": 0,
                "sequence": tick.seq,
                "timeNanoPart": 0,
                "bidTime": time_ms,
                "bidExchangeCode": exchange,
                "askTime": time_ms,
                "askExchangeCode": exchange,
                "bidPrice": tick.bid,
                "askPrice": tick.ask,
                "bidSize": size,
                "askSize": None if size is None else float(1 + (salt >> 8) % 50),
            }
        elif event_type == "Trade":
            events[event_type] = {
                "eventSymbol": contract.streamer_symbol,
                "eventTime": 0,
                "time": time_ms,
                "timeNanoPart": 0,
                "sequence": tick.seq,
                "exchangeCode": exchange,
                "dayId": day_id,
                "tickDirection": stats.direction,
                "extendedTradingHours": False,
                "price": tick.last,
                "change": round(tick.last - stats.prev_close, 4),
                "size": None if is_index else 1 + salt % 10,
                "dayVolume": None if is_index else float(tick.volume),
                "dayTurnover": None,
            }
        elif event_type == "Summary":
            events[event_type] = {
                "eventSymbol": contract.streamer_symbol,
                "eventTime": 0,
                "dayId": day_id,
                "dayClosePriceType": "REGULAR",
                "prevDayId": day_id - 1,
                "prevDayClosePriceType": "FINAL",
                "openInterest": 0 if contract.asset_class != "OPT" else 100 + contract.conid % 9900,
                "dayOpenPrice": stats.open,
                "dayHighPrice": stats.high,
                "dayLowPrice": stats.low,
                "dayClosePrice": None,
                "prevDayClosePrice": stats.prev_close,
                "prevDayVolume": None if is_index else float(contract.conid % 100_000),
            }
        elif event_type == "TheoPrice":
            events[event_type] = {
                "eventSymbol": contract.streamer_symbol,
                "eventTime": 0,
                "eventFlags": 0,
                "index": dx_index(time_ms, tick.seq),
                "time": time_ms,
                "sequence": tick.seq,
                "price": tick.mark,
                "underlyingPrice": tick.underlying_price,
                "delta": tick.delta,
                "gamma": tick.gamma,
                "dividend": 0.0,
                "interest": 0.0,
            }
    return events


# --------------------------------------------------------------------------- one connection


class _Connection:
    """The I/O side of one DXLink WebSocket: reader, timer and writer around the pure protocol."""

    def __init__(self, sim: TastytradeSim, ws: web.WebSocketResponse, request: web.Request):
        self.sim = sim
        self.ws = ws
        self.request = request
        self.proto = DxLinkServerProtocol(
            validate_token=sim._validate_quote_token,
            now=time.monotonic(),
            keepalive_timeout=sim.keepalive_timeout,
            keepalive_interval=sim.keepalive_interval,
        )
        self._wake = anyio.Event()
        self._rearm = anyio.Event()
        self.binary_next = False
        self.token: str | None = None  # the quote token this connection authorized with
        self.number = 0  # 1 for the simulator's first connection, 2 for the next...
        self.frames_sent = 0
        self.unsent = 0  # frames taken from the protocol and not yet written

    @property
    def backlog(self) -> int:
        """Frames waiting to be written (a slow reader makes this grow)."""
        return self.proto.backlog + self.unsent

    def wake(self) -> None:
        self._wake.set()

    @property
    def stalled(self) -> bool:
        return self.sim.faults.active(Fault.STALL, time.time())

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timer)
            tg.start_soon(self._writer, tg.cancel_scope)
            await self._reader()
            tg.cancel_scope.cancel()

    async def _reader(self) -> None:
        async for msg in self.ws:
            now = time.monotonic()
            if msg.type == WSMsgType.TEXT:
                self.proto.receive_text(msg.data, now)
            elif msg.type == WSMsgType.BINARY:
                self.proto.receive_binary(now)
            else:  # ERROR (e.g. frame too big: aiohttp already closed with 1009)
                break
            self._rearm.set()
            events = self.proto.events_received()
            if events:
                self.sim._connection_changed(events, self)
            self.wake()
            self.sim.notify()

    async def _timer(self) -> None:
        while True:
            deadline = self.proto.next_deadline()
            if math.isinf(deadline):
                return  # closed: the writer sends what is queued and closes
            with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)):
                await self._rearm.wait()  # input moved the deadlines: recompute
            self._rearm = anyio.Event()
            self.proto.poll(time.monotonic())
            self.wake()

    async def _writer(self, scope: anyio.CancelScope) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            frames = self.proto.data_to_send()
            if self.stalled:
                continue  # socket open, nothing sent
            self.unsent = len(frames)
            try:
                for text in frames:
                    await self._send(text)
                    self.unsent -= 1
            except ConnectionResetError:  # the client went away (or ABORT): the connection is over
                scope.cancel()
                return
            if self.proto.close_code is not None:
                await self.ws.close(code=self.proto.close_code, message=self.proto.close_reason.encode())
                scope.cancel()
                return

    async def _send(self, text: str) -> None:
        faults, now = self.sim.faults, time.time()
        if text.startswith('{"type":"FEED_DATA"'):
            # Corruption faults *add* a bad frame before the real one, never alter or swallow it.
            if faults.consume(Fault.TRUNCATED, now):
                await self.ws.send_str(text[: max(len(text) // 2, 1)])
            if faults.consume(Fault.HUGE_FRAME, now):
                await self.ws.send_str(
                    '{"type":"FEED_DATA","channel":1,"data":["Greeks",[' + '"x",' * 250_000 + "1]]}"
                )
            if faults.consume(Fault.WRONG_TYPES, now):
                await self.ws.send_str('{"type":"FEED_DATA","channel":"one","data":{"Greeks":true}}')
                await self.ws.send_str(
                    '{"type":"FEED_DATA","channel":1,"data":["Greeks",[[1],{"a":2},true]]}'
                )
            if faults.consume(Fault.NAN_VALUES, now):
                await self.ws.send_str('{"type":"FEED_DATA","channel":1,"data":["Greeks",[NaN,Infinity]]}')
            if faults.consume(Fault.BAD_UTF8, now):
                await self.ws.send_frame(b'{"type":"SIM_UNKNOWN","channel":0,"x":"\xff\xfe"}', WSMsgType.TEXT)
        if self.binary_next or faults.consume(Fault.BINARY_FRAME, now):
            self.binary_next = False
            await self.ws.send_bytes(text.encode())
        else:
            await self.ws.send_str(text)
        self.frames_sent += 1

    def apply_faults(self, now: float) -> None:
        """Connection-level faults, checked by the emitter every cycle."""
        faults, mono = self.sim.faults, time.monotonic()
        if faults.consume(Fault.ABORT, now):
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            return
        if faults.consume(Fault.DROP, now):
            self.proto.close(1001, "simulated drop")
            self.wake()
            return
        if faults.consume(Fault.SWITCH_TO_FULL, now):
            self.proto.switch_format("FULL", mono)
        if faults.consume(Fault.UNAUTHENTICATED, now):
            self.proto.deauthorize(mono)
        if self.token is not None and self.proto.authorized and self.sim.enforce_token_expiry:
            expiry = self.sim.quote_token_expiry(self.token)
            if expiry is not None and expiry <= now:
                self.sim.tokens_expired += 1
                self.proto.deauthorize(mono)  # the token ran out: the client must AUTH again
        if faults.consume(Fault.MALFORMED, now):
            self.proto.send_raw('{"type":"FEED_DATA","channel":1,"data":[Greeks, NaN', mono)
        if faults.consume(Fault.UNKNOWN_MESSAGE, now):
            self.proto.send_raw('{"type":"SIM_UNKNOWN","channel":0,"payload":{"x":1}}', mono)
        self.wake()


# --------------------------------------------------------------------------- the simulator


class TastytradeSim:
    """Tastytrade REST API and DXLink WebSocket over a shared :class:`~simulator.market.Market`.

    :param market: the simulated market (shared with the IBKR simulator).
    :param host: interface to bind; ``port`` is the REST port (0 = any), ``dxlink_port`` the
        DXLink port (0 = any).
    :param provider_secret: expected OAuth client secret (``None`` accepts any).
    :param refresh_token: expected refresh token (``None`` accepts any).
    :param access_token_ttl_s: ``expires_in`` of OAuth access tokens.
    :param quote_token_ttl_s: lifetime of API quote tokens (24 h).
    :param keepalive_timeout: DXLink client silence before ``ERROR TIMEOUT`` and close.
    :param keepalive_interval: DXLink server silence before it sends ``KEEPALIVE``.
    :param max_message_size: DXLink frames above this close the socket with 1009.
    :param emit_interval_s: shortest time between two emission cycles.
    :param max_events_per_message: events of one type per FEED_DATA message, at most.
    :param max_backlog_frames: a connection with more unsent frames gets no new updates (and no
        ticks are recorded for it) until its reader catches up.
    :param max_updates_per_cycle: updates ticked in one emission cycle, at most (spread over the
        subscribed contracts), so one cycle never blocks the event loop for long; the rest stay
        due for the next cycle.
    :param ssl_context: serve https/wss with this context.
    :param require_user_agent: answer 401 to REST requests without ``product/version`` UA.
    :param enforce_token_expiry: an open connection whose quote token expires gets AUTH_STATE
        UNAUTHORIZED (what the real server does then is UNCERTAIN; reference §5).
    """

    def __init__(
        self,
        market: Market,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        dxlink_port: int = 0,
        faults: FaultController | None = None,
        schedule: UpdateSchedule | None = None,
        provider_secret: str | None = None,
        refresh_token: str | None = None,
        access_token_ttl_s: float = 900.0,
        quote_token_ttl_s: float = 86400.0,
        keepalive_timeout: float = 60.0,
        keepalive_interval: float = 30.0,
        max_message_size: int = 256 * 1024,
        emit_interval_s: float = 0.01,
        max_events_per_message: int = 500,
        max_backlog_frames: int = 256,
        max_updates_per_cycle: int = 2000,
        ssl_context: ssl.SSLContext | None = None,
        require_user_agent: bool = True,
        user_id: str = "sim-user-0001",
        enforce_token_expiry: bool = True,
    ) -> None:
        self.market = market
        self.host = host
        self.port = port
        self.dxlink_port = dxlink_port
        self.positions_body: bytes | None = None  # answered instead of the positions (module doc)
        self.faults = faults if faults is not None else FaultController()
        cfg = market.config
        self.schedule = schedule or UpdateSchedule(
            rate_hz=cfg.rate_hz,
            burstiness=cfg.burstiness,
            seed=cfg.seed,
            rates=dict(cfg.rate_overrides),
        )
        self.provider_secret = provider_secret
        self.refresh_token = refresh_token
        self.access_token_ttl_s = access_token_ttl_s
        self.quote_token_ttl_s = quote_token_ttl_s
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_interval = keepalive_interval
        self.max_message_size = max_message_size
        self.emit_interval_s = emit_interval_s
        self.max_events_per_message = max_events_per_message
        self.max_backlog_frames = max_backlog_frames
        self.max_updates_per_cycle = max_updates_per_cycle
        self.ssl_context = ssl_context
        self.require_user_agent = require_user_agent
        self.user_id = user_id
        self.enforce_token_expiry = enforce_token_expiry
        self.tokens_expired = 0  # open connections deauthorized because their token expired
        self.quote_tokens_issued = 0
        self.api_url = ""
        self.dxlink_url = ""
        self.connections: set[_Connection] = set()
        self.connections_total = 0
        self._access_tokens: dict[str, float] = {}
        self._quote_tokens: dict[str, float] = {}
        self._clocks: dict[str, ContractClock] = {}
        self._stats: dict[str, _DayStats] = {}
        self._due_now: set[str] = set()
        self._close_prices: dict[str, float] = {}
        self._wake: asyncio.Event | None = None
        self._activity = asyncio.Event()
        self.closed_connections: list[_Connection] = []
        self._emitter: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []
        self.faults.add_listener(self._on_fault)

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind both servers and start emitting; ``api_url``/``dxlink_url`` are then set."""
        rest = web.Application(middlewares=[self._middleware])
        rest.add_routes(
            [
                web.post("/oauth/token", self._oauth_token),
                web.post("/sessions/validate", self._validate_session),
                web.get("/api-quote-tokens", self._quote_token),
                web.get("/customers/me/accounts", self._accounts),
                web.get("/customers/me/accounts/{account}", self._account),
                web.get("/accounts/{account}/positions", self._positions),
                web.get("/instruments/equities", self._equities),
                web.get("/instruments/equities/{symbol}", self._equity),
                web.get("/instruments/equity-options", self._options),
                web.get("/instruments/equity-options/{symbol}", self._option),
                web.get("/option-chains/{symbol}", self._chain),
                web.get("/option-chains/{symbol}/nested", self._nested_chain),
            ]
        )
        ws_app = web.Application()
        ws_app.add_routes([web.get("/realtime", self._dxlink), web.get("/", self._dxlink)])
        scheme = "https" if self.ssl_context else "http"
        ws_scheme = "wss" if self.ssl_context else "ws"
        rest_port = await self._serve(rest, self.port)
        ws_port = await self._serve(ws_app, self.dxlink_port)
        self.port, self.dxlink_port = rest_port, ws_port
        self.api_url = f"{scheme}://{self.host}:{rest_port}"
        self.dxlink_url = f"{ws_scheme}://{self.host}:{ws_port}/realtime"
        self._wake = asyncio.Event()
        self._emitter = asyncio.create_task(self._emit_loop(), name="tastytrade-sim-emitter")
        log.info("simulator_started", broker=BROKER, api_url=self.api_url, dxlink_url=self.dxlink_url)

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port, ssl_context=self.ssl_context)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        sockets = server.sockets  # type: ignore[attr-defined]  # asyncio's and uvloop's Server
        return int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close every connection and both servers."""
        if self._emitter is not None:
            self._emitter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._emitter
            self._emitter = None
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"server shutdown")
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.faults.remove_listener(self._on_fault)
        log.info("simulator_stopped", broker=BROKER)

    async def __aenter__(self) -> TastytradeSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_fault(self, fault: Fault, injected: bool) -> None:
        if self._wake is not None:
            self._wake.set()

    # ----------------------------------------------------------------------- tokens

    def issue_access_token(self) -> str:
        token = "sim-access-" + secrets.token_urlsafe(16)
        self._access_tokens[token] = time.time() + self.access_token_ttl_s
        return token

    def issue_quote_token(self) -> str:
        token = "sim-quote-" + secrets.token_urlsafe(24)
        self._quote_tokens[token] = time.time() + self.quote_token_ttl_s
        self.quote_tokens_issued += 1
        return token

    def quote_token_expiry(self, token: str) -> float | None:
        """POSIX expiry of a quote token this simulator issued (``None``: unknown token)."""
        return self._quote_tokens.get(token)

    def _validate_quote_token(self, token: str) -> str | None:
        now = time.time()
        if self.faults.consume(Fault.BAD_TOKEN, now):
            return None
        expiry = self._quote_tokens.get(token)
        if expiry is None or expiry <= now:
            return None
        return self.user_id

    # ----------------------------------------------------------------------- REST plumbing

    def _ok(self, request: web.Request, data: object, **extra: object) -> web.Response:
        return web.json_response({"data": data, "context": request.path, **extra})

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        now = time.time()
        if self.faults.consume(Fault.REFUSE, now):
            return self._error(503, "service_unavailable", "Service temporarily unavailable")
        if request.path != "/oauth/token":
            agent = request.headers.get("User-Agent", "")
            if self.require_user_agent and "/" not in agent:
                return self._error(401, "invalid_user_agent", "A User-Agent is required")
            auth = request.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            expiry = self._access_tokens.get(token)
            if expiry is None or expiry <= now or self.faults.active(Fault.UNAUTHENTICATED, now):
                return self._error(401, "unauthorized", "This session is invalid or has expired")
        response: web.StreamResponse = await handler(request)
        return response

    # ----------------------------------------------------------------------- REST handlers

    async def _oauth_token(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "invalid_request", "The body is not valid JSON")
        if not isinstance(body, dict) or body.get("grant_type") != "refresh_token":
            return self._error(400, "unsupported_grant_type", "Only refresh_token is supported")
        secret, refresh = body.get("client_secret"), body.get("refresh_token")
        if (
            not secret
            or not refresh
            or (self.provider_secret is not None and secret != self.provider_secret)
            or (self.refresh_token is not None and refresh != self.refresh_token)
            or self.faults.consume(Fault.BAD_TOKEN, time.time())
        ):
            return self._error(401, "invalid_grant", "Invalid refresh token or client secret")
        token = self.issue_access_token()
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.access_token_ttl_s),
            }
        )

    async def _validate_session(self, request: web.Request) -> web.Response:
        return web.json_response({"data": {"external-id": self.user_id}, "context": request.path}, status=201)

    async def _quote_token(self, request: web.Request) -> web.Response:
        now = time.time()
        return self._ok(
            request,
            {
                "token": self.issue_quote_token(),
                "dxlink-url": self.dxlink_url,
                "level": "api",
                "issued-at": _iso(now),
                "expires-at": _iso(now + self.quote_token_ttl_s),
            },
        )

    def _account_json(self, number: str) -> dict[str, object]:
        opened = _iso(self.market.start_ts - 400 * 86400)
        return {
            "account-number": number,
            "external-id": f"A{zlib.crc32(number.encode()):010d}",
            "opened-at": opened,
            "nickname": "Individual",
            "account-type-name": "Individual",
            "day-trader-status": False,
            "is-closed": False,
            "is-firm-error": False,
            "is-firm-proprietary": False,
            "is-futures-approved": True,
            "is-test-drive": False,
            "margin-or-cash": "Margin",
            "is-foreign": False,
            "investment-objective": "SPECULATION",
            "suitable-options-level": "No Restrictions",
            "created-at": opened,
        }

    async def _accounts(self, request: web.Request) -> web.Response:
        items = [
            {"account": self._account_json(n), "authority-level": "owner"}
            for n in self.market.accounts(BROKER)
        ]
        return self._ok(request, {"items": items})

    async def _account(self, request: web.Request) -> web.Response:
        number = request.match_info["account"]
        if number not in self.market.accounts(BROKER):
            return self._error(404, "record_not_found", f"Account {number} not found")
        return self._ok(request, self._account_json(number))

    def _close_price(self, key: str) -> float:
        price = self._close_prices.get(key)
        if price is None:
            price = self.market.peek(key, self.market.start_ts).mark
            self._close_prices[key] = price
        return price

    def _position_json(self, pos: SimPosition) -> dict[str, object]:
        c = pos.contract
        created = _iso(self.market.start_ts - 30 * 86400)
        direction = "Long" if pos.quantity > 0 else "Short" if pos.quantity < 0 else "Zero"
        close = self._close_price(c.key)
        day = datetime.fromtimestamp(self.market.start_ts, UTC).date().isoformat()
        item: dict[str, object] = {
            "account-number": pos.account,
            "symbol": c.key,
            "instrument-type": "Equity Option" if c.asset_class == "OPT" else "Equity",
            "underlying-symbol": c.underlying,
            "quantity": _num(abs(pos.quantity)),
            "quantity-direction": direction,
            "close-price": _num(close),
            "average-open-price": _num(pos.avg_cost),
            "average-yearly-market-close-price": _num(pos.avg_cost),
            "average-daily-market-close-price": _num(close),
            "multiplier": int(c.multiplier),
            "cost-effect": "Debit" if pos.quantity > 0 else "Credit",
            "is-suppressed": False,
            "is-frozen": False,
            "restricted-quantity": "0",
            "realized-day-gain": "0",
            "realized-day-gain-effect": "None",
            "realized-day-gain-date": day,
            "realized-today": "0",
            "realized-today-effect": "None",
            "realized-today-date": day,
            "created-at": created,
            "updated-at": _iso(self.market.start_ts),
        }
        expiry_ts = self.market.expiry_ts(c)
        if expiry_ts is not None:
            item["expires-at"] = _iso(expiry_ts)
        return item

    async def _positions(self, request: web.Request) -> web.Response:
        number = request.match_info["account"]
        if number not in self.market.accounts(BROKER):
            return self._error(404, "record_not_found", f"Account {number} not found")
        if self.positions_body is not None:
            return web.Response(body=self.positions_body, content_type="application/json")
        query = request.query
        symbol = query.get("symbol")
        underlyings = set(query.getall("underlying-symbol[]", []))
        instrument_type = query.get("instrument-type")
        items = []
        for pos in self.market.positions(BROKER):
            item = self._position_json(pos)
            if pos.account != number:
                continue
            if symbol is not None and item["symbol"] != symbol:
                continue
            if underlyings and pos.contract.underlying not in underlyings:
                continue
            if instrument_type is not None and item["instrument-type"] != instrument_type:
                continue
            if query.get("include-marks") == "true":
                item["mark"] = _num(self.market.peek(pos.contract.key, time.time()).mark)
                item["mark-price"] = item["mark"]
            items.append(item)
        return self._ok(request, {"items": items})

    # instruments

    def _all_options(self) -> dict[str, SimContract]:
        options = {c.key: c for c in self.market.universe}
        options.update({k: c for k, c in self.market.contracts.items() if c.asset_class == "OPT"})
        return options

    def _equity_json(self, contract: SimContract) -> dict[str, object]:
        spec = self.market.specs.get(contract.key)
        is_index = contract.asset_class == "IND"
        return {
            "id": contract.conid,
            "symbol": contract.key,
            "instrument-type": "Equity",
            "cusip": None,
            "short-description": spec.name if spec else contract.key,
            "is-index": is_index,
            "listed-market": "" if is_index else (spec.listing_exchange if spec else "XNAS"),
            "description": spec.name if spec else contract.key,
            "lendability": "Easy To Borrow",
            "borrow-rate": "0.0",
            "market-time-instrument-collection": "Cash Settled Equity Option" if is_index else "Equity",
            "is-closing-only": False,
            "is-options-closing-only": False,
            "active": True,
            "is-fractional-quantity-eligible": not is_index,
            "is-illiquid": False,
            "is-etf": contract.key in ("SPY", "QQQ", "IWM", "DIA"),
            "streamer-symbol": contract.streamer_symbol,
            "tick-sizes": [{"value": "0.0001", "threshold": "1.0"}, {"value": "0.01"}],
            "option-tick-sizes": [
                {"value": "0.01", "threshold": "3.0"},
                {"value": "0.05"},
            ],
        }

    def _equity_contract(self, symbol: str) -> SimContract | None:
        contract = self.market.contracts.get(symbol)
        if contract is None or contract.asset_class == "OPT":
            return None
        return contract

    async def _equity(self, request: web.Request) -> web.Response:
        contract = self._equity_contract(request.match_info["symbol"])
        if contract is None:
            return self._error(404, "record_not_found", "Equity not found")
        return self._ok(request, self._equity_json(contract))

    async def _equities(self, request: web.Request) -> web.Response:
        symbols = request.query.getall("symbol[]", [])
        items = [self._equity_json(c) for s in symbols if (c := self._equity_contract(s)) is not None]
        return self._ok(request, {"items": items}, pagination=_pagination(len(items)))

    def _option_json(self, c: SimContract) -> dict[str, object]:
        assert c.expiry is not None
        assert c.strike is not None
        assert c.right is not None
        expiry_ts = self.market.expiry_ts(c) or _expiry_ts_default(c.expiry)
        cash = c.root in _CASH_SETTLED_ROOTS
        weekly = c.root.endswith("W") or c.expiry.day > 21 or c.expiry.day < 15
        return {
            "symbol": c.key,
            "instrument-type": "Equity Option",
            "active": True,
            "strike-price": _num(c.strike, 3),
            "root-symbol": c.root,
            "underlying-symbol": c.underlying,
            "expiration-date": c.expiry.isoformat(),
            "exercise-style": "European" if cash else "American",
            "shares-per-contract": int(c.multiplier),
            "option-type": c.right,
            "option-chain-type": "Standard",
            "expiration-type": "Weekly" if weekly else "Regular",
            "settlement-type": "PM",
            "stops-trading-at": _iso(expiry_ts),
            "market-time-instrument-collection": "Cash Settled Equity Option" if cash else "Equity Option",
            "days-to-expiration": max((c.expiry - _today()).days, 0),
            "expires-at": _iso(expiry_ts),
            "is-closing-only": False,
            "listed-market": "XCBO" if cash else "XNAS",
            "streamer-symbol": c.streamer_symbol,
        }

    async def _option(self, request: web.Request) -> web.Response:
        contract = self._all_options().get(request.match_info["symbol"])
        if contract is None:
            return self._error(404, "record_not_found", "Equity option not found")
        return self._ok(request, self._option_json(contract))

    async def _options(self, request: web.Request) -> web.Response:
        options = self._all_options()
        symbols = request.query.getall("symbol[]", [])
        items = [self._option_json(options[s]) for s in symbols if s in options]
        return self._ok(request, {"items": items}, pagination=_pagination(len(items)))

    def _chain_contracts(self, symbol: str) -> list[SimContract]:
        options = self._all_options().values()
        return sorted(
            (c for c in options if c.underlying == symbol or c.root == symbol),
            key=lambda c: (c.root, c.expiry, c.strike, c.right),
        )

    async def _chain(self, request: web.Request) -> web.Response:
        contracts = self._chain_contracts(request.match_info["symbol"])
        if not contracts:
            return self._error(404, "record_not_found", "Option chain not found")
        return self._ok(request, {"items": [self._option_json(c) for c in contracts]})

    async def _nested_chain(self, request: web.Request) -> web.Response:
        contracts = self._chain_contracts(request.match_info["symbol"])
        if not contracts:
            return self._error(404, "record_not_found", "Option chain not found")
        by_root: dict[str, dict[date, dict[float, dict[str, SimContract]]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        for c in contracts:
            assert c.expiry is not None
            assert c.strike is not None
            assert c.right is not None
            by_root[c.root][c.expiry].setdefault(c.strike, {})[c.right] = c
        items = []
        for root, expiries in by_root.items():
            underlying = next(c.underlying for c in contracts if c.root == root)
            expirations = []
            for expiry, strikes in sorted(expiries.items()):
                rows = []
                for strike, sides in sorted(strikes.items()):
                    row: dict[str, object] = {"strike-price": _num(strike, 3)}
                    for right, name in (("C", "call"), ("P", "put")):
                        side = sides.get(right)
                        if side is not None:
                            row[name] = side.key
                            row[f"{name}-streamer-symbol"] = side.streamer_symbol
                        else:  # the other side of a listed strike exists on a real chain
                            row[name] = occ_symbol(root, expiry, right, strike)
                            row[f"{name}-streamer-symbol"] = streamer_symbol(root, expiry, right, strike)
                    rows.append(row)
                expirations.append(
                    {
                        "expiration-type": "Weekly" if root.endswith("W") else "Regular",
                        "expiration-date": expiry.isoformat(),
                        "days-to-expiration": max((expiry - _today()).days, 0),
                        "settlement-type": "PM",
                        "strikes": rows,
                    }
                )
            items.append(
                {
                    "underlying-symbol": underlying,
                    "root-symbol": root,
                    "option-chain-type": "Standard",
                    "shares-per-contract": 100,
                    "tick-sizes": [{"value": "0.01", "threshold": "3.0"}, {"value": "0.05"}],
                    "deliverables": [],
                    "expirations": expirations,
                }
            )
        return self._ok(request, {"items": items})

    # ----------------------------------------------------------------------- DXLink

    async def _dxlink(self, request: web.Request) -> web.StreamResponse:
        if self.faults.consume(Fault.REFUSE, time.time()):
            return self._error(503, "service_unavailable", "Service temporarily unavailable")
        # no permessage-deflate: compressing large FEED_DATA frames costs more than sending them
        ws = web.WebSocketResponse(max_msg_size=self.max_message_size, autoping=True, compress=False)
        await ws.prepare(request)
        conn = _Connection(self, ws, request)
        self.connections.add(conn)
        self.connections_total += 1
        conn.number = self.connections_total
        log.info("dxlink_connected", connections=len(self.connections))
        self.notify()
        try:
            await conn.run()
        finally:
            conn.proto.connection_lost()
            self.connections.discard(conn)
            self.closed_connections.append(conn)
            self.notify()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            log.info("dxlink_disconnected", code=ws.close_code, frames_sent=conn.frames_sent)
        return ws

    def _connection_changed(self, events: list[Event], conn: _Connection) -> None:
        """A connection (re)authorized or changed subscriptions: new items are due at once."""
        for event in events:
            if isinstance(event, Authorized):
                conn.token = event.token
            elif isinstance(event, Subscribed):
                for _event_type, symbol in event.items:
                    contract = self.market.by_streamer.get(symbol)
                    if contract is not None:
                        self._due_now.add(contract.key)
        if self._wake is not None:
            self._wake.set()

    def _targets(self) -> dict[str, list[tuple[_Connection, int, str]]]:
        """Contract key -> (connection, channel, event type) for every live subscription."""
        targets: dict[str, list[tuple[_Connection, int, str]]] = defaultdict(list)
        by_streamer = self.market.by_streamer
        for conn in self.connections:
            proto = conn.proto
            if not proto.authorized or proto.close_code is not None or conn.stalled:
                continue
            if conn.backlog > self.max_backlog_frames:
                continue  # a slow reader: no updates for it until it catches up (no unbounded queue)
            for (event_type, symbol), channels in conn.proto.subscriptions().items():
                contract = by_streamer.get(symbol)
                if contract is None or event_type not in _SUPPORTED.get(contract.asset_class, ()):
                    continue  # unknown symbols and unsupported types: silence, as the real feed
                for channel in channels:
                    targets[contract.key].append((conn, channel, event_type))
        return targets

    def emit_once(self, now: float) -> float:
        """One emission cycle at ``now`` (POSIX s): tick every due contract, queue FEED_DATA.

        Returns the time of the next scheduled update (``inf`` when nothing is subscribed).
        """
        for conn in list(self.connections):
            conn.apply_faults(now)
        targets = self._targets()
        due: list[tuple[float, str]] = []
        next_time = math.inf
        for key in targets:
            clock = self._clocks.get(key)
            if clock is None:
                clock = self._clocks[key] = self.schedule.clock(key, now, salt=BROKER)
            clock.resync(now)
            if key in self._due_now:
                due.append((now, key))
            budget = max(self.max_updates_per_cycle // len(targets), 1)
            while clock.next_time <= now and budget > 0:
                budget -= 1
                due.append((clock.next_time, key))
                clock.advance()
            next_time = min(next_time, clock.next_time)
        self._due_now.clear()
        due.sort()
        batches: dict[tuple[_Connection, int, str], list[dict[str, object]]] = defaultdict(list)
        market = self.market
        for due_ts, key in due:
            # DXLink times are whole milliseconds: tick at one, so an event's `time` is the exact
            # instant of its values (market.peek(key, time / 1000) gives them back)
            ts = math.floor(due_ts * 1000.0) / 1000.0
            contract = market.contracts[key]
            subs = targets[key]
            types = sorted({t for _, _, t in subs})
            # one seq per event type sent: each event is its own update (same instant, same values)
            sequenced = [t for t in types if t != "Summary"]
            ticks = dict(zip(sequenced, market.ticks(BROKER, key, ts, len(sequenced)), strict=True))
            if len(sequenced) < len(types):
                ticks["Summary"] = market.peek(key, ts, BROKER)
            first = next(iter(ticks.values()))
            stats = self._stats.get(key)
            if stats is None:
                ref = self._close_price(key) if contract.asset_class != "IND" else first.last
                stats = self._stats[key] = _DayStats(ref, first.last, first.last, first.last, ref)
            stats.update(first.last)
            events = {t: build_events(contract, tick, stats, (t,))[t] for t, tick in ticks.items()}
            for conn, channel, event_type in subs:
                batches[(conn, channel, event_type)].append(events[event_type])
        touched: set[_Connection] = set()
        mono = time.monotonic()
        for (conn, channel, event_type), events_list in batches.items():
            step = self.max_events_per_message
            for start in range(0, len(events_list), step):
                chunk = events_list[start : start + step]
                if self.faults.consume(Fault.WRONG_VALUE_COUNT, now):  # a bad copy first
                    conn.proto.feed_data(channel, event_type, chunk, mono, drop_values=1)
                conn.proto.feed_data(channel, event_type, chunk, mono)
            touched.add(conn)
        for conn in touched:
            conn.wake()
        return next_time

    async def _emit_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                next_time = self.emit_once(time.time())
            except Exception:  # one bad cycle must not stop the feed
                log.exception("tastytrade_sim_emit_failed")
                next_time = time.time() + 1.0
            delay = min(max(next_time - time.time(), self.emit_interval_s), 1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self.emit_interval_s > 0:
                await asyncio.sleep(0)  # let readers run between bursts

    # ----------------------------------------------------------------------- test helpers

    def notify(self) -> None:
        """Wake :meth:`wait_until` callers (a client message arrived, a connection came or went)."""
        self._activity.set()
        self._activity = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Wait until ``predicate()`` is true, re-checking on every client message and connection
        change (no polling); bound it with ``anyio.fail_after``."""
        while not predicate():
            await self._activity.wait()

    def send_to_clients(self, text: str) -> int:
        """Queue a raw text frame on every authorized open connection (e.g. an informational
        ERROR); returns how many got it."""
        sent = 0
        for conn in list(self.connections):
            if conn.proto.authorized:
                conn.proto.send_raw(text, time.monotonic())
                conn.wake()
                sent += 1
        return sent

    def all_connections(self) -> list[_Connection]:
        """Every connection so far, oldest first."""
        return sorted([*self.closed_connections, *self.connections], key=lambda c: c.number)

    def subscribed_symbols(self) -> set[tuple[str, str]]:
        """Every ``(event type, symbol)`` subscribed on any connection."""
        return {key for conn in self.connections for key in conn.proto.subscriptions()}


def _pagination(count: int) -> dict[str, object]:
    return {
        "per-page": max(count, 1),
        "page-offset": 0,
        "item-offset": 0,
        "total-items": count,
        "total-pages": 1,
        "current-item-count": count,
        "previous-link": None,
        "next-link": None,
        "paging-link-template": None,
    }


def _today() -> date:
    return datetime.now(UTC).date()


def _expiry_ts_default(expiry: date) -> float:
    return datetime(expiry.year, expiry.month, expiry.day, 21, tzinfo=UTC).timestamp()
