"""Capacity: the highest rate the engine and each peer sustain (no growing backlog, zero loss).

    python -m bench capacity --seconds 8 --out bench/out/capacity.json

For each contestant, trials of ``--seconds`` at rising rates (doubling from a starting rate,
halving when the start already fails; a contestant that sustains every doubling below the
feed's ceiling then tries the ceiling itself), then ``--refine`` bisection steps between the
last rate sustained and the first one not. A trial is sustained when the feed offered at least
97 % of the rate (the contestant held nothing back through TCP backpressure), nothing was lost, everything
was committed within the drain limit, commits kept pace with the feed while it streamed and
p99 stayed under 500 ms
(:meth:`bench._harness.Run.sustained`). The feed's own ceiling (a bare consumer,
:mod:`bench.feed.probe`) is measured first and bounds the search. ``poll`` has no capacity in
this sense (it loses every tick between two polls at any rate above one per contract per second)
and is left out. Writes FILE.json (``engine.ticks_per_s``, ``peers.<name>.ticks_per_s`` and the
other keys of that best trial; every trial; the ratios and targets) and FILE.png.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path
from typing import Any

from bench import _report
from bench._harness import ENGINE, Bench, Run, machine
from bench.feed.probe import probe

OUT = Path(__file__).parent / "out"
STARTS = {
    ENGINE: 100_000.0,
    "engine_dxlink": 100_000.0,
    "engine_ibkr": 4_000.0,
    "sdk_executemany": 8_000.0,
    "sdk_execute": 500.0,
    "ibind_ws": 2_000.0,
    "bare_copy": 50_000.0,
}
FLOOR = 100.0


def feed_ceiling(bench: Bench, rate: float, seconds: float) -> dict[str, Any]:
    """Ticks/s a bare consumer receives from the feed asked for ``rate`` (both protocols)."""
    workdir = bench.scratch / f"ceiling-{int(time.time())}"
    workdir.mkdir()
    with bench.feed(rate, "both", workdir) as (ready, _pid):
        result = asyncio.run(probe(ready, seconds, ("ibkr", "tastytrade")))
    total = result["ibkr"]["ticks_per_s"] + result["tastytrade"]["ticks_per_s"]
    return {
        "asked": rate,
        "ticks_per_s": round(total, 1),
        "ibkr": result["ibkr"],
        "tastytrade": result["tastytrade"],
    }


def search(
    bench: Bench,
    name: str,
    seconds: float,
    ceiling: float,
    refine: int,
    log: list[dict[str, Any]],
    start: float | None = None,
) -> Run | None:
    """The best sustained trial of ``name`` (None: not even ``FLOOR`` ticks/s)."""

    def trial(rate: float) -> Run:
        r = bench.run(name, rate, seconds)
        ok = r.sustained(rate)
        log.append({"contestant": name, "rate": rate, "sustained": ok, **r.keys(), "detail": r.detail()})
        print(
            f"  {name:<16} {rate:>10,.0f}/s  {'sustained' if ok else 'NOT sustained':<14}"
            f" committed {r.ticks_per_s:>10,.0f}/s  lost {r.lost:>8,}"
            f"  p99 {r.latency_ms.get('p99', 0):>9.2f} ms"
            f"  offered {r.offered_per_s:>10,.0f}/s" + (f"  error {r.error[:100]}" if r.error else ""),
            flush=True,
        )
        return r

    rate = min(start or STARTS.get(name, 1000.0), ceiling)
    best: Run | None = None
    lo, hi = 0.0, None
    first = trial(rate)
    if first.sustained(rate):
        best, lo = first, rate
        while rate * 2 <= ceiling:
            rate *= 2
            r = trial(rate)
            if not r.sustained(rate):
                hi = rate
                break
            best, lo = r, rate
        top = math.floor(ceiling / 100) * 100  # the feed's ceiling itself, when doubling stops short of it
        if hi is None and top > lo:
            r = trial(top)
            if r.sustained(top):
                best, lo = r, top
            else:
                hi = top
    else:
        hi = rate
        while rate / 2 >= FLOOR:
            rate /= 2
            r = trial(rate)
            if r.sustained(rate):
                best, lo = r, rate
                break
            hi = rate
    for _ in range(refine if hi is not None and lo > 0 else 0):
        assert hi is not None
        mid = round((lo + hi) / 2, -2)
        if mid <= lo or mid >= hi:
            break
        r = trial(mid)
        if r.sustained(mid):
            best, lo = r, mid
        else:
            hi = mid
    return best


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each trial")
    parser.add_argument("--out", type=Path, default=OUT / "capacity.json")
    parser.add_argument("--contestants", default="engine,sdk_executemany,sdk_execute,ibind_ws")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling")
    parser.add_argument("--ceiling-rate", type=float, default=400_000.0, help="rate asked of the feed alone")
    parser.add_argument("--start", type=float, default=None, help="starting rate for every contestant")
    parser.add_argument("--positions", type=int, default=500)
    parser.add_argument("--dsn", default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.contestants.split(",") if n]
    command = _report.command_line()
    started = time.time()
    trials: list[dict[str, Any]] = []
    best: dict[str, Run | None] = {}
    with Bench(args.dsn, positions=args.positions) as bench:
        ceiling = feed_ceiling(bench, args.ceiling_rate, min(args.seconds, 5.0))
        print(f"feed ceiling (bare consumer, both protocols): {ceiling['ticks_per_s']:,.0f} ticks/s")
        for name in names:
            best[name] = search(
                bench, name, args.seconds, ceiling["ticks_per_s"], args.refine, trials, args.start
            )
    capacity = {n: (r.ticks_per_s if r else 0.0) for n, r in best.items()}
    print(f"{'contestant':<18}{'sustained ticks/s':>20}")
    for n, v in capacity.items():
        print(f"{n:<18}{v:>20,.0f}")
    doc: dict[str, Any] = {"command": command, "machine": machine(), "seconds_per_trial": args.seconds}
    doc["feed_ceiling"] = ceiling
    if ENGINE in best:
        top = best[ENGINE]
        doc["engine"] = top.keys() if top is not None else {"ticks_per_s": 0.0}
    doc["peers"] = {n: (r.keys() if r else {"ticks_per_s": 0.0}) for n, r in best.items() if n != ENGINE}
    engine = capacity.get(ENGINE, 0.0)
    ratios = {f"engine_over_{n}": round(engine / v, 2) for n, v in capacity.items() if n != ENGINE and v}
    doc["ratios"] = ratios
    # the most each committed per second in any trial, kept up or not ("tops out near")
    doc["max_throughput"] = {
        n: max((t["ticks_per_s"] for t in trials if t["contestant"] == n), default=0.0) for n in names
    }
    targets = []
    if ENGINE in capacity:
        limited = engine >= 0.97 * ceiling["ticks_per_s"]
        targets.append(
            _report._target(
                ">= 150,000 ticks/s" + (" (bounded by the feed's ceiling)" if limited else ""),
                engine >= 150_000,
                engine,
                command,
            )
        )
        for peer, factor in (("sdk_executemany", 4), ("sdk_execute", 40)):
            if capacity.get(peer):
                targets.append(
                    _report._target(
                        f">= {factor}x {peer}",
                        engine >= factor * capacity[peer],
                        ratios.get(f"engine_over_{peer}"),
                        command,
                    )
                )
    doc["targets"] = targets
    doc["trials"] = trials
    doc["elapsed_s"] = round(time.time() - started, 1)
    _report.print_targets(targets)
    _report.write_json(args.out, doc)
    png = args.out.with_suffix(".png")
    _report.plot_capacity(capacity, ceiling["ticks_per_s"], png, f"Capacity ({args.seconds:g} s trials)")
    print(f"wrote {args.out} and {png} in {doc['elapsed_s']:.0f} s")
    return 0
