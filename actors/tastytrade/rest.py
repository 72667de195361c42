"""Tastytrade REST through the ``tastytrade`` SDK (v13): session, accounts, positions, streamer
symbols, API quote tokens.

Every call goes through the SDK's OAuth :class:`tastytrade.Session` (refresh token + client
secret; the SDK refreshes the 15-minute access token itself). Two endpoints have no public SDK
call and go through ``Session._get`` exactly as the SDK's own ``DXLinkStreamer`` does:
``/api-quote-tokens`` (the SDK keeps only ``token`` and ``dxlink-url``; the expiry is needed too)
and the batch form of ``/instruments/equity-options?symbol[]=`` (``Option.get`` takes one symbol,
and its fallback streamer symbol is wrong for SPXW, so the raw ``streamer-symbol`` is read).
Positions are ``Account.get_positions`` taken apart, for large accounts: the same request and
error check on the session's client, the body decoded with ``orjson`` (the standard library's
decoder held the event loop about 100 ms for 5,000 positions), then the SDK's own
``CurrentPosition`` model built in slices (:func:`current_positions_steps`), the other tasks
running between them every ``actors.steps.STEP_BUDGET_S``.

Failures (network, HTTP errors, unexpected bodies) become :class:`RestError`, a
:class:`~supervisor.errors.TransientError`; an account named in ``TT_ACCOUNTS`` that the broker
does not list is a :class:`~supervisor.errors.FatalError` (bad configuration). Messages never
carry a credential or token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import httpx2
import orjson
import pydantic
import tastytrade.session
from tastytrade import Account, Session
from tastytrade.account import CurrentPosition
from tastytrade.instruments import Equity
from tastytrade.utils import TastytradeError, validate_response

from actors.steps import MAP_STEP_ROWS, finish_in_steps
from config.settings import Secret, TastytradeSettings
from normalize.symbology import is_option_key, occ_symbol, parse_occ
from supervisor.errors import FatalError, TransientError

T = TypeVar("T")

QUOTE_TOKEN_LIFETIME_S = 86400.0  # "Api quote tokens expire after 24 hours" (reference §1.2)
LOOKUP_CHUNK = 100  # symbols per instruments request


class RestError(TransientError):
    """A Tastytrade REST call failed; a restart may help."""


@dataclass(frozen=True, slots=True)
class QuoteToken:
    """An API quote token (``GET /api-quote-tokens``)."""

    token: Secret
    dxlink_url: str
    issued_at: float  # local POSIX time it was fetched
    expires_at: float  # local POSIX time it expires (the server's lifetime from issued_at)

    def refresh_at(self) -> float:
        """When to fetch the next one: a fifth of its lifetime early, at most an hour early."""
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        return self.expires_at - min(0.2 * lifetime, 3600.0)


def new_session(settings: TastytradeSettings) -> Session:
    """An SDK session for ``settings``. The only place the REST base override is applied.

    SDK v13 has no base-URL argument: ``Session.__init__`` builds its HTTP client from the module
    constant ``tastytrade.session.API_URL``. It is set to ``TT_API_URL`` for the duration of the
    constructor and restored right after (the session keeps the URL in its own client), so other
    sessions in the process are not affected.
    """
    if settings.client_secret is None or settings.refresh_token is None:
        raise FatalError(
            "config error: TT_CLIENT_SECRET: expected to be set together with TT_REFRESH_TOKEN", exit_code=2
        )
    module = tastytrade.session
    previous = getattr(module, "API_URL")  # noqa: B009 - not re-exported, so mypy needs getattr
    setattr(module, "API_URL", settings.api_url)  # noqa: B010
    try:
        session = Session(settings.client_secret.get(), settings.refresh_token.get())
    finally:
        setattr(module, "API_URL", previous)  # noqa: B010
    # The SDK sets its logger to DEBUG; let it follow the engine's level instead.
    logging.getLogger("tastytrade").setLevel(logging.NOTSET)
    return session


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # the SDK joins errors with newlines
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def _call(what: str, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (
        TastytradeError,
        httpx2.HTTPError,
        pydantic.ValidationError,
        KeyError,
        TypeError,
        ValueError,
    ) as exc:  # orjson.JSONDecodeError is a ValueError
        raise RestError(f"Tastytrade REST {what} failed: {_describe(exc)}") from None


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
    return ts if math.isfinite(ts) else None


class TastytradeRest:
    """The REST calls the actor makes, on one SDK session (an async context manager)."""

    def __init__(self, settings: TastytradeSettings, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.session = new_session(settings)
        self.accounts: list[Account] = []

    async def __aenter__(self) -> TastytradeRest:
        await self.session.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.session.__aexit__(exc_type, exc, tb)

    async def load_accounts(self) -> list[str]:
        """The open accounts to stream: ``TT_ACCOUNTS``, or every open account."""
        found = await _call("GET /customers/me/accounts", lambda: Account.get(self.session))
        by_number = {a.account_number: a for a in found}
        wanted = self.settings.accounts
        if wanted:
            missing = [n for n in wanted if n not in by_number]
            if missing:
                raise FatalError(
                    f"config error: TT_ACCOUNTS: account(s) {', '.join(missing)} not found among the "
                    f"open Tastytrade accounts ({', '.join(sorted(by_number)) or 'none'})",
                    exit_code=2,
                )
            self.accounts = [by_number[n] for n in wanted]
        else:
            self.accounts = found
        return [a.account_number for a in self.accounts]

    async def positions(self) -> list[CurrentPosition]:
        """Every current position of the loaded accounts (what ``Account.get_positions`` gives,
        decoded and validated in steps: module docstring)."""
        rows: list[CurrentPosition] = []
        for account in self.accounts:
            path = f"/accounts/{account.account_number}/positions"
            data = await _call(f"GET {path}", partial(self._get_data, path))
            steps = current_positions_steps(data, MAP_STEP_ROWS)
            rows.extend(await _call(f"GET {path}", partial(finish_in_steps, steps)))
        return rows

    async def _get_data(self, path: str) -> dict[str, Any]:
        """``Session._get``: the token refreshed when due, the GET, the SDK's error check; the
        body's ``data`` decoded with ``orjson``."""
        await self.session.refresh()
        response = await self.session._client.get(path)
        validate_response(response)
        body = orjson.loads(response.content)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data:
            raise TastytradeError("No data present in response")
        return data

    async def streamer_symbols(self, keys: Iterable[str]) -> dict[str, str]:
        """Canonical key -> the API's streamer symbol, for the keys the API knows.

        Options via ``/instruments/equity-options?symbol[]=`` (raw ``streamer-symbol``),
        stocks and indexes via ``Equity.get``.
        """
        options = sorted({k for k in keys if is_option_key(k)})
        tickers = sorted({k for k in keys if not is_option_key(k)})
        found: dict[str, str] = {}
        for chunk in _chunks(options, LOOKUP_CHUNK):
            data = await _call("GET /instruments/equity-options", partial(self._options, chunk))
            for item in data.get("items", []):
                if isinstance(item, dict):
                    symbol, streamer = item.get("symbol"), item.get("streamer-symbol")
                    if isinstance(symbol, str) and isinstance(streamer, str) and streamer:
                        try:  # keyed like the positions: the canonical (padded) OCC symbol
                            o = parse_occ(symbol)
                        except ValueError:
                            continue
                        found[occ_symbol(o.root, o.expiry, o.right, o.strike)] = streamer
        for chunk in _chunks(tickers, LOOKUP_CHUNK):
            equities = await _call("GET /instruments/equities", partial(self._equities, chunk))
            for equity in equities:
                if equity.streamer_symbol:
                    found[equity.symbol] = equity.streamer_symbol
        return found

    async def _options(self, symbols: list[str]) -> dict[str, Any]:
        return await self.session._get("/instruments/equity-options", params={"symbol[]": symbols})

    async def _equities(self, symbols: list[str]) -> list[Equity]:
        return await Equity.get(self.session, symbols)

    async def quote_token(self) -> QuoteToken:
        """A new API quote token and the DXLink URL to use it on (never hard-coded)."""
        data: dict[str, Any] = await _call(
            "GET /api-quote-tokens", lambda: self.session._get("/api-quote-tokens")
        )
        token, url = data.get("token"), data.get("dxlink-url")
        if not isinstance(token, str) or not token or not isinstance(url, str) or not url:
            raise RestError("Tastytrade REST GET /api-quote-tokens failed: no token or dxlink-url")
        # Lifetimes come from the server's own timestamps, applied to the local clock (the two
        # clocks may differ); without them, the documented 24 h.
        now = self.clock()
        issued, expires = _timestamp(data.get("issued-at")), _timestamp(data.get("expires-at"))
        if issued is not None and expires is not None and expires > issued:
            lifetime = expires - issued
        elif expires is not None and expires > now:
            lifetime = expires - now
        else:
            lifetime = QUOTE_TOKEN_LIFETIME_S
        return QuoteToken(Secret(token), url, now, now + lifetime)


def current_positions_steps(data: dict[str, Any], step: int) -> Generator[None, None, list[CurrentPosition]]:
    """The SDK's ``CurrentPosition`` of every item of a positions body's ``data``, ``step`` items
    at a time (a step generator: :mod:`normalize.steps`). Raises what the SDK's own parse raises:
    ``KeyError`` without ``items``, ``TypeError`` for an item that is no object,
    ``pydantic.ValidationError`` for one that does not fit the model."""
    items = data["items"]
    if not isinstance(items, list):
        raise TypeError(f"positions: items is {type(items).__name__}, not a list")
    step = max(step, 1)
    rows: list[CurrentPosition] = []
    for start in range(0, len(items), step):
        if start:
            yield
        rows.extend(CurrentPosition(**item) for item in items[start : start + step])
    return rows


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
