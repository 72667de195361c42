"""A local IBKR Client Portal gateway: REST under ``/v1/api`` and the ``/v1/api/ws`` WebSocket.

One aiohttp server serves both on one port (plain HTTP on loopback by default, TLS when given a
certificate), as the real gateway does. Wire facts follow ``reference/ibkr-cp-websocket.md``;
where that reference is uncertain, both readings are accepted or selectable (:class:`IbkrOptions`).

REST (``/v1/api``): ``POST /tickle``, ``GET|POST /iserver/auth/status``,
``POST /iserver/auth/ssodh/init``, ``POST /iserver/reauthenticate``, ``GET /iserver/accounts``,
``GET /portfolio/accounts``, ``GET /portfolio/{acct}/positions/{page}`` (100 a page),
``GET /portfolio/{acct}/position/{conid}``, ``POST /portfolio/{acct}/positions/invalidate``,
``GET /trsrv/secdef?conids=..`` (at most 200), ``GET /iserver/marketdata/snapshot?conids=..&fields=..``
(at most 100 conids, 50 fields; the first call per conid is the pre-flight and carries no data),
``GET /sso/validate``, ``POST /logout``.
Every REST request keeps the session alive; without any for ``session_timeout_s`` the brokerage
session becomes unauthenticated (``sts`` with ``authenticated:false`` on every socket, data stops)
until ``POST /iserver/auth/ssodh/init`` (or ``/iserver/reauthenticate``).

WebSocket: authentication by the ``api`` cookie (``api=<id>`` or ``api={"session":"<id>"}``), the
``x-sess-uuid`` cookie, an ``oauth_token``/``sessionToken`` query parameter, or, without any of
those, by ``{"session":"<id>"}`` after ``{"message":"waiting for session"}``. On connect:
``system``, ``act``, ``sts``; then ``{"topic":"system","hb":<ms>}`` every ``hb_interval_s``.
``tic`` is answered ``tic_replies`` times. ``smd+<conid>[@EXCH]+{"fields":[..]}`` sends a full
frame at once, then frames with the changed fields only, at the times given by
:mod:`simulator.schedule`; a subscription ends silently after ``subscription_ttl_s`` unless
``smd`` is sent again. ``umd+<conid>+{}`` stops it silently.

Simulator-only field: every ``smd`` frame carries ``"_seq"``, an integer, the per-contract sequence
number recorded in the market ledger (:meth:`simulator.market.Market.ledger`, broker ``"ibkr"``).
A repeated first frame (``duplicate_first_frame``) repeats its ``_seq``. Corruption faults
(malformed, truncated, unknown topic, huge frame, wrong types, NaN, bad UTF-8) *add* a corrupt
frame and never swallow a sequence number.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import secrets
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import orjson
import structlog
from aiohttp import WSMsgType, web

from normalize.symbology import format_strike
from simulator.faults import Fault, FaultController
from simulator.market import Market, SimContract, SimPosition, Tick
from simulator.schedule import UpdateSchedule

log = structlog.get_logger("simulator.ibkr")

BROKER = "ibkr"
SEQ_FIELD = "_seq"
PAGE_SIZE = 100
SECDEF_MAX_CONIDS = 200
SNAPSHOT_MAX_CONIDS = 100
SNAPSHOT_MAX_FIELDS = 50
SERVER_NAME = "JifZ11074"
SERVER_VERSION = "Build 10.45.1a, Apr 28, 2026 4:11:09 PM"
GREEK_FIELDS = frozenset({"7308", "7309", "7310", "7311", "7633"})
DEFAULT_FIELDS = ("31", "84", "86")
STRAY_MARK = "\u2122"  # a trademark sign: sent as the lone byte 0x99 (cp1252) when stray_bytes is on
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


@dataclass(frozen=True, slots=True)
class IbkrOptions:
    """Behaviour knobs of the gateway (the defaults are the documented behaviour)."""

    hb_interval_s: float = 10.0
    subscription_ttl_s: float = 600.0  # smd expires after this; the 2026 changelog says 10 min
    session_timeout_s: float = 360.0  # brokerage session ends without REST requests this long
    ws_idle_timeout_s: float | None = None  # drop (no close frame) a socket silent this long
    tic_replies: int = 1  # the real gateway was seen answering 4 times
    binary_frames: bool = False  # send JSON in binary frames (some clients see this)
    duplicate_first_frame: bool = False
    greeks_delay_s: float = 0.0  # Greeks and IV missing for this long after subscribing
    last_prefix: str = ""  # "C" (prior close) or "H" (halted) before field 31
    iv_format: str = "percent"  # 7633: "percent" ("18.52"), "percent_sign" ("18.52%"), "fraction"
    availability: str = "RpB"  # field 6509
    sts_fragments: bool = True  # unauthenticated sts as fragments (ibind #25) or one message
    close_on_unauthenticated: bool = False  # also close sockets when the session is lost
    max_subscriptions: int | None = None  # market data lines; beyond: no data
    compress: bool = False  # offer permessage-deflate when the client asks for it
    strike_as_string: bool = True  # positions/secdef "strike" as documented ("440")
    username: str = "SIMUSER"
    session_id: str | None = None  # default: random 32 hex
    rate_hz: float | None = None  # default: the market's rate
    burstiness: float | None = None  # default: the market's burstiness
    certfile: str | None = None  # serve TLS with this certificate chain...
    keyfile: str | None = None  # ...and key
    ssl_context: ssl.SSLContext | None = None  # or this context
    session_message_required: bool = False  # ignore handshake cookies: ask for {"session": ..}
    reject_conids: frozenset[int] = frozenset()  # smd for these is answered with an error
    stray_bytes: bool = False  # a non-UTF-8 byte (0x99, as seen live) in a name field of smd frames
    sparse_positions: bool = False  # positions rows without contract details (secdef has them)
    retry_after: str = "1"  # Retry-After of the RATE_LIMITED fault's 429 answers


# --------------------------------------------------------------------------- pure formatting


def fmt_price(value: float) -> str:
    return f"{value:.2f}"


def fmt_greek(value: float) -> str:
    """About four significant digits, never in exponent form: ``"0.5321"``, ``"0.001234"``."""
    if value == 0.0 or not math.isfinite(value):
        return "0"
    decimals = min(max(3, 3 - math.floor(math.log10(abs(value)))), 10)
    return f"{value:.{decimals}f}"


def fmt_volume(value: float) -> str:
    """IBKR's volume format: ``"870"``, ``"10.2K"``, ``"24.2M"``."""
    if value < 1_000:
        return str(int(value))
    if value < 1_000_000:
        return f"{value / 1_000:.1f}K"
    return f"{value / 1_000_000:.1f}M"


