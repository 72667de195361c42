"""IBKR actor benchmark: the per-frame cost of decode + map, and the actor against the simulator.

    python -m bench ibkr [--repeat 7] [--e2e-seconds 5] [--rate 50] [--out FILE.json]

1. **Per frame** (pure code, no sockets): ``smd`` frames as the gateway simulator writes them
   (full first frames and deltas of the fields that changed, strings, ``_seq``), for the default
   IBKR book's options. Three paths, each timed ``--repeat`` times (medians of microseconds per
   frame are reported; the machine is shared):

   - ``json_only``: ``orjson.loads`` of the frame, the floor any decoder pays (baseline);
   - ``codec``: :meth:`IbkrProtocol.receive_text` + :meth:`events_received`;
   - ``codec_map``: the same plus :func:`normalize.ibkr.instrument_update`, i.e. what the actor
     does per frame before its one channel send.

2. **End to end** (``--e2e-seconds`` > 0): the actor under the supervisor against the in-process
   gateway simulator at ``--rate`` updates per contract per second, a collector draining ``raw``.
   Reports the frames the simulator sent per second, the updates that reached ``raw`` per second,
   the delay from the frame's ``_updated`` (ms resolution) to its arrival on ``raw`` (p50, p99) and
   the process CPU per update (simulator and actor share the process and its event loop).

Prints a table, writes the JSON to ``--out`` (default ``bench/out/ibkr.json``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson

from actors.ibkr.protocol import OPTION_FIELDS, IbkrProtocol, MarketData
from normalize.ibkr import instrument_update
from simulator.ibkr import IbkrOptions, market_fields
from simulator.market import Market, MarketConfig

OUT = Path(__file__).parent / "out"
START = 1_767_000_000.0


def frames(n_frames: int = 2000) -> tuple[list[bytes], dict[int, str]]:
    """Simulator-shaped smd frames: each option's full frame, then deltas, round robin."""
    market = Market(MarketConfig(seed=7), START)
    options = [p.contract for p in market.positions("ibkr") if p.contract.asset_class == "OPT"]
    opts = IbkrOptions()
    last: dict[int, dict[str, Any]] = {}
    out: list[bytes] = []
    for i in range(n_frames):
        c = options[i % len(options)]
        now = START + 0.05 * i
        tick = market.tick("ibkr", c.key, now)
        spec = market.specs[c.underlying]
        values = market_fields(
            c,
            tick,
            prior_close=tick.last,
            underlying_conid=spec.conid,
            underlying_iv=spec.vol,
            options=opts,
            with_greeks=True,
        )
        values = {k: v for k, v in values.items() if k in OPTION_FIELDS}
        previous = last.get(c.conid)
        changed = values if previous is None else {k: v for k, v in values.items() if previous.get(k) != v}
        last[c.conid] = values
        frame = {"server_id": "q1", "conidEx": str(c.conid), "conid": c.conid, "_updated": int(now * 1000)}
        frame |= {"6119": "q1", **changed, "topic": f"smd+{c.conid}", "_seq": tick.seq}
        out.append(orjson.dumps(frame))
    return out, {c.conid: c.key for c in options}


def _time(fn: Callable[[], Any], min_s: float = 0.3) -> float:
    n = 1
    while True:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / n
        n *= 2


def per_frame(repeat: int) -> dict[str, Any]:
    data, keys = frames()
    proto = IbkrProtocol(session="s", now=START, hb_timeout_s=1e12, tic_interval_s=1e12, resubscribe_s=1e12)
    proto.set_subscriptions(dict.fromkeys(keys, OPTION_FIELDS), START)
    proto.receive_text(b'{"topic":"sts","args":{"authenticated":true}}', START)
    proto.events_received()

    def json_only() -> None:
        loads = orjson.loads
        for d in data:
            loads(d)

    def codec() -> None:
        receive, events = proto.receive_text, proto.events_received
        for d in data:
            receive(d, START)
            events()

    def codec_map() -> None:
        receive, events = proto.receive_text, proto.events_received
        for d in data:
            receive(d, START)
            for e in events():
                if type(e) is MarketData:
                    instrument_update(
                        keys[e.conid], e.fields, updated_ms=e.updated_ms, seq=e.seq, received_ts=START
                    )

    results: dict[str, Any] = {"frames": len(data), "mean_frame_bytes": sum(map(len, data)) / len(data)}
    for name, fn in (("json_only", json_only), ("codec", codec), ("codec_map", codec_map)):
        runs = [_time(fn) / len(data) * 1e6 for _ in range(repeat)]
        results[f"{name}_us"] = round(statistics.median(runs), 3)
        results[f"{name}_runs_us"] = [round(r, 3) for r in runs]
    results["codec_map_over_json"] = round(results["codec_map_us"] / results["json_only_us"], 2)
    return results


