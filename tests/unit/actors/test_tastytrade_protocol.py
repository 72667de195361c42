"""The DXLink client codec: handshake table, timers, COMPACT/FULL decoding, FEED_CONFIG tracking,
bad input, subscription chunking. Pure: no sockets, time passed in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.tastytrade import protocol as protocol_module
from actors.tastytrade.protocol import (
    EVENT_FIELDS,
    EXCERPT_CHARS,
    MAX_CHUNK_BYTES,
    REQUESTED_FIELDS,
    Authorized,
    ChannelClosed,
    ChannelOpened,
    ConnectionState,
    DxLinkProtocol,
    DxLinkProtocolError,
    ErrorMessage,
    FeedConfig,
    FeedData,
    FeedReady,
    Greeks,
    HandshakeTimeout,
    Malformed,
    Quote,
    ServerSetup,
    ServerTimeout,
    Stale,
    Trade,
    Unauthorized,
)
from normalize import tastytrade as tastytrade_module
from normalize.book import SPEEDUPS as _SPEEDUPS
from normalize.tastytrade import map_feed

DATA = Path(__file__).resolve().parents[2] / "data" / "tastytrade"
TOKEN = "quote-token-123"
SUBS = [("Greeks", ".SPY250117C500"), ("Quote", ".SPY250117C500"), ("Quote", "SPY"), ("Trade", "SPY")]
T0 = 1000.0


def capture(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / name).read_text()))


def server_frames(name: str) -> list[dict[str, Any]]:
    return [f["message"] for f in capture(name)["frames"] if f["direction"] == "server"]


def msg(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


def new(**kwargs: Any) -> DxLinkProtocol:
    options: dict[str, Any] = {"token": TOKEN, "subscriptions": SUBS, "now": T0, **kwargs}
    return DxLinkProtocol(**options)


SETUP = msg(type="SETUP", channel=0, keepaliveTimeout=60, acceptKeepaliveTimeout=60, version="1.0-test")
UNAUTHORIZED = msg(type="AUTH_STATE", channel=0, state="UNAUTHORIZED")
AUTHORIZED = msg(type="AUTH_STATE", channel=0, state="AUTHORIZED", userId="user-1")
OPENED = msg(
    type="CHANNEL_OPENED",
    channel=1,
    service="FEED",
    parameters={"contract": "AUTO", "subFormat": "LIST"},
)


def at(state: ConnectionState, **kwargs: Any) -> DxLinkProtocol:
    """A protocol driven to ``state`` (its output and events drained)."""
    p = new(**kwargs)
    steps = {
        ConnectionState.SETUP_SENT: [],
        ConnectionState.AUTH_SENT: [SETUP, UNAUTHORIZED],
        ConnectionState.CHANNEL_REQUESTED: [SETUP, UNAUTHORIZED, AUTHORIZED],
        ConnectionState.STREAMING: [SETUP, UNAUTHORIZED, AUTHORIZED, OPENED],
        ConnectionState.CLOSED: [SETUP, UNAUTHORIZED, UNAUTHORIZED],
    }[state]
    for text in steps:
        p.receive_text(text, T0)
    assert p.state is state
    p.data_to_send()
    p.events_received()
    return p


def sent(p: DxLinkProtocol) -> list[dict[str, Any]]:
    return [json.loads(t) for t in p.data_to_send()]


FEED_SETUP = {
    "type": "FEED_SETUP",
    "channel": 1,
    "acceptAggregationPeriod": 0.1,
    "acceptDataFormat": "COMPACT",
    "acceptEventFields": {t: list(f) for t, f in sorted(REQUESTED_FIELDS.items())},
}
SUBSCRIBE_ALL = {
    "type": "FEED_SUBSCRIPTION",
    "channel": 1,
    "reset": True,
    "add": [{"type": t, "symbol": s} for t, s in sorted(SUBS)],
}
CHANNEL_REQUEST = {
    "type": "CHANNEL_REQUEST",
    "channel": 1,
    "service": "FEED",
    "parameters": {"contract": "AUTO"},
}
S = ConnectionState

# (state, incoming) -> (events, outgoing, next state)
HANDSHAKE: list[tuple[str, ConnectionState, str, list[Any], list[dict[str, Any]], ConnectionState]] = [
    ("server SETUP", S.SETUP_SENT, SETUP, [ServerSetup("1.0-test", 60.0, 60.0)], [], S.SETUP_SENT),
    (
        "UNAUTHORIZED -> AUTH",
        S.SETUP_SENT,
        UNAUTHORIZED,
        [],
        [{"type": "AUTH", "channel": 0, "token": TOKEN}],
        S.AUTH_SENT,
    ),
    (
        "AUTHORIZED -> CHANNEL_REQUEST",
        S.AUTH_SENT,
        AUTHORIZED,
        [Authorized("user-1")],
        [CHANNEL_REQUEST],
        S.CHANNEL_REQUESTED,
    ),
    (
        "AUTHORIZED without AUTH",
        S.SETUP_SENT,
        AUTHORIZED,
        [Authorized("user-1")],
        [CHANNEL_REQUEST],
        S.CHANNEL_REQUESTED,
    ),
    (
        "token rejected",
        S.AUTH_SENT,
        UNAUTHORIZED,
        [Unauthorized("the quote token was rejected")],
        [],
        S.CLOSED,
    ),
    (
        "ERROR UNAUTHORIZED",
        S.AUTH_SENT,
        msg(type="ERROR", channel=0, error="UNAUTHORIZED", message="The token is not valid."),
        [Unauthorized("ERROR UNAUTHORIZED: The token is not valid.")],
        [],
        S.CLOSED,
    ),
    (
        "CHANNEL_OPENED -> FEED_SETUP + subscriptions",
        S.CHANNEL_REQUESTED,
        OPENED,
        [ChannelOpened(1), FeedReady(1, 4, 1)],
        [FEED_SETUP, SUBSCRIBE_ALL],
        S.STREAMING,
    ),
    (
        "another channel opened",
        S.CHANNEL_REQUESTED,
        msg(type="CHANNEL_OPENED", channel=5),
        [],
        [],
        S.CHANNEL_REQUESTED,
    ),
    ("duplicate CHANNEL_OPENED", S.STREAMING, OPENED, [], [], S.STREAMING),
    ("KEEPALIVE", S.STREAMING, msg(type="KEEPALIVE", channel=0), [], [], S.STREAMING),
    (
        "authorization withdrawn",
        S.STREAMING,
        UNAUTHORIZED,
        [Unauthorized("the server withdrew the authorization")],
        [],
        S.CLOSED,
    ),
    (
        "ERROR TIMEOUT",
        S.STREAMING,
        json.dumps(capture("ws_error.json")["frames"][0]["message"]),
        [
            ServerTimeout(
                "ERROR TIMEOUT: The timeout has been reached. The message was last received 60 seconds ago."
            )
        ],
        [],
        S.CLOSED,
    ),
    (
        "informational ERROR",
        S.STREAMING,
        msg(type="ERROR", channel=1, error="BAD_ACTION", message="Unknown message type"),
        [ErrorMessage(1, "BAD_ACTION", "Unknown message type")],
        [],
        S.STREAMING,
    ),
    (
        "CHANNEL_CLOSED",
        S.STREAMING,
        msg(type="CHANNEL_CLOSED", channel=1),
        [ChannelClosed("the server closed feed channel 1")],
        [],
        S.CLOSED,
    ),
    (
        "CHANNEL_CLOSED of another channel",
        S.STREAMING,
        msg(type="CHANNEL_CLOSED", channel=3),
        [],
        [],
        S.STREAMING,
    ),
    ("closed: input ignored", S.CLOSED, AUTHORIZED, [], [], S.CLOSED),
]


@pytest.mark.parametrize(
    ("state", "incoming", "events", "outgoing", "after"),
    [row[1:] for row in HANDSHAKE],
    ids=[row[0] for row in HANDSHAKE],
)
def test_handshake_table(
    state: ConnectionState,
    incoming: str,
    events: list[Any],
    outgoing: list[dict[str, Any]],
    after: ConnectionState,
) -> None:
    p = at(state)
    p.receive_text(incoming, T0 + 1)
    assert p.events_received() == events
    assert sent(p) == outgoing
    assert p.state is after


def test_first_frame_is_setup() -> None:
    p = new(keepalive_s=20, stale_s=45)
    assert sent(p) == [
        {
            "type": "SETUP",
            "channel": 0,
            "keepaliveTimeout": 40,
            "acceptKeepaliveTimeout": 45,
            "version": "0.1-streaming-greeks/0.1.0",
        }
    ]


def test_the_reference_transcript_drives_the_handshake() -> None:
    """The server half of the documented transcript, channel number aside, gets the client to
    streaming and decodes its data."""
    p = new(channel=3)
    p.data_to_send()
    for message in server_frames("ws_handshake.json"):
        p.receive_text(json.dumps(message), T0)
    events = p.events_received()
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "ServerSetup",
        "Authorized",
        "ChannelOpened",
        "FeedReady",
        "FeedConfig",
        "FeedConfig",
        "FeedData",
    ]
    out = sent(p)
    assert [m["type"] for m in out] == ["AUTH", "CHANNEL_REQUEST", "FEED_SETUP", "FEED_SUBSCRIPTION"]
    data = events[-1]
    assert isinstance(data, FeedData)
    assert [g.event_symbol for g in data.events] == [".SPY250117C500", ".SPY250117P500"]
    call = data.events[0]
    assert isinstance(call, Greeks)
    assert call.index_ == 7235129486797176832  # beyond 2**53: kept exactly
    assert (call.time, call.price, call.volatility, call.gamma) == (1684559855338, 26.338, 0.397, 4.8e-12)


# --------------------------------------------------------------------------- timers


def test_keepalive_after_keepalive_s_of_sending_nothing() -> None:
    p = at(S.STREAMING, keepalive_s=5, stale_s=60)
    assert p.next_deadline() == T0 + 5
    p.on_timer(T0 + 4.9)
    assert sent(p) == []
    p.on_timer(T0 + 5)
    assert sent(p) == [{"type": "KEEPALIVE", "channel": 0}]
    assert p.next_deadline() == T0 + 10
    p.receive_text(msg(type="KEEPALIVE", channel=0), T0 + 7)  # receiving does not delay it
    assert p.next_deadline() == T0 + 10
    p.update_subscriptions(add=[("Quote", "QQQ")], now=T0 + 8)  # sending does
    assert p.next_deadline() == T0 + 13


def test_stale_after_stale_s_of_silence() -> None:
    p = at(S.STREAMING, keepalive_s=5, stale_s=12)
    p.receive_text(msg(type="KEEPALIVE", channel=0), T0 + 3)
    p.on_timer(T0 + 14.9)
    assert not [e for e in p.events_received() if isinstance(e, Stale)]
    p.on_timer(T0 + 15)
    assert p.events_received() == [Stale("nothing received for 12.0 s")]
    assert p.state is S.CLOSED
    assert p.next_deadline() == float("inf")


def test_backpressure_is_not_staleness() -> None:
    p = at(S.STREAMING, keepalive_s=5, stale_s=12)
    p.note_backpressure(T0 + 10)
    p.on_timer(T0 + 20)
    assert p.state is S.STREAMING


@pytest.mark.parametrize("state", [S.SETUP_SENT, S.AUTH_SENT, S.CHANNEL_REQUESTED])
def test_handshake_timeout(state: ConnectionState) -> None:
    p = at(state, handshake_timeout_s=3, keepalive_s=30)
    assert p.next_deadline() == T0 + 3
    p.on_timer(T0 + 3)
    assert p.events_received() == [HandshakeTimeout(f"feed not ready within 3 s (state {state.value})")]
    assert p.state is S.CLOSED


def test_staleness_is_for_streaming_connections_the_handshake_has_its_own_timeout() -> None:
    p = at(S.AUTH_SENT, handshake_timeout_s=8, keepalive_s=30, stale_s=2)
    assert p.next_deadline() == T0 + 8
    p.on_timer(T0 + 5)
    assert p.events_received() == []
    assert p.state is S.AUTH_SENT


def test_no_handshake_timeout_once_streaming() -> None:
    p = at(S.STREAMING, handshake_timeout_s=3, keepalive_s=30, stale_s=60)
    p.on_timer(T0 + 10)
    assert p.state is S.STREAMING


# --------------------------------------------------------------------------- decoding


def streaming_with(fields: dict[str, list[str]] | None = None, channel: int = 1) -> DxLinkProtocol:
    p = at(S.STREAMING)
    if fields is not None:
        p.receive_text(
            msg(
                type="FEED_CONFIG",
                channel=channel,
                dataFormat="COMPACT",
                aggregationPeriod=0.1,
                eventFields=fields,
            ),
            T0,
        )
        p.events_received()
    return p


def feed(p: DxLinkProtocol, message: dict[str, Any] | str | bytes) -> list[Any]:
    p.receive_text(message if isinstance(message, str | bytes) else json.dumps(message), T0 + 1)
    return p.events_received()


def test_compact_with_the_requested_fields_when_feed_config_names_none() -> None:
    p = streaming_with(None)
    values = [".SPY250117C500", 0, 1684559855338, 7, 26.3, 0.39, 0.5, 0.01, -0.2, 0.05, 0.3]
    (data,) = feed(p, {"type": "FEED_DATA", "channel": 1, "data": ["Greeks", values]})
    assert isinstance(data, FeedData)
    assert data.fields == frozenset(REQUESTED_FIELDS["Greeks"])
    (g,) = data.events
    assert g == Greeks(
        ".SPY250117C500", 0, None, None, 1684559855338, 7, 26.3, 0.39, 0.5, 0.01, -0.2, 0.05, 0.3
    )


def test_feed_config_without_fields_then_with_fields() -> None:
    """The first FEED_CONFIG (docs) names no fields: the requested order applies; a later one
    names them in another order, which applies from then on."""
    p = at(S.STREAMING)
    (first,) = feed(
        p, {"type": "FEED_CONFIG", "channel": 1, "dataFormat": "COMPACT", "aggregationPeriod": 0.1}
    )
    assert first == FeedConfig(1, "COMPACT", None, 0.1, {})
    (data,) = feed(
        p, {"type": "FEED_DATA", "channel": 1, "data": ["Quote", ["SPY", 0, 3, 0, 0, 500.1, 500.2]]}
    )
    assert data.events[0][6:8] == (500.1, 500.2)
    reordered = ["eventSymbol", "askPrice", "bidPrice", "sequence"]
    (second,) = feed(
        p,
        {
            "type": "FEED_CONFIG",
            "channel": 1,
            "dataFormat": "COMPACT",
            "aggregationPeriod": 0.1,
            "eventFields": {"Quote": reordered},
        },
    )
    assert second.event_fields == {"Quote": tuple(reordered)}
    (data,) = feed(p, {"type": "FEED_DATA", "channel": 1, "data": ["Quote", ["SPY", 500.2, 500.1, 4]]})
    (q,) = data.events
    assert (q.bid_price, q.ask_price, q.sequence, q.bid_time) == (500.1, 500.2, 4, None)
    assert data.fields == frozenset(reordered)
    # a FEED_CONFIG for another type keeps the Quote fields (configs merge)
    feed(
        p,
        {
            "type": "FEED_CONFIG",
            "channel": 1,
            "dataFormat": "COMPACT",
            "eventFields": {"Trade": ["eventSymbol", "price"]},
        },
    )
    (data,) = feed(p, {"type": "FEED_DATA", "channel": 1, "data": ["Quote", ["SPY", 1.0, 0.9, 5]]})
    assert data.events[0].bid_price == 0.9


def test_several_events_and_several_types_in_one_message() -> None:
    p = streaming_with({"Quote": ["eventSymbol", "bidPrice", "askPrice"], "Trade": ["eventSymbol", "price"]})
    events = feed(
        p,
        {
            "type": "FEED_DATA",
            "channel": 1,
            "data": [
                "Quote",
                ["SPY", 1.0, 1.1, "QQQ", 2.0, 2.1],
                "Trade",
                ["SPY", 1.05, "QQQ", 2.05, "IWM", 3.0],
            ],
        },
    )
    assert [(type(e).__name__, e.event_type, len(e.events)) for e in events] == [
        ("FeedData", "Quote", 2),
        ("FeedData", "Trade", 3),
    ]
    assert [t.price for t in events[1].events] == [1.05, 2.05, 3.0]
    assert isinstance(events[1].events[0], Trade)


def test_captured_trade_with_eventtype_in_the_row_nan_and_exponent() -> None:
    cap = capture("ws_feed_data_trade.json")
    p = streaming_with(cap["fields"], channel=3)
    (data,) = feed(p, server_frames("ws_feed_data_trade.json")[0])
    spy, btc = data.events
    assert (spy.event_symbol, spy.price, spy.day_volume, spy.size) == ("SPY", 559.36, 13743299.0, 100.0)
    assert (btc.event_symbol, btc.price, btc.day_volume, btc.size) == ("BTC/USD:CXTALP", 58356.71, None, None)
    assert data.fields == frozenset({"eventSymbol", "price", "dayVolume", "size"})


def test_captured_delayed_greeks() -> None:
    cap = capture("ws_feed_data_greeks.json")
    p = streaming_with(cap["fields"])
    (data,) = feed(p, server_frames("ws_feed_data_greeks.json")[0])
    pltr, wba = data.events
    assert pltr.event_symbol == ".PLTR231117C15"
    assert (pltr.volatility, pltr.delta, pltr.vega) == (
        0.859042135169914,
        0.679454583347139,
        0.01518018285523352,
    )
    assert wba.event_symbol == ".WBA231117P27.5"
    assert wba.theta == -0.01993263273054975
    assert (pltr.time, pltr.price) == (None, None)  # not carried by this feed
    assert not {"time", "price"} & data.fields


def test_captured_quote_with_empty_exchange_and_nan_sizes() -> None:
    cap = capture("ws_feed_data_quote.json")
    p = streaming_with(cap["fields"], channel=7)
    (data,) = feed(p, server_frames("ws_feed_data_quote.json")[0])
    aapl, spx = data.events
    assert isinstance(aapl, Quote)
    assert (aapl.bid_price, aapl.ask_price, aapl.bid_size, aapl.ask_exchange_code) == (
        168.4,
        168.46,
        51.0,
        "Q",
    )
    assert (spx.bid_price, spx.ask_price, spx.bid_size, spx.ask_size) == (4979.73, 5064.47, None, None)
    assert spx.bid_exchange_code == ""


def test_captured_full_format() -> None:
    p = at(S.STREAMING)
    (data,) = feed(p, server_frames("ws_feed_data_full.json")[0])
    (g,) = data.events
    assert g == Greeks(
        ".SPY250117C500",
        0,
        0,
        7235129486797176832,
        1684559855338,
        0,
        26.338,
        0.397,
        0.9999,
        4.8e-12,
        -2.5e-12,
        0.0183,
        3.7e-12,
    )


def test_full_omitted_field_is_no_value() -> None:
    """FULL leaves empty fields out: a carried field that is missing is None (a clear)."""
    p = at(S.STREAMING)
    (data,) = feed(
        p,
        {
            "type": "FEED_DATA",
            "channel": 1,
            "data": [{"eventType": "Greeks", "eventSymbol": ".X250117C5", "delta": 0.5}],
        },
    )
    (g,) = data.events
    assert (g.delta, g.gamma, g.price) == (0.5, None, None)
    assert "gamma" in data.fields


@pytest.mark.parametrize("nan", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinities_are_no_value(nan: str) -> None:
    p = streaming_with({"Greeks": list(EVENT_FIELDS["Greeks"])})
    values = [".SPY250117C500", 0, 0, 1, 2, 3, nan, nan, 1.5e-5, 2.5e-12, -1e2, nan, 7]
    (data,) = feed(p, {"type": "FEED_DATA", "channel": 1, "data": ["Greeks", values]})
    (g,) = data.events
    assert (g.price, g.volatility, g.rho) == (None, None, None)
    assert (g.delta, g.gamma, g.theta, g.vega) == (1.5e-5, 2.5e-12, -100.0, 7)


def test_unsolicited_switch_to_full_and_back() -> None:
    p = streaming_with({"Quote": ["eventSymbol", "bidPrice", "askPrice"]})
    (switch,) = feed(p, {"type": "FEED_CONFIG", "channel": 1, "dataFormat": "FULL", "aggregationPeriod": 0.1})
    assert switch == FeedConfig(1, "FULL", "COMPACT", 0.1, {})
    (data,) = feed(
        p,
        {
            "type": "FEED_DATA",
            "channel": 1,
            "data": [
                {"eventType": "Quote", "eventSymbol": "SPY", "bidPrice": 1.0, "askPrice": 1.1},
                {"eventType": "Quote", "eventSymbol": "QQQ", "bidPrice": 2.0, "askPrice": 2.1},
            ],
        },
    )
    assert [(q.event_symbol, q.bid_price) for q in data.events] == [("SPY", 1.0), ("QQQ", 2.0)]
    assert data.fields == frozenset({"eventSymbol", "bidPrice", "askPrice"})
    # data is decoded by its shape, so COMPACT data still decodes after the switch
    (data,) = feed(p, {"type": "FEED_DATA", "channel": 1, "data": ["Quote", ["SPY", 1.2, 1.3]]})
    assert data.events[0].ask_price == 1.3


# --------------------------------------------------------------------------- bad input


def streaming_greeks() -> DxLinkProtocol:
    return streaming_with({"Greeks": list(EVENT_FIELDS["Greeks"])})


GOOD = json.dumps(server_frames("ws_handshake.json")[-1] | {"channel": 1})


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json at all", "not valid JSON"),
        ('{"type":"FEED_DATA","channel":1,"data":[Greeks, NaN', "not valid JSON"),  # the simulator's fault
        (GOOD[: len(GOOD) // 2], "not valid JSON"),  # truncated
        ("[1, 2, 3]", "not a JSON object"),
        ('{"channel": 0}', "no message type or channel"),
        ('{"type":"SIM_UNKNOWN","channel":0,"payload":{"x":1}}', "unknown message type 'SIM_UNKNOWN'"),
        ('{"type":"FEED_DATA","channel":1,"data":{"a":1}}', "FEED_DATA without a data list"),
        (
            '{"type":"FEED_DATA","channel":1,"data":["Greeks"]}',
            "COMPACT data is not [type, values, ...] pairs",
        ),
        (
            '{"type":"FEED_DATA","channel":1,"data":["Greeks",[".A",0,0,0,0,0,1,2,3,4,5,6]]}',
            "Greeks: 12 values is not a multiple of 13 fields",
        ),
        (
            '{"type":"FEED_DATA","channel":1,"data":["Summary",["SPY",1]]}',
            "no usable fields for event type 'Summary'",
        ),
        (
            '{"type":"FEED_DATA","channel":1,"data":["Greeks",[".A",0,0,0,0,0,"x",2,3,4,5,6,7]]}',
            "Greeks: 1 events with invalid values",
        ),
        ('{"type":"FEED_DATA","channel":1,"data":[{"eventType":"Nope"}, 3]}', "FULL data: 2 unusable events"),
        ('{"type":"AUTH_STATE","channel":0,"state":"MAYBE"}', "unknown AUTH_STATE state"),
    ],
)
def test_malformed_input_is_an_event_and_the_stream_goes_on(frame: str, reason: str) -> None:
    p = streaming_greeks()
    p.receive_text(frame, T0 + 1)
    (event,) = p.events_received()
    assert event == Malformed(reason, frame[:EXCERPT_CHARS])
    assert p.state is S.STREAMING
    (data,) = feed(p, GOOD)
    assert isinstance(data, FeedData)
    assert len(data.events) == 2


def test_bad_rows_are_dropped_and_good_rows_kept() -> None:
    p = streaming_greeks()
    good = [".A", 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    bad_symbol = [7, *good[1:]]
    bool_value = [".B", 0, 0, 0, 0, 0, True, 2, 3, 4, 5, 6, 7]
    nested = [".C", 0, 0, 0, 0, 0, [1], 2, 3, 4, 5, 6, 7]
    events = feed(
        p, {"type": "FEED_DATA", "channel": 1, "data": ["Greeks", good + bad_symbol + bool_value + nested]}
    )
    data, problem = events
    assert [g.event_symbol for g in data.events] == [".A"]
    assert isinstance(problem, Malformed)
    assert problem.reason == "Greeks: 3 events with invalid values"


def test_long_malformed_frames_are_truncated() -> None:
    p = at(S.STREAMING)
    p.receive_text("x" * 10_000, T0)
    (event,) = p.events_received()
    assert len(event.excerpt) == EXCERPT_CHARS
    p.receive_text(b"\xff\xfe" * 1000, T0)
    (event,) = p.events_received()
    assert len(event.excerpt) <= EXCERPT_CHARS


def test_bytes_frames_are_decoded_as_utf8_json() -> None:
    p = streaming_greeks()
    (data,) = feed(p, GOOD.encode())
    assert isinstance(data, FeedData)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "Greeks", "Quote", "Trade", ".A"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)
TYPES = st.sampled_from(
    [
        "FEED_DATA",
        "FEED_CONFIG",
        "AUTH_STATE",
        "SETUP",
        "CHANNEL_OPENED",
        "CHANNEL_CLOSED",
        "ERROR",
        "KEEPALIVE",
        "X",
    ]
)
MESSAGES = st.fixed_dictionaries(
    {"type": TYPES, "channel": st.sampled_from([0, 1, 3, -1, 2**70])},
    optional=dict.fromkeys(("data", "eventFields", "dataFormat", "state", "error", "message"), JSON),
)


def _check_never_raises(p: DxLinkProtocol, frames: list[str | bytes]) -> None:
    for i, frame in enumerate(frames):
        p.receive_text(frame, T0 + i)
        p.on_timer(T0 + i)
        for event in p.events_received():
            if isinstance(event, FeedData):
                assert all(isinstance(e[0], str) for e in event.events)
        p.data_to_send()


@given(st.lists(MESSAGES.map(json.dumps), max_size=8))
def test_hypothesis_messages_never_raise(frames: list[str]) -> None:
    for state in (S.SETUP_SENT, S.STREAMING):
        _check_never_raises(at(state), list(frames))


@given(st.lists(st.text(max_size=200) | st.binary(max_size=200), max_size=8))
def test_hypothesis_text_and_bytes_never_raise(frames: list[str | bytes]) -> None:
    _check_never_raises(at(S.STREAMING), frames)


@given(
    st.lists(st.sampled_from(["Greeks", "Quote", "Trade", "Summary"]) | JSON, max_size=6),
    st.lists(st.lists(st.text(max_size=8), max_size=14), max_size=3),
)
def test_hypothesis_feed_data_and_configs_never_raise(data: list[Any], field_lists: list[list[str]]) -> None:
    p = at(S.STREAMING)
    frames: list[str | bytes] = []
    for names, event_type in zip(field_lists, ["Greeks", "Quote", "Trade"], strict=False):
        frames.append(
            msg(type="FEED_CONFIG", channel=1, dataFormat="COMPACT", eventFields={event_type: names})
        )
    frames.append(json.dumps({"type": "FEED_DATA", "channel": 1, "data": data}))
    _check_never_raises(p, frames)


@given(st.integers(min_value=0, max_value=len(GOOD)))
def test_hypothesis_truncated_frames_never_raise(cut: int) -> None:
    _check_never_raises(streaming_greeks(), [GOOD[:cut]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token": ""},
        {"keepalive_s": 0},
        {"stale_s": -1},
        {"handshake_timeout_s": 0},
        {"aggregation_s": -0.1},
        {"chunk_bytes": 10},
        {"channel": 0},
        {"event_fields": {"Candle": ["eventSymbol"]}},
        {"event_fields": {"Quote": ["bidPrice"]}},
        {"subscriptions": [("Candle", "SPY")]},
        {"subscriptions": [("Quote", "")]},
        {"subscriptions": ["SPY"]},
    ],
)
def test_misuse_raises_the_protocol_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(DxLinkProtocolError):
        new(**kwargs)


def test_bad_subscription_update_raises_the_protocol_error() -> None:
    p = at(S.STREAMING)
    with pytest.raises(DxLinkProtocolError):
        p.update_subscriptions(add=[("Greeks", 5)], now=T0)  # type: ignore[list-item]


# --------------------------------------------------------------------------- subscriptions


def _symbols(n: int) -> list[tuple[str, str]]:
    return [(t, f".SPXW2501{17 + i % 10:02d}C{4000 + i}.5") for i in range(n) for t in ("Greeks", "Quote")]


def test_subscriptions_are_chunked_under_the_size_cap() -> None:
    items = _symbols(1000)
    p = new(subscriptions=items)
    for text in (SETUP, UNAUTHORIZED, AUTHORIZED, OPENED):
        p.receive_text(text, T0)
    texts = p.data_to_send()[4:]  # after SETUP, AUTH, CHANNEL_REQUEST, FEED_SETUP
    assert len(texts) >= 8
    assert all(len(t.encode()) <= MAX_CHUNK_BYTES for t in texts)
    assert max(len(t.encode()) for t in texts) > MAX_CHUNK_BYTES - 100  # chunks are filled
    messages = [json.loads(t) for t in texts]
    assert [m.get("reset", False) for m in messages] == [True] + [False] * (len(messages) - 1)
    added = [(a["type"], a["symbol"]) for m in messages for a in m["add"]]
    assert sorted(added) == sorted(items)
    events = p.events_received()
    assert FeedReady(1, len(items), len(texts)) in events


def test_subscription_diffs_while_streaming_and_before() -> None:
    p = at(S.STREAMING)
    assert (
        p.update_subscriptions(add=[("Quote", "QQQ"), ("Quote", "SPY")], remove=[("Trade", "SPY")], now=T0)
        == 2
    )
    assert sent(p) == [
        {"type": "FEED_SUBSCRIPTION", "channel": 1, "remove": [{"type": "Trade", "symbol": "SPY"}]},
        {"type": "FEED_SUBSCRIPTION", "channel": 1, "add": [{"type": "Quote", "symbol": "QQQ"}]},
    ]
    assert p.update_subscriptions(add=[("Quote", "QQQ")], now=T0) == 0  # already there
    early = at(S.CHANNEL_REQUESTED)
    assert early.update_subscriptions(add=[("Quote", "IWM")], remove=[("Quote", "SPY")], now=T0) == 0
    assert sent(early) == []
    early.receive_text(OPENED, T0)
    subscribe = sent(early)[1]
    assert subscribe["reset"] is True
    assert {(a["type"], a["symbol"]) for a in subscribe["add"]} == {
        ("Greeks", ".SPY250117C500"),
        ("Quote", ".SPY250117C500"),
        ("Quote", "IWM"),
        ("Trade", "SPY"),
    }


def test_resubscribe_with_reset_and_nothing_to_add() -> None:
    p = at(S.CHANNEL_REQUESTED, subscriptions=[])
    p.receive_text(OPENED, T0)
    assert sent(p)[1] == {"type": "FEED_SUBSCRIPTION", "channel": 1, "reset": True, "add": []}


# --------------------------------------------------------------------------- the C fast paths

_CELL = (
    st.floats(min_value=-1e6, max_value=1e6)
    | st.integers(0, 2**64)
    | st.integers(-5, 5)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "", "x", None, True, 0, 0.0, 1_700_000_000_000])
    | st.integers(1_600_000_000_000, 1_800_000_000_000)
)
_SYMBOL = st.sampled_from([".SPY250117C500", "SPY", "QQQ", "", 5, None])


@pytest.mark.skipif(not _SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
@given(
    st.sampled_from(["Greeks", "Quote", "Trade"]),
    st.data(),
    st.booleans(),
)
def test_c_fast_paths_decode_and_map_as_the_python_code(
    event_type: str, data: st.DataObject, shuffle: bool
) -> None:
    # COMPACT rows of any values (clean or not: NaN strings, wrong types, empty symbols), in the
    # canonical field order or another, decoded and mapped with the C fast paths and without:
    # the same events, Malformed reports, updates and unknown counts.
    fields = list(REQUESTED_FIELDS.get(event_type, EVENT_FIELDS[event_type]))
    if shuffle:
        fields = data.draw(st.permutations(fields))
    rows = data.draw(
        st.lists(
            st.tuples(_SYMBOL, st.lists(_CELL, min_size=len(fields) - 1, max_size=len(fields) - 1)),
            max_size=6,
        )
    )
    values: list[Any] = []
    for symbol, cells in rows:
        row = list(cells)
        row.insert(fields.index("eventSymbol"), symbol)
        values.extend(row)
    frames = [
        msg(type="FEED_CONFIG", channel=1, dataFormat="COMPACT", eventFields={event_type: fields}),
        json.dumps({"type": "FEED_DATA", "channel": 1, "data": [event_type, values]}),
    ]
    symbols = {".SPY250117C500": "SPY   250117C00500000", "SPY": "SPY"}

    def run() -> str:
        p = at(S.STREAMING)
        out = []
        for frame in frames:
            p.receive_text(frame, T0)
            for event in p.events_received():
                updates: list[Any] = []
                unknown = (
                    map_feed(event, symbols, T0, updates.append) if isinstance(event, FeedData) else None
                )
                out.append((event, updates, unknown))
        return repr(out)

    fast = run()
    with (
        mock.patch.object(protocol_module, "_compact_events", None),
        mock.patch.object(tastytrade_module, "_map_events", None),
    ):
        assert run() == fast


@pytest.mark.skipif(not _SPEEDUPS, reason="normalize._speedups not built (no C compiler)")
def test_c_fast_paths_take_the_usual_frames() -> None:
    # A clean Greeks frame goes through both C paths (not the Python fallbacks).
    p = streaming_greeks()
    fields = EVENT_FIELDS["Greeks"]
    row = dict.fromkeys(fields, 0) | {"eventSymbol": ".SPY250117C500", "time": 1_700_000_000_123,
                                           "sequence": 7, "delta": 0.5, "eventTime": 0}  # fmt: skip
    decode = mock.Mock(wraps=protocol_module._compact_events)
    mapper = mock.Mock(wraps=tastytrade_module._map_events)
    with (
        mock.patch.object(protocol_module, "_compact_events", decode),
        mock.patch.object(tastytrade_module, "_map_events", mapper),
    ):
        p.receive_text(
            json.dumps({"type": "FEED_DATA", "channel": 1, "data": ["Greeks", list(row.values())]}), T0
        )
        (event,) = p.events_received()
        updates: list[Any] = []
        assert map_feed(event, {".SPY250117C500": "SPY   250117C00500000"}, T0, updates.append) == 0
    assert decode.call_count == 1
    assert mapper.call_count == 1
    (u,) = updates
    assert (u.instrument, u.event_ts, u.seq, u.values["delta"]) == (
        "SPY   250117C00500000",
        1_700_000_000.123,
        7,
        0.5,
    )
