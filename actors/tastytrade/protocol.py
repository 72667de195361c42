"""Client side of the DXLink WebSocket protocol (tastytrade's market data stream), sans-I/O.

Rules:
- No I/O, no clock, no event loop. Decoded websocket text (or bytes) comes in through
  :meth:`DxLinkProtocol.receive_text` with the time it arrived; timers are inputs too
  (:meth:`DxLinkProtocol.next_deadline`, :meth:`DxLinkProtocol.on_timer`). What happened comes out
  of :meth:`DxLinkProtocol.events_received` as typed events; what to send comes out of
  :meth:`DxLinkProtocol.data_to_send` as text frames. Times are seconds on any clock the caller
  keeps consistent (the actor uses a monotonic one).
- Every transition of a connection lives in this file; the actor (``actors/tastytrade/actor.py``)
  only moves frames and reacts to events.
- :class:`DxLinkProtocolError` is the only exception this module raises, and only for misuse of
  the API (bad arguments). Bad input from the server never raises: a malformed, truncated or
  unknown message becomes a :class:`Malformed` event and the stream goes on.

Wire facts: ``reference/dxlink.md`` (§2 flow, §2.1 formats, §3 fields, §5 keepalive/errors).

Handshake, one connection (the table in ``tests/unit/actors/test_tastytrade_protocol.py``)::

    (new)                 -> SETUP                                    state SETUP_SENT
    SETUP_SENT  + AUTH_STATE UNAUTHORIZED -> AUTH                     state AUTH_SENT
    AUTH_SENT   + AUTH_STATE AUTHORIZED   -> CHANNEL_REQUEST (FEED, AUTO)   CHANNEL_REQUESTED
    CHANNEL_REQUESTED + CHANNEL_OPENED    -> FEED_SETUP (COMPACT, fields, aggregation)
                                             FEED_SUBSCRIPTION reset+add, chunked   STREAMING
    AUTH_SENT   + AUTH_STATE UNAUTHORIZED -> Unauthorized (token rejected)          CLOSED
    STREAMING   + AUTH_STATE UNAUTHORIZED -> Unauthorized (token no longer valid)   CLOSED
    any         + ERROR UNAUTHORIZED      -> Unauthorized                           CLOSED
    any         + ERROR TIMEOUT           -> ServerTimeout                          CLOSED
    any         + ERROR (other types)     -> ErrorMessage (informational; state unchanged)
    any         + CHANNEL_CLOSED (ours)   -> ChannelClosed                          CLOSED
    not STREAMING after handshake_timeout -> HandshakeTimeout                       CLOSED
    STREAMING, nothing received for stale_s -> Stale                                CLOSED
    nothing sent for keepalive_s          -> KEEPALIVE

Once CLOSED the connection is over: the actor reconnects with a new protocol instance (a new
token first after :class:`Unauthorized`), which redoes the handshake and resubscribes with
``reset``.

Data (§2.1): COMPACT ``[type, [v1..vN, v1..vN, ...]]`` (several types may follow each other in
one message) and FULL ``[{"eventType": type, field: value, ...}, ...]`` are both decoded whatever
the channel's announced format, with the field order of the latest FEED_CONFIG ``eventFields``
for that channel and type (merged over earlier ones, as the dxLink JS client does), else the
fields this client requested. ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` become ``None``.
Events are lightweight named tuples (:class:`Greeks`, :class:`Quote`, :class:`Trade`), not
pydantic models; fields the channel does not carry are ``None`` and :attr:`FeedData.fields` says
which ones it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from operator import itemgetter
from typing import Any, Final, NamedTuple

import orjson

__all__ = [
    "CLIENT_VERSION",
    "EVENT_FIELDS",
    "REQUESTED_FIELDS",
    "Authorized",
    "ChannelClosed",
    "ChannelOpened",
    "ConnectionState",
    "DxLinkProtocol",
    "DxLinkProtocolError",
    "ErrorMessage",
    "Event",
    "FeedConfig",
    "FeedData",
    "FeedReady",
    "Greeks",
    "HandshakeTimeout",
    "Malformed",
    "Quote",
    "ServerSetup",
    "ServerTimeout",
    "Stale",
    "Subscription",
    "Trade",
    "Unauthorized",
    "decode_compact",
]

CLIENT_VERSION: Final = "0.1-streaming-greeks/0.1.0"  # SETUP `version`: <protocol>-<impl>/<version>
FEED_CHANNEL: Final = 1  # odd, as the spec asks
MAX_CHUNK_BYTES: Final = 8192  # FEED_SUBSCRIPTION message size cap (dxLink JS client's default)
EXCERPT_CHARS: Final = 200  # how much of a malformed frame a Malformed event keeps

NAN_STRINGS: Final = frozenset({"NaN", "Infinity", "-Infinity"})

Subscription = tuple[str, str]  # (event type, streamer symbol)


class DxLinkProtocolError(Exception):
    """Misuse of :class:`DxLinkProtocol` (bad arguments); never raised for bad server input."""


# --------------------------------------------------------------------------- market events
# Field order of each tuple = the SDK v13.2.3 field order (reference §3), which is also the
# order a tastytrade server echoes when asked for it, so that order decodes without reordering.
# Numeric fields come first after the symbol (the fast validity check relies on it).


class Greeks(NamedTuple):
    event_symbol: str
    event_time: int | None
    event_flags: int | None
    index_: int | None  # wire name "index" (a tuple method name in Python)
    time: int | None  # ms epoch
    sequence: int | None
    price: float | None  # the option's market price
    volatility: float | None  # Black-Scholes IV, a fraction
    delta: float | None
    gamma: float | None
    theta: float | None
    rho: float | None
    vega: float | None


class Quote(NamedTuple):
    event_symbol: str
    event_time: int | None
    sequence: int | None
    time_nano_part: int | None
    bid_time: int | None  # ms epoch, often 0
    ask_time: int | None
    bid_price: float | None
    ask_price: float | None
    bid_size: float | None  # "NaN" for indexes
    ask_size: float | None
    bid_exchange_code: str | None
    ask_exchange_code: str | None


class Trade(NamedTuple):
    event_symbol: str
    event_time: int | None
    time: int | None
    time_nano_part: int | None
    sequence: int | None
    day_id: int | None
    price: float | None
    change: float | None
    size: float | None
    day_volume: float | None
    day_turnover: float | None
    exchange_code: str | None
    tick_direction: str | None
    extended_trading_hours: bool | None


MarketEvent = Greeks | Quote | Trade


def _camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part.title() for part in rest)


_EVENT_TYPES: Final[dict[str, type[Any]]] = {"Greeks": Greeks, "Quote": Quote, "Trade": Trade}
#: wire field names of each event tuple, in tuple order
EVENT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    name: tuple(_camel(f) for f in cls._fields) for name, cls in _EVENT_TYPES.items()
}
#: index of the first non-numeric field of each tuple (fields 1.._NUMERIC_END-1 are numbers)
_NUMERIC_END: Final[dict[str, int]] = {"Greeks": 13, "Quote": 10, "Trade": 11}

#: what this client asks for by default: only the fields the mapper uses (fewer bytes to parse)
REQUESTED_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "Greeks": (
        "eventSymbol", "eventTime", "time", "sequence", "price", "volatility",
        "delta", "gamma", "theta", "rho", "vega",
    ),
    "Quote": ("eventSymbol", "eventTime", "sequence", "bidTime", "askTime", "bidPrice", "askPrice"),
    "Trade": ("eventSymbol", "eventTime", "time", "sequence", "price"),
}  # fmt: skip


# --------------------------------------------------------------------------- protocol events


@dataclass(frozen=True, slots=True)
class ServerSetup:
    """The server's SETUP (informational; the client does not wait for it)."""

    version: str
    keepalive_timeout: float | None
    accept_keepalive_timeout: float | None


