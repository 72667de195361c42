"""structlog configuration: JSON lines on stdout (orjson) or a console format for humans.

The pipeline is a chain of small processors (structlog's recipe): contextvars, level, ISO-8601 UTC
timestamp, exception formatting, secret redaction, then the renderer. Records from the standard
library ``logging`` module (asyncpg, websockets, aiohttp, tastytrade) go through the same
processors, so every line on stdout is one redacted JSON object.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from config.settings import LogFormat, Secret

REDACTED = "[REDACTED]"

# Keys whose values are secrets, whatever the call site passes.
_SECRET_KEY = re.compile(
    r"(token|secret|passw(or)?d|pwd|refresh|cookie|authori[sz]ation|api[_-]?key|credential|^session$)",
    re.IGNORECASE,
)
# Secrets embedded in strings: URL passwords, bearer tokens, key=value pairs and JSON-ish pairs.
_URL_PASSWORD = re.compile(r"(?P<pre>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<pre>\b(?:Bearer|Basic|Token)\s+)(?P<pw>[A-Za-z0-9\-._~+/=]{4,})", re.IGNORECASE)
_PAIR = re.compile(
    r"(?P<pre>\b(?:[\w\-]*(?:token|secret|password|passwd|pwd|refresh|cookie|authorization|api[_-]?key)"
    r"[\w\-]*|api|session)[\"']?\s*[=:]\s*[\"']?)(?P<pw>[^\s\"'&;,}]+)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Mask URL passwords, bearer tokens and ``key=value`` secrets inside free text."""
    text = _URL_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group("pre") + REDACTED, text)
    return _PAIR.sub(lambda m: m.group("pre") + REDACTED, text)


def redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, depth + 1) for v in value]
    return value


class RedactSecrets:
    """Processor: secrets never leave the process in a log line, whatever the call site passes."""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        for key, value in list(event_dict.items()):
            if _SECRET_KEY.search(key):
                event_dict[key] = REDACTED
            else:
                event_dict[key] = redact_value(value)
        return event_dict


class PipeSafe:
    """A stream wrapper that stops writing, instead of raising, once the reader has gone.

    ``python run.py | jq`` with jq gone must not crash the actors that log: data keeps flowing
    to the database and the drain still runs; only the log lines are lost from then on.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, data: Any) -> int:
        if self.broken:
            return len(data)
        try:
            return int(self._stream.write(data))
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.broken = True
            return len(data)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self.broken = True


def _orjson_default(obj: Any) -> Any:
    return str(obj)


def _dumps_bytes(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=_orjson_default)


def _dumps_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=_orjson_default).decode()


def _rename_logger_name(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    if "logger" in event_dict and "actor" not in event_dict:
        event_dict["lib"] = event_dict.pop("logger")
    return event_dict


def _pre_chain() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def configure_logging(level: str = "INFO", fmt: LogFormat = LogFormat.JSON, stream: Any = None) -> None:
    """Configure structlog and the standard library logging to write to ``stream`` (stdout)."""
    out = sys.stdout if stream is None else stream
    numeric = logging.getLevelNamesMapping()[level.upper()]
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        RedactSecrets(),
    ]
    if fmt is LogFormat.JSON:
        renderer: Processor = structlog.processors.JSONRenderer(serializer=_dumps_bytes)
        stdlib_renderer: Processor = structlog.processors.JSONRenderer(serializer=_dumps_str)
        binary: Any = PipeSafe(out.buffer if hasattr(out, "buffer") else out)
        factory: Any = structlog.BytesLoggerFactory(binary)
    else:
        renderer = stdlib_renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.PrintLoggerFactory(PipeSafe(out))  # type: ignore[arg-type]
    structlog.configure(
        processors=[*_pre_chain(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(PipeSafe(out))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *_pre_chain(),
                structlog.stdlib.add_logger_name,
                _rename_logger_name,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                stdlib_renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries are chatty at INFO (websockets logs every connection); keep them at WARNING
    # unless the engine itself runs at DEBUG.
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))


def get_logger(**context: Any) -> Any:
    """A structlog logger bound to ``context`` (e.g. ``actor="writer"``)."""
    return structlog.get_logger().bind(**context)
