"""Hand-packed bodies on the per-report path agree with their construct schemas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import encode, encode_general_response, general_response_prefix
from protocol.errors import LocalProtocolError
from protocol.header import Edition
from protocol.messages.base import Message
from protocol.messages.terminal import (
    Heartbeat,
    PlatformGeneralResponse,
    TerminalGeneralResponse,
    TerminalLogout,
)

RESPONSES = [PlatformGeneralResponse, TerminalGeneralResponse]


@pytest.mark.parametrize("cls", RESPONSES)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFF))
def test_general_response_packs_like_its_schema(
    cls: type[PlatformGeneralResponse], serial: int, msg_id: int, result: int
) -> None:
    message = cls(reply_serial=serial, reply_msg_id=msg_id, result=result)
    fields = {"reply_serial": serial, "reply_msg_id": msg_id, "result": result}
    assert message.encode() == cls.SCHEMA.build(fields)


@pytest.mark.parametrize("cls", RESPONSES)
def test_general_response_out_of_range_is_local_misuse(cls: type[PlatformGeneralResponse]) -> None:
    with pytest.raises(LocalProtocolError):
        cls(reply_serial=0x10000, reply_msg_id=1, result=0).encode()


phones = st.integers(0, 10**20 - 1).map(str)
editions = st.sampled_from([Edition.V2011, Edition.V2013, Edition.V2019])


@given(
    phones,
    editions,
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFF),
)
def test_general_response_frame_matches_the_generic_encoder(
    phone: str,
    edition: Edition,
    version: int,
    serial: int,
    reply_serial: int,
    reply_msg_id: int,
    result: int,
) -> None:
    if edition is not Edition.V2019:
        phone = phone[-12:]  # BCD[6] before 2019
    message = PlatformGeneralResponse(
        reply_serial=reply_serial, reply_msg_id=reply_msg_id, result=result
    )
    expected = encode(
        message, phone=phone, serial=serial, edition=edition, protocol_version=version
    )
    prefix = general_response_prefix(phone, edition, version)
    wire = encode_general_response(
        prefix, serial=serial, reply_serial=reply_serial, reply_msg_id=reply_msg_id, result=result
    )
    assert wire == expected


def test_general_response_frame_out_of_range_is_local_misuse() -> None:
    prefix = general_response_prefix("13800138000", Edition.V2013)
    with pytest.raises(LocalProtocolError):
        encode_general_response(prefix, serial=0, reply_serial=0x10000, reply_msg_id=1, result=0)


@pytest.mark.parametrize("cls", [Heartbeat, TerminalLogout])
@given(st.binary(max_size=8), editions)
def test_empty_bodied_messages_decode_like_their_schema(
    cls: type[Heartbeat], body: bytes, edition: Edition
) -> None:
    assert cls.decode(body, edition) == Message.decode.__func__(cls, body, edition)  # type: ignore[attr-defined]
