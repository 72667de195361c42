"""JSON log lines: shape, levels, and redaction of secrets whatever the call site passes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from config.logging import configure_logging, get_logger, redact_text
from config.settings import LogFormat, Secret


@pytest.fixture
def captured() -> Iterator[io.TextIOWrapper]:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    configure_logging("INFO", LogFormat.JSON, stream=stream)
    yield stream
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)


def lines(stream: io.TextIOWrapper) -> list[dict[str, object]]:
    stream.flush()
    raw = stream.buffer.getvalue().decode()  # type: ignore[attr-defined]
    return [json.loads(line) for line in raw.splitlines()]


def test_one_json_object_per_line_with_timestamp_level_event_actor(captured: io.TextIOWrapper) -> None:
    log = get_logger(actor="ibkr", broker="ibkr")
    log.info("ws_connected", url="ws://127.0.0.1:1/v1/api/ws", subscriptions=3)
    log.debug("not_shown")
    [line] = lines(captured)
    assert line["event"] == "ws_connected"
    assert line["level"] == "info"
    assert line["actor"] == "ibkr"
    assert line["broker"] == "ibkr"
    assert line["subscriptions"] == 3
    ts = str(line["timestamp"])
    assert ts.endswith("Z")
    assert ts[:4].isdigit()
    assert ts[10] == "T"


def test_secrets_redacted_whatever_the_call_site_passes(captured: io.TextIOWrapper) -> None:
    log = get_logger(actor="tastytrade")
    log.warning(
        "login_failed",
        refresh_token="r3fresh-value",
        password="hunter2",
        client_secret=Secret("s3cret-value"),
        headers={"Authorization": "Bearer abcd1234efgh", "Accept": "application/json"},
        cookie="api=c00kie-value",
        dsn="postgresql://me:pa55word@db:5432/x",
        detail="POST /oauth/token refresh_token=leaky-value&grant_type=refresh_token",
        payload={"nested": [{"token": "t0ken-value"}], "session": "sess-value"},
        url="wss://streamer.example/?token=qs-value",
        value=Secret("positional-secret"),
    )
    logging.getLogger("websockets.client").warning("connect failed: Authorization: Bearer stdlib-token-value")
    try:
        raise RuntimeError("auth failed for postgresql://me:exc-pass@db/x")
    except RuntimeError:
        log.exception("crashed")
    out = lines(captured)
    text = json.dumps(out)
    for secret in (
        "r3fresh-value",
        "hunter2",
        "s3cret-value",
        "abcd1234efgh",
        "c00kie-value",
        "pa55word",
        "leaky-value",
        "t0ken-value",
        "sess-value",
        "qs-value",
        "positional-secret",
        "stdlib-token-value",
        "exc-pass",
    ):
        assert secret not in text, secret
    first = out[0]
    assert first["headers"] == {"Authorization": "[REDACTED]", "Accept": "application/json"}
    assert first["dsn"] == "postgresql://me:[REDACTED]@db:5432/x"
    assert out[1]["lib"] == "websockets.client"
    assert out[1]["level"] == "warning"
    assert "RuntimeError" in str(out[2]["exception"])


def test_console_format_for_humans() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", LogFormat.CONSOLE, stream=stream)
    try:
        get_logger(actor="writer").debug("batch_committed", rows=5, password="hunter2")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "batch_committed" in text
    assert "rows=5" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:p@h/d", "postgresql://u:[REDACTED]@h/d"),
        ("no secrets here: delta=0.5", "no secrets here: delta=0.5"),
        ('{"api-quote-token": "xyz"}', '{"api-quote-token": "[REDACTED]"}'),
        ("Cookie: api=abc123; other=1", "Cookie: [REDACTED]; other=1"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_a_reader_that_went_away_does_not_break_logging() -> None:
    """`python run.py | jq` with jq gone: logging goes on silently instead of raising."""
    import os

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with open(write_fd, "w", buffering=1) as stream:
        configure_logging("INFO", LogFormat.JSON, stream=stream)
        try:
            log = get_logger(actor="writer")
            for _ in range(3):
                log.info("batch_committed", rows=1)
            logging.getLogger("asyncpg").warning("library line")
        finally:
            structlog.reset_defaults()
            root = logging.getLogger()
            for handler in list(root.handlers):
                root.removeHandler(handler)
        try:
            stream.close()
        except BrokenPipeError:
            pass
