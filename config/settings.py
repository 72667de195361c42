"""Settings as frozen dataclasses.

Rules: pure data. The only code that reads the environment is :mod:`config.loader`.
Secret fields are declared with ``field(repr=False)`` and exposed only through :class:`Secret`,
whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Secret:
    """A string that never shows itself in ``repr()``, ``str()`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class RestartSettings:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    period_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    raw_capacity: int = 256
    rows_capacity: int = 256
    # Rows the normalizer keeps, every one in order, while the rows channel is full; past it,
    # conflation (newest row per position). Bounds the normalizer's memory (~700 bytes a row).
    conflate_after_rows: int = 50_000


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: Secret | None = None  # DATABASE_URL; None means "start the embedded server"
    embedded_dir: Path = Path("var/postgres")
    embedded_port: int = 0  # 0: pick a free loopback port at start
    name: str = "portfolio_engine"
    batch_max_rows: int = 5000
    batch_max_delay_ms: float = 50.0
    batch_linger_ms: float = (
        4.0  # under load (10,000 rows/s and more) a batch goes once its oldest row is this old
    )
    # Under load (10,000 rows/s and more) greeks_latest is upserted at most this often; 0: every batch.
    latest_interval_ms: float = 100.0
    buffer_max_rows: int = 100_000
    spool_dir: Path = Path("var/spool")
    spool_max_bytes: int = 1 << 30
    retention_days: int = 30
    partitions_ahead_days: int = 3


@dataclass(frozen=True, slots=True)
class IbkrSettings:
    gateway_url: str | None = None  # IBKR_GATEWAY_URL; set means live (your Client Portal gateway)
    accounts: tuple[str, ...] = ()  # empty: every account the gateway reports
    ca_file: Path | None = None
    verify_tls: bool = True
    session_cookie: Secret | None = None  # IBKR_SESSION: the gateway's `api` cookie, if already known
    ws_url: str | None = None  # IBKR_WS_URL: overrides the WebSocket URL derived from gateway_url
    tic_interval_s: float = 60.0  # `tic` on the socket (the gateway wants one at least every minute)
    tickle_interval_s: float = 60.0  # POST /tickle (session keepalive)
    resubscribe_s: float = 540.0  # re-send each smd before the gateway ends it after 10 minutes
    hb_timeout_s: float = 30.0  # no `system` heartbeat (every 10 s) this long: the socket is stale
    positions_refresh_s: float = 60.0
    max_subscriptions: int = 100  # market data lines (the minimum an account has)
    iv_scale: str = "auto"  # field 7633: "auto", "percent" or "fraction" (normalize.ibkr.IvScale)

    @property
    def live(self) -> bool:
        return self.gateway_url is not None

    @property
    def base_url(self) -> str | None:
        """The gateway base without a trailing ``/v1/api``: ``https://localhost:5000``."""
        if self.gateway_url is None:
            return None
        base = self.gateway_url.rstrip("/")
        return base[: -len("/v1/api")] if base.endswith("/v1/api") else base

    @property
    def rest_url(self) -> str | None:
        """``{base}/v1/api``."""
        return None if self.base_url is None else self.base_url + "/v1/api"

    @property
    def websocket_url(self) -> str | None:
        """``IBKR_WS_URL``, else ``wss://host/v1/api/ws`` (``ws://`` for an ``http://`` gateway)."""
        if self.ws_url is not None:
            return self.ws_url
        if self.base_url is None:
            return None
        scheme, sep, rest = self.base_url.partition("://")
        return ("wss" if scheme == "https" else "ws") + sep + rest + "/v1/api/ws"


@dataclass(frozen=True, slots=True)
class TastytradeSettings:
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    api_url: str = "https://api.tastyworks.com"
    accounts: tuple[str, ...] = ()  # empty: every open account
    keepalive_s: float = 30.0  # TT_KEEPALIVE_S: DXLink KEEPALIVE after this long without sending
    stale_s: float = 60.0  # TT_STALE_S: nothing from the server this long -> reconnect
    aggregation_s: float = 0.1  # TT_AGGREGATION_S: DXLink acceptAggregationPeriod
    positions_refresh_s: float = 60.0  # TT_POSITIONS_REFRESH_S
    handshake_timeout_s: float = 10.0  # TT_HANDSHAKE_TIMEOUT_S: socket open to feed ready

    @property
    def live(self) -> bool:
        return self.client_secret is not None and self.refresh_token is not None


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    seed: int = 42
    rate_hz: float = 2.0  # updates per contract per second
    positions: int = 0  # 0: the default book; N: scale each broker's book to about N contracts


@dataclass(frozen=True, slots=True)
class Settings:
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.JSON
    # the asyncio event loop: "asyncio" (the standard library's) or "uvloop" (libuv, the uvloop
    # extra: 5-8 % less engine CPU a tick, a slightly longer tail at 2,000 ticks/s; README)
    event_loop: str = "asyncio"
    var_dir: Path = Path("var")
    status_file: Path = Path("var/status.json")
    status_interval_s: float = 1.0
    shutdown_timeout_s: float = 10.0
    simulate: bool = False
    brokers: tuple[str, ...] = ("ibkr", "tastytrade")
    risk_free_rate: float = 0.04  # fallback (model) Greeks: continuously compounded, a fraction
    restart: RestartSettings = field(default_factory=RestartSettings)
    channels: ChannelSettings = field(default_factory=ChannelSettings)
    db: DatabaseSettings = field(default_factory=DatabaseSettings)
    ibkr: IbkrSettings = field(default_factory=IbkrSettings)
    tastytrade: TastytradeSettings = field(default_factory=TastytradeSettings)
    sim: SimulatorSettings = field(default_factory=SimulatorSettings)

    def broker_mode(self, broker: str) -> str:
        """``live`` when the broker has credentials and simulation is not forced, else ``simulated``."""
        if self.simulate:
            return "simulated"
        live = {"ibkr": self.ibkr.live, "tastytrade": self.tastytrade.live}.get(broker, False)
        return "live" if live else "simulated"

    @property
    def mode(self) -> str:
        """``live`` only when every enabled broker is live: any simulated data makes it ``simulated``."""
        live = all(self.broker_mode(b) == "live" for b in self.brokers)
        return "live" if live else "simulated"