@dataclass(frozen=True, slots=True)
class Authorized:
    """AUTH_STATE AUTHORIZED: the quote token was accepted."""

    user_id: str | None


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    channel: int


@dataclass(frozen=True, slots=True)
class FeedReady:
    """The feed channel is open and set up, and the subscriptions are queued."""

    channel: int
    subscriptions: int
    messages: int  # FEED_SUBSCRIPTION messages the subscriptions took


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """A FEED_CONFIG: the channel's applied settings. ``previous_format`` differs from
    ``data_format`` when the server switched format (possibly unsolicited)."""

    channel: int
    data_format: str
    previous_format: str | None
    aggregation_period: float | None
    event_fields: Mapping[str, tuple[str, ...]]  # only the types this message named


@dataclass(frozen=True, slots=True)
class FeedData:
    """Decoded events of one type from one FEED_DATA message (a message may give several).

    ``fields`` are the wire fields the channel carries for this type: a tuple field whose wire
    name is not among them is ``None`` because it was not sent, not because it was cleared.
    """

    channel: int
    event_type: str
    events: list[Any]  # list of Greeks | Quote | Trade, the type named by event_type
    fields: frozenset[str]


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An informational ERROR (the session goes on)."""

    channel: int
    error: str
    message: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input that could not be used (fully): counted and logged by the actor, never fatal."""

    reason: str
    excerpt: str  # the first EXCERPT_CHARS characters of the offending frame


