"""The struct/int fast path for location reports agrees with the construct schemas."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BodyDecodeError
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
