"""The numpy batch decoder agrees with the declarative path, frame by frame, on any input."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Packet, RemoteProtocolError, StreamDecoder, decode, encode, encode_raw
from protocol.batch import (
    KIND_INVALID,
    KIND_LOCATION,
    KIND_OTHER,
    MILEAGE_ABSENT,
    QUIRK_RAW_7D,
    QUIRK_VERSION_FLAG,
    REASON_ERRORS,
    REASON_FRAME_TOO_LARGE,
    TIME_ABSENT,
    BatchStreamDecoder,
    LocationBatchResult,
    decode_locations,
)
from protocol.codec import QUIRK_VERSION_FLAG as VERSION_FLAG_QUIRK
from protocol.fields import GMT8, bcd_time_to_datetime
from protocol.framing import MAX_ESCAPED_FRAME, frame, unescape
from protocol.framing import QUIRK_RAW_7D as RAW_7D_QUIRK
from protocol.header import Edition, Header, build_header
from protocol.messages.location import (
    GnssSatellites,
    Location,
    LocationBatch,
    LocationReport,
    Mileage,
    RawItem,
    SignalStrength,
)
from tests.vectors import case_ids, load_cases

Event = Packet | RemoteProtocolError
Row = tuple[Any, ...]

# ---------------------------------------------------------------------------------------------
# The comparison


def _location_row(packet: Packet, location: Location, frame: int, position: int, kind: int) -> Row:
    quirks = (QUIRK_RAW_7D if RAW_7D_QUIRK in packet.quirks else 0) | (
        QUIRK_VERSION_FLAG if VERSION_FLAG_QUIRK in packet.quirks else 0
    )
    mileage = location.find(Mileage)
    return (
        frame,
        packet.msg_id,
        position,
        kind,
        packet.header.phone,
        packet.header.serial,
        packet.edition.value,
        quirks,
        location.alarm,
        location.status,
        location.latitude,
        location.longitude,
        location.altitude_m,
        location.speed,
        location.direction,
        TIME_ABSENT if location.time is None else int(location.time.timestamp()),
        mileage.value if isinstance(mileage, Mileage) else MILEAGE_ABSENT,
    )


def _batch_rows(result: LocationBatchResult) -> list[Row]:
    names = [n for n in result.locations.dtype.names or () if n != "phone"]
    rows = []
    for rec in result.locations:
        values = {n: int(rec[n]) for n in names}
        rows.append(
            (
                values["frame"],
                values["msg_id"],
                values["position"],
                values["batch_type"],
                rec["phone"].decode(),
                *(values[n] for n in names[4:]),
            )
        )
    return rows


def _same_event(a: Event, b: Event) -> bool:
    if isinstance(a, RemoteProtocolError) or isinstance(b, RemoteProtocolError):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


def assert_agrees(result: LocationBatchResult, events: list[Event]) -> None:
    """``result`` reports exactly ``events``, the declarative decoder's view of the same bytes."""
    frames = result.frames
    assert frames.size == len(events)
    expected: list[Row] = []
    for index, (row, event) in enumerate(zip(frames, events, strict=True)):
        kind = int(row["kind"])
        if kind == KIND_INVALID:
            assert isinstance(event, REASON_ERRORS[int(row["reason"])]), (index, event)
            assert type(event) is REASON_ERRORS[int(row["reason"])]
            continue
        assert isinstance(event, Packet | RemoteProtocolError)
        if kind == KIND_OTHER:
            # handed to the declarative path, which decodes it as the stream did
            assert _same_event(_decode_or_error(result.wire(index)), event), index
            if isinstance(event, RemoteProtocolError):
                # a body error in a message the batch path leaves to the declarative one
                header = event.header
                assert header is not None
                assert int(row["msg_id"]) == header.msg_id
                batch_judged = header.msg_id in (0x0200, 0x0704)
                assert header.subpackage or header.encryption or not batch_judged
            else:
                assert int(row["msg_id"]) == event.msg_id
                assert not isinstance(event.message, LocationReport)
                assert not (isinstance(event.message, LocationBatch) and event.message.positions)
            continue
        assert kind == KIND_LOCATION
        assert isinstance(event, Packet), (index, event)
        assert int(row["msg_id"]) == event.msg_id
        message = event.message
        if isinstance(message, LocationReport):
            expected.append(_location_row(event, message, index, 0, 0))
        else:
            assert isinstance(message, LocationBatch)
            expected.extend(
                _location_row(event, p, index, i, message.batch_type)
                for i, p in enumerate(message.positions)
            )
    assert _batch_rows(result) == expected


