"""Properties every registered message shares, checked over the whole catalogue."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import decode_body
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.header import Edition
from protocol.messages import REGISTRY
from protocol.messages.base import Message

IDS = sorted(REGISTRY)


@pytest.mark.parametrize("msg_id", IDS, ids=lambda i: f"0x{i:04x}")
@settings(max_examples=150)
@given(body=st.binary(max_size=120), edition=st.sampled_from(list(Edition)))
def test_any_body_decodes_or_raises_the_typed_error(
    msg_id: int, body: bytes, edition: Edition
) -> None:
    try:
        message, decoded_as = decode_body(msg_id, body, edition)
    except RemoteProtocolError:
        return
    assert isinstance(message, Message)
    assert message.msg_id == msg_id
    json.dumps(message.to_json(), ensure_ascii=False)  # what `jt808 decode` prints
    # What decodes re-encodes, and the re-encoded body decodes to the same message -- except
    # where reading is deliberately more lenient than writing (a text longer than the
    # standard's cap is read, but we never send one): then encoding is refused as our misuse.
    try:
        body_again = message.encode(decoded_as)
    except LocalProtocolError:
        return
    again, _ = decode_body(msg_id, body_again, decoded_as)
    assert again == message
