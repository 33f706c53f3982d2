"""Driving recorder, waybill, driver identity and CAN bus messages (JT/T 808-2019 8.42-8.49).

Clause numbers follow the 2019 edition (0x8700 "行驶记录数据采集命令" 8.42 through 0x0705
"CAN总线数据上传" 8.49); the 2011/2013 editions number the same messages differently.

The recorder messages (0x8700, 0x0700, 0x8701) carry GB/T 19056 data blocks, which stay bytes
here: their layout belongs to the recorder standard, not to JT/T 808.

"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime
from datetime import time as clock_time
from typing import Any, ClassVar

from construct import (
    Adapter,
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    Bytewise,
    Construct,
    GreedyBytes,
    If,
    IfThenElse,
    Prefixed,
    Rebuild,
    Struct,
    len_,
    this,
)

from protocol.fields import (
    ABSENT,
    BYTE,
    DWORD,
    WORD,
    BcdDigits,
    BcdTime,
    FixedText,
    OptionalTail,
    PrefixedText,
    Required,
    bcd_time_to_datetime,
)
from protocol.header import Edition
from protocol.messages.base import Message, Record, jsonable, register

# ---------------------------------------------------------------------------------------------
# Construct helpers


class _BcdDate(Adapter):  # type: ignore[misc]
    """BCD[4] YYYYMMDD as a date; an impossible date decodes to None, None builds zeros."""

    def __init__(self) -> None:
        super().__init__(Bytes(4))

    def _decode(self, obj: bytes, context: Any, path: str) -> date | None:
        digits = obj.hex()
        if not digits.isdigit():
            return None
        try:
            return date(int(digits[0:4]), int(digits[4:6]), int(digits[6:8]))
        except ValueError:
            return None

    def _encode(self, obj: date | None, context: Any, path: str) -> bytes:
        if obj is None:
            return bytes(4)
        return bytes.fromhex(f"{obj.year:04d}{obj.month:02d}{obj.day:02d}")


BcdDate = _BcdDate()


# ---------------------------------------------------------------------------------------------
# Driving recorder (GB/T 19056 data blocks)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecorderCollect(Message):
    """0x8700 driving recorder data collection command (8.42).

    ``command`` is the GB/T 19056 command word; ``data`` the GB/T 19056 data block (may be
    empty).
    """

    MSG_ID: ClassVar[int] = 0x8700
    SCHEMA: ClassVar[Construct] = Struct("command" / BYTE, "data" / GreedyBytes)
    command: int
    data: bytes = b""


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecorderUpload(Message):
    """0x0700 driving recorder data upload (8.43): the answer to 0x8700 ``reply_serial``."""

    MSG_ID: ClassVar[int] = 0x0700
    SCHEMA: ClassVar[Construct] = Struct(
        "reply_serial" / WORD,
        "command" / BYTE,  # GB/T 19056 command word
        "data" / GreedyBytes,  # GB/T 19056 data block
    )
    reply_serial: int
    command: int
    data: bytes = b""


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecorderParams(Message):
    """0x8701 driving recorder parameter command (8.44): GB/T 19056 command word and block."""

    MSG_ID: ClassVar[int] = 0x8701
    SCHEMA: ClassVar[Construct] = Struct("command" / BYTE, "data" / GreedyBytes)
    command: int
    data: bytes = b""


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElectronicWaybill(Message):
    """0x0701 electronic waybill report (8.45): waybill length DWORD, then the waybill.

    The length is derived from ``data`` when building.
    """

    MSG_ID: ClassVar[int] = 0x0701
    SCHEMA: ClassVar[Construct] = Struct("data" / Prefixed(DWORD, GreedyBytes))
    data: bytes


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DriverIdentityRequest(Message):
    """0x8702 request for the driver identity (8.46): empty body, answered by 0x0702."""

    MSG_ID: ClassVar[int] = 0x8702
    SCHEMA: ClassVar[Construct] = Struct()


# 0x0702 status (2013+): a qualification IC card was inserted or pulled out.
CARD_INSERTED = 0x01
CARD_REMOVED = 0x02

# 0x0702 IC card read result (2013+).
IC_READ_OK = 0
IC_KEY_AUTH_FAILED = 1
IC_CARD_LOCKED = 2
IC_CARD_PULLED = 3
IC_CHECKSUM_ERROR = 4

_ID_CARD_SIZE = 20  # resident ID card number, STRING[20] (2011, and 2019's addition)
_QUALIFICATION_2011_SIZE = 40  # qualification certificate code, STRING[40] in 2011
_QUALIFICATION_SIZE = 20  # and STRING[20] from 2013 on
_BCD_TIME_SIZE = 6

# 2011 layout: name, ID card number, qualification code, issuing organisation.
_DRIVER_2011 = Struct(
    "status" / ABSENT,
    "time" / ABSENT,
    "ic_result" / ABSENT,
    "name" / Required(PrefixedText(BYTE)),
    "id_card" / Required(FixedText(_ID_CARD_SIZE)),
    "qualification" / Required(FixedText(_QUALIFICATION_2011_SIZE)),
    "issuing_org" / Required(PrefixedText(BYTE)),
    "validity" / ABSENT,
)

# 2013/2019 layout.  The IC read result follows only a card insertion and the card fields only a
# successful read; the 2019 ID card number closes the body.  A body that goes on where the
# standard says it ends (a removal followed by card fields, as yezhihao's encoder writes it; the
# 2019 ID card number under a 2013 header, as SmallChi's device frame has it) is read, not
# rejected, so nothing the terminal sent is lost.
_DRIVER_2013 = Struct(
    "status" / BYTE,
    "time" / BcdTime,
    "ic_result" / IfThenElse(this.status == CARD_INSERTED, Required(BYTE), OptionalTail(BYTE)),
    "name" / If(this.ic_result == IC_READ_OK, Required(PrefixedText(BYTE))),
    "qualification" / If(this.ic_result == IC_READ_OK, Required(FixedText(_QUALIFICATION_SIZE))),
    "issuing_org" / If(this.ic_result == IC_READ_OK, Required(PrefixedText(BYTE))),
    "validity" / If(this.ic_result == IC_READ_OK, BcdDate),
    "id_card" / If(this.ic_result == IC_READ_OK, OptionalTail(FixedText(_ID_CARD_SIZE))),
)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DriverIdentity(Message):
    """0x0702 driver identity report (8.47).

    2011: ``name``, ``id_card`` (STRING[20]), ``qualification`` (STRING[40]) and
    ``issuing_org``; the 2013+ fields are None.

    2013/2019: ``status`` (:data:`CARD_INSERTED` or :data:`CARD_REMOVED`) and ``time`` always;
    ``ic_result`` after an insertion; after a good read (``ic_result`` 0) ``name``,
    ``qualification`` (STRING[20]), ``issuing_org`` and ``validity`` (BCD[4] YYYYMMDD, None when
    not a real date), and in 2019 ``id_card``.  ``id_card`` is written whenever it is given and
    read whenever the body carries it, in 2013 as in 2019.

    :meth:`refine_edition` reads a body under a 2013 header as 2011 when it does not start with a
    status and a time but fits the 2011 layout exactly.
    """

    MSG_ID: ClassVar[int] = 0x0702
    status: int | None = None
    time: datetime | None = None
    ic_result: int | None = None
    name: str | None = None
    qualification: str | None = None
    issuing_org: str | None = None
    validity: date | None = None
    id_card: str | None = None

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        return _DRIVER_2011 if edition is Edition.V2011 else _DRIVER_2013

    @classmethod
    def refine_edition(cls, body: bytes, edition: Edition) -> Edition:
        if edition is not Edition.V2013:
            return edition
        if _starts_like_2013(body) or not _fits_2011(body):
            return Edition.V2013
        return Edition.V2011

    @property
    def card_inserted(self) -> bool:
        return self.status == CARD_INSERTED

    def to_json(self) -> dict[str, Any]:
        out = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["validity"] = self.validity.isoformat() if self.validity is not None else None
        return out


def _starts_like_2013(body: bytes) -> bool:
    """A status byte, then a real time or the all-zero "no time" of a terminal without a clock.

    A 2011 name of one or two bytes followed by text cannot pass for a time: a BCD month is
    0x01-0x12, which no printable character is.
    """
    if len(body) < 1 + _BCD_TIME_SIZE or body[0] not in (CARD_INSERTED, CARD_REMOVED):
        return False
    stamp = body[1 : 1 + _BCD_TIME_SIZE]
    return stamp == bytes(_BCD_TIME_SIZE) or bcd_time_to_datetime(stamp) is not None


def _fits_2011(body: bytes) -> bool:
    """True when the 2011 layout's lengths add up to exactly ``len(body)``."""
    if not body:
        return False
    org_length_at = 1 + body[0] + _ID_CARD_SIZE + _QUALIFICATION_2011_SIZE
    return len(body) > org_length_at and len(body) == org_length_at + 1 + body[org_length_at]


