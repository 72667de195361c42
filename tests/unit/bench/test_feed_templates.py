"""The benchmark feed's pre-built frames: slots filled per send give the frames the simulators send."""

from __future__ import annotations

import orjson

from bench.feed import templates as tpl
from simulator.dxlink_protocol import DEFAULT_EVENT_FIELDS


def test_ibkr_frame_keeps_order_and_fills_time_and_seq() -> None:
    frame = {
        "server_id": "q1",
        "conidEx": "123",
        "conid": 123,
        "_updated": 0,
        "6119": "q1",
        "31": "C1.25",
        "7633": "18.52%",  # a percent sign in a value survives the %-format
        "topic": "smd+123",
        "_seq": 0,
    }
    template = tpl.ibkr_frame(frame)
    text = template % {"t": 1_700_000_000_123, "s": 42}
    decoded = orjson.loads(text)
    assert decoded == {**frame, "_updated": 1_700_000_000_123, "_seq": 42}
    assert list(decoded) == list(frame)


def test_dx_compact_event_in_the_requested_order() -> None:
    fields = DEFAULT_EVENT_FIELDS["Greeks"]
    event = {
        "eventSymbol": ".SPY250117C500",
        "eventTime": 0,
        "eventFlags": 0,
        "index": 0,
        "time": 0,
        "sequence": 0,
        "price": 1.5,
        "volatility": None,
        "delta": 0.5,
        "gamma": 0.01,
        "theta": -0.2,
        "rho": 0.1,
        "vega": 0.3,
    }
    template, needs_index = tpl.dx_compact_event(event, fields, "Greeks")
    assert needs_index
    ms, seq = 1_700_000_000_456, 7
    values = orjson.loads("[" + template % {"t": ms, "s": seq, "i": tpl.dx_index(ms, seq)} + "]")
    assert len(values) == len(fields)
    got = dict(zip(fields, values, strict=True))
    assert got["time"] == ms
    assert got["eventTime"] == 0  # as the real feed sends it
    assert got["sequence"] == seq
    assert got["index"] >> 32 == ms // 1000
    assert got["index"] & ((1 << 22) - 1) == seq
    assert got["volatility"] == "NaN"  # missing values as the simulator encodes them
    assert got["delta"] == 0.5


def test_compact_frame_of_several_events() -> None:
    fields = ("eventSymbol", "bidTime", "sequence", "bidPrice", "askPrice")
    one, needs_index = tpl.dx_compact_event(
        {"eventSymbol": "SPY", "bidPrice": 1.0, "askPrice": 1.1}, fields, "Quote"
    )
    assert not needs_index
    events = [one % {"t": 5, "s": s} for s in (1, 2, 3)]
    frame = orjson.loads(tpl.dx_frame_prefix(3, "Quote") + ",".join(events) + tpl.DX_FRAME_SUFFIX)
    assert frame["type"] == "FEED_DATA"
    assert frame["channel"] == 3
    assert frame["data"][0] == "Quote"
    assert frame["data"][1] == ["SPY", 5, 1, 1.0, 1.1, "SPY", 5, 2, 1.0, 1.1, "SPY", 5, 3, 1.0, 1.1]


def test_full_event_leaves_missing_values_out() -> None:
    row = tpl.dx_full_event(
        {"eventSymbol": "SPY", "bidPrice": None, "askPrice": 2.0},
        ("eventSymbol", "bidPrice", "askPrice"),
        "Quote",
    )
    assert row == {"eventType": "Quote", "eventSymbol": "SPY", "askPrice": 2.0}
