"""DXLink decode benchmark: the engine's codec vs the tastytrade SDK's ``Greeks.from_stream``.

    python -m bench decode [--events 500] [--repeat 7] [--seconds 0.3] [--out FILE.json]

One COMPACT Greeks payload (``--events`` events in the SDK's own 13-field order, values from the
simulated market, so both sides read exactly the same data) is decoded into typed events again and
again:

- ``core``: the values list already parsed from JSON (what ``Greeks.from_stream`` takes) ->
  the engine's :func:`actors.tastytrade.protocol.decode_compact` (named tuples) vs the SDK's
  ``Greeks.from_stream`` (pydantic models). This is the headline ratio.
- ``frame``: the whole text frame -> events: ``DxLinkProtocol.receive_text`` (orjson, message
  dispatch, decode) vs ``json.loads`` + ``Greeks.from_stream`` (what the SDK's streamer does).
- ``actor_path`` (engine only, for the record): the frame with the fields the actor really asks
  for, decoded and mapped to ``InstrumentUpdate``s (:func:`normalize.tastytrade.map_feed`), i.e.
  the actor's whole per-frame work before its one channel send.

The runs of the two sides are interleaved ``--repeat`` times and the medians compared, so the
ratio comes from the same minutes of a shared, noisy machine. Prints a table; writes
``{"engine_events_per_s", "sdk_events_per_s", "ratio", ...}`` to ``--out`` (default
``bench/out/decode.json``) and a bar chart to ``bench/out/decode.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from actors.tastytrade.protocol import (
    EVENT_FIELDS,
    REQUESTED_FIELDS,
    DxLinkProtocol,
    FeedData,
    _Layout,
    decode_compact,
)
from normalize.events import InstrumentUpdate
from normalize.tastytrade import map_feed
from simulator.market import Market, MarketConfig
from simulator.tastytrade import dx_index

OUT = Path(__file__).parent / "out"
SDK_GREEKS_FIELDS = [
    "eventSymbol", "eventTime", "eventFlags", "index", "time", "sequence", "price", "volatility",
    "delta", "gamma", "theta", "rho", "vega",
]  # fmt: skip


def payload(events: int) -> list[Any]:
    """A COMPACT Greeks value list: ``events`` Greeks of the simulated market's options."""
    market = Market(MarketConfig(seed=1, positions=events + 10), start_ts=1_750_000_000.0)
    held = [p.contract for p in market.positions("tastytrade") if p.contract.asset_class == "OPT"]
    options = [held[i % len(held)] for i in range(events)]
    values: list[Any] = []
    for i, contract in enumerate(options):
        tick = market.tick("tastytrade", contract.key, 1_750_000_000.0 + i * 0.001)
        ms = int(tick.ts * 1000)
        values += [
            contract.streamer_symbol, 0, 0, dx_index(ms, tick.seq), ms, tick.seq, tick.mark, tick.iv,
            tick.delta, tick.gamma, tick.theta, tick.rho, tick.vega,
        ]  # fmt: skip
    return values


def _rate(fn: Callable[[], int], seconds: float) -> float:
    """Events per second of ``fn`` (returns events decoded per call) over about ``seconds``."""
    gc.collect()
    calls = 0
    events = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        events += fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline and calls >= 3:
            return events / (now - start)


