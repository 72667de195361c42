"""Load :class:`config.settings.Settings` from the environment and an optional ``.env`` file.

This is the only module that reads the environment. Every variable is parsed and validated here;
a bad value raises :class:`ConfigError` naming the variable and what is expected, never echoing a
secret value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values

from config.settings import (
    ChannelSettings,
    DatabaseSettings,
    IbkrSettings,
    LogFormat,
    RestartSettings,
    Secret,
    Settings,
    SimulatorSettings,
    TastytradeSettings,
)

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVENT_LOOPS = ("asyncio", "uvloop")
KNOWN_BROKERS = ("ibkr", "tastytrade")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Every variable the engine reads: name -> (default shown in README, description). The README
# configuration table is generated from, and tested against, this table.
VARIABLES: dict[str, tuple[str, str]] = {
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    "LOG_FORMAT": ("json", "`json` (one object per line on stdout) or `console` for humans"),
    "EVENT_LOOP": (
        "asyncio",
        "`asyncio` (the standard library's loop) or `uvloop` (the `uvloop` extra: less CPU, see Benchmarks)",
    ),
    "VAR_DIR": ("var", "directory for local state (status file, embedded database, spool)"),
    "STATUS_FILE": ("$VAR_DIR/status.json", "path of the status file"),
    "STATUS_INTERVAL_S": ("1", "seconds between status file rewrites (also on every change), at most 5"),
    "SHUTDOWN_TIMEOUT_S": ("10", "seconds an actor may take to drain on SIGINT/SIGTERM"),
    "SIMULATE": ("false", "force the broker simulators even when credentials are set"),
    "BROKERS": ("ibkr,tastytrade", "comma-separated brokers to stream"),
    "RISK_FREE_RATE": (
        "0.04",
        "rate for model Greeks when a broker sends none (a fraction: 0.04 = 4 %)",
    ),
    "RESTART_BACKOFF_INITIAL_S": ("0.5", "first restart delay of a crashed actor"),
    "RESTART_BACKOFF_MAX_S": ("30", "longest restart delay; the pace of a `failed` actor"),
    "RESTART_MAX": ("5", "restarts allowed within RESTART_PERIOD_S before `failed`"),
    "RESTART_PERIOD_S": ("60", "window of the restart intensity"),
    "CHANNEL_RAW_CAPACITY": ("256", "batches buffered between brokers and normalizer"),
    "CHANNEL_ROWS_CAPACITY": ("256", "batches buffered between normalizer and writer"),
    "CONFLATE_AFTER_ROWS": (
        "50000",
        "rows the normalizer holds, all kept, while the rows channel is full; past it: conflation",
    ),
    "DATABASE_URL": ("(unset)", "PostgreSQL DSN; unset starts the embedded server (secret)"),
    "EMBEDDED_PG_DIR": ("$VAR_DIR/postgres", "data directory of the embedded server"),
    "EMBEDDED_PG_PORT": ("0", "loopback port of the embedded server; 0 picks a free one"),
    "DB_NAME": ("portfolio_engine", "database created in the embedded server"),
    "BATCH_MAX_ROWS": ("5000", "most rows the writer commits at once"),
    "BATCH_MAX_DELAY_MS": ("50", "longest a row waits for its batch to fill"),
    "BATCH_LINGER_MS": (
        "4",
        "under load (10,000 rows/s and more) a batch goes once its oldest row is this old; 0 = no wait",
    ),
    "LATEST_INTERVAL_MS": (
        "100",
        "under load greeks_latest is updated at most this often (history: every batch); 0 = every batch",
    ),
    "BUFFER_MAX_ROWS": ("100000", "rows held in memory while the database is down, then spooled"),
    "SPOOL_DIR": ("$VAR_DIR/spool", "where batches are spooled while the database is down"),
    "SPOOL_MAX_BYTES": (
        "1G",
        "spool size cap (K/M/G suffixes); past it the oldest data is dropped",
    ),
    "RETENTION_DAYS": ("30", "days of snapshot history kept (older partitions dropped)"),
    "PARTITIONS_AHEAD_DAYS": ("3", "daily history partitions created ahead"),
    "IBKR_GATEWAY_URL": (
        "(unset)",
        "Client Portal gateway, e.g. https://localhost:5000; set = live",
    ),
    "IBKR_ACCOUNTS": ("(all)", "comma-separated IBKR accounts"),
    "IBKR_CA_FILE": ("(unset)", "CA file to verify the gateway's certificate"),
    "IBKR_VERIFY_TLS": ("true", "verify the gateway's TLS certificate (false is logged loudly)"),
    "IBKR_SESSION": (
        "(unset)",
        'the gateway\'s `api` session cookie (`<id>` or `{"session":"<id>"}`), if known (secret)',
    ),
    "IBKR_WS_URL": ("(derived)", "WebSocket URL; default `wss://<gateway>/v1/api/ws` (`ws://` for http)"),
    "IBKR_TIC_INTERVAL_S": ("60", "seconds between `tic` keepalives on the socket (at most 60)"),
    "IBKR_TICKLE_INTERVAL_S": ("60", "seconds between `POST /tickle` session keepalives"),
    "IBKR_RESUBSCRIBE_S": ("540", "each `smd` is re-sent this long after it was sent (at most 600)"),
    "IBKR_HB_TIMEOUT_S": ("30", "no `system` heartbeat (sent every 10 s) this long: reconnect"),
    "IBKR_POSITIONS_REFRESH_S": ("60", "seconds between positions refreshes (new `smd`, closed `umd`)"),
    "IBKR_MAX_SUBSCRIPTIONS": ("100", "market data lines: conids streamed at most (options first)"),
    "IBKR_IV_SCALE": ("auto", "field 7633: `percent`, `fraction` or `auto` (`%` or > 2: percent)"),
    "TT_CLIENT_SECRET": ("(unset)", "Tastytrade OAuth client secret (secret)"),
    "TT_REFRESH_TOKEN": (
        "(unset)",
        "Tastytrade OAuth refresh token (secret); with the secret = live",
    ),
    "TT_API_URL": ("https://api.tastyworks.com", "Tastytrade REST base URL"),
    "TT_ACCOUNTS": ("(all)", "comma-separated Tastytrade accounts"),
    "TT_KEEPALIVE_S": ("30", "seconds between DXLink KEEPALIVEs when idle (0 < s < 60)"),
    "TT_STALE_S": ("60", "nothing from DXLink for this long means stale: reconnect"),
    "TT_AGGREGATION_S": ("0.1", "DXLink aggregation period asked for (0 = none, at most 10)"),
    "TT_POSITIONS_REFRESH_S": ("60", "seconds between positions refreshes (subscriptions follow)"),
    "TT_HANDSHAKE_TIMEOUT_S": ("10", "seconds from socket open to a subscribed feed before reconnecting"),
    "SIM_SEED": ("42", "random seed of the simulated market"),
    "SIM_RATE_HZ": ("2", "simulated updates per contract per second (0 < rate <= 1000)"),
    "SIM_POSITIONS": ("0", "simulated contracts per broker; 0 = the default book"),
}


class ConfigError(Exception):
    """A setting has a bad value. ``str()`` is the one line printed before exiting with status 2."""

    def __init__(self, variable: str, expected: str, value: str | None = None) -> None:
        self.variable = variable
        self.expected = expected
        shown = "" if value is None else f" (got {value!r})"
        super().__init__(f"config error: {variable}{shown}: expected {expected}")


def load_env(
    env_file: Path | None = Path(".env"), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The process environment over the ``.env`` file (the environment wins)."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def get(
        self,
        name: str,
        parse: Callable[[str], T],
        default: T,
        expected: str,
        *,
        secret: bool = False,
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, TypeError):
            raise ConfigError(name, expected, None if secret else value) from None

    def number(
        self,
        name: str,
        default: float,
        *,
        low: float = 0.0,
        high: float = math.inf,
        low_inclusive: bool = False,
    ) -> float:
        op = ">=" if low_inclusive else ">"
        expected = f"a number {op} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")

        def parse(text: str) -> float:
            v = float(text)
            if not math.isfinite(v) or v > high or v < low or (v == low and not low_inclusive):
                raise ValueError(text)
            return v

        return self.get(name, parse, default, expected)

    def integer(self, name: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        expected = f"an integer >= {low}" + ("" if high is None else f" and <= {high}")

        def parse(text: str) -> int:
            v = int(text)
            if v < low or (high is not None and v > high):
                raise ValueError(text)
            return v

        return self.get(name, parse, default, expected)

    def boolean(self, name: str, default: bool) -> bool:
        def parse(text: str) -> bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(text)

        return self.get(name, parse, default, "true or false (1/0, yes/no, on/off)")

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
        def parse(text: str) -> str:
            v = text.upper() if upper else text.lower()
            if v not in choices:
                raise ValueError(text)
            return v

        return self.get(name, parse, default, "one of " + ", ".join(choices))

    def path(self, name: str, default: Path) -> Path:
        return self.get(name, Path, default, "a path")

    def names(
        self, name: str, default: tuple[str, ...], expected: str = "comma-separated names"
    ) -> tuple[str, ...]:
        def parse(text: str) -> tuple[str, ...]:
            items = tuple(i.strip() for i in text.split(","))
            if not all(items) or len(set(items)) != len(items):
                raise ValueError(text)
            return items

        return self.get(name, parse, default, expected)

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name)
        return None if value is None else Secret(value)


def parse_size(text: str) -> int:
    """``"512M"`` -> bytes. Accepts an integer with an optional K/M/G/T suffix (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    value = int(m.group(1)) * _SIZE_SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise ValueError(text)
    return value


def parse_database_url(text: str) -> Secret:
    """Validate a PostgreSQL DSN without ever echoing it (it may hold a password)."""
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("scheme")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port") from None
    if port == 0:
        raise ValueError("port")
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("host")
    return Secret(text)


def parse_http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(text)
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(text) from None
    return text.rstrip("/")


def parse_ws_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(text)
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(text) from None
    return text


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(text)
    return path


def _identifier(text: str) -> str:
    if not _IDENT.match(text):
        raise ValueError(text)
    return text


def uvloop_available() -> bool:
    """Whether ``uvloop`` can be imported (the ``uvloop`` extra; not on Windows)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _event_loop(choice: str) -> str:
    """``EVENT_LOOP``, checked: ``uvloop`` only where it is installed."""
    if choice == "uvloop" and not uvloop_available():
        raise ConfigError("EVENT_LOOP", "asyncio, or uvloop once installed (pip install '.[uvloop]')", choice)
    return choice


def load_settings(env: Mapping[str, str]) -> Settings:
    """Parse and validate every setting. Raises :class:`ConfigError` on the first bad value."""
    r = _Reader(env)
    var_dir = r.path("VAR_DIR", Path("var"))
    brokers = r.names("BROKERS", KNOWN_BROKERS, "comma-separated brokers among " + ", ".join(KNOWN_BROKERS))
    if unknown := [b for b in brokers if b not in KNOWN_BROKERS]:
        raise ConfigError(
            "BROKERS",
            "comma-separated brokers among " + ", ".join(KNOWN_BROKERS),
            ",".join(unknown),
        )

    restart = RestartSettings(
        backoff_initial_s=r.number("RESTART_BACKOFF_INITIAL_S", 0.5, low_inclusive=True),
        backoff_max_s=r.number("RESTART_BACKOFF_MAX_S", 30.0),
        max_restarts=r.integer("RESTART_MAX", 5),
        period_s=r.number("RESTART_PERIOD_S", 60.0),
    )
    if restart.backoff_max_s < restart.backoff_initial_s:
        raise ConfigError(
            "RESTART_BACKOFF_MAX_S",
            "a number >= RESTART_BACKOFF_INITIAL_S",
            str(restart.backoff_max_s),
        )

    db = DatabaseSettings(
        url=r.get(
            "DATABASE_URL",
            parse_database_url,
            None,
            "a PostgreSQL URL such as postgresql://user:password@host:5432/dbname (value not shown)",
            secret=True,
        ),
        embedded_dir=r.path("EMBEDDED_PG_DIR", var_dir / "postgres"),
        embedded_port=r.integer("EMBEDDED_PG_PORT", 0, high=65535),
        name=r.get(
            "DB_NAME",
            _identifier,
            "portfolio_engine",
            "a PostgreSQL identifier (letters, digits, _)",
        ),
        batch_max_rows=r.integer("BATCH_MAX_ROWS", 5000, low=1),
        batch_max_delay_ms=r.number("BATCH_MAX_DELAY_MS", 50.0, low_inclusive=True),
        batch_linger_ms=r.number("BATCH_LINGER_MS", 4.0, low_inclusive=True, high=1000.0),
        latest_interval_ms=r.number("LATEST_INTERVAL_MS", 100.0, low_inclusive=True, high=60_000.0),
        buffer_max_rows=r.integer("BUFFER_MAX_ROWS", 100_000),
        spool_dir=r.path("SPOOL_DIR", var_dir / "spool"),
        spool_max_bytes=r.get(
            "SPOOL_MAX_BYTES",
            parse_size,
            1 << 30,
            "a size in bytes > 0, optionally with K, M, G or T",
        ),
        retention_days=r.integer("RETENTION_DAYS", 30, low=1),
        partitions_ahead_days=r.integer("PARTITIONS_AHEAD_DAYS", 3, low=1),
    )

    ibkr = IbkrSettings(
        gateway_url=r.get(
            "IBKR_GATEWAY_URL",
            parse_http_url,
            None,
            "an http(s) URL such as https://localhost:5000",
        ),
        accounts=r.names("IBKR_ACCOUNTS", ()),
        ca_file=r.get("IBKR_CA_FILE", _existing_file, None, "the path of an existing CA file"),
        verify_tls=r.boolean("IBKR_VERIFY_TLS", True),
        session_cookie=r.secret("IBKR_SESSION"),
        ws_url=r.get("IBKR_WS_URL", parse_ws_url, None, "a ws(s) URL such as wss://localhost:5000/v1/api/ws"),
        tic_interval_s=r.number("IBKR_TIC_INTERVAL_S", 60.0, high=60),
        tickle_interval_s=r.number("IBKR_TICKLE_INTERVAL_S", 60.0),
        resubscribe_s=r.number("IBKR_RESUBSCRIBE_S", 540.0, high=600),
        hb_timeout_s=r.number("IBKR_HB_TIMEOUT_S", 30.0),
        positions_refresh_s=r.number("IBKR_POSITIONS_REFRESH_S", 60.0),
        max_subscriptions=r.integer("IBKR_MAX_SUBSCRIPTIONS", 100, low=1),
        iv_scale=r.choice("IBKR_IV_SCALE", "auto", ("auto", "percent", "fraction")),
    )
    tastytrade = TastytradeSettings(
        client_secret=r.secret("TT_CLIENT_SECRET"),
        refresh_token=r.secret("TT_REFRESH_TOKEN"),
        api_url=r.get("TT_API_URL", parse_http_url, "https://api.tastyworks.com", "an http(s) URL"),
        accounts=r.names("TT_ACCOUNTS", ()),
        keepalive_s=r.number("TT_KEEPALIVE_S", 30.0, high=59),
        stale_s=r.number("TT_STALE_S", 60.0),
        aggregation_s=r.number("TT_AGGREGATION_S", 0.1, low_inclusive=True, high=10),
        positions_refresh_s=r.number("TT_POSITIONS_REFRESH_S", 60.0),
        handshake_timeout_s=r.number("TT_HANDSHAKE_TIMEOUT_S", 10.0),
    )
    if (tastytrade.client_secret is None) != (tastytrade.refresh_token is None):
        missing = "TT_REFRESH_TOKEN" if tastytrade.refresh_token is None else "TT_CLIENT_SECRET"
        raise ConfigError(
            missing,
            "to be set together with "
            + ("TT_CLIENT_SECRET" if missing == "TT_REFRESH_TOKEN" else "TT_REFRESH_TOKEN"),
        )

    return Settings(
        log_level=r.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=LogFormat(r.choice("LOG_FORMAT", "json", tuple(f.value for f in LogFormat))),
        event_loop=_event_loop(r.choice("EVENT_LOOP", "asyncio", EVENT_LOOPS)),
        var_dir=var_dir,
        status_file=r.path("STATUS_FILE", var_dir / "status.json"),
        # at most 5 s: `run.py status` calls a file older than 10 s stale
        status_interval_s=r.number("STATUS_INTERVAL_S", 1.0, high=5),
        shutdown_timeout_s=r.number("SHUTDOWN_TIMEOUT_S", 10.0),
        simulate=r.boolean("SIMULATE", False),
        brokers=brokers,
        risk_free_rate=r.number("RISK_FREE_RATE", 0.04, low=-0.2, high=1.0, low_inclusive=True),
        restart=restart,
        channels=ChannelSettings(
            raw_capacity=r.integer("CHANNEL_RAW_CAPACITY", 256, low=1),
            rows_capacity=r.integer("CHANNEL_ROWS_CAPACITY", 256, low=1),
            conflate_after_rows=r.integer("CONFLATE_AFTER_ROWS", 50_000, low=0),
        ),
        db=db,
        ibkr=ibkr,
        tastytrade=tastytrade,
        sim=SimulatorSettings(
            seed=r.integer("SIM_SEED", 42),
            rate_hz=r.number("SIM_RATE_HZ", 2.0, high=1000),
            positions=r.integer("SIM_POSITIONS", 0),
        ),
    )
