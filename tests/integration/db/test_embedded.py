"""The embedded server: first start, reuse across runs, stale lock files, orphan servers."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import anyio
import asyncpg
import pytest

from config.settings import DatabaseSettings, Secret
from db import embedded
from db.embedded import EmbeddedError, EmbeddedServer, database, free_port, keep_alive, open_database

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def test_database_url_starts_nothing(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=Secret("postgresql://u@db.example:5432/x"), embedded_dir=tmp_path / "pg")

    async with database(settings) as dsn:
        assert dsn == "postgresql://u@db.example:5432/x"
    assert not (tmp_path / "pg").exists()


async def test_embedded_lifecycle(tmp_path: Path) -> None:
    settings = DatabaseSettings(embedded_dir=tmp_path / "pg", name="portfolio_engine")
    pgdata = settings.embedded_dir

    # First start: cluster and database created.
    with anyio.fail_after(50):
        async with database(settings) as dsn:
            assert dsn.endswith("/portfolio_engine")
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            finally:
                await conn.close()
        assert not EmbeddedServer(pgdata).is_running()  # stopped on exit

        # A stale postmaster.pid whose PID now belongs to another program (this one).
        (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n0\n1\n\n\n\nready\n")

        # Second start: same data, same database; durable commits, WAL segments not zero-filled
        # (zero-filling a new one inside a commit stalled it ~50 ms at high rates), backends'
        # writes flushed as they go (a 30 s pile of dirty pages stalled commits ~100 ms).
        async with database(settings) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT v FROM kept") == 42
                assert await conn.fetchval("SHOW wal_init_zero") == "off"
                # evicted data pages handed to the kernel's write-back as they are written
                assert await conn.fetchval("SHOW backend_flush_after") == "256kB"
                assert await conn.fetchval("SHOW fsync") == "on"
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
            finally:
                await conn.close()

        # A killed run leaves its postmaster running: the next start adopts it, and stops it.
        orphan = EmbeddedServer(pgdata)
        await anyio.to_thread.run_sync(orphan.start)
        async with database(settings) as dsn:
            assert f":{orphan.port}/" in dsn
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT v FROM kept") == 42
            finally:
                await conn.close()
        assert not orphan.is_running()


async def test_password_is_required_and_kept_in_a_private_file(tmp_path: Path) -> None:
    settings = DatabaseSettings(embedded_dir=tmp_path / "pg", name="portfolio_engine")
    with anyio.fail_after(50):
        async with open_database(settings) as db:
            assert db.server is not None
            pgpass = tmp_path / "pg.pgpass"
            assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600
            password = db.server.password
            assert password in pgpass.read_text()
            assert password not in str(db.describe())
            assert db.describe() == {
                "host": "127.0.0.1",
                "port": db.server.port,
                "name": "portfolio_engine",
                "embedded": True,
            }
            conn = await asyncpg.connect(db.dsn)
            await conn.close()
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(db.server.dsn_without_password("portfolio_engine"))
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(
                    db.server.dsn_without_password().replace("postgres@", "postgres:wrong@")
                )
            assert not db.server.trusts_local_connections()


async def test_a_data_directory_that_trusted_local_connections_is_migrated(tmp_path: Path) -> None:
    """A data directory from before passwords (``--auth=trust``, no password file) gets one."""
    pgdata = tmp_path / "pg"
    old = EmbeddedServer(pgdata)
    await anyio.to_thread.run_sync(old._prepare_dirs)
    (pgdata / "log").rmdir()
    old._run("initdb", ["-D", str(pgdata), "-U", "postgres", "--auth=trust", "--locale=C", "--no-sync"], 120)
    (pgdata / "log").mkdir()
    await anyio.to_thread.run_sync(old._prepare_dirs)
    assert old.trusts_local_connections()
    assert not old.password_file.exists()

    settings = DatabaseSettings(embedded_dir=pgdata, name="portfolio_engine")
    with anyio.fail_after(50):
        async with open_database(settings) as db:
            assert db.server is not None
            assert not db.server.trusts_local_connections()
            conn = await asyncpg.connect(db.dsn)
            await conn.close()
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(db.server.dsn_without_password("portfolio_engine"))
        # ...and stays migrated across restarts.
        async with open_database(settings) as db:
            conn = await asyncpg.connect(db.dsn)
            await conn.close()


async def test_a_missing_password_file_for_a_protected_directory_is_a_clear_error(tmp_path: Path) -> None:
    settings = DatabaseSettings(embedded_dir=tmp_path / "pg")
    with anyio.fail_after(50):
        async with open_database(settings):
            pass
    (tmp_path / "pg.pgpass").unlink()
    with pytest.raises(EmbeddedError, match="pg.pgpass is missing"):
        async with open_database(settings):
            pass


async def test_keep_alive_restarts_a_killed_server_on_the_same_port(tmp_path: Path) -> None:
    settings = DatabaseSettings(embedded_dir=tmp_path / "pg", name="portfolio_engine")
    events: list[str] = []
    restarted = anyio.Event()

    def on_event(name: str, fields: dict[str, object]) -> None:
        events.append(name)
        if name == "embedded_db_restarted":
            restarted.set()

    with anyio.fail_after(60):
        async with open_database(settings) as db, anyio.create_task_group() as tg:
            assert db.server is not None
            tg.start_soon(lambda: keep_alive(db.server, interval_s=0.1, on_event=on_event))  # type: ignore[arg-type]
            pid = int((db.server.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            await restarted.wait()
            conn = await asyncpg.connect(db.dsn)  # the same DSN works again
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            tg.cancel_scope.cancel()
    assert events[:1] == ["embedded_db_down"]
    assert "embedded_db_restarted" in events


async def test_a_chosen_port_taken_before_the_server_binds_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: a port is free when chosen and taken (here: held listening) when the server binds.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = int(taken.getsockname()[1])
        choices = iter([held])  # the first choice is the taken port, then the kernel's
        monkeypatch.setattr(
            embedded, "free_port", lambda host="127.0.0.1": next(choices, 0) or free_port(host)
        )
        server = EmbeddedServer(tmp_path / "pg", fsync=False)
        try:
            server.start()
            assert server.port != held
            assert server.is_running()
            assert "Address already in use" in server.log_file.read_text()
            conn = await asyncpg.connect(server.dsn())
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        finally:
            server.stop()

        # A port asked for is kept: taken, it is an error naming the cause, not another port.
        pinned = EmbeddedServer(tmp_path / "pg", held, fsync=False)
        with pytest.raises(EmbeddedError, match="Address already in use"):
            pinned.start()
        assert not pinned.is_running()


def test_a_picked_port_is_kept_for_restarts(tmp_path: Path) -> None:
    # Every DSN handed out names the port: a restart (keep_alive's, an outage test's) must reuse it.
    server = EmbeddedServer(tmp_path / "pg", fsync=False)
    server.start()
    try:
        first = server.port
        assert first != 0
        server.stop()
        server.start()
        assert server.port == first
        assert server.is_running()
    finally:
        server.stop()