def _decode_or_error(wire: bytes) -> Event:
    try:
        return decode(wire)
    except RemoteProtocolError as exc:
        return exc


def reference(data: bytes, max_frame_bytes: int = MAX_ESCAPED_FRAME) -> StreamDecoder:
    return StreamDecoder(
        max_frame_bytes=max_frame_bytes, max_buffered_bytes=max(len(data), max_frame_bytes)
    )


def check_buffer(data: bytes, max_frame_bytes: int = MAX_ESCAPED_FRAME) -> LocationBatchResult:
    decoder = reference(data, max_frame_bytes)
    decoder.feed(data)
    events = list(decoder)
    result = decode_locations(data, max_frame_bytes=max_frame_bytes)
    assert_agrees(result, events)
    assert len(data) - result.tail_start == decoder.buffered
    assert result.junk_bytes == decoder.junk_bytes
    return result


def check_chunks(chunks: list[bytes], max_frame_bytes: int = MAX_ESCAPED_FRAME) -> None:
    decoder = reference(b"".join(chunks), max_frame_bytes)
    batch = BatchStreamDecoder(max_frame_bytes=max_frame_bytes)
    for chunk in chunks:
        decoder.feed(chunk)
        assert_agrees(batch.feed(chunk), list(decoder))
        assert batch.buffered == decoder.buffered
        assert batch.buffered <= batch.max_tail_bytes
    assert batch.junk_bytes == decoder.junk_bytes


# ---------------------------------------------------------------------------------------------
# Shared vectors

CASES = load_cases()


def _wires(case: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(case[key]) for key in ("hex", "wire_hex") if key in case]


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_vector_agrees_with_reference(case: dict[str, Any]) -> None:
    for wire in _wires(case):
        result = check_buffer(wire)
        if case["msg_id"] == "0x0200" and case["valid"]:
            assert result.locations.size == 1
            assert result.locations["phone"][0].decode() == case["phone"]
            assert int(result.locations["serial"][0]) == case["serial"]
            assert int(result.locations["alarm"][0]) == case["expect"]["alarm"]
        # with junk around it, and one byte at a time
        check_buffer(b"\x00junk\x7d" + wire + b"\x01\x7e" + wire + b"\x7e\x7e" + wire[:-3])
        check_chunks([wire[i : i + 1] for i in range(len(wire))])


def test_all_vectors_in_one_buffer_and_in_chunks() -> None:
    data = b"".join(w for case in CASES for w in _wires(case))
    result = check_buffer(data)
    assert result.locations.size > 0
    assert {int(k) for k in result.frames["kind"]} == {KIND_LOCATION, KIND_OTHER, KIND_INVALID}
    check_chunks([data[i : i + 97] for i in range(0, len(data), 97)])


# ---------------------------------------------------------------------------------------------
# Generated traffic

WIRE_BYTES = (0x7E, 0x7D, 0x01, 0x02, 0x00, 0xFF)
biased_byte = st.sampled_from(WIRE_BYTES) | st.integers(0, 0xFF)
biased_bytes = st.lists(biased_byte, max_size=40).map(bytes)
u8 = st.integers(0, 0xFF)


def _uint(size: int) -> st.SearchStrategy[int]:
    """Unsigned integers whose bytes are often 0x7E/0x7D (so fields need escaping)."""
    return st.lists(biased_byte, min_size=size, max_size=size).map(
        lambda b: int.from_bytes(bytes(b), "big")
    ) | st.integers(0, 256**size - 1)


times = st.none() | st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2099, 12, 31, 23, 59, 59),
    timezones=st.just(GMT8),
).map(lambda t: t.replace(microsecond=0))

items = st.one_of(
    st.builds(Mileage, value=_uint(4)),
    st.builds(SignalStrength, value=u8),
    st.builds(GnssSatellites, value=u8),
    # vendor ids, and standard ids (0x01 among them) with foreign lengths
    st.builds(RawItem, item_id=st.sampled_from([0x01, 0x30, 0xE1, 0x7E]) | u8, data=biased_bytes),
)


@st.composite
def locations(draw: st.DrawFn) -> Location:
    extra = draw(st.lists(items, max_size=5))
    if draw(st.booleans()):  # an item cut short by the end of the body ends the walk
        data = draw(biased_bytes)
        extra.append(RawItem(item_id=draw(u8), data=data, declared_length=len(data) + 1))
    return Location(
        alarm=draw(_uint(4)),
        status=draw(_uint(4)),
        latitude=draw(_uint(4)),
        longitude=draw(_uint(4)),
        altitude_m=draw(_uint(2)),
        speed=draw(_uint(2)),
        direction=draw(_uint(2)),
        time=draw(times),
        items=tuple(extra),
        leftover=draw(st.sampled_from([b"", b"\x01", b"\x7e"])),
    )


