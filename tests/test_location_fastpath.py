"""The struct/int fast path for location reports agrees with the construct schemas."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import (
    Packet,
    StreamDecoder,
    _plain_location_report,
    decode_frame,
    parse_frame,
)
from protocol.errors import BodyDecodeError, RemoteProtocolError
from protocol.framing import RawFrame, check_code, escape
from protocol.messages.location import (
    ITEM_TYPES,
    Location,
    decode_item,
    decode_item_reference,
)


@settings(max_examples=3000)
@given(st.binary(min_size=0, max_size=80))
def test_location_agrees_with_the_construct_schema(data: bytes) -> None:
    try:
        fast = Location.parse_location(data)
    except BodyDecodeError:
        assert len(data) < 28
        return
    assert fast == Location.parse_location_reference(data)


@settings(max_examples=3000)
@given(
    st.one_of(st.sampled_from(sorted(ITEM_TYPES)), st.integers(0, 255)),
    st.binary(max_size=8),
)
def test_items_agree_with_the_construct_schema(item_id: int, data: bytes) -> None:
    assert decode_item(item_id, data) == decode_item_reference(item_id, data)


def _general_path(raw: RawFrame) -> Packet | RemoteProtocolError:
    try:
        return decode_frame(parse_frame(raw))
    except RemoteProtocolError as exc:
        return exc


def _fast_path(raw: RawFrame) -> Packet | RemoteProtocolError | None:
    try:
        return _plain_location_report(raw)
    except RemoteProtocolError as exc:
        return exc


def _same(a: Packet | RemoteProtocolError, b: Packet | RemoteProtocolError) -> bool:
    if isinstance(a, RemoteProtocolError) or isinstance(b, RemoteProtocolError):
        return type(a) is type(b) and str(a) == str(b) and a.header == b.header
    return (a.header, a.message, a.edition, a.quirks, a.body) == (
        b.header,
        b.message,
        b.edition,
        b.quirks,
        b.body,
    )


# Frames near the fast path's conditions: 0x0200 in either layout, any properties bits, the
# declared length right or off by a little, the check code right or wrong.
@st.composite
def location_contents(draw: st.DrawFn) -> bytes:
    v2019 = draw(st.booleans())
    body = draw(st.binary(min_size=0, max_size=60))
    props_bits = draw(st.sampled_from([0, 0x4000, 0x2000, 0x0400, 0x8000, 0x4400]))
    declared = len(body) + draw(st.sampled_from([0, 0, 0, 5, -5, 1]))
    props = props_bits | (0x4000 if v2019 else 0) | (declared & 0x3FF)
    head = bytes([0x02, 0x00, props >> 8, props & 0xFF])
    if v2019:
        head += bytes([draw(st.integers(0, 255))]) + draw(st.binary(min_size=10, max_size=10))
    else:
        head += draw(st.binary(min_size=6, max_size=6))
    head += draw(st.binary(min_size=2, max_size=2))
    data = head + body
    code = check_code(data) ^ draw(st.sampled_from([0, 0, 0, 1]))
    return data + bytes([code])


@settings(max_examples=3000)
@given(location_contents(), st.booleans())
def test_stream_fast_path_agrees_with_the_general_path(content: bytes, raw_tail: bool) -> None:
    raw = RawFrame(content=content, raw_7d_tail=raw_tail, wire_size=len(content))
    decoder = StreamDecoder()
    decoder.feed(frame_wire(content))
    event = decoder.next_event()
    assert event is not None
    if not raw_tail:
        assert _same(event, _general_path(raw))
    fast = _fast_path(raw)
    if fast is not None:  # None: the fast path declined, the general path decides
        assert _same(fast, _general_path(raw))


@settings(max_examples=2000)
@given(st.binary(min_size=0, max_size=60))
def test_stream_fast_path_on_arbitrary_content(content: bytes) -> None:
    raw = RawFrame(content=b"\x02\x00" + content, raw_7d_tail=False, wire_size=0)
    fast = _fast_path(raw)
    if fast is not None:  # None: the fast path declined, the general path decides
        assert _same(fast, _general_path(raw))


def frame_wire(content: bytes) -> bytes:
    return b"\x7e" + escape(content) + b"\x7e"