def fmt_iv(iv: float, style: str) -> str:
    if style == "fraction":
        return f"{iv:.4f}"
    if style == "percent_sign":
        return f"{iv * 100:.2f}%"
    return f"{iv * 100:.2f}"


def ibkr_mark(bid: float, ask: float, last: float) -> float:
    """Field 7635: ask if ask < last, bid if bid > last, else last."""
    if ask < last:
        return ask
    if bid > last:
        return bid
    return last


def market_fields(
    contract: SimContract,
    tick: Tick,
    *,
    prior_close: float,
    underlying_conid: int,
    underlying_iv: float,
    options: IbkrOptions,
    with_greeks: bool,
) -> dict[str, Any]:
    """Every field the simulator can serve for one contract at one tick (strings, as IBKR)."""
    salt = contract.conid
    change = tick.last - prior_close
    out: dict[str, Any] = {
        "31": f"{options.last_prefix}{fmt_price(tick.last)}",
        "55": contract.underlying,
        "82": f"{change:+.2f}",
        "83": round(100.0 * change / prior_close, 2) if prior_close else 0.0,
        "84": fmt_price(tick.bid),
        "85": f"{(salt % 40 + 1) * 100 if contract.asset_class != 'OPT' else salt % 90 + 10:,}",
        "86": fmt_price(tick.ask),
        "87": fmt_volume(tick.volume),
        "87_raw": float(tick.volume),
        "88": f"{(salt % 30 + 2) * 100 if contract.asset_class != 'OPT' else salt % 70 + 5:,}",
        "6008": contract.conid,
        "6070": contract.asset_class,
        "6509": options.availability,
        "7059": str(salt % 9 + 1),
        "7283": f"{underlying_iv * 100:.2f}%",
        "7635": fmt_price(ibkr_mark(tick.bid, tick.ask, tick.last)),
        "7741": fmt_price(prior_close),
        "7295": fmt_price(prior_close),
    }
    if contract.asset_class == "OPT":
        out["6457"] = underlying_conid
        out["201"] = contract.right
        out["7638"] = f"{salt % 20_000 + 100:,}"
        if with_greeks:
            if tick.delta is not None:
                out["7308"] = fmt_greek(tick.delta)
            if tick.gamma is not None:
                out["7309"] = fmt_greek(tick.gamma)
            if tick.theta is not None:
                out["7310"] = fmt_greek(tick.theta)
            if tick.vega is not None:
                out["7311"] = fmt_greek(tick.vega)
            if tick.iv is not None:
                out["7633"] = fmt_iv(tick.iv, options.iv_format)
    else:
        out["7087"] = f"{underlying_iv * 90:.2f}%"
        out["7089"] = f"{salt % 50_000:,}"
    return out


def parse_api_cookie(value: str) -> str:
    """``api`` cookie value -> session id; accepts ``<id>`` and ``{"session":"<id>"}``."""
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = value[1:-1].replace('\\"', '"')
    if value.startswith("{"):
        try:
            decoded = orjson.loads(value)
        except orjson.JSONDecodeError:
            return ""
        session = decoded.get("session") if isinstance(decoded, dict) else None
        return session if isinstance(session, str) else ""
    return value


