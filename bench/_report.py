"""Tables, target checks, JSON and plots shared by ``pipeline``, ``capacity`` and ``sweep``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from bench._harness import Run, is_engine

STREAMING_PEERS = ("sdk_execute", "sdk_executemany", "ibind_ws")  # poll samples, it does not stream


def command_line() -> str:
    """The command as typed (``bench/__main__`` sets ``argv[0]`` to ``python -m bench NAME``)."""
    head = sys.argv[0] if sys.argv[0].startswith("python") else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def table(runs: list[Run]) -> str:
    header = (
        f"{'contestant':<17}{'rate/s':>9}{'offered':>11}{'committed':>11}{'lost':>11}{'ticks/s':>10}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu s':>7}{'us/tick':>9}{'rss MB':>8}"
        f"{'confl':>11}{'feed s':>7}{'db s':>6}  {'cores c/f/db':<14}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        lat = r.latency_ms
        lines.append(
            f"{r.name:<17}{r.rate:>9,.0f}{r.ticks_offered:>11,}{r.ticks_committed:>11,}{r.lost:>11,}"
            f"{r.ticks_per_s:>10,.0f}{lat.get('p50', 0):>9.2f}{lat.get('p95', 0):>9.2f}"
            f"{lat.get('p99', 0):>9.2f}{lat.get('max', 0):>9.1f}{r.cpu_s:>7.2f}{r.cpu_us_per_tick:>9.1f}"
            f"{r.peak_rss_mb:>8.1f}{r.conflated:>11,}{r.feed_cpu_s:>7.2f}{r.db_cpu_s:>6.2f}  {_cores(r):<14}"
        )
        if r.error:
            lines.append(f"    error: {r.error[:300]}")
    return "\n".join(lines)


def _cores(run: Run) -> str:
    """``contestant/feed/database`` cores busy (``Run.cores``: per run, or the medians of
    repeated runs), or ``-``."""
    c = run.cores
    return f"{c['contestant']:.2f}/{c['feed']:.2f}/{c['database']:.2f}" if c else "-"


def pipeline_targets(engine: Run, peers: dict[str, Run], command: str) -> list[dict[str, Any]]:
    """The issue's targets that one pipeline run at one rate can decide."""
    out: list[dict[str, Any]] = []
    p99 = engine.latency_ms.get("p99")
    if engine.rate == 2000:
        out.append(_target("p99 <= 5 ms at 2,000 ticks/s", p99 is not None and p99 <= 5.0, p99, command))
    if engine.rate == 50000:
        long_enough = engine.seconds >= 60
        out.append(
            _target(
                "p99 <= 25 ms and zero loss at 50,000 ticks/s for 60 s",
                long_enough and p99 is not None and p99 <= 25.0 and engine.lost == 0,
                {"p99_ms": p99, "lost": engine.lost, "seconds": engine.seconds},
                command,
            )
        )
        out.append(
            _target(
                "peak RSS <= 200 MB at 50,000 ticks/s",
                engine.peak_rss_mb <= 200.0,
                engine.peak_rss_mb,
                command,
            )
        )
    streaming = {n: r for n, r in peers.items() if n in STREAMING_PEERS and r.ticks_committed > 0}
    if streaming:
        best_name, best = min(streaming.items(), key=lambda kv: kv[1].cpu_us_per_tick)
        ratio = best.cpu_us_per_tick / engine.cpu_us_per_tick if engine.cpu_us_per_tick else None
        out.append(
            _target(
                "CPU per tick <= 1/5 of the best streaming peer's at the same rate",
                ratio is not None and ratio >= 5.0,
                {
                    "engine_us_per_tick": engine.cpu_us_per_tick,
                    "best_peer": best_name,
                    "best_peer_us_per_tick": best.cpu_us_per_tick,
                    "ratio": None if ratio is None else round(ratio, 2),
                    **_floor(peers, best),
                },
                command,
            )
        )
    return out