@dataclass(frozen=True, slots=True)
class Unauthorized:
    """The token was rejected or stopped being valid: get a new token, reconnect."""

    reason: str


@dataclass(frozen=True, slots=True)
class ServerTimeout:
    """ERROR TIMEOUT: the server gave up on this connection; reconnect."""

    reason: str


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The server closed the feed channel; reconnect."""

    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeTimeout:
    """The feed was not ready within the handshake timeout; reconnect."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stale:
    """Nothing at all came from the server for ``stale_s``; reconnect."""

    reason: str


ConnectionEnded = Unauthorized | ServerTimeout | ChannelClosed | HandshakeTimeout | Stale
Event = (
    ServerSetup
    | Authorized
    | ChannelOpened
    | FeedReady
    | FeedConfig
    | FeedData
    | ErrorMessage
    | Malformed
    | ConnectionEnded
)


class ConnectionState(StrEnum):
    SETUP_SENT = "SETUP_SENT"
    AUTH_SENT = "AUTH_SENT"
    CHANNEL_REQUESTED = "CHANNEL_REQUESTED"
    STREAMING = "STREAMING"
    CLOSED = "CLOSED"


# --------------------------------------------------------------------------- decoding

_STR_TYPE: Final = frozenset({str})
_NUMBER_TYPES: Final = frozenset({int, float, type(None)})
_SCALAR_TYPES: Final = frozenset({int, float, str, bool, type(None)})
_new_tuple = tuple.__new__
_PAD: Final[list[None]] = [None]  # appended to a row: the slot absent fields read

try:  # the optional C fast path of decode_compact (normalize/_speedups.c)
    from normalize._speedups import compact_events as _compact_events
except ImportError:  # pragma: no cover - a machine without a C compiler
    _compact_events = None  # type: ignore[assignment]


