"""The end-to-end benchmark harness: feed process, contestant process, database, measurements.

One *run* is one contestant (the engine, or a peer of :mod:`bench.peers`) against a fresh feed
process at one rate for a number of seconds, into a fresh database of one PostgreSQL server that
every run shares (embedded, started here with fsync and ``synchronous_commit`` on, the engine's
configuration; or ``--dsn``)::

    feed (python -m bench.feed)  <--wire-->  contestant (python run.py | python -m bench.peers X)
                                                  |
                                                  +--> PostgreSQL (database bench_<n>)

1. Start the feed; start the contestant pointed at it; wait until the feed sees every position of
   the brokers the contestant consumes subscribed (the REST start-up and handshakes are done).
2. Sample CPU time (``/proc/<pid>/stat`` utime+stime) of the contestant, the feed and the
   PostgreSQL server; ``POST /start``; run ``seconds``; ``POST /stop`` (the ledger is frozen).
3. Wait for the contestant to drain (its commit counter unchanged for a second, at most
   ``DRAIN_LIMIT_S``), sample CPU again and the contestant's ``VmHWM``, read its numbers (the
   engine: its status file; a peer: its stats file), stop it with SIGTERM.
4. ``ticks_offered`` = the feed's ledger (sum of last seqs of held contracts); ``ticks_committed``
   = distinct (contract, seq) rows in the contestant's table; ``lost`` = the difference.

Latency (``latency_ms``) is measured the same way for every contestant, server side: each row's
commit timestamp (``track_commit_timestamp``) minus its send time, over the ticks the feed sent
after ``/start``, i.e. at the rate asked; the last-value snapshot a contestant receives when it
subscribes (every contract at once, before the run) is left out. It is taken before the WAL flush
and the client's wake-up (a little low), while the feed stamps send times in whole milliseconds,
truncated (up to 1 ms high). The contestant's own histogram of commit-returned minus send time,
over its whole run (the snapshot included), is kept in ``own_latency_ms``: for the engine
``writer.event_latency_ms`` of its status file (older engines only publish ``writer.latency_ms``,
receive time -> commit, with the wire part from the rows beside it). Without
``track_commit_timestamp`` (an external ``--dsn`` server) the own figure is the headline, and
``latency_source`` says which it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import _profile
from bench.peers import PEERS, peer, peer_table

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
DRAIN_LIMIT_S = 20.0
SUSTAINED_P99_MS = 500.0  # above this the queue is growing, whatever the counters say
READY_LIMIT_S = 120.0
ENGINE = "engine"
#: the engine on one protocol only (BROKERS=tastytrade / ibkr), at the mix its single-broker peers get
ENGINE_ONE = {"engine_dxlink": ("dxlink", ("tastytrade",)), "engine_ibkr": ("ibkr", ("ibkr",))}
CONTESTANTS = (ENGINE, *ENGINE_ONE, *PEERS)
RESULT_KEYS = (
    "ticks_offered",
    "ticks_committed",
    "lost",
    "ticks_per_s",
    "latency_ms",
    "cpu_s",
    "cpu_us_per_tick",
    "peak_rss_mb",
    "conflated",
)


@dataclass
class Run:
    """One contestant at one rate: the keys issue 12 names, plus how they were obtained."""

    name: str
    rate: float
    seconds: float
    ticks_offered: int = 0
    ticks_committed: int = 0
    lost: int = 0
    ticks_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    cpu_us_per_tick: float = 0.0
    peak_rss_mb: float = 0.0
    conflated: int = 0
    # how it was measured
    feed_cpu_s: float = 0.0
    db_cpu_s: float = 0.0
    busy_s: float = 0.0  # from the start of the stream to the last commit: the CPU figures' window
    cores: dict[str, float] = field(default_factory=dict)  # see :meth:`cores_used`
    offered_per_s: float = 0.0
    behind: int = 0
    drain_s: float = 0.0
    drained: bool = True
    latency_source: str = ""
    wire_ms: dict[str, float] | None = None
    db_commit_latency_ms: dict[str, float] | None = None
    own_latency_ms: dict[str, float] | None = None  # the contestant's own figure, whole run
    event_loop: str | None = None  # the contestant's asyncio loop: "uvloop" or "asyncio"
    speedups: bool | None = None  # the engine's C fast paths in use (its runtime.speedups)
    profile: dict[str, object] | None = None
    error: str | None = None

    def keys(self) -> dict[str, Any]:
        """Exactly the keys of ``engine`` / ``peers.<name>`` in the JSON (issue 12)."""
        return {k: getattr(self, k) for k in RESULT_KEYS}

    def detail(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in RESULT_KEYS}

    def cores_used(self) -> dict[str, float]:
        """How many cores each process kept busy while the contestant streamed: its CPU seconds
        (``cpu_s``, ``feed_cpu_s``, ``db_cpu_s``) over ``busy_s``; empty before a run."""
        if self.busy_s <= 0:
            return {}
        return {
            "contestant": round(self.cpu_s / self.busy_s, 2),
            "feed": round(self.feed_cpu_s / self.busy_s, 2),
            "database": round(self.db_cpu_s / self.busy_s, 2),
        }

    def sustained(self, target: float) -> bool:
        """Kept up: the feed offered what was asked (the contestant held nothing back through
        TCP backpressure), commits kept pace while it streamed (no growing backlog), nothing was
        lost, everything was committed within the drain limit, and p99 stayed under 500 ms."""
        return (
            self.error is None
            and self.lost == 0
            and self.drained
            and self.offered_per_s >= 0.97 * target
            and self.ticks_per_s >= 0.93 * self.offered_per_s
            and self.latency_ms.get("p99", float("inf")) <= SUSTAINED_P99_MS
        )


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime+stime of ``pid`` (plus its reaped children's with ``children``), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def _status_kb(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of the resident set (``VmHWM``), MB."""
    return round(_status_kb(pid, "VmHWM:") / 1024.0, 1)


