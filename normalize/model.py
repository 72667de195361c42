"""Canonical, broker-neutral data model.

Rules: pure data. No I/O, no clock, no anyio. Times are passed in as POSIX seconds (float, UTC).
Every persisted row is a :class:`GreeksSnapshot`; the storage layer maps its fields to columns
in the order of :data:`SNAPSHOT_FIELDS`. ``GreeksSnapshot`` is a ``NamedTuple``, not a frozen
dataclass: one is built per position per tick, and a 30-field frozen dataclass costs about 3 us to
construct against about 0.3 us for the tuple (measured on the 2-core dev machine), which is the
whole per-update budget of the normalizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import NamedTuple


class AssetClass(StrEnum):
    STOCK = "STK"
    OPTION = "OPT"
    FUTURE = "FUT"
    FUTURE_OPTION = "FOP"


class Right(StrEnum):
    CALL = "C"
    PUT = "P"


@dataclass(frozen=True, slots=True)
class UnifiedPosition:
    """One position at one broker account, keyed by the canonical instrument key."""

    broker: str
    account: str
    instrument: str  # OCC symbol for options ("SPY   250117C00500000"), ticker for equities
    underlying: str
    asset_class: AssetClass
    right: Right | None
    strike: float | None
    expiry: date | None
    multiplier: float
    quantity: float  # signed: short positions are negative
    avg_cost: float | None


class GreeksSource(StrEnum):
    """Where a row's Greeks came from (the ``greeks_source`` column)."""

    BROKER = "broker"  # delta, gamma, theta and vega all sent by the broker
    MODEL = "model"  # at least one computed by the engine (BSM for options; delta 1 for stock)


class GreeksSnapshot(NamedTuple):
    """One persisted row: the full latest state of one position's instrument at one instant.

    Units are canonical whatever the broker: ``iv`` is a fraction (0.25 = 25 %), ``theta`` is per
    calendar day, ``vega`` per one volatility point, prices in the contract currency. ``None``
    means "no value" (never zero). ``pos_*`` are position-level exposures: the per-contract value
    times the signed quantity times the multiplier.
    """

    broker: str
    account: str
    instrument: str
    underlying: str
    asset_class: str
    right: str | None
    strike: float | None
    expiry: date | None
    multiplier: float
    quantity: float
    event_ts: float  # broker event time, POSIX seconds UTC (receive time when the broker sends none)
    received_ts: float  # local receive time, POSIX seconds UTC; tick-to-commit latency starts here
    bid: float | None = None
    ask: float | None = None
    last: float | None = None
    mark: float | None = None
    underlying_price: float | None = None
    iv: float | None = None
    delta: float | None = None
    gamma: float | None = None
    theta: float | None = None
    vega: float | None = None
    rho: float | None = None
    pos_delta: float | None = None
    pos_gamma: float | None = None
    pos_theta: float | None = None
    pos_vega: float | None = None
    seq: int | None = None  # source sequence number when the source has one (the simulators do)
    greeks_source: str | None = None  # GreeksSource value; None when the row has no Greeks


SNAPSHOT_FIELDS: tuple[str, ...] = GreeksSnapshot._fields


def position_exposure(value: float | None, quantity: float, multiplier: float) -> float | None:
    """Per-contract value times signed quantity times multiplier; ``None`` stays ``None``."""
    if value is None:
        return None
    return value * quantity * multiplier
