"""Multimedia messages: events, data upload, camera, stored media, recording (8.50-8.59).

Clause numbers follow JT/T 808-2019, from 0x0800 "多媒体事件信息上传" (8.50) to 0x8805
"单条存储多媒体数据检索上传命令" (8.59).

Where these messages carry a position (0x0801, 0x0802) it is the 28-byte location basic
information of 0x0200 (table 23) without additional items; it decodes to a
:class:`~protocol.messages.location.Location` with no items, so downstream code treats it like
any other position.  The 2011 edition had no position in 0x0801 and no multimedia id in the
0x0802 search items; those fields are None there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Self

from construct import (
    Adapter,
    Construct,
    GreedyBytes,
    IfThenElse,
    PrefixedArray,
    Struct,
    ValidationError,
    this,
)

from protocol.fields import ABSENT, BYTE, DWORD, WORD, BcdTime, OptionalTail, Required
from protocol.header import Edition
from protocol.messages.base import Message, Record, register
from protocol.messages.location import LOCATION_BASIC, LOCATION_BASIC_SIZE, Location

# Multimedia type (8.50).
MEDIA_IMAGE = 0
MEDIA_AUDIO = 1
MEDIA_VIDEO = 2

# Multimedia format code (8.50).
FORMAT_JPEG = 0
FORMAT_TIF = 1
FORMAT_MP3 = 2
FORMAT_WAV = 3
FORMAT_WMV = 4

# Event item code (8.50): 0 platform command, 1 timed action, 2 robbery alarm, 3 collision or
# rollover alarm; the 2019 table also lists 4 door opened, 5 door closed, 6 door opened or
# closed as the speed crosses 20 km/h, 7 fixed distance; the rest are reserved.
EVENT_PLATFORM = 0
EVENT_TIMER = 1
EVENT_ROBBERY = 2
EVENT_COLLISION = 3


class _LocationBasic(Adapter):  # type: ignore[misc]
    """The 28-byte location basic information as a :class:`Location` with no items.

    Building takes a Location (or its ``to_build`` mapping); one with additional items or
    leftover bytes does not fit the 28 bytes and is refused rather than cut.
    """

    def _decode(self, obj: Any, context: Any, path: str) -> Location:
        return Location(
            alarm=obj.alarm,
            status=obj.status,
            latitude=obj.latitude,
            longitude=obj.longitude,
            altitude_m=obj.altitude_m,
            speed=obj.speed,
            direction=obj.direction,
            time=obj.time,
        )

    def _encode(self, obj: Any, context: Any, path: str) -> dict[str, Any]:
        if obj is None:
            raise ValidationError(f"{path}: a location is required here", path=path)
        fields = obj.to_build() if isinstance(obj, Location) else obj
        if not isinstance(fields, Mapping):
            raise ValidationError(f"{path}: not a Location: {obj!r}", path=path)
        if fields.get("items") or fields.get("leftover"):
            raise ValidationError(
                f"{path}: only the {LOCATION_BASIC_SIZE}-byte basic information fits here; "
                "drop the additional items",
                path=path,
            )
        return dict(fields)


LOCATION = _LocationBasic(LOCATION_BASIC)
"""Table 23's 28 bytes as a :class:`Location` without additional items."""


def _since_2013(subcon: Construct) -> Construct:
    """A field the 2013 and 2019 editions have and 2011 does not."""
    return IfThenElse(this._params.edition == Edition.V2011.value, ABSENT, subcon)


def _is_jpeg_start(data: bytes) -> bool:
    # JPEG start-of-image FF D8 followed by the next marker's FF.
    return data[:3] == b"\xff\xd8\xff"


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MultimediaEvent(Message):
    """0x0800 multimedia event report (8.50): a terminal announces a capture."""

    MSG_ID: ClassVar[int] = 0x0800
    SCHEMA: ClassVar[Construct] = Struct(
        "media_id" / DWORD,  # greater than 0
        "media_type" / BYTE,  # MEDIA_*
        "media_format" / BYTE,  # FORMAT_*
        "event" / BYTE,  # EVENT_*
        "channel" / BYTE,
    )
    media_id: int
    media_type: int
    media_format: int
    event: int
    channel: int