def _phone(edition: Edition) -> st.SearchStrategy[str]:
    size = 20 if edition is Edition.V2019 else 12
    return st.text("0123456789abcdef7e7d", min_size=size, max_size=size)


@st.composite
def location_frames(draw: st.DrawFn) -> bytes:
    """A 0x0200 or 0x0704 frame; sometimes with bit 14 wrong or a raw 0x7D check code."""
    edition = draw(st.sampled_from(Edition))
    phone = draw(_phone(edition))
    serial = draw(_uint(2))
    message: LocationReport | LocationBatch
    if draw(st.integers(0, 4)) == 0:
        message = LocationBatch(
            batch_type=draw(u8), positions=tuple(draw(st.lists(locations(), max_size=3)))
        )
    else:
        message = LocationReport.from_location(draw(locations()))
    if draw(st.integers(0, 5)) == 0:  # bit 14 contradicting the layout
        body = message.encode(edition)
        is_2019 = edition is Edition.V2019
        header = Header(
            msg_id=message.msg_id,
            body_length=len(body),
            phone=phone,
            serial=serial,
            layout=edition,
            version_flag=not is_2019,
            protocol_version=draw(u8) if is_2019 else None,
        )
        wire = frame(build_header(header) + body)
    else:
        wire = encode(message, phone=phone, serial=serial, edition=edition)
    if isinstance(message, LocationReport) and draw(st.integers(0, 3)) == 0:
        # Choose the last body byte so that the check code is 0x7D, then send that code
        # unescaped, as some devices do (framing.unescape's raw_7d_before_flag).
        padded = dataclasses.replace(message, leftover=b"\x00")
        wire = encode(padded, phone=phone, serial=serial, edition=edition)
        code = unescape(wire[1:-1])[0][-1]
        fixed = dataclasses.replace(message, leftover=bytes([code ^ 0x7D]))
        wire = encode(fixed, phone=phone, serial=serial, edition=edition)
        assert wire.endswith(b"\x7d\x01\x7e")
        wire = wire[:-3] + b"\x7d\x7e"
    return wire


