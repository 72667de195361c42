"""The DXLink server codec: text in, messages and events out, time passed in."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from simulator.dxlink_protocol import (
    DEFAULT_EVENT_FIELDS,
    Authorized,
    AuthState,
    ChannelClosed,
    DxLinkServerProtocol,
    Subscribed,
    Unsubscribed,
    encode_value,
    iter_compact,
)

TOKEN = "quote-token"
SDK_SETUP = {
    "type": "SETUP",
    "channel": 0,
    "keepaliveTimeout": 60,
    "acceptKeepaliveTimeout": 60,
    "version": "0.1-DXF-JS/0.3.0",
}
GREEKS_FIELDS = list(DEFAULT_EVENT_FIELDS["Greeks"])
GREEKS_EVENT: dict[str, object] = {
    "eventSymbol": ".SPY250117C500",
    "eventTime": 0,
    "eventFlags": 0,
    "index": 7235129486797176832,
    "time": 1684559855338,
    "sequence": 7,
    "price": 26.338,
    "volatility": 0.397,
    "delta": 0.9999,
    "gamma": 4.8e-12,
    "theta": -2.5e-12,
    "rho": 0.0183,
    "vega": None,
}


def _validate(token: str) -> str | None:
    return "user-1" if token == TOKEN else None


def _proto(now: float = 0.0, **kwargs: Any) -> DxLinkServerProtocol:
    return DxLinkServerProtocol(validate_token=_validate, now=now, **kwargs)


def _send(proto: DxLinkServerProtocol, message: object, now: float = 0.0) -> list[dict[str, Any]]:
    proto.receive_text(json.dumps(message), now)
    return [json.loads(text) for text in proto.data_to_send()]


def _authorized(now: float = 0.0, **kwargs: Any) -> DxLinkServerProtocol:
    proto = _proto(now, **kwargs)
    _send(proto, SDK_SETUP, now)
    _send(proto, {"type": "AUTH", "channel": 0, "token": TOKEN}, now)
    proto.events_received()
    return proto


def _feed(
    now: float = 0.0, fields: dict[str, list[str]] | None = None, data_format: str = "COMPACT"
) -> DxLinkServerProtocol:
    proto = _authorized(now)
    _send(
        proto,
        {
            "type": "CHANNEL_REQUEST",
            "channel": 3,
            "service": "FEED",
            "parameters": {"contract": "AUTO"},
        },
        now,
    )
    setup: dict[str, object] = {
        "type": "FEED_SETUP",
        "channel": 3,
        "acceptAggregationPeriod": 0.1,
        "acceptDataFormat": data_format,
    }
    if fields is not None:
        setup["acceptEventFields"] = fields
    _send(proto, setup, now)
    return proto


class TestHandshake:
    def test_setup_gets_setup_then_unauthorized(self) -> None:
        """SETUP first: the server answers with its own SETUP, then AUTH_STATE UNAUTHORIZED."""
        proto = _proto()
        out = _send(proto, SDK_SETUP)
        assert [m["type"] for m in out] == ["SETUP", "AUTH_STATE"]
        assert out[0]["channel"] == 0
        assert out[0]["keepaliveTimeout"] == 60
        assert out[0]["acceptKeepaliveTimeout"] == 60
        assert isinstance(out[0]["version"], str)
        assert out[1] == {"type": "AUTH_STATE", "channel": 0, "state": "UNAUTHORIZED"}
        assert proto.state is AuthState.UNAUTHORIZED

    def test_good_token_authorizes_with_user_id(self) -> None:
        """A valid AUTH gets AUTH_STATE AUTHORIZED with the userId."""
        proto = _proto()
        _send(proto, SDK_SETUP)
        out = _send(proto, {"type": "AUTH", "channel": 0, "token": TOKEN})
        assert out == [{"type": "AUTH_STATE", "channel": 0, "state": "AUTHORIZED", "userId": "user-1"}]
        assert proto.events_received() == [Authorized(TOKEN)]
        assert proto.authorized

    def test_bad_token_gets_error_and_close(self) -> None:
        """A bad token gets ERROR UNAUTHORIZED and a close, so the SDK does not loop on AUTH."""
        proto = _proto()
        _send(proto, SDK_SETUP)
        out = _send(proto, {"type": "AUTH", "channel": 0, "token": "nope"})
        assert [(m["type"], m["error"]) for m in out] == [("ERROR", "UNAUTHORIZED")]
        assert proto.close_code == 1000
        assert proto.state is AuthState.CLOSED
        assert _send(proto, {"type": "KEEPALIVE", "channel": 0}) == []

    def test_auth_before_setup_reply_is_accepted(self) -> None:
        """AUTH right after SETUP (before reading the reply) works: output is queued in order."""
        proto = _proto()
        proto.receive_text(json.dumps(SDK_SETUP), 0.0)
        proto.receive_text(json.dumps({"type": "AUTH", "channel": 0, "token": TOKEN}), 0.0)
        types = [json.loads(t)["type"] for t in proto.data_to_send()]
        assert types == ["SETUP", "AUTH_STATE", "AUTH_STATE"]
        assert proto.authorized

    @pytest.mark.parametrize(
        ("message", "error"),
        [
            ({"type": "AUTH", "channel": 0, "token": TOKEN}, "BAD_ACTION"),
            ({"type": "KEEPALIVE", "channel": 0}, "BAD_ACTION"),
            ({"type": "SETUP", "channel": 0}, "INVALID_MESSAGE"),
            ({"type": "SETUP", "channel": 1, "version": "x"}, "BAD_ACTION"),
            ({"type": "NOPE", "channel": 0}, "BAD_ACTION"),
            ({"channel": 0}, "INVALID_MESSAGE"),
            ([1, 2], "INVALID_MESSAGE"),
            ({"type": "SETUP", "channel": "0", "version": "x"}, "INVALID_MESSAGE"),
        ],
    )
    def test_bad_first_messages(self, message: object, error: str) -> None:
        """Anything but a valid SETUP first is answered with an ERROR, and the socket stays."""
        proto = _proto()
        out = _send(proto, message)
        assert [(m["type"], m["error"]) for m in out] == [("ERROR", error)]
        assert proto.close_code is None
        assert proto.state is AuthState.AWAIT_SETUP

    def test_non_json_is_invalid_message(self) -> None:
        """Text that is not JSON gets ERROR INVALID_MESSAGE."""
        proto = _authorized()
        proto.receive_text("{not json", 1.0)
        out = [json.loads(t) for t in proto.data_to_send()]
        assert out == [
            {
                "type": "ERROR",
                "channel": 0,
                "error": "INVALID_MESSAGE",
                "message": "The message is not valid JSON.",
            }
        ]
        assert proto.close_code is None

    def test_binary_frame_is_invalid_message(self) -> None:
        """DXLink is text-only."""
        proto = _authorized()
        proto.receive_binary(1.0)
        assert json.loads(proto.data_to_send()[0])["error"] == "INVALID_MESSAGE"

    def test_channel_request_before_auth_is_error(self) -> None:
        """CHANNEL_REQUEST before AUTHORIZED gets a channel ERROR (checklist §7.3)."""
        proto = _proto()
        _send(proto, SDK_SETUP)
        out = _send(proto, {"type": "CHANNEL_REQUEST", "channel": 1, "service": "FEED"})
        assert [(m["type"], m["channel"], m["error"]) for m in out] == [("ERROR", 1, "UNAUTHORIZED")]
        assert proto.channels == {}


class TestChannels:
    def test_channel_request_opens_and_echoes(self) -> None:
        """CHANNEL_OPENED echoes service and parameters plus subFormat LIST."""
        proto = _authorized()
        out = _send(
            proto,
            {
                "type": "CHANNEL_REQUEST",
                "channel": 3,
                "service": "FEED",
                "parameters": {"contract": "AUTO"},
            },
        )
        assert out == [
            {
                "type": "CHANNEL_OPENED",
                "channel": 3,
                "service": "FEED",
                "parameters": {"contract": "AUTO", "subFormat": "LIST"},
            }
        ]

    @pytest.mark.parametrize(
        "message",
        [
            {"type": "CHANNEL_REQUEST", "channel": 0, "service": "FEED"},
            {"type": "CHANNEL_REQUEST", "channel": 1, "service": "DOM"},
            {
                "type": "CHANNEL_REQUEST",
                "channel": 1,
                "service": "FEED",
                "parameters": {"contract": "X"},
            },
        ],
    )
    def test_bad_channel_requests(self, message: dict[str, object]) -> None:
        """Channel 0, unknown services and contracts are refused with BAD_ACTION."""
        proto = _authorized()
        out = _send(proto, message)
        assert [m["error"] for m in out] == ["BAD_ACTION"]
        assert proto.channels == {}

    def test_feed_setup_on_unopened_channel(self) -> None:
        """FEED_SETUP before CHANNEL_OPENED is a BAD_ACTION on that channel."""
        proto = _authorized()
        out = _send(proto, {"type": "FEED_SETUP", "channel": 5})
        assert [(m["channel"], m["error"]) for m in out] == [(5, "BAD_ACTION")]

    def test_channel_cancel_closes(self) -> None:
        """CHANNEL_CANCEL gets CHANNEL_CLOSED and drops the channel's subscriptions."""
        proto = _feed()
        _send(
            proto,
            {
                "type": "FEED_SUBSCRIPTION",
                "channel": 3,
                "add": [{"type": "Greeks", "symbol": ".A"}],
            },
        )
        proto.events_received()
        out = _send(proto, {"type": "CHANNEL_CANCEL", "channel": 3})
        assert out == [{"type": "CHANNEL_CLOSED", "channel": 3}]
        assert proto.events_received() == [
            Unsubscribed(3, (("Greeks", ".A"),)),
            ChannelClosed(3),
        ]
        assert proto.subscriptions() == {}
        assert not proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.0)


