"""The IBKR Client Portal WebSocket protocol as a pure state machine (sans I/O).

Rules: no I/O, no clock, no anyio, no websockets. Every transition happens here: frames and times
go in (:meth:`IbkrProtocol.receive_text`, :meth:`IbkrProtocol.on_timer`), typed events
(:meth:`IbkrProtocol.events_received`) and outgoing text (:meth:`IbkrProtocol.data_to_send`) come
out. :class:`IbkrProtocolError` is the only exception it raises, for a frame it cannot read; the
connection state is unchanged by such a frame. Wire facts: ``reference/ibkr-cp-websocket.md``.

Connection lifecycle (one :class:`IbkrProtocol` per WebSocket connection; the server keeps nothing
across connections, so a new connection starts from nothing and resubscribes everything):

1. ``CONNECTING``: the server sends ``system``/``act``/``sts`` (cookie auth) or
   ``{"message":"waiting for session"}``, answered with ``{"session":"<id>"}``.
2. ``sts`` with ``authenticated: true`` -> ``AUTHENTICATED`` (:class:`Authenticated`): the ``smd``
   of every wanted conid is queued, never before. ``sts`` with ``authenticated: false`` or
   ``competing: true`` -> ``UNAUTHENTICATED`` (:class:`Unauthenticated`): the caller
   reauthenticates over REST and reconnects.
3. Timers (:meth:`next_deadline`, :meth:`on_timer`): ``tic`` every ``tic_interval_s``; each conid's
   ``smd`` re-sent ``resubscribe_s`` after it was last sent (the server ends a subscription by
   itself after 10 minutes, whether data flowed or not; after hours a conid may stay silent, which
   is never a reason to reconnect); no ``system`` heartbeat for ``hb_timeout_s`` (or no
   authenticated ``sts`` that long after connecting) -> ``STALE`` (:class:`Stale`).

Frames: one JSON object per frame, as ``str`` or ``bytes`` (binary frames and stray non-UTF-8
bytes both happen; invalid bytes become U+FFFD). ``smd`` frames are deltas and the codec keeps
none of their values: :class:`MarketData` holds the decoded frame as it came. The only per-conid
memory is the first frame after each ``smd``, to drop the copy the gateway sometimes sends twice.
A topic-less frame with an integer ``conid`` and ``_updated`` (the shape of a REST snapshot
row) is market data too. Frames for a conid not subscribed on this connection (after ``umd``)
are dropped. ``tic`` answers
(often four identical copies) are deduplicated on ``lastAccessed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

OPTION_FIELDS: tuple[str, ...] = (
    "31", "84", "86", "7635", "7308", "7309", "7310", "7311", "7633", "6457", "6509",
)  # fmt: skip
UNDERLYING_FIELDS: tuple[str, ...] = ("31", "84", "86", "7635", "6509")
SEQ_FIELD = "_seq"  # the simulator's per-contract sequence number (absent on a real gateway)


class IbkrProtocolError(Exception):
    """A frame the codec cannot read (not JSON, not an object, an ``smd`` frame with no conid)."""


class Phase(StrEnum):
    CONNECTING = "connecting"  # waiting for an authenticated sts
    AUTHENTICATED = "authenticated"  # subscribed (or subscribing)
    UNAUTHENTICATED = "unauthenticated"  # sts said so: reauthenticate and reconnect
    STALE = "stale"  # no heartbeat: reconnect


# --------------------------------------------------------------------------- events


class MarketData(NamedTuple):
    """One ``smd+<conid>`` frame: ``fields`` is the decoded frame itself (codes -> raw values).

    A ``NamedTuple`` because one is built per tick (see :mod:`normalize.model`)."""

    conid: int
    fields: dict[str, Any]
    updated_ms: int | None  # ``_updated``
    seq: int | None  # ``_seq`` (simulator only)
    received: float


@dataclass(frozen=True, slots=True)
class WaitingForSession:
    """The server asked for ``{"session": ...}`` (answered by the protocol itself)."""


@dataclass(frozen=True, slots=True)
class SystemMessage:
    username: str | None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    hb_ms: int | None
    received: float


@dataclass(frozen=True, slots=True)
class AccountsMessage:
    """``act``: the accounts of the session."""

    accounts: tuple[str, ...]
    selected: str | None


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """``sts`` (whole or a fragment: a key the fragment lacks is ``None``)."""

    authenticated: bool | None
    competing: bool | None
    connected: bool | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The connection became usable: the wanted ``smd`` are queued."""

    subscriptions: int


