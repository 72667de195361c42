"""Run a pure step generator (:mod:`normalize.steps`) on the event loop, one slice at a time."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import anyio.lowlevel

from normalize.steps import advance

T = TypeVar("T")

# Positions rows mapped between two checkpoints (about 5 ms of work): 5,000 positions mapped in
# one go held every other task up for about 50 ms at each refresh.
MAP_STEP_ROWS = 500


async def finish_in_steps(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to its end, letting the other tasks run between its slices (a checkpoint
    after each); its result."""
    while (done := advance(steps)) is None:
        await anyio.lowlevel.checkpoint()
    return done.value