class TestFeedSetup:
    def test_feed_config_echoes_requested_fields_in_order(self) -> None:
        """FEED_CONFIG reports format, period and the requested fields in the requested order."""
        fields = {"Greeks": ["eventSymbol", "delta", "gamma", "eventTime"]}
        proto = _authorized()
        _send(proto, {"type": "CHANNEL_REQUEST", "channel": 3, "service": "FEED"})
        out = _send(
            proto,
            {
                "type": "FEED_SETUP",
                "channel": 3,
                "acceptAggregationPeriod": 0.1,
                "acceptDataFormat": "COMPACT",
                "acceptEventFields": fields,
            },
        )
        assert out == [
            {
                "type": "FEED_CONFIG",
                "channel": 3,
                "dataFormat": "COMPACT",
                "aggregationPeriod": 0.1,
                "eventFields": fields,
            }
        ]

    def test_default_format_is_compact(self) -> None:
        """A FEED_SETUP without a format gets COMPACT."""
        proto = _authorized()
        _send(proto, {"type": "CHANNEL_REQUEST", "channel": 1, "service": "FEED"})
        out = _send(proto, {"type": "FEED_SETUP", "channel": 1})
        assert out[0]["dataFormat"] == "COMPACT"
        assert "eventFields" not in out[0]

    @pytest.mark.parametrize(
        "setup",
        [
            {"acceptDataFormat": "XML"},
            {"acceptAggregationPeriod": -1},
            {"acceptAggregationPeriod": "fast"},
            {"acceptEventFields": {"Greeks": "delta"}},
            {"acceptEventFields": ["Greeks"]},
        ],
    )
    def test_invalid_feed_setup(self, setup: dict[str, object]) -> None:
        """Malformed FEED_SETUP fields get INVALID_MESSAGE on the channel."""
        proto = _authorized()
        _send(proto, {"type": "CHANNEL_REQUEST", "channel": 1, "service": "FEED"})
        out = _send(proto, {"type": "FEED_SETUP", "channel": 1, **setup})
        assert [(m["channel"], m["error"]) for m in out] == [(1, "INVALID_MESSAGE")]

    def test_default_fields_announced_before_first_data(self) -> None:
        """A type with no requested fields gets a FEED_CONFIG naming the defaults first."""
        proto = _feed()
        proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.0)
        out = [json.loads(t) for t in proto.data_to_send()]
        assert [m["type"] for m in out] == ["FEED_CONFIG", "FEED_DATA"]
        assert out[0]["eventFields"] == {"Greeks": GREEKS_FIELDS}
        assert len(out[1]["data"][1]) == len(GREEKS_FIELDS)
        proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.1)
        assert [json.loads(t)["type"] for t in proto.data_to_send()] == ["FEED_DATA"]

    def test_subscription_before_feed_setup_configures_lazily(self) -> None:
        """FEED_SUBSCRIPTION without FEED_SETUP still gets a FEED_CONFIG before any data."""
        proto = _authorized()
        _send(proto, {"type": "CHANNEL_REQUEST", "channel": 1, "service": "FEED"})
        out = _send(
            proto,
            {"type": "FEED_SUBSCRIPTION", "channel": 1, "add": [{"type": "Quote", "symbol": "X"}]},
        )
        assert [m["type"] for m in out] == ["FEED_CONFIG"]
        assert out[0]["dataFormat"] == "COMPACT"


