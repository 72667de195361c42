"""Black-Scholes-Merton: known values, invariants (hypothesis), units and the IV solver."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from normalize import bsm

spots = st.floats(min_value=5.0, max_value=6000.0)
moneyness = st.floats(min_value=0.6, max_value=1.6)
times = st.floats(min_value=2.0 / 365.0, max_value=3.0)
vols = st.floats(min_value=0.05, max_value=1.5)
rates = st.floats(min_value=0.0, max_value=0.08)
yields = st.floats(min_value=0.0, max_value=0.05)


def test_known_values_hull() -> None:
    """Hull's textbook case: S=K=100, T=1, r=5 %, sigma=20 %."""
    call = bsm.greeks(is_call=True, spot=100, strike=100, t=1.0, vol=0.2, rate=0.05)
    put = bsm.greeks(is_call=False, spot=100, strike=100, t=1.0, vol=0.2, rate=0.05)
    assert call.price == pytest.approx(10.4506, abs=1e-4)
    assert put.price == pytest.approx(5.5735, abs=1e-4)
    assert call.delta == pytest.approx(0.6368, abs=1e-4)
    assert put.delta == pytest.approx(-0.3632, abs=1e-4)
    assert call.gamma == pytest.approx(0.018762, abs=1e-6)
    assert call.vega == pytest.approx(0.3752, abs=1e-4)  # per vol point
    assert call.theta == pytest.approx(-6.4140 / 365, abs=1e-5)  # per calendar day
    assert call.rho == pytest.approx(0.5323, abs=1e-4)  # per 1 % rate


@settings(max_examples=300, deadline=None)
@given(spots, moneyness, times, vols, rates, yields)
def test_signs_bounds_and_parity(s: float, m: float, t: float, vol: float, r: float, q: float) -> None:
    k = s * m
    call = bsm.greeks(is_call=True, spot=s, strike=k, t=t, vol=vol, rate=r, div_yield=q)
    put = bsm.greeks(is_call=False, spot=s, strike=k, t=t, vol=vol, rate=r, div_yield=q)
    df_q, df_r = math.exp(-q * t), math.exp(-r * t)
    assert 0.0 <= call.delta <= df_q
    assert -df_q <= put.delta <= 0.0
    assert call.delta - put.delta == pytest.approx(df_q, abs=1e-9)
    assert call.gamma >= 0.0
    assert call.gamma == pytest.approx(put.gamma)
    assert call.vega >= 0.0
    assert call.vega == pytest.approx(put.vega)
    assert call.rho >= 0.0 >= put.rho
    # put-call parity: C - P = S e^{-qT} - K e^{-rT}
    assert call.price - put.price == pytest.approx(s * df_q - k * df_r, abs=1e-7 * s)
    assert max(s * df_q - k * df_r, 0.0) - 1e-9 * s <= call.price <= s * df_q + 1e-9
    if q == 0.0:
        assert call.theta <= 0.0  # a long call with no dividend never gains value with time


@settings(max_examples=200, deadline=None)
@given(spots, moneyness, times, vols, rates, st.booleans())
def test_greeks_match_finite_differences(
    s: float, m: float, t: float, vol: float, r: float, is_call: bool
) -> None:
    k = s * m

    def p(**kw: float) -> float:
        args = {"spot": s, "t": t, "vol": vol, "rate": r} | kw
        return bsm.price(is_call=is_call, strike=k, **args)

    g = bsm.greeks(is_call=is_call, spot=s, strike=k, t=t, vol=vol, rate=r)
    h = s * 1e-6
    assume(g.vega > 1e-6 * s)  # far from the money everything is ~0: nothing to compare
    assert g.delta == pytest.approx((p(spot=s + h) - p(spot=s - h)) / (2 * h), rel=1e-4, abs=1e-6)
    vega_fd = (p(vol=vol + 1e-6) - p(vol=vol - 1e-6)) / 2e-6 / 100
    assert g.vega == pytest.approx(vega_fd, rel=1e-3, abs=1e-9 * s)
    dt = 1e-5
    theta_fd = -(p(t=t + dt) - p(t=t - dt)) / (2 * dt) / 365.0
    assert g.theta == pytest.approx(theta_fd, rel=1e-3, abs=1e-7 * s)
    assert g.rho == pytest.approx((p(rate=r + 1e-5) - p(rate=r - 1e-5)) / 2e-5 / 100, rel=1e-3, abs=1e-9 * s)


@settings(max_examples=300, deadline=None)
@given(spots, moneyness, times, vols, rates, st.booleans())
def test_iv_round_trip(s: float, m: float, t: float, vol: float, r: float, is_call: bool) -> None:
    k = s * m
    g = bsm.greeks(is_call=is_call, spot=s, strike=k, t=t, vol=vol, rate=r)
    # an option with almost no time value does not pin down its volatility
    assume(g.vega * 100 * 0.01 > 1e-7 * s)
    iv = bsm.implied_volatility(g.price, is_call=is_call, spot=s, strike=k, t=t, rate=r)
    assert iv is not None
    # the solver stops on a price tolerance (1e-10 relative): the volatility error that allows is
    # that tolerance over vega (per unit of volatility), doubled for the last Newton step
    vol_tol = 2 * 1e-10 * max(1.0, g.price) / (g.vega * 100)
    assert iv == pytest.approx(vol, rel=1e-5, abs=max(1e-6, vol_tol))
    repriced = bsm.greeks(is_call=is_call, spot=s, strike=k, t=t, vol=iv, rate=r).price
    assert repriced == pytest.approx(g.price, rel=1e-9, abs=1e-9 * s)


def test_iv_unattainable_prices() -> None:
    kw = {"is_call": True, "spot": 100.0, "strike": 100.0, "t": 0.5, "rate": 0.0}
    assert bsm.implied_volatility(150.0, **kw) is None  # above the spot
    assert bsm.implied_volatility(-1.0, **kw) is None
    assert bsm.implied_volatility(math.nan, **kw) is None
    assert bsm.implied_volatility(5.0, **(kw | {"t": 0.0})) is None


def test_expired_and_zero_vol_limits() -> None:
    itm = bsm.greeks(is_call=True, spot=110, strike=100, t=0.0, vol=0.2)
    assert (itm.price, itm.delta, itm.gamma, itm.vega, itm.theta) == (10.0, 1.0, 0.0, 0.0, 0.0)
    otm_put = bsm.greeks(is_call=False, spot=110, strike=100, t=0.0, vol=0.2)
    assert (otm_put.price, otm_put.delta) == (0.0, 0.0)
    itm_put = bsm.greeks(is_call=False, spot=90, strike=100, t=-1.0, vol=0.2)
    assert (itm_put.price, itm_put.delta) == (10.0, -1.0)


@pytest.mark.parametrize(("spot", "strike"), [(0.0, 100.0), (100.0, -1.0), (math.inf, 100.0)])
def test_invalid_inputs_raise(spot: float, strike: float) -> None:
    with pytest.raises(ValueError):
        bsm.price(is_call=True, spot=spot, strike=strike, t=1.0, vol=0.2)


def test_module_is_pure() -> None:
    """Only ``math`` (plus typing helpers) may be imported: no clock, no I/O."""
    tree = ast.parse(Path(bsm.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"math", "__future__", "dataclasses"}
