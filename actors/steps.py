"""Run a pure step generator (:mod:`normalize.steps`) on the event loop, one slice at a time."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import anyio.lowlevel

T = TypeVar("T")

# Positions rows mapped between two checkpoints (about 5 ms of work): 5,000 positions mapped in
# one go held every other task up for about 50 ms at each refresh.
MAP_STEP_ROWS = 500


async def finish_in_steps(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to its end, letting the other tasks run between its slices (a checkpoint
    at every yield); its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result
        await anyio.lowlevel.checkpoint()