class TestSubscriptions:
    def test_add_remove_reset(self) -> None:
        """reset, then remove, then add; events report what changed."""
        proto = _feed()
        add = [{"type": "Greeks", "symbol": s} for s in (".A", ".B", ".A")]
        assert _send(proto, {"type": "FEED_SUBSCRIPTION", "channel": 3, "add": add}) == []
        assert proto.events_received() == [Subscribed(3, (("Greeks", ".A"), ("Greeks", ".B")))]
        assert proto.subscribers("Greeks", ".A") == [3]
        _send(
            proto,
            {
                "type": "FEED_SUBSCRIPTION",
                "channel": 3,
                "remove": [{"type": "Greeks", "symbol": ".A"}, {"type": "Greeks", "symbol": ".Z"}],
            },
        )
        assert proto.events_received() == [Unsubscribed(3, (("Greeks", ".A"),))]
        _send(
            proto,
            {
                "type": "FEED_SUBSCRIPTION",
                "channel": 3,
                "reset": True,
                "add": [{"type": "Quote", "symbol": "SPY"}],
            },
        )
        assert proto.events_received() == [
            Unsubscribed(3, (("Greeks", ".B"),)),
            Subscribed(3, (("Quote", "SPY"),)),
        ]
        assert proto.subscriptions() == {("Quote", "SPY"): [3]}

    def test_re_adding_is_not_reported(self) -> None:
        """Adding an item already subscribed changes nothing."""
        proto = _feed()
        msg = {"type": "FEED_SUBSCRIPTION", "channel": 3, "add": [{"type": "Quote", "symbol": "X"}]}
        _send(proto, msg)
        proto.events_received()
        _send(proto, msg)
        assert proto.events_received() == []

    @pytest.mark.parametrize(
        "body",
        [{"add": "SPY"}, {"add": [{"type": "Quote"}]}, {"remove": [["Quote", "SPY"]]}],
    )
    def test_invalid_items(self, body: dict[str, object]) -> None:
        """Malformed subscription lists get INVALID_MESSAGE and change nothing."""
        proto = _feed()
        out = _send(proto, {"type": "FEED_SUBSCRIPTION", "channel": 3, **body})
        assert [m["error"] for m in out] == ["INVALID_MESSAGE"]
        assert proto.subscriptions() == {}


