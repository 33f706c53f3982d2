"""Terminal control, properties, upgrades, retransmission, server time and tracking.

JT/T 808-2019 8.4 (0x8003), the 2019-only server-time and terminal-retransmission messages
(0x0004, 0x8004, 0x0005) and link test (0x8204), 8.13-8.17 (0x8105, 0x8107, 0x0107, 0x8108,
0x0108), 8.19 (0x8201), 8.21 (0x8202) and 8.22 (0x8203).

Two places where the editions or the implementations in the field disagree:

* The retransmission requests 0x8003/0x0005 carry the packet count as a BYTE in 2011/2013 and
  as a WORD in 2019; several 2019 implementations still send a BYTE.  The two layouts always
  differ in body-length parity (3 + 2n bytes against 4 + 2n), so decoding picks the layout by
  parity and every standard body of either edition reads correctly; encoding follows the
  edition asked for.
* 0x0107 in 2019 widens the terminal model and id to 30 bytes but keeps the manufacturer id at
  5 bytes, while 0x0100 (table 8) widened it to 11.  Some 2019 devices send 11 bytes here too;
  when a 2019 body does not fit the standard layout but fits the 11-byte one it is read that way
  and ``long_manufacturer`` records it, so the body re-encodes as received.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from construct import (
    Adapter,
    Bytes,
    Computed,
    Construct,
    ConstructError,
    GreedyBytes,
    Prefixed,
    PrefixedArray,
    Struct,
    Terminated,
)

from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import (
    BYTE,
    DWORD,
    WORD,
    BcdDigits,
    FixedText,
    PrefixedText,
    bcd_time_to_datetime,
    encode_text,
)
from protocol.header import Edition
from protocol.messages.base import Message, register
from protocol.messages.params import gbk_or_bytes

_EMPTY = Struct(Terminated)


def _decode_with(cls: type[Message], schema: Construct, body: bytes, edition: Edition) -> Any:
    """Parse ``body`` with ``schema`` (not ``cls.schema``) and wrap failures like Message.decode."""
    try:
        parsed = schema.parse(body, edition=int(edition))
    except ConstructError as exc:
        raise BodyDecodeError(f"0x{cls.MSG_ID:04x} body: {exc}") from exc
    return cls.from_parsed(parsed)


# ---------------------------------------------------------------------------------------------
# Server time (2019)


class _BcdUtcTime(Adapter):  # type: ignore[misc]
    """BCD[6] YYMMDDhhmmss in UTC as an aware UTC datetime, or None for an impossible date.

    The server-time answer is the one JT/T 808 time that is UTC; every other BCD time is GMT+8
    (:data:`protocol.fields.BcdTime`).  Building converts any aware datetime to UTC first.
    """

    def __init__(self) -> None:
        super().__init__(Bytes(6))

    def _decode(self, obj: bytes, context: Any, path: str) -> datetime | None:
        wall = bcd_time_to_datetime(obj)  # the digits as a wall-clock time, labelled GMT+8
        return wall.replace(tzinfo=UTC) if wall is not None else None

    def _encode(self, obj: datetime | None, context: Any, path: str) -> bytes:
        if obj is None:
            return bytes(6)
        if obj.tzinfo is None:
            raise LocalProtocolError("JT/T 808 times must be timezone-aware")
        utc = obj.astimezone(UTC)
        if not 2000 <= utc.year <= 2099:
            raise LocalProtocolError(f"{utc.year} does not fit a two-digit BCD year")
        return bytes.fromhex(utc.strftime("%y%m%d%H%M%S"))


BcdUtcTime = _BcdUtcTime()


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryServerTime(Message):
    """0x0004 query server time (2019): empty body; answered by 0x8004."""

    MSG_ID: ClassVar[int] = 0x0004
    SCHEMA: ClassVar[Construct] = _EMPTY


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerTimeResponse(Message):
    """0x8004 server time response (2019): BCD[6] time in UTC, not GMT+8.

    ``time`` is an aware datetime in UTC (seconds resolution), None when the digits are not a
    date; any aware datetime may be given and is converted to UTC on the wire.
    """

    MSG_ID: ClassVar[int] = 0x8004
    SCHEMA: ClassVar[Construct] = Struct("time" / BcdUtcTime, Terminated)
    time: datetime | None


# ---------------------------------------------------------------------------------------------
# Sub-package retransmission

# Platform (8.4) and terminal (2019) retransmission requests: serial of the first package of the
# original message, then the package count and the package indexes (from 1) to send again.
_RETRANSMIT_BYTE_COUNT = Struct(
    "original_serial" / WORD,
    "packet_ids" / PrefixedArray(BYTE, WORD),  # 2011/2013: count BYTE
    Terminated,
)
_RETRANSMIT_WORD_COUNT = Struct(
    "original_serial" / WORD,
    "packet_ids" / PrefixedArray(WORD, WORD),  # 2019: count WORD
    Terminated,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _RetransmitRequest(Message):
    original_serial: int
    packet_ids: tuple[int, ...]

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        return _RETRANSMIT_WORD_COUNT if edition is Edition.V2019 else _RETRANSMIT_BYTE_COUNT

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        # A BYTE count makes the body odd-sized, a WORD count even (see the module docstring).
        schema = _RETRANSMIT_BYTE_COUNT if len(body) % 2 else _RETRANSMIT_WORD_COUNT
        result: Self = _decode_with(cls, schema, body, edition)
        return result


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlatformRetransmitRequest(_RetransmitRequest):
    """0x8003 platform request to resend sub-packages (8.4); count BYTE (2013) / WORD (2019)."""

    MSG_ID: ClassVar[int] = 0x8003


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRetransmitRequest(_RetransmitRequest):
    """0x0005 terminal request to resend sub-packages (2019); same layout as 0x8003."""

    MSG_ID: ClassVar[int] = 0x0005


# ---------------------------------------------------------------------------------------------
# Terminal control (8.13)

CONTROL_WIRELESS_UPGRADE = 1  # parameters: URL;APN;user;password;address;TCP;UDP;maker;hw;fw;limit
CONTROL_CONNECT_SERVER = 2  # parameters: control;auth code;APN;user;password;address;TCP;UDP;limit
CONTROL_POWER_OFF = 3
CONTROL_RESET = 4
CONTROL_FACTORY_RESET = 5
CONTROL_CLOSE_DATA = 6
CONTROL_CLOSE_WIRELESS = 7


class _TextOrBytes(Adapter):  # type: ignore[misc]
    """The rest of the body as GBK text, or as bytes when it is not GBK; kept exactly."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str | bytes:
        return gbk_or_bytes(obj)

    def _encode(self, obj: str | bytes, context: Any, path: str) -> bytes:
        return obj if isinstance(obj, bytes) else encode_text(obj)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalControl(Message):
    """0x8105 terminal control (8.13): command word BYTE, then its parameters.

    ``params`` is the parameter string (GBK, fields separated by ';') exactly as sent, "" when
    the command has none.  Bodies whose parameters are not GBK (vendor binary extensions) keep
    them as bytes; bytes that are valid GBK are normalised to str on construction.
    """

    MSG_ID: ClassVar[int] = 0x8105
    SCHEMA: ClassVar[Construct] = Struct(
        "command" / BYTE,
        "params" / _TextOrBytes(GreedyBytes),
    )
    command: int
    params: str | bytes = ""

    def __post_init__(self) -> None:
        if isinstance(self.params, bytes):
            object.__setattr__(self, "params", gbk_or_bytes(self.params))

    @property
    def arguments(self) -> list[str]:
        """The ';'-separated fields of a text parameter string ([] when there is none)."""
        if not self.params or isinstance(self.params, bytes):
            return []
        return self.params.split(";")


