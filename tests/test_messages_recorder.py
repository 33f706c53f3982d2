"""Recorder, waybill, driver identity and CAN bus messages (0x8700-0x0705)."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import date, datetime, time
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol import decode, encode
from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.base import REGISTRY, Fragment, Message, RawMessage
from protocol.messages.recorder import (
    CARD_INSERTED,
    CARD_REMOVED,
    CanBusData,
    CanItem,
    DriverIdentity,
    DriverIdentityRequest,
    ElectronicWaybill,
    RecorderCollect,
    RecorderParams,
    RecorderUpload,
)
from tests.vectors import case_ids, check_standard_keys, load_cases

MSG_IDS = {0x8700, 0x0700, 0x8701, 0x0701, 0x0702, 0x8702, 0x0705}
CASES = [
    c for c in load_cases() if c["valid"] and c.get("msg_id") and int(c["msg_id"], 16) in MSG_IDS
]
BY_ID = {c["id"]: c for c in CASES}
# Device frames whose bodies are not in the form our encoder writes (see the tests below).
NON_CANONICAL = {"smallchi-0702-2013-device"}
PHONE = "013912345678"

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
bcd_times = st.none() | st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59)
).map(lambda d: d.replace(microsecond=0, tzinfo=GMT8))
_TEXT_CHARS = st.sampled_from("张三李四王五中华人民共和国道路运输从业资格证") | st.characters(
    codec="gb18030", exclude_categories=("Cs", "Cc")
)


def gbk_text(max_bytes: int) -> st.SearchStrategy[str]:
    """Texts that fit ``max_bytes`` of GB 18030 and survive NUL stripping."""
    return st.text(_TEXT_CHARS, max_size=max_bytes).filter(
        lambda s: len(s.encode("gb18030")) <= max_bytes
    )


def _packet(case_id: str) -> Any:
    return decode(bytes.fromhex(BY_ID[case_id]["hex"]))


# ---------------------------------------------------------------------------------------------
# Shared vectors


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_vector_decodes_to_our_message_and_reencodes(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    packet = decode(wire)
    check_standard_keys(packet, case["expect"])
    message = packet.message
    if packet.header.subpackage:
        assert isinstance(message, Fragment)
        return
    if packet.header.encryption:
        assert isinstance(message, RawMessage)
        return
    assert type(message) is REGISTRY[packet.msg_id]
    if case["id"] not in NON_CANONICAL:
        rebuilt = encode(
            message,
            phone=packet.phone,
            serial=packet.serial,
            edition=packet.edition,
            protocol_version=packet.header.protocol_version or 1,
        )
        assert rebuilt == wire


def test_yezhihao_0702_card_removed_with_card_fields() -> None:
    # yezhihao's encoder writes every field whatever the status; we read them rather than drop
    # bytes the terminal sent.
    case = BY_ID["yzh-0702-2013"]
    expect = case["expect"]
    packet = _packet("yzh-0702-2013")
    message = packet.message
    assert isinstance(message, DriverIdentity)
    assert packet.edition is Edition.V2013
    assert message.status == expect["yezhihao:status"] == CARD_REMOVED
    assert message.time is not None
    assert message.time.strftime("%y%m%d%H%M%S") == expect["yezhihao:dateTime"]
    assert message.ic_result == expect["yezhihao:cardStatus"]
    assert message.name == expect["yezhihao:name"]
    assert message.qualification == expect["yezhihao:licenseNo"]
    assert message.issuing_org == expect["yezhihao:institution"]
    assert message.validity is not None
    assert message.validity.strftime("%Y%m%d") == expect["yezhihao:licenseValidPeriod"]
    assert message.id_card is None


def test_smallchi_0702_device_frame() -> None:
    # A 2013 header carrying the 2019 body (ID card number at the end); the name and issuing
    # organisation are NUL-padded inside their length prefixes (20 and 24 bytes).
    packet = _packet("smallchi-0702-2013-device")
    message = packet.message
    assert isinstance(message, DriverIdentity)
    assert packet.edition is Edition.V2013
    assert message.status == CARD_INSERTED
    assert message.time == datetime(2026, 4, 9, 17, 27, 39, tzinfo=GMT8)
    assert message.ic_result == 0
    assert message.name == "你好"
    assert message.qualification == "416756199006054349"
    assert message.issuing_org == ""
    assert message.validity == date(2034, 4, 9)
    assert message.id_card == "416756199006054349"
    # Re-encoding writes the texts without the padding: shorter, and the same message again.
    body = message.encode(packet.edition)
    assert len(body) == packet.header.body_length - 16 - 24
    assert DriverIdentity.decode(body, Edition.V2013) == message


def test_yezhihao_0705_can_items() -> None:
    expect = BY_ID["yzh-0705-2013"]["expect"]
    message = _packet("yzh-0705-2013").message
    assert isinstance(message, CanBusData)
    assert len(message.items) == expect["yezhihao:total"]
    # yezhihao fills the BCD[5] from a six-digit string, left-padded with zeros
    assert message.receive_time == expect["yezhihao:dateTime"].rjust(10, "0")
    for item, expected in zip(message.items, expect["yezhihao:items"], strict=True):
        word = item.channel << 31 | item.frame_type << 30 | item.collection_mode << 29
        assert word | item.can_id == expected["id"]
        assert list(item.data) == expected["data"]


# ---------------------------------------------------------------------------------------------
# Layout details


def test_can_id_bits() -> None:
    body = bytes.fromhex("00011230450123e00000010102030405060708")
    message = CanBusData.decode(body, Edition.V2013)
    (item,) = message.items
    assert (item.channel, item.frame_type, item.collection_mode, item.can_id) == (1, 1, 1, 1)
    assert item.extended
    assert message.receive_time_of_day == time(12, 30, 45, 123_000)
    assert message.encode() == body
    odd = CanBusData(receive_time="0000235959", items=())
    assert odd.receive_time_of_day is None  # 5959 ms is not a time of day


def test_can_item_must_fit() -> None:
    bad = CanItem(channel=0, frame_type=0, collection_mode=0, can_id=1 << 29, data=bytes(8))
    with pytest.raises(LocalProtocolError):
        CanBusData(receive_time="0", items=(bad,)).encode()
    short = CanItem(channel=0, frame_type=0, collection_mode=0, can_id=1, data=bytes(7))
    with pytest.raises(LocalProtocolError):
        CanBusData(receive_time="0", items=(short,)).encode()


def test_can_count_beyond_body_is_a_body_error() -> None:
    with pytest.raises(BodyDecodeError):
        CanBusData.decode(bytes.fromhex("00020000000000") + bytes(12), Edition.V2013)


_DRIVER_2013 = DriverIdentity(
    status=CARD_INSERTED,
    time=datetime(2024, 5, 6, 7, 8, 9, tzinfo=GMT8),
    ic_result=0,
    name="张三",
    qualification="QC123",
    issuing_org="某市交通局",
    validity=date(2030, 12, 31),
)


def test_driver_identity_2013_layout() -> None:
    body = _DRIVER_2013.encode(Edition.V2013)
    expected = (
        bytes.fromhex("012405060708090004")
        + "张三".encode("gbk")
        + b"QC123".ljust(20, b"\x00")
        + bytes((10,))
        + "某市交通局".encode("gbk")
        + bytes.fromhex("20301231")
    )
    assert body == expected
    assert DriverIdentity.decode(body, Edition.V2013) == _DRIVER_2013
    # 2019 appends the ID card number
    with_id = dataclasses.replace(_DRIVER_2013, id_card="110101199001011234")
    body_2019 = with_id.encode(Edition.V2019)
    assert body_2019 == expected + b"110101199001011234\x00\x00"
    assert DriverIdentity.decode(body_2019, Edition.V2019) == with_id


def test_driver_identity_short_forms() -> None:
    removed = DriverIdentity(status=CARD_REMOVED, time=datetime(2024, 1, 1, tzinfo=GMT8))
    assert removed.encode() == bytes.fromhex("02240101000000")
    assert DriverIdentity.decode(removed.encode(), Edition.V2019) == removed
    failed = DriverIdentity(status=CARD_INSERTED, time=None, ic_result=2)
    assert failed.encode() == bytes.fromhex("0100000000000002")
    assert DriverIdentity.decode(failed.encode(), Edition.V2013) == failed


def test_driver_identity_needs_its_fields() -> None:
    with pytest.raises(LocalProtocolError):
        DriverIdentity(status=CARD_INSERTED, time=None).encode()  # no IC read result
    with pytest.raises(LocalProtocolError):
        DriverIdentity(status=CARD_INSERTED, time=None, ic_result=0).encode()  # no name
    with pytest.raises(LocalProtocolError):
        DriverIdentity(name="x").encode()  # no status
    with pytest.raises(LocalProtocolError):
        _DRIVER_2013.encode(Edition.V2011)  # 2011 has no status
    with pytest.raises(LocalProtocolError):
        DriverIdentity(name="x", id_card="1", qualification="2").encode(Edition.V2011)


_DRIVER_2011 = DriverIdentity(
    name="李四", id_card="110101199001011234", qualification="Q" * 40, issuing_org="运管处"
)


def test_driver_identity_2011_is_recognised_by_the_codec() -> None:
    body = _DRIVER_2011.encode(Edition.V2011)
    assert len(body) == 1 + 4 + 20 + 40 + 1 + 6
    wire = encode(_DRIVER_2011, phone=PHONE, serial=7, edition=Edition.V2011)
    packet = decode(wire)
    assert packet.edition is Edition.V2011
    assert packet.message == _DRIVER_2011
    # and a 2013 body under the same header stays 2013
    assert decode(encode(_DRIVER_2013, phone=PHONE, serial=8)).edition is Edition.V2013


def test_driver_identity_partial_id_card_is_a_body_error() -> None:
    body = _DRIVER_2013.encode(Edition.V2013) + b"12345"
    with pytest.raises(BodyDecodeError):
        DriverIdentity.decode(body, Edition.V2013)


def test_driver_identity_json() -> None:
    out = _DRIVER_2013.to_json()
    assert out["validity"] == "2030-12-31"
    assert out["time"] == "2024-05-06T07:08:09+08:00"


def test_recorder_layouts() -> None:
    assert RecorderCollect(command=0x08, data=b"\xaa").encode() == b"\x08\xaa"
    assert RecorderUpload(reply_serial=0x1234, command=1, data=b"xy").encode() == b"\x12\x34\x01xy"
    assert RecorderParams(command=0x82).encode() == b"\x82"
    assert ElectronicWaybill(data=b"abc").encode() == b"\x00\x00\x00\x03abc"
    assert DriverIdentityRequest().encode() == b""
    with pytest.raises(BodyDecodeError):
        ElectronicWaybill.decode(b"\x00\x00\x00\x05abc", Edition.V2013)


# ---------------------------------------------------------------------------------------------
# Properties

can_items = st.builds(
    CanItem,
    channel=st.integers(0, 1),
    frame_type=st.integers(0, 1),
    collection_mode=st.integers(0, 1),
    can_id=st.integers(0, (1 << 29) - 1),
    data=st.binary(min_size=8, max_size=8),
)


@st.composite
def driver_identities(draw: st.DrawFn, edition: Edition) -> DriverIdentity:
    if edition is Edition.V2011:
        return DriverIdentity(
            name=draw(gbk_text(30)),
            id_card=draw(gbk_text(20)),
            qualification=draw(gbk_text(40)),
            issuing_org=draw(gbk_text(30)),
        )
    status = draw(st.sampled_from([CARD_INSERTED, CARD_REMOVED]) | u8)
    ic_result = draw(u8 if status == CARD_INSERTED else st.none() | u8)
    fields: dict[str, Any] = {"status": status, "time": draw(bcd_times), "ic_result": ic_result}
    if ic_result == 0:
        fields |= {
            "name": draw(gbk_text(30)),
            "qualification": draw(gbk_text(20)),
            "issuing_org": draw(gbk_text(30)),
            "validity": draw(st.none() | st.dates()),
            "id_card": draw(st.none() | gbk_text(20)),
        }
    return DriverIdentity(**fields)


def messages(edition: Edition) -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(RecorderCollect, command=u8, data=st.binary(max_size=64)),
        st.builds(RecorderUpload, reply_serial=u16, command=u8, data=st.binary(max_size=64)),
        st.builds(RecorderParams, command=u8, data=st.binary(max_size=64)),
        st.builds(ElectronicWaybill, data=st.binary(max_size=64)),
        st.just(DriverIdentityRequest()),
        driver_identities(edition),
        st.builds(
            CanBusData,
            receive_time=st.text("0123456789", min_size=10, max_size=10),
            items=st.lists(can_items, max_size=6).map(tuple),
        ),
    )


@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=200)
@given(data=st.data())
def test_round_trip(edition: Edition, data: st.DataObject) -> None:
    message = data.draw(messages(edition))
    body = message.encode(edition)
    assert type(message).decode(body, edition) == message


@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=100)
@given(data=st.data())
def test_round_trip_through_the_codec(edition: Edition, data: st.DataObject) -> None:
    message = data.draw(messages(edition))
    if isinstance(message, DriverIdentity) and message.status is not None:
        # Only a standard status tells a 2013 body from a 2011 one for certain.
        assume(message.status in (CARD_INSERTED, CARD_REMOVED))
    packet = decode(encode(message, phone=PHONE, serial=1, edition=edition))
    assert packet.message == message
    # 2011 and 2013 share the header; the body tells them apart only where the layouts differ.
    if edition is Edition.V2011 and not isinstance(message, DriverIdentity):
        assert packet.edition is Edition.V2013
    else:
        assert packet.edition is edition


@pytest.mark.parametrize("cls", [REGISTRY[i] for i in sorted(MSG_IDS)])
@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=100)
@given(body=st.binary(max_size=120))
def test_arbitrary_bodies_decode_or_raise_body_errors(
    cls: type[Message], edition: Edition, body: bytes
) -> None:
    with contextlib.suppress(BodyDecodeError):
        cls.decode(body, edition)
