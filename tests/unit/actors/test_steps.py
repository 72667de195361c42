"""actors.steps.finish_in_steps on asyncio and trio: another task runs between the slices of a
pure step generator once they have run their time budget, and the generator's result comes back."""

from __future__ import annotations

from collections.abc import Generator

import anyio
import pytest

from actors.steps import finish_in_steps
from normalize.steps import finish

pytestmark = pytest.mark.anyio


def counting(log: list[str], slices: int) -> Generator[None, None, int]:
    for i in range(slices):
        log.append(f"slice {i}")
        yield
    log.append("last slice")
    return slices * 10


async def test_other_tasks_run_between_the_slices_and_the_result_comes_back() -> None:
    log: list[str] = []

    async def other() -> None:
        for i in range(3):
            log.append(f"other {i}")
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()  # the other task starts first
        result = await finish_in_steps(counting(log, 3), budget_s=0.0)  # a pause after each slice

    assert result == 30
    slices = [e for e in log if not e.startswith("other")]
    assert slices == ["slice 0", "slice 1", "slice 2", "last slice"]
    first, last = log.index("slice 0"), log.index("last slice")
    assert any(e.startswith("other") for e in log[first:last])  # interleaved, not run through


def test_finish_runs_the_slices_through() -> None:
    log: list[str] = []
    assert finish(counting(log, 2)) == 20
    assert log == ["slice 0", "slice 1", "last slice"]


async def test_the_slices_run_back_to_back_until_the_budget_has_passed() -> None:
    """A fake clock advancing 1 ms a reading: with a 2.5 ms budget, the other task runs after
    every third reading, not after every slice."""
    log: list[str] = []
    now = [0.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    async def other() -> None:
        while True:
            log.append("other")
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()
        log.clear()
        result = await finish_in_steps(counting(log, 6), budget_s=0.0025, clock=clock)
        tg.cancel_scope.cancel()

    assert result == 60
    # readings: 1 at the start, then one after each unfinished slice: 2, 3, 4 (4 - 1 >= 2.5:
    # pause, restart at 5), 6, 7, 8 (pause)
    collapsed = [e for i, e in enumerate(log) if e != "other" or log[i - 1] != "other"]
    assert collapsed == [
        *("slice 0", "slice 1", "slice 2", "other"),
        *("slice 3", "slice 4", "slice 5", "other"),
        "last slice",
    ]
