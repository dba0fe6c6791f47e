"""pgoutput, the logical decoding plugin built into Postgres: bytes → messages.

This package does no I/O. It reads protocol versions 1 to 4, text and
binary tuple data. See :func:`decode`.
"""

from .decoder import Decoder, decode, read_tuple
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all

__all__ = ["Decoder", "decode", "read_tuple", *_messages_all]
