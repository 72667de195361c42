"""The normalizer's outbox and its overload policy (conflation).

Rules: pure. No I/O, no clock, no anyio. The normalizer actor adds what the book produced and
takes one :class:`~normalize.events.RowsBatch` per channel send.

Normally every row is kept and sent in order. While the ``rows`` channel is full (the actor says
so with ``blocked=True``), rows still pile up in order, all kept, up to ``keep_rows`` pending rows
(a short backlog: a slow commit, a burst); past that, rows added to the outbox are conflated: per
position (broker, account, instrument) only the newest pending row is kept, the older unsent ones
are dropped and counted in :attr:`Outbox.conflated_total`. So a slow database bounds the
normalizer's memory by ``keep_rows`` plus the number of positions, never by the tick rate, and
brokers are never blocked. Rows already handed to the
channel are never touched: every row that was sent reaches the writer. Positions snapshots and
session events are never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from normalize.events import PositionsSnapshot, RowsBatch, SessionEvent
from normalize.model import GreeksSnapshot


class Outbox:
    """Pending output of the normalizer (see the module docstring)."""

    __slots__ = (
        "_conflated",
        "_positions",
        "_rows",
        "_sessions",
        "conflated_total",
        "episode_conflated",
        "keep_rows",
    )

    def __init__(self, keep_rows: int = 0) -> None:
        self.keep_rows = keep_rows  # pending rows kept in order while blocked, before conflating
        self._rows: list[GreeksSnapshot] = []
        self._conflated: dict[tuple[Any, ...], GreeksSnapshot] | None = None  # while blocked
        self._positions: list[PositionsSnapshot] = []
        self._sessions: list[SessionEvent] = []
        self.conflated_total = 0
        self.episode_conflated = 0  # rows conflated since the channel last had room

    def __len__(self) -> int:
        """Rows pending."""
        return len(self._rows) + (0 if self._conflated is None else len(self._conflated))

    @property
    def empty(self) -> bool:
        return not (self._rows or self._conflated or self._positions or self._sessions)

    def add(
        self,
        rows: list[GreeksSnapshot],
        positions: Iterable[PositionsSnapshot] = (),
        sessions: Iterable[SessionEvent] = (),
        *,
        blocked: bool = False,
    ) -> None:
        """Queue what the book produced; ``blocked``: the channel is full right now."""
        self._positions.extend(positions)
        self._sessions.extend(sessions)
        if not rows:
            return
        if self._conflated is None and (not blocked or len(self._rows) + len(rows) <= self.keep_rows):
            self._rows.extend(rows)
            return
        pending = self._conflated
        if pending is None:
            # The channel is full and the backlog past keep_rows: from now on the newest row per
            # position wins, counting the rows already pending.
            pending = self._conflated = {}
            before = len(self._rows)
            for row in self._rows:
                pending[row[:3]] = row
            self._rows = []
            self._count(before - len(pending))
        before = len(pending) + len(rows)
        for row in rows:
            key = row[:3]  # broker, account, instrument
            if key in pending:
                del pending[key]  # keep insertion order = order of the newest rows
            pending[key] = row
        self._count(before - len(pending))

    def _count(self, n: int) -> None:
        self.conflated_total += n
        self.episode_conflated += n

    def take(self, max_rows: int | None = None) -> RowsBatch | None:
        """What is pending as one batch, its first ``max_rows`` rows at most (None when nothing
        is); the rest stays pending, in order, for the next take. Positions snapshots and
        session events go with the first batch. Conflation ends here: the channel had room
        again if the actor could take a batch to send."""
        if self.empty:
            return None
        rows = self._rows
        if self._conflated is not None:
            rows = rows + list(self._conflated.values())
            self._conflated = None
        if max_rows is not None and len(rows) > max_rows:
            self._rows = rows[max_rows:]
            rows = rows[:max_rows]
        else:
            self._rows = []
        batch = RowsBatch(rows, tuple(self._positions), tuple(self._sessions))
        self._positions = []
        self._sessions = []
        return batch

    def requeue(self, batch: RowsBatch) -> None:
        """Put back a batch that could not be sent (the send was cancelled or failed), ahead of
        what is pending: nothing taken is lost when the normalizer restarts. While conflating, a
        pending newer row of the same position wins over the requeued one (counted)."""
        self._positions[:0] = batch.positions
        self._sessions[:0] = batch.sessions
        if self._conflated is None:
            self._rows[:0] = batch.rows
            return
        merged: dict[tuple[Any, ...], GreeksSnapshot] = {}
        for row in batch.rows:
            merged[row[:3]] = row
        dropped = len(batch.rows) - len(merged)
        for key, row in self._conflated.items():
            if key in merged:
                dropped += 1
                del merged[key]
            merged[key] = row
        self._conflated = merged
        self._count(dropped)

    def end_episode(self) -> int:
        """Rows conflated in the episode that just ended (the channel had room again)."""
        n, self.episode_conflated = self.episode_conflated, 0
        return n