class TestFeedData:
    def test_compact_packs_several_events_in_requested_order(self) -> None:
        """COMPACT: [type, values] with k events x N fields in the requested order."""
        fields = ["eventSymbol", "delta", "sequence"]
        proto = _feed(fields={"Greeks": fields})
        second = {**GREEKS_EVENT, "eventSymbol": ".SPY250117P500", "delta": -0.4, "sequence": 8}
        assert proto.feed_data(3, "Greeks", [GREEKS_EVENT, second], 1.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert msg == {
            "type": "FEED_DATA",
            "channel": 3,
            "data": ["Greeks", [".SPY250117C500", 0.9999, 7, ".SPY250117P500", -0.4, 8]],
        }
        rows = list(iter_compact(fields, msg["data"][1]))
        assert [r["sequence"] for r in rows] == [7, 8]

    def test_nan_for_missing_doubles(self) -> None:
        """None and non-finite doubles go out as "NaN"/"Infinity"; unknown fields as "NaN"."""
        fields = ["eventSymbol", "vega", "gamma", "theta", "noSuchField"]
        proto = _feed(fields={"Greeks": fields})
        event = {**GREEKS_EVENT, "gamma": math.inf, "theta": -math.inf}
        proto.feed_data(3, "Greeks", [event], 1.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert msg["data"][1] == [".SPY250117C500", "NaN", "Infinity", "-Infinity", "NaN"]

    def test_event_type_field_repeats_in_rows(self) -> None:
        """If eventType is a requested field, it repeats inside each row."""
        proto = _feed(fields={"Trade": ["eventType", "eventSymbol", "price"]})
        proto.feed_data(3, "Trade", [{"eventSymbol": "SPY", "price": 559.36}], 1.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert msg["data"] == ["Trade", ["Trade", "SPY", 559.36]]

    def test_full_format(self) -> None:
        """FULL: a list of objects with eventType; missing values are omitted."""
        proto = _feed(fields={"Greeks": GREEKS_FIELDS}, data_format="FULL")
        proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        (row,) = msg["data"]
        assert row["eventType"] == "Greeks"
        assert row["eventSymbol"] == ".SPY250117C500"
        assert row["index"] == 7235129486797176832
        assert "vega" not in row

    def test_unsolicited_switch_to_full(self) -> None:
        """The fault: an unsolicited FEED_CONFIG switches the channel to FULL mid-session."""
        proto = _feed(fields={"Greeks": GREEKS_FIELDS})
        proto.switch_format("FULL", 2.0)
        (config,) = [json.loads(t) for t in proto.data_to_send()]
        assert config["type"] == "FEED_CONFIG"
        assert config["dataFormat"] == "FULL"
        assert config["eventFields"] == {"Greeks": GREEKS_FIELDS}
        proto.feed_data(3, "Greeks", [GREEKS_EVENT], 2.1)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert isinstance(msg["data"][0], dict)
        proto.switch_format("FULL", 2.2)
        assert proto.data_to_send() == []

    def test_wrong_value_count(self) -> None:
        """The fault: values are dropped from the end so the count is not a multiple."""
        proto = _feed(fields={"Greeks": GREEKS_FIELDS})
        proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.0, drop_values=1)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert len(msg["data"][1]) == len(GREEKS_FIELDS) - 1
        with pytest.raises(ValueError):
            list(iter_compact(GREEKS_FIELDS, msg["data"][1]))

    def test_no_data_when_unauthorized_or_empty(self) -> None:
        """Nothing goes out without events, on unknown channels, or after deauthorization."""
        proto = _feed()
        assert not proto.feed_data(3, "Greeks", [], 1.0)
        assert not proto.feed_data(9, "Greeks", [GREEKS_EVENT], 1.0)
        proto.deauthorize(1.0)
        out = [json.loads(t) for t in proto.data_to_send()]
        assert out == [{"type": "AUTH_STATE", "channel": 0, "state": "UNAUTHORIZED"}]
        assert not proto.feed_data(3, "Greeks", [GREEKS_EVENT], 1.0)
        # the client re-authorizes and data flows again; channels survive
        _send(proto, {"type": "AUTH", "channel": 0, "token": TOKEN}, 2.0)
        assert proto.feed_data(3, "Greeks", [GREEKS_EVENT], 2.0)

    def test_encode_value(self) -> None:
        """Only None and non-finite floats are rewritten."""
        assert encode_value(None) == "NaN"
        assert encode_value(math.nan) == "NaN"
        assert encode_value(1.5) == 1.5
        assert encode_value("Q") == "Q"
        assert encode_value(2**63) == 2**63


class TestTimers:
    def test_keepalive_when_server_idle(self) -> None:
        """The server sends KEEPALIVE after keepalive_interval of its own silence."""
        proto = _authorized(0.0, keepalive_interval=20.0)
        proto.poll(19.9)
        assert proto.data_to_send() == []
        assert proto.next_deadline() == pytest.approx(20.0)
        proto.receive_text(json.dumps({"type": "KEEPALIVE", "channel": 0}), 19.9)
        proto.poll(20.0)
        assert [json.loads(t) for t in proto.data_to_send()] == [{"type": "KEEPALIVE", "channel": 0}]
        assert proto.next_deadline() == pytest.approx(40.0)

    def test_keepalive_interval_fits_client_accept_timeout(self) -> None:
        """A client accepting only 10 s of silence gets keepalives at least every 5 s."""
        proto = _proto(keepalive_interval=30.0)
        _send(proto, {**SDK_SETUP, "acceptKeepaliveTimeout": 10})
        assert proto.keepalive_interval == 5.0

    def test_timeout_after_client_silence(self) -> None:
        """60 s of client silence: ERROR TIMEOUT, then close."""
        proto = _authorized(0.0)
        proto.receive_text(json.dumps({"type": "KEEPALIVE", "channel": 0}), 30.0)
        proto.data_to_send()
        proto.poll(89.9)
        assert all(json.loads(t)["type"] == "KEEPALIVE" for t in proto.data_to_send())
        assert proto.close_code is None
        proto.poll(90.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        assert msg["type"] == "ERROR"
        assert msg["error"] == "TIMEOUT"
        assert "60 seconds" in msg["message"]
        assert proto.close_code == 1000
        proto.poll(200.0)
        assert proto.data_to_send() == []

    def test_configurable_timeout_before_setup(self) -> None:
        """A client that never sends SETUP is timed out too; no keepalives before SETUP."""
        proto = _proto(0.0, keepalive_timeout=2.0, keepalive_interval=1.0)
        assert proto.next_deadline() == 2.0
        proto.poll(1.5)
        assert proto.data_to_send() == []
        proto.poll(2.0)
        assert json.loads(proto.data_to_send()[0])["error"] == "TIMEOUT"

    def test_connection_lost_drops_output(self) -> None:
        """After the socket is gone nothing is queued."""
        proto = _authorized()
        proto.connection_lost()
        proto.poll(100.0)
        proto.receive_text("{}", 100.0)
        assert proto.data_to_send() == []


class TestSdkConformanceOffline:
    """The installed SDK's own parser accepts what the codec emits."""

    def test_sdk_parses_compact_greeks(self) -> None:
        """Greeks.from_stream reads the COMPACT payload; NaN rows are dropped by the SDK."""
        from tastytrade.dxfeed import Greeks

        schema = Greeks.model_json_schema()
        fields = list(schema["properties"])
        proto = _feed(fields={"Greeks": fields})
        good = {**GREEKS_EVENT, "vega": 0.05}
        proto.feed_data(3, "Greeks", [good, GREEKS_EVENT], 1.0)
        (msg,) = [json.loads(t) for t in proto.data_to_send()]
        events = Greeks.from_stream(msg["data"][1])
        assert len(events) == 1
        assert events[0].sequence == 7
        assert float(events[0].delta) == pytest.approx(0.9999)
