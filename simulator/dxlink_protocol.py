"""Server side of the DXLink WebSocket protocol, sans-I/O.

Rules:
- No I/O, no clock, no event loop: decoded websocket text comes in through
  :meth:`DxLinkServerProtocol.receive_text`, time comes in as ``now`` (seconds, any monotonic
  or epoch base as long as the caller is consistent), outgoing text frames go out through
  :meth:`DxLinkServerProtocol.data_to_send`.
- Every transition of the connection lives in this file. The I/O layer
  (``simulator/tastytrade.py``) only reads frames, feeds them in, writes what comes out, and
  closes when :attr:`DxLinkServerProtocol.close_code` is set.
- Wire facts follow ``reference/dxlink.md`` (§2, §3, §5, checklist §7): SETUP -> AUTH_STATE
  UNAUTHORIZED -> AUTH -> AUTH_STATE AUTHORIZED -> CHANNEL_REQUEST -> CHANNEL_OPENED ->
  FEED_SETUP -> FEED_CONFIG -> FEED_SUBSCRIPTION -> FEED_DATA (COMPACT by default, FULL on
  request or by fault).

Values in events are Python values; ``None`` and non-finite floats are encoded as the strings
``"NaN"``/``"Infinity"``/``"-Infinity"`` in COMPACT, and omitted in FULL (as the spec says).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_EVENT_FIELDS",
    "AuthState",
    "Authorized",
    "ChannelClosed",
    "DxLinkServerProtocol",
    "Event",
    "FeedChannel",
    "Subscribed",
    "Unsubscribed",
    "encode_value",
]

SERVER_VERSION: Final = "1.0-1.2.1-sim"

#: Field order per event type used when a client asks for none (the SDK v13.2.3 order, which is
#: also its positional COMPACT mapping; reference/dxlink.md §3).
DEFAULT_EVENT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "Greeks": (
        "eventSymbol", "eventTime", "eventFlags", "index", "time", "sequence", "price",
        "volatility", "delta", "gamma", "theta", "rho", "vega",
    ),
    "Quote": (
        "eventSymbol", "eventTime", "sequence", "timeNanoPart", "bidTime", "bidExchangeCode",
        "askTime", "askExchangeCode", "bidPrice", "askPrice", "bidSize", "askSize",
    ),
    "Trade": (
        "eventSymbol", "eventTime", "time", "timeNanoPart", "sequence", "exchangeCode", "dayId",
        "tickDirection", "extendedTradingHours", "price", "change", "size", "dayVolume",
        "dayTurnover",
    ),
    "Summary": (
        "eventSymbol", "eventTime", "dayId", "dayClosePriceType", "prevDayId",
        "prevDayClosePriceType", "openInterest", "dayOpenPrice", "dayHighPrice", "dayLowPrice",
        "dayClosePrice", "prevDayClosePrice", "prevDayVolume",
    ),
    "TheoPrice": (
        "eventSymbol", "eventTime", "eventFlags", "index", "time", "sequence", "price",
        "underlyingPrice", "delta", "gamma", "dividend", "interest",
    ),
    "Underlying": (
        "eventSymbol", "eventTime", "eventFlags", "index", "time", "sequence", "volatility",
        "frontVolatility", "backVolatility", "callVolume", "putVolume", "optionVolume",
        "putCallRatio",
    ),
}  # fmt: skip

_FORMATS: Final = frozenset({"COMPACT", "FULL"})
_CONTRACTS: Final = frozenset({"AUTO", "TICKER", "STREAM", "HISTORY"})
_SERVICES: Final = frozenset({"FEED"})


class AuthState(StrEnum):
    """Where the connection is in the handshake."""

    AWAIT_SETUP = "AWAIT_SETUP"
    UNAUTHORIZED = "UNAUTHORIZED"
    AUTHORIZED = "AUTHORIZED"
    CLOSED = "CLOSED"


# --- events reported to the I/O layer ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authorized:
    """The client presented a valid token."""

    token: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Items were added to a feed channel; the server should send a last-value snapshot."""

    channel: int
    items: tuple[tuple[str, str], ...]  # (event type, symbol)


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """Items were removed from a feed channel (``reset`` reports every removed item)."""

    channel: int
    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """A channel was cancelled by the client."""

    channel: int


Event = Authorized | Subscribed | Unsubscribed | ChannelClosed


# --- per channel state -------------------------------------------------------------------------


