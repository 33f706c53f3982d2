"""Control characters in terminal text fields (STRING, JT/T 808-2019 4.2, table 1).

A NUL or other C0 control character (TAB, LF and CR aside) or DEL inside an uplink text field
is refused with :class:`TextControlError`, carrying the frame's header so the server can answer
0x8001 result 2 to the right serial.  The NUL padding of fixed-width fields, and the trailing
NULs some devices put in length-prefixed fields, are stripped first and stay fine.
"""

from __future__ import annotations

import pytest

from protocol import Edition, Packet, StreamDecoder, decode, encode_raw
from protocol.errors import (
    RESULT_MESSAGE_ERROR,
    RemoteProtocolError,
    TextControlError,
    TextDecodeError,
)
from protocol.fields import decode_text
from protocol.messages.control import TerminalPropertiesResponse
from protocol.messages.params import TerminalParameter
from protocol.messages.recorder import DriverIdentity
from protocol.messages.terminal import TerminalAuth, TerminalRegister
from tests.vectors import load_cases

PHONE_2013 = "013600000020"
PHONE_2019 = "00000000013600000020"
SERIAL = 730


def _frame(msg_id: int, body: bytes, edition: Edition) -> bytes:
    phone = PHONE_2019 if edition is Edition.V2019 else PHONE_2013
    return encode_raw(msg_id, body, phone=phone, serial=SERIAL, edition=edition)


def _fixed(text: bytes, width: int) -> bytes:
    assert len(text) <= width
    return text.ljust(width, b"\x00")


# ---------------------------------------------------------------------------------------------
# Bodies laid out from the standard's tables, with the text fields given as raw bytes


def auth_2013(code: bytes) -> bytes:
    """0x0102, 2011/2013 (table 10): the auth code is the whole body."""
    return code


def auth_2019(
    code: bytes = b"a1b2c3",
    imei: bytes = b"860000000000001",
    firmware: bytes = b"V1.0.2",
) -> bytes:
    """0x0102, 2019 (table 10): length BYTE + code, IMEI BYTE[15], software version BYTE[20]."""
    return bytes((len(code),)) + code + _fixed(imei, 15) + _fixed(firmware, 20)


def register_body(
    edition: Edition,
    *,
    maker: bytes = b"70111",
    model: bytes = b"BSJ-GF-06",
    terminal_id: bytes = b"T100001",
    plate: bytes = "云A12345".encode("gbk"),
) -> bytes:
    """0x0100 (table 7 for 2013, table 8 for 2019): province, city, maker, model, terminal id,
    plate colour and plate."""
    widths = (11, 30, 30) if edition is Edition.V2019 else (5, 20, 7)
    return (
        bytes.fromhex("00350064")  # province 53, city 100
        + _fixed(maker, widths[0])
        + _fixed(model, widths[1])
        + _fixed(terminal_id, widths[2])
        + b"\x01"  # blue plate
        + plate
    )


def driver_body(*, name: bytes = "张三".encode("gbk"), org: bytes = b"YN-TA") -> bytes:
    """0x0702 2013 (table 62): inserted, time, read OK, name, qualification, org, validity."""
    return (
        b"\x01"
        + bytes.fromhex("250603083000")
        + b"\x00"
        + bytes((len(name),))
        + name
        + _fixed(b"530100198001010011", 20)
        + bytes((len(org),))
        + org
        + bytes.fromhex("20301231")
    )