class _Layout:
    """How to turn one channel's rows of one event type into event tuples (compiled once per
    FEED_CONFIG for that channel and type)."""

    __slots__ = (
        "cls", "event_type", "fields", "getter", "identity", "numeric_end", "numeric_columns",
        "positions", "symbol_column", "tail_columns", "width",
    )  # fmt: skip

    def __init__(self, event_type: str, wire_fields: Sequence[str]) -> None:
        self.event_type = event_type
        self.cls = _EVENT_TYPES[event_type]
        canonical = EVENT_FIELDS[event_type]
        self.width = len(wire_fields)
        position: dict[str, int] = {}
        for i, name in enumerate(wire_fields):
            position.setdefault(name, i)
        if "eventSymbol" not in position:
            raise ValueError(f"{event_type} fields lack eventSymbol")
        self.numeric_end = end = _NUMERIC_END[event_type]
        # wire columns to check, by what the tuple field needs (wire fields we do not know are
        # passed over: their values never reach an event)
        self.symbol_column = position["eventSymbol"]
        self.numeric_columns = tuple(position[n] for n in canonical[1:end] if n in position)
        self.tail_columns = tuple(position[n] for n in canonical[end:] if n in position)
        self.identity = tuple(wire_fields) == canonical
        # absent fields point at the padding slot (index `width`, a None appended to the row)
        self.positions = tuple(position.get(name, self.width) for name in canonical)
        self.getter = itemgetter(*self.positions)
        self.fields = frozenset(name for name in canonical if name in position)

    def check(self, row: Sequence[Any]) -> tuple[Any, ...] | None:
        """A row (canonical order) as a valid tuple, NaN strings cleared; None when invalid."""
        symbol = row[0]
        if symbol.__class__ is not str or not symbol:
            return None
        end = self.numeric_end
        out = list(row)
        for i in range(1, end):
            v = out[i]
            cls = v.__class__
            if cls is int or cls is float or v is None:
                continue
            if cls is str and v in NAN_STRINGS:
                out[i] = None
                continue
            return None
        for i in range(end, len(out)):
            v = out[i]
            if v.__class__ not in _SCALAR_TYPES:
                return None
            if v.__class__ is str and v in NAN_STRINGS:
                out[i] = None
        return tuple(out)

    def suspect_rows(self, values: list[Any]) -> set[int]:
        """Rows that need :meth:`check`: a value of an unexpected type (``"NaN"`` included) in
        a column. Scans column by column with C-level ``map(type, ...)``, the hot path."""
        width = self.width
        suspects: set[int] = set()
        column = values[self.symbol_column :: width]
        if not _STR_TYPE.issuperset(map(type, column)) or "" in column:
            suspects.update(i for i, v in enumerate(column) if v.__class__ is not str or not v)
        for col in self.numeric_columns:
            column = values[col::width]
            if not _NUMBER_TYPES.issuperset(map(type, column)):
                suspects.update(i for i, v in enumerate(column) if v.__class__ not in _NUMBER_TYPES)
        for col in self.tail_columns:
            column = values[col::width]
            if not _SCALAR_TYPES.issuperset(map(type, column)) or not NAN_STRINGS.isdisjoint(
                v for v in column if v.__class__ is str
            ):
                suspects.update(
                    i
                    for i, v in enumerate(column)
                    if v.__class__ not in _SCALAR_TYPES or (v.__class__ is str and v in NAN_STRINGS)
                )
        return suspects


def decode_compact(layout: _Layout, values: list[Any]) -> tuple[list[Any], int]:
    """COMPACT values (k events x N fields, flattened) -> (event tuples, rows rejected).

    The caller has checked ``len(values) % layout.width == 0``. This is the hot path: the
    values are type-checked column by column (:meth:`_Layout.suspect_rows`), then every clean
    row becomes a tuple with one slice (plus one ``itemgetter`` call when the wire order is not
    the tuple's); only rows with ``"NaN"`` or a bad value go through :meth:`_Layout.check`.
    """
    width = layout.width
    cls = layout.cls
    if _compact_events is not None:  # the C fast path: every row clean, or None
        fast = _compact_events(
            cls, values, width, layout.symbol_column, layout.numeric_columns, layout.tail_columns,
            layout.positions,
        )  # fmt: skip
        if fast is not None:
            return fast, 0
    suspects = layout.suspect_rows(values)
    if not suspects:
        if layout.identity:
            return [_new_tuple(cls, values[b : b + width]) for b in range(0, len(values), width)], 0
        getter, pad = layout.getter, _PAD
        return [_new_tuple(cls, getter(values[b : b + width] + pad)) for b in range(0, len(values), width)], 0
    events: list[Any] = []
    append = events.append
    rejected = 0
    reorder = not layout.identity
    getter = layout.getter
    for row_index, base in enumerate(range(0, len(values), width)):
        row: Sequence[Any] = values[base : base + width]
        if reorder:
            row = getter(values[base : base + width] + _PAD)
        if row_index in suspects:
            checked = layout.check(row)
            if checked is None:
                rejected += 1
                continue
            row = checked
        append(_new_tuple(cls, row))
    return events, rejected


def _decode_full_row(layout: _Layout, row: Mapping[str, Any]) -> tuple[Any, ...] | None:
    canonical = EVENT_FIELDS[layout.event_type]
    return layout.check([row.get(name) for name in canonical])


# --------------------------------------------------------------------------- the protocol


@dataclass(slots=True)
class _Channel:
    """What the client knows of one FEED channel."""

    data_format: str | None = None  # None until the first FEED_CONFIG
    aggregation_period: float | None = None
    event_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)  # merged FEED_CONFIGs
    layouts: dict[str, _Layout | None] = field(default_factory=dict)  # None: unusable fields


