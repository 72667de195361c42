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
