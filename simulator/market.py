"""The simulated market shared by both broker simulators.

Rules: pure. No clock and no I/O: every query takes ``now`` (POSIX seconds). One :class:`Market`
instance serves both simulators in a process, so the same contract has the same values at the
same instant whichever simulator asks, and the same seed gives the same values.

Model:

- Each underlying follows a driftless geometric Brownian motion evaluated on a fixed grid
  (``MarketConfig.step_s``, 10 ms by default) from ``start_ts``. The path's clock runs
  ``MarketConfig.path_speed`` times faster than calendar time (100 by default) so that prices
  visibly move during a short run; the options' time to expiry uses real calendar time.
  Increments are drawn block by block from ``random.Random(f"{seed}:{ticker}:{block}")``, so any
  instant can be evaluated in any order with the same result.
- Every option has a fixed implied volatility from a smile around the underlying's base
  volatility (sticky strike), and its price and Greeks come from :mod:`normalize.bsm` with the
  path's underlying price, ``MarketConfig.rate`` and ``MarketConfig.dividend_yield``. Options
  expire at 21:00 UTC on their expiry date; time to expiry never goes below one minute.
- Bid/ask sit around the model price with a small spread on a 0.01 tick; ``mark`` is the mid;
  ``last`` is the model price on a coarser trade grid (1 s for stocks, 3 s for options).
- The default book holds only options whose long theta is negative (puts at most about half a
  standard deviation in the money), several expiries snapped to Fridays, fractional strikes
  (SPXW 12.5 steps such as 5812.5, IWM/AAPL 2.5 steps such as 212.5), an SPXW root on the SPX
  index, stock positions, long and short quantities. Both brokers share part of their book.

``SimPosition.avg_cost`` is a per-unit price (per share; the option premium per share): the IBKR
gateway multiplies it by the multiplier for ``avgCost``; Tastytrade reports it as
``average-open-price``.

Sequence numbers: :meth:`Market.tick` increments a per ``(broker, key)`` counter and records it in
the ledger; a simulator calls it once per update it sends, so after a run the ledger says how
many updates each contract produced per broker.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

from normalize import bsm
from normalize.symbology import occ_symbol, streamer_symbol

SECONDS_PER_YEAR = 365.0 * 86400.0
MIN_T_YEARS = 60.0 / SECONDS_PER_YEAR
EXPIRY_HOUR_UTC = 21
BLOCK_STEPS = 1024
BROKERS = ("ibkr", "tastytrade")


# --------------------------------------------------------------------------- contracts and book


@dataclass(frozen=True, slots=True)
class SimContract:
    """One instrument, with every identifier the brokers use for it."""

    key: str  # OCC symbol for options ("SPY   250117C00500000"), ticker for stocks/indices
    underlying: str  # "SPY"; "SPX" for SPXW options
    root: str  # option root ("SPY", "SPXW"); the ticker for stocks
    asset_class: str  # "STK" | "OPT" | "IND" (the SPX index, an underlying only)
    right: str | None  # "C" | "P" | None
    strike: float | None
    expiry: date | None
    multiplier: float  # 100.0 for options, 1.0 for stocks and indices
    conid: int  # IBKR contract id, unique
    streamer_symbol: str  # DXLink symbol: ".SPY250117C500", ".SPXW250117P5812.5", "SPY"


@dataclass(frozen=True, slots=True)
class SimPosition:
    broker: str  # "ibkr" | "tastytrade"
    account: str
    contract: SimContract
    quantity: float  # signed
    avg_cost: float  # per unit (per share), not multiplied


@dataclass(frozen=True, slots=True)
class Tick:
    """The full state of one contract at one instant."""

    key: str
    seq: int
    ts: float  # POSIX seconds
    underlying_price: float
    bid: float
    ask: float
    last: float
    mark: float
    volume: int
    iv: float | None
    delta: float | None
    gamma: float | None
    theta: float | None  # per calendar day
    vega: float | None  # per volatility point
    rho: float | None  # per 1 % rate


@dataclass(frozen=True, slots=True)
class UnderlyingSpec:
    """An underlying of the simulated market."""

    ticker: str
    spot: float
    vol: float  # base (ATM) volatility, also the GBM volatility
    strike_step: float
    conid: int
    root: str = ""  # option root; defaults to the ticker
    asset_class: str = "STK"  # "STK" or "IND"
    skew: float = 0.10  # IV change per standard deviation of moneyness (puts richer)
    listing_exchange: str = "NASDAQ"
    name: str = ""

    @property
    def option_root(self) -> str:
        return self.root or self.ticker


DEFAULT_UNDERLYINGS: tuple[UnderlyingSpec, ...] = (
    UnderlyingSpec("SPY", 500.0, 0.16, 5.0, 756733, listing_exchange="ARCA",
                   name="SPDR S&P 500 ETF TRUST"),
    UnderlyingSpec("QQQ", 430.0, 0.20, 5.0, 320227571, listing_exchange="NASDAQ",
                   name="INVESCO QQQ TRUST SERIES 1"),
    UnderlyingSpec("AAPL", 190.0, 0.25, 2.5, 265598, listing_exchange="NASDAQ",
                   name="APPLE INC"),
    UnderlyingSpec("SPX", 5800.0, 0.15, 12.5, 416904, root="SPXW", asset_class="IND",
                   listing_exchange="CBOE", name="S&P 500 Stock Index"),
    UnderlyingSpec("IWM", 210.0, 0.22, 2.5, 9579970, listing_exchange="ARCA",
                   name="ISHARES RUSSELL 2000 ETF"),
)  # fmt: skip

DEFAULT_EXPIRY_DAYS: tuple[int, ...] = (3, 10, 24, 45, 80, 140, 260)


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """Everything that shapes the simulated market and books."""

    seed: int = 42
    positions: int = 0  # 0: default book (tens per broker); N: about N contracts per broker
    rate_hz: float = 2.0  # updates per contract per second
    burstiness: float = 0.0  # 0 = evenly spaced, 1 = very bursty (seeded)
    ibkr_accounts: tuple[str, ...] = ("U1234567",)
    tastytrade_accounts: tuple[str, ...] = ("5WT00001",)
    rate: float = 0.04
    dividend_yield: float = 0.0
    underlyings: tuple[UnderlyingSpec, ...] = DEFAULT_UNDERLYINGS
    expiry_days: tuple[int, ...] = DEFAULT_EXPIRY_DAYS  # from the start date, snapped to Fridays
    step_s: float = 0.01  # path grid
    path_speed: float = 100.0  # path time runs this many times faster than calendar time
    start_date: date | None = None  # default: the UTC date of start_ts
    rate_overrides: tuple[tuple[str, float], ...] = ()  # (key, Hz) per contract
    seq_offset: int = 0  # first seq emitted is seq_offset + 1 (a restarted simulator continues)
    record_times: bool = False  # keep every emission time per (broker, key): Market.emissions()
    ibkr_stocks: tuple[str, ...] = ("SPY", "AAPL", "QQQ")  # stock positions in the IBKR book
    tastytrade_stocks: tuple[str, ...] = ("SPY", "IWM", "AAPL")

    def __post_init__(self) -> None:
        if self.positions < 0:
            raise ValueError("positions must be >= 0")
        if self.step_s <= 0 or self.path_speed <= 0:
            raise ValueError("step_s and path_speed must be > 0")
        if not self.ibkr_accounts or not self.tastytrade_accounts:
            raise ValueError("each broker needs at least one account")


def _stable_conid(key: str, taken: set[int]) -> int:
    conid = 500_000_000 + zlib.crc32(key.encode()) % 400_000_000
    while conid in taken:
        conid += 1
    return conid


def _friday_on_or_after(day: date) -> date:
    return day + timedelta(days=(4 - day.weekday()) % 7)


# --------------------------------------------------------------------------- price paths


class _Path:
    """A seeded GBM on a fixed grid, evaluated lazily by blocks of ``BLOCK_STEPS`` steps."""

    def __init__(self, seed: int, spec: UnderlyingSpec, step_s: float, path_speed: float) -> None:
        self._seed = seed
        self._ticker = spec.ticker
        self._log_s0 = math.log(spec.spot)
        dt = step_s * path_speed / SECONDS_PER_YEAR
        self._drift = -0.5 * spec.vol * spec.vol * dt
        self._diffusion = spec.vol * math.sqrt(dt)
        self._block_start: list[float] = [0.0]  # cumulative log return at each block's start
        self._cache: OrderedDict[int, list[float]] = OrderedDict()

    def _block(self, block: int) -> list[float]:
        cached = self._cache.get(block)
        if cached is not None:
            self._cache.move_to_end(block)
            return cached
        rng = random.Random(f"{self._seed}:{self._ticker}:{block}")
        acc = 0.0
        out = [0.0] * BLOCK_STEPS
        gauss = rng.gauss
        for i in range(BLOCK_STEPS):
            out[i] = acc  # the offset at step i of this block, before its own increment
            acc += self._drift + self._diffusion * gauss(0.0, 1.0)
        out.append(acc)
        self._cache[block] = out
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return out

    def log_return(self, step: int) -> float:
        block, offset = divmod(max(step, 0), BLOCK_STEPS)
        while len(self._block_start) <= block:
            b = len(self._block_start) - 1
            self._block_start.append(self._block_start[b] + self._block(b)[BLOCK_STEPS])
        return self._block_start[block] + self._block(block)[offset]

    def price(self, step: int) -> float:
        return math.exp(self._log_s0 + self.log_return(step))


# --------------------------------------------------------------------------- the market


@dataclass(frozen=True, slots=True)
class _OptionModel:
    spec: UnderlyingSpec
    iv: float
    expiry_ts: float
    is_call: bool
    strike: float


class Market:
    """The simulated market: contracts, per-broker books, prices over time and the seq ledger."""

    def __init__(self, config: MarketConfig, start_ts: float) -> None:
        self.config = config
        self.start_ts = start_ts
        self.start_date = config.start_date or datetime.fromtimestamp(start_ts, UTC).date()
        self.specs: dict[str, UnderlyingSpec] = {s.ticker: s for s in config.underlyings}
        self._paths = {
            t: _Path(config.seed, s, config.step_s, config.path_speed) for t, s in self.specs.items()
        }
        self.contracts: dict[str, SimContract] = {}
        self.by_conid: dict[int, SimContract] = {}
        self.by_streamer: dict[str, SimContract] = {}
        self._models: dict[str, _OptionModel] = {}
        self._ledger: dict[tuple[str, str], int] = {}
        self._times: dict[tuple[str, str], list[float]] = {}
        self._rates = dict(config.rate_overrides)
        self._taken_conids: set[int] = set()
        self._options: dict[str, SimContract] = {}  # every option built (universe and pinned)
        for spec in config.underlyings:
            self._add(
                SimContract(
                    key=spec.ticker,
                    underlying=spec.ticker,
                    root=spec.ticker,
                    asset_class=spec.asset_class,
                    right=None,
                    strike=None,
                    expiry=None,
                    multiplier=1.0,
                    conid=spec.conid,
                    streamer_symbol=spec.ticker,
                )
            )
        self.expiries: list[date] = sorted(
            {_friday_on_or_after(self.start_date + timedelta(days=d)) for d in config.expiry_days}
        )
        self.universe: list[SimContract] = self._build_universe()
        self._positions: dict[str, list[SimPosition]] = self._build_books()

    # ----------------------------------------------------------------------- construction

    def _add(self, contract: SimContract) -> None:
        if contract.key in self.contracts:
            return
        self.contracts[contract.key] = contract
        self.by_conid[contract.conid] = contract
        self.by_streamer[contract.streamer_symbol] = contract
        self._taken_conids.add(contract.conid)

    def _expiry_ts(self, expiry: date) -> float:
        return datetime(expiry.year, expiry.month, expiry.day, EXPIRY_HOUR_UTC, tzinfo=UTC).timestamp()

    def _smile_iv(self, spec: UnderlyingSpec, strike: float, t: float) -> float:
        m = math.log(strike / spec.spot) / (spec.vol * math.sqrt(t))
        iv = spec.vol * (1.0 - spec.skew * m + 0.02 * m * m)
        return min(max(iv, 0.5 * spec.vol), 2.0 * spec.vol)

    def _build_universe(self) -> list[SimContract]:
        """Every option the books may hold, strikes banded by each expiry's standard deviation.

        Calls: from 1 sd in the money to 2 sd out; puts: from 2 sd out to 0.5 sd in the money
        (at least two strikes each way), which keeps long theta negative everywhere.
        """
        universe: list[SimContract] = []
        needed = max(self.config.positions, 40)
        widen = 1.0
        while True:
            universe = []
            for spec in self.config.underlyings:
                for expiry in self.expiries:
                    t = max((self._expiry_ts(expiry) - self.start_ts) / SECONDS_PER_YEAR, 1 / 365)
                    sd = spec.spot * spec.vol * math.sqrt(t)
                    centre = round(spec.spot / spec.strike_step)
                    for right in ("C", "P"):
                        if right == "C":
                            lo_px, hi_px = spec.spot - sd, spec.spot + 2.0 * widen * sd
                        else:
                            lo_px, hi_px = spec.spot - 2.0 * widen * sd, spec.spot + 0.5 * sd
                        lo = min(centre - 2, math.floor(lo_px / spec.strike_step))
                        hi = max(centre + 2, math.floor(hi_px / spec.strike_step))
                        for i in range(lo, hi + 1):
                            strike = i * spec.strike_step
                            if strike <= 0:
                                continue
                            universe.append(self._option(spec, expiry, right, strike))
            if len(universe) >= 2 * needed or widen > 64:
                return universe
            widen *= 2.0

    def _option(self, spec: UnderlyingSpec, expiry: date, right: str, strike: float) -> SimContract:
        key = occ_symbol(spec.option_root, expiry, right, strike)
        existing = self._options.get(key)
        if existing is not None:
            return existing
        contract = SimContract(
            key=key,
            underlying=spec.ticker,
            root=spec.option_root,
            asset_class="OPT",
            right=right,
            strike=strike,
            expiry=expiry,
            multiplier=100.0,
            conid=_stable_conid(key, self._taken_conids),
            streamer_symbol=streamer_symbol(spec.option_root, expiry, right, strike),
        )
        self._taken_conids.add(contract.conid)
        self._options[key] = contract
        expiry_ts = self._expiry_ts(expiry)
        t0 = max((expiry_ts - self.start_ts) / SECONDS_PER_YEAR, MIN_T_YEARS)
        self._models[key] = _OptionModel(
            spec=spec,
            iv=self._smile_iv(spec, strike, t0),
            expiry_ts=expiry_ts,
            is_call=right == "C",
            strike=strike,
        )
        return contract

    def _pinned(self) -> list[SimContract]:
        """Contracts every default book shares: fractional strikes, SPXW, calls and puts."""
        picks: list[SimContract] = []
        exp = self.expiries[min(2, len(self.expiries) - 1)]
        for spec in self.config.underlyings:
            centre = round(spec.spot / spec.strike_step) * spec.strike_step
            picks.append(self._option(spec, exp, "C", centre))
            picks.append(self._option(spec, exp, "P", centre - spec.strike_step))
            if spec.strike_step % 1:  # a fractional strike, e.g. 5812.5 or 212.5
                picks.append(self._option(spec, exp, "C", centre + spec.strike_step))
        return picks

    def _build_books(self) -> dict[str, list[SimPosition]]:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:book")
        per_broker = cfg.positions or 36
        held = {"ibkr": cfg.ibkr_stocks, "tastytrade": cfg.tastytrade_stocks}
        stocks = {b: [t for t in held[b] if t in self.specs] for b in BROKERS}
        pinned = self._pinned()
        # Weighted sample without replacement (Efraimidis-Spirakis): near the money, near expiry.
        ranked: list[tuple[float, SimContract]] = []
        for c in self.universe:
            model = self._models[c.key]
            t = max((model.expiry_ts - self.start_ts) / SECONDS_PER_YEAR, MIN_T_YEARS)
            m = abs(math.log(model.strike / model.spec.spot)) / (model.spec.vol * math.sqrt(t))
            weight = math.exp(-m) / (1.0 + 4.0 * t)
            ranked.append((rng.random() ** (1.0 / weight), c))
        ranked.sort(key=lambda item: item[0], reverse=True)
        pool = [c for _, c in ranked if c not in pinned]

        books: dict[str, list[SimPosition]] = {}
        n_opts = {b: max(per_broker - len(stocks[b]), 1) for b in BROKERS}
        shared_n = min(n_opts.values()) // 3
        shared = (pinned + pool)[: max(shared_n, min(len(pinned), min(n_opts.values())))]
        rest = [c for c in pool if c not in shared]
        for index, broker in enumerate(BROKERS):
            own_n = n_opts[broker] - len(shared)
            own = rest[index::2][: max(own_n, 0)]
            accounts = self.accounts(broker)
            positions: list[SimPosition] = []
            for i, ticker in enumerate(stocks[broker]):
                contract = self.contracts[ticker]
                qty = float(rng.choice((1, 1, 2, 3, 5)) * 100 * (-1 if rng.random() < 0.15 else 1))
                cost = round(self.specs[ticker].spot * (1 + rng.uniform(-0.1, 0.1)), 4)
                positions.append(SimPosition(broker, accounts[i % len(accounts)], contract, qty, cost))
            for i, contract in enumerate(list(shared) + own):
                self._add(contract)
                qty = float(rng.choice((1, 1, 2, 2, 3, 5, 10, 20)))
                if rng.random() < 0.35:
                    qty = -qty
                theo = self._option_greeks(contract.key, self.start_ts).price
                cost = round(max(theo * (1 + rng.uniform(-0.25, 0.25)), 0.01), 4)
                account = accounts[(i + len(stocks[broker])) % len(accounts)]
                positions.append(SimPosition(broker, account, contract, qty, cost))
            books[broker] = positions
        return books

    # ----------------------------------------------------------------------- queries

    def accounts(self, broker: str) -> list[str]:
        if broker == "ibkr":
            return list(self.config.ibkr_accounts)
        if broker == "tastytrade":
            return list(self.config.tastytrade_accounts)
        raise ValueError(f"unknown broker {broker!r}")

    def positions(self, broker: str) -> list[SimPosition]:
        if broker not in self._positions:
            raise ValueError(f"unknown broker {broker!r}")
        return list(self._positions[broker])

    def set_positions(self, broker: str, positions: list[SimPosition]) -> None:
        """Replace ``broker``'s book (positions that open, change and close at run time); their
        contracts become known to the market (``by_conid``, ticks) if they were not yet."""
        if broker not in self._positions:
            raise ValueError(f"unknown broker {broker!r}")
        for position in positions:
            if position.broker != broker:
                raise ValueError(f"a {position.broker} position in the {broker} book")
            if position.contract.key not in self.contracts and position.contract.key not in self._models:
                raise ValueError(f"unknown contract {position.contract.key!r}")
            self._add(position.contract)
        self._positions[broker] = list(positions)

    def option_contracts(self) -> list[SimContract]:
        """Every option the market can price (the universe the books are drawn from)."""
        return list(self._options.values())

    def underlying_contract(self, contract: SimContract) -> SimContract:
        """The stock or index a contract derives from (itself for a stock)."""
        return self.contracts[contract.underlying]

    def expiry_ts(self, contract: SimContract) -> float | None:
        """POSIX time at which an option expires (21:00 UTC on its expiry date)."""
        model = self._models.get(contract.key)
        return model.expiry_ts if model else None

    def rate_hz(self, key: str) -> float:
        """Update rate of one contract (``MarketConfig.rate_overrides`` or the default)."""
        return self._rates.get(key, self.config.rate_hz)

    def step(self, now: float) -> int:
        return max(int((now - self.start_ts) / self.config.step_s), 0)

    def spot(self, ticker: str, now: float) -> float:
        """Underlying price on the path at ``now``."""
        return self._paths[ticker].price(self.step(now))

    def model_iv(self, key: str) -> float | None:
        model = self._models.get(key)
        return model.iv if model else None

    def _option_greeks(self, key: str, now: float, spot: float | None = None) -> bsm.BsmGreeks:
        model = self._models[key]
        s = spot if spot is not None else self.spot(model.spec.ticker, now)
        t = max((model.expiry_ts - now) / SECONDS_PER_YEAR, MIN_T_YEARS)
        return bsm.greeks(
            is_call=model.is_call,
            spot=s,
            strike=model.strike,
            t=t,
            vol=model.iv,
            rate=self.config.rate,
            div_yield=self.config.dividend_yield,
        )

    def _state(self, key: str, now: float, seq: int) -> Tick:
        contract = self.contracts.get(key)
        if contract is None:
            raise KeyError(f"unknown contract {key!r}")
        elapsed = max(now - self.start_ts, 0.0)
        salt = zlib.crc32(key.encode())
        if contract.asset_class != "OPT":
            spot = self.spot(contract.underlying, now)
            last_t = self.start_ts + math.floor(elapsed)
            last = round(self.spot(contract.underlying, last_t), 2)
            if contract.asset_class == "IND":
                bid = ask = round(spot, 2)
            else:
                bid = math.floor(spot * 100.0 + 1e-9) / 100.0
                ask = round(bid + 0.01, 2)
            volume = 1_000_000 + salt % 5_000_000 + int(elapsed * 2_000)
            return Tick(
                key=key, seq=seq, ts=now, underlying_price=spot,
                bid=bid, ask=ask, last=last, mark=round((bid + ask) / 2, 4), volume=volume,
                iv=None, delta=1.0, gamma=None, theta=None, vega=None, rho=None,
            )  # fmt: skip
        spot = self.spot(contract.underlying, now)
        g = self._option_greeks(key, now, spot)
        theo = g.price
        spread = min(max(0.02 * theo, 0.01), 1.0)
        bid = max(math.floor((theo - spread / 2) * 100.0 + 1e-9) / 100.0, 0.0)
        ask = max(math.ceil((theo + spread / 2) * 100.0 - 1e-9) / 100.0, round(bid + 0.01, 2))
        last_t = self.start_ts + 3.0 * math.floor(elapsed / 3.0)
        last = round(max(self._option_greeks(key, last_t).price, 0.01), 2)
        volume = 10 + salt % 5_000 + int(elapsed * 0.5)
        return Tick(
            key=key, seq=seq, ts=now, underlying_price=spot,
            bid=round(bid, 2), ask=round(ask, 2), last=last, mark=round((bid + ask) / 2, 4),
            volume=volume, iv=self._models[key].iv, delta=g.delta, gamma=g.gamma,
            theta=g.theta, vega=g.vega, rho=g.rho,
        )  # fmt: skip

    def tick(self, broker: str, key: str, now: float) -> Tick:
        """The state of ``key`` at ``now`` as ``broker`` emits it: increments and records its seq."""
        seq = self._ledger.get((broker, key), self.config.seq_offset) + 1
        tick = self._state(key, now, seq)
        self._ledger[(broker, key)] = seq
        if self.config.record_times:
            self._times.setdefault((broker, key), []).append(now)
        return tick

    def ticks(self, broker: str, key: str, now: float, count: int) -> list[Tick]:
        """``count`` emissions of ``key`` at the same instant (one per event sent): the same
        values, consecutive seqs, all recorded; the state is computed once."""
        if count <= 0:
            return []
        first = self.tick(broker, key, now)
        seq = first.seq
        rest = [replace(first, seq=seq + i) for i in range(1, count)]
        self._ledger[(broker, key)] = seq + count - 1
        if self.config.record_times and rest:
            self._times[(broker, key)].extend([now] * len(rest))
        return [first, *rest]

    def option(self, underlying: str, expiry: date, right: str, strike: float) -> SimContract:
        """An option on one of the market's underlyings (built on demand, priced like the rest)."""
        return self._option(self.specs[underlying], expiry, right, strike)

    def peek(self, key: str, now: float, broker: str | None = None) -> Tick:
        """The same values as :meth:`tick` without emitting; ``seq`` is the last one emitted
        (for ``broker``, or the highest over all brokers)."""
        if broker is not None:
            seq = self._ledger.get((broker, key), 0)
        else:
            seq = max((s for (_, k), s in self._ledger.items() if k == key), default=0)
        return self._state(key, now, seq)

    def emissions(self, broker: str | None = None) -> dict[tuple[str, str], list[float]]:
        """``(broker, key) -> emission time of each seq`` (seq ``seq_offset + 1 + i`` at index
        ``i``), when ``MarketConfig.record_times`` is on; empty otherwise."""
        return {k: list(v) for k, v in self._times.items() if broker is None or k[0] == broker}

    def ledger(self, broker: str | None = None) -> dict[tuple[str, str], int]:
        """``(broker, key) -> last seq emitted``, for one broker or all."""
        return {k: v for k, v in self._ledger.items() if broker is None or k[0] == broker}
