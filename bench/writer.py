"""Writer benchmark: the writer actor alone vs a per-row INSERT baseline, at offered row rates.

    python -m bench.writer [--rates 1000,10000,100000] [--seconds 5] [--dsn postgresql://...]

A producer offers rows at a fixed rate in ~1 ms ticks (one channel item per tick, as a broker
frame would be) into a bounded channel; ``received_ts`` is stamped when a row is produced, so
latency includes any queueing. The writer under test is the real actor (``actors.writer``); the
baseline commits each row with its own autocommitted ``INSERT``. Both run against the same
PostgreSQL (embedded, fsync on, ``synchronous_commit`` on) into a fresh database per run.
``--repeat N`` interleaves N runs of each mode per rate and reports field-wise medians. Prints a
table, the writer/baseline ratios of the same run, and writes ``bench/out/writer.png`` and
``bench/out/writer.json``. ``--modes writer`` runs the writer alone (for profiling).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import orjson
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.writer import make_writer
from config.settings import DatabaseSettings
from db.batch import HISTORY_COLUMNS, REC_RECEIVED, Batch, days_of, to_records
from db.copy import connect, ensure_partitions
from db.embedded import EmbeddedServer
from db.latency import LatencyTracker
from db.migrate import migrate
from normalize.model import GreeksSnapshot
from supervisor.context import ActorContext
from supervisor.status import StatusRegistry

OUT = Path(__file__).parent / "out"
CHANNEL_CAPACITY = 1024
DRAIN_LIMIT_S = 15.0
Rows = Sequence[GreeksSnapshot]


@dataclass
class Result:
    mode: str
    offered_per_s: int
    produced_per_s: float
    committed_per_s: float
    rows: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    batches: int
    backlog_rows: int  # produced but not committed within the drain limit


def make_row(i: int, now: float) -> GreeksSnapshot:
    k = i % 500
    return GreeksSnapshot(
        broker="ibkr",
        account="U1234567",
        instrument=f"SPY   250117C{400 + k:05d}000",
        underlying="SPY",
        asset_class="OPT",
        right="C",
        strike=400.0 + k,
        expiry=date(2025, 1, 17),
        multiplier=100.0,
        quantity=2.0,
        event_ts=now,
        received_ts=now,
        bid=1.0,
        ask=1.1,
        last=1.05,
        mark=1.05,
        underlying_price=500.0,
        iv=0.2,
        delta=0.5,
        gamma=0.01,
        theta=-0.05,
        vega=0.1,
        rho=0.01,
        pos_delta=100.0,
        pos_gamma=2.0,
        pos_theta=-10.0,
        pos_vega=20.0,
        seq=i,
    )


def make_pool(n: int) -> list[GreeksSnapshot]:
    """Rows built ahead: building a 28-field frozen dataclass costs ~14 us, which would make
    this benchmark measure the producer instead of the writer. The pool is then frozen out of
    the garbage collector: half a million long-lived rows would otherwise make every full
    collection (triggered by the writer's own allocations) scan them, a bench-only pause."""
    pool = [make_row(i, 0.0) for i in range(n)]
    gc.collect()
    gc.freeze()
    return pool


def stamp(row: GreeksSnapshot, now: float) -> GreeksSnapshot:
    # Benchmark-only: set the times of a pre-built frozen row in place (~0.2 us).
    object.__setattr__(row, "event_ts", now)
    object.__setattr__(row, "received_ts", now)
    return row


async def produce(
    tx: MemoryObjectSendStream[Rows], rate: int, seconds: float, pool: list[GreeksSnapshot]
) -> int:
    """Offer ``rate`` rows/s for ``seconds`` in ~1 ms ticks; return rows produced."""
    sent = 0
    start = time.perf_counter()
    async with tx:
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return sent
            due = min(int(rate * elapsed), len(pool)) - sent
            if due > 0:
                now = time.time()
                await tx.send([stamp(row, now) for row in pool[sent : sent + due]])
                sent += due
            await anyio.sleep(0.001)


async def fresh_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    await migrate(dsn)
    return dsn


async def run_writer(dsn: str, rate: int, seconds: float, spool_dir: Path) -> Result:
    pool = make_pool(int(rate * seconds))
    settings = DatabaseSettings(spool_dir=spool_dir, batch_max_rows=5000)
    registry = StatusRegistry(mode="bench", clock=time.time)
    registry.add_actor("writer")
    tx, rx = anyio.create_memory_object_stream[Rows](CHANNEL_CAPACITY)
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    ctx = ActorContext("writer", 1, {"rows": rx}, {}, log, registry)
    run = make_writer(settings, dsn)
    done = anyio.Event()

    async def writer(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with rx:
            await run(ctx, task_status)  # returns once the channel ended and all is committed
        done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(writer)
        t0 = time.perf_counter()
        produced = await produce(tx, rate, seconds, pool)
        t_produced = time.perf_counter() - t0
        with anyio.move_on_after(DRAIN_LIMIT_S):
            await done.wait()
        tg.cancel_scope.cancel()
    t_done = time.perf_counter() - t0
    status = registry.sections["writer"]
    lat = status["latency_ms"]
    return Result(
        "writer (COPY batch)",
        rate,
        produced / t_produced,
        status["rows_total"] / t_done,
        status["rows_total"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        lat["max"],
        status["batches_total"],
        produced - status["rows_total"],
    )


async def run_baseline(dsn: str, rate: int, seconds: float) -> Result:
    """One autocommitted INSERT per row, the way a naive consumer writes ticks."""
    tx, rx = anyio.create_memory_object_stream[Rows](CHANNEL_CAPACITY)
    sql = (
        f"INSERT INTO greeks_history ({', '.join(HISTORY_COLUMNS)}) VALUES "
        f"({', '.join(f'${i + 1}' for i in range(len(HISTORY_COLUMNS)))})"
    )
    pool = make_pool(int(rate * seconds))
    latency = LatencyTracker()
    committed = 0
    conn = await connect(dsn)
    await ensure_partitions(conn, days_of([make_row(0, time.time())]))
    stmt = await conn.prepare(sql)

    done = anyio.Event()

    async def consume(receive: MemoryObjectReceiveStream[Rows]) -> None:
        nonlocal committed
        async with receive:
            async for item in receive:
                for rec in to_records(Batch(uuid.uuid4(), item)):
                    await stmt.fetch(*rec)
                    now = time.time()
                    latency.record_commit([rec[REC_RECEIVED]], now)
                    committed += 1
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, rx)
            t0 = time.perf_counter()
            produced = await produce(tx, rate, seconds, pool)
            t_produced = time.perf_counter() - t0
            with anyio.move_on_after(DRAIN_LIMIT_S):
                await done.wait()
            tg.cancel_scope.cancel()
        t_done = time.perf_counter() - t0
    finally:
        await conn.close()
    s = latency.total.summary_ms()
    return Result(
        "baseline (INSERT per row)",
        rate,
        produced / t_produced,
        committed / t_done,
        committed,
        s["p50"],
        s["p95"],
        s["p99"],
        s["max"],
        committed,
        produced - committed,
    )


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
    for rate in dict.fromkeys(r.offered_per_s for r in results):
        by_mode = {r.mode.split()[0]: r for r in results if r.offered_per_s == rate}
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
    for mode in dict.fromkeys(r.mode for r in results):
        rs = [r for r in results if r.mode == mode]
        xs = [r.offered_per_s for r in rs]
        ax1.plot(xs, [r.committed_per_s for r in rs], marker="o", label=mode)
        ax2.plot(xs, [r.p99_ms for r in rs], marker="o", label=f"{mode} p99")
        ax2.plot(xs, [r.p50_ms for r in rs], marker=".", linestyle="--", label=f"{mode} p50")
    xs = sorted({r.offered_per_s for r in results})
    ax1.plot(xs, xs, color="grey", linestyle=":", label="offered")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rows/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("committed rows/s")
    ax2.set_ylabel("tick-to-commit latency (ms)")
    fig.suptitle("Writer: COPY batches vs INSERT per row (synchronous_commit on)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def main(
    rates: list[int],
    seconds: float,
    dsn: str | None,
    modes: Sequence[str] = ("writer", "baseline"),
    repeat: int = 1,
) -> list[Result]:
    results = []
    spool_root = Path(tempfile.mkdtemp(prefix="greeks-bench-spool-"))
    try:
        async with server(dsn) as admin_dsn:
            for rate in rates:
                runs: list[Result] = []
                for k in range(repeat):  # interleaved, so that machine noise hits both modes
                    if "writer" in modes:
                        db = await fresh_database(admin_dsn, "bench_writer")
                        runs.append(await run_writer(db, rate, seconds, spool_root / f"{rate}-{k}"))
                    if "baseline" in modes:
                        db = await fresh_database(admin_dsn, "bench_writer")
                        runs.append(await run_baseline(db, rate, seconds))
                results.extend(
                    median_result([r for r in runs if r.mode == mode])
                    for mode in dict.fromkeys(r.mode for r in runs)
                )
            conn = await asyncpg.connect(admin_dsn)
            try:
                await conn.execute('DROP DATABASE IF EXISTS "bench_writer" WITH (FORCE)')
            finally:
                await conn.close()
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
    return results


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench writer", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,10000,100000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dsn", default=None, help="admin DSN of an existing server")
    parser.add_argument("--modes", default="writer,baseline", help="writer, baseline or both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate and mode; medians shown")
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    results = anyio.run(main, rates, args.seconds, args.dsn, tuple(args.modes.split(",")), args.repeat)
    if args.repeat > 1:
        print(f"medians of {args.repeat} interleaved runs per row")
    header = (
        f"{'mode':<26} {'offered/s':>10} {'produced/s':>11} {'committed/s':>12} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>9} {'max ms':>9} {'batches':>8} {'backlog':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.mode:<26} {r.offered_per_s:>10,} {r.produced_per_s:>11,.0f} "
            f"{r.committed_per_s:>12,.0f} {r.p50_ms:>8.2f} {r.p95_ms:>8.2f} {r.p99_ms:>9.2f} "
            f"{r.max_ms:>9.2f} {r.batches:>8,} {r.backlog_rows:>8,}"
        )
    for line in ratios(results):
        print(line)
    OUT.mkdir(exist_ok=True)
    (OUT / "writer.json").write_bytes(orjson.dumps([asdict(r) for r in results], option=orjson.OPT_INDENT_2))
    plot(results, OUT / "writer.png")
    print(f"plot: {OUT / 'writer.png'}")


if __name__ == "__main__":
    cli()
