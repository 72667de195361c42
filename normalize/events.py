"""Broker-neutral events: what broker actors put on the ``raw`` channel, and what the normalizer
hands the writer on ``rows``.

Rules: pure data. No I/O, no clock. Times are POSIX seconds (float, UTC), passed in.

Flow::

    broker actor --[list[BrokerEvent], one per websocket frame or REST answer]--> raw
    normalizer (normalize.book.Book) --[RowsBatch, one per flush]--> rows --> writer

A broker actor decodes its wire with its pure codec, maps what it decoded with its pure mapper
(:mod:`normalize.ibkr`, :mod:`normalize.tastytrade`) and sends one list of events per frame:

- :class:`PositionsSnapshot`: the complete positions of the accounts it names (at start and on
  every refresh). It *replaces* those accounts' positions: a position missing from it is closed.
- :class:`InstrumentUpdate`: one tick for one instrument, keyed by the canonical instrument key
  (:mod:`normalize.symbology`), carrying only the fields this tick carries. A field that is absent
  from ``values`` is unchanged; a field present with ``None`` is an explicit "no value" (IBKR
  ``""``, DXLink ``"NaN"``) and clears it. Values are already in canonical units (see
  :data:`UPDATE_FIELDS`).
- :class:`SessionStarted` / :class:`SessionEnded`: one broker connection (websocket session), which
  the writer records in ``stream_sessions``.

An ``InstrumentUpdate`` is a ``NamedTuple`` because one is built per tick (see
:mod:`normalize.model` on why not a frozen dataclass); the rarer events are dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from normalize.model import GreeksSnapshot, UnifiedPosition

# The fields an InstrumentUpdate may carry, in canonical units whatever the broker:
#   bid, ask, last, mark, underlying_price: prices per share (per unit) in the contract currency
#   iv: implied volatility as a fraction (0.25 = 25 %; IBKR 7633 is a percent, divide by 100)
#   delta, gamma: per contract per share; theta: per calendar day; vega: per 1 volatility point;
#   rho: per 1 rate point (1 %)
UPDATE_FIELDS: tuple[str, ...] = (
    "bid", "ask", "last", "mark", "underlying_price",
    "iv", "delta", "gamma", "theta", "vega", "rho",
)  # fmt: skip
GREEK_FIELDS: tuple[str, ...] = ("delta", "gamma", "theta", "vega")  # what greeks_source is about


class InstrumentUpdate(NamedTuple):
    """One tick for one instrument, only the fields it carries (see the module docstring)."""

    broker: str
    instrument: str  # canonical key: OCC symbol for options, ticker for stocks and indexes
    event_ts: float  # broker event time; the local receive time when the broker sends none
    received_ts: float  # local receive time of the frame that carried it (latency starts here)
    seq: int | None  # the source's sequence number, if it has one
    values: dict[str, float | None]  # keys among UPDATE_FIELDS; None clears the field


@dataclass(frozen=True, slots=True)
class PositionsSnapshot:
    """The complete positions of ``accounts`` at one broker (replaces them all)."""

    broker: str
    accounts: tuple[str, ...]  # accounts this snapshot covers (an account with no positions: empty)
    positions: tuple[UnifiedPosition, ...]
    as_of: float


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A broker connection is up (authenticated and subscribing)."""

    broker: str
    session_id: str  # unique per connection (e.g. uuid4 hex), chosen by the actor
    accounts: tuple[str, ...]
    host: str  # the broker endpoint's host:port (never credentials)
    mode: str  # "live" or "simulated"
    started_at: float


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """A broker connection ended (closed, dropped, stale, stopped)."""

    broker: str
    session_id: str
    ended_at: float
    reason: str  # short text: "stopped", "closed 1001", "stale: no heartbeat for 30 s", ...
    events: int  # instrument updates received on this connection


SessionEvent = SessionStarted | SessionEnded
BrokerEvent = InstrumentUpdate | PositionsSnapshot | SessionStarted | SessionEnded


@dataclass(frozen=True, slots=True)
class RowsBatch:
    """One item on the ``rows`` channel: what the writer commits together.

    ``rows`` go to history (and the latest-state table); ``positions`` replace the named accounts'
    rows in the ``positions`` table; ``sessions`` insert or close ``stream_sessions`` rows (by
    ``session_id``). All three belong to the same exactly-once batch.
    """

    rows: list[GreeksSnapshot]
    positions: tuple[PositionsSnapshot, ...] = ()
    sessions: tuple[SessionEvent, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)
