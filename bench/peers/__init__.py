"""Peers: what a user would write instead of the engine, measured like the engine.

``python -m bench.peers NAME --ready-file FEED_READY --dsn DSN --stats-file STATS`` runs one:
``sdk_execute`` and ``sdk_executemany`` (:mod:`bench.peers.sdk`: the tastytrade SDK's
``DXLinkStreamer``), ``ibind_ws`` and ``poll`` (:mod:`bench.peers.ibkr`: ``ibind``), and
``bare_copy`` (:mod:`bench.peers.bare`), the floor: receive, decode, COPY, nothing else, and
``bare_recv``, the floor under it: the engine's input received and decoded, nothing stored;
references rather than peers (neither counts as the best peer in the targets). Each writes a
table of its own, with the event time (``bare_recv`` none), and its stats file (committed rows,
for ``bare_recv`` received ticks, and commit-returned, for ``bare_recv`` received, minus
send-time latency) twice a second and at exit (SIGTERM). They use asyncpg, the broker SDKs
and the standard library only: never the engine's code.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from bench.peers._common import Stats

Main = Callable[[dict[str, Any], str, Stats], Coroutine[Any, Any, None]]


def peer(name: str) -> tuple[Main, str | None, tuple[str, ...]]:
    """``(main, count_sql, brokers)`` of peer ``name``: its entry point, the SQL counting its distinct
    (contract, seq) rows (None: it stores nothing, its stats file counts), and the brokers it
    consumes."""
    if name in ("sdk_execute", "sdk_executemany"):
        from bench.peers import sdk

        return (sdk.execute if name == "sdk_execute" else sdk.executemany), sdk.COUNT_SQL, ("tastytrade",)
    if name in ("ibind_ws", "poll"):
        from bench.peers import ibkr

        return (ibkr.ibind_ws if name == "ibind_ws" else ibkr.poll), ibkr.COUNT_SQL, ("ibkr",)
    if name == "bare_copy":
        from bench.peers import bare

        return bare.bare_copy, bare.COUNT_SQL, ("tastytrade",)
    if name == "bare_recv":
        from bench.peers import bare

        return bare.bare_recv, None, ("ibkr", "tastytrade")
    raise ValueError(f"unknown peer {name!r}; one of {', '.join(PEERS)}")


PEERS = ("sdk_execute", "sdk_executemany", "ibind_ws", "poll", "bare_copy", "bare_recv")


def peer_table(name: str) -> tuple[str, str, str] | None:
    """``(table, event time column, seq column)`` of peer ``name``'s rows (None: it has none)."""
    if name in ("sdk_execute", "sdk_executemany"):
        return "greeks", "event_time", "sequence"
    if name in ("ibind_ws", "poll"):
        return "ibkr_ticks", "updated", "seq"
    if name == "bare_copy":
        return "bare_ticks", "event_time", "sequence"
    if name == "bare_recv":
        return None
    raise ValueError(f"unknown peer {name!r}")
