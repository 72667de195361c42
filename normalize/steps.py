"""Work in steps: a pure function written as a generator that yields between slices of its work
(``Generator[None, None, T]``, its result the return value), so that a caller with an event loop
can let other tasks run in between (``actors.steps.finish_in_steps``) while a plain caller runs it
through (:func:`finish`). Pure: no clock, no I/O, no anyio."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")


def finish(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to its end without pausing; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result