async def end_to_end(seconds: float, rate_hz: float) -> dict[str, Any]:
    """The actor and a draining sink under the supervisor, against the in-process simulator."""
    from anyio.abc import TaskStatus

    from actors.ibkr.actor import make_ibkr_actor
    from config.settings import IbkrSettings
    from normalize.events import InstrumentUpdate
    from simulator.ibkr import IbkrGateway
    from supervisor.context import ActorContext
    from supervisor.spec import ActorSpec, ChannelSpec
    from supervisor.status import StatusRegistry
    from supervisor.supervisor import Supervisor

    market = Market(MarketConfig(seed=7, rate_hz=rate_hz), time.time())
    updates: list[InstrumentUpdate] = []
    first = anyio.Event()

    async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async for batch in ctx.receivers["raw"]:
            for event in batch:
                if isinstance(event, InstrumentUpdate):
                    updates.append(event)
                    first.set()

    gw = IbkrGateway(market, hb_interval_s=1.0)
    await gw.start()
    try:
        settings = IbkrSettings(gateway_url=gw.base_url, hb_timeout_s=10.0)
        supervisor = Supervisor(
            [
                ActorSpec("sink", sink, inputs=("raw",)),
                ActorSpec("ibkr", make_ibkr_actor(settings, mode="simulated"), outputs=("raw",)),
            ],
            [ChannelSpec("raw", 256)],
            StatusRegistry(mode="simulated", clock=time.time),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run)
            with anyio.fail_after(30):
                await first.wait()
            await anyio.sleep(1.0)  # past the full first frames
            frames0, n0, t0, cpu0 = gw.stats["frames"], len(updates), time.time(), time.process_time()
            await anyio.sleep(seconds)
            elapsed, cpu = time.time() - t0, time.process_time() - cpu0
            sent, measured = gw.stats["frames"] - frames0, updates[n0:]
            conids = len(gw.subscribed_conids())
            supervisor.request_stop()
    finally:
        await gw.stop()
    delays = sorted((u.received_ts - u.event_ts) * 1000 for u in measured)
    return {
        "rate_hz": rate_hz,
        "conids": conids,
        "seconds": round(elapsed, 3),
        "frames_sent_per_s": round(sent / elapsed, 1),
        "updates_on_raw_per_s": round(len(measured) / elapsed, 1),
        "delay_ms_p50": round(delays[len(delays) // 2], 3) if delays else None,
        "delay_ms_p99": round(delays[int(len(delays) * 0.99)], 3) if delays else None,
        "process_cpu_per_update_us": round(cpu / max(len(measured), 1) * 1e6, 1),
        "process_cpu_share": round(cpu / elapsed, 3),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["json_only", "codec", "codec_map"]
    medians = [results[f"{n}_us"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar(names, medians, color=["tab:gray", "tab:blue", "tab:green"])
    for i, n in enumerate(names):
        runs = results[f"{n}_runs_us"]
        ax.scatter([i] * len(runs), runs, color="black", s=8, zorder=3)
        ax.annotate(f"{medians[i]:.2f} us", (i, medians[i]), ha="center", va="bottom")
    ax.set_ylabel("us per smd frame (median; dots: runs)")
    ax.set_title(f"IBKR frame path, {results['mean_frame_bytes']:.0f}-byte frames")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench ibkr", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--e2e-seconds", type=float, default=5.0, help="0: skip the end-to-end run")
    parser.add_argument("--rate", type=float, default=50.0, help="end to end: updates/s per contract")
    parser.add_argument("--out", type=Path, default=OUT / "ibkr.json")
    args = parser.parse_args(argv)
    results = per_frame(args.repeat)
    print(f"{'path':<12} {'us/frame (median)':>18}   runs")
    for name in ("json_only", "codec", "codec_map"):
        runs = " ".join(f"{x:.2f}" for x in results[f"{name}_runs_us"])
        print(f"{name:<12} {results[f'{name}_us']:>18.3f}   {runs}")
    print(f"decode + map / json.loads alone: {results['codec_map_over_json']}x")
    if args.e2e_seconds > 0:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        e2e = anyio.run(end_to_end, args.e2e_seconds, args.rate)
        results["end_to_end"] = e2e
        print(
            f"end to end: {e2e['conids']} conids at {e2e['rate_hz']:g} Hz: simulator sent "
            f"{e2e['frames_sent_per_s']:.0f} frames/s, {e2e['updates_on_raw_per_s']:.0f} updates/s on raw, "
            f"_updated->raw p50 {e2e['delay_ms_p50']} ms p99 {e2e['delay_ms_p99']} ms, "
            f"{e2e['process_cpu_per_update_us']} us CPU per update (simulator included)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.out} and {png}")
