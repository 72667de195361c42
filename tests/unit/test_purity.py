"""Pure modules import no I/O, no event loop and no clock (an AST check, as asyncpg does)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "anyio",
    "trio",
    "asyncio",
    "websockets",
    "asyncpg",
    "aiohttp",
    "socket",
    "time",
    "httpx",
    "structlog",
}
PURE = [
    *sorted((ROOT / "normalize").glob("*.py")),
    ROOT / "actors" / "ibkr" / "protocol.py",
    ROOT / "actors" / "tastytrade" / "protocol.py",
    ROOT / "supervisor" / "spec.py",
    ROOT / "supervisor" / "policy.py",
    ROOT / "supervisor" / "errors.py",
    ROOT / "config" / "settings.py",
    *(ROOT / "db" / name for name in ("batch.py", "encode.py", "latency.py", "spool.py")),
    *(ROOT / "simulator" / name for name in ("dxlink_protocol.py", "market.py", "faults.py", "schedule.py")),
    ROOT / "bench" / "feed" / "templates.py",
]


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", PURE, ids=[str(p.relative_to(ROOT)) for p in PURE])
def test_pure_module_has_no_io_or_clock_imports(path: Path) -> None:
    assert imported_roots(path) & FORBIDDEN == set()


def test_the_check_sees_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom anyio import sleep\nimport os\nif TYPE_CHECKING:\n    import asyncpg\n")
    assert imported_roots(bad) & FORBIDDEN == {"time", "anyio"}


# The C fast paths (optional extensions) are pure too: the C library's math and memory headers and
# Python's, nothing that reads a clock, a file or a socket.
C_SOURCES = sorted(ROOT.glob("*/_speedups.c"))
C_HEADERS = {"Python.h", "structmember.h", "math.h", "stdint.h", "string.h"}  # structmember.h: slots


def c_includes(path: Path) -> set[str]:
    return {
        line.split()[1].strip('<>"')
        for line in path.read_text().splitlines()
        if line.startswith("#include") and len(line.split()) > 1
    }


def test_c_fast_paths_exist() -> None:
    assert [p.relative_to(ROOT).as_posix() for p in C_SOURCES] == ["db/_speedups.c", "normalize/_speedups.c"]


@pytest.mark.parametrize("path", C_SOURCES, ids=[str(p.relative_to(ROOT)) for p in C_SOURCES])
def test_c_fast_path_includes_no_io_or_clock_header(path: Path) -> None:
    assert c_includes(path) <= C_HEADERS
    assert "<time.h>" not in path.read_text()
