"""bench._harness._engine_env: the engine's settings for a run against the feed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._harness import _engine_env


def _ready(ibkr_positions: int) -> dict[str, object]:
    return {
        "positions": {"ibkr": ibkr_positions, "tastytrade": ibkr_positions},
        "ibkr_base": "https://127.0.0.1:1/v1/api",
        "tastytrade_api": "http://127.0.0.1:2",
        "tt_client_secret": "secret",
        "tt_refresh_token": "token",
    }


@pytest.mark.parametrize(("held", "lines"), [(500, "1000"), (5000, "10000")])
def test_the_engine_may_subscribe_every_held_contract_and_its_underlyings(
    held: int, lines: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IBKR_MAX_SUBSCRIPTIONS", "5")  # the caller's own settings never leak in
    env = _engine_env(_ready(held), "postgresql://x", tmp_path, ("ibkr", "tastytrade"))
    assert env["IBKR_MAX_SUBSCRIPTIONS"] == lines
    assert env["BROKERS"] == "ibkr,tastytrade"
