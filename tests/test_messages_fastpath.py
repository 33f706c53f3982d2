"""Hand-packed bodies on the per-report path agree with their construct schemas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.messages.terminal import PlatformGeneralResponse, TerminalGeneralResponse

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
