"""Where a contestant's time goes: py-spy samples of its process, grouped by component.

:func:`record` starts ``py-spy record --format raw`` (collapsed stacks, one line per distinct
stack with its sample count) on a running process; :func:`components` attributes every sample
to the innermost frame that belongs to a known component (decode, map, book, channel, writer
encode, database, wire, status, ...), walking from the leaf outwards, so that e.g. time in
``orjson`` called from the IBKR codec counts as decode; a stack with no component is the event
loop's when its leaf is in asyncio/anyio, else ``other (<package>)``. Samples are of the
GIL-holding thread only (``--gil``), idle excluded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: (component, substrings of a frame "function (file:line)"), most specific first
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode (IBKR codec)", ("actors/ibkr/protocol.py",)),
    ("decode (DXLink codec)", ("actors/tastytrade/protocol.py",)),
    ("map (broker -> events)", ("normalize/ibkr.py", "normalize/tastytrade.py", "normalize/symbology.py")),
    ("book (merge, fan-out, rows)", ("normalize/book.py", "normalize/bsm.py", "normalize/model.py")),
    ("conflate/outbox", ("normalize/conflate.py",)),
    ("normalizer actor loop", ("actors/normalizer.py",)),
    ("writer encode (rows -> records)", ("db/batch.py", "db/latency.py", "db/encode.py")),
    ("database (asyncpg, COPY, commit)", ("db/copy.py", "asyncpg/", "actors/writer.py")),
    ("channel (anyio memory streams)", ("anyio/streams/memory.py",)),
    ("wire (websockets / aiohttp)", ("websockets/", "aiohttp/")),
    ("broker actor loop", ("actors/ibkr/", "actors/tastytrade/")),
    ("status file / supervisor", ("supervisor/", "config/logging.py", "structlog/")),
)
EVENT_LOOP = ("asyncio/", "anyio/", "selectors.py", "sniffio/")


def available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [exe, "record", "-p", str(pid), "-d", str(max(int(seconds), 1)), "-r", str(rate)]
    cmd += ["-f", "raw", "--gil", "--full-filenames", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def classify(stack: list[str]) -> str:
    """The innermost component on the stack; else the event loop when the leaf is in it; else
    ``other (<package of the leaf>)``."""
    for frame in reversed(stack):  # leaf first
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    leaf = stack[-1] if stack else ""
    if any(n in leaf for n in EVENT_LOOP):
        return "event loop (asyncio, anyio)"
    return f"other ({_package(leaf)})"


def _package(frame: str) -> str:
    path = frame.rpartition("(")[2].split(":")[0]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in path:
        return "stdlib " + path.rsplit("/", 1)[-1]
    return path.rsplit("/", 2)[-2] if "/" in path else path


def components(path: Path) -> dict[str, float]:
    """Share of samples (percent) per component, from a ``py-spy --format raw`` file."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack_text, _, n = line.rpartition(" ")
        if not stack_text or not n.isdigit():
            continue
        counts[classify(stack_text.split(";"))] += int(n)
    total = sum(counts.values())
    if not total:
        return {}
    return {k: round(100.0 * v / total, 1) for k, v in counts.most_common()} | {"samples": float(total)}


def top_functions(path: Path, n: int = 15) -> list[tuple[str, float]]:
    """The leaf frames holding most samples (self time), percent."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack_text, _, k = line.rpartition(" ")
        if stack_text and k.isdigit():
            counts[stack_text.split(";")[-1]] += int(k)
    total = sum(counts.values()) or 1
    return [(f, round(100.0 * c / total, 1)) for f, c in counts.most_common(n)]
