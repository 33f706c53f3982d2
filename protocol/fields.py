"""construct building blocks for JT/T 808 data types (JT/T 808-2019 clause 4.2, table 1).

BYTE/WORD/DWORD are big-endian unsigned integers; BCD[n] packs two decimal digits per byte;
STRING is GBK text (we decode with GB 18030, its superset, so that every GBK byte sequence a
device sends is readable, and encode the same way: for GBK characters the bytes are identical).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from construct import (
    Adapter,
    Bytes,
    Construct,
    ConstructError,
    GreedyBytes,
    IfThenElse,
    Int8ub,
    Int16ub,
    Int32ub,
    ListContainer,
    Prefixed,
    Struct,
    Subconstruct,
    this,
)

from protocol.errors import LocalProtocolError, TextControlError, TextDecodeError

BYTE = Int8ub
WORD = Int16ub
DWORD = Int32ub

TEXT_ENCODING = "gb18030"

# Positions and events carry GMT+8 wall-clock time (clause 4.2, table 1, BCD[6] "GMT+8").
GMT8 = timezone(timedelta(hours=8), "GMT+8")


# C0 control characters other than TAB, LF and CR, and DEL.  STRING is GBK text (clause 4.2,
# table 1): names, plates, codes and messages, where a line break is the only layout a device
# may reasonably send.  NUL in particular cannot be stored as text (PostgreSQL refuses it).  In
# GB 18030 these code points are single bytes (the trail bytes of multi-byte characters are
# 0x30-0x39 and 0x40-0xFE but 0x7F), so the check on the decoded text finds exactly the
# control bytes that were sent.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# An error's detail shows at most this many bytes of the offending field (as hex): enough to
# recognise the value in a log line, while a 1023-byte body cannot flood one.
_DETAIL_BYTES = 32


def _field_name(path: str | None) -> str:
    """The field a construct ``path`` ("(parsing) -> items -> name") names, for messages."""
    if not path:
        return "text"
    return path.removeprefix("(parsing)").removeprefix(" -> ") or "text"


def _shown(data: bytes) -> str:
    shown = data[:_DETAIL_BYTES].hex()
    return shown if len(data) <= _DETAIL_BYTES else f"{shown}... ({len(data)} bytes)"


def decode_text(data: bytes, *, field: str | None = None) -> str:
    """``data`` as GBK text (decoded as GB 18030, its superset).

    Raises :class:`TextDecodeError` for bytes that are not GB 18030 and its subclass
    :class:`TextControlError` when the text holds a C0 control character other than TAB, LF
    and CR, or DEL.  Callers strip the NUL padding of fixed-width fields first: a NUL left in
    the text is refused like any other control character.  ``field`` names the field in the
    error's detail; the detail shows at most the first 32 bytes.
    """
    try:
        text = data.decode(TEXT_ENCODING)
    except UnicodeDecodeError as exc:
        raise TextDecodeError(f"{field or 'text'}: not GBK text: {_shown(data)}") from exc
    control = _CONTROL.search(text)
    if control is not None:
        raise TextControlError(
            f"{field or 'text'}: control character U+{ord(control.group()):04X} at character "
            f"{control.start()} of {len(text)}: {_shown(data)}"
        )
    return text


def encode_text(text: str) -> bytes:
    try:
        return text.encode(TEXT_ENCODING)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"cannot encode {text!r} as GBK") from exc


class _BcdDigits(Adapter):  # type: ignore[misc]
    """BCD[n] as a string of 2n digits, exactly as on the wire (leading zeros kept).

    Terminal phone numbers and ids are BCD; some devices put hex digits a-f there, which are
    kept as they are rather than rejected.  Building left-pads with zeros.
    """

    def __init__(self, size: int) -> None:
        super().__init__(Bytes(size))
        self.size = size

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return obj.hex()

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        digits = obj.rjust(2 * self.size, "0")
        if len(digits) != 2 * self.size:
            raise LocalProtocolError(f"{obj!r} does not fit BCD[{self.size}]")
        try:
            return bytes.fromhex(digits)
        except ValueError as exc:
            raise LocalProtocolError(f"{obj!r} is not a BCD digit string") from exc


def BcdDigits(size: int) -> Construct:  # noqa: N802 - reads like the construct it builds
    return _BcdDigits(size)


class _BcdTime(Adapter):  # type: ignore[misc]
    """BCD[6] YYMMDDhhmmss in GMT+8 (clause 4.2) as an aware datetime, or None.

    Devices without a fix send all zeros or other impossible dates; those decode to None rather
    than failing the whole report, and None builds as six zero bytes.
    """

    def __init__(self) -> None:
        super().__init__(Bytes(6))

    def _decode(self, obj: bytes, context: Any, path: str) -> datetime | None:
        return bcd_time_to_datetime(obj)

    def _encode(self, obj: datetime | None, context: Any, path: str) -> bytes:
        return datetime_to_bcd_time(obj)


# Terminals report on the second, so the frames of a busy second share a handful of times;
# datetimes are immutable, so one object per BCD value serves them all.
def bcd_time_to_datetime(obj: bytes) -> datetime | None:
    """BCD[6] YYMMDDhhmmss in GMT+8 (table 23); None for digits that are no valid time."""
    return _bcd_time(bytes(obj))


@functools.lru_cache(maxsize=4096)
def _bcd_time(obj: bytes) -> datetime | None:
    digits = obj.hex()
    if not digits.isdigit():
        return None
    try:
        return datetime(
            2000 + int(digits[0:2]),
            int(digits[2:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10]),
            int(digits[10:12]),
            tzinfo=GMT8,
        )
    except ValueError:
        return None


def datetime_to_bcd_time(obj: datetime | None) -> bytes:
    if obj is None:
        return bytes(6)
    if obj.tzinfo is None:
        raise LocalProtocolError("JT/T 808 times must be timezone-aware")
    local = obj.astimezone(GMT8)
    if not 2000 <= local.year <= 2099:
        raise LocalProtocolError(f"{local.year} does not fit a two-digit BCD year")
    return bytes.fromhex(local.strftime("%y%m%d%H%M%S"))


BcdTime = _BcdTime()


class _Text(Adapter):  # type: ignore[misc]
    """GBK text over some byte construct; trailing NUL padding is dropped on decode.

    Decoding raises :class:`TextControlError` for a control character left after the padding
    is stripped (see :func:`decode_text`).
    """

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return decode_text(obj.rstrip(b"\x00"), field=_field_name(path))

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        return encode_text(obj)


class _FixedText(Adapter):  # type: ignore[misc]
    """STRING of a fixed width, NUL padded on the right (2019 clause 4.2 note).

    Only the padding on the right is stripped; a control character before it is refused.
    """

    def __init__(self, size: int) -> None:
        super().__init__(Bytes(size))
        self.size = size

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return decode_text(obj.rstrip(b"\x00"), field=_field_name(path))

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        data = encode_text(obj)
        if len(data) > self.size:
            raise LocalProtocolError(f"{obj!r} is longer than {self.size} bytes")
        return data.ljust(self.size, b"\x00")


def FixedText(size: int) -> Construct:  # noqa: N802
    """A fixed-width GBK string."""
    return _FixedText(size)


def PrefixedText(length_field: Construct) -> Construct:  # noqa: N802
    """GBK text preceded by its byte length."""
    return _Text(Prefixed(length_field, GreedyBytes))


GreedyText = _Text(GreedyBytes)
"""GBK text running to the end of the body."""


# ---------------------------------------------------------------------------------------------
# Optional and repeated fields

IS_2019 = this._params.edition == 2019
"""True while parsing/building a 2019 body (``Message.decode``/``encode`` pass the edition)."""


class Absent(Construct):  # type: ignore[misc]
    """A field that the edition or an attribute bit leaves out of the body.

    Parses to None and builds nothing.  Building a value other than None is an error, so a
    value the wire cannot carry is never dropped silently (and decode(encode(m)) == m holds for
    every message that encodes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flagbuildnone = True

    def _parse(self, stream: IO[bytes], context: Any, path: str) -> None:
        return None

    def _build(self, obj: Any, stream: IO[bytes], context: Any, path: str) -> None:
        if obj is not None:
            raise ConstructError(
                f"{obj!r} cannot be sent: this edition or the attribute bits leave the field out",
                path=path,
            )

    def _sizeof(self, context: Any, path: str) -> int:
        return 0


ABSENT = Absent()
"""Stands in for a field of another edition, so every edition's schema has every field name."""


def present_if(condition: Any, subcon: Construct) -> Construct:
    """``subcon`` when ``condition`` holds, else an absent field that reads as None."""
    return IfThenElse(condition, subcon, ABSENT)


def _at_end(stream: IO[bytes]) -> bool:
    position = stream.tell()
    more = stream.read(1)
    stream.seek(position)
    return not more


class UntilEnd(Subconstruct):  # type: ignore[misc]
    """Repeat ``subcon`` until the body ends.

    Unlike construct's ``GreedyRange``, a malformed last element is an error (and a GBK error
    stays a :class:`~protocol.errors.TextDecodeError`) instead of being dropped with the bytes
    after it.  ``subcon`` must consume at least one byte.
    """

    def _parse(self, stream: IO[bytes], context: Any, path: str) -> ListContainer:
        items = ListContainer()
        while not _at_end(stream):
            items.append(self.subcon._parsereport(stream, context, path))
        return items

    def _build(self, obj: Any, stream: IO[bytes], context: Any, path: str) -> Any:
        for item in obj:
            self.subcon._build(item, stream, context, path)
        return obj


class OptionalTail(Subconstruct):  # type: ignore[misc]
    """``subcon`` if the body goes on, None if it has ended; None builds nothing."""

    def __init__(self, subcon: Construct) -> None:
        super().__init__(subcon)
        self.flagbuildnone = True

    def _parse(self, stream: IO[bytes], context: Any, path: str) -> Any:
        if _at_end(stream):
            return None
        return self.subcon._parsereport(stream, context, path)

    def _build(self, obj: Any, stream: IO[bytes], context: Any, path: str) -> Any:
        if obj is None:
            return None
        return self.subcon._build(obj, stream, context, path)


class _CappedText(Adapter):  # type: ignore[misc]
    """GBK text to the end of the body, at most ``limit`` bytes when building.

    Reading is lenient (a longer text from a peer is still read); our own messages must keep
    to the standard's maximum.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(GreedyBytes)
        self.limit = limit

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return decode_text(obj.rstrip(b"\x00"), field=_field_name(path))

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        data = encode_text(obj)
        if len(data) > self.limit:
            raise LocalProtocolError(f"{len(data)} bytes of text; the limit is {self.limit}")
        return data


def CappedText(limit: int) -> Construct:  # noqa: N802 - reads like the construct it builds
    """GBK text running to the end of the body, at most ``limit`` bytes."""
    return _CappedText(limit)


class _Required(Adapter):  # type: ignore[misc]
    """Refuses None when building (a field the layout needs, typed optional for other cases)."""

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        return obj

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if obj is None:
            raise ConstructError(f"{path}: a value is required here", path=path)
        return obj


def Required(subcon: Construct) -> Construct:  # noqa: N802
    """``subcon``, with a clear build error instead of a crash when given None."""
    return _Required(subcon)


def Reserved(size: int) -> Construct:  # noqa: N802
    """Reserved bytes: read and kept (they round-trip), written as given."""
    return Bytes(size)


__all__ = [
    "ABSENT",
    "BYTE",
    "DWORD",
    "GMT8",
    "IS_2019",
    "WORD",
    "Absent",
    "BcdDigits",
    "BcdTime",
    "CappedText",
    "FixedText",
    "GreedyText",
    "OptionalTail",
    "PrefixedText",
    "Required",
    "Reserved",
    "Struct",
    "UntilEnd",
    "bcd_time_to_datetime",
    "datetime_to_bcd_time",
    "decode_text",
    "encode_text",
    "present_if",
]
