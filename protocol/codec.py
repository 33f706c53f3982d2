"""From wire bytes to typed messages and back.

Order of checks (house rule: frame first, then parse by table): split on 0x7E and unescape
(:mod:`protocol.framing`), verify the XOR check code, read the header and verify the declared
body length (:mod:`protocol.header`), and only then hand the body to the schema registered for
the message id.  Every failure is a :class:`RemoteProtocolError` about that one frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from protocol.errors import (
    ChecksumError,
    FrameError,
    HeaderTooShortError,
    LocalProtocolError,
    RemoteProtocolError,
)
from protocol.framing import (
    DEFAULT_MAX_BUFFERED,
    MAX_ESCAPED_FRAME,
    QUIRK_RAW_7D,
    FrameSplitter,
    RawFrame,
    check_code,
    frame,
    unescape,
)
from protocol.header import ENCRYPTION_NONE, Edition, Header, build_header, parse_header
from protocol.messages.base import REGISTRY, Fragment, Message, RawMessage
from protocol.messages.location import LocationReport

QUIRK_VERSION_FLAG = "version_flag_mismatch"

# The body-length field has 10 bits (clause 4.4.3, table 2).
MAX_BODY = 0x3FF


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """A frame whose check code, header and length are verified; the body is still bytes."""

    header: Header
    body: bytes
    quirks: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Packet:
    """A decoded frame.

    ``edition`` is the edition the body was read as (the header's layout, narrowed to 2011
    where the body says so).  ``body`` is the (reassembled) body, None when the packet was built
    another way.  ``message`` is a :class:`Fragment` for one package of a
    sub-packaged message and a :class:`RawMessage` for unknown ids and encrypted bodies.
    """

    header: Header
    message: Message
    edition: Edition
    quirks: frozenset[str] = field(default_factory=frozenset)
    body: bytes | None = None  # the body bytes it was decoded from, when at hand

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def phone(self) -> str:
        return self.header.phone

    @property
    def serial(self) -> int:
        return self.header.serial


def parse_frame(raw: RawFrame | bytes) -> Frame:
    """Verify a frame's check code, header and declared length.

    ``raw`` is a :class:`RawFrame` from the splitter or the unescaped content between the flags.
    """
    if isinstance(raw, RawFrame):
        content, quirks = raw.content, {QUIRK_RAW_7D} if raw.raw_7d_tail else set()
    else:
        content, quirks = raw, set()
    if len(content) < 2:
        raise HeaderTooShortError(f"{len(content)} bytes cannot hold a header", raw=content)
    data, code = content[:-1], content[-1]
    computed = check_code(data)
    if computed != code:
        header = _header_for_context(data)
        raise ChecksumError(
            f"check code mismatch: frame has 0x{code:02x}, computed 0x{computed:02x}",
            header=header,
            raw=content,
        )
    header = parse_header(data)
    if header.flag_mismatch:
        quirks.add(QUIRK_VERSION_FLAG)
    return Frame(header=header, body=data[header.size :], quirks=frozenset(quirks))


# The fast path of the stream: most frames a server sees are whole, unencrypted 0x0200 whose
# header layout agrees with bit 14 (8.18; clause 4.4.3 for the header).  For those the header
# and the body are read directly; everything else, and any 0x0200 with an odd header, takes the
# general path.  A hypothesis test checks both give the same result on every input.
_LOCATION_REPORT_ID = 0x0200
_PLAIN_PROPS_MASK = 0x3C00 | 0x8000  # encryption, sub-package and reserved bits must be clear
_HEADER_2013_SIZE = 12
_HEADER_2019_SIZE = 17
_SERIAL_AT = struct.Struct(">H")


def _plain_location_report(raw: RawFrame) -> Packet | None:
    """The packet of a plain 0x0200 frame, or None to take the general path."""
    content = raw.content
    if content[:2] != b"\x02\x00" or raw.raw_7d_tail or len(content) < 4:
        return None
    props = content[2] << 8 | content[3]
    if props & _PLAIN_PROPS_MASK:
        return None
    if props & 0x4000:
        size, phone_end, edition = _HEADER_2019_SIZE, 15, Edition.V2019
    else:
        size, phone_end, edition = _HEADER_2013_SIZE, 10, Edition.V2013
    body_length = props & 0x3FF
    if size + body_length + 1 != len(content):
        return None  # a length for the other layout, or a mismatch: the general path decides
    data = content[:-1]
    if check_code(data) != content[-1]:
        return None
    header = Header(
        msg_id=_LOCATION_REPORT_ID,
        body_length=body_length,
        phone=content[phone_end - (10 if size == _HEADER_2019_SIZE else 6) : phone_end].hex(),
        serial=_SERIAL_AT.unpack_from(content, phone_end)[0],
        layout=edition,
        version_flag=edition is Edition.V2019,
        protocol_version=content[4] if size == _HEADER_2019_SIZE else None,
    )
    body = data[size:]
    try:
        message = LocationReport.parse_location(body)
    except RemoteProtocolError as exc:
        exc.header = header
        raise
    return Packet(header=header, message=message, edition=edition, body=body)


def _header_for_context(data: bytes) -> Header | None:
    try:
        return parse_header(data)
    except FrameError as exc:
        return exc.header


def decode_body(msg_id: int, body: bytes, edition: Edition) -> tuple[Message, Edition]:
    """Decode a whole (reassembled) body by message id; unknown ids give a RawMessage."""
    cls = REGISTRY.get(msg_id)
    if cls is None:
        return RawMessage.of(msg_id, body), edition
    edition = cls.refine_edition(body, edition)
    return cls.decode(body, edition), edition


def decode_frame(checked: Frame) -> Packet:
    """Decode the body of a verified frame; body errors carry the header."""
    header = checked.header
    if header.subpackage:
        message: Message = Fragment(fragment_of=header.msg_id, data=checked.body)
        edition = header.layout
    elif header.encryption != ENCRYPTION_NONE:
        message, edition = RawMessage.of(header.msg_id, checked.body), header.layout
    else:
        try:
            message, edition = decode_body(header.msg_id, checked.body, header.layout)
        except RemoteProtocolError as exc:
            exc.header = header
            raise
    return Packet(
        header=header, message=message, edition=edition, quirks=checked.quirks, body=checked.body
    )


def decode(wire: bytes) -> Packet:
    """Decode exactly one wire frame (with its flags).  Raises RemoteProtocolError."""
    if len(wire) < 2 or wire[0] != 0x7E or wire[-1] != 0x7E or 0x7E in wire[1:-1]:
        raise FrameError("expected one frame delimited by 0x7e flags", raw=wire)
    content, raw_tail = unescape(wire[1:-1])
    return decode_frame(
        parse_frame(RawFrame(content=content, raw_7d_tail=raw_tail, wire_size=len(wire) - 2))
    )


def encode(
    message: Message,
    *,
    phone: str,
    serial: int,
    edition: Edition = Edition.V2013,
    protocol_version: int = 1,
    encryption: int = ENCRYPTION_NONE,
) -> bytes:
    """Encode ``message`` as one wire frame.  Bodies over 1023 bytes need :func:`encode_split`."""
    body = message.encode(edition)
    if len(body) > MAX_BODY:
        raise LocalProtocolError(
            f"0x{message.msg_id:04x} body is {len(body)} bytes; use encode_split()"
        )
    return encode_raw(
        message.msg_id,
        body,
        phone=phone,
        serial=serial,
        edition=edition,
        protocol_version=protocol_version,
        encryption=encryption,
    )


def encode_raw(
    msg_id: int,
    body: bytes,
    *,
    phone: str,
    serial: int,
    edition: Edition = Edition.V2013,
    protocol_version: int = 1,
    encryption: int = ENCRYPTION_NONE,
    package: tuple[int, int] | None = None,
) -> bytes:
    """Frame an already-encoded body; ``package`` is (total, index) for a sub-package."""
    is_2019 = edition is Edition.V2019
    header = Header(
        msg_id=msg_id,
        body_length=len(body),
        phone=phone,
        serial=serial,
        layout=Edition.V2019 if is_2019 else Edition.V2013,
        version_flag=is_2019,
        protocol_version=protocol_version if is_2019 else None,
        encryption=encryption,
        subpackage=package is not None,
        package_total=package[0] if package else None,
        package_index=package[1] if package else None,
    )
    return frame(build_header(header) + body)


# 0x8001 platform general response (8.2, table 5): the one reply sent for almost every uplink
# frame, so it has a writer of its own.  The header up to the serial depends only on the
# terminal (phone, layout, protocol version), so a session builds it once.
_GENERAL_RESPONSE_ID = 0x8001
_GENERAL_RESPONSE_BODY = struct.Struct(">HHHB")  # header serial, then reply serial, id, result


def general_response_prefix(phone: str, edition: Edition, protocol_version: int = 1) -> bytes:
    """The 0x8001 header bytes before the serial, for :func:`encode_general_response`."""
    header = build_header(
        Header(
            msg_id=_GENERAL_RESPONSE_ID,
            body_length=5,
            phone=phone,
            serial=0,
            layout=Edition.V2019 if edition is Edition.V2019 else Edition.V2013,
            version_flag=edition is Edition.V2019,
            protocol_version=protocol_version if edition is Edition.V2019 else None,
        )
    )
    return header[:-2]


def encode_general_response(
    prefix: bytes, *, serial: int, reply_serial: int, reply_msg_id: int, result: int
) -> bytes:
    """The same frame as ``encode(PlatformGeneralResponse(...))`` (a test compares them), from
    a :func:`general_response_prefix`, with one struct call."""
    try:
        tail = _GENERAL_RESPONSE_BODY.pack(serial, reply_serial, reply_msg_id, result)
    except struct.error as exc:
        raise LocalProtocolError(f"0x8001 field out of range: {exc}") from exc
    return frame(prefix + tail)


def encode_split(
    message: Message,
    *,
    phone: str,
    first_serial: int,
    edition: Edition = Edition.V2013,
    max_body: int = MAX_BODY,
    protocol_version: int = 1,
) -> list[bytes]:
    """Encode ``message`` as sub-packages of at most ``max_body`` bytes (clause 4.4.3).

    Packages take consecutive serials from ``first_serial`` (wrapping at 0xFFFF) and indexes from
    1.  A body that fits one frame is still sent as a single package when this is called.
    """
    if not 1 <= max_body <= MAX_BODY:
        raise LocalProtocolError(f"max_body must be 1..{MAX_BODY}")
    body = message.encode(edition)
    pieces = [body[i : i + max_body] for i in range(0, len(body), max_body)] or [b""]
    total = len(pieces)
    if total > 0xFFFF:
        raise LocalProtocolError("too many packages for a WORD count")
    return [
        encode_raw(
            message.msg_id,
            piece,
            phone=phone,
            serial=(first_serial + i) & 0xFFFF,
            edition=edition,
            protocol_version=protocol_version,
            package=(total, i + 1),
        )
        for i, piece in enumerate(pieces)
    ]


class StreamDecoder:
    """Sans-IO decoder for one connection's inbound byte stream.

    ``feed`` received bytes, then take events from ``next_event`` (or iterate) until it returns
    None: each event is a :class:`Packet` or the :class:`RemoteProtocolError` for one bad frame.
    A bad frame never stops the stream.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = MAX_ESCAPED_FRAME,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        self._splitter = FrameSplitter(
            max_frame_bytes=max_frame_bytes, max_buffered_bytes=max_buffered_bytes
        )

    @property
    def buffered(self) -> int:
        return self._splitter.buffered

    @property
    def junk_bytes(self) -> int:
        return self._splitter.junk_bytes

    def feed(self, data: bytes) -> None:
        self._splitter.feed(data)

    def next_event(self) -> Packet | RemoteProtocolError | None:
        raw = self._splitter.next_frame()
        if raw is None or isinstance(raw, RemoteProtocolError):
            return raw
        try:
            return _plain_location_report(raw) or decode_frame(parse_frame(raw))
        except RemoteProtocolError as exc:
            return exc

    def __iter__(self) -> Iterator[Packet | RemoteProtocolError]:
        while (event := self.next_event()) is not None:
            yield event
