"""Black-Scholes-Merton against published textbook examples (Hull, *Options, Futures, and Other
Derivatives*), in the engine's units, and the IV solver recovering their volatility."""

from __future__ import annotations

import pytest

from normalize import bsm


def test_hull_example_15_6_call_and_put_prices() -> None:
    """Hull 15.6: S=42, K=40, r=10 %, sigma=20 %, T=0.5: call 4.76, put 0.81."""
    args = {"spot": 42.0, "strike": 40.0, "t": 0.5, "vol": 0.2, "rate": 0.10}
    assert bsm.price(is_call=True, **args) == pytest.approx(4.76, abs=0.005)
    assert bsm.price(is_call=False, **args) == pytest.approx(0.81, abs=0.005)


def test_hull_chapter_19_greeks_example() -> None:
    """Hull 19 (the running delta-hedging example): S=49, K=50, r=5 %, sigma=20 %, T=20 weeks.
    Call 2.40; delta 0.522; gamma 0.066; theta -4.31 per year; vega 12.1 and rho 8.91 per unit
    (100 %) move. The engine's units: theta per calendar day, vega and rho per 1 point."""
    g = bsm.greeks(is_call=True, spot=49.0, strike=50.0, t=20 / 52, vol=0.2, rate=0.05)
    assert g.price == pytest.approx(2.40, abs=0.005)
    assert g.delta == pytest.approx(0.522, abs=0.0005)
    assert g.gamma == pytest.approx(0.066, abs=0.0005)
    assert g.theta * 365 == pytest.approx(-4.31, abs=0.005)
    assert g.vega * 100 == pytest.approx(12.1, abs=0.05)
    assert g.rho * 100 == pytest.approx(8.91, abs=0.005)


@pytest.mark.parametrize(
    ("is_call", "spot", "strike", "t", "rate", "vol", "quoted"),
    [
        (True, 42.0, 40.0, 0.5, 0.10, 0.2, 4.76),
        (False, 42.0, 40.0, 0.5, 0.10, 0.2, 0.81),
        (True, 49.0, 50.0, 20 / 52, 0.05, 0.2, 2.40),
    ],
)
def test_iv_solver_recovers_the_textbook_volatility(
    is_call: bool, spot: float, strike: float, t: float, rate: float, vol: float, quoted: float
) -> None:
    exact = bsm.price(is_call=is_call, spot=spot, strike=strike, t=t, vol=vol, rate=rate)
    iv = bsm.implied_volatility(exact, is_call=is_call, spot=spot, strike=strike, t=t, rate=rate)
    assert iv == pytest.approx(vol, abs=1e-8)
    # From the two-decimal price the book quotes, within what two decimals can carry.
    rounded = bsm.implied_volatility(quoted, is_call=is_call, spot=spot, strike=strike, t=t, rate=rate)
    assert rounded == pytest.approx(vol, abs=0.003)
