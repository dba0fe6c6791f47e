from typing import Any

from .messages import TupleData

def setup(
    toast_marker: Any, tuple_type: type[TupleData], decode_error: type[Exception]
) -> None: ...
def read_tuple(data: bytes, pos: int) -> tuple[TupleData, int]: ...
