"""Row factories and strategies for the pure db tests."""

from __future__ import annotations

from datetime import date

from hypothesis import strategies as st

from normalize.model import GreeksSnapshot


def row(i: int = 0, *, ts: float = 1_700_000_000.0, instrument: str | None = None) -> GreeksSnapshot:
    return GreeksSnapshot(
        broker="ibkr",
        account="U1",
        instrument=instrument or f"SPY   250117C{500 + i % 7:05d}000",
        underlying="SPY",
        asset_class="OPT",
        right="C" if i % 2 else None,
        strike=500.0 + i,
        expiry=date(2025, 1, 17) if i % 3 else None,
        multiplier=100.0,
        quantity=-2.0,
        event_ts=ts,
        received_ts=ts + 0.001,
        delta=0.5,
        seq=i,
    )


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
maybe = st.none() | finite
text = st.text(min_size=0, max_size=12)

snapshots = st.builds(
    GreeksSnapshot,
    broker=st.sampled_from(["ibkr", "tastytrade"]),
    account=text,
    instrument=text,
    underlying=text,
    asset_class=st.sampled_from(["OPT", "STK", "FOP"]),
    right=st.none() | st.sampled_from(["C", "P"]),
    strike=maybe,
    expiry=st.none() | st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)),
    multiplier=finite,
    quantity=finite,
    event_ts=st.floats(min_value=0, max_value=4e9),
    received_ts=st.floats(min_value=0, max_value=4e9),
    bid=maybe,
    ask=maybe,
    last=maybe,
    mark=maybe,
    underlying_price=maybe,
    iv=maybe,
    delta=maybe,
    gamma=maybe,
    theta=maybe,
    vega=maybe,
    rho=maybe,
    pos_delta=maybe,
    pos_gamma=maybe,
    pos_theta=maybe,
    pos_vega=maybe,
    seq=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    greeks_source=st.none() | st.sampled_from(["broker", "model"]),
)