def _excerpt(data: str | bytes) -> str:
    text = data if isinstance(data, str) else data[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    return text[:EXCERPT_CHARS]


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _dumps(message: Mapping[str, object]) -> str:
    return orjson.dumps(message).decode()


class DxLinkProtocol:
    """One DXLink connection seen from the client (see the module docstring for the flow).

    :param token: the API quote token (``/api-quote-tokens``), sent in AUTH; never in events.
    :param subscriptions: ``(event type, streamer symbol)`` pairs to subscribe once the feed is up.
    :param now: when the socket opened (seconds).
    :param keepalive_s: send KEEPALIVE after this long without sending anything.
    :param stale_s: nothing received for this long ends the connection (:class:`Stale`).
    :param handshake_timeout_s: the feed must be ready (AUTHORIZED, CHANNEL_OPENED) within this.
    :param aggregation_s: ``acceptAggregationPeriod`` of FEED_SETUP.
    :param event_fields: fields to request per event type (default :data:`REQUESTED_FIELDS`).
    :param chunk_bytes: the largest FEED_SUBSCRIPTION message, in bytes.
    """

    def __init__(
        self,
        *,
        token: str,
        subscriptions: Iterable[Subscription],
        now: float,
        keepalive_s: float = 30.0,
        stale_s: float = 60.0,
        handshake_timeout_s: float = 10.0,
        aggregation_s: float = 0.1,
        event_fields: Mapping[str, Sequence[str]] | None = None,
        chunk_bytes: int = MAX_CHUNK_BYTES,
        channel: int = FEED_CHANNEL,
        version: str = CLIENT_VERSION,
    ) -> None:
        if not token:
            raise DxLinkProtocolError("a quote token is required")
        for name, value in (
            ("keepalive_s", keepalive_s),
            ("stale_s", stale_s),
            ("handshake_timeout_s", handshake_timeout_s),
        ):
            if not value > 0:
                raise DxLinkProtocolError(f"{name} must be > 0")
        if not aggregation_s >= 0:
            raise DxLinkProtocolError("aggregation_s must be >= 0")
        if chunk_bytes < 256:
            raise DxLinkProtocolError("chunk_bytes must be >= 256")
        if channel <= 0:
            raise DxLinkProtocolError("the feed channel must be > 0")
        fields = dict(REQUESTED_FIELDS if event_fields is None else event_fields)
        for event_type, names in fields.items():
            if event_type not in _EVENT_TYPES:
                raise DxLinkProtocolError(f"unsupported event type {event_type!r}")
            if "eventSymbol" not in names:
                raise DxLinkProtocolError(f"{event_type} fields must include eventSymbol")
        self._token = token
        self._requested = {t: tuple(names) for t, names in fields.items()}
        self.subscriptions: set[Subscription] = set()
        self._check_items(subscriptions)
        self.subscriptions.update(subscriptions)
        self.keepalive_s = keepalive_s
        self.stale_s = stale_s
        self.handshake_timeout_s = handshake_timeout_s
        self.aggregation_s = aggregation_s
        self.chunk_bytes = chunk_bytes
        self.channel = channel
        self.version = version
        self.state = ConnectionState.SETUP_SENT
        self.opened_at = now
        self.last_received = now
        self.last_sent = now
        self.server_version: str | None = None
        self.user_id: str | None = None
        self.channels: dict[int, _Channel] = {}
        self._out: list[str] = []
        self._events: list[Event] = []
        self._send(
            {
                "type": "SETUP",
                "channel": 0,
                "keepaliveTimeout": max(round(2 * keepalive_s), 1),  # we send at least this often
                "acceptKeepaliveTimeout": max(round(stale_s), 1),  # we drop a server silent this long
                "version": version,
            },
            now,
        )

    # ----------------------------------------------------------------- verbs (websockets style)

    def receive_text(self, data: str | bytes, now: float) -> None:
        """Feed one websocket message from the server (text, or bytes holding UTF-8 JSON)."""
        if self.state is ConnectionState.CLOSED:
            return
        self.last_received = now
        try:
            message = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError):
            self._malformed("not valid JSON", data)
            return
        if not isinstance(message, dict):
            self._malformed("not a JSON object", data)
            return
        kind = message.get("type")
        channel = message.get("channel", 0)
        if not isinstance(kind, str) or not isinstance(channel, int) or isinstance(channel, bool):
            self._malformed("no message type or channel", data)
            return
        if kind == "FEED_DATA":  # first: by far the most frequent
            self._on_feed_data(message, channel, data)
        elif kind == "KEEPALIVE":
            pass
        elif kind == "AUTH_STATE":
            self._on_auth_state(message, data, now)
        elif kind == "FEED_CONFIG":
            self._on_feed_config(message, channel, data)
        elif kind == "SETUP":
            self._on_setup(message)
        elif kind == "CHANNEL_OPENED":
            self._on_channel_opened(channel, now)
        elif kind == "CHANNEL_CLOSED":
            if channel == self.channel:
                self._end(ChannelClosed(f"the server closed feed channel {channel}"))
        elif kind == "ERROR":
            self._on_error(message, channel)
        else:
            self._malformed(f"unknown message type {kind[:40]!r}", data)

    def events_received(self) -> list[Event]:
        """Events since the last call (in order)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str]:
        """Text frames to send, in order, since the last call."""
        out, self._out = self._out, []
        return out

    @property
    def pending_output(self) -> bool:
        """Whether :meth:`data_to_send` has something."""
        return bool(self._out)

    def next_deadline(self) -> float:
        """When :meth:`on_timer` next has something to do (``inf`` once closed)."""
        if self.state is ConnectionState.CLOSED:
            return float("inf")
        deadline = self.last_sent + self.keepalive_s
        if self.state is ConnectionState.STREAMING:
            return min(deadline, self.last_received + self.stale_s)
        return min(deadline, self.opened_at + self.handshake_timeout_s)

    def on_timer(self, now: float) -> None:
        """Run the timers due at ``now``: handshake timeout, staleness, keepalive."""
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is not ConnectionState.STREAMING and now >= self.opened_at + self.handshake_timeout_s:
            self._end(
                HandshakeTimeout(
                    f"feed not ready within {self.handshake_timeout_s:g} s (state {self.state.value})"
                )
            )
            return
        silent = now - self.last_received
        if self.state is ConnectionState.STREAMING and silent >= self.stale_s:
            self._end(Stale(f"nothing received for {silent:.1f} s"))
            return
        if now - self.last_sent >= self.keepalive_s:
            self._send({"type": "KEEPALIVE", "channel": 0}, now)

    def update_subscriptions(
        self, add: Iterable[Subscription] = (), remove: Iterable[Subscription] = (), *, now: float
    ) -> int:
        """Change the wanted subscriptions; on a streaming connection the difference goes out as
        FEED_SUBSCRIPTION messages (chunked). Returns how many messages were queued."""
        add, remove = list(add), list(remove)
        self._check_items(add)
        self._check_items(remove)
        removed = [s for s in dict.fromkeys(remove) if s in self.subscriptions]
        self.subscriptions.difference_update(removed)
        added = [s for s in dict.fromkeys(add) if s not in self.subscriptions]
        self.subscriptions.update(added)
        if self.state is not ConnectionState.STREAMING:
            return 0  # sent with reset once the feed is up
        messages = self._subscription_messages("remove", removed, reset=False)
        messages += self._subscription_messages("add", added, reset=False)
        for text in messages:
            self._send_text(text, now)
        return len(messages)

    def note_backpressure(self, now: float) -> None:
        """The client has not been reading (its own consumer was full): the server's apparent
        silence meanwhile is not staleness."""
        if self.state is not ConnectionState.CLOSED:
            self.last_received = max(self.last_received, now)

    def close(self) -> None:
        """The actor is closing the socket: nothing more is produced."""
        self.state = ConnectionState.CLOSED

    @property
    def streaming(self) -> bool:
        return self.state is ConnectionState.STREAMING

    # ----------------------------------------------------------------- handlers

    def _on_setup(self, message: dict[str, Any]) -> None:
        version = message.get("version")
        self.server_version = version if isinstance(version, str) else None
        self._events.append(
            ServerSetup(
                self.server_version or "",
                _number(message.get("keepaliveTimeout")),
                _number(message.get("acceptKeepaliveTimeout")),
            )
        )

    def _on_auth_state(self, message: dict[str, Any], data: str | bytes, now: float) -> None:
        state = message.get("state")
        if state == "UNAUTHORIZED":
            if self.state is ConnectionState.SETUP_SENT:
                self._send({"type": "AUTH", "channel": 0, "token": self._token}, now)
                self.state = ConnectionState.AUTH_SENT
            elif self.state is ConnectionState.AUTH_SENT:
                self._end(Unauthorized("the quote token was rejected"))
            else:
                self._end(Unauthorized("the server withdrew the authorization"))
        elif state == "AUTHORIZED":
            if self.state in (ConnectionState.SETUP_SENT, ConnectionState.AUTH_SENT):
                user = message.get("userId")
                self.user_id = user if isinstance(user, str) else None
                self._events.append(Authorized(self.user_id))
                self._send(
                    {
                        "type": "CHANNEL_REQUEST",
                        "channel": self.channel,
                        "service": "FEED",
                        "parameters": {"contract": "AUTO"},
                    },
                    now,
                )
                self.state = ConnectionState.CHANNEL_REQUESTED
            # a repeated AUTHORIZED later changes nothing
        else:
            self._malformed("unknown AUTH_STATE state", data)

    def _on_channel_opened(self, channel: int, now: float) -> None:
        if channel != self.channel or self.state is not ConnectionState.CHANNEL_REQUESTED:
            return  # a duplicate or foreign CHANNEL_OPENED: nothing to set up again
        self._events.append(ChannelOpened(channel))
        types = sorted({t for t, _ in self.subscriptions} | set(self._requested))
        self._send(
            {
                "type": "FEED_SETUP",
                "channel": channel,
                "acceptAggregationPeriod": self.aggregation_s,
                "acceptDataFormat": "COMPACT",
                "acceptEventFields": {t: list(self._requested[t]) for t in types if t in self._requested},
            },
            now,
        )
        messages = self._subscription_messages("add", sorted(self.subscriptions), reset=True)
        for text in messages:
            self._send_text(text, now)
        self.state = ConnectionState.STREAMING
        self._events.append(FeedReady(channel, len(self.subscriptions), len(messages)))

    def _on_feed_config(self, message: dict[str, Any], channel: int, data: str | bytes) -> None:
        chan = self.channels.setdefault(channel, _Channel())
        fmt = message.get("dataFormat")
        previous = chan.data_format
        if isinstance(fmt, str) and fmt in ("COMPACT", "FULL"):
            chan.data_format = fmt
        elif fmt is not None:
            self._malformed("unknown dataFormat", data)
        period = _number(message.get("aggregationPeriod"))
        if period is not None:
            chan.aggregation_period = period
        announced: dict[str, tuple[str, ...]] = {}
        fields = message.get("eventFields")
        if isinstance(fields, dict):
            for event_type, names in fields.items():
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    self._malformed(f"bad eventFields for {str(event_type)[:40]!r}", data)
                    continue
                announced[event_type] = tuple(names)
                chan.event_fields[event_type] = tuple(names)
                chan.layouts.pop(event_type, None)  # recompiled on next use
        elif fields is not None:
            self._malformed("eventFields is not an object", data)
        self._events.append(
            FeedConfig(channel, chan.data_format or "COMPACT", previous, chan.aggregation_period, announced)
        )

    def _layout(self, channel: int, event_type: str) -> _Layout | None:
        chan = self.channels.get(channel)
        if chan is None:
            chan = self.channels[channel] = _Channel()
        try:
            return chan.layouts[event_type]
        except KeyError:
            pass
        layout: _Layout | None = None
        if event_type in _EVENT_TYPES:
            wire = chan.event_fields.get(event_type) or self._requested.get(event_type)
            if wire:
                try:
                    layout = _Layout(event_type, wire)
                except ValueError:
                    layout = None
        chan.layouts[event_type] = layout
        return layout

    def _on_feed_data(self, message: dict[str, Any], channel: int, data: str | bytes) -> None:
        payload = message.get("data")
        if not isinstance(payload, list):
            self._malformed("FEED_DATA without a data list", data)
            return
        if not payload:
            return
        if isinstance(payload[0], str):
            self._on_compact(payload, channel, data)
        else:
            self._on_full(payload, channel, data)

    def _on_compact(self, payload: list[Any], channel: int, data: str | bytes) -> None:
        if len(payload) % 2:
            self._malformed("COMPACT data is not [type, values, ...] pairs", data)
            return
        problems: list[str] = []
        for i in range(0, len(payload), 2):
            event_type, values = payload[i], payload[i + 1]
            if not isinstance(event_type, str) or not isinstance(values, list):
                problems.append("COMPACT pair is not [type, values]")
                continue
            layout = self._layout(channel, event_type)
            if layout is None:
                problems.append(f"no usable fields for event type {event_type[:40]!r}")
                continue
            if len(values) % layout.width:
                problems.append(
                    f"{event_type}: {len(values)} values is not a multiple of {layout.width} fields"
                )
                continue
            events, rejected = decode_compact(layout, values)
            if rejected:
                problems.append(f"{event_type}: {rejected} events with invalid values")
            if events:
                self._events.append(FeedData(channel, event_type, events, layout.fields))
        if problems:
            self._malformed("; ".join(problems), data)

    def _on_full(self, payload: list[Any], channel: int, data: str | bytes) -> None:
        by_type: dict[str, list[Any]] = {}
        layouts: dict[str, _Layout] = {}
        problems = 0
        for row in payload:
            if not isinstance(row, dict):
                problems += 1
                continue
            event_type = row.get("eventType")
            layout = self._layout(channel, event_type) if isinstance(event_type, str) else None
            if layout is None:
                problems += 1
                continue
            checked = _decode_full_row(layout, row)
            if checked is None:
                problems += 1
                continue
            assert isinstance(event_type, str)
            layouts[event_type] = layout
            by_type.setdefault(event_type, []).append(_new_tuple(layout.cls, checked))
        for event_type, events in by_type.items():
            self._events.append(FeedData(channel, event_type, events, layouts[event_type].fields))
        if problems:
            self._malformed(f"FULL data: {problems} unusable events", data)

    def _on_error(self, message: dict[str, Any], channel: int) -> None:
        error = message.get("error")
        text = message.get("message")
        error = error if isinstance(error, str) else "UNKNOWN"
        text = text[:EXCERPT_CHARS] if isinstance(text, str) else ""
        if error == "UNAUTHORIZED":
            self._end(Unauthorized(f"ERROR UNAUTHORIZED: {text}"))
        elif error == "TIMEOUT":
            self._end(ServerTimeout(f"ERROR TIMEOUT: {text}"))
        else:
            self._events.append(ErrorMessage(channel, error[:40], text))

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _check_items(items: Iterable[Subscription]) -> None:
        for item in items:
            if (
                not isinstance(item, tuple)
                or len(item) != 2
                or item[0] not in _EVENT_TYPES
                or not isinstance(item[1], str)
                or not item[1]
            ):
                raise DxLinkProtocolError(f"not a (supported event type, symbol) pair: {item!r}")

    def _subscription_messages(self, key: str, items: Sequence[Subscription], *, reset: bool) -> list[str]:
        """FEED_SUBSCRIPTION texts for ``items`` under ``key`` (add/remove), each at most
        ``chunk_bytes`` long (a single oversized item still gets its own message). With
        ``reset`` the first message carries ``reset:true`` (sent even with no items)."""
        if not items and not reset:
            return []
        encoded = [orjson.dumps({"type": t, "symbol": s}) for t, s in items]
        messages: list[str] = []
        start = 0
        while start < len(encoded) or (reset and not messages):
            head: dict[str, object] = {"type": "FEED_SUBSCRIPTION", "channel": self.channel}
            if reset and not messages:
                head["reset"] = True
            prefix = orjson.dumps(head)[:-1] + b',"' + key.encode() + b'":['
            size = len(prefix) + 2  # + "]}"
            end = start
            while end < len(encoded):
                extra = len(encoded[end]) + (1 if end > start else 0)
                if end > start and size + extra > self.chunk_bytes:
                    break
                size += extra
                end += 1
            messages.append((prefix + b",".join(encoded[start:end]) + b"]}").decode())
            start = end
        return messages

    def _send(self, message: Mapping[str, object], now: float) -> None:
        self._send_text(_dumps(message), now)

    def _send_text(self, text: str, now: float) -> None:
        self._out.append(text)
        self.last_sent = now

    def _malformed(self, reason: str, data: str | bytes) -> None:
        self._events.append(Malformed(reason, _excerpt(data)))

    def _end(self, event: ConnectionEnded) -> None:
        self._events.append(event)
        self.state = ConnectionState.CLOSED
