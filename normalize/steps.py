"""Work in steps: a pure function written as a generator that yields between slices of its work
(``Generator[None, None, T]``, its result the return value), so that a caller with an event loop
can let other tasks run in between (``actors.steps.finish_in_steps``) while a plain caller runs it
through (:func:`finish`). Pure: no clock, no I/O, no anyio."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """The result of a step generator that has finished."""

    value: T


def advance(steps: Generator[None, None, T]) -> Done[T] | None:
    """Run the next slice of ``steps``: None while there is more, else its result."""
    try:
        next(steps)
    except StopIteration as stop:
        return Done(stop.value)
    return None


def finish(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to its end without pausing; its result."""
    while (done := advance(steps)) is None:
        pass
    return done.value
