"""Terminal parameter messages: 0x8103, 0x8104, 0x8106, 0x0104 and the table-12 registry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol.errors import BodyDecodeError, LocalProtocolError, RemoteProtocolError
from protocol.framing import unescape
from protocol.header import Edition
from protocol.messages.base import Fragment, Message
from protocol.messages.params import (
    PARAMS,
    PARAMS_BY_NAME,
    ParamType,
    QueryParamsResponse,
    QuerySpecifiedParams,
    QueryTerminalParams,
    SetTerminalParams,
    TerminalParameter,
    typed_value,
)

VECTORS = Path("/work/shared/testdata/jt808_vectors.json")
MY_IDS = {0x8103, 0x8104, 0x8106, 0x0104}
EDITIONS = list(Edition)
MESSAGE_TYPES: list[type[Message]] = [
    SetTerminalParams,
    QueryTerminalParams,
    QuerySpecifiedParams,
    QueryParamsResponse,
]


def _cases() -> list[dict[str, Any]]:
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    return [
        case
        for case in data["cases"]
        if isinstance(case.get("msg_id"), str) and int(case["msg_id"], 16) in MY_IDS
    ]


CASES = {case["id"]: case for case in _cases()}
VALID = [case for case in CASES.values() if case["valid"]]


def _body(hex_frame: str) -> bytes:
    content, _ = unescape(bytes.fromhex(hex_frame)[1:-1])
    return protocol.parse_frame(content).body


def _hex_ids(message: SetTerminalParams | QueryParamsResponse) -> list[str]:
    return [f"0x{pid:04x}" for pid in message.param_ids]


# ---------------------------------------------------------------------------------------------
# Vectors


def test_vectors_present() -> None:
    assert {0x8103, 0x8104, 0x0104} <= {int(c["msg_id"], 16) for c in VALID}


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["id"])
def test_vector_decodes_to_expected(case: dict[str, Any]) -> None:
    packet = protocol.decode(bytes.fromhex(case["hex"]))
    message = packet.message
    expect = case["expect"]
    if expect.get("subpackage"):
        assert isinstance(message, Fragment)
        return
    assert message.msg_id == int(case["msg_id"], 16)
    if "param_count" in expect:
        assert isinstance(message, SetTerminalParams | QueryParamsResponse)
        assert message.declared_count == expect["param_count"]
        assert message.param_count == expect["param_count"]
        assert _hex_ids(message) == expect["param_ids"]
    if "reply_serial" in expect:
        assert isinstance(message, QueryParamsResponse)
        assert message.reply_serial == expect["reply_serial"]
    for key, value in expect.items():
        match = re.fullmatch(r"smallchi:param_(0x[0-9a-fA-F]+)", key)
        if match:
            assert isinstance(message, SetTerminalParams | QueryParamsResponse)
            assert message.get(int(match.group(1), 16)) == value


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["id"])
def test_vector_reencodes_byte_exact(case: dict[str, Any]) -> None:
    packet = protocol.decode(bytes.fromhex(case["hex"]))
    if isinstance(packet.message, Fragment):
        return
    assert packet.message.encode(packet.edition) == _body(case["hex"])


def test_cld_91_params_values() -> None:
    message = protocol.decode(bytes.fromhex(CASES["cld-0104-2019-91-params"]["hex"])).message
    assert isinstance(message, QueryParamsResponse)
    assert not message.count_mismatch
    assert message.get("heartbeat_interval_s") == 10
    assert message.get("main_server_address") == "127.0.0.1:7000"
    assert message.get("fence_radius_m") == 60
    assert message.get("illegal_driving_period") == bytes.fromhex("16320a1e")
    assert message.get("plate") == "京AX0001"
    assert message.get("plate_color") == 1
    assert message.get("can1_upload_interval_s") == 5000
    assert message.get("can_id_collection") == bytes.fromhex("0000000000000101")
    # JT/T 1078 ids are not in table 12: kept as bytes.
    assert isinstance(message.get(0x0075), bytes)
    assert message.get("slave_server_apn") == "0"


def test_device_answer_with_vendor_ids_and_odd_lengths() -> None:
    message = protocol.decode(bytes.fromhex(CASES["smallchi-0104-device-c"]["hex"])).message
    assert isinstance(message, QueryParamsResponse)
    assert message.get("server_tcp_port") == 7000  # 2013-only 0x0018
    # 0x0090 is a BYTE in table 12; this device sends four bytes: kept raw, not an error.
    assert message.get(0x0090) == bytes.fromhex("00000003")
    assert message.get(0xF000) == b"1768128264,28800"


def test_reassembled_answer_whose_count_disagrees() -> None:
    """Two sub-packages whose 0x0104 body declares 88 items but holds 120 (a bad 0x0077)."""
    body = b""
    for name in ("yzh-0104-pkg1of2", "yzh-0104-pkg2of2"):
        fragment = protocol.decode(bytes.fromhex(CASES[name]["hex"])).message
        assert isinstance(fragment, Fragment)
        body += fragment.data
    message = QueryParamsResponse.decode(body, Edition.V2013)
    assert message.reply_serial == 0x01A4
    assert message.declared_count == 88
    assert len(message.params) == 120
    assert message.count_mismatch
    assert message.get("main_server_address") == "183.230.82.18"
    rebuilt = message.encode(Edition.V2013)
    # Only the count byte differs: it is rebuilt from the tuple.
    assert rebuilt[2] == 120
    assert rebuilt[:2] + rebuilt[3:] == body[:2] + body[3:]


# ---------------------------------------------------------------------------------------------
# Table 12


def test_table_is_consistent() -> None:
    assert len(PARAMS) == len(PARAMS_BY_NAME)
    for param_id, spec in PARAMS.items():
        assert spec.param_id == param_id
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        if spec.type is ParamType.STRING:
            assert spec.size is None
        else:
            assert spec.size is not None
    assert all(pid in PARAMS for pid in range(0x0110, 0x0200))
    assert PARAMS[0x01FF].name == "can_id_collection_239"
    expected_types = {
        0x0001: ParamType.DWORD,
        0x0013: ParamType.STRING,
        0x0018: ParamType.DWORD,
        0x0031: ParamType.WORD,
        0x0032: ParamType.BYTES,
        0x0049: ParamType.STRING,
        0x005B: ParamType.WORD,
        0x0083: ParamType.STRING,
        0x0084: ParamType.BYTE,
        0x0094: ParamType.BYTE,
        0x0103: ParamType.WORD,
        0x0110: ParamType.BYTES,
    }
    for pid, kind in expected_types.items():
        assert PARAMS[pid].type is kind
    for reserved in (0x0008, 0x001E, 0x002A, 0x0033, 0x004A, 0x005F, 0x0075, 0x0200, 0xF000):
        assert reserved not in PARAMS


def test_typed_value_rules() -> None:
    assert typed_value(0x0001, b"\x00\x00\x00\x0a") == 10
    assert typed_value(0x0001, b"\x00\x0a") == b"\x00\x0a"  # wrong width: raw
    assert typed_value(0x0031, b"\x00\x3c") == 60
    assert typed_value(0x0084, b"\x02") == 2
    assert typed_value(0x0083, "京A12345".encode("gbk")) == "京A12345"
    assert typed_value(0x0083, b"\xff\xfe") == b"\xff\xfe"  # not GBK: raw
    assert typed_value(0x0010, b"") == ""
    assert typed_value(0x0032, b"\x16\x32\x0a\x1e") == b"\x16\x32\x0a\x1e"
    assert typed_value(0xF001, b"\x01") == b"\x01"


def test_parameter_normalises_bytes_and_to_json() -> None:
    param = TerminalParameter(param_id=0x0001, value=b"\x00\x00\x00\x1e")
    assert param.value == 30
    assert param == TerminalParameter(param_id=0x0001, value=30)
    assert param.name == "heartbeat_interval_s"
    assert param.to_json() == {"id": "0x0001", "name": "heartbeat_interval_s", "value": 30}
    vendor = TerminalParameter(param_id=0xF364, value=b"\xff\x00")
    assert vendor.to_json() == {"id": "0xf364", "name": None, "value": "ff00"}
    assert TerminalParameter.named("plate", "京A1").to_json()["value"] == "京A1"


def test_message_to_json() -> None:
    message = SetTerminalParams(params=(TerminalParameter(param_id=0x0013, value="a:1"),))
    assert message.to_json()["params"] == [
        {"id": "0x0013", "name": "main_server_address", "value": "a:1"}
    ]


def test_set_params_wire_format() -> None:
    message = SetTerminalParams(
        params=(
            TerminalParameter.named("heartbeat_interval_s", 10),
            TerminalParameter.named("fence_radius_m", 500),
            TerminalParameter.named("main_server_address", "a"),
        )
    )
    assert message.encode() == bytes.fromhex(
        "03 00000001 04 0000000a 00000031 02 01f4 00000013 01 61"
    )
    assert message.declared_count is None


def test_query_specified_wire_format() -> None:
    message = QuerySpecifiedParams(param_ids=(0x0001, 0x0013))
    body = bytes.fromhex("02 00000001 00000013")
    assert message.encode() == body
    assert QuerySpecifiedParams.decode(body, Edition.V2019) == message


@pytest.mark.parametrize(
    "param",
    [
        TerminalParameter(param_id=0x0001, value="text"),  # str for a DWORD
        TerminalParameter(param_id=0x0013, value=5),  # int for a STRING
        TerminalParameter(param_id=0x0031, value=0x10000),  # does not fit a WORD
        TerminalParameter(param_id=0x0001, value=-1),
        TerminalParameter(param_id=0xF000, value=1),  # int for an id of unknown width
        TerminalParameter(param_id=0x0032, value=1),  # int for BYTE[4]
        TerminalParameter(param_id=0xF000, value=bytes(256)),  # longer than a length BYTE
        TerminalParameter(param_id=0x1_0000_0000, value=b""),  # id beyond a DWORD
    ],
)
def test_unbuildable_parameters_raise_local_error(param: TerminalParameter) -> None:
    with pytest.raises(LocalProtocolError):
        SetTerminalParams(params=(param,)).encode()


def test_too_many_params_raises_local_error() -> None:
    params = tuple(TerminalParameter(param_id=0xF000, value=b"") for _ in range(256))
    with pytest.raises(LocalProtocolError):
        SetTerminalParams(params=params).encode()
    with pytest.raises(LocalProtocolError):
        QuerySpecifiedParams(param_ids=tuple(range(256))).encode()


def test_unknown_name_raises_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        TerminalParameter.named("no_such_parameter", 1)


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (SetTerminalParams, b""),  # no count
        (SetTerminalParams, bytes.fromhex("01 00000001 04 00")),  # item cut short
        (SetTerminalParams, bytes.fromhex("01 00000001 04 00000001 0000")),  # stray bytes after
        (QueryParamsResponse, bytes.fromhex("0001")),
        (QuerySpecifiedParams, bytes.fromhex("02 00000001")),  # one id missing
        (QuerySpecifiedParams, bytes.fromhex("000000")),  # trailing junk
        (QueryTerminalParams, b"\x00"),
    ],
)
def test_malformed_bodies_raise_body_error(cls: type[Message], body: bytes) -> None:
    with pytest.raises(BodyDecodeError):
        cls.decode(body, Edition.V2013)


def test_declared_count_is_kept_but_not_compared() -> None:
    # The count says 5 but one item follows.
    body = bytes.fromhex("05 00000001 04 0000000a")
    message = SetTerminalParams.decode(body, Edition.V2013)
    assert message.declared_count == 5
    assert message.count_mismatch
    assert message.param_count == 5
    assert message == SetTerminalParams(params=(TerminalParameter(param_id=1, value=10),))
    assert SetTerminalParams(params=message.params).param_count == 1
    assert message.encode() == bytes.fromhex("01 00000001 04 0000000a")


# ---------------------------------------------------------------------------------------------
# Properties

_NUMERIC = [
    s for s in PARAMS.values() if s.type in (ParamType.BYTE, ParamType.WORD, ParamType.DWORD)
]
_STRINGS = [s for s in PARAMS.values() if s.type is ParamType.STRING]
_BYTES = [s for s in PARAMS.values() if s.type is ParamType.BYTES]

# A STRING value with a control character other than TAB, LF or CR decodes as bytes (the
# text check of protocol.fields.decode_text), so text values leave those out.
_CONTROL = "".join(chr(c) for c in (*range(0x20), 0x7F) if chr(c) not in "\t\n\r")
_gbk_text = st.text(
    alphabet=st.characters(codec="gb18030", exclude_characters=_CONTROL), max_size=60
)


@st.composite
def _numeric_param(draw: st.DrawFn) -> TerminalParameter:
    spec = draw(st.sampled_from(_NUMERIC))
    assert spec.size is not None
    value = draw(st.integers(0, 2 ** (8 * spec.size) - 1))
    return TerminalParameter(param_id=spec.param_id, value=value)


@st.composite
def _string_param(draw: st.DrawFn) -> TerminalParameter:
    spec = draw(st.sampled_from(_STRINGS))
    return TerminalParameter(param_id=spec.param_id, value=draw(_gbk_text))


@st.composite
def _raw_param(draw: st.DrawFn) -> TerminalParameter:
    param_id = draw(
        st.one_of(
            st.sampled_from([s.param_id for s in _BYTES]),
            st.sampled_from(list(PARAMS)),  # known ids with raw bytes of any length
            st.integers(0, 0xFFFF_FFFF),
        )
    )
    return TerminalParameter(param_id=param_id, value=draw(st.binary(max_size=40)))


params_strategy = st.lists(
    st.one_of(_numeric_param(), _string_param(), _raw_param()), max_size=12
).map(tuple)
words = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(params=params_strategy, edition=st.sampled_from(EDITIONS))
def test_roundtrip_set_params(params: tuple[TerminalParameter, ...], edition: Edition) -> None:
    message = SetTerminalParams(params=params)
    decoded = SetTerminalParams.decode(message.encode(edition), edition)
    assert decoded == message
    assert decoded.declared_count == len(params)


@settings(max_examples=200, deadline=None)
@given(reply_serial=words, params=params_strategy, edition=st.sampled_from(EDITIONS))
def test_roundtrip_query_response(
    reply_serial: int, params: tuple[TerminalParameter, ...], edition: Edition
) -> None:
    message = QueryParamsResponse(reply_serial=reply_serial, params=params)
    assert QueryParamsResponse.decode(message.encode(edition), edition) == message


@settings(max_examples=200, deadline=None)
@given(
    param_ids=st.lists(st.integers(0, 0xFFFF_FFFF), max_size=255).map(tuple),
    edition=st.sampled_from(EDITIONS),
)
def test_roundtrip_query_specified(param_ids: tuple[int, ...], edition: Edition) -> None:
    message = QuerySpecifiedParams(param_ids=param_ids)
    assert QuerySpecifiedParams.decode(message.encode(edition), edition) == message


@pytest.mark.parametrize("edition", EDITIONS)
def test_roundtrip_query_all(edition: Edition) -> None:
    assert QueryTerminalParams().encode(edition) == b""
    assert QueryTerminalParams.decode(b"", edition) == QueryTerminalParams()


@settings(max_examples=200, deadline=None)
@given(
    cls=st.sampled_from(MESSAGE_TYPES),
    body=st.binary(max_size=80),
    edition=st.sampled_from(EDITIONS),
)
def test_arbitrary_bodies_decode_or_raise_remote_error(
    cls: type[Message], body: bytes, edition: Edition
) -> None:
    try:
        message = cls.decode(body, edition)
    except RemoteProtocolError:
        return
    # Whatever decodes, re-encodes to something that decodes to the same message.
    assert cls.decode(message.encode(edition), edition) == message


def test_frame_roundtrip_through_codec() -> None:
    message = QueryParamsResponse(
        reply_serial=7, params=(TerminalParameter.named("plate", "京A12345"),)
    )
    wire = protocol.encode(message, phone="013800138000", serial=9, edition=Edition.V2019)
    packet = protocol.decode(wire)
    assert packet.message == message
    assert packet.edition is Edition.V2019
