"""Sans-IO JT/T 808 codec: bytes in, typed messages out, bytes back.

This package never touches sockets, threads or the clock.
"""

from __future__ import annotations

from protocol import messages as messages
from protocol.codec import (
    Frame,
    Packet,
    StreamDecoder,
    decode,
    decode_body,
    decode_frame,
    encode,
    encode_raw,
    encode_split,
    parse_frame,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.header import Edition, Header

__all__ = [
    "Edition",
    "Frame",
    "Header",
    "LocalProtocolError",
    "Packet",
    "ProtocolError",
    "RemoteProtocolError",
    "StreamDecoder",
    "decode",
    "decode_body",
    "decode_frame",
    "encode",
    "encode_raw",
    "encode_split",
    "messages",
    "parse_frame",
]
