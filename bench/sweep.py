"""Sweep: the engine at 1k, 10k, 50k, 100k ticks/s and beyond until it saturates.

    python -m bench sweep --seconds 10 --out bench/out/sweep.json

Past 100k the rate grows by ``--factor`` until a run is not sustained (see
:meth:`bench._harness.Run.sustained`) or ``--max-rate``. ``--peers sdk_executemany`` adds peers
at the same rates (each stops at its own saturation). Writes FILE.json (one entry per rate with
the issue's keys) and FILE.png: latency p50/p99, committed ticks/s and CPU per tick against load.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import _report
from bench._harness import ENGINE, Bench, Run, machine

OUT = Path(__file__).parent / "out"
BASE_RATES = (1_000.0, 10_000.0, 50_000.0, 100_000.0)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=OUT / "sweep.json")
    parser.add_argument("--factor", type=float, default=1.5, help="rate step past 100k")
    parser.add_argument("--max-rate", type=float, default=600_000.0)
    parser.add_argument("--peers", default="", help="comma-separated peers swept too")
    parser.add_argument("--contestant", default=ENGINE, help="engine, engine_dxlink or engine_ibkr")
    parser.add_argument("--positions", type=int, default=500)
    parser.add_argument("--dsn", default=None)
    args = parser.parse_args(argv)
    names = [args.contestant] + [p for p in args.peers.split(",") if p]
    command = _report.command_line()
    series: dict[str, list[Run]] = {n: [] for n in names}
    with Bench(args.dsn, positions=args.positions) as bench:
        for name in names:
            rates = list(BASE_RATES)
            i = 0
            while i < len(rates):
                rate = rates[i]
                r = bench.run(name, rate, args.seconds)
                series[name].append(r)
                ok = r.sustained(rate)
                print(
                    f"  {name:<16} {rate:>10,.0f}/s  {'sustained' if ok else 'saturated':<10}"
                    f" {r.ticks_per_s:>10,.0f}/s  p50 {r.latency_ms.get('p50', 0):.2f} p99"
                    f" {r.latency_ms.get('p99', 0):.2f} ms  {r.cpu_us_per_tick:.1f} us/tick"
                    + (f"  error {r.error[:100]}" if r.error else ""),
                    flush=True,
                )
                if not ok:
                    break
                if i == len(rates) - 1 and rate * args.factor <= args.max_rate:
                    rates.append(round(rate * args.factor, -3))
                i += 1
    for name, runs in series.items():
        print(f"== {name}")
        print(_report.table(runs))
    doc: dict[str, Any] = {"command": command, "machine": machine(), "seconds": args.seconds}
    main = series[args.contestant]
    doc["contestant"] = args.contestant
    doc["engine"] = [dict(rate=r.rate, sustained=r.sustained(r.rate), **r.keys()) for r in main]
    doc["peers"] = {
        n: [dict(rate=r.rate, sustained=r.sustained(r.rate), **r.keys()) for r in runs]
        for n, runs in series.items()
        if n != args.contestant
    }
    doc["detail"] = {n: [r.detail() for r in runs] for n, runs in series.items()}
    sustained = [r.rate for r in main if r.sustained(r.rate)]
    doc["engine_saturates_above"] = max(sustained) if sustained else None
    _report.write_json(args.out, doc)
    png = args.out.with_suffix(".png")
    _report.plot_sweep(series, png, f"Sweep ({args.seconds:g} s per rate)")
    print(f"wrote {args.out} and {png}")
    return 0
