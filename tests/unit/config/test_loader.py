"""Every setting's parsing and validation message; secrets never in repr."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from config.loader import VARIABLES, ConfigError, load_env, load_settings, parse_size
from config.settings import LogFormat, Secret

# (variable, bad value, the exact one-line message)
BAD_VALUES = [
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL (got 'LOUD'): expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT (got 'xml'): expected one of json, console"),
    ("STATUS_INTERVAL_S", "abc", "STATUS_INTERVAL_S (got 'abc'): expected a number > 0 and <= 5"),
    ("STATUS_INTERVAL_S", "0", "STATUS_INTERVAL_S (got '0'): expected a number > 0 and <= 5"),
    ("STATUS_INTERVAL_S", "nan", "STATUS_INTERVAL_S (got 'nan'): expected a number > 0 and <= 5"),
    ("SHUTDOWN_TIMEOUT_S", "-1", "SHUTDOWN_TIMEOUT_S (got '-1'): expected a number > 0"),
    ("SIMULATE", "maybe", "SIMULATE (got 'maybe'): expected true or false (1/0, yes/no, on/off)"),
    (
        "BROKERS",
        "ibkr,schwab",
        "BROKERS (got 'schwab'): expected comma-separated brokers among ibkr, tastytrade",
    ),
    ("BROKERS", "ibkr,,", "BROKERS (got 'ibkr,,'): expected comma-separated brokers among ibkr, tastytrade"),
    ("RESTART_BACKOFF_INITIAL_S", "x", "RESTART_BACKOFF_INITIAL_S (got 'x'): expected a number >= 0"),
    ("RESTART_BACKOFF_MAX_S", "0", "RESTART_BACKOFF_MAX_S (got '0'): expected a number > 0"),
    ("RESTART_MAX", "1.5", "RESTART_MAX (got '1.5'): expected an integer >= 0"),
    ("RESTART_PERIOD_S", "inf", "RESTART_PERIOD_S (got 'inf'): expected a number > 0"),
    ("CHANNEL_RAW_CAPACITY", "0", "CHANNEL_RAW_CAPACITY (got '0'): expected an integer >= 1"),
    ("CHANNEL_ROWS_CAPACITY", "many", "CHANNEL_ROWS_CAPACITY (got 'many'): expected an integer >= 1"),
    ("CONFLATE_AFTER_ROWS", "-1", "CONFLATE_AFTER_ROWS (got '-1'): expected an integer >= 0"),
    (
        "DATABASE_URL",
        "mysql://me:hunter2@db/x",
        "DATABASE_URL: expected a PostgreSQL URL such as postgresql://user:password@host:5432/dbname "
        "(value not shown)",
    ),
    (
        "DATABASE_URL",
        "postgresql://me:hunter2@db:99999/x",
        "DATABASE_URL: expected a PostgreSQL URL such as postgresql://user:password@host:5432/dbname "
        "(value not shown)",
    ),
    ("EMBEDDED_PG_PORT", "70000", "EMBEDDED_PG_PORT (got '70000'): expected an integer >= 0 and <= 65535"),
    (
        "DB_NAME",
        "drop table;",
        "DB_NAME (got 'drop table;'): expected a PostgreSQL identifier (letters, digits, _)",
    ),
    ("BATCH_MAX_ROWS", "0", "BATCH_MAX_ROWS (got '0'): expected an integer >= 1"),
    ("BATCH_MAX_DELAY_MS", "-5", "BATCH_MAX_DELAY_MS (got '-5'): expected a number >= 0"),
    ("BATCH_LINGER_MS", "2000", "BATCH_LINGER_MS (got '2000'): expected a number >= 0 and <= 1000"),
    ("LATEST_INTERVAL_MS", "-1", "LATEST_INTERVAL_MS (got '-1'): expected a number >= 0 and <= 60000"),
    ("BUFFER_MAX_ROWS", "-1", "BUFFER_MAX_ROWS (got '-1'): expected an integer >= 0"),
    (
        "SPOOL_MAX_BYTES",
        "12Q",
        "SPOOL_MAX_BYTES (got '12Q'): expected a size in bytes > 0, optionally with K, M, G or T",
    ),
    ("RETENTION_DAYS", "0", "RETENTION_DAYS (got '0'): expected an integer >= 1"),
    ("PARTITIONS_AHEAD_DAYS", "x", "PARTITIONS_AHEAD_DAYS (got 'x'): expected an integer >= 1"),
    (
        "IBKR_GATEWAY_URL",
        "localhost:5000",
        "IBKR_GATEWAY_URL (got 'localhost:5000'): expected an http(s) URL such as https://localhost:5000",
    ),
    ("IBKR_ACCOUNTS", "U1,U1", "IBKR_ACCOUNTS (got 'U1,U1'): expected comma-separated names"),
    (
        "IBKR_CA_FILE",
        "/nonexistent/ca.pem",
        "IBKR_CA_FILE (got '/nonexistent/ca.pem'): expected the path of an existing CA file",
    ),
    (
        "IBKR_VERIFY_TLS",
        "sometimes",
        "IBKR_VERIFY_TLS (got 'sometimes'): expected true or false (1/0, yes/no, on/off)",
    ),
    (
        "IBKR_WS_URL",
        "https://localhost:5000/v1/api/ws",
        "IBKR_WS_URL (got 'https://localhost:5000/v1/api/ws'): expected a ws(s) URL such as "
        "wss://localhost:5000/v1/api/ws",
    ),
    ("IBKR_TIC_INTERVAL_S", "61", "IBKR_TIC_INTERVAL_S (got '61'): expected a number > 0 and <= 60"),
    ("IBKR_TIC_INTERVAL_S", "0", "IBKR_TIC_INTERVAL_S (got '0'): expected a number > 0 and <= 60"),
    ("IBKR_TICKLE_INTERVAL_S", "-1", "IBKR_TICKLE_INTERVAL_S (got '-1'): expected a number > 0"),
    ("IBKR_RESUBSCRIBE_S", "900", "IBKR_RESUBSCRIBE_S (got '900'): expected a number > 0 and <= 600"),
    ("IBKR_HB_TIMEOUT_S", "soon", "IBKR_HB_TIMEOUT_S (got 'soon'): expected a number > 0"),
    ("IBKR_POSITIONS_REFRESH_S", "0", "IBKR_POSITIONS_REFRESH_S (got '0'): expected a number > 0"),
    ("IBKR_MAX_SUBSCRIPTIONS", "0", "IBKR_MAX_SUBSCRIPTIONS (got '0'): expected an integer >= 1"),
    (
        "IBKR_IV_SCALE",
        "basis_points",
        "IBKR_IV_SCALE (got 'basis_points'): expected one of auto, percent, fraction",
    ),
    ("TT_API_URL", "ftp://x", "TT_API_URL (got 'ftp://x'): expected an http(s) URL"),
    ("TT_ACCOUNTS", ",", "TT_ACCOUNTS (got ','): expected comma-separated names"),
    ("TT_CLIENT_SECRET", "s3cret", "TT_REFRESH_TOKEN: expected to be set together with TT_CLIENT_SECRET"),
    ("TT_REFRESH_TOKEN", "r3fresh", "TT_CLIENT_SECRET: expected to be set together with TT_REFRESH_TOKEN"),
    ("TT_KEEPALIVE_S", "60", "TT_KEEPALIVE_S (got '60'): expected a number > 0 and <= 59"),
    ("TT_KEEPALIVE_S", "0", "TT_KEEPALIVE_S (got '0'): expected a number > 0 and <= 59"),
    ("TT_STALE_S", "-1", "TT_STALE_S (got '-1'): expected a number > 0"),
    ("TT_STALE_S", "soon", "TT_STALE_S (got 'soon'): expected a number > 0"),
    ("TT_AGGREGATION_S", "11", "TT_AGGREGATION_S (got '11'): expected a number >= 0 and <= 10"),
    ("TT_AGGREGATION_S", "-0.1", "TT_AGGREGATION_S (got '-0.1'): expected a number >= 0 and <= 10"),
    ("TT_POSITIONS_REFRESH_S", "0", "TT_POSITIONS_REFRESH_S (got '0'): expected a number > 0"),
    ("TT_HANDSHAKE_TIMEOUT_S", "nan", "TT_HANDSHAKE_TIMEOUT_S (got 'nan'): expected a number > 0"),
    ("RISK_FREE_RATE", "4%", "RISK_FREE_RATE (got '4%'): expected a number >= -0.2 and <= 1"),
    ("SIM_SEED", "abc", "SIM_SEED (got 'abc'): expected an integer >= 0"),
    ("SIM_RATE_HZ", "5000", "SIM_RATE_HZ (got '5000'): expected a number > 0 and <= 1000"),
    ("SIM_POSITIONS", "-3", "SIM_POSITIONS (got '-3'): expected an integer >= 0"),
    ("EVENT_LOOP", "trio", "EVENT_LOOP (got 'trio'): expected one of asyncio, uvloop"),
]


@pytest.mark.parametrize(
    ("variable", "value", "message"), BAD_VALUES, ids=[f"{v}={x}" for v, x, _ in BAD_VALUES]
)
def test_bad_value_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value})
    assert str(info.value) == "config error: " + message
    assert "\n" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_every_documented_variable_has_a_validation_case_or_is_free_text() -> None:
    free_text = {"VAR_DIR", "STATUS_FILE", "EMBEDDED_PG_DIR", "SPOOL_DIR", "IBKR_SESSION"}
    tested = {v for v, _, _ in BAD_VALUES}
    assert set(VARIABLES) == tested | free_text


def test_defaults() -> None:
    s = load_settings({})
    assert s.log_level == "INFO"
    assert s.log_format is LogFormat.JSON
    assert s.status_file == Path("var/status.json")
    assert s.status_interval_s == 1.0
    assert s.db.url is None
    assert s.db.embedded_dir == Path("var/postgres")
    assert s.db.spool_dir == Path("var/spool")
    assert s.db.latest_interval_ms == 100.0
    assert s.brokers == ("ibkr", "tastytrade")
    assert s.mode == "simulated"
    tt = s.tastytrade
    assert (tt.keepalive_s, tt.stale_s, tt.aggregation_s, tt.positions_refresh_s) == (30, 60, 0.1, 60)
    assert tt.handshake_timeout_s == 10
    shortened = load_settings({"TT_KEEPALIVE_S": "0.2", "TT_AGGREGATION_S": "0", "TT_STALE_S": "1.5"})
    assert (shortened.tastytrade.keepalive_s, shortened.tastytrade.aggregation_s) == (0.2, 0.0)
    assert shortened.tastytrade.stale_s == 1.5


def test_values_parsed() -> None:
    s = load_settings(
        {
            "VAR_DIR": "/tmp/x",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "CONSOLE",
            "STATUS_INTERVAL_S": "0.25",
            "SIMULATE": "yes",
            "BROKERS": "tastytrade",
            "SPOOL_MAX_BYTES": "512M",
            "DATABASE_URL": "postgresql://me:hunter2@db.example:5433/greeks",
            "IBKR_ACCOUNTS": "U1, U2",
            "TT_CLIENT_SECRET": "s3cret",
            "TT_REFRESH_TOKEN": "r3fresh",
            "SIM_RATE_HZ": "1000",
        }
    )
    assert s.log_level == "DEBUG"
    assert s.log_format is LogFormat.CONSOLE
    assert s.status_file == Path("/tmp/x/status.json")
    assert s.db.embedded_dir == Path("/tmp/x/postgres")
    assert s.status_interval_s == 0.25
    assert s.simulate is True
    assert s.brokers == ("tastytrade",)
    assert s.db.spool_max_bytes == 512 << 20
    assert s.db.url == Secret("postgresql://me:hunter2@db.example:5433/greeks")
    assert s.ibkr.accounts == ("U1", "U2")
    assert s.tastytrade.live
    assert s.broker_mode("tastytrade") == "simulated"  # SIMULATE wins over credentials
    assert s.sim.rate_hz == 1000


def test_mode_is_live_only_when_every_broker_is_live() -> None:
    creds = {"TT_CLIENT_SECRET": "s", "TT_REFRESH_TOKEN": "r"}
    assert load_settings({**creds, "BROKERS": "tastytrade"}).mode == "live"
    assert load_settings(creds).mode == "simulated"  # ibkr has no gateway configured
    both = load_settings({**creds, "IBKR_GATEWAY_URL": "https://localhost:5000"})
    assert both.mode == "live"


def test_secrets_never_in_repr() -> None:
    s = load_settings(
        {
            "DATABASE_URL": "postgresql://me:hunter2@db/x",
            "TT_CLIENT_SECRET": "s3cret-value",
            "TT_REFRESH_TOKEN": "r3fresh-value",
            "IBKR_SESSION": "cookie-value",
        }
    )
    text = repr(s) + str(s)
    for secret in ("hunter2", "s3cret-value", "r3fresh-value", "cookie-value"):
        assert secret not in text
    assert s.tastytrade.client_secret is not None
    assert s.tastytrade.client_secret.get() == "s3cret-value"


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("STATUS_INTERVAL_S=5\nLOG_LEVEL=DEBUG\n# comment\nSIM_SEED='7'\n")
    env = load_env(env_file, environ={"LOG_LEVEL": "WARNING"})
    s = load_settings(env)
    assert s.status_interval_s == 5
    assert s.log_level == "WARNING"
    assert s.sim.seed == 7
    assert load_env(tmp_path / "missing.env", environ={}) == {}


@pytest.mark.parametrize(
    ("text", "size"), [("1", 1), ("10K", 10240), ("2m", 2 << 20), ("1GiB", 1 << 30), ("3 G", 3 << 30)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_event_loop_is_asyncio_unless_uvloop_is_asked_for_and_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings({}).event_loop == "asyncio"
    assert load_settings({"EVENT_LOOP": "UVloop"}).event_loop == "uvloop"  # installed with the dev extra
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as without the uvloop extra
    assert load_settings({"EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError) as info:
        load_settings({"EVENT_LOOP": "uvloop"})
    assert str(info.value) == (
        "config error: EVENT_LOOP (got 'uvloop'): expected asyncio, or uvloop once installed"
        " (pip install '.[uvloop]')"
    )


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    missing = [name for name in VARIABLES if f"`{name}`" not in readme]
    assert missing == []


def test_simulate_overrides_live_credentials() -> None:
    creds = {"TT_CLIENT_SECRET": "s", "TT_REFRESH_TOKEN": "r", "IBKR_GATEWAY_URL": "https://localhost:5000"}
    assert load_settings(creds).mode == "live"
    assert load_settings({**creds, "SIMULATE": "true"}).mode == "simulated"
    assert load_settings({**creds, "SIMULATE": "true"}).broker_mode("tastytrade") == "simulated"
