"""Framing, escaping, headers and the stream decoder's promises."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Packet, RemoteProtocolError, StreamDecoder, decode, encode
from protocol.errors import (
    ChecksumError,
    FrameTooLargeError,
    HeaderTooShortError,
    InvalidEscapeError,
    LengthMismatchError,
    LocalProtocolError,
)
from protocol.fields import GMT8
from protocol.framing import (
    MAX_ESCAPED_FRAME,
    FrameSplitter,
    RawFrame,
    check_code,
    escape,
    frame,
    unescape,
)
from protocol.header import Edition, Header, build_header, parse_header
from protocol.messages.location import LocationReport, Mileage
from protocol.messages.terminal import Heartbeat, TerminalRegisterResponse

PHONE = "013912345678"


def _report(serial: int = 1, edition: Edition = Edition.V2013) -> bytes:
    message = LocationReport(
        alarm=0,
        status=3,
        latitude=25_040_000,
        longitude=102_710_000,
        altitude_m=1890,
        speed=605,
        direction=90,
        time=datetime(2026, 10, 3, 8, 30, tzinfo=GMT8),
        items=(Mileage(value=12345),),
    )
    return encode(message, phone=PHONE, serial=serial, edition=edition)


@given(st.binary(max_size=300))
def test_escape_unescape_identity(data: bytes) -> None:
    escaped = escape(data)
    assert b"\x7e" not in escaped
    assert unescape(escaped) == (data, False)


def test_escape_examples_from_the_standard() -> None:
    # JT/T 808-2019 clause 6.1: 30 7e 08 7d 55 -> 30 7d 02 08 7d 01 55
    assert escape(bytes.fromhex("307e087d55")) == bytes.fromhex("307d02087d0155")


def test_invalid_escape_is_typed() -> None:
    with pytest.raises(InvalidEscapeError):
        unescape(b"\x01\x7d\x03\x02")
    with pytest.raises(InvalidEscapeError):
        unescape(b"\x7d\x7d\x01")


def test_lone_7d_at_the_end_is_taken_literally() -> None:
    assert unescape(b"\x01\x02\x7d") == (b"\x01\x02\x7d", True)


def test_check_code_is_xor_of_header_and_body() -> None:
    assert check_code(b"") == 0
    assert check_code(b"\x01\x02\x04") == 7


@given(st.lists(st.sampled_from([1, 2, 3, 7, 64, 4096]), min_size=1, max_size=40))
def test_any_chunking_yields_the_same_packets(chunks: list[int]) -> None:
    stream = b"".join(_report(serial=i) for i in range(5))
    expected = [decode(_report(serial=i)) for i in range(5)]
    decoder = StreamDecoder()
    got: list[Packet | RemoteProtocolError] = []
    pos = 0
    index = 0
    while pos < len(stream):
        size = chunks[index % len(chunks)]
        decoder.feed(stream[pos : pos + size])
        got.extend(decoder)
        pos += size
        index += 1
    assert got == expected


def test_shared_flags_between_frames() -> None:
    a, b = _report(serial=1), _report(serial=2)
    decoder = StreamDecoder()
    decoder.feed(a + b[1:])  # 7E a 7E b 7E: one flag between them
    assert [p.serial for p in decoder if isinstance(p, Packet)] == [1, 2]


def test_junk_between_frames_is_skipped_and_counted() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"abc" + _report(1) + b"\x00\x00" + _report(2))
    events = list(decoder)
    assert [e.serial for e in events if isinstance(e, Packet)] == [1, 2]
    assert decoder.junk_bytes == 3
    # the two bytes between the frames arrive between two flags, so they are a (bad) frame
    assert [type(e) for e in events if not isinstance(e, Packet)] == [HeaderTooShortError]


def test_bad_check_code_costs_one_frame_only() -> None:
    good = _report(1)
    content, _ = unescape(good[1:-1])
    bad = frame(content[:-1])[:-2] + bytes((content[-1] ^ 0xFF,)) + b"\x7e"
    decoder = StreamDecoder()
    decoder.feed(good + bad + _report(2))
    events = list(decoder)
    assert isinstance(events[0], Packet)
    assert isinstance(events[1], ChecksumError)
    assert events[1].header is not None
    assert events[1].header.phone == PHONE
    assert isinstance(events[2], Packet)


def test_oversize_frame_is_refused_and_stream_resynchronises() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"\x7e" + b"\x01" * (MAX_ESCAPED_FRAME + 10))
    assert isinstance(decoder.next_event(), FrameTooLargeError)
    assert decoder.buffered == 0
    decoder.feed(b"\x02" * 100 + _report(9))
    events = list(decoder)
    assert [e.serial for e in events if isinstance(e, Packet)] == [9]


def test_frames_after_an_oversize_frame_in_the_same_read_survive() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"\x7e" + b"\x11" * 5000 + _report(3) + _report(4))
    events = list(decoder)
    assert isinstance(events[0], FrameTooLargeError)
    assert [e.serial for e in events[1:] if isinstance(e, Packet)] == [3, 4]


def test_building_a_field_of_the_wrong_type_is_local_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        TerminalRegisterResponse(reply_serial=1, result=0, auth_code=None).encode()


def test_splitter_refuses_to_buffer_past_its_cap() -> None:
    splitter = FrameSplitter(max_frame_bytes=100, max_buffered_bytes=1000)
    splitter.feed(b"\x00" * 1000)
    with pytest.raises(LocalProtocolError):
        splitter.feed(b"\x00")
    assert splitter.next_frame() is None
    assert splitter.buffered == 0
    splitter.feed(b"\x7e\x01\x7e")
    frame_ = splitter.next_frame()
    assert isinstance(frame_, RawFrame)
    assert frame_.content == b"\x01"


@settings(max_examples=10_000)
@given(st.binary(max_size=200), st.sampled_from([1, 5, 64, 1000]))
def test_arbitrary_bytes_yield_only_packets_or_typed_errors(data: bytes, chunk: int) -> None:
    decoder = StreamDecoder()
    for pos in range(0, len(data), chunk):
        decoder.feed(data[pos : pos + chunk])
        for event in decoder:
            assert isinstance(event, Packet | RemoteProtocolError)
    assert decoder.buffered <= len(data)


@st.composite
def frames_with_flags(draw: st.DrawFn) -> bytes:
    """Structured fuzz: a plausible header with a random body, flags and check code right."""
    msg_id = draw(st.sampled_from([0x0001, 0x0100, 0x0102, 0x0200, 0x0704, 0x0801, 0x8103]))
    body = draw(st.binary(max_size=120))
    props = len(body) | (draw(st.integers(0, 0x3F)) << 10)
    two019 = draw(st.booleans())
    head = msg_id.to_bytes(2, "big") + props.to_bytes(2, "big")
    head += (b"\x01" + bytes(10)) if two019 else bytes(6)
    head += b"\x00\x01"
    if props & 0x2000:
        head += draw(st.binary(min_size=4, max_size=4))
    return frame(head + body)


@settings(max_examples=2_000)
@given(frames_with_flags())
def test_plausible_frames_yield_only_packets_or_typed_errors(wire: bytes) -> None:
    decoder = StreamDecoder()
    decoder.feed(wire)
    events = list(decoder)
    assert len(events) == 1
    assert isinstance(events[0], Packet | RemoteProtocolError)


def test_header_layout_follows_the_declared_length() -> None:
    header = Header(msg_id=0x0002, body_length=0, phone=PHONE, serial=5)
    content = build_header(header)
    assert parse_header(content) == header
    # the same 2013 header with bit 14 set: the length says 2013 layout
    flagged = content[:2] + bytes((content[2] | 0x40,)) + content[3:]
    parsed = parse_header(flagged)
    assert parsed.layout is Edition.V2013
    assert parsed.flag_mismatch


def test_length_mismatch_carries_the_header() -> None:
    header = Header(msg_id=0x0002, body_length=3, phone=PHONE, serial=5)
    with pytest.raises(LengthMismatchError) as info:
        parse_header(build_header(header) + b"\x00")
    assert info.value.header is not None
    assert info.value.header.msg_id == 0x0002


@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0x3FF),
    st.from_regex(r"[0-9]{12}", fullmatch=True),
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.integers(0, 7),
    st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))),
)
def test_header_round_trip(
    msg_id: int,
    length: int,
    phone: str,
    serial: int,
    is_2019: bool,
    encryption: int,
    package: tuple[int, int] | None,
) -> None:
    header = Header(
        msg_id=msg_id,
        body_length=length,
        phone=phone.rjust(20, "0") if is_2019 else phone,
        serial=serial,
        layout=Edition.V2019 if is_2019 else Edition.V2013,
        version_flag=is_2019,
        protocol_version=1 if is_2019 else None,
        encryption=encryption,
        subpackage=package is not None,
        package_total=package[0] if package else None,
        package_index=package[1] if package else None,
    )
    assert parse_header(build_header(header) + bytes(length)) == header


def test_heartbeat_2019_round_trip() -> None:
    wire = encode(Heartbeat(), phone="12345678901234567890", serial=65535, edition=Edition.V2019)
    assert wire.hex() == "7e000240000112345678901234567890ffff437e"
    assert decode(wire).message == Heartbeat()
