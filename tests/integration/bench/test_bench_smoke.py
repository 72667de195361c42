"""Smoke test of the end-to-end benchmark (not a benchmark: no timing is asserted).

The feed runs as its own process and serves both wire protocols to a bare client; one peer runs
for a second through the harness against it and PostgreSQL, and its numbers add up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from bench._harness import RESULT_KEYS, Bench, _db_commit_latency, _http
from bench.feed.probe import probe
from bench.peers.sdk import TABLE as SDK_TABLE
from tests.integration.bench.conftest import PgTarget

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_feed_serves_both_protocols(pg: PgTarget, tmp_path: Path) -> None:
    with Bench(pg.admin_dsn, positions=40) as bench, bench.feed(20000.0, "both", tmp_path) as (ready, _pid):
        result = asyncio.run(probe(ready, 1.0, ("ibkr", "tastytrade")))
        ledger = _http(f"{ready['control']}/ledger")["brokers"]
    for broker in ("ibkr", "tastytrade"):
        assert result[broker]["ticks"] > ready["positions"][broker]  # the last values, then a stream
        assert result[broker]["contracts_seen"] == ready["positions"][broker]
        assert sum(ledger[broker].values()) >= result[broker]["ticks"]
    assert result["tastytrade"]["frames"] < result["tastytrade"]["ticks"]  # several events a frame
    assert result["feed"]["offered"] == {b: sum(ledger[b].values()) for b in ("ibkr", "tastytrade")}


@pytest.mark.parametrize("name", ["sdk_executemany", "bare_copy", "bare_recv"])
def test_one_peer_runs_and_adds_up(pg: PgTarget, name: str) -> None:
    with Bench(pg.admin_dsn, positions=40) as bench:
        run = bench.run(name, 300.0, 1.0)
    assert run.error is None
    assert set(run.keys()) == set(RESULT_KEYS)
    assert run.ticks_offered > 300
    assert run.ticks_committed == run.ticks_offered
    assert run.lost == 0
    assert run.latency_ms["p50"] > 0
    assert run.cpu_s > 0
    assert run.peak_rss_mb > 0


def test_headline_latency_is_server_side_over_the_ticks_sent_at_the_rate() -> None:
    # A server of the harness's own (track_commit_timestamp on): rows of the subscription snapshot,
    # sent 10 s before the run started, stay out of the headline; the whole-run figure keeps them.
    with Bench(None, positions=40) as bench:
        assert bench.admin_dsn is not None
        dsn = bench.admin_dsn

        async def fill() -> float:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("DROP TABLE IF EXISTS greeks")
                await conn.execute(SDK_TABLE)
                now = time.time()
                rows = [(f"S{i}", now - 10.0, 1) for i in range(5)] + [(f"S{i}", now, 2) for i in range(5)]
                await conn.executemany(
                    "INSERT INTO greeks (symbol, event_time, sequence) VALUES ($1, to_timestamp($2), $3)",
                    rows,
                )
                return now
            finally:
                await conn.close()

        started = asyncio.run(fill())
        window = _db_commit_latency(dsn, "sdk_executemany", since=started)
        whole = _db_commit_latency(dsn, "sdk_executemany")
        run = bench.run("sdk_executemany", 300.0, 1.0)
    assert window is not None
    assert whole is not None
    assert window["max"] < 5_000 <= 10_000 <= whole["max"]
    assert run.error is None
    assert run.latency_source.startswith("server:")
    assert run.own_latency_ms is not None
    assert run.own_latency_ms["p50"] > 0
    assert run.latency_ms == run.db_commit_latency_ms
    assert run.ticks_committed == run.ticks_offered