@st.composite
def other_frames(draw: st.DrawFn) -> bytes:
    """Frames of other ids, bad 0x0200/0x0704 bodies, sub-packages and encrypted bodies."""
    edition = draw(st.sampled_from(Edition))
    package = draw(st.none() | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    return encode_raw(
        draw(st.sampled_from([0x0200, 0x0704, 0x0002, 0x0001, 0x0100]) | _uint(2)),
        draw(biased_bytes | st.binary(min_size=28, max_size=60)),
        phone=draw(_phone(edition)),
        serial=draw(_uint(2)),
        edition=edition,
        encryption=draw(st.sampled_from([0, 0, 0, 1])),
        package=package,
    )


@st.composite
def batch_bodies(draw: st.DrawFn) -> bytes:
    """0x0704 bodies (table 60) built by hand: short positions, counts that disagree, cut ends."""
    positions = draw(
        st.lists(
            st.binary(min_size=25, max_size=31) | locations().map(Location.build_location),
            max_size=3,
        )
    )
    count = draw(st.just(len(positions)) | st.integers(0, 4))
    body = count.to_bytes(2, "big") + bytes([draw(u8)])
    body += b"".join(len(p).to_bytes(2, "big") + p for p in positions) + draw(biased_bytes)
    return body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body


@st.composite
def batch_frames(draw: st.DrawFn) -> bytes:
    edition = draw(st.sampled_from(Edition))
    return encode_raw(
        0x0704, draw(batch_bodies()), phone=draw(_phone(edition)), serial=1, edition=edition
    )


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    part = location_frames() | location_frames() | other_frames() | batch_frames() | biased_bytes
    parts = draw(st.lists(part, min_size=1, max_size=8))
    # a frame may share its opening flag with the previous frame's closing one
    data = b"".join(
        p[1:] if i and p[:1] == b"\x7e" and draw(st.booleans()) else p for i, p in enumerate(parts)
    )
    flips = draw(st.lists(st.tuples(st.integers(0, 2**16), biased_byte), max_size=3))
    if data and flips:
        buf = bytearray(data)
        for at, value in flips:
            buf[at % len(buf)] = value
        data = bytes(buf)
    return data


@settings(max_examples=400)
@given(streams())
def test_generated_traffic_agrees_with_reference(data: bytes) -> None:
    check_buffer(data)


@settings(max_examples=300)
@given(
    streams(),
    st.lists(st.integers(0, 2**16), max_size=6),
    st.sampled_from([MAX_ESCAPED_FRAME, 64, 30]),
)
def test_chunked_stream_agrees_with_reference(data: bytes, cuts: list[int], max_frame: int) -> None:
    """Per-connection use: any split into reads, including an oversize-frame cap."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    check_chunks(chunks, max_frame)


# Bytes 0xF0-0xFF become 0x7E/0x7D/0x01/0x02, so flags and escapes are frequent; translating
# st.binary is several times cheaper to generate than a list of biased bytes.
_FLAGGY = bytes(range(0xF0)) + bytes([0x7E, 0x7D, 0x01, 0x02] * 4)


@settings(max_examples=10_000)
@given(
    st.binary(max_size=120).map(lambda b: b.translate(_FLAGGY)),
    st.sampled_from([MAX_ESCAPED_FRAME, 8]),
)
def test_arbitrary_bytes_never_raise_and_agree(data: bytes, max_frame: int) -> None:
    check_buffer(data, max_frame)


# ---------------------------------------------------------------------------------------------
# Pieces


def _report_with_time(raw_time: bytes) -> bytes:
    body = bytes(22) + raw_time
    return encode_raw(0x0200, body, phone="013800138000", serial=1)


@given(
    st.lists(st.lists(st.integers(0, 0x99) | u8, min_size=6, max_size=6), min_size=1, max_size=50)
)
def test_bcd_time_matches_datetime_checks(raw_times: list[list[int]]) -> None:
    """Digits, month lengths, leap years, hour 24 and second 60, vectorised like datetime()."""
    result = decode_locations(b"".join(_report_with_time(bytes(t)) for t in raw_times))
    for raw, got in zip(raw_times, result.locations["time"], strict=True):
        expected = bcd_time_to_datetime(bytes(raw))
        assert int(got) == (TIME_ABSENT if expected is None else int(expected.timestamp()))


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        ("000229000000", True),  # 2000 is a leap year
        ("010229000000", False),
        ("960229235959", True),
        ("990431120000", False),  # April has 30 days
        ("991231240000", False),
        ("991231235960", False),
        ("000000000000", False),
        ("2a0101000000", False),
        ("991301000000", False),
    ],
)
def test_bcd_time_edges(raw: str, valid: bool) -> None:
    got = int(decode_locations(_report_with_time(bytes.fromhex(raw))).locations["time"][0])
    assert (got != TIME_ABSENT) is valid


def test_oversize_frames_are_reported_and_framing_goes_on() -> None:
    wire = encode(
        LocationReport.from_location(
            Location(
                alarm=0,
                status=0,
                latitude=1,
                longitude=2,
                altitude_m=3,
                speed=4,
                direction=5,
                time=None,
            )
        ),
        phone="013800138000",
        serial=7,
    )
    result = check_buffer(wire + b"\x7e" + bytes(100) + wire + wire, max_frame_bytes=60)
    assert [int(k) for k in result.frames["kind"]] == [
        KIND_LOCATION,
        KIND_INVALID,
        KIND_LOCATION,
        KIND_LOCATION,
    ]
    assert int(result.frames["reason"][1]) == REASON_FRAME_TOO_LARGE
    # an unfinished frame past the cap is dropped; the next read is skipped to its first flag
    check_chunks([wire + b"\x7e" + bytes(100), b"zz" + wire + b"x" + wire], max_frame_bytes=60)


def test_stream_keeps_only_the_unfinished_frame() -> None:
    wire = encode_raw(0x0002, b"", phone="013800138000", serial=1)
    batch = BatchStreamDecoder()
    assert batch.feed(wire[:5]).frames.size == 0
    assert batch.buffered == 5
    result = batch.feed(wire[5:] + wire[:3])
    assert [int(k) for k in result.frames["kind"]] == [KIND_OTHER]
    assert result.wire(0) == wire
    assert batch.buffered == 3
    assert batch.feed(b"\x00" * (MAX_ESCAPED_FRAME + 10)).frames["reason"].tolist() == [
        REASON_FRAME_TOO_LARGE
    ]
    assert batch.buffered == 0


@pytest.mark.parametrize(
    "body",
    ["", "00", "0000", "000001", "000101", "00010100", "0001010000", "000201001c" + "00" * 28],
)
def test_batch_upload_edges(body: str) -> None:
    """0x0704 bodies too short for count and type, empty batches, counts the body lacks."""
    check_buffer(encode_raw(0x0704, bytes.fromhex(body), phone="013800138000", serial=2))
