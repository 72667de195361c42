"""The normalizer actor: broker-neutral events from ``raw`` -> :class:`~normalize.book.Book` ->
``RowsBatch`` items on ``rows``.

Two tasks around the pure parts:

- the receiver takes everything queued on ``raw`` (each item is one frame's list of events),
  applies it to the book and adds the output to the :class:`~normalize.conflate.Outbox`; it never
  waits for the ``rows`` channel, so a slow writer never blocks the brokers;
- while ``rows`` has room the receiver sends what is pending itself, as one batch: one channel
  send per round, never per tick, and no task switch per round;
- when ``rows`` is full the sender waits for room with the oldest pending batch; meanwhile the
  receiver's new rows are conflated (newest per position wins, counted as ``conflated_total``)
  until the channel has room again.

The book and the outbox live outside one attempt: a restarted normalizer keeps its positions and
its pending rows. When ``raw`` ends (every broker stopped in the drain) the sender sends what is
pending and the actor returns, which closes its ``rows`` clone so the writer can drain in turn.

Status: ``actors.normalizer`` gains ``conflated_total``, ``bad_events``, ``model_rows``,
``positions``; the ``portfolio`` section holds the portfolio Greeks (at most once a second).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus

from normalize.book import Book
from normalize.conflate import Outbox
from normalize.steps import Done, advance, finish
from supervisor.context import ActorContext
from supervisor.spec import RunFn

PUBLISH_INTERVAL_S = 1.0
# Events applied per round of the receiver before it lets the other actors run: a few
# milliseconds of book work. Draining the whole ``raw`` channel at once (256 frames of up to
# 100 DXLink events: 60 ms and more) starved the writer under load, whose every event-loop
# round then waited that long, until the engine fell behind for good.
MAX_EVENTS_PER_ROUND = 2000
# Rows per item on ``rows``: the channel's capacity is counted in items, so this bounds the rows
# it can hold (256 x 500 = 128,000, ~90 MB) whatever the backlog; past it rows wait in the outbox
# (up to CONFLATE_AFTER_ROWS, then conflated): memory stays bounded when the writer is slower than
# the feed.
MAX_ROWS_PER_ITEM = 500
# Instruments added to the portfolio's sum per round (Book.portfolio_steps): about 2 ms of work. The
# whole sum in one go took 20 ms once a second with 10,000 positions held (p99 at 2,000 ticks/s
# 20 to 36 ms there, against about 3 ms with 500).
MAX_PORTFOLIO_STEP = 1000


def make_normalizer(
    *,
    risk_free_rate: float = 0.04,
    max_batches: int = 256,
    max_events: int = MAX_EVENTS_PER_ROUND,
    max_rows_per_item: int = MAX_ROWS_PER_ITEM,
    conflate_after_rows: int = 0,
    max_portfolio_step: int = MAX_PORTFOLIO_STEP,
    clock: Callable[[], float] = time.monotonic,
    book: Book | None = None,
) -> RunFn:
    """The normalizer's ``RunFn`` (``book``: inject one to inspect it in tests)."""
    book = book if book is not None else Book(risk_free_rate=risk_free_rate)
    outbox = Outbox(keep_rows=conflate_after_rows)
    bad_seen = 0

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        nonlocal bad_seen
        raw = ctx.receivers["raw"]
        rows_out = ctx.senders["rows"]
        wake = anyio.Event()
        blocked = False
        receiving = True
        last_publish = -PUBLISH_INTERVAL_S
        portfolio: Generator[None, None, dict[str, Any]] | None = None  # a sum over several rounds

        def publish(force: bool = False) -> None:
            # Once a second: the counters at once, the portfolio summed over this and the next
            # rounds, at most max_portfolio_step instruments a round (a large book's sum would
            # hold up the event loop for tens of milliseconds); ``force`` completes it now.
            nonlocal last_publish, portfolio
            if portfolio is None:
                now = clock()
                if not force and now - last_publish < PUBLISH_INTERVAL_S:
                    return
                last_publish = now
                ctx.set_info(
                    conflated_total=outbox.conflated_total,
                    bad_events=book.bad_events,
                    model_rows=book.model_rows_total,
                    positions=len(book.positions()),
                )
                portfolio = book.portfolio_steps(max_portfolio_step)
            done = Done(finish(portfolio)) if force else advance(portfolio)
            if done is not None:
                ctx.publish("portfolio", portfolio_status(done.value))
                portfolio = None

        def end_episode() -> None:
            if outbox.episode_conflated:
                ctx.log.warning(
                    "rows_conflated",
                    rows=outbox.end_episode(),
                    conflated_total=outbox.conflated_total,
                    detail="the rows channel was full: newest row per position kept",
                )

        def send_pending_nowait() -> bool:
            """Send what is pending while ``rows`` has room; True once the outbox is empty,
            False when the channel is full (the batch taken is put back, ahead of the rest)."""
            while True:
                batch = outbox.take(max_rows_per_item)
                if batch is None:
                    return True
                try:
                    rows_out.send_nowait(batch)
                except anyio.WouldBlock:
                    outbox.requeue(batch)
                    return False
                except BaseException:
                    outbox.requeue(batch)  # a closed channel: the batch stays pending, nothing lost
                    raise
                end_episode()

        async def sender() -> None:
            # Wakes only when the receiver found ``rows`` full (or at the end): while the
            # channel has room the receiver sends itself, without a task switch per item.
            nonlocal wake, blocked
            while True:
                if send_pending_nowait():
                    if not receiving:
                        return
                    await wake.wait()
                    wake = anyio.Event()
                    continue
                batch = outbox.take(max_rows_per_item)
                assert batch is not None
                blocked = True
                try:
                    await rows_out.send(batch)
                except BaseException:
                    outbox.requeue(batch)  # cancelled or failed: the next attempt sends it
                    raise
                finally:
                    blocked = False
                end_episode()

        with rows_out:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                task_status.started()
                try:
                    async for first in raw:
                        items = [first]
                        events = len(first)
                        while len(items) < max_batches and events < max_events:
                            try:
                                item = raw.receive_nowait()
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                            items.append(item)
                            events += len(item)
                        out = book.apply(event for batch in items for event in batch)
                        outbox.add(out.rows, out.positions, out.sessions, blocked=blocked)
                        # Sent here while the channel has room (the sender idle: nothing of its
                        # own in flight, so the order holds); else the sender waits for room.
                        if blocked or not send_pending_nowait():
                            wake.set()
                        ctx.record_events(len(out.rows))
                        if book.bad_events != bad_seen:
                            ctx.log.error(
                                "bad_events_skipped",
                                events=book.bad_events - bad_seen,
                                bad_events_total=book.bad_events,
                                last_error=book.last_bad_event,
                            )
                            bad_seen = book.bad_events
                        publish()
                finally:
                    receiving = False
                    wake.set()
            publish(force=True)

    return run


def portfolio_status(portfolio: dict[str, Any]) -> dict[str, Any]:
    """The ``portfolio`` section of the status file: ``as_of`` as ISO-8601 UTC, numbers rounded."""
    as_of = portfolio["as_of"]
    return {
        "as_of": None
        if as_of is None
        else datetime.fromtimestamp(as_of, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "total": _rounded(portfolio["total"]),
        "by_underlying": {u: _rounded(e) for u, e in portfolio["by_underlying"].items()},
        "positions_without_data": portfolio["positions_without_data"],
    }


def _rounded(exposure: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, int) else round(v, 4) for k, v in exposure.items()}
