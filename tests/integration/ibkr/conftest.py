from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event logged during the test (actor and simulator), as dicts."""
    structlog.reset_defaults()
    with capture_logs() as entries:
        yield entries
