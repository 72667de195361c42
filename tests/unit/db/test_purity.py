"""Pure db modules import no I/O framework, driver or clock (checked on the source's AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = {"anyio", "asyncpg", "websockets", "time", "asyncio", "trio"}
PURE = ["db/batch.py", "db/latency.py"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports(module: str) -> None:
    assert not imported_roots(ROOT / module) & FORBIDDEN


def test_spool_framing_needs_no_async_or_clock() -> None:
    assert not imported_roots(ROOT / "db/spool.py") & FORBIDDEN
