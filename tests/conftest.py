"""Shared test configuration.

``anyio_backend`` defaults to asyncio (asyncpg and websockets need it); tests of plain-anyio code
(supervisor, normalizer) override it with ``both_backends`` to run on asyncio and trio.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
