"""Processes for the chaos suite: broker simulators and the engine, each in its own process, and
the checks of the database against what the simulators emitted.

- :class:`SimProcess`: ``python -m simulator ibkr|tastytrade`` with the control plane
  (``simulator/control.py``): ledger with every emission time, fault switches; it can be killed
  and started again on the same ports, its seq numbers continuing (``--seq-offset``).
- :class:`EngineProcess`: ``python run.py`` in live mode against the simulators, logs to a file
  (a pipe nobody reads would block the engine once full), the status file sampled in the
  background so that transitions (``degraded`` then ``ok``) are seen.
- :func:`history`, :func:`sessions`, :func:`check_ledger`: what reached PostgreSQL against what
  the simulators sent.

Another process's state can only be observed by polling (its status file, its control plane):
:func:`wait_until` polls at 50 ms with a deadline and says what it was waiting for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[2]


class _AddressInUse(Exception):
    """A simulator exited because a port it was to bind was taken."""


def _port_of(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port, url
    return port


def wait_until(
    what: str, predicate: Callable[[], Any], timeout: float, *, context: Callable[[], str] = str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{context()}")
        time.sleep(0.05)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TT_", "IBKR_", "SIM_", "DATABASE_URL"))}


def http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # loopback test tool
        return json.loads(response.read())


# -------------------------------------------------------------------------------- simulators


@dataclass
class SimProcess:
    """One broker simulator in its own process, restartable on the same ports."""

    broker: str
    workdir: Path
    rate: float = 5.0
    seed: int = 7
    hb_interval: float = 0.5
    port: int = 0  # 0 until the first start: the simulator binds port 0 and says which it got
    control_port: int = 0
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)  # the last start's simulators_ready line
    ledgers: list[dict[str, Any]] = field(default_factory=list)  # one per generation, last read
    complete: list[bool] = field(default_factory=list)  # read after that generation stopped emitting

    SEQ_STRIDE = 1_000_000  # generation g emits seq g * STRIDE + 1, ...
    BIND_ATTEMPTS = 5

    def start(self) -> None:
        """Start this generation. The first binds ports the kernel picks (a port picked here and
        handed over could be taken in between); a restart binds the same ones, and if one is
        still held (say, as some connection's source port) tries again a few times."""
        for attempt in range(1, self.BIND_ATTEMPTS + 1):
            try:
                self._start_once()
                break
            except _AddressInUse:
                if attempt == self.BIND_ATTEMPTS:
                    raise AssertionError(
                        f"{self.broker} simulator: port still in use after {attempt} tries\n{self.log_tail()}"
                    ) from None
                time.sleep(0.2 * attempt)
        self.ledgers.append({})
        self.complete.append(False)

    def _start_once(self) -> None:
        log = self.log_path.open("wb")
        args = [
            sys.executable,
            "-m",
            "simulator",
            self.broker,
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--rate",
            str(self.rate),
            "--seed",
            str(self.seed),
            "--hb-interval",
            str(self.hb_interval),
            "--seq-offset",
            str(self.generation * self.SEQ_STRIDE),
            "--record-times",
        ]
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**_clean_env(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        # Written once every server of the process listens, the control plane included.
        self.ready = wait_until(f"{self.broker} simulator ready", self._ready_line, 30, context=self.log_tail)
        self.port = _port_of(self.ready["tastytrade_api" if self.broker == "tastytrade" else "ibkr_rest"])
        self.control_port = _port_of(self.ready["control"])

    def _ready_line(self) -> dict[str, Any] | None:
        """The simulator's ``simulators_ready`` log line, once written (it names the bound ports)."""
        self._check_running()
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == "simulators_ready":
                    return doc
        return None

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_tail()
            if "address already in use" in tail:
                raise _AddressInUse(tail)
            raise AssertionError(f"{self.broker} simulator exited:\n{tail}")

    @property
    def log_path(self) -> Path:
        return self.workdir / f"sim-{self.broker}-{self.generation}.log"

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    @property
    def control(self) -> str:
        assert self.control_port, f"{self.broker} simulator not started yet: its ports are not known"
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def base_url(self) -> str:
        assert self.port, f"{self.broker} simulator not started yet: its ports are not known"
        return f"http://127.0.0.1:{self.port}"

    def read_ledger(self, *, final: bool = False) -> dict[str, Any]:
        """The current generation's ledger (kept: a killed process takes its own with it).
        ``final``: nothing is emitted any more (the engine has stopped), so the ledger is whole."""
        ledger: dict[str, Any] = http_json(f"{self.control}/ledger")
        self.ledgers[-1] = ledger
        self.complete[-1] = final
        return ledger

    def inject(self, fault: str, *, duration_s: float | None = None, count: int | None = None) -> None:
        http_json(
            f"{self.control}/faults/{self.broker}", {"fault": fault, "duration_s": duration_s, "count": count}
        )

    def clear(self, fault: str | None = None) -> None:
        http_json(f"{self.control}/faults/{self.broker}/clear", {"fault": fault})

    def kill(self) -> float:
        """SIGKILL; returns when it happened. Read the ledger first: it dies with the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        at = time.time()
        self.proc.wait(timeout=10)
        self.generation += 1
        return at

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -------------------------------------------------------------------------------- the engine


@dataclass
class EngineProcess:
    """``python run.py`` in live mode against simulator processes."""

    workdir: Path
    env: dict[str, str]
    ibkr: SimProcess | None = None
    tastytrade: SimProcess | None = None
    proc: subprocess.Popen[bytes] | None = None
    statuses: list[tuple[float, str]] = field(default_factory=list)  # (time, status) transitions
    runs: int = 0
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def live(
        cls,
        workdir: Path,
        ibkr: SimProcess | None,
        tastytrade: SimProcess | None,
        **extra: str,
    ) -> EngineProcess:
        env = {
            **_clean_env(),
            "VAR_DIR": str(workdir / "var"),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
            "STATUS_INTERVAL_S": "0.2",
            "RESTART_BACKOFF_INITIAL_S": "0.2",
            "RESTART_BACKOFF_MAX_S": "1",
            "RESTART_MAX": "1000",
            "SHUTDOWN_TIMEOUT_S": "10",
            "BROKERS": ",".join(b for b, s in (("ibkr", ibkr), ("tastytrade", tastytrade)) if s is not None),
        }
        if ibkr is not None:
            env |= {"IBKR_HB_TIMEOUT_S": "3", "IBKR_TIC_INTERVAL_S": "5"}
        if tastytrade is not None:
            env |= {
                "TT_CLIENT_SECRET": "chaos-secret",
                "TT_REFRESH_TOKEN": "chaos-refresh",
                "TT_KEEPALIVE_S": "1",
                "TT_STALE_S": "3",
                "TT_HANDSHAKE_TIMEOUT_S": "5",
            }
        return cls(workdir, env | extra, ibkr=ibkr, tastytrade=tastytrade)

    def broker_urls(self) -> dict[str, str]:
        """Where the simulators are: known once they have started (they pick their ports)."""
        urls = {}
        if self.ibkr is not None:
            urls["IBKR_GATEWAY_URL"] = self.ibkr.base_url
        if self.tastytrade is not None:
            urls["TT_API_URL"] = self.tastytrade.base_url
        return urls

    @property
    def status_file(self) -> Path:
        return Path(self.env["VAR_DIR"]) / "status.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"engine-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "run.py"],
            cwd=ROOT,
            env=self.broker_urls() | self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        last = None
        while not self._stop_sampling.wait(0.05):
            doc = self.status()
            if doc is not None and doc.get("pid") == (self.proc.pid if self.proc else None):
                status = doc.get("status")
                if status != last:
                    self.statuses.append((time.time(), str(status)))
                    last = status

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return doc

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.workdir.glob("engine-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def context(self) -> str:
        return f"status: {json.dumps(self.status(), indent=1)[-3000:]}\nlog tail:\n{self.log_tail()}"

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"engine exited with {self.proc and self.proc.returncode}\n{self.context()}")
        return True

    def wait_status(self, what: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = 30) -> Any:
        def check() -> Any:
            self.alive()
            doc = self.status()
            return doc is not None and doc.get("pid") == self.proc.pid and predicate(doc)  # type: ignore[union-attr]

        wait_until(what, check, timeout, context=self.context)
        return self.status()

    def wait_streaming(self, brokers: tuple[str, ...], timeout: float = 45) -> dict[str, Any]:
        def streaming(doc: dict[str, Any]) -> bool:
            actors = doc.get("actors", {})
            return (
                doc["status"] == "ok"
                and all(
                    actors.get(b, {}).get("connection") == "connected"
                    and actors[b].get("subscriptions", 0) > 0
                    for b in brokers
                )
                and doc.get("writer", {}).get("rows_total", 0) > 0
            )

        result: dict[str, Any] = self.wait_status(f"{brokers} streaming and status ok", streaming, timeout)
        return result

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._stop_sampling.set()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._stop_sampling.set()

    def close(self) -> None:
        self._stop_sampling.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(*things: SimProcess | EngineProcess) -> Iterator[None]:
    """Stop every process at the end, whatever the test did."""
    try:
        yield
    finally:
        for thing in reversed(things):
            if isinstance(thing, EngineProcess):
                thing.close()
            else:
                thing.stop()


# -------------------------------------------------------------------------------- the database


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def history(dsn: str) -> list[asyncpg.Record]:
    """Every history row: broker, account, instrument, seq, received time (POSIX s)."""
    return await fetch(
        dsn,
        "SELECT broker, account, instrument, seq, extract(epoch FROM received_ts)::float8 AS received,"
        " delta, iv, bid, ask FROM greeks_history_wide",
    )


async def sessions(dsn: str) -> list[asyncpg.Record]:
    return await fetch(
        dsn,
        "SELECT broker, extract(epoch FROM started_at)::float8 AS started,"
        " extract(epoch FROM ended_at)::float8 AS ended, end_reason, events FROM stream_sessions",
    )


@dataclass
class LedgerCheck:
    expected: int  # updates the simulators emitted that must be in history
    missing: list[tuple[str, str, int]]  # (broker, key, seq) emitted, outside every excused window, absent
    duplicates: list[tuple[str, str, str, int]]  # (broker, account, key, seq) stored more than once
    unexpected: list[tuple[str, str, int]]  # stored seqs the simulators never emitted


def check_ledger(
    rows: list[asyncpg.Record],
    sims: list[SimProcess],
    *,
    excused: list[tuple[float, float]] = (),  # type: ignore[assignment]
    held: set[tuple[str, str]] | None = None,
) -> LedgerCheck:
    """Every update a simulator emitted, outside the ``excused`` time windows (a fault's in-flight
    frames), is in history exactly once per position; nothing is stored that was never emitted.

    ``held``: (broker, key) pairs with positions (an underlying nobody holds makes no rows)."""
    stored: dict[tuple[str, str], set[int]] = {}
    counts: dict[tuple[str, str, str, int], int] = {}
    for r in rows:
        if r["seq"] is None:
            continue
        stored.setdefault((r["broker"], r["instrument"]), set()).add(r["seq"])
        k = (r["broker"], r["account"], r["instrument"], r["seq"])
        counts[k] = counts.get(k, 0) + 1
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    emitted: dict[tuple[str, str], set[int]] = {}
    partial: dict[str, list[int]] = {}  # broker -> offsets of generations read before they ended
    missing: list[tuple[str, str, int]] = []
    expected = 0
    for sim in sims:
        for generation, (ledger, complete) in enumerate(zip(sim.ledgers, sim.complete, strict=True)):
            offset = generation * SimProcess.SEQ_STRIDE
            if not complete:
                partial.setdefault(sim.broker, []).append(offset)
            for key, times in ledger.get("emissions", {}).get(sim.broker, {}).items():
                pair = (sim.broker, key)
                emitted.setdefault(pair, set()).update(range(offset + 1, offset + 1 + len(times)))
                if held is not None and pair not in held:
                    continue
                have = stored.get(pair, set())
                for i, t in enumerate(times):
                    if any(lo <= t <= hi for lo, hi in excused):
                        continue
                    expected += 1
                    if offset + 1 + i not in have:
                        missing.append((sim.broker, key, offset + 1 + i))

    def never_emitted(broker: str, key: str, seq: int) -> bool:
        if seq in emitted.get((broker, key), set()):
            return False
        # A generation killed after its ledger was read emitted a little more than it says.
        return not any(o < seq <= o + SimProcess.SEQ_STRIDE for o in partial.get(broker, []))

    unexpected = sorted((b, k, s) for (b, k), seqs in stored.items() for s in seqs if never_emitted(b, k, s))
    return LedgerCheck(expected, missing, duplicates, unexpected)


def max_gap(times: list[float], lo: float, hi: float) -> float:
    """The longest stretch without a timestamp inside [lo, hi]."""
    inside = sorted(t for t in times if lo <= t <= hi)
    points = [lo, *inside, hi]
    return max(b - a for a, b in zip(points, points[1:], strict=False))
