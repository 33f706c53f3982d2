"""Text, events, questions, information service, telephone and vehicle control.

Clause numbers are those of JT/T 808-2013 (8.23 text message dispatch 0x8300 to 8.33 vehicle
control 0x8500).  JT/T 808-2019 keeps 0x8300, 0x8400, 0x8401 and 0x8500, changes 0x8300 (a
text type BYTE follows the flag; flag bits 0-1 become the urgency) and 0x8500 (a WORD count of
typed controls instead of one flag byte), and deletes 0x8301, 0x0301, 0x8302, 0x0302, 0x8303,
0x0303 and 0x8304 (2019 appendix B, message comparison).  Devices built to 2013 still send and
answer those, so they are decoded for every edition with the 2013 layout.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Self

from construct import (
    Construct,
    ConstructError,
    PrefixedArray,
    Struct,
)

from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import (
    BYTE,
    IS_2019,
    WORD,
    CappedText,
    OptionalTail,
    PrefixedText,
    UntilEnd,
    present_if,
)
from protocol.header import Edition
from protocol.messages.base import Message, Record, register

# Setting types shared by 0x8301, 0x8303 and 0x8401 (2013 8.24, 8.28, 8.32).
SETTING_DELETE_ALL = 0  # for 0x8301 the standard says no further bytes follow
SETTING_UPDATE = 1  # delete all, then add the items given
SETTING_APPEND = 2
SETTING_MODIFY = 3
SETTING_DELETE_SOME = 4  # 0x8301 only: events given by id, content empty

# ---------------------------------------------------------------------------------------------
# 0x8300 text message dispatch

# 2011/2013 flag bits (2013 8.23).
TEXT_EMERGENCY = 1 << 0  # 2011/2013 only; 2019 moves the urgency to bits 0-1 below
TEXT_DISPLAY = 1 << 2  # show on the terminal display
TEXT_TTS = 1 << 3  # read aloud by TTS
TEXT_AD_SCREEN = 1 << 4  # advertising screen (2011/2013; reserved in 2019)
TEXT_CAN_FAULT = 1 << 5  # 0 = centre navigation information, 1 = CAN fault code (2013+)
# 2019 flag bits 0-1: 1 service, 2 emergency, 3 notification.
TEXT_KIND_MASK = 0b11
TEXT_KIND_SERVICE = 1
TEXT_KIND_EMERGENCY = 2
TEXT_KIND_NOTIFICATION = 3
# 2019 text type byte.
TEXT_TYPE_NOTIFICATION = 1
TEXT_TYPE_SERVICE = 2
# "at most 1024 bytes, GBK encoded" (2013 8.23 and 2019).
TEXT_MAX_BYTES = 1024

_TEXT_MESSAGE = Struct(
    "flag" / BYTE,
    "text_type" / present_if(IS_2019, BYTE),
    "text" / CappedText(TEXT_MAX_BYTES),
)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TextMessage(Message):
    """0x8300 text message dispatch (2013 8.23; 2019 adds ``text_type``).

    ``flag`` is the raw flag byte (``TEXT_*`` bits; the meaning of bits 0-1 changed in 2019).
    ``text_type`` is 1 notification / 2 service in 2019 bodies and None before.  The text runs
    to the end of the body; at most 1024 bytes are sent.
    """

    MSG_ID: ClassVar[int] = 0x8300
    SCHEMA: ClassVar[Construct] = _TEXT_MESSAGE
    flag: int
    text: str
    text_type: int | None = None


# ---------------------------------------------------------------------------------------------
# 0x8301 / 0x0301 events (2013 8.24-8.25, deleted in 2019)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EventItem(Record):
    """One event of 0x8301: id (an existing id is overwritten) and GBK content."""

    event_id: int
    content: str


_EVENT_ITEM = Struct("event_id" / BYTE, "content" / PrefixedText(BYTE))


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EventSetting(Message):
    """0x8301 event setting (2013 8.24).

    ``setting_type`` is one of ``SETTING_*`` (0 delete all ... 4 delete the listed ids).
    For type 0 the standard sends no bytes after the type; other implementations send a zero
    count.  ``events`` is None when the body ends after the type and a tuple when a count byte
    was present, so both forms re-encode byte for byte.
    """

    MSG_ID: ClassVar[int] = 0x8301
    SCHEMA: ClassVar[Construct] = Struct(
        "setting_type" / BYTE,
        "events" / OptionalTail(PrefixedArray(BYTE, _EVENT_ITEM)),
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"events": EventItem}
    setting_type: int
    events: tuple[EventItem, ...] | None = None


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EventReport(Message):
    """0x0301 event report (2013 8.25): the id of the event the driver chose."""

    MSG_ID: ClassVar[int] = 0x0301
    SCHEMA: ClassVar[Construct] = Struct("event_id" / BYTE)
    event_id: int


# ---------------------------------------------------------------------------------------------
# 0x8302 / 0x0302 questions (2013 8.26-8.27, deleted in 2019)

# 0x8302 flag bits (2013 8.26).
QUESTION_EMERGENCY = 1 << 0
QUESTION_TTS = 1 << 3
QUESTION_AD_SCREEN = 1 << 4


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Answer(Record):
    """A candidate answer of 0x8302: id BYTE, text with a WORD length."""

    answer_id: int
    content: str


_ANSWER = Struct("answer_id" / BYTE, "content" / PrefixedText(WORD))


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuestionDispatch(Message):
    """0x8302 question dispatch (2013 8.26).

    The candidate answers have no count: they run to the end of the body.
    """

    MSG_ID: ClassVar[int] = 0x8302
    SCHEMA: ClassVar[Construct] = Struct(
        "flag" / BYTE,
        "question" / PrefixedText(BYTE),
        "answers" / UntilEnd(_ANSWER),
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"answers": Answer}
    flag: int
    question: str
    answers: tuple[Answer, ...] = ()


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuestionAnswer(Message):
    """0x0302 question answer (2013 8.27): serial of the 0x8302 and the chosen answer id."""

    MSG_ID: ClassVar[int] = 0x0302
    SCHEMA: ClassVar[Construct] = Struct("reply_serial" / WORD, "answer_id" / BYTE)
    reply_serial: int
    answer_id: int


# ---------------------------------------------------------------------------------------------
# 0x8303 / 0x0303 / 0x8304 information on demand (2013 8.28-8.30, deleted in 2019)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InfoMenuItem(Record):
    """An on-demand menu entry of 0x8303: information type and its name."""

    info_type: int
    name: str


_INFO_MENU_ITEM = Struct("info_type" / BYTE, "name" / PrefixedText(WORD))


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InfoMenuSetting(Message):
    """0x8303 information on-demand menu setting (2013 8.28).

    ``setting_type``: 0 delete all, 1 update, 2 append, 3 modify.  ``items`` is None when the
    body ends after the type (as some platforms send "delete all"), see :class:`EventSetting`.
    """

    MSG_ID: ClassVar[int] = 0x8303
    SCHEMA: ClassVar[Construct] = Struct(
        "setting_type" / BYTE,
        "items" / OptionalTail(PrefixedArray(BYTE, _INFO_MENU_ITEM)),
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"items": InfoMenuItem}
    setting_type: int
    items: tuple[InfoMenuItem, ...] | None = None


INFO_CANCEL = 0
INFO_DEMAND = 1


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InfoDemand(Message):
    """0x0303 information demand/cancel (2013 8.29): ``flag`` 0 cancel, 1 demand."""

    MSG_ID: ClassVar[int] = 0x0303
    SCHEMA: ClassVar[Construct] = Struct("info_type" / BYTE, "flag" / BYTE)
    info_type: int
    flag: int


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InfoService(Message):
    """0x8304 information service (2013 8.30): type, then GBK content with a WORD length."""

    MSG_ID: ClassVar[int] = 0x8304
    SCHEMA: ClassVar[Construct] = Struct("info_type" / BYTE, "content" / PrefixedText(WORD))
    info_type: int
    content: str


# ---------------------------------------------------------------------------------------------
# 0x8400 / 0x8401 telephone (2013 8.31-8.32, unchanged in 2019)

CALLBACK_NORMAL = 0  # ordinary call
CALLBACK_MONITOR = 1  # listen-in
# "telephone number, at most 20 bytes" (2013 8.31).
PHONE_MAX_BYTES = 20


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PhoneCallback(Message):
    """0x8400 telephone callback (2013 8.31): flag 0 call / 1 monitor, number to the end."""

    MSG_ID: ClassVar[int] = 0x8400
    SCHEMA: ClassVar[Construct] = Struct("flag" / BYTE, "phone" / CappedText(PHONE_MAX_BYTES))
    flag: int
    phone: str


CONTACT_INCOMING = 1
CONTACT_OUTGOING = 2
CONTACT_BOTH = 3


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Contact(Record):
    """A phone-book entry: ``flag`` 1 incoming, 2 outgoing, 3 both; number and name."""

    flag: int
    number: str
    name: str


_CONTACT = Struct("flag" / BYTE, "number" / PrefixedText(BYTE), "name" / PrefixedText(BYTE))


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PhoneBook(Message):
    """0x8401 set phone book (2013 8.32).

    ``setting_type``: 0 delete all, 1 update (replace all), 2 append, 3 modify (by contact).
    ``contacts`` is None when the body ends after the type, see :class:`EventSetting`.
    """

    MSG_ID: ClassVar[int] = 0x8401
    SCHEMA: ClassVar[Construct] = Struct(
        "setting_type" / BYTE,
        "contacts" / OptionalTail(PrefixedArray(BYTE, _CONTACT)),
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"contacts": Contact}
    setting_type: int
    contacts: tuple[Contact, ...] | None = None


# ---------------------------------------------------------------------------------------------
# 0x8500 vehicle control (2013 8.33; changed in 2019)

CONTROL_FLAG_DOOR_LOCK = 1 << 0  # 2011/2013 flag bit 0: 0 unlock doors, 1 lock doors
CONTROL_DOOR = 0x0001  # 2019 control type: vehicle door, one BYTE parameter
# Parameter sizes of the control types the 2019 standard defines.  0x0002-0x8000 are reserved
# for revisions and 0xF001-0xFFFF are vendor types, whose sizes we cannot know.
CONTROL_PARAM_SIZES: dict[int, int] = {CONTROL_DOOR: 1}

_VEHICLE_CONTROL_2013 = Struct("control_flag" / BYTE)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ControlItem(Record):
    """One 2019 control: type id WORD and its parameter bytes (for 0x0001 one byte)."""

    control_id: int
    params: bytes

    @property
    def known(self) -> bool:
        return self.control_id in CONTROL_PARAM_SIZES


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VehicleControl(Message):
    """0x8500 vehicle control.

    2011/2013 (8.33): one ``control_flag`` byte (bit 0: 0 unlock, 1 lock the doors).
    2019: a WORD count and that many controls, each a type id WORD and parameters whose size
    the type decides.  Parameters carry no length, so the walk can only continue past types it
    knows: an unknown type takes the rest of the body as its parameters and ends the walk.
    When that leaves fewer controls than the count announced, ``declared_count`` keeps the
    count so the body re-encodes byte for byte; otherwise it is None and the count is derived.
    """

    MSG_ID: ClassVar[int] = 0x8500
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"controls": ControlItem}
    control_flag: int | None = None
    controls: tuple[ControlItem, ...] = ()
    declared_count: int | None = None

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        if edition is not Edition.V2019:
            try:
                parsed = _VEHICLE_CONTROL_2013.parse(body)
            except ConstructError as exc:
                raise BodyDecodeError(f"0x8500 body: {exc}") from exc
            return cls(control_flag=parsed.control_flag)
        if len(body) < 2:
            raise BodyDecodeError(f"0x8500 body of {len(body)} bytes has no control count")
        count = int.from_bytes(body[:2], "big")
        controls: list[ControlItem] = []
        pos = 2
        while len(controls) < count:
            if pos + 2 > len(body):
                raise BodyDecodeError(f"0x8500 declares {count} controls, body ends at {pos}")
            control_id = int.from_bytes(body[pos : pos + 2], "big")
            size = CONTROL_PARAM_SIZES.get(control_id)
            end = len(body) if size is None else pos + 2 + size
            if end > len(body):
                raise BodyDecodeError(f"0x8500 control 0x{control_id:04x} overruns the body")
            controls.append(ControlItem(control_id=control_id, params=body[pos + 2 : end]))
            pos = end
            if size is None:
                break
        if pos != len(body):
            raise BodyDecodeError(f"0x8500 has {len(body) - pos} byte(s) after its controls")
        declared = count if count != len(controls) else None
        return cls(controls=tuple(controls), declared_count=declared)

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        if edition is not Edition.V2019:
            if self.controls or self.declared_count is not None:
                raise LocalProtocolError("0x8500 controls are 2019 only; use control_flag")
            if self.control_flag is None or not 0 <= self.control_flag <= 0xFF:
                raise LocalProtocolError("0x8500 needs a control_flag byte before 2019")
            return bytes((self.control_flag,))
        if self.control_flag is not None:
            raise LocalProtocolError("0x8500 control_flag is not part of the 2019 body")
        self._check_controls()
        count = len(self.controls) if self.declared_count is None else self.declared_count
        out = bytearray(count.to_bytes(2, "big"))
        for item in self.controls:
            out += item.control_id.to_bytes(2, "big")
            out += item.params
        return bytes(out)

    def _check_controls(self) -> None:
        """Refuse what the decoder could not read back the same way."""
        for index, item in enumerate(self.controls):
            if not 0 <= item.control_id <= 0xFFFF:
                raise LocalProtocolError(f"control id {item.control_id} does not fit a WORD")
            size = CONTROL_PARAM_SIZES.get(item.control_id)
            if size is not None and len(item.params) != size:
                raise LocalProtocolError(
                    f"control 0x{item.control_id:04x} takes {size} parameter byte(s)"
                )
            if size is None and index != len(self.controls) - 1:
                raise LocalProtocolError(
                    f"control 0x{item.control_id:04x} has no known size and must come last"
                )
        if self.declared_count is not None:
            if not len(self.controls) < self.declared_count <= 0xFFFF:
                raise LocalProtocolError("declared_count must exceed the controls present")
            if not self.controls or self.controls[-1].known:
                raise LocalProtocolError("declared_count needs a last control of unknown size")
        elif len(self.controls) > 0xFFFF:
            raise LocalProtocolError("too many controls for a WORD count")
