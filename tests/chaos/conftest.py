"""Chaos suite fixtures: a scratch directory, and the engine's database read back after a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import EngineProcess, SimProcess, running


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[SimProcess, SimProcess]]:
    """Both broker simulators, each in its own process (so that one can be killed)."""
    ibkr = SimProcess("ibkr", tmp_path)
    tastytrade = SimProcess("tastytrade", tmp_path)
    with running(ibkr, tastytrade):
        ibkr.start()
        tastytrade.start()
        yield ibkr, tastytrade


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.integration)


__all__ = ["EngineProcess", "SimProcess"]
