"""Shared test configuration.

``anyio_backend`` defaults to asyncio (asyncpg and websockets need it); tests of plain-anyio code
(supervisor, normalizer) override it to run on asyncio and trio.

``tmp_path`` is a fresh directory under the system temp dir rather than under pytest's basetemp:
at every session start pytest resets ``/tmp/pytest-of-<user>`` to mode 0700, which (run as root)
locks the embedded server's own user out of a data directory inside it whenever another pytest
session starts meanwhile.

Hypothesis runs derandomized (the same examples every run, no example database) so the suite is
deterministic; ``HYPOTHESIS_PROFILE=explore`` searches new random examples instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A fresh private directory, removed after the test (see the module docstring)."""
    path = Path(tempfile.mkdtemp(prefix="greeks-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
