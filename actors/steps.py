"""Run a pure step generator (:mod:`normalize.steps`) on the event loop, a time budget at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TypeVar

import anyio.lowlevel

from normalize.steps import advance

T = TypeVar("T")

# Positions rows per slice of a step generator: small, so that a slice is well under the budget
# even on a slow, loaded host (about 10 to 40 us a row measured: 500 rows in one slice held the
# loop 15 to 20 ms at each refresh of 500 positions, at 2,000 ticks/s on a shared 2-core host).
MAP_STEP_ROWS = 50

# Work run between two checkpoints: the slices run back to back until this much time has passed,
# then the other tasks run. On a fast host few checkpoints, on a slow or loaded one more; the
# ticks behind the work wait about this long at most.
STEP_BUDGET_S = 0.002


async def finish_in_steps(
    steps: Generator[None, None, T],
    *,
    budget_s: float = STEP_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> T:
    """Run ``steps`` to its end; once its slices have run ``budget_s`` in a row, let the other
    tasks run (a checkpoint) before the next. Its result."""
    start = clock()
    while (done := advance(steps)) is None:
        if clock() - start >= budget_s:
            await anyio.lowlevel.checkpoint()
            start = clock()
    return done.value