@dataclass(slots=True)
class FeedChannel:
    """State of one FEED channel."""

    channel: int
    contract: str
    data_format: str = "COMPACT"
    aggregation_period: float = 0.1
    #: fields requested by FEED_SETUP, per event type, in the requested order
    requested_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: event types whose fields were announced in a FEED_CONFIG
    announced: set[str] = field(default_factory=set)
    configured: bool = False
    subscriptions: set[tuple[str, str]] = field(default_factory=set)

    def fields_for(self, event_type: str) -> tuple[str, ...]:
        """Fields used for ``event_type`` on this channel: the requested ones, else defaults."""
        requested = self.requested_fields.get(event_type)
        if requested is not None:
            return requested
        return DEFAULT_EVENT_FIELDS.get(event_type, ("eventSymbol", "eventTime"))


# --- value encoding ----------------------------------------------------------------------------


def encode_value(value: object) -> object:
    """Encode one event value for COMPACT: missing or non-finite doubles become strings."""
    if value is None:
        return "NaN"
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _dumps(message: Mapping[str, object]) -> str:
    # orjson writes a non-finite float as null: encode_value has already turned them into strings
    return orjson.dumps(message).decode()


def _error(channel: int, error: str, message: str) -> dict[str, object]:
    return {"type": "ERROR", "channel": channel, "error": error, "message": message}


# --- the protocol ------------------------------------------------------------------------------


