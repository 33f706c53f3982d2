"""The struct-based header reader/writer agree with the construct schemas of the standard."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError, LocalProtocolError
from protocol.header import (
    Edition,
    Header,
    build_header,
    build_header_reference,
    parse_header,
    parse_header_reference,
)


@settings(max_examples=3000)
@given(st.binary(min_size=0, max_size=60))
def test_parse_agrees_with_the_construct_schema(content: bytes) -> None:
    try:
        fast = parse_header(content)
    except FrameError as exc:
        fast = exc.header  # a length mismatch still carries the header it read
        if fast is None:
            return
    assert parse_header_reference(content, fast.layout) == fast


@st.composite
def headers(draw: st.DrawFn) -> Header:
    is_2019 = draw(st.booleans())
    subpackage = draw(st.booleans())
    return Header(
        msg_id=draw(st.integers(0, 0xFFFF)),
        body_length=draw(st.integers(0, 0x3FF)),
        phone=draw(
            st.from_regex(r"[0-9a-f]{0,20}" if is_2019 else r"[0-9a-f]{0,12}", fullmatch=True)
        ),
        serial=draw(st.integers(0, 0xFFFF)),
        layout=Edition.V2019 if is_2019 else Edition.V2013,
        version_flag=draw(st.booleans()),
        protocol_version=draw(st.integers(0, 255)) if is_2019 else None,
        encryption=draw(st.integers(0, 7)),
        subpackage=subpackage,
        package_total=draw(st.integers(0, 0xFFFF)) if subpackage else None,
        package_index=draw(st.integers(0, 0xFFFF)) if subpackage else None,
        reserved_bit=draw(st.booleans()),
    )


@settings(max_examples=2000)
@given(headers())
def test_build_agrees_with_the_construct_schema(header: Header) -> None:
    assert build_header(header) == build_header_reference(header)


def test_build_refuses_what_does_not_fit() -> None:
    with pytest.raises(LocalProtocolError):
        build_header(Header(msg_id=1, body_length=0, phone="1" * 13, serial=1))
    with pytest.raises(LocalProtocolError):
        build_header(Header(msg_id=0x10000, body_length=0, phone="1", serial=1))
    with pytest.raises(LocalProtocolError):
        build_header(Header(msg_id=1, body_length=0, phone="zz", serial=1))