_MEDIA_HEADER_SIZE = 8  # media id DWORD + type, format, event, channel BYTEs
_MEDIA_ID_SIZE = 4  # the media id DWORD alone


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MultimediaData(Message):
    """0x0801 multimedia data upload (8.51).

    ``location`` is the position when the capture started (2013+; None in 2011), ``data`` the
    media bytes.  Large uploads arrive sub-packaged; this is the reassembled body.

    :meth:`refine_edition` reads a body under a 2013 header as 2011 when it is too short to hold
    the position, or when a JPEG starts right after the eight header bytes (in the 2013 layout
    those bytes would be alarm flags with nearly every bit set).
    """

    MSG_ID: ClassVar[int] = 0x0801
    SCHEMA: ClassVar[Construct] = Struct(
        "media_id" / DWORD,
        "media_type" / BYTE,
        "media_format" / BYTE,
        "event" / BYTE,
        "channel" / BYTE,
        "location" / _since_2013(LOCATION),
        "data" / GreedyBytes,
    )
    media_id: int
    media_type: int
    media_format: int
    event: int
    channel: int
    location: Location | None = None
    data: bytes = b""

    @classmethod
    def refine_edition(cls, body: bytes, edition: Edition) -> Edition:
        if edition is not Edition.V2013 or len(body) < _MEDIA_HEADER_SIZE:
            return edition
        too_short = len(body) < _MEDIA_HEADER_SIZE + LOCATION_BASIC_SIZE
        if too_short or _is_jpeg_start(body[_MEDIA_HEADER_SIZE:]):
            return Edition.V2011
        return edition


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MultimediaUploadResponse(Message):
    """0x8800 multimedia data upload response (8.52).

    ``retransmit_ids`` lists the package indexes to send again; empty means all were received.
    The count BYTE is derived from it when building.
    """

    MSG_ID: ClassVar[int] = 0x8800
    SCHEMA: ClassVar[Construct] = Struct(
        "media_id" / DWORD,
        "retransmit_ids" / PrefixedArray(BYTE, WORD),
    )
    media_id: int
    retransmit_ids: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        # 8.52: when every package arrived the count and the list may be left out ("无该字段则
        # 表示已收到全部数据包"), and platforms in the field send the media id alone.  That is
        # an empty retransmit list; it re-encodes canonically, with a count of 0.
        if len(body) == _MEDIA_ID_SIZE:
            body += b"\x00"
        # (not the zero-argument super(): slots=True makes a new class, its cell the old one)
        return super(MultimediaUploadResponse, cls).decode(body, edition)


# 0x8801 shooting command word: 0 stops, 0xFFFF records video, anything else is a photo count.
SHOOT_STOP = 0x0000
SHOOT_VIDEO = 0xFFFF

# 0x8801/0x8804 save flag: 1 store on the terminal, 0 upload at once.
SAVE_UPLOAD = 0
SAVE_STORE = 1


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CameraShoot(Message):
    """0x8801 camera shoot-now command (8.53).

    ``command``: :data:`SHOOT_STOP`, :data:`SHOOT_VIDEO` or a number of photos.
    ``interval_s``: seconds between photos, or the recording time; 0 = as fast as possible /
    until stopped.  ``resolution`` is a code (0x01 320x240 up to 0x08 704x576 D1);
    ``quality`` 1 (best) to 10; ``brightness`` and ``chroma`` 0-255, ``contrast`` and
    ``saturation`` 0-127.  Values are kept as sent, not range-checked.
    """

    MSG_ID: ClassVar[int] = 0x8801
    SCHEMA: ClassVar[Construct] = Struct(
        "channel" / BYTE,
        "command" / WORD,
        "interval_s" / WORD,
        "save" / BYTE,
        "resolution" / BYTE,
        "quality" / BYTE,
        "brightness" / BYTE,
        "contrast" / BYTE,
        "saturation" / BYTE,
        "chroma" / BYTE,
    )
    channel: int
    command: int
    interval_s: int
    save: int
    resolution: int
    quality: int
    brightness: int
    contrast: int
    saturation: int
    chroma: int


# 0x0805 result: 0 success, 1 failure, 2 channel not supported.
SHOOT_OK = 0
SHOOT_FAILED = 1
SHOOT_CHANNEL_UNSUPPORTED = 2

_MEDIA_IDS = PrefixedArray(WORD, DWORD)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CameraShootResponse(Message):
    """0x0805 camera shoot-now response (8.54, 2013+).

    On success (``result`` 0) the count WORD and ``media_ids`` follow (count derived when
    building).  On failure the standard stops after the result; some terminals still send a
    count (of zero), which is read and kept, so ``media_ids`` is None only when absent.
    """

    MSG_ID: ClassVar[int] = 0x0805
    SCHEMA: ClassVar[Construct] = Struct(
        "reply_serial" / WORD,
        "result" / BYTE,
        "media_ids"
        / IfThenElse(this.result == SHOOT_OK, Required(_MEDIA_IDS), OptionalTail(_MEDIA_IDS)),
    )
    reply_serial: int
    result: int
    media_ids: tuple[int, ...] | None = None


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MediaSearch(Message):
    """0x8802 stored multimedia search (8.55).

    ``channel`` 0 = every channel; ``start``/``end`` None (all zeros on the wire) = no limit.
    """

    MSG_ID: ClassVar[int] = 0x8802
    SCHEMA: ClassVar[Construct] = Struct(
        "media_type" / BYTE,
        "channel" / BYTE,
        "event" / BYTE,
        "start" / BcdTime,
        "end" / BcdTime,
    )
    media_type: int
    channel: int
    event: int
    start: datetime | None = None
    end: datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MediaSearchItem(Record):
    """One 0x0802 search result; ``media_id`` is None in 2011, which had no id here."""

    media_id: int | None
    media_type: int
    channel: int
    event: int
    location: Location