class DxLinkServerProtocol:
    """One DXLink connection seen from the server.

    :param validate_token: returns the user id for a valid quote token, ``None`` otherwise.
    :param now: connection start time (seconds).
    :param keepalive_timeout: client silence (s) after which the server sends ``ERROR TIMEOUT``
        and closes; announced to the client in the server's SETUP.
    :param keepalive_interval: server silence (s) after which the server sends ``KEEPALIVE``.
    :param accept_keepalive_timeout: announced in the server's SETUP.
    """

    def __init__(
        self,
        *,
        validate_token: Callable[[str], str | None],
        now: float,
        keepalive_timeout: float = 60.0,
        keepalive_interval: float = 30.0,
        accept_keepalive_timeout: float = 60.0,
        version: str = SERVER_VERSION,
    ) -> None:
        self._validate_token = validate_token
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_interval = keepalive_interval
        self.accept_keepalive_timeout = accept_keepalive_timeout
        self.version = version
        self.state = AuthState.AWAIT_SETUP
        self.client_version: str | None = None
        self.user_id: str | None = None
        self.channels: dict[int, FeedChannel] = {}
        self.last_received = now
        self.last_sent = now
        #: set once the connection must be closed (after the queued output is sent)
        self.close_code: int | None = None
        self.close_reason = ""
        self._out: list[str] = []
        self._events: list[Event] = []
        #: what the client sent, for tests: message type -> count, and one
        #: ``(bytes, reset, added, removed)`` per FEED_SUBSCRIPTION
        self.received_types: dict[str, int] = {}
        self.subscription_messages: list[tuple[int, bool, int, int]] = []

    # --- verbs (websockets style) --------------------------------------------------------------

    def receive_text(self, text: str, now: float) -> None:
        """Feed one decoded text frame from the client."""
        if self.state is AuthState.CLOSED:
            return
        self.last_received = now
        try:
            message = orjson.loads(text)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            self._send(_error(0, "INVALID_MESSAGE", "The message is not valid JSON."), now)
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._send(_error(0, "INVALID_MESSAGE", "The message is not a DXLink message."), now)
            return
        channel = message.get("channel", 0)
        if not isinstance(channel, int) or isinstance(channel, bool) or channel < 0:
            self._send(_error(0, "INVALID_MESSAGE", "The channel is not valid."), now)
            return
        handler = self._HANDLERS.get(message["type"])
        if handler is None:
            self._send(_error(channel, "BAD_ACTION", f"Unknown message type: {message['type']}"), now)
            return
        if self.state is AuthState.AWAIT_SETUP and message["type"] != "SETUP":
            self._send(_error(0, "BAD_ACTION", "SETUP must be the first message."), now)
            return
        kind = message["type"]
        self.received_types[kind] = self.received_types.get(kind, 0) + 1
        if kind == "FEED_SUBSCRIPTION":
            add, remove = message.get("add"), message.get("remove")
            self.subscription_messages.append(
                (
                    len(text.encode()),
                    message.get("reset") is True,
                    len(add) if isinstance(add, list) else 0,
                    len(remove) if isinstance(remove, list) else 0,
                )
            )
        handler(self, message, channel, now)

    def receive_binary(self, now: float) -> None:
        """A binary frame from the client: DXLink is text-only."""
        if self.state is AuthState.CLOSED:
            return
        self.last_received = now
        self._send(_error(0, "INVALID_MESSAGE", "Binary frames are not supported."), now)

    def data_to_send(self) -> list[str]:
        """Text frames queued for the client, in order; the queue is emptied."""
        out, self._out = self._out, []
        return out

    @property
    def backlog(self) -> int:
        """Frames queued and not yet taken by :meth:`data_to_send`."""
        return len(self._out)

    def events_received(self) -> list[Event]:
        """Events for the I/O layer since the last call; the list is emptied."""
        events, self._events = self._events, []
        return events

    def poll(self, now: float) -> None:
        """Run the timers: client silence -> ERROR TIMEOUT + close; server silence -> KEEPALIVE."""
        if self.state is AuthState.CLOSED:
            return
        silent = now - self.last_received
        if silent >= self.keepalive_timeout:
            seconds = round(silent)
            self._send(
                _error(
                    0,
                    "TIMEOUT",
                    f"The timeout has been reached. The message was last received {seconds} seconds ago.",
                ),
                now,
            )
            self._close(1000, "keepalive timeout")
            return
        if self.state is not AuthState.AWAIT_SETUP and now - self.last_sent >= (self.keepalive_interval):
            self._send({"type": "KEEPALIVE", "channel": 0}, now)

    def next_deadline(self) -> float:
        """The next time :meth:`poll` has something to do (``inf`` once closed)."""
        if self.state is AuthState.CLOSED:
            return math.inf
        deadline = self.last_received + self.keepalive_timeout
        if self.state is not AuthState.AWAIT_SETUP:
            deadline = min(deadline, self.last_sent + self.keepalive_interval)
        return deadline

    # --- server-initiated messages -------------------------------------------------------------

    @property
    def authorized(self) -> bool:
        return self.state is AuthState.AUTHORIZED

    def subscribers(self, event_type: str, symbol: str) -> list[int]:
        """Channels on which ``(event_type, symbol)`` is subscribed."""
        key = (event_type, symbol)
        return [c.channel for c in self.channels.values() if key in c.subscriptions]

    def subscriptions(self) -> dict[tuple[str, str], list[int]]:
        """Every subscribed ``(event type, symbol)`` with the channels carrying it."""
        result: dict[tuple[str, str], list[int]] = {}
        for chan in self.channels.values():
            for key in chan.subscriptions:
                result.setdefault(key, []).append(chan.channel)
        return result

    def feed_data(
        self,
        channel: int,
        event_type: str,
        events: Sequence[Mapping[str, object]],
        now: float,
        *,
        drop_values: int = 0,
    ) -> bool:
        """Queue one FEED_DATA message carrying ``events`` (field name -> value) of one type.

        Uses the channel's current format and fields. ``drop_values`` removes that many values
        from the end of a COMPACT payload (the wrong-value-count fault). Returns whether a
        message was queued (not when unauthorized, the channel is gone, or there are no events).
        """
        chan = self.channels.get(channel)
        if not events or chan is None or not self.authorized:
            return False
        fields = chan.fields_for(event_type)
        if event_type not in chan.announced:
            self._announce(chan, event_type, now)
        data: list[Any]
        if chan.data_format == "FULL":
            data = []
            for ev in events:
                row: dict[str, object] = {"eventType": event_type}
                for name in fields:
                    value = encode_value(ev.get(name, event_type if name == "eventType" else None))
                    if value != "NaN":
                        row[name] = value
                data.append(row)
        else:
            values: list[object] = [
                encode_value(ev.get(name, event_type if name == "eventType" else None))
                for ev in events
                for name in fields
            ]
            if drop_values:
                del values[-drop_values:]
            data = [event_type, values]
        self._send({"type": "FEED_DATA", "channel": channel, "data": data}, now)
        return True

    def switch_format(self, data_format: str, now: float, channel: int | None = None) -> None:
        """Unsolicited FEED_CONFIG changing the data format (the "switch to FULL" fault)."""
        targets = [self.channels[channel]] if channel is not None else list(self.channels.values())
        for chan in targets:
            if not chan.configured or chan.data_format == data_format:
                continue
            chan.data_format = data_format
            self._send(self._feed_config(chan), now)

    def deauthorize(self, now: float) -> None:
        """The token stopped being valid: AUTH_STATE UNAUTHORIZED; data stops until a new AUTH."""
        if self.state is AuthState.AUTHORIZED:
            self.state = AuthState.UNAUTHORIZED
            self._send({"type": "AUTH_STATE", "channel": 0, "state": "UNAUTHORIZED"}, now)

    def send_raw(self, text: str, now: float) -> None:
        """Queue an arbitrary text frame (faults: malformed JSON, unknown messages)."""
        self._out.append(text)
        self.last_sent = now

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the server side (the I/O layer closes the socket once output is sent)."""
        self._close(code, reason)

    def connection_lost(self) -> None:
        """The socket went away; nothing more is sent."""
        self.state = AuthState.CLOSED
        self._out.clear()

    # --- handlers ------------------------------------------------------------------------------

    def _on_setup(self, msg: dict[str, Any], channel: int, now: float) -> None:
        if channel != 0:
            self._send(_error(channel, "BAD_ACTION", "SETUP must be sent on channel 0."), now)
            return
        version = msg.get("version")
        if not isinstance(version, str) or not version:
            self._send(_error(0, "INVALID_MESSAGE", "SETUP requires a version."), now)
            return
        first = self.state is AuthState.AWAIT_SETUP
        self.client_version = version
        accept = msg.get("acceptKeepaliveTimeout")
        if isinstance(accept, int | float) and not isinstance(accept, bool) and accept > 0:
            # the client drops us after `accept` seconds of silence: keep well inside it
            self.keepalive_interval = min(self.keepalive_interval, accept / 2)
        self._send(
            {
                "type": "SETUP",
                "channel": 0,
                "keepaliveTimeout": self.keepalive_timeout,
                "acceptKeepaliveTimeout": self.accept_keepalive_timeout,
                "version": self.version,
            },
            now,
        )
        if first:
            self.state = AuthState.UNAUTHORIZED
            self._send({"type": "AUTH_STATE", "channel": 0, "state": "UNAUTHORIZED"}, now)

    def _on_auth(self, msg: dict[str, Any], channel: int, now: float) -> None:
        token = msg.get("token")
        user_id = self._validate_token(token) if isinstance(token, str) else None
        if user_id is None:
            # checklist §7.2: ERROR UNAUTHORIZED and close, so the SDK does not loop on AUTH
            self._send(_error(0, "UNAUTHORIZED", "The token is not valid."), now)
            self._close(1000, "unauthorized")
            return
        assert isinstance(token, str)
        self.state = AuthState.AUTHORIZED
        self.user_id = user_id
        self._send({"type": "AUTH_STATE", "channel": 0, "state": "AUTHORIZED", "userId": user_id}, now)
        self._events.append(Authorized(token))

    def _on_keepalive(self, msg: dict[str, Any], channel: int, now: float) -> None:
        pass  # last_received is already updated

    def _on_error(self, msg: dict[str, Any], channel: int, now: float) -> None:
        pass  # informational (spec); the client reports its own problems

    def _require_auth(self, channel: int, now: float) -> bool:
        if self.state is AuthState.AUTHORIZED:
            return True
        self._send(_error(channel, "UNAUTHORIZED", "The connection is not authorized."), now)
        return False

    def _on_channel_request(self, msg: dict[str, Any], channel: int, now: float) -> None:
        if not self._require_auth(channel, now):
            return
        if channel == 0:
            self._send(_error(0, "BAD_ACTION", "Channel 0 is reserved."), now)
            return
        service = msg.get("service")
        if service not in _SERVICES:
            self._send(_error(channel, "BAD_ACTION", f"Unsupported service: {service}"), now)
            return
        params = msg.get("parameters")
        params = dict(params) if isinstance(params, dict) else {}
        contract = params.get("contract", "AUTO")
        if contract not in _CONTRACTS:
            self._send(_error(channel, "BAD_ACTION", f"Unsupported contract: {contract}"), now)
            return
        existing = self.channels.get(channel)
        if existing is None:
            self.channels[channel] = FeedChannel(channel=channel, contract=str(contract))
        self._send(
            {
                "type": "CHANNEL_OPENED",
                "channel": channel,
                "service": service,
                "parameters": {**params, "contract": contract, "subFormat": "LIST"},
            },
            now,
        )

    def _channel(self, channel: int, now: float) -> FeedChannel | None:
        if not self._require_auth(channel, now):
            return None
        chan = self.channels.get(channel)
        if chan is None:
            self._send(_error(channel, "BAD_ACTION", f"Channel {channel} is not opened."), now)
        return chan

    def _on_feed_setup(self, msg: dict[str, Any], channel: int, now: float) -> None:
        chan = self._channel(channel, now)
        if chan is None:
            return
        data_format = msg.get("acceptDataFormat", chan.data_format)
        if data_format not in _FORMATS:
            self._send(_error(channel, "INVALID_MESSAGE", f"Unknown format: {data_format}"), now)
            return
        period = msg.get("acceptAggregationPeriod", chan.aggregation_period)
        if not isinstance(period, int | float) or isinstance(period, bool) or period < 0:
            self._send(_error(channel, "INVALID_MESSAGE", "Invalid aggregation period."), now)
            return
        accept_fields = msg.get("acceptEventFields", {})
        if not isinstance(accept_fields, dict) or not all(
            isinstance(v, list) and all(isinstance(f, str) for f in v) for v in accept_fields.values()
        ):
            self._send(_error(channel, "INVALID_MESSAGE", "Invalid acceptEventFields."), now)
            return
        chan.data_format = str(data_format)
        chan.aggregation_period = float(period)
        for event_type, names in accept_fields.items():
            chan.requested_fields[str(event_type)] = tuple(names)
        chan.announced = set(chan.requested_fields)
        chan.configured = True
        self._send(self._feed_config(chan), now)

    def _on_feed_subscription(self, msg: dict[str, Any], channel: int, now: float) -> None:
        chan = self._channel(channel, now)
        if chan is None:
            return
        parsed: dict[str, list[tuple[str, str]]] = {}
        for key in ("remove", "add"):
            raw = msg.get(key, [])
            items = _parse_items(raw)
            if items is None:
                self._send(_error(channel, "INVALID_MESSAGE", f"Invalid {key} list."), now)
                return
            parsed[key] = items
        removed: list[tuple[str, str]] = []
        if msg.get("reset") is True:
            removed.extend(sorted(chan.subscriptions))
            chan.subscriptions.clear()
        for item in parsed["remove"]:
            if item in chan.subscriptions:
                chan.subscriptions.discard(item)
                removed.append(item)
        added = [item for item in dict.fromkeys(parsed["add"]) if item not in chan.subscriptions]
        chan.subscriptions.update(added)
        if not chan.configured:
            # FEED_CONFIG is lazy but comes before the first FEED_DATA (spec)
            chan.configured = True
            self._send(self._feed_config(chan), now)
        if removed:
            self._events.append(Unsubscribed(channel, tuple(removed)))
        if added:
            self._events.append(Subscribed(channel, tuple(added)))

    def _on_channel_cancel(self, msg: dict[str, Any], channel: int, now: float) -> None:
        chan = self._channel(channel, now)
        if chan is None:
            return
        del self.channels[channel]
        if chan.subscriptions:
            self._events.append(Unsubscribed(channel, tuple(sorted(chan.subscriptions))))
        self._events.append(ChannelClosed(channel))
        self._send({"type": "CHANNEL_CLOSED", "channel": channel}, now)

    _HANDLERS: Final[dict[str, Callable[[DxLinkServerProtocol, dict[str, Any], int, float], None]]] = {
        "SETUP": _on_setup,
        "AUTH": _on_auth,
        "KEEPALIVE": _on_keepalive,
        "ERROR": _on_error,
        "CHANNEL_REQUEST": _on_channel_request,
        "FEED_SETUP": _on_feed_setup,
        "FEED_SUBSCRIPTION": _on_feed_subscription,
        "CHANNEL_CANCEL": _on_channel_cancel,
    }

    # --- helpers -------------------------------------------------------------------------------

    def _feed_config(self, chan: FeedChannel) -> dict[str, object]:
        message: dict[str, object] = {
            "type": "FEED_CONFIG",
            "channel": chan.channel,
            "dataFormat": chan.data_format,
            "aggregationPeriod": chan.aggregation_period,
        }
        if chan.announced:
            message["eventFields"] = {t: list(chan.fields_for(t)) for t in sorted(chan.announced)}
        return message

    def _announce(self, chan: FeedChannel, event_type: str, now: float) -> None:
        chan.announced.add(event_type)
        self._send(self._feed_config(chan), now)

    def _send(self, message: Mapping[str, object], now: float) -> None:
        if self.state is AuthState.CLOSED:
            return
        self._out.append(_dumps(message))
        self.last_sent = now

    def _close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.state = AuthState.CLOSED


def _parse_items(raw: object) -> list[tuple[str, str]] | None:
    if not isinstance(raw, list):
        return None
    items: list[tuple[str, str]] = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        event_type, symbol = item.get("type"), item.get("symbol")
        if not isinstance(event_type, str) or not isinstance(symbol, str):
            return None
        items.append((event_type, symbol))
    return items


def iter_compact(fields: Sequence[str], values: Sequence[object]) -> Iterable[dict[str, object]]:
    """Decode a COMPACT value list into per-event dicts (for tests and tools)."""
    size = len(fields)
    if size == 0 or len(values) % size:
        raise ValueError("value count is not a multiple of the field count")
    for offset in range(0, len(values), size):
        yield dict(zip(fields, values[offset : offset + size], strict=True))
