"""The Client Portal REST calls the IBKR actor makes, through aiohttp.

Start-up (:func:`start_session`): ``POST /tickle`` (the session id, and a keepalive),
``GET /iserver/accounts``, ``GET /portfolio/accounts`` (required before other ``/portfolio``
calls); positions (:func:`fetch_positions`): every page of ``GET /portfolio/{acct}/positions/{n}``
(100 a page) until a short page, then ``GET /trsrv/secdef`` (200 conids a call) for the rows that
lack contract details, mapped by the pure :mod:`normalize.ibkr`.

Pacing: :class:`RateLimiter` keeps every request of the actor (all its attempts share one) at
most ``rate`` in any one-second window: the gateway allows 10 requests/s. An HTTP 429 pauses every
request for ``Retry-After`` (seconds or an HTTP date; exponential when absent) and retries.

Errors: network failures, timeouts, HTTP 5xx and unexpected answers raise
:class:`~supervisor.errors.TransientError` (the supervisor restarts the actor); a certificate that
fails verification raises :class:`TlsVerificationError` (transient too, with the setting to
change); HTTP 401/403 raise :class:`NotAuthenticated`.
"""

from __future__ import annotations

import email.utils
import ssl
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson

from actors.steps import MAP_STEP_ROWS, finish_in_steps
from normalize.ibkr import MappedPositions, lacking_secdef_steps, map_positions_steps
from supervisor.errors import FatalError, TransientError

PAGE_SIZE = 100
SECDEF_MAX_CONIDS = 200
MAX_PAGES = 1000  # a gateway that never returns a short page cannot loop us forever
MAX_RATE_LIMIT_RETRIES = 8
TLS_HINT = (
    "set IBKR_CA_FILE to the gateway's CA certificate (PEM), or IBKR_VERIFY_TLS=false to skip "
    "verification (not recommended)"
)


class RestError(TransientError):
    """An HTTP error answer (``status``) or an answer of an unexpected shape."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotAuthenticated(RestError):
    """HTTP 401/403: the brokerage session is not authenticated."""


class TlsVerificationError(TransientError):
    """The gateway's certificate failed verification; the message names the setting to use."""


