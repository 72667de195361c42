"""Writer benchmark: the writer actor alone vs a per-row INSERT baseline, at offered row rates.

    python -m bench writer [--rates 1000,10000,100000,200000,400000] [--seconds 5] [--repeat 3]
                           [--out FILE.json] [--dsn postgresql://...]

A producer offers rows at a fixed rate in ~1 ms ticks (one channel item per tick, as a broker
frame would be) into a bounded channel; ``received_ts`` is stamped when a row is produced, so
latency includes any queueing, and a full channel pushes back on the producer (the offered rate is
then not reached: the committed rate is the capacity). The writer under test is the real actor
(``actors.writer``); the baseline commits each row with its own autocommitted ``INSERT`` into the
same narrow history table. Both run against the same PostgreSQL (embedded, fsync on,
``synchronous_commit`` on) into a fresh database per run. ``--repeat N`` interleaves N runs of each
mode per rate and reports field-wise medians. Then 1,000,000 rows go through the writer into a
fresh database and ``bytes_per_row`` is ``pg_total_relation_size`` summed over the history
partitions (heap, indexes, TOAST, free-space and visibility maps) divided by the row count.

Prints a table, the writer/baseline ratios of the same run, and writes the JSON (``--out``,
default ``bench/out/writer.json``: ``{"results": [{"mode", "offered", "committed_per_s",
"latency_ms": {"p50", "p95", "p99", "max"}, "lost", ...}], "bytes_per_row"}``) and
``bench/out/writer.png``. ``lost`` is rows produced but not committed when the run ends (the
writer's run ends once it has committed everything; the baseline is stopped ``DRAIN_LIMIT_S``
after the producer). ``--modes writer`` runs the writer alone (for profiling).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import asyncpg
import orjson
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.writer import make_writer
from config.settings import DatabaseSettings
from db.batch import days_of
from db.copy import connect, ensure_partitions, resolve_positions
from db.embedded import EmbeddedServer
from db.encode import HISTORY_COLUMNS, SOURCE_CHARS, Dimensions, row_position_key
from db.latency import LatencyTracker
from db.migrate import migrate
from normalize.model import GreeksSnapshot
from supervisor.context import ActorContext
from supervisor.status import StatusRegistry

OUT = Path(__file__).parent / "out"
CHANNEL_CAPACITY = 1024
DRAIN_LIMIT_S = 60.0  # the writer: time to commit what is queued after the producer stops
BASELINE_DRAIN_LIMIT_S = 5.0  # the baseline falls behind without bound past ~2k rows/s
N_POSITIONS = 500
MAX_ITEM_ROWS = 1000
SIZE_ROWS = 1_000_000
Rows = Sequence[GreeksSnapshot]


@dataclass
class Result:
    mode: str  # "writer" or "baseline"
    offered: int
    produced_per_s: float
    committed_per_s: float
    rows: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    batches: int
    lost: int  # produced but not committed when the run ended

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "offered": self.offered,
            "produced_per_s": round(self.produced_per_s, 1),
            "committed_per_s": round(self.committed_per_s, 1),
            "latency_ms": {"p50": self.p50_ms, "p95": self.p95_ms, "p99": self.p99_ms, "max": self.max_ms},
            "lost": self.lost,
            "rows": self.rows,
            "batches": self.batches,
        }


def make_row(i: int) -> GreeksSnapshot:
    """A row shaped like what the brokers send: 500 positions over two brokers and four accounts,
    prices in cents, Greeks with 4 to 6 significant digits, some values absent (IBKR sends no
    rho; not every option has traded today), a few model Greeks."""
    k = i % N_POSITIONS
    ibkr = k % 2 == 0
    strike = 400 + (k // 4) * 5
    right = "C" if k % 4 < 2 else "P"
    cents = 100 + (i * 7919) % 2000
    return GreeksSnapshot(
        broker="ibkr" if ibkr else "tastytrade",
        account=("U1234567", "U7654321")[k % 3 % 2] if ibkr else ("5WT00001", "5WT00002")[k % 3 % 2],
        instrument=f"SPY   250117{right}{strike:05d}000",
        underlying="SPY",
        asset_class="OPT",
        right=right,
        strike=float(strike),
        expiry=date(2025, 1, 17),
        multiplier=100.0,
        quantity=float(k % 7 - 3 or 1),
        event_ts=0.0,
        received_ts=0.0,
        bid=cents / 100,
        ask=(cents + 5) / 100,
        last=None if i % 3 == 0 else (cents + 2) / 100,
        mark=(cents + 2.5) / 100,
        underlying_price=500 + (i % 1000) / 100,
        iv=round(0.15 + (i % 997) * 1e-4, 4),
        delta=round(0.05 + (i % 900) / 1000, 3) * (1 if right == "C" else -1),
        gamma=round(0.001 + (i % 89) * 1e-4, 5),
        theta=round(-0.01 - (i % 97) * 1e-3, 4),
        vega=round(0.05 + (i % 83) * 1e-3, 4),
        rho=None if ibkr else round(0.01 + (i % 71) * 1e-4, 5),
        pos_delta=None,
        pos_gamma=None,
        pos_theta=None,
        pos_vega=None,
        seq=i,
        greeks_source="model" if i % 50 == 0 else "broker",
    )


class RowFactory:
    """Rows made from templates (a NamedTuple with 29 fields costs ~1 us through its
    constructor): a row is its template's head, its two times and its tail concatenated into a
    new tuple (~0.3 us)."""

    def __init__(self, n_templates: int = 10_000) -> None:
        templates = [make_row(i) for i in range(n_templates)]
        self.parts = [(tuple(t[:10]), tuple(t[12:])) for t in templates]

    def rows(self, start: int, n: int, now: float) -> list[GreeksSnapshot]:
        new = tuple.__new__
        times = (now, now)
        m = len(self.parts)
        parts = self.parts
        return [
            new(GreeksSnapshot, h + times + t) for h, t in (parts[j % m] for j in range(start, start + n))
        ]

    def schedule(self, rate: int, seconds: float) -> tuple[list[GreeksSnapshot], float]:
        """Every row of a run built ahead, ``event_ts = received_ts`` = the millisecond tick it is
        due in (``rate / 1000`` rows a tick from ``t0``), and ``t0``: the producer then costs
        next to nothing per row, and latency counts from when a row was due, lag of the producer
        included. The rows are
        frozen out of the garbage collector (millions of long-lived tuples would otherwise make
        every full collection scan them, a benchmark-only pause)."""
        n = int(rate * seconds)
        per_ms = max(1, rate // 1000)
        new = tuple.__new__
        m = len(self.parts)
        parts = self.parts

        def build(t0: float, count: int) -> list[GreeksSnapshot]:
            rows = []
            ts = t0
            for j in range(count):
                if j % per_ms == 0:  # one time per millisecond tick, as a broker frame's rows share one
                    ts = t0 + (j // per_ms) / 1000
                h, tail = parts[j % m]
                rows.append(new(GreeksSnapshot, (*h, ts, ts, *tail)))
            return rows

        t = time.perf_counter()
        build(0.0, min(n, 20_000))
        build_s = (time.perf_counter() - t) * n / max(min(n, 20_000), 1)
        t0 = time.time() + 2.0 * build_s + 1.0
        rows = build(t0, n)
        gc.collect()
        gc.freeze()
        return rows, t0


@dataclass
class Produced:
    rows: int
    started: float  # time.perf_counter() when the first row was due
    seconds: float  # from then until the last row was sent


async def produce(
    tx: MemoryObjectSendStream[Rows], rate: int, seconds: float, factory: RowFactory
) -> Produced:
    """Offer ``rate`` rows/s for ``seconds`` in ~1 ms ticks, at most ``MAX_ITEM_ROWS`` rows an
    item (a normalizer flush)."""
    pool, t0 = await anyio.to_thread.run_sync(factory.schedule, rate, seconds)
    await anyio.sleep(max(0.0, t0 - time.time()))
    started = time.perf_counter()
    sent = 0
    n = len(pool)
    per_ms = max(1, rate // 1000)
    try:
        async with tx:
            while sent < n:
                due = min(n, (int((time.time() - t0) * 1000) + 1) * per_ms)
                while sent < due:
                    end = min(due, sent + MAX_ITEM_ROWS)
                    await tx.send(pool[sent:end])
                    sent = end
                await anyio.sleep(0.001)
        return Produced(sent, started, time.perf_counter() - started)
    finally:
        del pool
        gc.unfreeze()


async def fresh_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_dsn)
    dsn = urlunsplit(parts._replace(path=f"/{name}"))
    await migrate(dsn)
    return dsn


def _quiet_log() -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


async def run_writer(
    dsn: str,
    rate: int,
    seconds: float,
    spool_dir: Path,
    factory: RowFactory,
    batch_max_rows: int | None = None,
    **writer_kwargs: Any,
) -> Result:
    settings = DatabaseSettings(spool_dir=spool_dir)  # the engine's defaults (BATCH_MAX_ROWS ...)
    if batch_max_rows is not None:
        settings = replace(settings, batch_max_rows=batch_max_rows)
    registry = StatusRegistry(mode="bench", clock=time.time)
    registry.add_actor("writer")
    tx, rx = anyio.create_memory_object_stream[Rows](CHANNEL_CAPACITY)
    ctx = ActorContext("writer", 1, {"rows": rx}, {}, _quiet_log(), registry)
    run = make_writer(settings, dsn, **writer_kwargs)
    done = anyio.Event()

    async def writer(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with rx:
            await run(ctx, task_status)  # returns once the channel ended and all is committed
        done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(writer)
        produced = await produce(tx, rate, seconds, factory)
        with anyio.move_on_after(DRAIN_LIMIT_S):
            await done.wait()
        t_done = time.perf_counter() - produced.started
        tg.cancel_scope.cancel()
    status = registry.sections["writer"]
    lat = status["latency_ms"]
    return Result(
        "writer",
        rate,
        produced.rows / produced.seconds,
        status["rows_total"] / t_done,
        status["rows_total"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        lat["max"],
        status["batches_total"],
        produced.rows - status["rows_total"],
    )


async def run_baseline(dsn: str, rate: int, seconds: float, factory: RowFactory) -> Result:
    """One autocommitted INSERT per row into the narrow history, the way a naive consumer writes
    ticks (position ids resolved beforehand; no latest state, no batch ledger)."""
    tx, rx = anyio.create_memory_object_stream[Rows](CHANNEL_CAPACITY)
    sql = (
        f"INSERT INTO greeks_history ({', '.join(HISTORY_COLUMNS)}) VALUES "
        f"({', '.join(f'${i + 1}' for i in range(len(HISTORY_COLUMNS)))})"
    )
    latency = LatencyTracker()
    committed = 0
    conn = await connect(dsn)
    await ensure_partitions(conn, days_of([make_row(0)._replace(event_ts=time.time())]))
    templates = factory.rows(0, N_POSITIONS, 0.0)
    ids = await resolve_positions(conn, Dimensions().missing(map(row_position_key, templates)))
    stmt = await conn.prepare(sql)
    done = anyio.Event()

    async def consume(receive: MemoryObjectReceiveStream[Rows]) -> None:
        nonlocal committed
        async with receive:
            async for item in receive:
                for r in item:
                    await stmt.fetch(
                        r.event_ts, r.received_ts, r.quantity, r.bid, r.ask, r.last, r.mark,
                        r.underlying_price, r.seq, ids[row_position_key(r)], r.iv, r.delta, r.gamma,
                        r.theta, r.vega, r.rho, SOURCE_CHARS.get(r.greeks_source),
                    )  # fmt: skip
                    latency.record_commit([r.received_ts], time.time())
                    committed += 1
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, rx)
            produced = await produce(tx, rate, seconds, factory)
            with anyio.move_on_after(BASELINE_DRAIN_LIMIT_S):
                await done.wait()
            t_done = time.perf_counter() - produced.started
            tg.cancel_scope.cancel()
    finally:
        await conn.close()
    s = latency.total.summary_ms()
    return Result(
        "baseline",
        rate,
        produced.rows / produced.seconds,
        committed / t_done,
        committed,
        s["p50"],
        s["p95"],
        s["p99"],
        s["max"],
        committed,
        produced.rows - committed,
    )


async def measure_size(
    dsn: str, spool_dir: Path, factory: RowFactory, n_rows: int = SIZE_ROWS
) -> dict[str, Any]:
    """``n_rows`` through the writer (as fast as it takes them), then bytes on disk per row."""
    settings = DatabaseSettings(spool_dir=spool_dir)
    registry = StatusRegistry(mode="bench", clock=time.time)
    registry.add_actor("writer")
    tx, rx = anyio.create_memory_object_stream[Rows](CHANNEL_CAPACITY)
    ctx = ActorContext("writer", 1, {"rows": rx}, {}, _quiet_log(), registry)
    run = make_writer(settings, dsn)

    async def writer(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with rx:
            await run(ctx, task_status)

    async with anyio.create_task_group() as tg:
        await tg.start(writer)
        async with tx:
            base = time.time()
            for start in range(0, n_rows, 1000):
                # Event times 2 ms apart: a realistic day's spread over one partition.
                await tx.send(factory.rows(start, min(1000, n_rows - start), base + start * 0.002))
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM greeks_history")
        history = await conn.fetchval(
            """SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
               WHERE p.relname = 'greeks_history'"""
        )
        heap = await conn.fetchval(
            """SELECT sum(pg_relation_size(c.oid)) FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
               WHERE p.relname = 'greeks_history'"""
        )
        others = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(ARRAY['instruments', "
            "'position_keys', 'greeks_latest', 'ingest_batches']) t"
        )
    finally:
        await conn.close()
    history, heap, others = int(history), int(heap), int(others)
    return {
        "rows": rows,
        "bytes_per_row": round(history / rows, 1),
        "heap_bytes_per_row": round(heap / rows, 1),
        "index_and_maps_bytes_per_row": round((history - heap) / rows, 1),
        "dimension_latest_ledger_bytes": others,
    }


def _make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="greeks-bench-pg-"))
    root.chmod(0o755)  # the server user (when running as root) must traverse it
    return root


@contextlib.asynccontextmanager
async def server(dsn: str | None) -> AsyncIterator[str]:
    if dsn:
        yield dsn
        return
    root = await anyio.to_thread.run_sync(_make_root)
    pg = EmbeddedServer(root / "data")  # fsync on: the engine's configuration
    await anyio.to_thread.run_sync(pg.start)
    try:
        yield pg.dsn()
    finally:
        await anyio.to_thread.run_sync(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


def median_result(runs: list[Result]) -> Result:
    """Field-wise median of repeated runs of one mode at one rate."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    values = {
        name: statistics.median(getattr(r, name) for r in runs)
        for name, value in asdict(first).items()
        if isinstance(value, int | float)
    }
    merged = replace(first, **values)
    for name, value in asdict(first).items():
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(merged, name, round(getattr(merged, name)))
    return merged