def _floor(peers: dict[str, Run], best: Run) -> dict[str, Any]:
    """The references beside the CPU target: ``bare_copy``'s CPU per tick (receive, decode, COPY,
    nothing else) and the best peer's over it, the most any consumer of this feed into this
    database could show against that peer; ``bare_recv``'s (the engine's own input received and
    decoded, nothing stored) and its share of the target's budget (a fifth of the best peer's):
    at 1.0 or more, receiving the frames alone costs what the target allows for everything."""
    out: dict[str, Any] = {}
    bare = peers.get("bare_copy")
    if bare is not None and bare.ticks_committed and bare.cpu_us_per_tick:
        out["bare_copy_us_per_tick"] = bare.cpu_us_per_tick
        out["best_peer_over_bare_copy"] = round(best.cpu_us_per_tick / bare.cpu_us_per_tick, 2)
    recv = peers.get("bare_recv")
    if recv is not None and recv.ticks_committed and recv.cpu_us_per_tick:
        budget = best.cpu_us_per_tick / 5.0
        out["target_us_per_tick"] = round(budget, 2)
        out["bare_recv_us_per_tick"] = recv.cpu_us_per_tick
        out["bare_recv_share_of_target"] = round(recv.cpu_us_per_tick / budget, 2)
    return out


def _target(name: str, met: bool, value: Any, command: str) -> dict[str, Any]:
    return {"target": name, "met": bool(met), "measured": value, "command": command}


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        print(f"{'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['measured']}")


def print_profile(run: Run) -> None:
    if not run.profile:
        return
    print(f"profile of {run.name} (py-spy, GIL-holding samples; a separate run at the same rate):")
    comps = run.profile.get("components_pct", {})
    assert isinstance(comps, dict)
    for name, pct in comps.items():
        if name != "samples":
            print(f"  {pct:>6.1f} %  {name}")
    print("  top functions (self time):")
    tops = run.profile.get("top_functions_pct", [])
    assert isinstance(tops, list)
    for frame, pct in tops[:12]:
        print(f"  {pct:>6.1f} %  {frame[:120]}")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pipeline(runs: list[Run], path: Path, title: str) -> None:
    """Latency percentiles, throughput and CPU per tick, engine beside the peers."""
    plt = _plt()
    names = [r.name for r in runs]
    colors = ["tab:red" if is_engine(n) else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    width = 0.25
    for k, (q, shade) in enumerate((("p50", 0.35), ("p95", 0.65), ("p99", 1.0))):
        xs = [i + (k - 1) * width for i in range(len(runs))]
        ax.bar(
            xs, [max(r.latency_ms.get(q, 0.0), 1e-3) for r in runs], width, label=q, alpha=shade, color="k"
        )
    ax.set_yscale("log")
    ax.set_ylabel("send -> commit latency (ms)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(names, [r.ticks_per_s for r in runs], color=colors)
    ax.axhline(runs[0].rate if runs else 0, color="grey", linestyle=":", label="offered")
    ax.set_ylabel("committed ticks/s")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar(names, [max(r.cpu_us_per_tick, 1e-3) for r in runs], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("CPU per committed tick (us, contestant process)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(capacity: dict[str, float], feed_ceiling: float | None, path: Path, title: str) -> None:
    plt = _plt()
    names = list(capacity)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(
        names,
        [max(capacity[n], 1.0) for n in names],
        color=["tab:red" if is_engine(n) else "tab:blue" for n in names],
    )
    if feed_ceiling:
        ax.axhline(feed_ceiling, color="grey", linestyle=":", label=f"feed ceiling {feed_ceiling:,.0f}/s")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("highest sustained ticks/s (zero loss, no backlog)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(series: dict[str, list[Run]], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, runs in series.items():
        xs = [r.rate for r in runs]
        color = "tab:red" if name == "engine" else None
        axes[0].plot(
            xs,
            [max(r.latency_ms.get("p99", 0), 1e-3) for r in runs],
            marker="o",
            label=f"{name} p99",
            color=color,
        )
        axes[0].plot(
            xs,
            [max(r.latency_ms.get("p50", 0), 1e-3) for r in runs],
            marker=".",
            linestyle="--",
            label=f"{name} p50",
            color=color,
        )
        axes[1].plot(xs, [r.ticks_per_s for r in runs], marker="o", label=name, color=color)
        axes[2].plot(xs, [r.cpu_us_per_tick for r in runs], marker="o", label=name, color=color)
    all_x = sorted({r.rate for runs in series.values() for r in runs})
    axes[1].plot(all_x, all_x, color="grey", linestyle=":", label="offered")
    axes[0].set_ylabel("send -> commit latency (ms)")
    axes[1].set_ylabel("committed ticks/s")
    axes[2].set_ylabel("CPU per tick (us)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered ticks/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