# (case id, message id, edition, body, the field named in the error)
REFUSED = [
    ("0102-2013-nul", 0x0102, Edition.V2013, auth_2013(b"ab\x00cd"), "auth_code"),
    ("0102-2013-soh", 0x0102, Edition.V2013, auth_2013(b"\x01abcd"), "auth_code"),
    ("0102-2013-del", 0x0102, Edition.V2013, auth_2013(b"abc\x7f"), "auth_code"),
    ("0102-2019-code-nul", 0x0102, Edition.V2019, auth_2019(code=b"ab\x00cd"), "auth_code"),
    ("0102-2019-code-esc", 0x0102, Edition.V2019, auth_2019(code=b"ab\x1bcd"), "auth_code"),
    ("0102-2019-imei-nul", 0x0102, Edition.V2019, auth_2019(imei=b"8600\x0000001"), "imei"),
    (
        "0102-2019-firmware-bel",
        0x0102,
        Edition.V2019,
        auth_2019(firmware=b"V1\x07.0"),
        "software_version",
    ),
    (
        "0100-2013-plate-nul",
        0x0100,
        Edition.V2013,
        register_body(Edition.V2013, plate="云A".encode("gbk") + b"\x0012345"),
        "plate",
    ),
    (
        "0100-2013-maker-nul",
        0x0100,
        Edition.V2013,
        register_body(Edition.V2013, maker=b"70\x0011"),
        "manufacturer",
    ),
    (
        "0100-2013-terminal-id-vt",
        0x0100,
        Edition.V2013,
        register_body(Edition.V2013, terminal_id=b"T1\x0b0001"),
        "terminal_id",
    ),
    (
        "0100-2013-model-nul",
        0x0100,
        Edition.V2013,
        register_body(Edition.V2013, model=b"BSJ\x00GF"),
        "model",
    ),
    (
        "0100-2019-plate-nul",
        0x0100,
        Edition.V2019,
        register_body(Edition.V2019, plate="云A".encode("gbk") + b"\x00\x0012345"),
        "plate",
    ),
    (
        "0100-2019-maker-nul",
        0x0100,
        Edition.V2019,
        register_body(Edition.V2019, maker=b"70111\x00ACME"),
        "manufacturer",
    ),
    (
        "0100-2019-terminal-id-nul",
        0x0100,
        Edition.V2019,
        register_body(Edition.V2019, terminal_id=b"\x00T100001"),
        "terminal_id",
    ),
    ("0702-2013-name-nul", 0x0702, Edition.V2013, driver_body(name=b"Z\x00S"), "name"),
    (
        "0702-2013-org-us",
        0x0702,
        Edition.V2013,
        driver_body(org=b"YN\x1fTA"),
        "issuing_org",
    ),
]


