"""The C fast paths (``db/_speedups.c``, ``normalize/_speedups.c``) free what they allocate:
after a warm-up, thousands more rounds of every path leave the traced heap where it was."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from actors.tastytrade.protocol import EVENT_FIELDS, FeedData, _Layout, decode_compact
from db.batch import clean_rows, transpose
from db.encode import SPEEDUPS as COPY_SPEEDUPS
from db.encode import Dimensions, copy_chunk, newest_indexes, row_position_key
from db.latency import LatencyTracker
from normalize.book import SPEEDUPS as BOOK_SPEEDUPS
from normalize.book import Book
from normalize.events import InstrumentUpdate
from normalize.tastytrade import map_feed

from .db.rows import row
from .normalize.test_book import CALL, GREEKS, NOW, PUT, book_with, option, stock


def _rounds() -> Callable[[], None]:
    book: Book = book_with(option(CALL, 2), option(CALL, -1, account="U2"), option(PUT, 3), stock(10))
    updates = [
        InstrumentUpdate("ibkr", CALL, NOW, NOW, 1, dict(GREEKS, bid=1.0, ask=1.2)),
        InstrumentUpdate("ibkr", PUT, NOW, NOW, 2, dict(GREEKS, mark=2.0)),
        InstrumentUpdate("ibkr", "SPY", NOW, NOW, 3, {"bid": 500.0, "ask": 500.5}),
        InstrumentUpdate("ibkr", CALL, NOW, NOW, 4, {"bid": 1, "ask": 1.2}),  # the Python path
    ]
    rows = [row(i)._replace(seq=i, bid=None if i % 3 else 1.0) for i in range(50)]
    cols, pids = transpose(rows), list(range(50))
    fields = list(EVENT_FIELDS["Greeks"])
    layout = _Layout("Greeks", fields)
    values: list[object] = []
    for i in range(20):
        event = dict.fromkeys(fields, 0) | {
            "eventSymbol": f".S{i % 4}", "time": 1_700_000_000_000 + i, "sequence": i, "delta": 0.5,
        }  # fmt: skip
        values.extend(event.values())
    symbols = {".S0": "K0", ".S1": "K1"}
    dims = Dimensions()
    dims.add({row_position_key(r): i for i, r in enumerate(rows[:30])})  # some rows unknown
    tracker = LatencyTracker()

    def one() -> None:
        book.apply(list(updates))
        copy_chunk(cols, pids)
        cleaned = clean_rows(list(rows))  # transpose and the finiteness check
        found = dims.lookup_rows(cleaned.rows)
        assert found is not None
        newest_indexes(cleaned.columns or cols, pids)
        tracker.record_commit(cols[11], 1_700_000_001.0)  # distinct receive times
        events, _ = decode_compact(layout, values)
        out: list[InstrumentUpdate] = []
        map_feed(FeedData(1, "Greeks", events, layout.fields), symbols, 1.0, out.append)

    return one


@pytest.mark.skipif(not (COPY_SPEEDUPS and BOOK_SPEEDUPS), reason="C fast paths not built")
def test_c_fast_paths_do_not_leak() -> None:
    one = _rounds()
    for _ in range(200):  # warm-up: every record, cache and free list in place
        one()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(200):  # what the warm-up left untraced is replaced by traced objects
            one()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            one()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One leaked float per update would be 3000 x 4 x 24 bytes; a leaked row far more.
    assert growth < 16_000, f"the traced heap grew by {growth} bytes over 3,000 rounds"