# ---------------------------------------------------------------------------------------------
# Terminal properties (8.14, 8.15)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryTerminalProperties(Message):
    """0x8107 query terminal properties (8.14): empty body; answered by 0x0107."""

    MSG_ID: ClassVar[int] = 0x8107
    SCHEMA: ClassVar[Construct] = _EMPTY


# terminal_type bits (8.15)
TERMINAL_TYPE_PASSENGER = 1 << 0
TERMINAL_TYPE_DANGEROUS_GOODS = 1 << 1
TERMINAL_TYPE_FREIGHT = 1 << 2
TERMINAL_TYPE_TAXI = 1 << 3
TERMINAL_TYPE_VIDEO_RECORDING = 1 << 6  # supports hard-disk video recording
TERMINAL_TYPE_SPLIT = 1 << 7  # 0 all-in-one, 1 split unit
TERMINAL_TYPE_TRAILER = 1 << 8  # 2019: suits trailers
# gnss_props bits
GNSS_GPS = 1 << 0
GNSS_BEIDOU = 1 << 1
GNSS_GLONASS = 1 << 2
GNSS_GALILEO = 1 << 3
# comm_props bits
COMM_GPRS = 1 << 0
COMM_CDMA = 1 << 1
COMM_TD_SCDMA = 1 << 2
COMM_WCDMA = 1 << 3
COMM_CDMA2000 = 1 << 4
COMM_TD_LTE = 1 << 5
COMM_OTHER = 1 << 7


