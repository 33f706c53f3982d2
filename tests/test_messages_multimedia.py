"""Multimedia messages (0x0800-0x8805)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import decode, decode_body, encode, encode_split
from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.base import REGISTRY, Fragment, Message, RawMessage
from protocol.messages.location import Location, Mileage
from protocol.messages.multimedia import (
    SHOOT_FAILED,
    SHOOT_OK,
    CameraShoot,
    CameraShootResponse,
    MediaSearch,
    MediaSearchItem,
    MediaSearchResponse,
    MultimediaData,
    MultimediaEvent,
    MultimediaUploadResponse,
    RecordingStart,
    SingleMediaUpload,
    StoredMediaUpload,
)
from tests.vectors import case_ids, check_standard_keys, load_cases

MSG_IDS = {0x0800, 0x0801, 0x8800, 0x8801, 0x0805, 0x8802, 0x0802, 0x8803, 0x8804, 0x8805}
CASES = [
    c for c in load_cases() if c["valid"] and c.get("msg_id") and int(c["msg_id"], 16) in MSG_IDS
]
BY_ID = {c["id"]: c for c in CASES}
PHONE = "013912345678"

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
bcd_times = st.none() | st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59)
).map(lambda d: d.replace(microsecond=0, tzinfo=GMT8))
locations = st.builds(
    Location,
    alarm=u32,
    status=u32,
    latitude=u32,
    longitude=u32,
    altitude_m=u16,
    speed=u16,
    direction=u16,
    time=bcd_times,
)

POSITION = Location(
    alarm=0,
    status=3,
    latitude=25_040_000,
    longitude=102_710_000,
    altitude_m=1890,
    speed=605,
    direction=90,
    time=datetime(2026, 10, 3, 8, 30, tzinfo=GMT8),
)


def _message(case_id: str) -> Any:
    return decode(bytes.fromhex(BY_ID[case_id]["hex"])).message


# ---------------------------------------------------------------------------------------------
# Shared vectors


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_vector_decodes_to_our_message_and_reencodes(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    packet = decode(wire)
    check_standard_keys(packet, case["expect"])
    message = packet.message
    if packet.header.subpackage:
        # one package of a series: the body is only decoded once the series is complete
        assert isinstance(message, Fragment)
        assert len(message.data) == packet.header.body_length
        return
    if packet.header.encryption:
        assert isinstance(message, RawMessage)
        return
    assert type(message) is REGISTRY[packet.msg_id]
    rebuilt = encode(
        message,
        phone=packet.phone,
        serial=packet.serial,
        edition=packet.edition,
        protocol_version=packet.header.protocol_version or 1,
    )
    assert rebuilt == wire


def test_yezhihao_0800() -> None:
    expect = BY_ID["yzh-0800-2019"]["expect"]
    message = _message("yzh-0800-2019")
    assert isinstance(message, MultimediaEvent)
    assert message.media_id == expect["yezhihao:id"]
    assert message.media_type == expect["yezhihao:type"]
    assert message.media_format == expect["yezhihao:format"]
    assert message.event == expect["yezhihao:event"]
    assert message.channel == expect["yezhihao:channelId"]


def test_yezhihao_0801_with_position() -> None:
    expect = BY_ID["yzh-0801-2019"]["expect"]
    message = _message("yzh-0801-2019")
    assert isinstance(message, MultimediaData)
    assert message.media_id == expect["yezhihao:id"]
    assert message.media_type == expect["yezhihao:type"]
    assert message.media_format == expect["yezhihao:format"]
    assert message.event == expect["yezhihao:event"]
    assert message.channel == expect["yezhihao:channelId"]
    assert message.data.hex() == expect["yezhihao:packet"]
    location, theirs = message.location, expect["yezhihao:location"]
    assert isinstance(location, Location)
    assert location.items == ()
    assert location.alarm == theirs["warnBit"]
    assert location.status == theirs["statusBit"]
    assert location.latitude == theirs["latitude"]
    assert location.longitude == theirs["longitude"]
    assert location.altitude_m == theirs["altitude"]
    assert location.speed == theirs["speed"]
    assert location.direction == theirs["direction"]
    assert location.time is not None
    assert location.time.replace(tzinfo=None).isoformat() == theirs["deviceTime"]


def test_yezhihao_0805() -> None:
    expect = BY_ID["yzh-0805-2013"]["expect"]
    message = _message("yzh-0805-2013")
    assert isinstance(message, CameraShootResponse)
    assert message.reply_serial == expect["yezhihao:responseSerialNo"]
    assert message.result == expect["yezhihao:result"]
    assert list(message.media_ids or ()) == expect["yezhihao:id"]


def test_yezhihao_8801() -> None:
    expect = BY_ID["yzh-8801-2013"]["expect"]
    message = _message("yzh-8801-2013")
    assert isinstance(message, CameraShoot)
    assert message.channel == expect["yezhihao:channelId"]
    assert message.command == expect["yezhihao:command"]
    assert message.interval_s == expect["yezhihao:time"]
    assert message.save == expect["yezhihao:save"]
    assert message.resolution == expect["yezhihao:resolution"]
    assert message.quality == expect["yezhihao:quality"]
    assert message.brightness == expect["yezhihao:brightness"]
    assert message.contrast == expect["yezhihao:contrast"]
    assert message.saturation == expect["yezhihao:saturation"]
    assert message.chroma == expect["yezhihao:chroma"]


@pytest.mark.parametrize(
    "case_id", ["smallchi-8800-retransmit", "smallchi-8800-retransmit-serialized"]
)
def test_smallchi_8800(case_id: str) -> None:
    message = _message(case_id)
    assert isinstance(message, MultimediaUploadResponse)
    assert message.media_id == 0x81
    assert message.retransmit_ids == (0x0102, 0x0304)
    expect = BY_ID[case_id]["expect"]
    if "smallchi:MultimediaId" in expect:
        assert message.media_id == expect["smallchi:MultimediaId"]
        assert len(message.retransmit_ids) == expect["smallchi:RetransmitPackageCount"]
        # SmallChi lists the id bytes, not the WORD ids
        raw = b"".join(i.to_bytes(2, "big") for i in message.retransmit_ids)
        assert list(raw) == expect["smallchi:RetransmitPackageIds"]


# ---------------------------------------------------------------------------------------------
# Sub-packaged uploads


def test_subpackaged_upload_reassembles_to_the_message() -> None:
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 12 + b"\xff\xd9"
    message = MultimediaData(
        media_id=42,
        media_type=0,
        media_format=0,
        event=1,
        channel=1,
        location=POSITION,
        data=photo,
    )
    frames = encode_split(message, phone=PHONE, first_serial=100, max_body=512)
    packets = [decode(f) for f in frames]
    assert len(packets) > 1
    assert all(isinstance(p.message, Fragment) for p in packets)
    first = packets[0]
    assert first.header.package_index == 1
    assert first.header.package_total == len(frames)
    # the first package holds the fixed part: ids, codes and the position
    head = MultimediaData.decode(first.message.encode()[:36], Edition.V2013)
    assert head.media_id == 42
    assert head.location == POSITION
    body = b"".join(p.message.encode() for p in packets)
    decoded, edition = decode_body(0x0801, body, first.edition)
    assert edition is Edition.V2013
    assert decoded == message


# ---------------------------------------------------------------------------------------------
# Editions and layout details


def test_0801_layouts() -> None:
    message = MultimediaData(
        media_id=7,
        media_type=0,
        media_format=0,
        event=0,
        channel=2,
        location=POSITION,
        data=b"\xff\xd8\xff\xe0",
    )
    body = message.encode(Edition.V2013)
    assert body[:8] == bytes.fromhex("0000000700000002")
    assert body[8:36] == POSITION.build_location()
    assert body[36:] == b"\xff\xd8\xff\xe0"
    assert MultimediaData.decode(body, Edition.V2019) == message


def test_0801_2011_has_no_position() -> None:
    message = MultimediaData(
        media_id=7,
        media_type=0,
        media_format=0,
        event=0,
        channel=2,
        data=b"\xff\xd8\xff\xe0" + bytes(40),
    )
    body = message.encode(Edition.V2011)
    assert body == bytes.fromhex("0000000700000002") + message.data
    # a JPEG right after the eight header bytes marks a 2011 body under a 2013 header
    packet = decode(encode(message, phone=PHONE, serial=1, edition=Edition.V2011))
    assert packet.edition is Edition.V2011
    assert packet.message == message
    with pytest.raises(LocalProtocolError):
        MultimediaData(
            media_id=1, media_type=0, media_format=0, event=0, channel=1, location=POSITION
        ).encode(Edition.V2011)
    with pytest.raises(LocalProtocolError):
        MultimediaData(media_id=1, media_type=0, media_format=0, event=0, channel=1).encode(
            Edition.V2013
        )


def test_position_with_items_is_refused() -> None:
    with_items = Location(**{**POSITION.location_fields(), "items": (Mileage(value=5),)})
    message = MultimediaData(
        media_id=1, media_type=0, media_format=0, event=0, channel=1, location=with_items
    )
    with pytest.raises(LocalProtocolError):
        message.encode()


def test_0802_editions() -> None:
    item = MediaSearchItem(media_id=9, media_type=0, channel=1, event=2, location=POSITION)
    message = MediaSearchResponse(reply_serial=5, items=(item, item))
    body = message.encode(Edition.V2013)
    assert len(body) == 4 + 2 * 35
    assert body[:4] == bytes.fromhex("00050002")
    assert decode(encode(message, phone=PHONE, serial=1)).message == message
    old_item = MediaSearchItem(media_id=None, media_type=0, channel=1, event=2, location=POSITION)
    old = MediaSearchResponse(reply_serial=5, items=(old_item,))
    assert len(old.encode(Edition.V2011)) == 4 + 31
    packet = decode(encode(old, phone=PHONE, serial=1, edition=Edition.V2011))
    assert packet.edition is Edition.V2011
    assert packet.message == old
    with pytest.raises(LocalProtocolError):
        message.encode(Edition.V2011)


def test_0805_failure_with_and_without_count() -> None:
    standard = bytes.fromhex("001001")
    message = CameraShootResponse.decode(standard, Edition.V2013)
    assert message == CameraShootResponse(reply_serial=16, result=SHOOT_FAILED)
    assert message.encode() == standard
    loose = bytes.fromhex("0010010000")
    message = CameraShootResponse.decode(loose, Edition.V2013)
    assert message.media_ids == ()
    assert message.encode() == loose
    with pytest.raises(BodyDecodeError):
        CameraShootResponse.decode(bytes.fromhex("001000"), Edition.V2013)
    with pytest.raises(LocalProtocolError):
        CameraShootResponse(reply_serial=1, result=SHOOT_OK).encode()


def test_8800_count_is_derived() -> None:
    assert MultimediaUploadResponse(media_id=1).encode() == bytes.fromhex("0000000100")
    message = MultimediaUploadResponse(media_id=1, retransmit_ids=(3, 4))
    assert message.encode() == bytes.fromhex("000000010200030004")
    with pytest.raises(LocalProtocolError):
        MultimediaUploadResponse(media_id=1, retransmit_ids=tuple(range(256))).encode()


@pytest.mark.parametrize("edition", [Edition.V2013, Edition.V2019])
def test_8800_with_the_media_id_alone_is_an_empty_list(edition: Edition) -> None:
    # 8.52: every package arrived, count and list left out.
    message = MultimediaUploadResponse.decode(bytes.fromhex("0000002a"), edition)
    assert message == MultimediaUploadResponse(media_id=42, retransmit_ids=())
    assert message.encode(edition) == bytes.fromhex("0000002a00")  # canonical: a count of 0
    short = RawMessage.of(0x8800, bytes.fromhex("0000002a"))  # the same body, on the wire
    frame = encode(short, phone="13800138000", serial=5, edition=edition)
    assert decode(frame).message == message
    # A body too short for the media id is still refused.
    with pytest.raises(BodyDecodeError):
        MultimediaUploadResponse.decode(bytes.fromhex("000000"), edition)


def test_search_without_time_limits() -> None:
    message = MediaSearch(media_type=0, channel=0, event=0)
    assert message.encode() == bytes(15)
    assert MediaSearch.decode(bytes(15), Edition.V2013) == message


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def multimedia_data(draw: st.DrawFn, edition: Edition) -> MultimediaData:
    return MultimediaData(
        media_id=draw(u32),
        media_type=draw(u8),
        media_format=draw(u8),
        event=draw(u8),
        channel=draw(u8),
        location=None if edition is Edition.V2011 else draw(locations),
        data=draw(st.binary(max_size=64)),
    )


def search_items(edition: Edition) -> st.SearchStrategy[MediaSearchItem]:
    return st.builds(
        MediaSearchItem,
        media_id=st.none() if edition is Edition.V2011 else u32,
        media_type=u8,
        channel=u8,
        event=u8,
        location=locations,
    )


@st.composite
def shoot_responses(draw: st.DrawFn) -> CameraShootResponse:
    result = draw(u8)
    ids = st.lists(u32, max_size=10).map(tuple)
    return CameraShootResponse(
        reply_serial=draw(u16),
        result=result,
        media_ids=draw(ids if result == SHOOT_OK else st.none() | ids),
    )


def messages(edition: Edition) -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(
            MultimediaEvent, media_id=u32, media_type=u8, media_format=u8, event=u8, channel=u8
        ),
        multimedia_data(edition),
        st.builds(
            MultimediaUploadResponse,
            media_id=u32,
            retransmit_ids=st.lists(u16, max_size=20).map(tuple),
        ),
        st.builds(
            CameraShoot,
            channel=u8,
            command=u16,
            interval_s=u16,
            save=u8,
            resolution=u8,
            quality=u8,
            brightness=u8,
            contrast=u8,
            saturation=u8,
            chroma=u8,
        ),
        shoot_responses(),
        st.builds(MediaSearch, media_type=u8, channel=u8, event=u8, start=bcd_times, end=bcd_times),
        st.builds(
            MediaSearchResponse,
            reply_serial=u16,
            items=st.lists(search_items(edition), max_size=4).map(tuple),
        ),
        st.builds(
            StoredMediaUpload,
            media_type=u8,
            channel=u8,
            event=u8,
            start=bcd_times,
            end=bcd_times,
            delete=u8,
        ),
        st.builds(RecordingStart, command=u8, duration_s=u16, save=u8, sample_rate=u8),
        st.builds(SingleMediaUpload, media_id=u32, delete=u8),
    )


@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=200)
@given(data=st.data())
def test_round_trip(edition: Edition, data: st.DataObject) -> None:
    message = data.draw(messages(edition))
    body = message.encode(edition)
    assert type(message).decode(body, edition) == message


@pytest.mark.parametrize("cls", [REGISTRY[i] for i in sorted(MSG_IDS)])
@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=100)
@given(body=st.binary(max_size=120))
def test_arbitrary_bodies_decode_or_raise_body_errors(
    cls: type[Message], edition: Edition, body: bytes
) -> None:
    with contextlib.suppress(BodyDecodeError):
        cls.decode(body, edition)