def parse_cookie_header(header: str) -> dict[str, str]:
    """A lenient ``Cookie`` header parser: JSON values with quotes, colons and spaces survive."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            cookies[name.strip()] = value.strip()
    return cookies


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# --------------------------------------------------------------------------- connections


@dataclass(slots=True)
class _Subscription:
    contract: SimContract
    fields: list[str]
    clock: Any  # schedule.ContractClock
    subscribed_at: float
    expires_at: float
    version: int
    last_sent: dict[str, Any] = field(default_factory=dict)
    full_pending: bool = True


class _Connection:
    def __init__(self, conn_id: int, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.id = conn_id
        self.ws = ws
        self.request = request
        self.authenticated = False
        self.subs: dict[int, _Subscription] = {}
        self.heap: list[tuple[float, int, int]] = []  # (next time, version, conid)
        self.outbox: deque[str] = deque()
        self.wake = asyncio.Event()
        self.server_id = f"q{conn_id % 33}"
        self.last_client_msg = time.time()
        self.next_hb = math.inf
        self.closing = False
        self.close_requested = False
        self._versions = itertools.count(1)

    def push(self, message: dict[str, Any] | str) -> None:
        self.outbox.append(message if isinstance(message, str) else orjson.dumps(message).decode())
        self.wake.set()

    def schedule(self, sub: _Subscription) -> None:
        heapq.heappush(self.heap, (sub.clock.next_time, sub.version, sub.contract.conid))

    def next_version(self) -> int:
        return next(self._versions)


class IbkrGateway:
    """The simulated Client Portal gateway. ``await start()``, use the URLs, ``await stop()``."""

    def __init__(
        self,
        market: Market,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultController | None = None,
        **options: Any,
    ) -> None:
        self.market = market
        self.host = host
        self.port = port
        self.options = IbkrOptions(**options)
        self.faults = faults or FaultController()
        self.session_id = self.options.session_id or secrets.token_hex(16)
        self.authenticated = True
        self.competing = False
        self.last_request_ts = time.time()
        self.schedule = UpdateSchedule(
            rate_hz=self.options.rate_hz if self.options.rate_hz is not None else market.config.rate_hz,
            burstiness=(
                self.options.burstiness if self.options.burstiness is not None else market.config.burstiness
            ),
            seed=market.config.seed,
            rates=dict(market.config.rate_overrides),
        )
        self.stats: dict[str, int] = {"frames": 0, "connections": 0, "rest_requests": 0, "tics": 0}
        self.smd_requests: dict[int, int] = {}  # conid -> smd received (all connections)
        self.umd_requests: dict[int, int] = {}
        self.request_log: list[tuple[float, str, str, int]] = []  # (time, method, path, status)
        self._connections: dict[int, _Connection] = {}
        self._conn_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._monitor_wake = asyncio.Event()
        self._prior_close: dict[str, float] = {}
        self._snapshot_seen: set[int] = set()  # conids whose snapshot pre-flight was made
        self._ssl = self._make_ssl()
        self.faults.add_listener(self._on_fault)

    # ----------------------------------------------------------------------- lifecycle

    def _make_ssl(self) -> ssl.SSLContext | None:
        if self.options.ssl_context is not None:
            return self.options.ssl_context
        if self.options.certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.options.certfile, self.options.keyfile)
            return context
        return None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/api/ws", self._ws_handler)
        r = app.router
        r.add_post("/v1/api/tickle", self._tickle)
        r.add_get("/v1/api/tickle", self._tickle)
        r.add_route("*", "/v1/api/iserver/auth/status", self._auth_status)
        r.add_post("/v1/api/iserver/auth/ssodh/init", self._ssodh_init)
        r.add_post("/v1/api/iserver/reauthenticate", self._reauthenticate)
        r.add_get("/v1/api/iserver/accounts", self._iserver_accounts)
        r.add_get("/v1/api/portfolio/accounts", self._portfolio_accounts)
        r.add_get("/v1/api/portfolio/{acct}/positions/{page}", self._positions)
        r.add_post("/v1/api/portfolio/{acct}/positions/invalidate", self._invalidate)
        r.add_get("/v1/api/portfolio/{acct}/position/{conid}", self._position)
        r.add_get("/v1/api/trsrv/secdef", self._secdef)
        r.add_get("/v1/api/iserver/marketdata/snapshot", self._snapshot)
        r.add_get("/v1/api/sso/validate", self._sso_validate)
        r.add_post("/v1/api/logout", self._logout)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.last_request_ts = time.time()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="ibkr-sim-monitor")
        log.info("simulator_started", broker=BROKER, base_url=self.base_url, ws_url=self.ws_url)

    async def stop(self) -> None:
        self.faults.remove_listener(self._on_fault)
        if self._monitor is not None:
            self._monitor.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        await self.drop_all_connections(close_frame=True, code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("simulator_stopped", broker=BROKER, frames=self.stats["frames"])

    async def __aenter__(self) -> IbkrGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------- URLs

    @property
    def _url_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{self._url_host}:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"{self.base_url}/v1/api"

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self._url_host}:{self.port}/v1/api/ws"

    # ----------------------------------------------------------------------- test helpers

    @property
    def client_count(self) -> int:
        return len(self._connections)

    def subscriptions(self) -> dict[int, set[int]]:
        """Connection id -> subscribed conids."""
        return {cid: set(c.subs) for cid, c in self._connections.items()}

    def subscribed_conids(self) -> set[int]:
        return {conid for c in self._connections.values() for conid in c.subs}

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is checked on every connection/subscription change."""
        with anyio.fail_after(within_s):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def drop_all_connections(self, *, close_frame: bool = True, code: int = 1000) -> None:
        """Close every socket, with a close frame (``code``) or by aborting the TCP connection."""
        for conn in list(self._connections.values()):
            await self._close(conn, close_frame=close_frame, code=code)

    def expire_subscriptions(self) -> None:
        """Make every subscription expire now, as the real gateway does after 10 minutes."""
        now = time.time()
        for conn in self._connections.values():
            for sub in conn.subs.values():
                sub.expires_at = now
            conn.wake.set()

    def expire_session(self, *, reason: str = "expired") -> None:
        """The brokerage session is lost: ``sts`` unauthenticated, data stops."""
        self._set_authenticated(False, reason=reason)

    def set_competing(self, competing: bool = True) -> None:
        """Another login took the brokerage session (competing) or gave it back."""
        self.competing = competing
        for conn in self._connections.values():
            conn.push({"topic": "sts", "args": {"competing": competing}})
        if competing:
            self._set_authenticated(False, reason="competing")

    def seen_seq(self, key: str) -> int:
        return self.market.ledger(BROKER).get((BROKER, key), 0)

    # ----------------------------------------------------------------------- internals

    def _on_fault(self, fault: Fault, injected: bool) -> None:
        for conn in self._connections.values():
            conn.wake.set()
        self._monitor_wake.set()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _set_authenticated(self, authenticated: bool, *, reason: str) -> None:
        if self.authenticated == authenticated:
            return
        self.authenticated = authenticated
        log.info("session_auth_changed", broker=BROKER, authenticated=authenticated, reason=reason)
        for conn in list(self._connections.values()):
            if not authenticated:
                conn.subs.clear()
                conn.heap.clear()
                if self.options.sts_fragments:
                    conn.push({"topic": "sts", "args": {"authenticated": False}})
                    conn.push({"topic": "sts", "args": {"competing": self.competing}})
                    conn.push({"topic": "sts", "args": {"message": ""}})
                else:
                    conn.push({"topic": "sts", "args": self._sts_args()})
                if self.options.close_on_unauthenticated:
                    conn.close_requested = True
            else:
                conn.push({"topic": "sts", "args": self._sts_args()})

    async def _monitor_loop(self) -> None:
        """Session expiry without REST requests, and the UNAUTHENTICATED fault."""
        while True:
            now = time.time()
            if self.faults.consume(Fault.UNAUTHENTICATED, now):
                self._set_authenticated(False, reason="fault")
            if self.authenticated and now - self.last_request_ts > self.options.session_timeout_s:
                self._set_authenticated(False, reason="timeout")
            delay = max(self.last_request_ts + self.options.session_timeout_s - now, 0.0) + 0.01
            with anyio.move_on_after(min(delay, 0.5)):
                await self._monitor_wake.wait()
            self._monitor_wake.clear()

    def _sts_args(self) -> dict[str, Any]:
        return {
            "connected": True,
            "authenticated": self.authenticated,
            "established": self.authenticated,
            "competing": self.competing,
            "message": "",
            "fail": "",
            "serverName": SERVER_NAME,
            "serverVersion": SERVER_VERSION,
            "username": self.options.username,
        }

    def _auth_status_body(self) -> dict[str, Any]:
        return {
            "authenticated": self.authenticated,
            "established": self.authenticated,
            "competing": self.competing,
            "connected": True,
            "message": "",
            "MAC": "06:59:00:00:00:01",
            "serverInfo": {"serverName": SERVER_NAME, "serverVersion": SERVER_VERSION},
            "hardware_info": "30df22d8|06:59:00:00:00:01",
            "fail": "",
        }

    def _act_args(self) -> dict[str, Any]:
        accounts = self.market.accounts(BROKER)
        props = {
            "hasChildAccounts": False,
            "supportsCashQty": True,
            "supportsFractions": True,
            "allowCustomerTime": False,
            "isProp": False,
            "noFXConv": False,
            "liteUnderPro": False,
        }
        return {
            "accounts": accounts,
            "acctProps": {a: dict(props) for a in accounts},
            "aliases": {a: a for a in accounts},
            "allowFeatures": {
                "showGFIS": True,
                "showEUCostReport": False,
                "allowEventContract": True,
                "allowFXConv": True,
                "allowFinancialLens": False,
                "allowMTA": True,
                "allowTypeAhead": True,
                "allowEventTrading": True,
                "snapshotRefreshTimeout": 30,
                "liteUser": False,
                "showWebNews": True,
                "research": True,
                "debugPnl": True,
                "showTaxOpt": True,
                "showImpactDashboard": True,
                "allowDynAccount": False,
                "allowCrypto": False,
                "allowedAssetTypes": "STK,CFD,OPT,FOP,WAR,FUT,BAG,PDC,CASH,IND,BOND,BILL,FUND",
            },
            "chartPeriods": {"STK": ["*"], "OPT": ["2h", "1d", "2d", "1w", "1m"]},
            "groups": [],
            "profiles": [],
            "selectedAccount": accounts[0],
            "serverInfo": {"serverName": SERVER_NAME, "serverVersion": SERVER_VERSION},
            "sessionId": "65f1a2b3.00000042",
            "isFT": False,
            "isPaper": False,
        }

    # ----------------------------------------------------------------------- REST

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        now = time.time()
        if self.faults.consume(Fault.REFUSE, now):
            log.info("request_refused", broker=BROKER, path=request.path)
            return web.Response(status=503, text="Service Unavailable")
        if request.path == "/v1/api/ws":
            return await handler(request)
        if self.faults.consume(Fault.RATE_LIMITED, now):
            log.info("request_rate_limited", broker=BROKER, path=request.path)
            self.request_log.append((now, request.method, request.path, 429))
            return web.Response(
                status=429, text="Too Many Requests", headers={"Retry-After": self.options.retry_after}
            )
        self.stats["rest_requests"] += 1
        self.last_request_ts = now
        response = await handler(request)
        self.request_log.append((now, request.method, request.path, response.status))
        return response

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")

    async def _tickle(self, request: web.Request) -> web.Response:
        now = time.time()
        body = {
            "session": self.session_id,
            "ssoExpires": int((self.options.session_timeout_s) * 1000),
            "collission": False,
            "userId": 12345678,
            "hmds": {"error": "no bridge"},
            "iserver": {"authStatus": self._auth_status_body()},
        }
        response = self._json(body)
        response.set_cookie("x-sess-uuid", self.session_id, path="/v1/api", httponly=True)
        log.debug("tickled", broker=BROKER, ts=now)
        return response

    async def _auth_status(self, request: web.Request) -> web.Response:
        return self._json(self._auth_status_body())

    async def _ssodh_init(self, request: web.Request) -> web.Response:
        compete = True
        if request.can_read_body:
            try:
                body = orjson.loads(await request.read() or b"{}")
                compete = bool(body.get("compete", True)) if isinstance(body, dict) else True
            except orjson.JSONDecodeError:
                return self._json({"error": "invalid json"}, status=400)
        if self.competing and compete:
            self.competing = False
        if not self.competing:
            self._set_authenticated(True, reason="ssodh_init")
        return self._json(
            {
                "authenticated": self.authenticated,
                "connected": True,
                "competing": self.competing,
                "message": "",
            }
        )

    async def _reauthenticate(self, request: web.Request) -> web.Response:
        self.competing = False
        self._set_authenticated(True, reason="reauthenticate")
        return self._json({"message": "triggered"})

    async def _iserver_accounts(self, request: web.Request) -> web.Response:
        if not self.authenticated:
            return self._json({"error": "not authenticated", "statusCode": 401}, status=401)
        return self._json(self._act_args())

    async def _portfolio_accounts(self, request: web.Request) -> web.Response:
        rows = [
            {
                "id": account,
                "PrepaidCrypto-Z": False,
                "PrepaidCrypto-P": False,
                "brokerageAccess": True,
                "accountId": account,
                "accountVan": account,
                "accountTitle": "Simulated Account",
                "displayName": account,
                "accountAlias": None,
                "accountStatus": 1_600_000_000_000,
                "currency": "USD",
                "type": "INDIVIDUAL",
                "tradingType": "STKNOPT",
                "businessType": "IB_PROSERVE",
                "category": "",
                "ibEntity": "IBLLC-US",
                "faclient": False,
                "clearingStatus": "O",
                "covestor": False,
                "noClientTrading": False,
                "trackVirtualFXPortfolio": True,
                "acctCustType": "INDIVIDUAL",
                "parent": {
                    "mmc": [],
                    "accountId": "",
                    "isMParent": False,
                    "isMChild": False,
                    "isMultiplex": False,
                },
                "desc": account,
            }
            for account in self.market.accounts(BROKER)
        ]
        return self._json(rows)

    def _account_positions(self, account: str) -> list[SimPosition]:
        return [p for p in self.market.positions(BROKER) if p.account == account]

    def _strike(self, strike: float | None) -> str | float:
        value = strike or 0.0
        return format_strike(value) if self.options.strike_as_string else value

    def _position_row(self, position: SimPosition, now: float) -> dict[str, Any]:
        c = position.contract
        spec = self.market.specs[c.underlying]
        tick = self.market.peek(c.key, now, broker=BROKER)
        is_option = c.asset_class == "OPT"
        multiplier = c.multiplier if is_option else 1.0
        mkt_value = tick.mark * position.quantity * multiplier
        cost_basis = position.avg_cost * position.quantity * multiplier
        row: dict[str, Any] = {
            "acctId": position.account,
            "conid": c.conid,
            "contractDesc": self._contract_desc(c),
            "position": _num(position.quantity),
            "mktPrice": tick.mark,
            "mktValue": round(mkt_value, 2),
            "currency": "USD",
            "avgCost": round(position.avg_cost * multiplier, 6),
            "avgPrice": position.avg_cost,
            "realizedPnl": 0,
            "unrealizedPnl": round(mkt_value - cost_basis, 2),
            "exchs": None,
            "expiry": f"{c.expiry:%Y%m%d}" if c.expiry else None,
            "putOrCall": c.right,
            "multiplier": _num(c.multiplier) if is_option else 0.0,
            "strike": self._strike(c.strike),
            "exerciseStyle": None,
            "conExchMap": [],
            "assetClass": c.asset_class,
            "undConid": spec.conid if is_option else 0,
            "model": "",
            "listingExchange": spec.listing_exchange if not is_option else "CBOE",
            "countryCode": "US",
            "name": spec.name,
            "lastTradingDay": f"{c.expiry:%Y%m%d}" if c.expiry else None,
            "group": None,
            "sector": None,
            "sectorGroup": None,
            "ticker": c.underlying,
            "type": "ETF" if spec.listing_exchange == "ARCA" and not is_option else "",
            "hasOptions": not is_option,
            "fullName": self._full_name(c),
            "isUS": True,
            "isEventContract": False,
            "pageSize": PAGE_SIZE,
            "time": 26,
            "undComp": spec.name if is_option else None,
            "undSym": c.underlying if is_option else None,
            "crossCurrency": False,
        }
        if self.options.sparse_positions:  # only what secdef can fill in: no OCC, no details
            row["contractDesc"] = c.underlying
            for name in ("expiry", "putOrCall", "strike", "fullName", "lastTradingDay", "multiplier"):
                row.pop(name)
            row["assetClass"] = None
        return row

    @staticmethod
    def _contract_desc(c: SimContract) -> str:
        if c.asset_class != "OPT" or c.expiry is None or c.strike is None:
            return c.key
        month = f"{_MONTHS[c.expiry.month - 1]}{c.expiry.year}"
        return f"{c.underlying:<6} {month} {format_strike(c.strike)} {c.right} [{c.key} {int(c.multiplier)}]"

    @staticmethod
    def _full_name(c: SimContract) -> str:
        if c.asset_class != "OPT" or c.expiry is None or c.strike is None:
            return c.key
        kind = "Call" if c.right == "C" else "Put"
        stamp = f"{c.expiry:%b}{c.expiry.day:02d}'{c.expiry:%y}"
        return f"{c.root} {stamp} {format_strike(c.strike)} {kind}"

    async def _positions(self, request: web.Request) -> web.Response:
        account = request.match_info["acct"]
        if account not in self.market.accounts(BROKER):
            return self._json({"error": f"Account {account} not found"}, status=400)
        try:
            page = int(request.match_info["page"])
        except ValueError:
            return self._json({"error": "invalid page"}, status=400)
        if page < 0:
            return self._json({"error": "invalid page"}, status=400)
        now = time.time()
        chunk = self._account_positions(account)[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        return self._json([self._position_row(p, now) for p in chunk])

    async def _invalidate(self, request: web.Request) -> web.Response:
        return self._json({"message": "success"})

    async def _position(self, request: web.Request) -> web.Response:
        account = request.match_info["acct"]
        try:
            conid = int(request.match_info["conid"])
        except ValueError:
            return self._json({"error": "invalid conid"}, status=400)
        now = time.time()
        rows = [
            self._position_row(p, now) for p in self._account_positions(account) if p.contract.conid == conid
        ]
        return self._json(rows)

    def _secdef_row(self, c: SimContract) -> dict[str, Any]:
        spec = self.market.specs[c.underlying]
        is_option = c.asset_class == "OPT"
        return {
            "conid": c.conid,
            "currency": "USD",
            "time": 13,
            "chineseName": None,
            "allExchanges": "SMART,AMEX,CBOE,ISE,PHLX,NASDAQOM,BOX,ARCA",
            "listingExchange": "CBOE" if is_option else spec.listing_exchange,
            "countryCode": "US",
            "name": spec.name,
            "assetClass": c.asset_class,
            "expiry": f"{c.expiry:%Y%m%d}" if c.expiry else None,
            "lastTradingDay": f"{c.expiry:%Y%m%d}" if c.expiry else None,
            "group": None,
            "putOrCall": c.right,
            "sector": None,
            "sectorGroup": None,
            "strike": self._strike(c.strike),
            "ticker": c.underlying,
            "undConid": spec.conid if is_option else 0,
            "multiplier": _num(c.multiplier) if is_option else 0.0,
            "type": "" if is_option else ("ETF" if spec.listing_exchange == "ARCA" else "COMMON"),
            "hasOptions": not is_option,
            "fullName": self._full_name(c),
            "isUS": True,
            "isEventContract": False,
            "tradingClass": c.root,
            "localSymbol": c.key,
        }

    async def _secdef(self, request: web.Request) -> web.Response:
        raw = request.query.get("conids", "")
        try:
            conids = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            return self._json({"error": "invalid conids"}, status=400)
        if not conids:
            return self._json({"error": "conids required"}, status=400)
        if len(conids) > SECDEF_MAX_CONIDS:
            return self._json({"error": "too many conids (max 200)"}, status=400)
        rows = [self._secdef_row(self.market.by_conid[c]) for c in conids if c in self.market.by_conid]
        return self._json({"secdef": rows})

    async def _snapshot(self, request: web.Request) -> web.Response:
        """``GET /iserver/marketdata/snapshot?conids=1,2&fields=31,84``: one object per conid.

        As documented: at most 100 conids and 50 fields; the first request for a conid is the
        pre-flight and returns only ``conid``/``conidEx``; later ones carry the fields (strings,
        as in ``smd`` frames), ``_updated`` (ms), ``server_id``, ``6119``, ``6509`` and the
        simulator-only ``_seq`` (the last sequence number emitted for the contract)."""
        if not self.authenticated:
            return self._json({"error": "not authenticated", "statusCode": 401}, status=401)
        try:
            conids = [int(x) for x in request.query.get("conids", "").split(",") if x.strip()]
        except ValueError:
            return self._json({"error": "invalid conids"}, status=400)
        fields = [f.strip() for f in request.query.get("fields", "").split(",") if f.strip()]
        if not conids:
            return self._json({"error": "conids required"}, status=400)
        if len(conids) > SNAPSHOT_MAX_CONIDS or len(fields) > SNAPSHOT_MAX_FIELDS:
            return self._json({"error": "too many conids (max 100) or fields (max 50)"}, status=400)
        now = time.time()
        rows: list[dict[str, Any]] = []
        for conid in conids:
            contract = self.market.by_conid.get(conid)
            if contract is None:
                continue
            row: dict[str, Any] = {"conidEx": str(conid), "conid": conid}
            if conid in self._snapshot_seen:
                row.update(self._snapshot_row(contract, fields or list(DEFAULT_FIELDS), now))
            else:
                self._snapshot_seen.add(conid)
            rows.append(row)
        return self._json(rows)

    def _snapshot_row(self, contract: SimContract, fields: list[str], now: float) -> dict[str, Any]:
        """The data part of one snapshot object (a seam: the benchmark feed replays ticks here)."""
        sub = _Subscription(contract, fields, None, now - 3600.0, math.inf, 0)
        values = self._values(sub, self.market.peek(contract.key, now, broker=BROKER), now)
        server_id = "q0"
        return {
            "_updated": int(now * 1000),
            "server_id": server_id,
            "6119": server_id,
            **values,
            SEQ_FIELD: self.seen_seq(contract.key),
        }

    async def _sso_validate(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "USER_ID": 12345678,
                "USER_NAME": self.options.username,
                "RESULT": self.authenticated,
                "AUTH_TIME": int(self.last_request_ts * 1000),
                "EXPIRES": int(self.options.session_timeout_s * 1000),
            }
        )

    async def _logout(self, request: web.Request) -> web.Response:
        self._set_authenticated(False, reason="logout")
        return self._json({"status": True})

    # ----------------------------------------------------------------------- WebSocket

    def _request_session(self, request: web.Request) -> str | None:
        """The session id a handshake carries (cookie or query), or ``None``."""
        if self.options.session_message_required:
            return None
        cookies = parse_cookie_header(request.headers.get("Cookie", ""))
        if "api" in cookies:
            return parse_api_cookie(cookies["api"])
        if "x-sess-uuid" in cookies:
            return cookies["x-sess-uuid"]
        for name in ("oauth_token", "sessionToken"):
            if name in request.query:
                return request.query[name]
        return None

    def _valid_session(self, session: str, now: float) -> bool:
        return session == self.session_id and not self.faults.consume(Fault.BAD_TOKEN, now)

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        session = self._request_session(request)
        if session is not None and not self._valid_session(session, now):
            log.info("ws_rejected", broker=BROKER, reason="bad_session")
            return web.Response(status=401, text="Unauthorized")
        ws = web.WebSocketResponse(
            timeout=2.0, autoping=True, max_msg_size=1 << 20, compress=self.options.compress
        )
        await ws.prepare(request)
        conn = _Connection(next(self._conn_ids), ws, request)
        self._connections[conn.id] = conn
        self.stats["connections"] += 1
        log.info("ws_connected", broker=BROKER, conn=conn.id, cookie_auth=session is not None)
        await self._notify()
        try:
            if session is not None:
                self._on_authenticated(conn, via_message=False)
            else:
                conn.push({"message": "waiting for session"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender, conn, tg.cancel_scope)
                await self._reader(conn)
                tg.cancel_scope.cancel()
        finally:
            self._connections.pop(conn.id, None)
            if not ws.closed and not conn.closing:
                with anyio.CancelScope(shield=True):
                    await ws.close()
            log.info("ws_disconnected", broker=BROKER, conn=conn.id, code=ws.close_code)
            with anyio.CancelScope(shield=True):
                await self._notify()
        return ws

    def _on_authenticated(self, conn: _Connection, *, via_message: bool) -> None:
        conn.authenticated = True
        system = {"topic": "system", "success": self.options.username, "isFT": False, "isPaper": False}
        if via_message:
            conn.push({"topic": "sts", "args": {"authenticated": self.authenticated}})
            conn.push(system)
            conn.push({"topic": "act", "args": self._act_args()})
        else:
            conn.push(system)
            conn.push({"topic": "act", "args": self._act_args()})
            conn.push({"topic": "sts", "args": self._sts_args()})
        conn.next_hb = time.time() + self.options.hb_interval_s

    async def _reader(self, conn: _Connection) -> None:
        async for msg in conn.ws:
            conn.last_client_msg = time.time()
            if msg.type == WSMsgType.TEXT:
                text = msg.data
            elif msg.type == WSMsgType.BINARY:
                text = msg.data.decode("utf-8", errors="replace")
            else:  # ERROR, CLOSE...
                break
            await self._on_client_message(conn, text.strip())

    async def _on_client_message(self, conn: _Connection, text: str) -> None:
        now = time.time()
        if text.startswith("{"):
            try:
                payload = orjson.loads(text)
            except orjson.JSONDecodeError:
                conn.push({"error": "invalid message", "code": 1})
                return
            session = payload.get("session") if isinstance(payload, dict) else None
            if not isinstance(session, str):
                conn.push({"error": f"Topic unknown: {text[:40]}", "code": 1})
                return
            if conn.authenticated:
                return  # cookie auth already in place: nothing to do
            if self._valid_session(session, now):
                self._on_authenticated(conn, via_message=True)
                await self._notify()
            else:
                log.info("ws_rejected", broker=BROKER, conn=conn.id, reason="bad_session_message")
                conn.closing = True
                await conn.ws.close(code=1008, message=b"invalid session")
            return
        topic, _, rest = text.partition("+")
        if topic == "tic":
            self.stats["tics"] += 1
            for _ in range(max(self.options.tic_replies, 1)):
                conn.push(
                    {
                        "topic": "tic",
                        "alive": True,
                        "id": self.session_id,
                        "lastAccessed": int(self.last_request_ts * 1000),
                    }
                )
            return
        if topic == "ech":
            return  # legacy echo heartbeat: accepted, nothing sent back
        if topic in ("smd", "umd") and not conn.authenticated:
            conn.push({"error": "not authenticated", "code": 1})
            return
        if topic == "smd":
            self._subscribe(conn, rest, now)
            await self._notify()
            return
        if topic == "umd":
            target, _, _args = rest.partition("+")
            try:
                conid = int(target.split("@", 1)[0])
            except ValueError:
                return
            self.umd_requests[conid] = self.umd_requests.get(conid, 0) + 1
            if conn.subs.pop(conid, None) is not None:
                log.debug("unsubscribed", broker=BROKER, conn=conn.id, conid=conid)
            await self._notify()
            return
        conn.push({"error": f"Topic unknown: {topic[:40]}", "code": 1})

    def _subscribe(self, conn: _Connection, rest: str, now: float) -> None:
        target, _, args = rest.partition("+")
        try:
            conid = int(target.split("@", 1)[0])
        except ValueError:
            conn.push({"error": f"invalid conid: {target[:40]}", "code": 1})
            return
        fields: list[str] = list(DEFAULT_FIELDS)
        if args:
            try:
                decoded = orjson.loads(args)
            except orjson.JSONDecodeError:
                conn.push({"error": "invalid smd arguments", "code": 1})
                return
            requested = decoded.get("fields") if isinstance(decoded, dict) else None
            if isinstance(requested, list):
                fields = [str(f) for f in requested]
        self.smd_requests[conid] = self.smd_requests.get(conid, 0) + 1
        contract = self.market.by_conid.get(conid)
        if contract is None or conid in self.options.reject_conids:
            conn.push({"topic": f"smd+{conid}", "error": f"Invalid conid {conid}", "code": 1})
            return
        if not self.authenticated:
            return  # brokerage session not authenticated: no data
        limit = self.options.max_subscriptions
        if limit is not None and conid not in conn.subs and len(conn.subs) >= limit:
            log.info("subscription_over_limit", broker=BROKER, conn=conn.id, conid=conid)
            return
        existing = conn.subs.get(conid)
        version = conn.next_version()
        if existing is not None:
            merged = existing.fields + [f for f in fields if f not in existing.fields]
            sub = replace(
                existing,
                fields=merged,
                expires_at=now + self.options.subscription_ttl_s,
                version=version,
                full_pending=True,
            )
            sub.clock.next_time = now
        else:
            clock = self.schedule.clock(contract.key, now, salt=f"{conn.id}")
            clock.next_time = now  # the first full frame goes out at once
            sub = _Subscription(
                contract=contract,
                fields=fields,
                clock=clock,
                subscribed_at=now,
                expires_at=now + self.options.subscription_ttl_s,
                version=version,
            )
        conn.subs[conid] = sub
        conn.schedule(sub)
        conn.wake.set()
        log.debug("subscribed", broker=BROKER, conn=conn.id, conid=conid, fields=len(fields))

    async def _close(self, conn: _Connection, *, close_frame: bool, code: int = 1000) -> None:
        if conn.closing:
            return
        conn.closing = True
        conn.wake.set()
        if close_frame:
            with anyio.CancelScope(shield=True):
                await conn.ws.close(code=code, message=b"simulator closing")
        else:
            transport = conn.request.transport
            if transport is not None:
                transport.abort()

    async def _send(self, conn: _Connection, text: str, now: float) -> None:
        if self.options.binary_frames or self.faults.active(Fault.BINARY_FRAME, now):
            await conn.ws.send_bytes(text.encode())
        elif self.options.stray_bytes and STRAY_MARK in text:
            # a text frame that is not valid UTF-8, as the real gateway sometimes sends
            await conn.ws.send_frame(text.encode().replace(STRAY_MARK.encode(), b"\x99"), WSMsgType.TEXT)
        else:
            await conn.ws.send_str(text)

    async def _sender(self, conn: _Connection, scope: anyio.CancelScope) -> None:
        try:
            await self._send_loop(conn)
        except (ConnectionError, RuntimeError) as exc:  # the socket went away under us
            log.debug("ws_send_failed", broker=BROKER, conn=conn.id, error=str(exc))
        scope.cancel()

    async def _send_loop(self, conn: _Connection) -> None:
        opts = self.options
        while not conn.closing and not conn.ws.closed:
            now = time.time()
            if self.faults.consume(Fault.ABORT, now):
                log.info("fault_applied", broker=BROKER, conn=conn.id, fault="abort")
                await self._close(conn, close_frame=False)
                return
            if self.faults.consume(Fault.DROP, now):
                log.info("fault_applied", broker=BROKER, conn=conn.id, fault="drop")
                await self._close(conn, close_frame=True, code=1011)
                return
            if opts.ws_idle_timeout_s is not None and now - conn.last_client_msg > opts.ws_idle_timeout_s:
                log.info("ws_idle_timeout", broker=BROKER, conn=conn.id)
                await self._close(conn, close_frame=False)
                return
            if self.faults.active(Fault.STALL, now):
                conn.outbox.clear()
                conn.wake.clear()
                with anyio.move_on_after(0.05):
                    await conn.wake.wait()
                continue
            while conn.outbox:
                await self._send(conn, conn.outbox.popleft(), now)
            if conn.close_requested:  # unauthenticated with close_on_unauthenticated
                await self._close(conn, close_frame=True)
                return
            if conn.authenticated and now >= conn.next_hb:
                await self._send(conn, orjson.dumps({"topic": "system", "hb": int(now * 1000)}).decode(), now)
                conn.next_hb += opts.hb_interval_s
                if conn.next_hb <= now:  # fell behind (a stall): keep the cadence from now
                    conn.next_hb = now + opts.hb_interval_s
            await self._emit_due(conn, now)
            wait = conn.next_hb - now if conn.authenticated else 1.0
            if conn.heap:
                wait = min(wait, conn.heap[0][0] - now)
            if conn.subs:
                wait = min(wait, min(s.expires_at for s in conn.subs.values()) - now)
            if opts.ws_idle_timeout_s is not None:
                wait = min(wait, conn.last_client_msg + opts.ws_idle_timeout_s - now)
            conn.wake.clear()
            if conn.outbox:
                continue
            if wait > 0:
                with anyio.move_on_after(wait):
                    await conn.wake.wait()

    async def _emit_due(self, conn: _Connection, now: float) -> None:
        for conid, sub in list(conn.subs.items()):
            if now >= sub.expires_at:
                del conn.subs[conid]
                log.info("subscription_expired", broker=BROKER, conn=conn.id, conid=conid)
                await self._notify()
        heap = conn.heap
        while heap and heap[0][0] <= now:
            _t, version, conid = heapq.heappop(heap)
            due = conn.subs.get(conid)
            if due is None or due.version != version:
                continue  # unsubscribed, expired or re-subscribed since
            if self.authenticated:
                await self._emit(conn, due, now)
            due.clock.advance()
            due.clock.resync(now)
            heapq.heappush(heap, (due.clock.next_time, due.version, conid))

    async def _emit(self, conn: _Connection, sub: _Subscription, now: float) -> None:
        contract = sub.contract
        # `_updated` is whole milliseconds: tick at one, so a frame's time gives its values back
        # exactly (the market model at that instant), as the Tastytrade simulator does.
        tick = self.market.tick(BROKER, contract.key, math.floor(now * 1000.0) / 1000.0)
        values = self._values(sub, tick, now)
        full = sub.full_pending
        frame: dict[str, Any] = {
            "server_id": conn.server_id,
            "conidEx": str(contract.conid),
            "conid": contract.conid,
            "_updated": round(tick.ts * 1000),
            "6119": conn.server_id,
        }
        frame.update({k: v for k, v in values.items() if full or sub.last_sent.get(k) != v})
        if self.options.stray_bytes:
            frame["7051"] = f"{self.market.specs[contract.underlying].name}{STRAY_MARK}"
        frame["topic"] = f"smd+{contract.conid}"
        frame[SEQ_FIELD] = tick.seq
        sub.last_sent.update(values)
        sub.full_pending = False
        text = orjson.dumps(frame).decode()
        await self._corrupt_frames(conn, text, now)
        await self._send(conn, text, now)
        self.stats["frames"] += 1
        if full and self.options.duplicate_first_frame:
            await self._send(conn, text, now)

    async def _corrupt_frames(self, conn: _Connection, text: str, now: float) -> None:
        """Corruption faults *add* a bad frame before the real one, never alter or swallow it."""
        if self.faults.consume(Fault.MALFORMED, now):
            await self._send(conn, '{"topic":"smd+' + text[15:40] + ",,}", now)
        if self.faults.consume(Fault.TRUNCATED, now):
            await self._send(conn, text[: max(len(text) // 2, 1)], now)
        if self.faults.consume(Fault.UNKNOWN_MESSAGE, now):
            await self._send(conn, '{"topic":"zzq","args":{"simulated":true}}', now)
        if self.faults.consume(Fault.HUGE_FRAME, now):
            await self._send(conn, '{"topic":"zzq","pad":"' + "x" * 1_000_000 + '"}', now)
        if self.faults.consume(Fault.WRONG_TYPES, now):
            bad = {"topic": {"smd": 1}, "conid": "not-a-conid", "_updated": [1], "84": {"x": 1}, "31": [2]}
            await self._send(conn, orjson.dumps(bad).decode(), now)
        if self.faults.consume(Fault.NAN_VALUES, now):
            await self._send(conn, '{"topic":"smd+0","conid":0,"_updated":NaN,"84":NaN,"86":Infinity}', now)
        if self.faults.consume(Fault.BAD_UTF8, now) and not conn.ws.closed:
            await conn.ws.send_frame(b'{"topic":"zzq","name":"\xff\xfe\x99"}', WSMsgType.TEXT)

    def _values(self, sub: _Subscription, tick: Tick, now: float) -> dict[str, Any]:
        contract = sub.contract
        underlying = self.market.underlying_contract(contract)
        prior = self._prior_close.get(contract.key)
        if prior is None:
            prior = self.market.peek(contract.key, self.market.start_ts).last
            self._prior_close[contract.key] = prior
        spec = self.market.specs[contract.underlying]
        everything = market_fields(
            contract,
            tick,
            prior_close=prior,
            underlying_conid=underlying.conid,
            underlying_iv=spec.vol,
            options=self.options,
            with_greeks=now >= sub.subscribed_at + self.options.greeks_delay_s,
        )
        values: dict[str, Any] = {"6509": everything["6509"]}
        for f in sub.fields:
            if f in everything:
                values[f] = everything[f]
                if f == "87":
                    values["87_raw"] = everything["87_raw"]
        return values