def ratios(results: list[Result]) -> list[str]:
    """Writer vs baseline at each rate: throughput and latency ratios (same run)."""
    lines = []
    for rate in dict.fromkeys(r.offered for r in results):
        by_mode = {r.mode: r for r in results if r.offered == rate}
        w, b = by_mode.get("writer"), by_mode.get("baseline")
        if w is None or b is None:
            continue

        def ratio(x: float, y: float) -> str:
            return f"{x / y:.3g}x" if y else "n/a"

        lines.append(
            f"{rate:>10,}/s  committed writer/baseline {ratio(w.committed_per_s, b.committed_per_s):>8}"
            f"  p50 {ratio(w.p50_ms, b.p50_ms):>8}  p99 {ratio(w.p99_ms, b.p99_ms):>8}"
            "  (latency ratio < 1: writer faster)"
        )
    return lines


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"writer": "writer (statement / COPY batches)", "baseline": "baseline (INSERT per row)"}
    for mode in dict.fromkeys(r.mode for r in results):
        rs = [r for r in results if r.mode == mode]
        xs = [r.offered for r in rs]
        ax1.plot(xs, [r.committed_per_s for r in rs], marker="o", label=labels.get(mode, mode))
        ax2.plot(xs, [r.p99_ms for r in rs], marker="o", label=f"{mode} p99")
        ax2.plot(xs, [r.p50_ms for r in rs], marker=".", linestyle="--", label=f"{mode} p50")
    xs = sorted({r.offered for r in results})
    ax1.plot(xs, xs, color="grey", linestyle=":", label="offered")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rows/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("committed rows/s")
    ax2.set_ylabel("tick-to-commit latency (ms)")
    fig.suptitle("Writer vs INSERT per row (synchronous_commit on, fsync on)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def main(
    rates: list[int],
    seconds: float,
    dsn: str | None,
    modes: Sequence[str] = ("writer", "baseline"),
    repeat: int = 1,
    size_rows: int = SIZE_ROWS,
) -> tuple[list[Result], dict[str, Any] | None]:
    results = []
    size = None
    factory = RowFactory()
    spool_root = Path(tempfile.mkdtemp(prefix="greeks-bench-spool-"))
    try:
        async with server(dsn) as admin_dsn:
            for rate in rates:
                runs: list[Result] = []
                for k in range(repeat):  # interleaved, so that machine noise hits both modes
                    if "writer" in modes:
                        db = await fresh_database(admin_dsn, "bench_writer")
                        runs.append(await run_writer(db, rate, seconds, spool_root / f"{rate}-{k}", factory))
                    if "serial" in modes:  # the writer without pipelining, to measure what it brings
                        db = await fresh_database(admin_dsn, "bench_writer")
                        spool = spool_root / f"{rate}-{k}-serial"
                        result = await run_writer(db, rate, seconds, spool, factory, pipeline=False)
                        runs.append(replace(result, mode="serial"))
                    if "baseline" in modes:
                        db = await fresh_database(admin_dsn, "bench_writer")
                        runs.append(await run_baseline(db, rate, seconds, factory))
                results.extend(
                    median_result([r for r in runs if r.mode == mode])
                    for mode in dict.fromkeys(r.mode for r in runs)
                )
            if size_rows:
                db = await fresh_database(admin_dsn, "bench_writer")
                size = await measure_size(db, spool_root / "size", factory, size_rows)
            conn = await asyncpg.connect(admin_dsn)
            try:
                server_version = await conn.fetchval("SHOW server_version")
                await conn.execute('DROP DATABASE IF EXISTS "bench_writer" WITH (FORCE)')
            finally:
                await conn.close()
            if size is not None:
                size["server_version"] = server_version
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
    return results, size


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench writer", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,10000,100000,200000,400000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dsn", default=None, help="admin DSN of an existing server")
    parser.add_argument(
        "--modes", default="writer,baseline", help="writer, baseline, serial (the writer without pipelining)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate and mode; medians shown")
    parser.add_argument("--size-rows", type=int, default=SIZE_ROWS, help="rows for bytes_per_row (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/out/writer.json)")
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    results, size = anyio.run(
        main, rates, args.seconds, args.dsn, tuple(args.modes.split(",")), args.repeat, args.size_rows
    )
    if args.repeat > 1:
        print(f"medians of {args.repeat} interleaved runs per row")
    header = (
        f"{'mode':<10} {'offered/s':>10} {'produced/s':>11} {'committed/s':>12} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>9} {'max ms':>9} {'batches':>8} {'lost':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.mode:<10} {r.offered:>10,} {r.produced_per_s:>11,.0f} "
            f"{r.committed_per_s:>12,.0f} {r.p50_ms:>8.2f} {r.p95_ms:>8.2f} {r.p99_ms:>9.2f} "
            f"{r.max_ms:>9.2f} {r.batches:>8,} {r.lost:>8,}"
        )
    for line in ratios(results):
        print(line)
    if size is not None:
        print(
            f"history on disk after {size['rows']:,} rows: {size['bytes_per_row']} bytes/row "
            f"(heap {size['heap_bytes_per_row']}, indexes and maps {size['index_and_maps_bytes_per_row']}), "
            f"PostgreSQL {size['server_version']}"
        )
    where = machine()
    print(f"machine: {where}")
    OUT.mkdir(exist_ok=True)
    out = args.out or OUT / "writer.json"
    doc = {
        "results": [r.as_json() for r in results],
        "bytes_per_row": None if size is None else size["bytes_per_row"],
        "size": size,
        "repeat": args.repeat,
        "seconds": args.seconds,
        "machine": where,
    }
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(results, OUT / "writer.png")
    print(f"json: {out}  plot: {OUT / 'writer.png'}")


if __name__ == "__main__":
    cli()
