"""Terminal management: replies, heartbeat, registration, authentication (2019 8.1-8.9)."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, Self

from construct import Construct, If, Struct, this

from protocol.errors import LocalProtocolError
from protocol.fields import BYTE, WORD, FixedText, GreedyText, PrefixedText
from protocol.header import Edition
from protocol.messages.base import Message, register

_GENERAL_RESPONSE = Struct(
    "reply_serial" / WORD,
    "reply_msg_id" / WORD,
    "result" / BYTE,
)


# Every stored report is answered with a general response, so its body is packed with struct;
# tests/test_messages_fastpath.py checks it against _GENERAL_RESPONSE.
_GENERAL_RESPONSE_STRUCT = struct.Struct(">HHB")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _GeneralResponse(Message):
    reply_serial: int
    reply_msg_id: int
    result: int

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        try:
            return _GENERAL_RESPONSE_STRUCT.pack(self.reply_serial, self.reply_msg_id, self.result)
        except struct.error as exc:
            raise LocalProtocolError(f"0x{self.MSG_ID:04x}: {exc}") from exc


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalGeneralResponse(_GeneralResponse):
    """0x0001 terminal general response (8.1, table 4): 0 ok, 1 failure, 2 bad message,
    3 not supported."""

    MSG_ID: ClassVar[int] = 0x0001
    SCHEMA: ClassVar[Construct] = _GENERAL_RESPONSE


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlatformGeneralResponse(_GeneralResponse):
    """0x8001 platform general response (8.2, table 5): 0 ok, 1 failure, 2 bad message,
    3 not supported, 4 alarm confirmed."""

    MSG_ID: ClassVar[int] = 0x8001
    SCHEMA: ClassVar[Construct] = _GENERAL_RESPONSE


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """0x0002 terminal heartbeat (8.3): empty body."""

    MSG_ID: ClassVar[int] = 0x0002
    SCHEMA: ClassVar[Construct] = Struct()

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        # What the empty schema gives for any body (bytes after it are ignored, as for every
        # schema), without a construct parse: terminals send one of these every few seconds.
        return cls()


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalLogout(Message):
    """0x0003 terminal logout (8.6, 2013+): empty body."""

    MSG_ID: ClassVar[int] = 0x0003
    SCHEMA: ClassVar[Construct] = Struct()

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        # What the empty schema gives for any body (bytes after it are ignored, as for every
        # schema), without a construct parse: terminals send one of these every few seconds.
        return cls()


# Table 7 (2013) and table 8 (2019): terminal registration.  2011 has an 8-byte model.
_REGISTER_WIDTHS = {
    Edition.V2011: (5, 8, 7),
    Edition.V2013: (5, 20, 7),
    Edition.V2019: (11, 30, 30),
}


def _register_schema(maker: int, model: int, terminal_id: int) -> Construct:
    return Struct(
        "province" / WORD,  # GB/T 2260 province code
        "city" / WORD,  # GB/T 2260 city/county code
        "manufacturer" / FixedText(maker),
        "model" / FixedText(model),
        "terminal_id" / FixedText(terminal_id),
        "plate_color" / BYTE,  # JT/T 697.7; 0 = not registered, plate then holds the VIN
        "plate" / GreedyText,
    )


_REGISTER_SCHEMAS = {edition: _register_schema(*w) for edition, w in _REGISTER_WIDTHS.items()}
_REGISTER_FIXED = {edition: 4 + sum(w) + 1 for edition, w in _REGISTER_WIDTHS.items()}
# JT/T 697.7 plate colours (1 blue, 2 yellow, 3 black, 4 white, 5 green; 2019 adds 9 other).
_PLATE_COLORS = frozenset({0, 1, 2, 3, 4, 5, 9})


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRegister(Message):
    """0x0100 terminal registration (8.5).

    2011 and 2013 headers are identical; the 2011 body has a model of 8 bytes instead of 20.
    :meth:`refine_edition` tells them apart by where a plausible plate colour byte sits.
    """

    MSG_ID: ClassVar[int] = 0x0100
    province: int
    city: int
    manufacturer: str
    model: str
    terminal_id: str
    plate_color: int
    plate: str

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        return _REGISTER_SCHEMAS[edition]

    @classmethod
    def refine_edition(cls, body: bytes, edition: Edition) -> Edition:
        if edition is Edition.V2019:
            return edition
        fixed_2013 = _REGISTER_FIXED[Edition.V2013]
        fixed_2011 = _REGISTER_FIXED[Edition.V2011]
        fits_2013 = len(body) >= fixed_2013 and body[fixed_2013 - 1] in _PLATE_COLORS
        fits_2011 = len(body) >= fixed_2011 and body[fixed_2011 - 1] in _PLATE_COLORS
        if fits_2011 and not fits_2013:
            return Edition.V2011
        return Edition.V2013


# Table 9: registration result.
REGISTER_OK = 0
REGISTER_VEHICLE_TAKEN = 1
REGISTER_VEHICLE_UNKNOWN = 2
REGISTER_TERMINAL_TAKEN = 3
REGISTER_TERMINAL_UNKNOWN = 4


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRegisterResponse(Message):
    """0x8100 registration response (8.6, table 9); the auth code follows only on success."""

    MSG_ID: ClassVar[int] = 0x8100
    SCHEMA: ClassVar[Construct] = Struct(
        "reply_serial" / WORD,
        "result" / BYTE,
        "auth_code" / If(this.result == REGISTER_OK, GreedyText),
    )
    reply_serial: int
    result: int
    auth_code: str | None = None


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalAuth(Message):
    """0x0102 terminal authentication (8.8, table 10).

    2011/2013: the body is the auth code.  2019: auth code with a length byte, IMEI BYTE[15]
    and software version BYTE[20].
    """

    MSG_ID: ClassVar[int] = 0x0102
    auth_code: str
    imei: str | None = None
    software_version: str | None = None

    SCHEMA_2013: ClassVar[Construct] = Struct("auth_code" / GreedyText)
    SCHEMA_2019: ClassVar[Construct] = Struct(
        "auth_code" / PrefixedText(BYTE),
        "imei" / FixedText(15),
        "software_version" / FixedText(20),
    )

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        return cls.SCHEMA_2019 if edition is Edition.V2019 else cls.SCHEMA_2013

    @classmethod
    def from_parsed(cls, parsed: Any) -> TerminalAuth:
        return cls(
            auth_code=parsed.auth_code,
            imei=parsed.get("imei"),
            software_version=parsed.get("software_version"),
        )

    def to_build(self) -> dict[str, Any]:
        return {
            "auth_code": self.auth_code,
            "imei": self.imei or "",
            "software_version": self.software_version or "",
        }
