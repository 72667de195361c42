"""bench.peers.bare.records: COMPACT Greeks values to bare_ticks records, by the feed's layout."""

from __future__ import annotations

from datetime import UTC, datetime

from bench.peers.bare import FIELDS, records


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