def _properties_schema(maker: int, model: int, terminal_id: int, *, long_maker: bool) -> Construct:
    return Struct(
        "terminal_type" / WORD,
        "manufacturer" / FixedText(maker),
        "model" / FixedText(model),  # NUL padded
        "terminal_id" / FixedText(terminal_id),  # upper-case letters and digits, NUL padded
        "iccid" / BcdDigits(10),
        "hardware_version" / PrefixedText(BYTE),
        "firmware_version" / PrefixedText(BYTE),
        "gnss_props" / BYTE,
        "comm_props" / BYTE,
        "long_manufacturer" / Computed(long_maker),
        Terminated,
    )


# Widths of manufacturer id, model and terminal id.  0x0107 is 2013+; a 2011 body is read as 2013.
_PROPERTIES = {
    Edition.V2011: _properties_schema(5, 20, 7, long_maker=False),
    Edition.V2013: _properties_schema(5, 20, 7, long_maker=False),
    Edition.V2019: _properties_schema(5, 30, 30, long_maker=False),
}
# The 11-byte manufacturer id of 0x0100 (table 8) that some 2019 devices use here as well.
_PROPERTIES_2019_LONG = _properties_schema(11, 30, 30, long_maker=True)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalPropertiesResponse(Message):
    """0x0107 query terminal properties response (8.15).

    2013: manufacturer BYTE[5], model BYTE[20], terminal id BYTE[7].  2019: model and terminal
    id BYTE[30].  ``iccid`` is the SIM's BCD[10] as 20 digits; the versions are length-prefixed
    GBK.  ``terminal_type``, ``gnss_props`` and ``comm_props`` are the bit fields named by the
    ``TERMINAL_TYPE_*``, ``GNSS_*`` and ``COMM_*`` constants.  ``long_manufacturer`` is True
    for a 2019 body with an 11-byte manufacturer id (module docstring); it only fits 2019.
    """

    MSG_ID: ClassVar[int] = 0x0107
    terminal_type: int
    manufacturer: str
    model: str
    terminal_id: str
    iccid: str
    hardware_version: str
    firmware_version: str
    gnss_props: int
    comm_props: int
    long_manufacturer: bool = False

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        return _PROPERTIES[edition]

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        try:
            standard: Self = _decode_with(cls, cls.schema(edition), body, edition)
        except BodyDecodeError as standard_error:
            if edition is not Edition.V2019:
                raise
            try:
                long: Self = _decode_with(cls, _PROPERTIES_2019_LONG, body, edition)
            except BodyDecodeError:
                # Report the failure against the standard layout, with its own cause.
                raise standard_error from standard_error.__cause__
            return long
        return standard

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        if not self.long_manufacturer:
            return Message.encode(self, edition)
        if edition is not Edition.V2019:
            raise LocalProtocolError("an 11-byte manufacturer id exists only in the 2019 layout")
        try:
            return bytes(_PROPERTIES_2019_LONG.build(self.to_build(), edition=int(edition)))
        except ConstructError as exc:
            raise LocalProtocolError(f"0x{self.MSG_ID:04x}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Upgrades (8.16, 8.17)

UPGRADE_TERMINAL = 0
UPGRADE_IC_CARD_READER = 12
UPGRADE_GNSS_MODULE = 52

UPGRADE_OK = 0
UPGRADE_FAILED = 1
UPGRADE_CANCELLED = 2


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UpgradePackage(Message):
    """0x8108 deliver an upgrade package (8.16).

    Upgrade type BYTE (``UPGRADE_*``), manufacturer id BYTE[5], version (length BYTE + GBK),
    package length DWORD and the package.  A real package is far larger than one frame: build
    the whole body and send it with ``codec.encode_split``; decode the reassembled body.
    """

    MSG_ID: ClassVar[int] = 0x8108
    SCHEMA: ClassVar[Construct] = Struct(
        "upgrade_type" / BYTE,
        "manufacturer" / FixedText(5),
        "version" / PrefixedText(BYTE),
        "data" / Prefixed(DWORD, GreedyBytes),
        Terminated,
    )
    upgrade_type: int
    manufacturer: str
    version: str
    data: bytes


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeResult(Message):
    """0x0108 upgrade result notification (8.17): type BYTE, result BYTE (0 ok, 1 failed,
    2 cancelled)."""

    MSG_ID: ClassVar[int] = 0x0108
    SCHEMA: ClassVar[Construct] = Struct(
        "upgrade_type" / BYTE,
        "result" / BYTE,
        Terminated,
    )
    upgrade_type: int
    result: int


# ---------------------------------------------------------------------------------------------
# Location query, tracking, alarm confirmation, link test


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocationQuery(Message):
    """0x8201 location query (8.19): empty body; answered by 0x0201."""

    MSG_ID: ClassVar[int] = 0x8201
    SCHEMA: ClassVar[Construct] = _EMPTY


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemporaryTracking(Message):
    """0x8202 temporary location tracking control (8.21).

    ``interval_s`` WORD between reports (0 stops tracking), ``validity_s`` DWORD for how long
    the tracking lasts; the terminal reports with 0x0200.
    """

    MSG_ID: ClassVar[int] = 0x8202
    SCHEMA: ClassVar[Construct] = Struct(
        "interval_s" / WORD,
        "validity_s" / DWORD,
        Terminated,
    )
    interval_s: int
    validity_s: int


# alarm_type bits of 0x8203 (the 0x0200 alarm bits that need manual confirmation)
CONFIRM_EMERGENCY = 1 << 0
CONFIRM_DANGER_WARNING = 1 << 3
CONFIRM_AREA = 1 << 20
CONFIRM_ROUTE = 1 << 21
CONFIRM_ROUTE_TIME = 1 << 22
CONFIRM_ILLEGAL_IGNITION = 1 << 27
CONFIRM_ILLEGAL_DISPLACEMENT = 1 << 28


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AlarmConfirmation(Message):
    """0x8203 manual alarm confirmation (8.22).

    ``alarm_serial`` WORD is the serial of the alarm message confirmed (0 = every alarm of the
    types given); ``alarm_type`` DWORD holds the ``CONFIRM_*`` bits.
    """

    MSG_ID: ClassVar[int] = 0x8203
    SCHEMA: ClassVar[Construct] = Struct(
        "alarm_serial" / WORD,
        "alarm_type" / DWORD,
        Terminated,
    )
    alarm_serial: int
    alarm_type: int


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LinkTest(Message):
    """0x8204 link test (2019): empty body; the terminal answers with 0x0001."""

    MSG_ID: ClassVar[int] = 0x8204
    SCHEMA: ClassVar[Construct] = _EMPTY


__all__ = [
    "AlarmConfirmation",
    "BcdUtcTime",
    "LinkTest",
    "LocationQuery",
    "PlatformRetransmitRequest",
    "QueryServerTime",
    "QueryTerminalProperties",
    "ServerTimeResponse",
    "TemporaryTracking",
    "TerminalControl",
    "TerminalPropertiesResponse",
    "TerminalRetransmitRequest",
    "UpgradePackage",
    "UpgradeResult",
]
