"""Message header (JT/T 808-2019 clause 4.4.3, tables 2-4; 2013 clause 4.4.3).

2011 and 2013 share one layout: id WORD, properties WORD, phone BCD[6], serial WORD, then the
package total and index WORDs when the sub-package bit is set.  2019 inserts a protocol-version
BYTE after the properties and widens the phone to BCD[10]; bit 14 of the properties announces it.

Devices set bit 14 wrongly in both directions, so :func:`parse_header` takes the layout that is
consistent with the declared body length and reports whether the flag agreed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from construct import BitsInteger, BitStruct, Flag, If, Struct, this

from protocol.errors import HeaderTooShortError, LengthMismatchError, LocalProtocolError
from protocol.fields import BYTE, WORD, BcdDigits


class Edition(IntEnum):
    """Edition of the standard a frame follows.

    The header only tells 2019 from the rest; 2011 and 2013 differ in a few bodies (0x0100's
    field widths, for one), which is where a decoder narrows V2013 down to V2011.
    """

    V2011 = 2011
    V2013 = 2013
    V2019 = 2019


# Table 2 (2019) / table 2 (2013): message body properties, most significant bit first.
PROPERTIES = BitStruct(
    "reserved" / Flag,  # bit 15
    "version_flag" / Flag,  # bit 14, 2019 only
    "subpackage" / Flag,  # bit 13
    "encryption" / BitsInteger(3),  # bits 10-12; 0b001 = RSA
    "body_length" / BitsInteger(10),  # bits 0-9
)

_PACKAGE = Struct("total" / WORD, "index" / WORD)

# Table 3 (2011/2013 header)
HEADER_2013 = Struct(
    "msg_id" / WORD,
    "properties" / PROPERTIES,
    "phone" / BcdDigits(6),
    "serial" / WORD,
    "package" / If(this.properties.subpackage, _PACKAGE),
)

# Table 3 (2019 header)
HEADER_2019 = Struct(
    "msg_id" / WORD,
    "properties" / PROPERTIES,
    "protocol_version" / BYTE,
    "phone" / BcdDigits(10),
    "serial" / WORD,
    "package" / If(this.properties.subpackage, _PACKAGE),
)

_BASE_SIZE = {Edition.V2013: 12, Edition.V2019: 17}
_PACKAGE_SIZE = 4
ENCRYPTION_NONE = 0
ENCRYPTION_RSA = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """A decoded header.

    ``layout`` is the header layout actually used (V2013 for 2011/2013, V2019), ``version_flag``
    the bit as sent; they disagree for devices that set the bit wrongly.
    ``protocol_version`` is None for the 2013 layout.  ``package_total``/``package_index`` are
    None unless ``subpackage`` (index counts from 1).
    """

    msg_id: int
    body_length: int
    phone: str
    serial: int
    layout: Edition = Edition.V2013
    version_flag: bool = False
    protocol_version: int | None = None
    encryption: int = ENCRYPTION_NONE
    subpackage: bool = False
    package_total: int | None = None
    package_index: int | None = None
    reserved_bit: bool = False

    @property
    def size(self) -> int:
        return _BASE_SIZE[self.layout] + (_PACKAGE_SIZE if self.subpackage else 0)

    @property
    def flag_mismatch(self) -> bool:
        """True when bit 14 disagrees with the layout the frame actually uses."""
        return self.version_flag != (self.layout is Edition.V2019)


def header_size(layout: Edition, subpackage: bool) -> int:
    base = _BASE_SIZE[Edition.V2019 if layout is Edition.V2019 else Edition.V2013]
    return base + (_PACKAGE_SIZE if subpackage else 0)


# The construct schemas above are the reference; the functions below read and write the same
# fields with ``struct`` because every frame passes through them (a construct parse of a header
# costs about 16 us, these about 1 us).  tests/test_header_fastpath.py checks that both agree
# on every input.
_ID_PROPS = struct.Struct(">HH")
_SERIAL = struct.Struct(">H")
_PACKAGE_WORDS = struct.Struct(">HH")


def parse_header(content: bytes) -> Header:
    """Read the header of ``content`` (header + body, check code already removed).

    Picks the layout: the one bit 14 announces if header + declared body length fill the
    content exactly, else the other layout if it does, else the announced one.  Raises
    :class:`HeaderTooShortError` when the content cannot hold the chosen header and
    :class:`LengthMismatchError` when the body is not the declared length; both errors carry the
    header when it could be read.
    """
    if len(content) < 4:
        raise HeaderTooShortError(f"{len(content)} bytes cannot hold a header", raw=content)
    msg_id, props = _ID_PROPS.unpack_from(content)
    body_length = props & 0x3FF
    subpackage = bool(props & 0x2000)
    version_flag = bool(props & 0x4000)
    announced = Edition.V2019 if version_flag else Edition.V2013
    other = Edition.V2013 if version_flag else Edition.V2019
    layout = announced
    for candidate in (announced, other):
        if header_size(candidate, subpackage) + body_length == len(content):
            layout = candidate
            break
    size = header_size(layout, subpackage)
    if len(content) < size:
        raise HeaderTooShortError(
            f"{len(content)} bytes cannot hold the {layout.value} header of {size} bytes"
            + (" with sub-package fields" if subpackage else ""),
            raw=content,
        )
    if layout is Edition.V2019:
        protocol_version: int | None = content[4]
        phone = content[5:15].hex()
        (serial,) = _SERIAL.unpack_from(content, 15)
    else:
        protocol_version = None
        phone = content[4:10].hex()
        (serial,) = _SERIAL.unpack_from(content, 10)
    total = index = None
    if subpackage:
        total, index = _PACKAGE_WORDS.unpack_from(content, size - _PACKAGE_SIZE)
    header = Header(
        msg_id=msg_id,
        body_length=body_length,
        phone=phone,
        serial=serial,
        layout=layout,
        version_flag=version_flag,
        protocol_version=protocol_version,
        encryption=(props >> 10) & 0b111,
        subpackage=subpackage,
        package_total=total,
        package_index=index,
        reserved_bit=bool(props & 0x8000),
    )
    actual = len(content) - size
    if actual != body_length:
        raise LengthMismatchError(
            f"body-length field says {body_length}, actual body is {actual} byte(s)",
            header=header,
            raw=content,
        )
    return header


def parse_header_reference(content: bytes, layout: Edition) -> Header:
    """The header read with the construct schemas of the standard's table (tests compare)."""
    schema = HEADER_2019 if layout is Edition.V2019 else HEADER_2013
    parsed = schema.parse(content)
    props = parsed.properties
    package = parsed.package
    return Header(
        msg_id=parsed.msg_id,
        body_length=props.body_length,
        phone=parsed.phone,
        serial=parsed.serial,
        layout=layout,
        version_flag=props.version_flag,
        protocol_version=parsed.get("protocol_version"),
        encryption=props.encryption,
        subpackage=props.subpackage,
        package_total=package.total if package is not None else None,
        package_index=package.index if package is not None else None,
        reserved_bit=props.reserved,
    )


