"""bench.peers.bare: bare_copy's records (COMPACT Greeks values to bare_ticks records, by the
feed's layout) and bare_recv's subscriptions and tick counting."""

from __future__ import annotations

from datetime import UTC, datetime

from actors.ibkr.protocol import OPTION_FIELDS, UNDERLYING_FIELDS
from actors.tastytrade.protocol import REQUESTED_FIELDS
from bench.peers._common import Stats
from bench.peers.bare import (
    DX_FIELDS,
    FIELDS,
    IBKR_OPTION_FIELDS,
    IBKR_OTHER_FIELDS,
    dx_ticks,
    engine_subscriptions,
    ibkr_ticks,
    records,
)
from normalize.tastytrade import OPTION_TYPES, UNDERLYING_TYPES


def test_compact_values_become_records_in_column_order_whatever_the_layout() -> None:
    layout = ["eventType", *reversed(FIELDS)]  # the server's own order, with a field more
    event = {"eventType": "Greeks", "eventSymbol": ".SPY250117C500", "time": 1_700_000_000_123,
             "sequence": 7, "price": 1.5, "volatility": 0.2, "delta": 0.5, "gamma": "NaN",
             "theta": -0.1, "rho": 0.01, "vega": 3}  # fmt: skip
    values = [event[name] for name in layout] * 2
    out, sent = records(layout, values)
    assert sent == [1_700_000_000_123] * 2
    assert out[0] == (
        ".SPY250117C500",
        datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        7, 1.5, 0.2, 0.5, None, -0.1, 0.01, 3.0,
    )  # fmt: skip
    assert out[1] == out[0]
    assert records(layout, values[:-1]) == (out[:1], sent[:1])  # a cut event is left out


# -- bare_recv: the engine's input, received and counted -----------------------------------------


def test_bare_recv_asks_for_what_the_engine_asks_for() -> None:
    # copied (the peers never import the engine): the copy must not drift from the engine's
    assert DX_FIELDS == {t: list(f) for t, f in REQUESTED_FIELDS.items()}
    assert (IBKR_OPTION_FIELDS, IBKR_OTHER_FIELDS) == (list(OPTION_FIELDS), list(UNDERLYING_FIELDS))
    subs = engine_subscriptions([("Greeks", ".SPY250117C500"), ("Quote", "SPY")])
    assert [t for t, s in subs if s == ".SPY250117C500"] == list(OPTION_TYPES)
    assert [t for t, s in subs if s == "SPY"] == list(UNDERLYING_TYPES)


def test_bare_recv_counts_ticks_not_last_values_or_other_messages() -> None:
    frame = {"topic": "smd+265598", "conid": 265598, "_updated": 1_700_000_000_123, "31": "1.5", "_seq": 4}
    assert ibkr_ticks(frame) == [1_700_000_000_123]
    assert ibkr_ticks({**frame, "_seq": 0}) == []  # the last-value frame at subscription
    assert ibkr_ticks({"topic": "sts", "args": {"authenticated": True}}) == []
    assert ibkr_ticks([{"acctId": "U1"}]) == []


def test_bare_recv_reads_send_times_by_the_layout() -> None:
    layout = ["eventSymbol", "sequence", "bidTime", "eventTime", "askTime"]
    values = ["A", 3, 1_000, 0, 1_001, "B", 0, 2_000, 0, 2_001, "C", 5, 3_000, 0, 3_001, "D", 6]
    assert dx_ticks(layout, values, "bidTime") == [1_000, 3_000]  # sequence 0 and a cut event: out


def test_a_frame_counts_every_tick_and_keeps_one_latency() -> None:
    stats = Stats(None)
    stats.record_frame([1_000.0, 1_000.0, 1_001.0], 1.002)  # received at 1,002 ms
    stats.record_frame([1_004.0], 1.005)
    assert (stats.committed, stats.count, stats.batches) == (4, 2, 2)
    assert 0.9 <= stats.quantile_ms(0.5) <= 1.1
    assert 0.9 <= stats.quantile_ms(1.0) <= 2.1
