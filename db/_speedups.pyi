from collections.abc import Sequence
from typing import Any

def copy_rows(columns: Sequence[Sequence[Any]], start: int, end: int, /) -> bytes | None: ...
