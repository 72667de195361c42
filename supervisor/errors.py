"""Error hierarchy the supervisor understands.

- EngineError
  - TransientError: the actor failed but a restart may help (network, database away).
  - FatalError: stop the whole tree cleanly and exit non-zero (bad config, schema mismatch).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class TransientError(EngineError):
    """A failure a restart may cure."""


class FatalError(EngineError):
    """A failure no restart can cure: the supervisor stops the tree and the process exits non-zero."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
