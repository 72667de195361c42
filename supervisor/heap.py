"""Garbage-collector tuning for a long-running streaming process.

CPython's cyclic collector scans every tracked container of a generation; a full (generation 2)
collection of the engine's heap, mostly import-time objects (the SDKs, pydantic models, asyncpg,
websockets) and start-up state, took 42 to 47 ms, stalling every actor at once: a p99/max
tick-to-commit outlier several times a minute at 50,000 ticks/s. :func:`freeze_startup_heap`,
called once every actor has started, collects once and then moves everything alive into the
permanent generation (``gc.freeze``): later full collections scan only what streaming allocated
(measured 0.5 ms). Nothing is leaked: frozen objects are still freed by reference counting, and
garbage cycles created afterwards are still collected.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