def build_header(header: Header) -> bytes:
    """Encode ``header``; ``version_flag`` is written as given (normally layout is V2019)."""
    if not 0 <= header.body_length <= 0x3FF:
        raise LocalProtocolError(f"body of {header.body_length} bytes needs sub-packaging")
    if header.subpackage != (header.package_total is not None):
        raise LocalProtocolError("sub-package flag and package fields must go together")
    if not 0 <= header.encryption <= 0b111:
        raise LocalProtocolError(f"encryption {header.encryption} does not fit 3 bits")
    props = (
        header.body_length
        | header.encryption << 10
        | header.subpackage << 13
        | header.version_flag << 14
        | header.reserved_bit << 15
    )
    is_2019 = header.layout is Edition.V2019
    width = 10 if is_2019 else 6
    digits = header.phone.rjust(2 * width, "0")
    if len(digits) != 2 * width:
        raise LocalProtocolError(f"phone {header.phone!r} does not fit BCD[{width}]")
    try:
        phone = bytes.fromhex(digits)
        out = _ID_PROPS.pack(header.msg_id, props)
        if is_2019:
            version = header.protocol_version if header.protocol_version is not None else 1
            out += bytes((version,))
        out += phone + _SERIAL.pack(header.serial)
        if header.subpackage:
            out += _PACKAGE_WORDS.pack(header.package_total, header.package_index)
    except (ValueError, struct.error, TypeError) as exc:
        raise LocalProtocolError(f"cannot build header {header}: {exc}") from exc
    return out


def build_header_reference(header: Header) -> bytes:
    """The header built with the construct schemas (tests compare with :func:`build_header`)."""
    fields = {
        "msg_id": header.msg_id,
        "properties": {
            "reserved": header.reserved_bit,
            "version_flag": header.version_flag,
            "subpackage": header.subpackage,
            "encryption": header.encryption,
            "body_length": header.body_length,
        },
        "phone": header.phone,
        "serial": header.serial,
        "package": (
            {"total": header.package_total, "index": header.package_index}
            if header.subpackage
            else None
        ),
    }
    if header.layout is Edition.V2019:
        fields["protocol_version"] = (
            header.protocol_version if header.protocol_version is not None else 1
        )
        return bytes(HEADER_2019.build(fields))
    return bytes(HEADER_2013.build(fields))
