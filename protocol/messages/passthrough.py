"""Data passthrough, compression and RSA key messages (JT/T 808-2019 8.60-8.64).

Clause numbers follow the 2019 edition: 0x8900 "数据下行透传" 8.60, 0x0900 "数据上行透传" 8.61,
0x0901 "数据压缩上报" 8.62, 0x8A00 "平台RSA公钥" 8.63, 0x0A00 "终端RSA公钥" 8.64.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar

from construct import Bytes, Construct, GreedyBytes, Prefixed, Struct

from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import BYTE, DWORD
from protocol.messages.base import Message, register

# Passthrough message types (8.61).
PASSTHROUGH_GNSS_DETAIL = 0x00  # detailed GNSS module positioning data
PASSTHROUGH_IC_CARD = 0x0B  # road transport certificate IC card information
PASSTHROUGH_SERIAL_1 = 0x41
PASSTHROUGH_SERIAL_2 = 0x42
PASSTHROUGH_USER_FIRST = 0xF0  # 0xF0-0xFF are user defined
PASSTHROUGH_USER_LAST = 0xFF

_PASSTHROUGH = Struct("passthrough_type" / BYTE, "content" / GreedyBytes)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UplinkPassthrough(Message):
    """0x0900 uplink data passthrough (8.61): a type BYTE and content bytes as sent."""

    MSG_ID: ClassVar[int] = 0x0900
    SCHEMA: ClassVar[Construct] = _PASSTHROUGH
    passthrough_type: int
    content: bytes = b""


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DownlinkPassthrough(Message):
    """0x8900 downlink data passthrough (8.60): same layout as 0x0900."""

    MSG_ID: ClassVar[int] = 0x8900
    SCHEMA: ClassVar[Construct] = _PASSTHROUGH
    passthrough_type: int
    content: bytes = b""


# gzip framing for zlib (RFC 1952): window bits 15 plus 16.
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompressedReport(Message):
    """0x0901 data compression report (8.62): a DWORD length and a GZIP-compressed message.

    ``compressed`` is kept as sent (its length is derived when building); :meth:`decompress`
    inflates it under a caller-given cap, since a few hundred bytes of gzip can expand to
    gigabytes.
    """

    MSG_ID: ClassVar[int] = 0x0901
    SCHEMA: ClassVar[Construct] = Struct("compressed" / Prefixed(DWORD, GreedyBytes))
    compressed: bytes

    def decompress(self, max_size: int) -> bytes:
        """The inflated message, at most ``max_size`` bytes.

        Raises :class:`BodyDecodeError` when the data is not gzip, is cut short, or would
        inflate past ``max_size``; concatenated gzip members are joined, as gzip does.  Never
        holds more than ``max_size + 1`` bytes of output.
        """
        if max_size < 0:
            raise LocalProtocolError("max_size must not be negative")
        out = bytearray()
        data = self.compressed
        while True:
            inflater = zlib.decompressobj(_GZIP_WBITS)
            try:
                # max_length 0 would mean "no limit"; ours is always at least 1.
                out += inflater.decompress(data, max_size - len(out) + 1)
            except zlib.error as exc:
                raise BodyDecodeError(f"0x0901: not gzip data: {exc}") from exc
            if len(out) > max_size:
                raise BodyDecodeError(f"0x0901: inflates past the cap of {max_size} bytes")
            if not inflater.eof:
                raise BodyDecodeError("0x0901: gzip data is cut short")
            data = inflater.unused_data
            if not data:
                return bytes(out)


RSA_MODULUS_SIZE = 128  # BYTE[128]: a 1024-bit modulus


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlatformRsaKey(Message):
    """0x8A00 platform RSA public key (8.63): exponent ``e`` DWORD, modulus ``n`` BYTE[128]."""

    MSG_ID: ClassVar[int] = 0x8A00
    SCHEMA: ClassVar[Construct] = Struct("e" / DWORD, "n" / Bytes(RSA_MODULUS_SIZE))
    e: int
    n: bytes


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRsaKey(Message):
    """0x0A00 terminal RSA public key (8.64): exponent ``e`` DWORD, modulus ``n`` BYTE[128]."""

    MSG_ID: ClassVar[int] = 0x0A00
    SCHEMA: ClassVar[Construct] = PlatformRsaKey.SCHEMA
    e: int
    n: bytes


__all__ = [
    "CompressedReport",
    "DownlinkPassthrough",
    "PlatformRsaKey",
    "TerminalRsaKey",
    "UplinkPassthrough",
]
