"""db.copy.is_database_down: outages are retried, bad connection settings are not."""

from __future__ import annotations

import asyncpg
import pytest

from db.copy import is_configuration_error, is_database_down

pytestmark = pytest.mark.anyio


async def connect_error(dsn: str) -> BaseException:
    with pytest.raises(Exception) as info:
        await asyncpg.connect(dsn, timeout=2)
    return info.value


@pytest.mark.parametrize(
    "options",
    ["sslmode=verify-full&sslrootcert=/no/such/root.pem", "sslmode=bogus", "target_session_attrs=nope"],
)
async def test_bad_settings_are_not_an_outage(options: str) -> None:
    exc = await connect_error(f"postgresql://u:pw@127.0.0.1:1/db?{options}")
    assert is_configuration_error(exc)
    assert not is_database_down(exc)


async def test_missing_unix_socket_is_an_outage() -> None:
    # Also a FileNotFoundError, but the server is simply not running.
    exc = await connect_error("postgresql://u@/db?host=/no/such/socket/dir")
    assert isinstance(exc, FileNotFoundError)
    assert not is_configuration_error(exc)
    assert is_database_down(exc)
