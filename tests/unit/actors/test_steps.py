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


@pytest.mark.parametrize(("budget_s", "pauses"), [(0.0, 6), (0.0025, 2), (1.0, 0)])
async def test_the_slices_run_back_to_back_until_the_budget_has_passed(budget_s: float, pauses: int) -> None:
    """A fake clock advancing 1 ms a reading. The driver reads it once at the start, once after
    each slice that is not the last, and once after each pause: 6 unfinished slices and a budget
    of 2.5 ms pause after the third and the sixth reading since the last start (3 - 0 >= 2.5)."""
    readings = [0]

    def clock() -> float:
        readings[0] += 1
        return readings[0] / 1000

    log: list[str] = []
    assert await finish_in_steps(counting(log, 6), budget_s=budget_s, clock=clock) == 60
    assert readings[0] == 1 + 6 + pauses
    assert log == [*(f"slice {i}" for i in range(6)), "last slice"]
