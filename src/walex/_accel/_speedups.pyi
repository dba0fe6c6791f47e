from collections.abc import Callable
from typing import Any

from ..pgoutput.messages import TupleData

def setup(
    toast_marker: Any, tuple_type: type[TupleData], decode_error: type[Exception]
) -> None: ...
def read_tuple(data: bytes, pos: int) -> tuple[TupleData, int]: ...
def setup_json(fast: Any, fast_error: type[Exception] | None, slow: Any) -> None: ...
def jsonb_loads(data: bytes) -> Any: ...
def json_loads(data: bytes | str) -> Any: ...
def setup_events(event: type, lsn: type, no_toast: frozenset[str]) -> None: ...
def row_event(frame: bytes, fast_map: dict[int, tuple[Any, ...]], txn: Any, seq: int) -> Any: ...
def row_events(
    frames: Any,
    fast_map: dict[int, tuple[Any, ...]],
    txn: Any,
    seq: int,
    events: list[Any],
    max_events: int,
    max_bytes: int,
    batch_bytes: int,
) -> tuple[int, int, int, int, int]: ...
def setup_wire(
    source: type,
    transaction: type,
    decimal: type,
    uuid: type,
    range: type,
    multirange: type,
    enum: type,
    ip_types: tuple[type, ...],
) -> None: ...
def encode_event(event: Any, fallback: Callable[[Any], Any]) -> bytes | None: ...
def setup_transactions(transaction: type, batch: type, pg_epoch: Any) -> None: ...
def run_transactions(
    frames: Any,
    fast_map: dict[int, tuple[Any, ...]],
    ready: Any,
    state: list[Any],
    max_events: int,
    max_bytes: int,
    max_ready: int,
) -> int: ...