def client_ssl_context(url: str, *, verify: bool, ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (``None`` for plain ``http``/``ws``): verification on by
    default, against ``ca_file`` when given; ``verify=False`` checks neither chain nor host."""
    if urlsplit(url).scheme not in ("https", "wss"):
        return None
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


def is_certificate_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a failed certificate verification."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError | aiohttp.ClientConnectorCertificateError):
            return True
        current = current.__cause__ or current.__context__
    return False


class RateLimiter:
    """At most ``rate`` acquisitions in any ``per_s`` window, and a shared pause after a 429."""

    def __init__(self, rate: int = 10, per_s: float = 1.0) -> None:
        self.rate = rate
        self.per_s = per_s
        self._times: deque[float] = deque()
        self._paused_until = 0.0
        self.waits = 0  # acquisitions that had to wait (for the benchmarks and tests)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, anyio.current_time() + seconds)

    async def acquire(self) -> None:
        waited = False
        while True:
            now = anyio.current_time()
            if now < self._paused_until:
                waited = True
                await anyio.sleep(self._paused_until - now)
                continue
            times = self._times
            while times and now - times[0] >= self.per_s:
                times.popleft()
            if len(times) < self.rate:
                times.append(now)
                self.waits += waited
                return
            waited = True
            await anyio.sleep(times[0] + self.per_s - now)


def retry_after_s(header: str | None, attempt: int, *, now: float | None = None) -> float:
    """Seconds to wait after a 429: ``Retry-After`` as seconds or an HTTP date, else 1, 2, 4... s
    (at most 60)."""
    if header:
        text = header.strip()
        try:
            return max(float(text), 0.0)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(when.timestamp() - (time.time() if now is None else now), 0.0)
    return float(min(2**attempt, 60))


class IbkrRest:
    """One aiohttp session against ``rest_url`` (``https://host:5000/v1/api``)."""

    def __init__(
        self,
        rest_url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        limiter: RateLimiter,
        log: Any,
        timeout_s: float = 15.0,
    ) -> None:
        self.rest_url = rest_url.rstrip("/")
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._limiter = limiter
        self._log = log
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self.requests = 0
        self.rate_limited = 0

    async def __aenter__(self) -> IbkrRest:
        self._http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # the gateway is usually an IP address
            timeout=self._timeout,
            headers={"Accept": "application/json"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            with anyio.CancelScope(shield=True):
                await self._http.close()
            self._http = None

    async def request(self, method: str, path: str, *, json: Any = None, params: Any = None) -> Any:
        """One call, paced and retried after 429s; the decoded JSON answer (``None`` if empty)."""
        assert self._http is not None, "use IbkrRest as an async context manager"
        url = self.rest_url + path
        for attempt in range(MAX_RATE_LIMIT_RETRIES + 1):
            await self._limiter.acquire()
            self.requests += 1
            try:
                async with self._http.request(method, url, json=json, params=params, ssl=self._ssl) as r:
                    if r.status == 429:
                        delay = retry_after_s(r.headers.get("Retry-After"), attempt)
                        self.rate_limited += 1
                        self._limiter.pause(delay)
                        self._log.warning(
                            "rest_rate_limited", path=path, retry_after_s=round(delay, 3), attempt=attempt + 1
                        )
                        continue
                    body = await r.read()
                    status = r.status
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TlsVerificationError(
                    f"{method} {path}: certificate verification failed: {exc}"
                ) from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if is_certificate_error(exc):
                    raise TlsVerificationError(f"{method} {path}: certificate verification failed") from exc
                raise TransientError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if status in (401, 403):
                raise NotAuthenticated(f"{method} {path}: HTTP {status}", status)
            if status >= 400:
                raise RestError(f"{method} {path}: HTTP {status}: {body[:200]!r}", status)
            if not body.strip():
                return None
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RestError(f"{method} {path}: answer is not JSON: {body[:200]!r}", status) from None
        raise RestError(f"{method} {path}: still rate limited after {MAX_RATE_LIMIT_RETRIES} retries", 429)

    # ----------------------------------------------------------------------- endpoints

    async def tickle(self) -> dict[str, Any]:
        return _expect_dict(await self.request("POST", "/tickle"), "/tickle")

    async def ssodh_init(self) -> dict[str, Any]:
        """Ask the gateway to (re)open the brokerage session, taking it over from another login."""
        answer = await self.request(
            "POST", "/iserver/auth/ssodh/init", json={"publish": True, "compete": True}
        )
        return answer if isinstance(answer, dict) else {}

    async def iserver_accounts(self) -> dict[str, Any]:
        return _expect_dict(await self.request("GET", "/iserver/accounts"), "/iserver/accounts")

    async def portfolio_accounts(self) -> list[dict[str, Any]]:
        answer = await self.request("GET", "/portfolio/accounts")
        if not isinstance(answer, list):
            raise RestError("/portfolio/accounts: expected a list")
        return [a for a in answer if isinstance(a, dict)]

    async def invalidate_positions(self, account: str) -> None:
        await self.request("POST", f"/portfolio/{account}/positions/invalidate")

    async def positions_page(self, account: str, page: int) -> list[dict[str, Any]]:
        answer = await self.request("GET", f"/portfolio/{account}/positions/{page}")
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise RestError(f"/portfolio/{account}/positions/{page}: expected a list")
        return [row for row in answer if isinstance(row, dict)]

    async def all_positions(self, account: str) -> tuple[list[dict[str, Any]], int]:
        """Every positions row of ``account`` (pages until a short one) and the pages read."""
        rows: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            chunk = await self.positions_page(account, page)
            rows.extend(chunk)
            size = chunk[0].get("pageSize") if chunk else None
            page_size = size if type(size) is int and size > 0 else PAGE_SIZE
            if len(chunk) < page_size:
                return rows, page + 1
        raise RestError(f"/portfolio/{account}/positions: more than {MAX_PAGES} pages")

    async def secdef(self, conids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """``/trsrv/secdef`` rows by conid (chunks of 200)."""
        found: dict[int, dict[str, Any]] = {}
        for i in range(0, len(conids), SECDEF_MAX_CONIDS):
            chunk = conids[i : i + SECDEF_MAX_CONIDS]
            answer = await self.request("GET", "/trsrv/secdef", params={"conids": ",".join(map(str, chunk))})
            rows = answer.get("secdef") if isinstance(answer, dict) else None
            for row in rows if isinstance(rows, list) else []:
                if isinstance(row, dict) and type(row.get("conid")) is int:
                    found[row["conid"]] = row
        return found


def _expect_dict(answer: Any, path: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise RestError(f"{path}: expected a JSON object")
    return answer


# --------------------------------------------------------------------------- start-up and positions


@dataclass(frozen=True, slots=True)
class GatewaySession:
    session: str | None  # the /tickle session id (for the WebSocket cookie or session message)
    accounts: tuple[str, ...]  # the accounts streamed
    reported: tuple[str, ...]  # every account the gateway reported


def _auth_status(tickle: Mapping[str, Any]) -> Mapping[str, Any]:
    iserver = tickle.get("iserver")
    status = iserver.get("authStatus") if isinstance(iserver, dict) else None
    return status if isinstance(status, dict) else {}


async def start_session(rest: IbkrRest, wanted: Sequence[str], log: Any) -> GatewaySession:
    """``/tickle`` -> ``/iserver/accounts`` -> ``/portfolio/accounts``; the accounts to stream.

    A brokerage session that is not authenticated (or taken by a competing login) is reopened
    with ``POST /iserver/auth/ssodh/init`` once.

    Raises:
        FatalError: an account in ``wanted`` (``IBKR_ACCOUNTS``) the gateway does not report.
        TransientError: network, authentication or unexpected answers.
    """
    tickle = await rest.tickle()
    session = tickle.get("session") if isinstance(tickle.get("session"), str) else None
    status = _auth_status(tickle)
    if status.get("authenticated") is False or status.get("competing") is True:
        log.warning(
            "gateway_not_authenticated",
            competing=status.get("competing") is True,
            detail="requesting POST /iserver/auth/ssodh/init",
        )
        await rest.ssodh_init()
    try:
        iserver = await rest.iserver_accounts()
    except NotAuthenticated:
        log.warning("gateway_not_authenticated", detail="requesting POST /iserver/auth/ssodh/init")
        await rest.ssodh_init()
        try:
            iserver = await rest.iserver_accounts()
        except NotAuthenticated as exc:
            raise TransientError(
                "the gateway's brokerage session is not authenticated (log in to the gateway)"
            ) from exc
    portfolio = await rest.portfolio_accounts()
    reported = [a.get("accountId") or a.get("id") for a in portfolio]
    accounts = [a for a in reported if isinstance(a, str) and a]
    if not accounts:
        raw = iserver.get("accounts")
        accounts = [a for a in raw if isinstance(a, str)] if isinstance(raw, list) else []
    if wanted:
        unknown = [a for a in wanted if a not in accounts]
        if unknown:
            raise FatalError(
                f"IBKR_ACCOUNTS: the gateway does not report {', '.join(unknown)} "
                f"(it reports {', '.join(accounts) or 'none'})"
            )
        selected = tuple(wanted)
    else:
        selected = tuple(accounts)
    return GatewaySession(session, selected, tuple(accounts))


@dataclass(frozen=True, slots=True)
class PositionsFetch:
    mapped: MappedPositions
    rows: int
    pages: int
    secdef_lookups: int


async def fetch_positions(rest: IbkrRest, accounts: Sequence[str], *, refresh: bool) -> PositionsFetch:
    """Every position of ``accounts``, mapped (``refresh``: invalidate the gateway's cache first)."""
    rows: list[dict[str, Any]] = []
    pages = 0
    for account in accounts:
        if refresh:
            await rest.invalidate_positions(account)
        account_rows, n = await rest.all_positions(account)
        for row in account_rows:
            if not isinstance(row.get("acctId"), str):
                row["acctId"] = account
        rows.extend(account_rows)
        pages += n
    lacking = await finish_in_steps(lacking_secdef_steps(rows, step=MAP_STEP_ROWS))
    secdefs = await rest.secdef(lacking) if lacking else {}
    mapped = await finish_in_steps(map_positions_steps(rows, secdefs, step=MAP_STEP_ROWS))
    return PositionsFetch(mapped, len(rows), pages, len(lacking))
