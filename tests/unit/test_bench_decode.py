"""The decode benchmark runs and both sides decode the same events (numbers are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import decode


def test_decode_benchmark_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    decode.cli(["--events", "20", "--repeat", "1", "--seconds", "0.01", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"engine_events_per_s", "sdk_events_per_s", "ratio"} <= set(result)
    assert result["ratio"] == result["engine_events_per_s"] / result["sdk_events_per_s"]
    assert result["events_per_message"] == 20
    assert (decode.OUT / "decode.png").is_file()
