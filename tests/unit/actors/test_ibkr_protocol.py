"""The IBKR WebSocket codec and state machine, fed the frames recorded in the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ibkr.protocol import (
    OPTION_FIELDS,
    UNDERLYING_FIELDS,
    AccountsMessage,
    Authenticated,
    AuthStatus,
    Heartbeat,
    IbkrProtocol,
    IbkrProtocolError,
    MarketData,
    Notice,
    Phase,
    ServerError,
    Stale,
    SubscriptionError,
    SystemMessage,
    TicReply,
    Unauthenticated,
    UnknownMessage,
    WaitingForSession,
    decode_frame,
    plan_subscriptions,
    session_from_cookie,
    smd_message,
    umd_message,
)
from normalize.ibkr import MAPPED_FIELDS, update_values

DATA = Path(__file__).resolve().parents[2] / "data" / "ibkr"
AAPL = 265598
T0 = 1_777_415_600.0


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def text(message: Any) -> str:
    return json.dumps(message, separators=(",", ":"))


def feed(proto: IbkrProtocol, messages: list[Any], now: float = T0) -> list[Any]:
    for m in messages:
        proto.receive_text(text(m), now)
    return proto.events_received()


def authenticated(wanted: dict[int, tuple[str, ...]] | None = None, **kw: Any) -> IbkrProtocol:
    proto = IbkrProtocol(session="aeccc9d7515398c50fa894d967d099b1", now=T0, **kw)
    proto.set_subscriptions(wanted if wanted is not None else {AAPL: UNDERLYING_FIELDS}, T0)
    feed(proto, load("ws_handshake.json")["cookie_auth"])
    proto.data_to_send()
    return proto


# --------------------------------------------------------------------------- handshake


def test_cookie_handshake_subscribes_only_after_authenticated_sts() -> None:
    recorded = load("ws_handshake.json")["cookie_auth"]
    proto = IbkrProtocol(session="s", now=T0)
    proto.set_subscriptions({AAPL: UNDERLYING_FIELDS}, T0)
    assert proto.data_to_send() == []
    events = feed(proto, recorded[:2])  # system, act
    assert events == [SystemMessage("BASELINE_USER"), AccountsMessage(("U00000000",), "U00000000")]
    assert proto.data_to_send() == []  # nothing before sts
    events = feed(proto, recorded[2:])
    assert events[0] == AuthStatus(True, False, True, "")
    assert events[1] == Authenticated(1)
    assert events[2] == Heartbeat(1777415611502, T0)
    assert proto.phase is Phase.AUTHENTICATED
    assert proto.data_to_send() == [smd_message(AAPL, UNDERLYING_FIELDS)]
    assert proto.subscriptions == 1
    assert proto.last_hb_at == T0


def test_session_message_flow() -> None:
    data = load("ws_handshake.json")
    session = data["session_message_client"]["session"]
    proto = IbkrProtocol(session=session, now=T0)
    proto.set_subscriptions({AAPL: OPTION_FIELDS}, T0)
    server = data["session_message_server"]
    events = feed(proto, server[:1])
    assert events == [WaitingForSession()]
    sent = proto.data_to_send()
    assert [json.loads(m) for m in sent] == [data["session_message_client"]]
    events = feed(proto, server[1:])
    assert events == [AuthStatus(True, None, None, None), Authenticated(1), SystemMessage("username")]
    assert proto.data_to_send() == [smd_message(AAPL, OPTION_FIELDS)]
    # asked twice: answered once
    feed(proto, server[:1])
    assert proto.data_to_send() == []


def test_the_error_answer_to_an_unneeded_session_message_is_not_fatal() -> None:
    proto = authenticated()
    events = feed(proto, [load("ws_handshake.json")["session_message_when_cookie_authenticated"]])
    assert events == [ServerError("Topic unknown ...", 1)]
    assert proto.phase is Phase.AUTHENTICATED


def test_outgoing_messages_have_the_documented_form() -> None:
    recorded = load("ws_smd.json")
    assert smd_message(AAPL, ["31", "84", "86", "6509", "83"]) == recorded["subscribe"]
    assert umd_message(AAPL) == recorded["unsubscribe"]


@pytest.mark.parametrize(
    ("cookie", "session"),
    [
        ("d21b8cf5ebc8ea01c6ce37c8125ec83f", "d21b8cf5ebc8ea01c6ce37c8125ec83f"),
        ('{"session":"d21b8cf5ebc8ea01c6ce37c8125ec83f"}', "d21b8cf5ebc8ea01c6ce37c8125ec83f"),
        ('api={"session": "abc"}', "abc"),
        ("api=abc", "abc"),
        ("{not json", "{not json"),
    ],
)
def test_session_from_either_cookie_form(cookie: str, session: str) -> None:
    assert session_from_cookie(cookie) == session


# --------------------------------------------------------------------------- market data


def test_recorded_deltas_carry_only_their_fields() -> None:
    frames = load("ws_smd.json")["aapl_stream"]
    proto = authenticated()
    events = feed(proto, frames)
    assert [type(e) for e in events] == [MarketData] * 4
    assert [e.updated_ms for e in events] == [1777552110061, 1777552119103, 1777552129156, 1777552154191]
    assert all(e.conid == AAPL and e.seq is None for e in events)
    values = [update_values(e.fields) for e in events]
    assert values == [
        {"last": 271.67, "bid": 271.55, "ask": 271.66},
        {"last": 271.68, "bid": 271.68, "ask": 271.70},
        {"bid": 271.70, "ask": 271.80},
        {"last": 271.73},
    ]


def test_option_snapshot_fields() -> None:
    frame = load("ws_smd.json")["option_snapshot"]
    proto = authenticated({470728476: OPTION_FIELDS})
    (event,) = feed(proto, [frame])
    assert isinstance(event, MarketData)
    assert update_values(event.fields) == {
        "last": 2.61,
        "bid": 2.60,
        "ask": 2.67,
        "delta": 0.271,
        "gamma": 0.022,
        "theta": -0.282,
        "vega": 0.143,
    }


def test_first_frame_sent_twice_is_dropped_once() -> None:
    first, second = load("ws_smd.json")["aapl_stream"][:2]
    proto = authenticated()
    events = feed(proto, [first, first, second, second])
    # the repeated first frame is dropped; a later repeat is not the documented duplicate
    assert [e.updated_ms for e in events if isinstance(e, MarketData)] == [
        1777552110061,
        1777552119103,
        1777552119103,
    ]
    assert proto.duplicate_frames == 1


def test_a_resent_smd_expects_a_full_frame_again_maybe_twice() -> None:
    first = load("ws_smd.json")["aapl_stream"][0]
    proto = authenticated(resubscribe_s=10.0)
    feed(proto, [first])
    proto.on_timer(T0 + 10.0)
    assert proto.data_to_send()[-1] == smd_message(AAPL, UNDERLYING_FIELDS)
    assert len([e for e in feed(proto, [first, first]) if isinstance(e, MarketData)]) == 1


def test_topicless_smd_target_and_missing_conid() -> None:
    proto = authenticated()
    frame = {"topic": f"smd+{AAPL}", "_updated": 1, "31": "1.5"}
    (event,) = feed(proto, [frame])
    assert isinstance(event, MarketData)
    assert event.conid == AAPL
    with pytest.raises(IbkrProtocolError):
        proto.receive_text('{"topic":"smd+","31":"1"}', T0)


def test_frames_for_conids_not_subscribed_are_dropped() -> None:
    frames = load("ws_smd.json")["aapl_stream"]
    proto = authenticated()
    proto.set_subscriptions({}, T0)
    assert proto.data_to_send() == [umd_message(AAPL)]
    assert feed(proto, frames) == []
    assert proto.dropped_frames == 4


def test_binary_frames_and_stray_bytes() -> None:
    frame = load("ws_smd.json")["aapl_stream"][0]
    proto = authenticated()
    proto.receive_text(text(frame).encode(), T0)
    assert update_values(proto.events_received()[0].fields)["last"] == 271.67  # type: ignore[union-attr]
    raw = orjson.dumps({**frame, "_updated": 2, "7051": "APPLE INC\u2122"}).replace(
        "\u2122".encode(), b"\x99"
    )
    assert b"\x99" in raw
    proto.receive_text(raw, T0)
    (event,) = proto.events_received()
    assert isinstance(event, MarketData)
    assert event.fields["7051"] == "APPLE INC\ufffd"
    assert update_values(event.fields)["bid"] == 271.55


# --------------------------------------------------------------------------- status, tic, errors


def test_disconnect_fragments_end_the_session() -> None:
    fragments = load("ws_status.json")["disconnect_fragments"]
    proto = authenticated()
    events = feed(proto, fragments)
    assert events[:2] == [AuthStatus(False, None, None, None), Unauthenticated("not authenticated")]
    assert events[2:] == [AuthStatus(None, False, None, None), AuthStatus(None, None, None, "")]
    assert proto.phase is Phase.UNAUTHENTICATED
    assert proto.next_deadline() == float("inf")


def test_competing_session_ends_the_session() -> None:
    proto = authenticated()
    events = feed(proto, [{"topic": "sts", "args": {"competing": True}}])
    assert Unauthenticated("competing session") in events


def test_unauthenticated_first_sts_never_subscribes() -> None:
    proto = IbkrProtocol(session="s", now=T0)
    proto.set_subscriptions({AAPL: UNDERLYING_FIELDS}, T0)
    events = feed(proto, load("ws_status.json")["disconnect_fragments"][:1])
    assert Unauthenticated("not authenticated") in events
    feed(proto, [load("ws_status.json")["authenticated"]])
    assert proto.data_to_send() == []


def test_four_tic_answers_are_one() -> None:
    data = load("ws_tic.json")
    answer = data["answer_template"].replace("<ms>", str(data["heartbeat"]["hb"]))
    proto = authenticated(tic_interval_s=60.0, hb_timeout_s=120.0)
    proto.on_timer(T0 + 60.0)
    assert proto.data_to_send() == [data["client"]]
    for _ in range(data["copies"]):
        proto.receive_text(answer, T0 + 60.0)
    assert proto.events_received() == [TicReply(1777415611502)]
    assert (proto.tic_replies, proto.duplicate_tic_replies) == (4, 3)
    proto.receive_text(answer.replace("1777415611502", "1777415671502"), T0 + 120.0)
    assert proto.events_received() == [TicReply(1777415671502)]


def test_topicless_messages_and_errors() -> None:
    data = load("ws_topicless.json")
    proto = authenticated()
    events = feed(proto, data["messages"][1:] + data["errors"] + [data["bulletin"], data["notification"]])
    assert events[:3] == [
        Notice(None, "unsubscribed from summary"),
        Notice(None, "unsubscribed from ledger"),
        Notice(None, "Unsubscribed <serverId>"),
    ]
    assert events[3] == ServerError("Topic unknown ...", 1)
    assert events[4] == Notice("blt", '{"id":"id","message":"message"}')
    assert isinstance(events[5], Notice)
    assert events[5].topic == "ntf"


def test_subscription_error_and_unknown_topic() -> None:
    proto = authenticated()
    events = feed(
        proto,
        [
            {"topic": "smd+1", "error": "Invalid conid 1", "code": 1},
            {"topic": "error", "error": "bad"},
            {"topic": "zzq", "args": {"simulated": True}},
            {"nothing": "here"},
        ],
    )
    assert events == [
        SubscriptionError(1, "Invalid conid 1", 1),
        ServerError("bad", None),
        UnknownMessage("zzq"),
        UnknownMessage(""),
    ]
    assert proto.phase is Phase.AUTHENTICATED


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        "not json",
        '{"topic":"smd+265598","31":"1"',  # truncated
        '{"topic":"smd+' + "x" * 25 + ",,}",  # the simulator's malformed fault
        "[1,2]",
        '"text"',
        '{"topic":17}',
        '{"topic":"sts","args":[]}',
    ],
)
def test_malformed_frames_raise_the_protocol_error_and_change_nothing(frame: str | bytes) -> None:
    proto = authenticated()
    before = proto.frames
    with pytest.raises(IbkrProtocolError):
        proto.receive_text(frame, T0)
    assert proto.events_received() == []
    assert proto.frames == before
    assert proto.phase is Phase.AUTHENTICATED


# --------------------------------------------------------------------------- timers


def test_tic_every_interval_and_stale_without_heartbeat() -> None:
    proto = authenticated(tic_interval_s=10.0, hb_timeout_s=30.0)
    assert proto.next_deadline() == T0 + 10.0
    proto.on_timer(T0 + 10.0)
    assert proto.data_to_send() == ["tic"]
    proto.receive_text(text({"topic": "system", "hb": 1}), T0 + 15.0)
    proto.events_received()
    proto.on_timer(T0 + 44.9)
    assert [e for e in proto.events_received() if isinstance(e, Stale)] == []
    proto.on_timer(T0 + 45.0)
    assert proto.events_received() == [Stale("no heartbeat for 30.0 s", 30.0)]
    assert proto.phase is Phase.STALE
    assert proto.next_deadline() == float("inf")


def test_not_authenticated_in_time_is_stale() -> None:
    proto = IbkrProtocol(session="s", now=T0, hb_timeout_s=5.0, tic_interval_s=60.0)
    assert proto.next_deadline() == T0 + 5.0
    proto.on_timer(T0 + 5.0)
    assert proto.events_received() == [Stale("not authenticated within 5 s", 5.0)]


def test_stale_check_waits_while_the_consumer_is_full() -> None:
    proto = authenticated(tic_interval_s=60.0, hb_timeout_s=5.0)
    proto.on_timer(T0 + 6.0, check_stale=False)
    assert proto.events_received() == []
    proto.backpressure_ended(T0 + 8.0)
    proto.on_timer(T0 + 12.9)
    assert proto.events_received() == []
    proto.on_timer(T0 + 13.0)
    assert isinstance(proto.events_received()[0], Stale)


def test_every_smd_is_renewed_on_its_own_schedule_and_quiet_is_not_stale() -> None:
    proto = authenticated({1: OPTION_FIELDS}, tic_interval_s=60.0, hb_timeout_s=30.0, resubscribe_s=540.0)
    proto.set_subscriptions({1: OPTION_FIELDS, 2: UNDERLYING_FIELDS}, T0 + 100.0)
    assert proto.data_to_send() == [smd_message(2, UNDERLYING_FIELDS)]
    for t in range(10, 541, 10):  # heartbeats keep coming, no data at all
        proto.receive_text(text({"topic": "system", "hb": t}), T0 + t)
    proto.events_received()
    proto.on_timer(T0 + 540.0)
    assert proto.data_to_send() == ["tic", smd_message(1, OPTION_FIELDS)]
    assert proto.next_deadline() == T0 + 570.0  # the hb deadline; tic at 600, conid 2 renews at 640
    proto.on_timer(T0 + 640.0, check_stale=False)
    assert smd_message(2, UNDERLYING_FIELDS) in proto.data_to_send()
    assert proto.resubscribed == 2
    assert proto.phase is Phase.AUTHENTICATED


def test_changed_fields_resubscribe_and_removed_conids_unsubscribe() -> None:
    proto = authenticated({1: OPTION_FIELDS, 2: UNDERLYING_FIELDS})
    subscribed, unsubscribed = proto.set_subscriptions({1: UNDERLYING_FIELDS, 3: OPTION_FIELDS}, T0)
    assert (subscribed, unsubscribed) == ([1, 3], [2])
    assert proto.data_to_send() == [
        umd_message(2),
        smd_message(1, UNDERLYING_FIELDS),
        smd_message(3, OPTION_FIELDS),
    ]
    assert proto.subscribed() == {1, 3}


# --------------------------------------------------------------------------- plan


def test_plan_one_subscription_per_conid_options_first_within_the_limit() -> None:
    plan = plan_subscriptions([11, 12, 11, 13], [1, 2, 1, 11], 4)
    assert plan.wanted == {11: OPTION_FIELDS, 12: OPTION_FIELDS, 13: OPTION_FIELDS, 1: UNDERLYING_FIELDS}
    assert (plan.options, plan.underlyings, plan.left_out) == (3, 1, (2,))
    tight = plan_subscriptions([11, 12, 13], [1], 2)
    assert list(tight.wanted) == [11, 12]
    assert tight.left_out == (13, 1)


# --------------------------------------------------------------------------- hypothesis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=10)
    | json_values
)
topics = st.sampled_from(["smd+1", "smd+x", "smd+", "system", "sts", "act", "tic", "blt", "ntf", "error"])
frames = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_values.map(lambda v: orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS, default=str)),
    st.fixed_dictionaries(
        {"topic": topics | json_values},
        optional={
            "conid": st.integers(-(2**63), 2**63 - 1) | json_values,
            "_updated": field_values,
            "_seq": field_values,
            "args": json_values,
            "hb": field_values,
            "error": field_values,
            "message": field_values,
            "lastAccessed": field_values,
            **dict.fromkeys(MAPPED_FIELDS, field_values),
        },
    ).map(lambda d: orjson.dumps(d, default=str)),
)


@given(st.lists(frames, max_size=6))
def test_decoder_raises_only_its_own_error(sequence: list[str | bytes]) -> None:
    proto = IbkrProtocol(session="s", now=T0)
    proto.set_subscriptions({1: OPTION_FIELDS}, T0)
    proto.receive_text(text({"topic": "sts", "args": {"authenticated": True}}), T0)
    for frame in sequence:
        try:
            proto.receive_text(frame, T0)
        except IbkrProtocolError:
            pass
        for event in proto.events_received():
            if isinstance(event, MarketData):
                values = update_values(event.fields)
                present = {code for code in MAPPED_FIELDS if code in event.fields}
                assert len(values) == len(present)  # never a value for a missing field
        proto.on_timer(T0 + 1.0)
        proto.data_to_send()


@given(st.dictionaries(st.sampled_from(MAPPED_FIELDS), field_values, max_size=9))
def test_missing_and_empty_fields_never_become_values(fields: dict[str, Any]) -> None:
    frame = {"topic": "smd+1", "conid": 1, **fields}
    proto = authenticated({1: OPTION_FIELDS})
    proto.receive_text(orjson.dumps(frame, default=str), T0)
    (event,) = proto.events_received()
    assert isinstance(event, MarketData)
    values = update_values(event.fields)
    names = {"31": "last", "84": "bid", "86": "ask", "7635": "mark", "7308": "delta"}
    names |= {"7309": "gamma", "7310": "theta", "7311": "vega", "7633": "iv"}
    assert set(values) == {names[code] for code in fields}
    for code, raw in fields.items():
        if raw is None or raw == "" or isinstance(raw, bool | list | dict):
            assert values[names[code]] is None


def test_decode_frame_rejects_non_objects() -> None:
    assert decode_frame(b'{"a":1}') == {"a": 1}
    with pytest.raises(IbkrProtocolError):
        decode_frame("[]")