# ---------------------------------------------------------------------------------------------
# CAN bus data

# Table of the 0x0705 item: the CAN ID DWORD's bits, most significant first, then BYTE[8] data.
_CAN_ITEM = BitStruct(
    "channel" / BitsInteger(1),  # bit 31: 0 = CAN1, 1 = CAN2
    "frame_type" / BitsInteger(1),  # bit 30: 0 = standard frame, 1 = extended frame
    "collection_mode" / BitsInteger(1),  # bit 29: 0 = raw data, 1 = mean over the interval
    "can_id" / BitsInteger(29),  # bits 0-28: the CAN bus identifier
    "data" / Bytewise(Bytes(8)),
)

CAN_DATA_SIZE = 8


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CanItem(Record):
    """One CAN frame of 0x0705: identifier bits and eight data bytes."""

    channel: int
    frame_type: int
    collection_mode: int
    can_id: int
    data: bytes

    @property
    def extended(self) -> bool:
        return bool(self.frame_type)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CanBusData(Message):
    """0x0705 CAN bus data upload (8.49, 2013+).

    ``receive_time`` is the BCD[5] receive time of the first item as its ten digits
    ``hhmmssmmmm`` (hour, minute, second, milliseconds), kept as sent because devices fill it
    loosely; :attr:`receive_time_of_day` reads it.  The item count WORD is derived from ``items``
    when building.
    """

    MSG_ID: ClassVar[int] = 0x0705
    NESTED: ClassVar[dict[str, type[Record]]] = {"items": CanItem}
    SCHEMA: ClassVar[Construct] = Struct(
        "count" / Rebuild(WORD, len_(this.items)),
        "receive_time" / BcdDigits(5),
        "items" / Array(this.count, _CAN_ITEM),
    )
    receive_time: str
    items: tuple[CanItem, ...]

    @property
    def receive_time_of_day(self) -> clock_time | None:
        """The receive time as a time of day, or None when the digits are not one."""
        digits = self.receive_time
        if len(digits) != 10 or not digits.isdigit():
            return None
        try:
            return clock_time(
                int(digits[0:2]),
                int(digits[2:4]),
                int(digits[4:6]),
                int(digits[6:10]) * 1000,
            )
        except ValueError:
            return None


__all__ = [
    "CARD_INSERTED",
    "CARD_REMOVED",
    "IC_READ_OK",
    "BcdDate",
    "CanBusData",
    "CanItem",
    "DriverIdentity",
    "DriverIdentityRequest",
    "ElectronicWaybill",
    "RecorderCollect",
    "RecorderParams",
    "RecorderUpload",
]
