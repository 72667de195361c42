from collections.abc import Callable, Mapping, Sequence
from typing import Any

def apply_updates(
    instruments: dict[tuple[str, str], Any],
    events: list[Any],
    start: int,
    rows: list[Any],
    update_type: type[tuple[Any, ...]],
    row_type: type[tuple[Any, ...]],
    broker_src: str,
    model_src: str,
    /,
) -> tuple[int, int]: ...
def compact_events(
    cls: type[tuple[Any, ...]],
    values: list[Any],
    width: int,
    symbol_col: int,
    numeric_cols: Sequence[int],
    tail_cols: Sequence[int],
    positions: Sequence[int],
    /,
) -> list[Any] | None: ...
def map_events(
    update_type: type[tuple[Any, ...]],
    broker: str,
    events: list[Any],
    symbols: Mapping[str, str],
    received_ts: float,
    time_a: int,
    time_b: int,
    event_time: int,
    seq: int,
    value_columns: tuple[int, ...],
    value_keys: tuple[str, ...],
    append: Callable[[Any], object],
    /,
) -> int | None: ...