def measure(events: int, repeat: int, seconds: float) -> dict[str, Any]:
    from tastytrade.dxfeed import Greeks as SdkGreeks

    logging.getLogger("tastytrade").setLevel(logging.WARNING)  # from_stream logs skipped events
    values = payload(events)
    layout = _Layout("Greeks", SDK_GREEKS_FIELDS)
    if not layout.identity or tuple(SDK_GREEKS_FIELDS) != EVENT_FIELDS["Greeks"]:
        raise RuntimeError("the engine's Greeks tuple no longer has the SDK's field order")
    text = orjson.dumps({"type": "FEED_DATA", "channel": 1, "data": ["Greeks", values]}).decode()

    proto = DxLinkProtocol(token="bench", subscriptions=[], now=0.0)
    proto.receive_text(
        json.dumps({"type": "FEED_CONFIG", "channel": 1, "dataFormat": "COMPACT",
                    "eventFields": {"Greeks": SDK_GREEKS_FIELDS}}),
        0.0,
    )  # fmt: skip
    proto.events_received()

    def engine_core() -> int:
        decoded, _ = decode_compact(layout, values)
        return len(decoded)

    def sdk_core() -> int:
        return len(SdkGreeks.from_stream(values))

    def engine_frame() -> int:
        proto.receive_text(text, 0.0)
        (data,) = proto.events_received()
        return len(data.events) if isinstance(data, FeedData) else 0

    def sdk_frame() -> int:
        message = json.loads(text)
        return len(SdkGreeks.from_stream(message["data"][1]))

    # the actor's own request: fewer fields, decoded then mapped
    wanted = [SDK_GREEKS_FIELDS.index(f) for f in REQUESTED_FIELDS["Greeks"]]
    lean = [values[b + i] for b in range(0, len(values), 13) for i in wanted]
    lean_text = orjson.dumps({"type": "FEED_DATA", "channel": 1, "data": ["Greeks", lean]}).decode()
    actor_proto = DxLinkProtocol(token="bench", subscriptions=[], now=0.0)
    keys = {values[b]: f"KEY{b}" for b in range(0, len(values), 13)}

    def engine_actor_path() -> int:
        actor_proto.receive_text(lean_text, 0.0)
        updates: list[InstrumentUpdate] = []
        for data in actor_proto.events_received():
            if isinstance(data, FeedData):
                map_feed(data, keys, 1.0, updates.append)
        return len(updates)

    # same results: every event decoded on both sides, equal values
    ours, _ = decode_compact(layout, values)
    theirs = SdkGreeks.from_stream(values)
    same = len(ours) == len(theirs) == events and all(
        (a.event_symbol, a.sequence, a.index_, a.delta, a.volatility)
        == (b.event_symbol, b.sequence, b.index, float(b.delta), float(b.volatility))
        for a, b in zip(ours, theirs, strict=True)
    )
    if not same:
        raise RuntimeError("the engine and the SDK decode the payload differently")

    if engine_actor_path() != events:
        raise RuntimeError("the actor path lost events")
    names = ("engine_core", "sdk_core", "engine_frame", "sdk_frame", "engine_actor_path")
    runs: dict[str, list[float]] = {k: [] for k in names}
    fns = {
        "engine_core": engine_core,
        "sdk_core": sdk_core,
        "engine_frame": engine_frame,
        "sdk_frame": sdk_frame,
        "engine_actor_path": engine_actor_path,
    }
    for _ in range(repeat):  # interleaved: both sides see the same machine load
        for name, fn in fns.items():
            runs[name].append(_rate(fn, seconds))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "engine_events_per_s": med["engine_core"],
        "sdk_events_per_s": med["sdk_core"],
        "ratio": med["engine_core"] / med["sdk_core"],
        "frame": {
            "engine_events_per_s": med["engine_frame"],
            "sdk_events_per_s": med["sdk_frame"],
            "ratio": med["engine_frame"] / med["sdk_frame"],
        },
        "actor_path_events_per_s": med["engine_actor_path"],
        "events_per_message": events,
        "payload_bytes": len(text.encode()),
        "repeat": repeat,
        "runs_events_per_s": runs,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["values -> events", "text frame -> events"]
    engine = [result["engine_events_per_s"], result["frame"]["engine_events_per_s"]]
    sdk = [result["sdk_events_per_s"], result["frame"]["sdk_events_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [v / 1e6 for v in engine], 0.4, label="engine codec")
    ax.bar([x + 0.2 for x in xs], [v / 1e6 for v in sdk], 0.4, label="tastytrade SDK Greeks.from_stream")
    for x, e, s in zip(xs, engine, sdk, strict=True):
        ax.annotate(f"{e / s:.0f}x", (x - 0.2, e / 1e6), ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("million events/s (median)")
    ax.set_title(f"COMPACT Greeks decode, {result['events_per_message']} events per message")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500, help="Greeks events in the payload")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved runs per side; medians")
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one run")
    parser.add_argument("--out", type=Path, default=OUT / "decode.json")
    args = parser.parse_args(argv)
    result = measure(args.events, args.repeat, args.seconds)
    print(f"{'payload':<24} {'engine events/s':>16} {'SDK events/s':>14} {'ratio':>7}")
    for label, row in (("values -> events", result), ("text frame -> events", result["frame"])):
        print(
            f"{label:<24} {row['engine_events_per_s']:>16,.0f} {row['sdk_events_per_s']:>14,.0f} "
            f"{row['ratio']:>6.1f}x"
        )
    print(f"{'actor: frame -> updates':<24} {result['actor_path_events_per_s']:>16,.0f} {'-':>14} {'-':>7}")
    print(
        f"{result['events_per_message']} events per message ({result['payload_bytes']:,} bytes), "
        f"medians of {args.repeat} interleaved runs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    OUT.mkdir(exist_ok=True)
    plot(result, OUT / "decode.png")
    print(f"json: {args.out}\nplot: {OUT / 'decode.png'}")


if __name__ == "__main__":
    cli()
