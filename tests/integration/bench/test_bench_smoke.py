"""Smoke test of the end-to-end benchmark (not a benchmark: no timing is asserted).

The feed runs as its own process and serves both wire protocols to a bare client; one peer runs
for a second through the harness against it and PostgreSQL, and its numbers add up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench._harness import RESULT_KEYS, Bench, _http
from bench.feed.probe import probe
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


def test_one_peer_runs_and_adds_up(pg: PgTarget) -> None:
    with Bench(pg.admin_dsn, positions=40) as bench:
        run = bench.run("sdk_executemany", 300.0, 1.0)
    assert run.error is None
    assert set(run.keys()) == set(RESULT_KEYS)
    assert run.ticks_offered > 300
    assert run.ticks_committed == run.ticks_offered
    assert run.lost == 0
    assert run.latency_ms["p50"] > 0
    assert run.cpu_s > 0
    assert run.peak_rss_mb > 0