@dataclass(frozen=True, slots=True)
class Unauthenticated:
    reason: str  # "not authenticated", "competing session"


@dataclass(frozen=True, slots=True)
class Stale:
    reason: str
    silent_s: float


@dataclass(frozen=True, slots=True)
class TicReply:
    last_accessed: int | None


@dataclass(frozen=True, slots=True)
class SubscriptionError:
    """An error answer to ``smd`` (``{"topic":"smd+X","error":...}``): logged and counted."""

    conid: int | None
    message: str
    code: object


@dataclass(frozen=True, slots=True)
class ServerError:
    """Any other message with an ``error`` key, or topic ``error``."""

    message: str
    code: object


@dataclass(frozen=True, slots=True)
class Notice:
    """Informational messages: topic-less ``result``/``message``, ``blt``, ``ntf``."""

    topic: str | None
    text: str


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    topic: str


IbkrEvent = (
    MarketData
    | WaitingForSession
    | SystemMessage
    | Heartbeat
    | AccountsMessage
    | AuthStatus
    | Authenticated
    | Unauthenticated
    | Stale
    | TicReply
    | SubscriptionError
    | ServerError
    | Notice
    | UnknownMessage
)


# --------------------------------------------------------------------------- outgoing messages


def smd_message(conid: int, fields: Sequence[str]) -> str:
    """``smd+265598+{"fields":["31","84"]}``."""
    return f"smd+{conid}+" + orjson.dumps({"fields": list(fields)}).decode()


def umd_message(conid: int) -> str:
    return f"umd+{conid}+{{}}"


def session_message(session: str) -> str:
    return orjson.dumps({"session": session}).decode()


TIC_MESSAGE = "tic"


def session_from_cookie(value: str) -> str:
    """The session id in an ``api`` cookie value, in either documented form: ``<id>`` or
    ``{"session":"<id>"}`` (a leading ``api=`` is ignored)."""
    text = value.strip().removeprefix("api=").strip()
    if text.startswith("{"):
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
        if type(decoded) is dict and type(decoded.get("session")) is str:
            return str(decoded["session"])
    return text


# --------------------------------------------------------------------------- decoding


def decode_frame(data: str | bytes) -> dict[str, Any]:
    """One frame as a JSON object; stray non-UTF-8 bytes are replaced (U+FFFD).

    Raises:
        IbkrProtocolError: not JSON, or not a JSON object.
    """
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            if isinstance(data, str):
                decoded = orjson.loads(data.encode("utf-8", "replace"))
            else:
                decoded = orjson.loads(bytes(data).decode("utf-8", "replace"))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            raise IbkrProtocolError("frame is not JSON") from None
    except TypeError:
        raise IbkrProtocolError(f"frame of type {type(data).__name__}") from None
    if type(decoded) is not dict:
        raise IbkrProtocolError(f"frame is a JSON {type(decoded).__name__}, not an object")
    return decoded


def _conid_from_topic(topic: str) -> int | None:
    target = topic[4:].split("+", 1)[0].split("@", 1)[0].strip()
    if not target.isascii() or not target.isdigit() or len(target) > 18:
        return None
    return int(target)


def _opt_bool(value: object) -> bool | None:
    return value if type(value) is bool else None


def _opt_str(value: object) -> str | None:
    return value if type(value) is str else None


def _opt_int(value: object) -> int | None:
    return value if type(value) is int else None


def _text_of(value: object) -> str:
    if type(value) is str:
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


# --------------------------------------------------------------------------- the state machine


