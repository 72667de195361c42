"""End to end, wire to commit: the engine and its peers against one feed at one rate.

    python -m bench pipeline --rate 2000 --seconds 10 --out bench/out/pipeline-2k.json
    python -m bench pipeline --rate 50000 --seconds 60 --peers sdk_executemany --out ...

Each contestant runs as its own process against a fresh feed process (``python -m bench.feed``:
IBKR at ``min(rate/2, 2000)`` frames/s, one contract per frame, DXLink the rest; a peer that speaks
one protocol gets the whole rate on it, ``poll`` gets it as virtual ticks behind the REST
snapshot) into a fresh database of one shared PostgreSQL (embedded, fsync and
``synchronous_commit`` on). ``--repeat N`` interleaves N rounds and reports field-wise medians.
Writes FILE.json (``engine`` and ``peers.<name>`` with the issue's keys, ``detail`` with how each
was measured, ``targets``) and FILE.png next to it. See :mod:`bench._harness` for the method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import _report
from bench._harness import ENGINE, ENGINE_ONE, Bench, Run, machine, median_run
from bench.peers import PEERS

OUT = Path(__file__).parent / "out"


def run_rounds(bench: Bench, names: list[str], rate: float, seconds: float, repeat: int) -> dict[str, Run]:
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for k in range(repeat):
        for name in names:
            r = bench.run(name, rate, seconds)
            runs[name].append(r)
            print(
                f"  round {k + 1}/{repeat} {name}: {r.ticks_per_s:,.0f} ticks/s,"
                f" p99 {r.latency_ms.get('p99')} ms" + (f", error {r.error[:120]}" if r.error else ""),
                flush=True,
            )
    return {n: median_run(rs) for n, rs in runs.items()}


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="ticks/s offered")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=OUT / "pipeline.json")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers ('' for none); engine_dxlink / engine_ibkr add the engine on one broker",
    )
    parser.add_argument("--no-engine", action="store_true", help="peers only")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; medians reported")
    parser.add_argument("--positions", type=int, default=500, help="contracts per broker")
    parser.add_argument("--dsn", default=None, help="admin DSN of an existing server (default: embedded)")
    parser.add_argument(
        "--profile", action="store_true", help="one more engine run under py-spy: time per component"
    )
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    names = ([] if args.no_engine else [ENGINE]) + peers
    command = _report.command_line()
    print(f"pipeline: {', '.join(names)} at {args.rate:,.0f} ticks/s for {args.seconds:g} s x {args.repeat}")
    with Bench(args.dsn, positions=args.positions) as bench:
        results = run_rounds(bench, names, args.rate, args.seconds, args.repeat)
        profiled = None
        if args.profile:
            target = ENGINE if ENGINE in names else names[0]
            profiled = bench.run(target, args.rate, args.seconds, profile=True)
    runs = list(results.values())
    print(_report.table(runs))
    doc: dict[str, object] = {
        "command": command,
        "machine": machine(),
        "rate": args.rate,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "positions_per_broker": args.positions,
    }
    if ENGINE in results:
        doc["engine"] = results[ENGINE].keys()
    doc["peers"] = {n: results[n].keys() for n in peers if n in PEERS}
    single = {n: results[n].keys() for n in peers if n in ENGINE_ONE}
    if single:
        doc["engine_single_broker"] = single
    doc["detail"] = {n: r.detail() for n, r in results.items()}
    if ENGINE in results:
        targets = _report.pipeline_targets(
            results[ENGINE], {n: results[n] for n in peers if n in PEERS}, command
        )
        doc["targets"] = targets
        _report.print_targets(targets)
    if profiled is not None and profiled.profile:
        doc["profile"] = {"contestant": profiled.name, **profiled.profile, "run": profiled.keys()}
        _report.print_profile(profiled)
    _report.write_json(args.out, doc)
    png = args.out.with_suffix(".png")
    _report.plot_pipeline(
        runs, png, f"{args.rate:,.0f} ticks/s offered for {args.seconds:g} s (medians of {args.repeat})"
    )
    print(f"wrote {args.out} and {png}")
    return 0