def current_rss_mb(pid: int) -> float:
    return round(_status_kb(pid, "VmRSS:") / 1024.0, 1)


def server_cpu_seconds(postmaster: int | None) -> float:
    """CPU of a PostgreSQL server: the postmaster (with the backends it reaped) and its live children."""
    if postmaster is None:
        return 0.0
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# --------------------------------------------------------------------------- helpers


def _http(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(
    check: Callable[[], bool], within_s: float, what: str, proc: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within_s:g} s")
        time.sleep(0.1)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Bench:
    """Owns the PostgreSQL server and a scratch directory for a series of runs."""

    def __init__(
        self, dsn: str | None = None, positions: int = 500, keep: bool = False, rss_limit_mb: float = 3000.0
    ) -> None:
        self.admin_dsn = dsn
        self.rss_limit_mb = rss_limit_mb
        self.positions = positions
        self.keep = keep
        self.scratch = Path(tempfile.mkdtemp(prefix="greeks-bench-e2e-"))
        self.scratch.chmod(0o755)
        self.server: Any = None
        self.runs = 0
        self._previous_sigterm: Any = signal.SIG_DFL

    def __enter__(self) -> Bench:
        # SIGTERM as SystemExit: the context managers stop the feed, the contestant and the server
        self._previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if self.admin_dsn is None:
            from db.embedded import EmbeddedServer  # the harness may use the engine's tooling

            self.server = EmbeddedServer(self.scratch / "pg")  # fsync on: the engine's configuration
            self.server.start()
            self.admin_dsn = self.server.dsn()
            # every row's commit time, server side (pg_xact_commit_timestamp): one latency method
            # for every contestant, beside their own (it is taken before the WAL flush)
            asyncio.run(_execute(self.admin_dsn, "ALTER SYSTEM SET track_commit_timestamp = on"))
            self.server.stop()  # started again on the port it bound
            self.server.start()
            self.admin_dsn = self.server.dsn()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self.server.stop()
            if not self.keep:
                shutil.rmtree(self.scratch, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    @property
    def postmaster(self) -> int | None:
        if self.server is None:
            return None
        try:
            return int((self.server.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _fresh_db(self, name: str) -> str:
        assert self.admin_dsn is not None
        admin = self.admin_dsn

        async def create() -> None:
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return admin.rsplit("/", 1)[0] + f"/{name}"

    def _drop_db(self, name: str) -> None:
        assert self.admin_dsn is not None
        admin = self.admin_dsn

        async def drop() -> None:
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        with contextlib.suppress(Exception):
            asyncio.run(drop())

    @contextlib.contextmanager
    def feed(
        self, rate: float, mix: str, workdir: Path, **options: Any
    ) -> Iterator[tuple[dict[str, Any], int]]:
        ready_file = workdir / "feed-ready.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.feed",
            "--rate",
            str(rate),
            "--mix",
            mix,
            "--positions",
            str(self.positions),
            "--ready-file",
            str(ready_file),
        ]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        with (workdir / "feed.log").open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(ready_file.exists, 60.0, "feed start", proc)
            ready = json.loads(ready_file.read_text())
            yield ready, proc.pid
        finally:
            _stop(proc)

    def run(
        self, name: str, rate: float, seconds: float, *, profile: bool = False, **feed_options: Any
    ) -> Run:
        """One contestant at ``rate`` for ``seconds`` (see the module docstring)."""
        if name not in CONTESTANTS:
            raise ValueError(f"unknown contestant {name!r}; one of {', '.join(CONTESTANTS)}")
        self.runs += 1
        db_name = f"bench_{self.runs}"
        workdir = self.scratch / f"run-{self.runs}-{name}"
        workdir.mkdir()
        dsn = self._fresh_db(db_name)
        result = Run(name, rate, seconds)
        mix, brokers = _mix(name)
        try:
            with self.feed(rate, mix, workdir, **feed_options) as (ready, feed_pid):
                self._run(result, ready, feed_pid, brokers, dsn, workdir, profile)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not self.keep:
                self._drop_db(db_name)
        return result

    def _run(
        self,
        result: Run,
        ready: dict[str, Any],
        feed_pid: int,
        brokers: tuple[str, ...],
        dsn: str,
        workdir: Path,
        profile: bool = False,
    ) -> None:
        control = ready["control"]
        engine = is_engine(result.name)
        stats_file = workdir / ("status.json" if engine else "stats.json")
        if engine:
            cmd = [sys.executable, "run.py"]
            env = _engine_env(ready, dsn, workdir, brokers)
        else:
            cmd = [
                sys.executable,
                "-m",
                "bench.peers",
                result.name,
                "--ready-file",
                str(workdir / "feed-ready.json"),
            ]
            cmd += ["--dsn", dsn, "--stats-file", str(stats_file)]
            env = dict(os.environ)
        with (workdir / "contestant.log").open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:

            def subscribed() -> bool:
                if not engine and (_read_json(stats_file) or {}).get("state") != "streaming":
                    return False
                held = _http(f"{control}/feed")["subscribed_held"]
                return all(held[b] >= _expected(result.name, ready, b) for b in brokers)

            _wait(subscribed, READY_LIMIT_S, f"{result.name} subscribing", proc)
            time.sleep(2.0)  # the last-value frames are committed, and the status file says so
            c0, f0, d0 = cpu_seconds(proc.pid), cpu_seconds(feed_pid), server_cpu_seconds(self.postmaster)
            p_start = _sample(stats_file, engine)[0]
            t0 = time.time()
            at_start = _http(f"{control}/start", "POST")["offered"]  # the last-value ticks so far
            pre = sum(at_start[b] for b in brokers)
            spy = _profile.record(proc.pid, result.seconds, workdir / "profile.txt") if profile else None
            deadline = time.time() + result.seconds
            while time.time() < deadline:
                time.sleep(min(0.5, max(deadline - time.time(), 0.0)))
                if current_rss_mb(proc.pid) > self.rss_limit_mb:  # a shared machine: no swapping
                    _stop(proc, timeout=5.0)
                    raise RuntimeError(f"stopped at the {self.rss_limit_mb:g} MB RSS limit (queue growing)")
            described = _http(f"{control}/stop", "POST")
            t_stop = time.time()
            p_stop, w_stop = _sample(stats_file, engine)  # the counter and when it was written
            quiet_s = 2.5 if engine else 1.0  # the engine's status file is rewritten every second
            pm = self.postmaster
            samples = [(t_stop, cpu_seconds(proc.pid), cpu_seconds(feed_pid), server_cpu_seconds(pm))]
            last, changed_at = _sample(stats_file, engine)[0], t_stop
            while time.time() - changed_at < quiet_s:
                if time.time() - t_stop > DRAIN_LIMIT_S:
                    result.drained = False
                    break
                time.sleep(0.1)
                samples.append(
                    (time.time(), cpu_seconds(proc.pid), cpu_seconds(feed_pid), server_cpu_seconds(pm))
                )
                count, written = _sample(stats_file, engine)
                if count != last:
                    last, changed_at = count, min(written or time.time(), time.time())
            t_drained = max(changed_at, t_stop) if result.drained else time.time()
            # CPU up to the last commit (the quiet wait that proves it was the last is idle time)
            _t, c1, f1, d1 = next((x for x in samples if x[0] >= t_drained), samples[-1])
            result.peak_rss_mb = peak_rss_mb(proc.pid)
            result.cpu_s = round(c1 - c0, 2)
            result.feed_cpu_s = round(f1 - f0, 2)
            result.db_cpu_s = round(d1 - d0, 2)
            result.drain_s = round(t_drained - t_stop, 2)
            result.busy_s = round(t_drained - t0, 2)
            result.cores = result.cores_used()
            described = _http(f"{control}/feed")  # final: frames in flight at /stop are counted too
            offered = described["offered"]
            result.ticks_offered = sum(offered[b] for b in brokers)
            result.behind = sum(described["behind"][b] for b in brokers)
            streamed = described["stopped_at"] - described["started_at"]
            result.offered_per_s = round((result.ticks_offered - pre) / max(streamed, 1e-9), 1)
            if spy is not None:
                spy.wait(30)
                result.profile = {
                    "components_pct": _profile.components(workdir / "profile.txt"),
                    "top_functions_pct": _profile.top_functions(workdir / "profile.txt"),
                    "raw": str(workdir / "profile.txt"),
                }
            _stop(proc)
            doc = _read_json(stats_file) or {}
            if engine:
                _engine_numbers(result, doc)
            else:
                latency = doc.get("latency_ms", {})
                result.latency_ms = {k: latency.get(k, 0.0) for k in ("p50", "p95", "p99", "max")}
                result.latency_source = "peer: commit returned - feed send time (ms)"
                if peer_table(result.name) is None:
                    result.latency_source = "floor: received - feed send time (ms); nothing is stored"
                result.event_loop = doc.get("event_loop")
                if doc.get("error"):
                    result.error = doc["error"]
            stores = engine or peer_table(result.name) is not None
            # what it stores, counted in the database; a floor that stores nothing: its count
            result.ticks_committed = _count(dsn, result.name) if stores else int(doc.get("committed") or 0)
            if engine and result.latency_source.startswith("writer.latency_ms"):
                result.wire_ms = _wire_ms(dsn)
            result.db_commit_latency_ms = _db_commit_latency(dsn, result.name, since=t0)
            if result.db_commit_latency_ms is not None:
                # The headline: the same method for everyone, over the ticks the feed sent at the
                # rate (after /start), not the last-value snapshot each contestant gets when it
                # subscribes (a burst of every contract at once, before the run starts).
                result.own_latency_ms = result.latency_ms
                result.latency_ms = dict(result.db_commit_latency_ms)
                result.latency_source = (
                    "server: commit timestamp - feed send time, ticks sent after /start; own figure "
                    f"({result.latency_source}, whole run) in own_latency_ms"
                )
            result.lost = result.ticks_offered - result.ticks_committed
            # Throughput while the feed streamed: the contestant's commit counter over the window
            # (rows for the engine, ticks for a peer), in ticks (distinct over counted rows).
            p_final = _sample(stats_file, engine)[0]
            per_row = result.ticks_committed / p_final if p_final else 1.0
            window = min(w_stop or t_stop, t_stop) - t0
            if window < 0.5 * result.seconds:  # no fresh sample: fall back to the whole stream
                window = streamed
            result.ticks_per_s = round((p_stop - p_start) * per_row / max(window, 1e-9), 1)
            result.cpu_us_per_tick = round(1e6 * result.cpu_s / max(result.ticks_committed, 1), 2)
        finally:
            _stop(proc)


def is_engine(name: str) -> bool:
    return name == ENGINE or name in ENGINE_ONE


def _mix(name: str) -> tuple[str, tuple[str, ...]]:
    """The feed's mix for ``name`` and the brokers it consumes."""
    if name == ENGINE:
        return "both", ("ibkr", "tastytrade")
    if name in ENGINE_ONE:
        return ENGINE_ONE[name]
    _main, _sql, brokers = peer(name)
    if name == "poll":
        return "poll", brokers
    if len(brokers) == 2:
        return "both", brokers
    return ("dxlink" if brokers == ("tastytrade",) else "ibkr"), brokers


def _expected(name: str, ready: dict[str, Any], broker: str) -> int:
    """Held contracts the contestant subscribes: the engine, and whatever takes the engine's mix
    (``bare_recv``), all; the streaming peers the options."""
    if name == "poll":
        return 0  # polling subscribes nothing
    every = is_engine(name) or _mix(name)[0] == "both"
    return int(ready["positions"][broker] if every else ready["options"][broker])


def _engine_env(ready: dict[str, Any], dsn: str, workdir: Path, brokers: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IBKR_", "TT_", "SIM"))}
    env.update(
        {
            "VAR_DIR": str(workdir / "var"),
            "STATUS_FILE": str(workdir / "status.json"),
            "DATABASE_URL": dsn,
            "LOG_LEVEL": "WARNING",
            "BROKERS": ",".join(brokers),
            "IBKR_GATEWAY_URL": ready["ibkr_base"],
            # every held contract and its underlyings: above the engine's default (the market
            # data lines of an ordinary account), so that --positions above 1,000 streams them all
            "IBKR_MAX_SUBSCRIPTIONS": str(max(1000, 2 * int(ready["positions"]["ibkr"]))),
            "TT_API_URL": ready["tastytrade_api"],
            "TT_CLIENT_SECRET": ready["tt_client_secret"],
            "TT_REFRESH_TOKEN": ready["tt_refresh_token"],
        }
    )
    return env


def _sample(path: Path, engine: bool) -> tuple[int, float | None]:
    """(commit counter, POSIX time it was written) from a status or stats file."""
    doc = _read_json(path) or {}
    if engine:
        from datetime import datetime

        count = doc.get("writer", {}).get("rows_total") or 0
        try:
            written = datetime.fromisoformat(str(doc["updated_at"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            written = None
        return int(count), written
    return int(doc.get("committed") or 0), doc.get("written_at")


def _engine_numbers(result: Run, doc: dict[str, Any]) -> None:
    writer = doc.get("writer", {})
    latency = writer.get("event_latency_ms")
    if latency:
        result.latency_source = "writer.event_latency_ms: commit - broker event time (the feed's send time)"
    else:
        latency = writer.get("latency_ms", {})
        result.latency_source = "writer.latency_ms: commit - receive time (wire and decoding excluded)"
    result.latency_ms = {k: latency.get(k, 0.0) for k in ("p50", "p95", "p99", "max")}
    normalizer = doc.get("actors", {}).get("normalizer", {})
    result.conflated = int(normalizer.get("conflated_total", 0) or 0)
    result.event_loop = doc.get("runtime", {}).get("event_loop")
    result.speedups = doc.get("runtime", {}).get("speedups")
    errors = [f"{n}: {a.get('last_error')}" for n, a in doc.get("actors", {}).items() if a.get("restarts")]
    if errors:
        result.error = "; ".join(errors)


async def _history_table(conn: Any) -> str:
    wide = await conn.fetchval("SELECT to_regclass('greeks_history_wide')")
    return "greeks_history_wide" if wide else "greeks_history"


def _count(dsn: str, name: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            if is_engine(name):
                table = await _history_table(conn)
                distinct = f"SELECT DISTINCT broker, instrument, seq FROM {table} WHERE seq >= 1"
                sql = f"SELECT count(*) FROM ({distinct}) t"
            else:
                peer_sql = peer(name)[1]
                if peer_sql is None:
                    raise ValueError(f"{name} stores nothing: its stats file counts")
                sql = peer_sql
            return int(await conn.fetchval(sql))
        except asyncpg.UndefinedTableError:
            return 0
        finally:
            await conn.close()

    return asyncio.run(count())


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _db_commit_latency(dsn: str, name: str, since: float | None = None) -> dict[str, float] | None:
    """Commit time (``pg_xact_commit_timestamp`` of each row's ``xmin``) minus event time, ms, over
    the contestant's rows sent at or after ``since`` (POSIX seconds; None: all): the same method
    for everyone; it stops before the WAL flush and the client's wake-up, so it reads a little
    lower than a client-side measurement, while the feed's send times, truncated to the
    millisecond, over-state it by up to 1 ms."""

    async def measure() -> dict[str, float] | None:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SHOW track_commit_timestamp") != "on":
                return None
            if is_engine(name):
                table, ts, seq = "greeks_history", "event_ts", "seq"
            else:
                rows = peer_table(name)
                if rows is None:  # stores nothing
                    return None
                table, ts, seq = rows
            row = await conn.fetchrow(
                "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY d), max(d) FROM"
                f" (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - {ts}) * 1000 AS d"
                f" FROM {table} WHERE {seq} >= 1 AND {ts} >= to_timestamp($1::float8)) t",
                # the feed stamps whole milliseconds: a tick sent just after ``since`` may carry
                # the millisecond before it
                0.0 if since is None else since - 0.001,
            )
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()
        if row is None or row[0] is None:
            return None
        p = row[0]
        return {
            "p50": round(p[0], 3),
            "p95": round(p[1], 3),
            "p99": round(p[2], 3),
            "max": round(float(row[1]), 3),
        }

    return asyncio.run(measure())


def _wire_ms(dsn: str) -> dict[str, float]:
    """Receive minus event time of the engine's rows (the part ``writer.latency_ms`` leaves out)."""

    async def wire() -> dict[str, float]:
        conn = await asyncpg.connect(dsn)
        try:
            table = await _history_table(conn)
            row = await conn.fetchrow(
                "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY d), max(d) FROM"
                " (SELECT extract(epoch FROM received_ts - event_ts) * 1000 AS d"
                f" FROM {table} WHERE seq >= 1) t"
            )
        finally:
            await conn.close()
        if row is None or row[0] is None:
            return {}
        p = row[0]
        return {
            "p50": round(p[0], 3),
            "p95": round(p[1], 3),
            "p99": round(p[2], 3),
            "max": round(float(row[1]), 3),
        }

    return asyncio.run(wire())


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, load when the command started."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "note": "feed, contestant and PostgreSQL are separate processes sharing these cores (no pinning)",
    }


def median_run(runs: list[Run]) -> Run:
    """Field-wise medians of repeated runs of one contestant at one rate (errors kept)."""
    import statistics

    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if r.error is None] or runs
    first = ok[0]
    merged = Run(first.name, first.rate, first.seconds)
    for key, value in asdict(first).items():
        if isinstance(value, bool) or key in ("name", "rate", "seconds"):
            setattr(merged, key, all(getattr(r, key) for r in ok) if isinstance(value, bool) else value)
        elif isinstance(value, int | float):
            med = statistics.median(getattr(r, key) for r in ok)
            setattr(merged, key, round(med) if isinstance(value, int) else round(med, 3))
        elif isinstance(value, dict) and all(isinstance(getattr(r, key), dict) for r in ok):
            keys = set.intersection(*(set(getattr(r, key)) for r in ok))
            setattr(
                merged, key, {k: round(statistics.median(getattr(r, key)[k] for r in ok), 3) for k in keys}
            )
        else:
            setattr(merged, key, value)
    errors = [r.error for r in runs if r.error]
    merged.error = "; ".join(errors) if errors else None
    return merged