class IbkrProtocol:
    """One WebSocket connection's protocol state; see the module docstring.

    Args:
        session: the session id for ``{"session": ...}`` if the server asks for it.
        now: connection time (POSIX seconds).
        tic_interval_s: ``tic`` cadence.
        hb_timeout_s: no ``system`` heartbeat (or no authenticated ``sts``) this long -> stale.
        resubscribe_s: each conid's ``smd`` is re-sent this long after it was last sent.
    """

    def __init__(
        self,
        *,
        session: str | None,
        now: float,
        tic_interval_s: float = 60.0,
        hb_timeout_s: float = 30.0,
        resubscribe_s: float = 540.0,
    ) -> None:
        self.phase = Phase.CONNECTING
        self.session = session
        self.connected_at = now
        self.tic_interval_s = tic_interval_s
        self.hb_timeout_s = hb_timeout_s
        self.resubscribe_s = resubscribe_s
        self.last_hb_at: float | None = None  # receive time of the last system hb
        self._alive_at = now  # the last heartbeat; before the first, the connection/auth time
        self._auth_deadline = now + hb_timeout_s
        self.username: str | None = None
        self.accounts: tuple[str, ...] = ()
        self._next_tic = now + tic_interval_s
        self._events: list[IbkrEvent] = []
        self._out: list[str] = []
        self._wanted: dict[int, tuple[str, ...]] = {}
        self._sent_at: dict[int, float] = {}  # conid -> last smd time, on this connection
        self._first: dict[int, str | bytes | None] = {}  # conid -> first frame after its smd
        self._last_accessed: object = None
        self._session_sent = False
        # statistics (read by the actor)
        self.frames = 0
        self.duplicate_frames = 0
        self.dropped_frames = 0  # frames for conids not subscribed on this connection
        self.tic_replies = 0
        self.duplicate_tic_replies = 0
        self.smd_sent = 0
        self.umd_sent = 0
        self.resubscribed = 0

    # ----------------------------------------------------------------------- verbs

    def events_received(self) -> list[IbkrEvent]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str]:
        out, self._out = self._out, []
        return out

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def subscriptions(self) -> int:
        """Conids with a live ``smd`` on this connection."""
        return len(self._sent_at)

    def subscribed(self) -> set[int]:
        return set(self._sent_at)

    def set_subscriptions(
        self, wanted: Mapping[int, Sequence[str]], now: float
    ) -> tuple[list[int], list[int]]:
        """Make ``wanted`` (conid -> fields) the subscriptions: ``smd`` for conids that are new (or
        whose fields changed), ``umd`` for conids no longer wanted. Sent only once authenticated;
        until then they wait. Returns ``(subscribed, unsubscribed)`` conids (queued now)."""
        new = {int(c): tuple(f) for c, f in wanted.items()}
        removed = [c for c in self._wanted if c not in new]
        changed = [c for c, f in new.items() if self._wanted.get(c) != f]
        self._wanted = new
        if self.phase is not Phase.AUTHENTICATED:
            return [], []
        unsubscribed = []
        for conid in removed:
            if self._sent_at.pop(conid, None) is not None:
                self._first.pop(conid, None)
                self._out.append(umd_message(conid))
                self.umd_sent += 1
                unsubscribed.append(conid)
        for conid in changed:
            self._subscribe(conid, now)
        return changed, unsubscribed

    def receive_text(self, data: str | bytes, now: float) -> None:
        """Feed one frame (text or binary) received at ``now``.

        Raises:
            IbkrProtocolError: the frame cannot be read (nothing changed).
        """
        msg = decode_frame(data)
        topic = msg.get("topic")
        if type(topic) is str:
            if topic.startswith("smd+") and "error" not in msg:
                self._on_market_data(msg, topic, data, now)
            else:
                self._on_topic(msg, topic, now)
        elif topic is None:
            conid = msg.get("conid")
            if type(conid) is int and "error" not in msg and ("_updated" in msg or "server_id" in msg):
                self._on_market_data(msg, f"smd+{conid}", data, now)  # market data without a topic
            else:
                self._on_untopical(msg)
        else:
            raise IbkrProtocolError(f"topic of type {type(topic).__name__}")
        self.frames += 1

    def next_deadline(self) -> float:
        """The next time :meth:`on_timer` has something to do."""
        if self.phase in (Phase.UNAUTHENTICATED, Phase.STALE):
            return float("inf")
        deadline = min(self._next_tic, self._stale_deadline())
        if self._sent_at:
            deadline = min(deadline, min(self._sent_at.values()) + self.resubscribe_s)
        return deadline

    def on_timer(self, now: float, *, check_stale: bool = True) -> None:
        """Do what is due at ``now``: ``tic``, re-sent ``smd``, the stale check (skipped with
        ``check_stale=False``, e.g. while the caller could not read because its consumer is full)."""
        if self.phase in (Phase.UNAUTHENTICATED, Phase.STALE):
            return
        if check_stale and now >= self._stale_deadline():
            if self.phase is Phase.CONNECTING and now >= self._auth_deadline:
                silent = now - self.connected_at
                reason = f"not authenticated within {self.hb_timeout_s:g} s"
            else:
                silent = now - self._alive_at
                reason = f"no heartbeat for {silent:.1f} s"
            self.phase = Phase.STALE
            self._events.append(Stale(reason, silent))
            return
        if now >= self._next_tic:
            self._out.append(TIC_MESSAGE)
            self._next_tic = now + self.tic_interval_s
        if self.phase is Phase.AUTHENTICATED:
            due = [c for c, t in self._sent_at.items() if now >= t + self.resubscribe_s]
            for conid in due:
                self._subscribe(conid, now)
            self.resubscribed += len(due)

    def backpressure_ended(self, now: float) -> None:
        """The caller could not read for a while (its consumer was full): frames, heartbeats
        among them, wait in the socket, so silence since ``now`` is what counts from here."""
        self._alive_at = max(self._alive_at, now)
        self._auth_deadline = max(self._auth_deadline, now + self.hb_timeout_s)

    # ----------------------------------------------------------------------- internals

    def _stale_deadline(self) -> float:
        deadline = self._alive_at + self.hb_timeout_s
        if self.phase is Phase.CONNECTING:
            deadline = min(deadline, self._auth_deadline)
        return deadline

    def _subscribe(self, conid: int, now: float) -> None:
        self._out.append(smd_message(conid, self._wanted[conid]))
        self._sent_at[conid] = now
        self._first[conid] = None  # the next frame is a full one, maybe sent twice
        self.smd_sent += 1

    def _on_market_data(self, msg: dict[str, Any], topic: str, data: str | bytes, now: float) -> None:
        conid = msg.get("conid")
        if type(conid) is not int:
            conid = _conid_from_topic(topic)
            if conid is None:
                raise IbkrProtocolError(f"smd frame without a conid (topic {topic[:40]!r})")
        if conid not in self._sent_at:
            self.dropped_frames += 1
            return
        first = self._first
        if conid in first:
            previous = first[conid]
            if previous is None:
                first[conid] = data  # the first frame since smd: remember it for one frame
            else:
                del first[conid]
                if previous == data:
                    self.duplicate_frames += 1
                    return
        updated = msg.get("_updated")
        seq = msg.get(SEQ_FIELD)
        self._events.append(
            MarketData(
                conid,
                msg,
                updated if type(updated) is int else None,
                seq if type(seq) is int else None,
                now,
            )
        )

    def _on_topic(self, msg: dict[str, Any], topic: str, now: float) -> None:
        if "error" in msg:
            text = _text_of(msg.get("error"))
            if topic.startswith("smd+"):
                self._events.append(SubscriptionError(_conid_from_topic(topic), text, msg.get("code")))
            else:
                self._events.append(ServerError(text, msg.get("code")))
            return
        if topic == "system":
            if "hb" in msg:
                self.last_hb_at = self._alive_at = now
                hb = msg.get("hb")
                self._events.append(Heartbeat(hb if type(hb) is int else None, now))
            else:
                self.username = _opt_str(msg.get("success"))
                self._events.append(SystemMessage(self.username))
            return
        if topic == "tic":
            self.tic_replies += 1
            last_accessed = msg.get("lastAccessed")
            if last_accessed is not None and last_accessed == self._last_accessed:
                self.duplicate_tic_replies += 1
                return
            self._last_accessed = last_accessed
            self._events.append(TicReply(_opt_int(last_accessed)))
            return
        if topic == "sts":
            self._on_status(msg.get("args"), now)
            return
        if topic == "act":
            args = msg.get("args")
            accounts: tuple[str, ...] = ()
            selected = None
            if type(args) is dict:
                raw = args.get("accounts")
                if type(raw) is list:
                    accounts = tuple(a for a in raw if type(a) is str)
                selected = _opt_str(args.get("selectedAccount"))
            self.accounts = accounts
            self._events.append(AccountsMessage(accounts, selected))
            return
        if topic in ("blt", "ntf"):
            self._events.append(Notice(topic, _text_of(msg.get("args"))))
            return
        self._events.append(UnknownMessage(topic))

    def _on_status(self, args: object, now: float) -> None:
        if type(args) is not dict:
            raise IbkrProtocolError("sts without args")
        status = AuthStatus(
            _opt_bool(args.get("authenticated")),
            _opt_bool(args.get("competing")),
            _opt_bool(args.get("connected")),
            _opt_str(args.get("message")),
        )
        self._events.append(status)
        if self.phase in (Phase.UNAUTHENTICATED, Phase.STALE):
            return
        if status.competing is True:
            self.phase = Phase.UNAUTHENTICATED
            self._events.append(Unauthenticated("competing session"))
        elif status.authenticated is False:
            self.phase = Phase.UNAUTHENTICATED
            self._events.append(Unauthenticated("not authenticated"))
        elif status.authenticated is True and self.phase is Phase.CONNECTING:
            self.phase = Phase.AUTHENTICATED
            self._alive_at = max(self._alive_at, now)  # heartbeats are due from here
            for conid in self._wanted:
                self._subscribe(conid, now)
            self._events.append(Authenticated(len(self._wanted)))

    def _on_untopical(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            self._events.append(ServerError(_text_of(msg.get("error")), msg.get("code")))
            return
        message = msg.get("message")
        if message == "waiting for session":
            self._events.append(WaitingForSession())
            if self.session is not None and not self._session_sent:
                self._out.append(session_message(self.session))
                self._session_sent = True
            return
        for key in ("message", "result"):
            if key in msg:
                self._events.append(Notice(None, _text_of(msg.get(key))))
                return
        self._events.append(UnknownMessage(""))


# --------------------------------------------------------------------------- subscription plan


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    """Which conids to subscribe, with which fields, within the market data lines."""

    wanted: dict[int, tuple[str, ...]]  # conid -> fields, options first
    options: int
    underlyings: int
    left_out: tuple[int, ...]  # conids over the limit (options first kept)


def plan_subscriptions(
    option_conids: Iterable[int], underlying_conids: Iterable[int], max_subscriptions: int
) -> SubscriptionPlan:
    """One subscription per conid: every option first (in the order given), then every underlying
    (stocks held and the options' underlyings), up to ``max_subscriptions``; the rest left out."""
    wanted: dict[int, tuple[str, ...]] = {}
    left_out: dict[int, None] = {}  # ordered set
    counts = {OPTION_FIELDS: 0, UNDERLYING_FIELDS: 0}
    for fields, conids in ((OPTION_FIELDS, option_conids), (UNDERLYING_FIELDS, underlying_conids)):
        for conid in conids:
            if conid in wanted or conid in left_out:
                continue
            if len(wanted) < max_subscriptions:
                wanted[conid] = fields
                counts[fields] += 1
            else:
                left_out[conid] = None
    return SubscriptionPlan(wanted, counts[OPTION_FIELDS], counts[UNDERLYING_FIELDS], tuple(left_out))
