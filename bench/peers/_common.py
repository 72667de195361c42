"""What every peer shares: a latency histogram, a stats file, the process scaffolding.

Nothing here comes from the engine: a peer is what a user writes instead of the engine, so it
depends on asyncpg, the broker SDKs and the standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

_SUB = 64  # values below 64 us get one bucket each; above, 32 buckets per power of two (~3 %)
_HALF = _SUB // 2


def _bucket(us: int) -> int:
    if us < _SUB:
        return max(us, 0)
    shift = us.bit_length() - 6
    return shift * _HALF + (us >> shift)


def _upper(index: int) -> int:
    if index < _SUB:
        return index
    shift, rest = divmod(index - _SUB, _HALF)
    return ((_HALF + rest + 1) << (shift + 1)) - 1


class Stats:
    """Commit-returned minus send-time latency (a log-linear histogram) and counters."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.counts: dict[int, int] = {}
        self.count = 0
        self.max_us = 0
        self.committed = 0
        self.batches = 0
        self.state = "starting"
        self.error: str | None = None
        self._written = 0.0

    def record(self, sent_ms: Iterable[float], committed_at: float) -> None:
        """Record one commit: ``sent_ms`` are the send times (POSIX ms) of its rows."""
        counts = self.counts
        top = self.max_us
        n = 0
        now_ms = committed_at * 1000.0
        for ms in sent_ms:
            us = int((now_ms - ms) * 1000.0)
            b = _bucket(us)
            counts[b] = counts.get(b, 0) + 1
            if us > top:
                top = us
            n += 1
        self.max_us = top
        self.count += n
        self.committed += n
        self.batches += 1
        self.maybe_write()

    def record_frame(self, sent_ms: list[float], received_at: float) -> None:
        """Record one received frame of a consumer that stores nothing (``bare_recv``): all its
        ticks counted, the latency of its first (the frame's) kept: a floor must not pay a
        histogram update per tick."""
        self.record(sent_ms[:1], received_at)
        self.committed += len(sent_ms) - 1

    def quantile_ms(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return round(min(_upper(index), self.max_us) / 1000.0, 3)
        return round(self.max_us / 1000.0, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "committed": self.committed,
            "batches": self.batches,
            "latency_ms": {
                "count": self.count,
                "p50": self.quantile_ms(0.50),
                "p95": self.quantile_ms(0.95),
                "p99": self.quantile_ms(0.99),
                "max": round(self.max_us / 1000.0, 3),
            },
            "error": self.error,
            "event_loop": "asyncio",  # asyncio.run: the standard library's loop, as its users run it
            "pid": os.getpid(),
            "written_at": time.time(),
        }

    def maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._written < 0.5):
            return
        self._written = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary()))
        tmp.replace(self.path)


def greeks_table(name: str) -> str:
    """DDL of a peer's table of DXLink Greeks events (the SDK peers' ``greeks``, ``bare_ticks``)."""
    return f"""
CREATE TABLE IF NOT EXISTS {name} (
    symbol      text NOT NULL,
    event_time  timestamptz NOT NULL,
    sequence    bigint NOT NULL,
    price       double precision,
    volatility  double precision,
    delta       double precision,
    gamma       double precision,
    theta       double precision,
    rho         double precision,
    vega        double precision
)"""


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m bench.peers {name}")
    p.add_argument("--ready-file", type=Path, required=True, help="the feed's ready file (URLs)")
    p.add_argument("--dsn", required=True, help="PostgreSQL DSN of a fresh database")
    p.add_argument("--stats-file", type=Path, default=None, help="where to write the stats (JSON)")
    return p.parse_args(argv)


def run(
    main: Callable[[dict[str, Any], str, Stats], Coroutine[Any, Any, None]], name: str, argv: list[str] | None
) -> int:
    """Run ``main(ready, dsn, stats)`` until SIGTERM/SIGINT; write the stats file at the end."""
    args = parse_args(name, argv)
    ready = json.loads(args.ready_file.read_text())
    stats = Stats(args.stats_file)

    async def flush() -> None:
        while True:
            await asyncio.sleep(0.25)
            stats.maybe_write(force=True)

    async def runner() -> None:
        task = asyncio.create_task(main(ready, args.dsn, stats))
        ticker = asyncio.create_task(flush())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            stats.state = "stopped"
        except Exception as exc:
            stats.state = "failed"
            stats.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            ticker.cancel()
            stats.maybe_write(force=True)

    asyncio.run(runner())
    return 0 if stats.state != "failed" else 1


def to_float(value: Any) -> float | None:
    """An IBKR field as a float: ``"C1.23"``/``"H1.23"`` prefixes, ``%``, ``,`` and K/M."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).replace(",", "").rstrip("%")
    if text[:1] in ("C", "H"):
        text = text[1:]
    scale = 1.0
    if text[-1:] in ("K", "M"):
        scale = 1e3 if text[-1] == "K" else 1e6
        text = text[:-1]
    try:
        return float(text) * scale
    except ValueError:
        return None
