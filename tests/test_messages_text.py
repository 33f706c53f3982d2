"""Text, event, question, information, telephone and vehicle-control messages (0x8300-0x8500)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import RemoteProtocolError, decode, encode
from protocol.errors import (
    BodyDecodeError,
    LocalProtocolError,
    TextControlError,
    TextDecodeError,
)
from protocol.header import Edition
from protocol.messages import areas, text
from protocol.messages.base import Message
from protocol.messages.text import (
    CONTROL_DOOR,
    CONTROL_PARAM_SIZES,
    Answer,
    Contact,
    ControlItem,
    EventItem,
    EventReport,
    EventSetting,
    InfoDemand,
    InfoMenuItem,
    InfoMenuSetting,
    InfoService,
    PhoneBook,
    PhoneCallback,
    QuestionAnswer,
    QuestionDispatch,
    TextMessage,
    VehicleControl,
)
from tests.vectors import case_ids, load_cases

MY_IDS = {0x8300, 0x8301, 0x0301, 0x8302, 0x0302, 0x8303, 0x0303, 0x8304, 0x8400, 0x8401, 0x8500}
CASES = [c for c in load_cases() if c["valid"] and c["msg_id"] and int(c["msg_id"], 16) in MY_IDS]

# Project-specific expectations that name our fields under another name.
ALIASES = {
    "yezhihao:sign": "flag",
    "yezhihao:content": "text",
    "cuteLittleDevil:Text": "text",
    "cuteLittleDevil:QuestionContent": "question",
}


def _body(wire: bytes) -> tuple[Any, bytes]:
    packet = decode(wire)
    return packet, wire[1:-2][packet.header.size :]


def test_vectors_cover_my_messages() -> None:
    assert {c["id"] for c in CASES} >= {
        "yzh-8300-2013",
        "yzh-8300-2019",
        "cld-8300-flag-ff-gbk",
        "cld-8300-1001-byte-body",
        "smallchi-8300-2013",
        "cld-8302-question",
    }


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_vector_decodes_to_expected_values(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    packet, body = _body(wire)
    message = packet.message
    assert type(message).__module__ == text.__name__
    expect = case["expect"]
    if "flag" in expect:
        assert message.flag == expect["flag"]
    for key, field in ALIASES.items():
        if key in expect:
            assert getattr(message, field) == expect[key], key
    if "yezhihao:type" in expect:
        # yezhihao reports 0 for the 2013 body, which has no text type byte.
        expected_type = expect["yezhihao:type"] if packet.edition is Edition.V2019 else None
        assert message.text_type == expected_type
    if "cuteLittleDevil:AnswerList" in expect:
        assert [(a.answer_id, a.content) for a in message.answers] == [
            (a["AnswerID"], a["AnswerContent"]) for a in expect["cuteLittleDevil:AnswerList"]
        ]
    # all of these bodies are canonical: the body and the whole frame rebuild byte for byte
    assert message.encode(packet.edition) == body
    header = packet.header
    rebuilt = encode(
        message,
        phone=header.phone,
        serial=header.serial,
        edition=packet.edition,
        protocol_version=header.protocol_version or 1,
    )
    assert rebuilt == wire


def test_gbk_text_with_flag_ff_decodes() -> None:
    # cld-8300-flag-ff-gbk carries no note: its text is valid GBK and decodes.
    (case,) = [c for c in CASES if c["id"] == "cld-8300-flag-ff-gbk"]
    message = decode(bytes.fromhex(case["hex"])).message
    assert message == TextMessage(flag=0xFF, text="测试123@456#abc+结束")


def test_0304_is_left_to_the_raw_path() -> None:
    (case,) = [c for c in load_cases() if c["id"] == "smallchi-0304-gbk"]
    message = decode(bytes.fromhex(case["hex"])).message
    assert type(message).__module__ not in (text.__name__, areas.__name__)


# ---------------------------------------------------------------------------------------------
# Hand-written bodies, laid out from the standard's tables


def test_text_message_2019_has_a_type_byte() -> None:
    body = bytes.fromhex("0c02") + "你好".encode("gbk")
    message = TextMessage.decode(body, Edition.V2019)
    assert message == TextMessage(flag=0x0C, text_type=2, text="你好")
    # Read as 2013, the type byte 0x02 would start the text: a control character, refused.
    with pytest.raises(TextControlError, match="U\\+0002 at character 0"):
        TextMessage.decode(body, Edition.V2013)


def test_text_message_rejects_bad_gbk_and_long_text() -> None:
    with pytest.raises(TextDecodeError):
        TextMessage.decode(b"\x01\xff\xff", Edition.V2013)
    with pytest.raises(LocalProtocolError):
        TextMessage(flag=0, text="a" * 1025).encode(Edition.V2013)
    with pytest.raises(LocalProtocolError):
        TextMessage(flag=0, text="x", text_type=1).encode(Edition.V2013)
    with pytest.raises(LocalProtocolError):
        TextMessage(flag=0, text="x").encode(Edition.V2019)


def test_event_setting_delete_all_in_both_forms() -> None:
    short = EventSetting.decode(b"\x00", Edition.V2013)
    assert short == EventSetting(setting_type=0, events=None)
    assert short.encode(Edition.V2013) == b"\x00"
    counted = EventSetting.decode(b"\x00\x00", Edition.V2013)
    assert counted == EventSetting(setting_type=0, events=())
    assert counted.encode(Edition.V2013) == b"\x00\x00"


def test_event_setting_items() -> None:
    body = bytes.fromhex("0102") + b"\x01\x02ab" + b"\x07\x00"
    assert EventSetting.decode(body, Edition.V2013) == EventSetting(
        setting_type=1,
        events=(EventItem(event_id=1, content="ab"), EventItem(event_id=7, content="")),
    )
    with pytest.raises(BodyDecodeError):
        EventSetting.decode(bytes.fromhex("0102010261"), Edition.V2013)


def test_question_answer_with_bad_gbk_is_a_text_error() -> None:
    with pytest.raises(TextDecodeError):
        QuestionDispatch.decode(bytes.fromhex("000131010002ffff"), Edition.V2013)
    with pytest.raises(BodyDecodeError):  # an answer cut short is not silently dropped
        QuestionDispatch.decode(bytes.fromhex("000131010005ffff"), Edition.V2013)


def test_information_and_phone_bodies() -> None:
    assert InfoMenuSetting.decode(bytes.fromhex("0201030002") + b"ab", Edition.V2013) == (
        InfoMenuSetting(setting_type=2, items=(InfoMenuItem(info_type=3, name="ab"),))
    )
    assert InfoDemand.decode(b"\x03\x01", Edition.V2013) == InfoDemand(info_type=3, flag=1)
    assert InfoService.decode(bytes.fromhex("030004") + "天气".encode("gbk"), Edition.V2013) == (
        InfoService(info_type=3, content="天气")
    )
    assert PhoneCallback.decode(b"\x01" + b"13800138000", Edition.V2019) == PhoneCallback(
        flag=1, phone="13800138000"
    )
    with pytest.raises(LocalProtocolError):
        PhoneCallback(flag=0, phone="1" * 21).encode(Edition.V2013)
    book = bytes.fromhex("01010303") + b"110" + b"\x02ab"
    assert PhoneBook.decode(book, Edition.V2013) == PhoneBook(
        setting_type=1, contacts=(Contact(flag=3, number="110", name="ab"),)
    )
    assert QuestionAnswer.decode(b"\x12\x34\x02", Edition.V2013) == QuestionAnswer(
        reply_serial=0x1234, answer_id=2
    )
    assert EventReport.decode(b"\x09", Edition.V2011) == EventReport(event_id=9)


def test_vehicle_control_2013_and_2019() -> None:
    assert VehicleControl.decode(b"\x01", Edition.V2013) == VehicleControl(control_flag=1)
    door = VehicleControl.decode(bytes.fromhex("0001000101"), Edition.V2019)
    assert door == VehicleControl(controls=(ControlItem(control_id=CONTROL_DOOR, params=b"\x01"),))
    assert door.encode(Edition.V2019) == bytes.fromhex("0001000101")


def test_vehicle_control_unknown_type_takes_the_rest() -> None:
    body = bytes.fromhex(
        "0003"  # three controls announced
        "0001"  # door
        "00"  # its parameter
        "f001"  # a vendor type: parameters of unknown size
        "aabb000101"  # ... so the rest is its, including what looks like a third control
    )
    message = VehicleControl.decode(body, Edition.V2019)
    assert message.controls == (
        ControlItem(control_id=CONTROL_DOOR, params=b"\x00"),
        ControlItem(control_id=0xF001, params=bytes.fromhex("aabb000101")),
    )
    assert message.declared_count == 3
    assert message.encode(Edition.V2019) == body


@pytest.mark.parametrize(
    "body",
    ["", "00", "0002000101", "000100", "0001000101ff", "0000ff"],
)
def test_vehicle_control_2019_malformed(body: str) -> None:
    with pytest.raises(BodyDecodeError):
        VehicleControl.decode(bytes.fromhex(body), Edition.V2019)


@pytest.mark.parametrize(
    ("message", "edition"),
    [
        (VehicleControl(), Edition.V2013),
        (
            VehicleControl(control_flag=1, controls=(ControlItem(control_id=1, params=b"\x01"),)),
            Edition.V2013,
        ),
        (VehicleControl(control_flag=1), Edition.V2019),
        (VehicleControl(controls=(ControlItem(control_id=1, params=b""),)), Edition.V2019),
        (
            VehicleControl(
                controls=(
                    ControlItem(control_id=0xF001, params=b"\x01"),
                    ControlItem(control_id=1, params=b"\x01"),
                )
            ),
            Edition.V2019,
        ),
        (
            VehicleControl(controls=(ControlItem(control_id=1, params=b"\x01"),), declared_count=2),
            Edition.V2019,
        ),
        (
            VehicleControl(controls=(ControlItem(control_id=9, params=b""),), declared_count=1),
            Edition.V2019,
        ),
    ],
)
def test_vehicle_control_refuses_what_cannot_be_read_back(
    message: VehicleControl, edition: Edition
) -> None:
    with pytest.raises(LocalProtocolError):
        message.encode(edition)


# ---------------------------------------------------------------------------------------------
# Properties

BYTES8 = st.integers(0, 0xFF)
WORDS = st.integers(0, 0xFFFF)
# Characters that GBK encodes and decodes unchanged: printable ASCII and the CJK unified block.
GBK_CHARS = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5),
)


def gbk(max_size: int) -> st.SearchStrategy[str]:
    """Text of at most ``max_size`` characters (2 bytes each at most)."""
    return st.text(GBK_CHARS, max_size=max_size)


def _text_message(edition: Edition) -> st.SearchStrategy[Message]:
    text_type = BYTES8 if edition is Edition.V2019 else st.none()
    return st.builds(TextMessage, flag=BYTES8, text=gbk(300), text_type=text_type)


def _event_setting(edition: Edition) -> st.SearchStrategy[Message]:
    items = st.lists(st.builds(EventItem, event_id=BYTES8, content=gbk(60)), max_size=8)
    return st.builds(EventSetting, setting_type=BYTES8, events=st.none() | items.map(tuple))


def _question(edition: Edition) -> st.SearchStrategy[Message]:
    answers = st.lists(st.builds(Answer, answer_id=BYTES8, content=gbk(60)), max_size=8)
    return st.builds(QuestionDispatch, flag=BYTES8, question=gbk(100), answers=answers.map(tuple))


def _info_menu(edition: Edition) -> st.SearchStrategy[Message]:
    items = st.lists(st.builds(InfoMenuItem, info_type=BYTES8, name=gbk(60)), max_size=8)
    return st.builds(InfoMenuSetting, setting_type=BYTES8, items=st.none() | items.map(tuple))


def _phone_book(edition: Edition) -> st.SearchStrategy[Message]:
    contact = st.builds(
        Contact, flag=BYTES8, number=st.text("0123456789+", max_size=20), name=gbk(60)
    )
    contacts = st.lists(contact, max_size=8).map(tuple)
    return st.builds(PhoneBook, setting_type=BYTES8, contacts=st.none() | contacts)


@st.composite
def _vehicle_control(draw: st.DrawFn, edition: Edition) -> Message:
    if edition is not Edition.V2019:
        return VehicleControl(control_flag=draw(BYTES8))
    doors = draw(
        st.lists(
            st.builds(
                ControlItem,
                control_id=st.just(CONTROL_DOOR),
                params=st.binary(min_size=1, max_size=1),
            ),
            max_size=5,
        )
    )
    if not draw(st.booleans()):
        return VehicleControl(controls=tuple(doors))
    vendor = ControlItem(
        control_id=draw(st.integers(0, 0xFFFF).filter(lambda i: i not in CONTROL_PARAM_SIZES)),
        params=draw(st.binary(max_size=16)),
    )
    controls = (*doors, vendor)
    declared = draw(st.none() | st.integers(len(controls) + 1, 0xFFFF))
    return VehicleControl(controls=controls, declared_count=declared)


STRATEGIES: dict[str, Callable[[Edition], st.SearchStrategy[Message]]] = {
    "0x8300": _text_message,
    "0x8301": _event_setting,
    "0x0301": lambda e: st.builds(EventReport, event_id=BYTES8),
    "0x8302": _question,
    "0x0302": lambda e: st.builds(QuestionAnswer, reply_serial=WORDS, answer_id=BYTES8),
    "0x8303": _info_menu,
    "0x0303": lambda e: st.builds(InfoDemand, info_type=BYTES8, flag=BYTES8),
    "0x8304": lambda e: st.builds(InfoService, info_type=BYTES8, content=gbk(200)),
    "0x8400": lambda e: st.builds(
        PhoneCallback, flag=BYTES8, phone=st.text("0123456789", max_size=20)
    ),
    "0x8401": _phone_book,
    "0x8500": _vehicle_control,
}
CLASSES: dict[str, type[Message]] = {
    "0x8300": TextMessage,
    "0x8301": EventSetting,
    "0x0301": EventReport,
    "0x8302": QuestionDispatch,
    "0x0302": QuestionAnswer,
    "0x8303": InfoMenuSetting,
    "0x0303": InfoDemand,
    "0x8304": InfoService,
    "0x8400": PhoneCallback,
    "0x8401": PhoneBook,
    "0x8500": VehicleControl,
}


def test_every_message_has_a_strategy() -> None:
    assert set(STRATEGIES) == {f"0x{i:04x}" for i in MY_IDS} == set(CLASSES)
    for name, cls in CLASSES.items():
        assert f"0x{cls.MSG_ID:04x}" == name


@pytest.mark.parametrize("edition", list(Edition), ids=lambda e: str(e.value))
@pytest.mark.parametrize("msg", sorted(STRATEGIES))
@settings(max_examples=80)
@given(data=st.data())
def test_round_trip(msg: str, edition: Edition, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[msg](edition))
    body = message.encode(edition)
    decoded = type(message).decode(body, edition)
    assert decoded == message
    assert decoded.encode(edition) == body


@pytest.mark.parametrize("edition", list(Edition), ids=lambda e: str(e.value))
@pytest.mark.parametrize("msg", sorted(CLASSES))
@settings(max_examples=60)
@given(body=st.binary(max_size=48))
def test_arbitrary_bodies_decode_or_fail_typed(msg: str, edition: Edition, body: bytes) -> None:
    cls = CLASSES[msg]
    try:
        message = cls.decode(body, edition)
    except RemoteProtocolError:
        return
    assert isinstance(message, cls)
