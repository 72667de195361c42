from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The supervisor is plain anyio: every test here runs on both backends."""
    return str(request.param)