_SEARCH_ITEM = Struct(
    "media_id" / _since_2013(DWORD),
    "media_type" / BYTE,
    "channel" / BYTE,
    "event" / BYTE,
    "location" / LOCATION,
)
# Item sizes: type, channel and event BYTEs and the position; 2013+ put the id DWORD first.
_SEARCH_ITEM_SIZE = {
    Edition.V2011: 3 + LOCATION_BASIC_SIZE,
    Edition.V2013: 4 + 3 + LOCATION_BASIC_SIZE,
}
_SEARCH_HEADER_SIZE = 4  # reply serial WORD + item count WORD


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MediaSearchResponse(Message):
    """0x0802 stored multimedia search response (8.56); the item count WORD is derived.

    :meth:`refine_edition` reads a body under a 2013 header as 2011 when its length fits the
    31-byte 2011 items and not the 35-byte 2013 ones.
    """

    MSG_ID: ClassVar[int] = 0x0802
    NESTED: ClassVar[dict[str, type[Record]]] = {"items": MediaSearchItem}
    SCHEMA: ClassVar[Construct] = Struct(
        "reply_serial" / WORD,
        "items" / PrefixedArray(WORD, _SEARCH_ITEM),
    )
    reply_serial: int
    items: tuple[MediaSearchItem, ...] = ()

    @classmethod
    def refine_edition(cls, body: bytes, edition: Edition) -> Edition:
        if edition is not Edition.V2013 or len(body) < _SEARCH_HEADER_SIZE:
            return edition
        count = int.from_bytes(body[2:_SEARCH_HEADER_SIZE], "big")
        rest = len(body) - _SEARCH_HEADER_SIZE
        fits_2011 = rest == count * _SEARCH_ITEM_SIZE[Edition.V2011]
        fits_2013 = rest == count * _SEARCH_ITEM_SIZE[Edition.V2013]
        return Edition.V2011 if fits_2011 and not fits_2013 else edition


# 0x8803/0x8805 delete flag: 0 keep after upload, 1 delete.
KEEP = 0
DELETE = 1


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredMediaUpload(Message):
    """0x8803 stored multimedia upload command (8.57): search criteria as 0x8802, then
    ``delete`` (:data:`KEEP` or :data:`DELETE`)."""

    MSG_ID: ClassVar[int] = 0x8803
    SCHEMA: ClassVar[Construct] = Struct(
        "media_type" / BYTE,
        "channel" / BYTE,
        "event" / BYTE,
        "start" / BcdTime,
        "end" / BcdTime,
        "delete" / BYTE,
    )
    media_type: int
    channel: int
    event: int
    start: datetime | None = None
    end: datetime | None = None
    delete: int = KEEP


# 0x8804 audio sampling rate: 0 8 kHz, 1 11 kHz, 2 23 kHz, 3 32 kHz.
RECORD_STOP = 0
RECORD_START = 1


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecordingStart(Message):
    """0x8804 audio recording start command (8.58).

    ``command`` :data:`RECORD_STOP` or :data:`RECORD_START`; ``duration_s`` 0 = until stopped;
    ``save`` as 0x8801; ``sample_rate`` a code (0 8 kHz, 1 11 kHz, 2 23 kHz, 3 32 kHz).
    """

    MSG_ID: ClassVar[int] = 0x8804
    SCHEMA: ClassVar[Construct] = Struct(
        "command" / BYTE,
        "duration_s" / WORD,
        "save" / BYTE,
        "sample_rate" / BYTE,
    )
    command: int
    duration_s: int
    save: int
    sample_rate: int


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SingleMediaUpload(Message):
    """0x8805 single stored multimedia upload command (8.59, 2013+)."""

    MSG_ID: ClassVar[int] = 0x8805
    SCHEMA: ClassVar[Construct] = Struct("media_id" / DWORD, "delete" / BYTE)
    media_id: int
    delete: int = KEEP


__all__ = [
    "LOCATION",
    "CameraShoot",
    "CameraShootResponse",
    "MediaSearch",
    "MediaSearchItem",
    "MediaSearchResponse",
    "MultimediaData",
    "MultimediaEvent",
    "MultimediaUploadResponse",
    "RecordingStart",
    "SingleMediaUpload",
    "StoredMediaUpload",
]
