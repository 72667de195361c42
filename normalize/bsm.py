"""Black-Scholes-Merton pricing, Greeks and implied volatility (European, continuous dividend yield).

Rules: pure math. Only :mod:`math` is imported; no clock, no I/O. Time to expiry is passed in,
in years (ACT/365: calendar days / 365).

Units (the engine's canonical units, see ``normalize/model.py``):

- ``price``: in the currency of the underlying, per share (not multiplied by the contract size).
- ``delta``: d price / d spot (call in ``(0, e^{-qT})``, put in ``(-e^{-qT}, 0)``).
- ``gamma``: d delta / d spot.
- ``theta``: price change per **calendar day** (annual theta / 365); negative for long options
  except deep in-the-money European puts (and calls when ``q`` is large), where carry dominates.
- ``vega``: price change per **one volatility point** (sigma + 0.01).
- ``rho``: price change per **1 % rate** move (r + 0.01).

When ``t <= 0`` or ``vol <= 0`` the option is priced at its (forward) intrinsic value and the
Greeks are those of that limit: delta 0 or +-1 (discounted), everything else 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DAYS_PER_YEAR = 365.0
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

IV_MIN = 1e-4
IV_MAX = 5.0


def norm_cdf(x: float) -> float:
    """Standard normal CDF, accurate in both tails (uses ``erfc``)."""
    return 0.5 * math.erfc(-x / _SQRT2)


def norm_pdf(x: float) -> float:
    """Standard normal density."""
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


@dataclass(frozen=True, slots=True)
class BsmGreeks:
    """Price and Greeks of one option, in the units described in the module docstring."""

    price: float
    delta: float
    gamma: float
    theta: float
    vega: float
    rho: float


def _check(spot: float, strike: float) -> None:
    if not (spot > 0.0 and math.isfinite(spot)):
        raise ValueError(f"spot must be a positive finite number, got {spot!r}")
    if not (strike > 0.0 and math.isfinite(strike)):
        raise ValueError(f"strike must be a positive finite number, got {strike!r}")


def _d1_d2(
    spot: float, strike: float, t: float, vol: float, rate: float, div_yield: float
) -> tuple[float, float]:
    sig_sqrt_t = vol * math.sqrt(t)
    d1 = (math.log(spot / strike) + (rate - div_yield + 0.5 * vol * vol) * t) / sig_sqrt_t
    return d1, d1 - sig_sqrt_t


def price(
    *,
    is_call: bool,
    spot: float,
    strike: float,
    t: float,
    vol: float,
    rate: float = 0.0,
    div_yield: float = 0.0,
) -> float:
    """Black-Scholes-Merton price of a European option.

    Args:
        is_call: ``True`` for a call, ``False`` for a put.
        spot: underlying price (> 0).
        strike: strike price (> 0).
        t: time to expiry in years.
        vol: volatility as a fraction (0.2 = 20 %).
        rate: continuously compounded risk-free rate.
        div_yield: continuous dividend yield.

    Raises:
        ValueError: ``spot`` or ``strike`` is not a positive finite number.
    """
    _check(spot, strike)
    df_r = math.exp(-rate * max(t, 0.0))
    df_q = math.exp(-div_yield * max(t, 0.0))
    if t <= 0.0 or vol <= 0.0:
        forward_value = spot * df_q - strike * df_r
        return max(forward_value, 0.0) if is_call else max(-forward_value, 0.0)
    d1, d2 = _d1_d2(spot, strike, t, vol, rate, div_yield)
    if is_call:
        return spot * df_q * norm_cdf(d1) - strike * df_r * norm_cdf(d2)
    return strike * df_r * norm_cdf(-d2) - spot * df_q * norm_cdf(-d1)


def greeks(
    *,
    is_call: bool,
    spot: float,
    strike: float,
    t: float,
    vol: float,
    rate: float = 0.0,
    div_yield: float = 0.0,
) -> BsmGreeks:
    """Price and Greeks of a European option (arguments as for :func:`price`).

    Raises:
        ValueError: ``spot`` or ``strike`` is not a positive finite number.
    """
    _check(spot, strike)
    if t <= 0.0 or vol <= 0.0:
        tt = max(t, 0.0)
        df_r = math.exp(-rate * tt)
        df_q = math.exp(-div_yield * tt)
        value = price(
            is_call=is_call,
            spot=spot,
            strike=strike,
            t=t,
            vol=vol,
            rate=rate,
            div_yield=div_yield,
        )
        in_money = spot * df_q > strike * df_r if is_call else spot * df_q < strike * df_r
        delta = (df_q if is_call else -df_q) if in_money else 0.0
        return BsmGreeks(price=value, delta=delta, gamma=0.0, theta=0.0, vega=0.0, rho=0.0)

    sqrt_t = math.sqrt(t)
    d1, d2 = _d1_d2(spot, strike, t, vol, rate, div_yield)
    df_r = math.exp(-rate * t)
    df_q = math.exp(-div_yield * t)
    pdf_d1 = norm_pdf(d1)
    gamma = df_q * pdf_d1 / (spot * vol * sqrt_t)
    vega_annual = spot * df_q * pdf_d1 * sqrt_t
    decay = -spot * df_q * pdf_d1 * vol / (2.0 * sqrt_t)
    if is_call:
        n_d1, n_d2 = norm_cdf(d1), norm_cdf(d2)
        value = spot * df_q * n_d1 - strike * df_r * n_d2
        delta = df_q * n_d1
        theta_annual = decay - rate * strike * df_r * n_d2 + div_yield * spot * df_q * n_d1
        rho_annual = strike * t * df_r * n_d2
    else:
        n_md1, n_md2 = norm_cdf(-d1), norm_cdf(-d2)
        value = strike * df_r * n_md2 - spot * df_q * n_md1
        delta = -df_q * n_md1
        theta_annual = decay + rate * strike * df_r * n_md2 - div_yield * spot * df_q * n_md1
        rho_annual = -strike * t * df_r * n_md2
    return BsmGreeks(
        price=value,
        delta=delta,
        gamma=gamma,
        theta=theta_annual / DAYS_PER_YEAR,
        vega=vega_annual / 100.0,
        rho=rho_annual / 100.0,
    )


def implied_volatility(
    option_price: float,
    *,
    is_call: bool,
    spot: float,
    strike: float,
    t: float,
    rate: float = 0.0,
    div_yield: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> float | None:
    """Implied volatility (fraction) that reproduces ``option_price``.

    Newton's method on vega, kept inside a bracketing interval that shrinks at every step; when a
    Newton step leaves the bracket (or vega vanishes) a bisection step is taken instead, so the
    solver always converges for an attainable price.

    Returns:
        The volatility in ``[IV_MIN, IV_MAX]``, or ``None`` when there is no solution: ``t <= 0``,
        a non-finite price, or a price outside the no-arbitrage bounds of that range.

    Raises:
        ValueError: ``spot`` or ``strike`` is not a positive finite number.
    """
    _check(spot, strike)
    if t <= 0.0 or not math.isfinite(option_price):
        return None

    def f(vol: float) -> float:
        return (
            price(
                is_call=is_call,
                spot=spot,
                strike=strike,
                t=t,
                vol=vol,
                rate=rate,
                div_yield=div_yield,
            )
            - option_price
        )

    lo, hi = IV_MIN, IV_MAX
    f_lo, f_hi = f(lo), f(hi)
    price_tol = tol * max(1.0, option_price)
    if abs(f_lo) <= price_tol:
        return lo
    if abs(f_hi) <= price_tol:
        return hi
    if f_lo > 0.0 or f_hi < 0.0:
        return None  # below the lowest or above the highest attainable price

    # Brenner-Subrahmanyam start, clamped into the bracket.
    forward = spot * math.exp((rate - div_yield) * t)
    vol = option_price / (0.4 * forward * math.exp(-rate * t) * math.sqrt(t))
    vol = min(max(vol, lo * 2.0), hi / 2.0)
    for _ in range(max_iter):
        diff = f(vol)
        if abs(diff) <= price_tol:
            return vol
        if diff > 0.0:
            hi = vol
        else:
            lo = vol
        d1, _d2 = _d1_d2(spot, strike, t, vol, rate, div_yield)
        vega = spot * math.exp(-div_yield * t) * norm_pdf(d1) * math.sqrt(t)
        candidate = vol - diff / vega if vega > 1e-12 else math.nan
        vol = candidate if lo < candidate < hi else 0.5 * (lo + hi)
        if hi - lo <= tol:
            return vol
    return vol
