"""Passthrough, compression and RSA key messages (0x0900, 0x8900, 0x0901, 0x0A00, 0x8A00)."""

from __future__ import annotations

import contextlib
import gzip
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import decode, encode
from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.header import Edition
from protocol.messages.base import REGISTRY, Message
from protocol.messages.passthrough import (
    PASSTHROUGH_SERIAL_1,
    CompressedReport,
    DownlinkPassthrough,
    PlatformRsaKey,
    TerminalRsaKey,
    UplinkPassthrough,
)
from tests.vectors import case_ids, check_standard_keys, load_cases

MSG_IDS = {0x0900, 0x8900, 0x0901, 0x0A00, 0x8A00}
CASES = [
    c for c in load_cases() if c["valid"] and c.get("msg_id") and int(c["msg_id"], 16) in MSG_IDS
]
BY_ID = {c["id"]: c for c in CASES}
PHONE = "013912345678"

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)


def _message(case_id: str) -> Any:
    return decode(bytes.fromhex(BY_ID[case_id]["hex"])).message


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_vector_decodes_to_our_message_and_reencodes(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    packet = decode(wire)
    check_standard_keys(packet, case["expect"])
    message = packet.message
    assert type(message) is REGISTRY[packet.msg_id]
    rebuilt = encode(
        message,
        phone=packet.phone,
        serial=packet.serial,
        edition=packet.edition,
        protocol_version=packet.header.protocol_version or 1,
    )
    assert rebuilt == wire


def test_smallchi_0900_content() -> None:
    expect = BY_ID["smallchi-0900-passthrough"]["expect"]
    message = _message("smallchi-0900-passthrough")
    assert isinstance(message, UplinkPassthrough)
    assert message.content.decode("ascii") == expect["smallchi:PassthroughContent"]


def test_yezhihao_0900_keeps_the_vendor_payload() -> None:
    expect = BY_ID["yzh-0900-2013"]["expect"]
    message = _message("yzh-0900-2013")
    assert isinstance(message, UplinkPassthrough)
    assert message.passthrough_type == expect["yezhihao:message"]["key"]
    # the vendor layout (type 0xF8, user defined) is not ours to parse: the bytes stay bytes
    assert "测试公司1".encode("gbk") in message.content
    assert message.content[0] == len(expect["yezhihao:message"]["value"]["items"])


def test_yezhihao_8a00() -> None:
    expect = BY_ID["yzh-8a00-2013"]["expect"]
    message = _message("yzh-8a00-2013")
    assert isinstance(message, PlatformRsaKey)
    assert message.e == expect["yezhihao:e"]
    assert list(message.n) == expect["yezhihao:n"]


def test_rsa_modulus_is_128_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        TerminalRsaKey(e=65537, n=bytes(127)).encode()
    with pytest.raises(BodyDecodeError):
        TerminalRsaKey.decode(b"\x00\x01\x00\x01" + bytes(100), Edition.V2013)
    key = TerminalRsaKey(e=65537, n=bytes(range(128)))
    assert key.encode() == b"\x00\x01\x00\x01" + bytes(range(128))


def test_passthrough_layout() -> None:
    message = DownlinkPassthrough(passthrough_type=PASSTHROUGH_SERIAL_1, content=b"AT\r\n")
    assert message.encode() == b"\x41AT\r\n"
    assert DownlinkPassthrough.decode(b"\x41AT\r\n", Edition.V2019) == message


# ---------------------------------------------------------------------------------------------
# 0x0901 compression


def test_compressed_report_layout_and_inflation() -> None:
    inner = bytes.fromhex("0200") + b"position" * 20
    packed = gzip.compress(inner)
    message = CompressedReport(compressed=packed)
    body = message.encode()
    assert body == len(packed).to_bytes(4, "big") + packed
    assert CompressedReport.decode(body, Edition.V2013) == message
    assert message.decompress(max_size=len(inner)) == inner
    with pytest.raises(BodyDecodeError):
        message.decompress(max_size=len(inner) - 1)


def test_zip_bomb_stops_at_the_cap() -> None:
    # 64 MiB of zeros packs into about 64 KiB; inflating it whole is what the cap prevents.
    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    megabyte = bytes(1 << 20)
    packed = b"".join(bomb.compress(megabyte) for _ in range(64)) + bomb.flush()
    assert len(packed) < 100_000
    with pytest.raises(BodyDecodeError, match="cap"):
        CompressedReport(compressed=packed).decompress(max_size=1 << 20)


def test_bad_gzip_is_a_body_error() -> None:
    packed = gzip.compress(b"hello world" * 10)
    with pytest.raises(BodyDecodeError):
        CompressedReport(compressed=b"not gzip at all").decompress(max_size=1000)
    with pytest.raises(BodyDecodeError):
        CompressedReport(compressed=packed[: len(packed) // 2]).decompress(max_size=1000)
    with pytest.raises(BodyDecodeError):
        CompressedReport(compressed=b"").decompress(max_size=1000)
    with pytest.raises(LocalProtocolError):
        CompressedReport(compressed=packed).decompress(max_size=-1)


def test_concatenated_gzip_members_are_joined() -> None:
    packed = gzip.compress(b"first,") + gzip.compress(b"second")
    assert CompressedReport(compressed=packed).decompress(max_size=12) == b"first,second"
    with pytest.raises(BodyDecodeError):
        CompressedReport(compressed=packed).decompress(max_size=11)


def test_declared_length_past_the_body_is_a_body_error() -> None:
    with pytest.raises(BodyDecodeError):
        CompressedReport.decode(b"\x00\x00\x00\x10abc", Edition.V2013)


@settings(max_examples=100)
@given(data=st.binary(max_size=2000), slack=st.integers(0, 10))
def test_decompress_round_trip(data: bytes, slack: int) -> None:
    message = CompressedReport(compressed=gzip.compress(data))
    assert message.decompress(max_size=len(data) + slack) == data


@settings(max_examples=100)
@given(junk=st.binary(max_size=200))
def test_decompress_of_junk_only_raises_body_errors(junk: bytes) -> None:
    with contextlib.suppress(BodyDecodeError):
        CompressedReport(compressed=junk).decompress(max_size=4096)


# ---------------------------------------------------------------------------------------------
# Properties

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(UplinkPassthrough, passthrough_type=u8, content=st.binary(max_size=64)),
    st.builds(DownlinkPassthrough, passthrough_type=u8, content=st.binary(max_size=64)),
    st.builds(CompressedReport, compressed=st.binary(max_size=64)),
    st.builds(TerminalRsaKey, e=u32, n=st.binary(min_size=128, max_size=128)),
    st.builds(PlatformRsaKey, e=u32, n=st.binary(min_size=128, max_size=128)),
)


@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=200)
@given(message=messages)
def test_round_trip(edition: Edition, message: Message) -> None:
    body = message.encode(edition)
    assert type(message).decode(body, edition) == message
    assert decode(encode(message, phone=PHONE, serial=3, edition=edition)).message == message


@pytest.mark.parametrize("cls", [REGISTRY[i] for i in sorted(MSG_IDS)])
@pytest.mark.parametrize("edition", list(Edition))
@settings(max_examples=100)
@given(body=st.binary(max_size=160))
def test_arbitrary_bodies_decode_or_raise_body_errors(
    cls: type[Message], edition: Edition, body: bytes
) -> None:
    with contextlib.suppress(BodyDecodeError):
        cls.decode(body, edition)
