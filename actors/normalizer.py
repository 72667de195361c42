"""The normalizer actor: a thin loop from the raw channel to the rows channel.

Each item on ``raw`` is a batch (everything decoded from one frame, or one feed flush). The actor
takes everything already queued, hands it to a pure ``normalize`` function, and forwards one rows
batch: one channel send per batch, never per tick. When ``raw`` ends (all producers stopped at
shutdown) it forwards what it has and returns, which closes its ``rows`` clone so the writer can
drain in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from normalize.model import GreeksSnapshot
from supervisor.context import ActorContext
from supervisor.spec import RunFn

NormalizeFn = Callable[[Sequence[Any]], list[GreeksSnapshot]]


def passthrough(items: Sequence[Any]) -> list[GreeksSnapshot]:
    """Batches that are already canonical rows (the demo feeds) are flattened unchanged."""
    rows: list[GreeksSnapshot] = []
    for batch in items:
        rows.extend(batch)
    return rows


def make_normalizer(normalize: NormalizeFn = passthrough, *, max_batches: int = 256) -> RunFn:
    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        raw = ctx.receivers["raw"]
        rows_out = ctx.senders["rows"]
        task_status.started()
        with rows_out:
            async for first in raw:
                items = [first]
                while len(items) < max_batches:
                    try:
                        items.append(raw.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                rows = normalize(items)
                if rows:
                    await rows_out.send(rows)
                ctx.record_events(len(rows))

    return run