@pytest.mark.parametrize(
    ("msg_id", "edition", "body", "field"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_control_character_is_a_typed_error_with_the_header(
    msg_id: int, edition: Edition, body: bytes, field: str
) -> None:
    with pytest.raises(TextControlError) as caught:
        decode(_frame(msg_id, body, edition))
    error = caught.value
    assert error.kind == "text_control"
    assert error.result_code == RESULT_MESSAGE_ERROR
    assert isinstance(error, TextDecodeError)
    assert error.header is not None
    assert error.header.msg_id == msg_id
    assert error.header.serial == SERIAL
    assert error.header.layout is (Edition.V2019 if edition is Edition.V2019 else Edition.V2013)
    assert error.detail.startswith(f"{field}: control character U+")


def test_the_reported_frame_of_the_brief() -> None:
    # An authentication whose code holds a NUL (2013 layout), as a terminal sent it.
    with pytest.raises(TextControlError) as caught:
        decode(bytes.fromhex("7e0102000501360000002002da6162006364cd7e"))
    error = caught.value
    assert error.detail == "auth_code: control character U+0000 at character 2 of 5: 6162006364"
    assert error.header is not None
    assert (error.header.phone, error.header.serial) == ("013600000020", 0x02DA)


ACCEPTED = [
    (0x0102, Edition.V2013, auth_2013(b"a1b2c3"), TerminalAuth(auth_code="a1b2c3")),
    # Devices pad the auth code with NULs; the padding goes.
    (0x0102, Edition.V2013, auth_2013(b"a1b2c3\x00\x00"), TerminalAuth(auth_code="a1b2c3")),
    (0x0102, Edition.V2013, auth_2013(b"ab\tc\r\n"), TerminalAuth(auth_code="ab\tc\r\n")),
    (
        0x0102,
        Edition.V2019,
        auth_2019(code=b"a1b2c3\x00", imei=b"86000000000001", firmware=b"V1.0\n"),
        TerminalAuth(auth_code="a1b2c3", imei="86000000000001", software_version="V1.0\n"),
    ),
    (
        0x0100,
        Edition.V2013,
        register_body(Edition.V2013, plate="云A12345".encode("gbk") + b"\x00\x00"),
        TerminalRegister(
            province=0x35,
            city=0x64,
            manufacturer="70111",
            model="BSJ-GF-06",
            terminal_id="T100001",
            plate_color=1,
            plate="云A12345",
        ),
    ),
    (
        0x0100,
        Edition.V2019,
        register_body(Edition.V2019, maker=b"70111"),
        TerminalRegister(
            province=0x35,
            city=0x64,
            manufacturer="70111",
            model="BSJ-GF-06",
            terminal_id="T100001",
            plate_color=1,
            plate="云A12345",
        ),
    ),
    (
        0x0702,
        Edition.V2013,
        # A length-prefixed name padded with NULs inside its length (as devices send it).
        driver_body(name="张三".encode("gbk") + bytes(16)),
        DriverIdentity.decode(driver_body(), Edition.V2013),
    ),
]


@pytest.mark.parametrize(("msg_id", "edition", "body", "expected"), ACCEPTED)
def test_padding_and_line_layout_characters_still_decode(
    msg_id: int, edition: Edition, body: bytes, expected: object
) -> None:
    assert decode(_frame(msg_id, body, edition)).message == expected


def test_driver_name_of_the_shared_vectors_keeps_decoding() -> None:
    # SmallChi's device frame pads a 4-byte name with 16 NULs inside its 20-byte length.
    (case,) = [c for c in load_cases() if c["id"] == "smallchi-0702-2013-device"]
    message = decode(bytes.fromhex(case["hex"])).message
    assert isinstance(message, DriverIdentity)
    assert message.name == "你好"


def test_terminal_properties_versions_are_checked_too() -> None:
    body = (
        b"\x00\x01"
        + _fixed(b"70111", 5)
        + _fixed(b"M1", 20)
        + _fixed(b"T1", 7)
        + bytes(10)
        + b"\x03HW1"
        + b"\x03F\x00W"
        + b"\x03\x01"
    )
    with pytest.raises(TextControlError, match=r"^firmware_version: "):
        decode(_frame(TerminalPropertiesResponse.MSG_ID, body, Edition.V2013))


def test_non_gbk_text_is_still_a_plain_text_error() -> None:
    with pytest.raises(TextDecodeError) as caught:
        decode(_frame(0x0102, b"\xff\xff", Edition.V2013))
    assert not isinstance(caught.value, TextControlError)
    assert caught.value.kind == "text"


def test_detail_is_capped_for_long_fields() -> None:
    plate = b"A" * 600 + b"\x00B"
    body = register_body(Edition.V2013, plate=plate)
    with pytest.raises(TextControlError) as caught:
        decode(_frame(0x0100, body, Edition.V2013))
    detail = caught.value.detail
    assert detail.startswith("plate: control character U+0000 at character 600 of 602: ")
    assert detail.endswith(f"... ({len(plate)} bytes)")
    assert len(detail) < 200


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"ok", None),
        (b"tab\there", None),
        (b"lines\r\nend", None),
        (b"\x00", TextControlError),
        (b"a\x08", TextControlError),
        (b"\x7f", TextControlError),
        (b"\xff", TextDecodeError),
    ],
)
def test_decode_text(data: bytes, error: type[Exception] | None) -> None:
    if error is None:
        assert decode_text(data) == data.decode()
    else:
        with pytest.raises(error, match=r"^name: "):
            decode_text(data, field="name")


def test_string_parameter_with_a_control_character_stays_bytes() -> None:
    # 0x0010 APN is a STRING (table 12); a value that is not text is kept byte for byte.
    assert TerminalParameter(param_id=0x0010, value=b"cmnet").value == "cmnet"
    assert TerminalParameter(param_id=0x0010, value=b"cmnet\x00\x00").value == b"cmnet\x00\x00"
    assert TerminalParameter(param_id=0x0010, value=b"cm\x01net").value == b"cm\x01net"


def test_stream_decoder_reports_the_error_and_goes_on() -> None:
    bad = _frame(0x0102, auth_2019(code=b"\x00\x00x"), Edition.V2019)
    good = _frame(0x0102, auth_2019(), Edition.V2019)
    decoder = StreamDecoder()
    decoder.feed(b"junk" + bad + good[:7])
    first = decoder.next_event()
    assert isinstance(first, TextControlError)
    assert first.header is not None
    assert (first.header.phone, first.header.serial) == (PHONE_2019, SERIAL)
    assert decoder.next_event() is None
    decoder.feed(good[7:])
    events: list[Packet | RemoteProtocolError] = list(decoder)
    assert len(events) == 1
    assert isinstance(events[0], Packet)
    assert events[0].message == TerminalAuth(
        auth_code="a1b2c3", imei="860000000000001", software_version="V1.0.2"
    )
