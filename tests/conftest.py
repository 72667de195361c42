"""Shared test configuration.

``anyio_backend`` defaults to asyncio (asyncpg and websockets need it); tests of plain-anyio code
(supervisor, normalizer) override it to run on asyncio and trio.

Hypothesis runs derandomized (the same examples every run, no example database) so the suite is
deterministic; ``HYPOTHESIS_PROFILE=explore`` searches new random examples instead.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
