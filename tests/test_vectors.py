"""Every shared conformance vector: decoded whole, byte by byte, between junk, and re-encoded."""

from __future__ import annotations

import math
from typing import Any

import pytest

from protocol import Packet, RemoteProtocolError, StreamDecoder, decode, encode_raw
from protocol.errors import (
    ChecksumError,
    HeaderTooShortError,
    InvalidEscapeError,
    LengthMismatchError,
)
from protocol.header import Edition
from protocol.messages.base import Fragment, RawMessage
from protocol.messages.location import Location, LocationBatch
from tests.vectors import case_ids, load_cases

CASES = load_cases()
VALID = [c for c in CASES if c["valid"]]
INVALID = [c for c in CASES if not c["valid"]]

# Frames the standard calls malformed but that real devices send and we accept, with the quirk
# the decoder reports (see each case's note).
TOLERATED = {
    "cld-0002-unescaped-7d-checksum": "raw_7d_before_flag",
    "smallchi-0102-2019flag-2013layout": "version_flag_mismatch",
    "smallchi-8104-2019layout-without-flag": "version_flag_mismatch",
}

HEADER_KEYS = {
    "checksum_ok",
    "length_ok",
    "body_length",
    "encryption",
    "subpackage",
    "version_flag",
    "protocol_version",
    "package_total",
    "package_index",
    "error",
}
LOCATION_KEYS = {
    "alarm",
    "status",
    "lat",
    "lon",
    "altitude_m",
    "speed_kmh",
    "direction",
    "time",
    "additional_ids",
    "additional_tlv_clean",
}


def _stream(data: bytes) -> list[Packet | RemoteProtocolError]:
    decoder = StreamDecoder()
    decoder.feed(data)
    return list(decoder)


def _check_header(packet: Packet, case: dict[str, Any]) -> None:
    header, expect = packet.header, case["expect"]
    assert f"0x{header.msg_id:04x}" == case["msg_id"]
    assert header.phone == case["phone"]
    assert header.serial == case["serial"]
    assert header.body_length == expect["body_length"]
    assert header.encryption == expect["encryption"]
    assert header.subpackage == expect["subpackage"]
    assert header.version_flag == expect["version_flag"]
    if "protocol_version" in expect:
        assert header.protocol_version == expect["protocol_version"]
    if "package_total" in expect:
        assert header.package_total == expect["package_total"]
        assert header.package_index == expect["package_index"]
    if case["version"] == "2011" and packet.msg_id != 0x0100:
        # 2011 and 2013 share the header; only a few bodies (0x0100) tell them apart.
        assert packet.edition in (Edition.V2011, Edition.V2013)
    elif case["version"] in ("2011", "2013", "2019"):
        assert packet.edition == Edition(int(case["version"]))


def _check_location(location: Location, expect: dict[str, Any]) -> None:
    assert location.alarm == expect["alarm"]
    assert location.status == expect["status"]
    assert math.isclose(location.lat, expect["lat"], abs_tol=1e-9)
    assert math.isclose(location.lon, expect["lon"], abs_tol=1e-9)
    assert location.altitude_m == expect["altitude_m"]
    assert math.isclose(location.speed_kmh, expect["speed_kmh"])
    assert location.direction == expect["direction"]
    assert location.time is not None
    assert location.time.replace(tzinfo=None).isoformat() == expect["time"]
    assert [f"0x{i:02x}" for i in location.item_ids()] == expect["additional_ids"]
    if "additional_tlv_clean" in expect:
        assert location.items_clean == expect["additional_tlv_clean"]


