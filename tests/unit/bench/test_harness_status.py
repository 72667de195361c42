"""bench._harness reads the engine's figures from its status file (pure: a status document in)."""

from __future__ import annotations

from bench._harness import Run, _engine_numbers


def test_engine_numbers_come_from_the_status_file() -> None:
    result = Run(name="engine", rate=1000.0, seconds=1.0)
    doc = {
        "runtime": {"event_loop": "asyncio", "speedups": True},
        "writer": {"event_latency_ms": {"p50": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0}},
        "actors": {"normalizer": {"conflated_total": 7}},
    }
    _engine_numbers(result, doc)
    assert (result.event_loop, result.speedups, result.conflated) == ("asyncio", True, 7)
    assert result.latency_ms == {"p50": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0}
    assert result.latency_source.startswith("writer.event_latency_ms")
