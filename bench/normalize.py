"""Normalizer benchmark: cost per instrument update of the pure book (merge, fan-out, exposures, row).

    python -m bench normalize [--batch 100] [--repeat 7] [--out FILE.json]

Updates come from the seeded simulator market (the default IBKR book, its option contracts), in
batches of ``--batch`` updates as a busy broker frame stream would deliver them:

- ``broker_path``: every update carries prices and the broker's Greeks and IV (the usual case);
- ``model_path``: updates carry prices only (bid, ask, last), so the book computes the Greeks with
  Black-Scholes-Merton, implying the volatility from the mark;
- ``stock_path``: stock updates (delta 1 by definition), for scale.

Each path is timed ``--repeat`` times over enough batches for about half a second; the median
microseconds per update is reported (the machine is shared: medians, not minima). Prints a table,
writes the JSON (``broker_path_us``, ``model_path_us``, ...) to ``--out`` (default
``bench/out/normalize.json``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from normalize.book import Book
from normalize.events import InstrumentUpdate, PositionsSnapshot
from normalize.model import AssetClass, Right, UnifiedPosition
from simulator.market import Market, MarketConfig, SimPosition

OUT = Path(__file__).parent / "out"
START = 1_767_000_000.0
BROKER_FIELDS = ("bid", "ask", "last", "iv", "delta", "gamma", "theta", "vega", "rho")
PRICE_FIELDS = ("bid", "ask", "last")


def to_position(p: SimPosition) -> UnifiedPosition:
    """A simulator position as the brokers' mappers would produce it."""
    c = p.contract
    return UnifiedPosition(
        broker=p.broker,
        account=p.account,
        instrument=c.key,
        underlying=c.underlying,
        asset_class=AssetClass.OPTION if c.asset_class == "OPT" else AssetClass.STOCK,
        right=None if c.right is None else Right(c.right),
        strike=c.strike,
        expiry=c.expiry,
        multiplier=c.multiplier,
        quantity=p.quantity,
        avg_cost=p.avg_cost,
    )


def _setup(batch: int) -> tuple[Callable[[], Book], dict[str, list[list[InstrumentUpdate]]]]:
    market = Market(MarketConfig(seed=7, positions=max(batch, 36)), START)
    positions = market.positions("ibkr")
    options = [p.contract.key for p in positions if p.contract.asset_class == "OPT"]
    stocks = [p.contract.key for p in positions if p.contract.asset_class != "OPT"]
    underlyings = sorted({p.contract.underlying for p in positions})
    now = START + 1.0
    snapshot = PositionsSnapshot(
        "ibkr", tuple(market.accounts("ibkr")), tuple(map(to_position, positions)), START
    )
    # The underlyings' prices are known (they stream too); the options then stream.
    prices = [
        InstrumentUpdate("ibkr", u, now, now, 1, {"bid": t.bid, "ask": t.ask, "last": t.last})
        for u in underlyings
        for t in [market.tick("ibkr", u, now)]
    ]

    def new_book() -> Book:
        book = Book()
        book.apply([snapshot, *prices])
        return book

    def batches(keys: list[str], fields: tuple[str, ...], n_batches: int) -> list[list[InstrumentUpdate]]:
        out = []
        for b in range(n_batches):
            ts = now + 0.01 * b
            batch_updates = []
            for i in range(batch):
                key = keys[(b * batch + i) % len(keys)]
                t = market.tick("ibkr", key, ts)
                values = {f: getattr(t, f) for f in fields}
                batch_updates.append(InstrumentUpdate("ibkr", key, ts, ts, t.seq, values))
            out.append(batch_updates)
        return out

    return new_book, {
        "broker_path": batches(options, BROKER_FIELDS, 50),
        "model_path": batches(options, PRICE_FIELDS, 20),
        "stock_path": batches(stocks or options, PRICE_FIELDS, 50),
    }


def _time(fn: Callable[[], Any], min_s: float = 0.5) -> float:
    """Seconds per call of ``fn``, over enough calls for about ``min_s``."""
    n = 1
    while True:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / n
        n *= 2 if elapsed < min_s / 4 else max(2, int(min_s / max(elapsed, 1e-9)) + 1)


def run(batch: int, repeat: int) -> dict[str, Any]:
    new_book, paths = _setup(batch)
    results: dict[str, Any] = {"batch": batch, "repeat": repeat}
    for name, batches in paths.items():
        book = new_book()  # one book per path: a path's state never leaks into another's
        per_update = []
        for _ in range(repeat):
            seconds = _time(lambda book=book, batches=batches: [book.apply(b) for b in batches])
            per_update.append(seconds / (len(batches) * batch) * 1e6)
        rows = sum(len(book.apply(b).rows) for b in batches[:1])
        results[f"{name}_us"] = round(statistics.median(per_update), 3)
        results[f"{name}_runs_us"] = [round(x, 3) for x in per_update]
        results[f"{name}_rows_per_update"] = rows / batch
    out = new_book().apply(paths["model_path"][0])
    results["model_rows_with_greeks"] = sum(1 for r in out.rows if r.greeks_source == "model") / len(out.rows)
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["broker_path", "model_path", "stock_path"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    medians = [results[f"{n}_us"] for n in names]
    ax.bar(names, medians, color=["tab:blue", "tab:orange", "tab:green"])
    for i, n in enumerate(names):
        runs = results[f"{n}_runs_us"]
        ax.scatter([i] * len(runs), runs, color="black", s=8, zorder=3)
        ax.annotate(f"{medians[i]:.2f} us", (i, medians[i]), ha="center", va="bottom")
    ax.axhline(3.0, color="red", linestyle=":", label="3 us target (broker path)")
    ax.set_ylabel("us per update (median; dots: runs)")
    ax.set_title(f"Normalizer book, {results['batch']} updates per batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench normalize", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="updates per batch (default 100)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per path; medians reported")
    parser.add_argument("--out", type=Path, default=OUT / "normalize.json")
    args = parser.parse_args(argv)
    results = run(args.batch, args.repeat)
    print(f"{'path':<14} {'us/update (median)':>20} {'runs':>40}")
    for name in ("broker_path", "model_path", "stock_path"):
        runs = " ".join(f"{x:.2f}" for x in results[f"{name}_runs_us"])
        print(f"{name:<14} {results[f'{name}_us']:>20.3f} {runs:>40}")
    print(f"model path: {results['model_rows_with_greeks']:.0%} of rows got model Greeks")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.out} and {png}")