def _normalise(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    return value


def _check_body(packet: Packet, expect: dict[str, Any]) -> None:
    message = packet.message
    keys = {k for k in expect if ":" not in k} - HEADER_KEYS
    if not keys or isinstance(message, Fragment):
        return
    assert not isinstance(message, RawMessage), f"0x{packet.msg_id:04x} has no decoder"
    if keys & LOCATION_KEYS:
        location = message if isinstance(message, Location) else message.location  # type: ignore[attr-defined]
        _check_location(location, expect)
        keys -= LOCATION_KEYS
    if isinstance(message, LocationBatch):
        assert len(message.positions) == expect["count"]
        assert message.batch_type == expect["batch_type"]
        for location, expected in zip(message.positions, expect["positions"], strict=True):
            _check_location(location, expected)
        keys -= {"count", "batch_type", "positions"}
    for key in sorted(keys):
        actual = _normalise(getattr(message, key))
        expected = expect[key]
        if key.endswith("msg_id") and isinstance(expected, str):
            actual = f"0x{actual:04x}"
        if key == "param_ids" and expected and isinstance(expected[0], str):
            actual = [f"0x{i:04x}" for i in actual]
        assert actual == expected, key


@pytest.mark.parametrize("case", VALID + [c for c in INVALID if c["id"] in TOLERATED], ids=case_ids)
def test_valid_frame_decodes_to_expected_values(case: dict[str, Any]) -> None:
    packet = decode(bytes.fromhex(case["hex"]))
    _check_header(packet, case)
    _check_body(packet, case["expect"])
    if case["id"] in TOLERATED:
        assert TOLERATED[case["id"]] in packet.quirks
    else:
        assert not packet.quirks


@pytest.mark.parametrize("case", VALID, ids=case_ids)
def test_valid_frame_byte_by_byte_and_between_junk(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    expected = decode(wire)
    decoder = StreamDecoder()
    events: list[Packet | RemoteProtocolError] = []
    for byte in wire:
        decoder.feed(bytes((byte,)))
        events.extend(decoder)
    assert events == [expected]
    # junk before, between and after; then the same frame again
    events = _stream(b"\x00\x01junk" + wire + b"\xff\xfe" + wire + b"trailing")
    packets = [e for e in events if isinstance(e, Packet)]
    assert packets == [expected, expected]


# Valid frames whose bodies carry bytes the standard does not define, which the decoder skips,
# so re-encoding gives the canonical body instead.
NON_CANONICAL = {
    "smallchi-0001-replaced-body": "two extra bytes after the result byte",
    "smallchi-0702-2013-device": "NUL padding inside the length-prefixed name fields",
}


@pytest.mark.parametrize("case", [c for c in VALID if c["id"] not in NON_CANONICAL], ids=case_ids)
def test_valid_frame_reencodes_byte_exactly(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    packet = decode(wire)
    header = packet.header
    body = packet.message.encode(packet.edition)
    rebuilt = encode_raw(
        header.msg_id,
        body,
        phone=header.phone,
        serial=header.serial,
        edition=header.layout,
        protocol_version=header.protocol_version or 1,
        encryption=header.encryption,
        package=(
            (header.package_total, header.package_index)
            if header.package_total is not None and header.package_index is not None
            else None
        ),
    )
    assert rebuilt == wire


def _expected_error(case: dict[str, Any]) -> type[RemoteProtocolError]:
    expect = case["expect"]
    if expect.get("error") == "header too short":
        return HeaderTooShortError
    if "invalid escape" in expect.get("error", ""):
        return InvalidEscapeError
    if expect.get("checksum_ok") is False:
        return ChecksumError
    if expect.get("length_ok") is False:
        return LengthMismatchError
    raise AssertionError(f"no expected error for {case['id']}")


@pytest.mark.parametrize("case", [c for c in INVALID if c["id"] not in TOLERATED], ids=case_ids)
def test_invalid_frame_yields_its_typed_error_and_stream_goes_on(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["hex"])
    error = _expected_error(case)
    with pytest.raises(error):
        decode(wire)
    good = bytes.fromhex(VALID[0]["hex"])
    events = _stream(good + wire + good)
    assert isinstance(events[0], Packet)
    assert isinstance(events[-1], Packet)
    assert [type(e) for e in events[1:-1]] == [error]
    bad = events[1]
    assert isinstance(bad, RemoteProtocolError)
    if case.get("msg_id") and error in (ChecksumError, LengthMismatchError):
        assert bad.header is not None
        assert f"0x{bad.header.msg_id:04x}" == case["msg_id"]
