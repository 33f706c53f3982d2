"""Terminal parameters: 0x8103, 0x8104, 0x8106 and 0x0104 (JT/T 808-2019 8.9-8.12, table 12).

A parameter item is id DWORD, length BYTE, value.  :data:`PARAMS` lists every standard
id of table 12 with its type, including the ones only the 2011/2013 editions define (0x0018/0x0019)
and the ones 2019 added (0x0023-0x0026, 0x0032).  A value decodes by the table: numeric types to
int, STRING (GBK) to str, BYTE[n] to bytes.  Vendor and reserved ids, a known id whose length is
not its type's width, and a STRING that is not GBK stay raw bytes -- never an error, because one
odd parameter must not cost the rest of the answer.

0x0104 answers from real devices declare a parameter count that differs from the items that
follow (a device whose JT/T 1078 item 0x0077 states a wrong length, say); decoding therefore
reads items to the end of the body and keeps the declared count only for reference
(``declared_count``).  Encoding always writes the count of the ``params`` tuple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

from construct import (
    Construct,
    GreedyBytes,
    GreedyRange,
    Prefixed,
    PrefixedArray,
    Rebuild,
    Struct,
    Terminated,
    len_,
    this,
)

from protocol.errors import LocalProtocolError, TextDecodeError
from protocol.fields import BYTE, DWORD, WORD, decode_text, encode_text
from protocol.messages.base import Message, Record, jsonable, register


class ParamType(Enum):
    """Value types used by table 12 (clause 4.2, table 1)."""

    BYTE = "BYTE"
    WORD = "WORD"
    DWORD = "DWORD"
    STRING = "STRING"
    BYTES = "BYTE[n]"


_INT_SIZES = {ParamType.BYTE: 1, ParamType.WORD: 2, ParamType.DWORD: 4}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParamSpec:
    """One row of table 12.

    ``size`` is the value's width in bytes for the numeric types and BYTE[n], None for STRING.
    ``note`` records edition differences where there are any.
    """

    param_id: int
    name: str
    type: ParamType
    size: int | None
    note: str = ""


def _spec(
    param_id: int, name: str, kind: ParamType, size: int | None = None, note: str = ""
) -> ParamSpec:
    if kind in _INT_SIZES:
        size = _INT_SIZES[kind]
    return ParamSpec(param_id=param_id, name=name, type=kind, size=size, note=note)


_D, _W, _B, _S, _N = (
    ParamType.DWORD,
    ParamType.WORD,
    ParamType.BYTE,
    ParamType.STRING,
    ParamType.BYTES,
)

# Table 12, in the standard's order.  Names carry the unit where the value has one; raw scaled
# values (1/10 km/h, 1/10 km) keep a plain name and say the scale in the comment.
_TABLE: tuple[ParamSpec, ...] = (
    _spec(0x0001, "heartbeat_interval_s", _D),
    _spec(0x0002, "tcp_reply_timeout_s", _D),
    _spec(0x0003, "tcp_retransmit_count", _D),
    _spec(0x0004, "udp_reply_timeout_s", _D),
    _spec(0x0005, "udp_retransmit_count", _D),
    _spec(0x0006, "sms_reply_timeout_s", _D),
    _spec(0x0007, "sms_retransmit_count", _D),
    # 0x0008-0x000F reserved
    _spec(0x0010, "main_server_apn", _S),  # PPP dial number on CDMA networks
    _spec(0x0011, "main_server_dial_user", _S),
    _spec(0x0012, "main_server_dial_password", _S),
    _spec(0x0013, "main_server_address", _S, note="2019: host:port, several separated by ';'"),
    _spec(0x0014, "backup_server_apn", _S),
    _spec(0x0015, "backup_server_dial_user", _S),
    _spec(0x0016, "backup_server_dial_password", _S),
    _spec(0x0017, "backup_server_address", _S, note="2019: host:port, several separated by ';'"),
    _spec(0x0018, "server_tcp_port", _D, note="2011/2013 only; 2019 puts the port in 0x0013"),
    _spec(0x0019, "server_udp_port", _D, note="2011/2013 only; 2019 puts the port in 0x0013"),
    _spec(0x001A, "ic_auth_main_server_address", _S),  # road transport certificate IC card
    _spec(0x001B, "ic_auth_main_server_tcp_port", _D),
    _spec(0x001C, "ic_auth_main_server_udp_port", _D),
    _spec(0x001D, "ic_auth_backup_server_address", _S),  # same ports as the main server
    # 0x001E-0x001F reserved
    _spec(0x0020, "location_report_strategy", _D),  # 0 timed, 1 by distance, 2 both
    _spec(0x0021, "location_report_scheme", _D),  # 0 by ACC, 1 by login state then ACC
    _spec(0x0022, "report_interval_no_driver_s", _D),
    _spec(0x0023, "slave_server_apn", _S, note="2019; empty = as the main server"),
    _spec(0x0024, "slave_server_dial_user", _S, note="2019"),
    _spec(0x0025, "slave_server_dial_password", _S, note="2019"),
    _spec(0x0026, "slave_server_backup_address", _S, note="2019; host:port;..."),
    _spec(0x0027, "report_interval_sleep_s", _D),
    _spec(0x0028, "report_interval_emergency_s", _D),
    _spec(0x0029, "report_interval_default_s", _D),
    # 0x002A-0x002B reserved
    _spec(0x002C, "report_distance_default_m", _D),
    _spec(0x002D, "report_distance_no_driver_m", _D),
    _spec(0x002E, "report_distance_sleep_m", _D),
    _spec(0x002F, "report_distance_emergency_m", _D),
    _spec(0x0030, "corner_retransmit_angle_deg", _D),  # below 180
    _spec(0x0031, "fence_radius_m", _W),  # electronic fence radius = illegal displacement limit
    # Illegal driving period: start hour, start minute, end hour, end minute (binary bytes).
    _spec(0x0032, "illegal_driving_period", _N, 4, note="2019"),
    # 0x0033-0x003F reserved
    _spec(0x0040, "platform_phone", _S),
    _spec(0x0041, "reset_phone", _S),
    _spec(0x0042, "factory_reset_phone", _S),
    _spec(0x0043, "platform_sms_phone", _S),
    _spec(0x0044, "sms_alarm_phone", _S),
    _spec(0x0045, "call_answer_strategy", _D),  # 0 auto, 1 auto with ACC on, manual when off
    _spec(0x0046, "max_call_duration_s", _D),  # 0 no calls, 0xFFFFFFFF unlimited
    _spec(0x0047, "max_call_duration_month_s", _D),  # 0 no calls, 0xFFFFFFFF unlimited
    _spec(0x0048, "monitor_phone", _S),
    _spec(0x0049, "privileged_sms_phone", _S),
    # 0x004A-0x004F reserved
    _spec(0x0050, "alarm_mask", _D),  # bits as the 0x0200 alarm flags (table 24)
    _spec(0x0051, "alarm_sms_switch", _D),
    _spec(0x0052, "alarm_photo_switch", _D),
    _spec(0x0053, "alarm_photo_store_flags", _D),
    _spec(0x0054, "key_alarm_flags", _D),
    _spec(0x0055, "max_speed_kmh", _D),
    _spec(0x0056, "overspeed_duration_s", _D),
    _spec(0x0057, "continuous_driving_limit_s", _D),
    _spec(0x0058, "daily_driving_limit_s", _D),
    _spec(0x0059, "min_rest_s", _D),
    _spec(0x005A, "max_parking_s", _D),
    _spec(0x005B, "overspeed_warning_delta", _W),  # 1/10 km/h
    _spec(0x005C, "fatigue_warning_delta_s", _W),
    # Bits 0-7 collision time (ms), bits 8-15 collision acceleration (0.1 g).
    _spec(0x005D, "collision_alarm_params", _W),
    _spec(0x005E, "rollover_angle_deg", _W),
    # 0x005F-0x0063 reserved
    _spec(0x0064, "timed_photo_control", _D),  # table 14
    _spec(0x0065, "distance_photo_control", _D),  # table 15
    # 0x0066-0x006F reserved
    _spec(0x0070, "image_quality", _D),  # 1 (best) - 10
    _spec(0x0071, "brightness", _D),  # 0-255
    _spec(0x0072, "contrast", _D),  # 0-127
    _spec(0x0073, "saturation", _D),  # 0-127
    _spec(0x0074, "chroma", _D),  # 0-255
    # 0x0075-0x007F reserved (JT/T 1078 uses 0x0075-0x007C; kept as bytes here)
    _spec(0x0080, "odometer", _D),  # 1/10 km
    _spec(0x0081, "province_id", _W),  # GB/T 2260
    _spec(0x0082, "city_id", _W),  # GB/T 2260
    _spec(0x0083, "plate", _S),
    _spec(0x0084, "plate_color", _B),  # JT/T 697.7; 0 = not registered
    _spec(0x0090, "gnss_mode", _B),  # bit0 GPS, bit1 BeiDou, bit2 GLONASS, bit3 Galileo
    _spec(0x0091, "gnss_baud_rate", _B),  # 0 4800 ... 5 115200
    _spec(0x0092, "gnss_output_frequency", _B),  # 0 500 ms, 1 1000 ms ... 4 4000 ms
    _spec(0x0093, "gnss_sampling_interval_s", _D),
    _spec(0x0094, "gnss_upload_mode", _B),  # 0 store only, 1 time, 2 distance, 0x0B-0x0D totals
    _spec(0x0095, "gnss_upload_setting", _D),  # s, m or records, by 0x0094
    _spec(0x0100, "can1_collect_interval_ms", _D),  # 0 = do not collect
    _spec(0x0101, "can1_upload_interval_s", _W),  # 0 = do not upload
    _spec(0x0102, "can2_collect_interval_ms", _D),
    _spec(0x0103, "can2_upload_interval_s", _W),
    # CAN id collection: bits 63-32 interval (ms), 31 channel, 30 frame type, 29 method,
    # 28-0 CAN id.  0x0111-0x01FF are further ids with the same layout.
    _spec(0x0110, "can_id_collection", _N, 8),
    *(
        _spec(param_id, f"can_id_collection_{param_id - 0x0110}", _N, 8)
        for param_id in range(0x0111, 0x0200)
    ),
)

PARAMS: Mapping[int, ParamSpec] = {spec.param_id: spec for spec in _TABLE}
"""Table 12 by parameter id."""

PARAMS_BY_NAME: Mapping[str, ParamSpec] = {spec.name: spec for spec in _TABLE}

# 0xF000-0xFFFF are left to manufacturers (table 12, last row).
VENDOR_PARAM_IDS = range(0xF000, 0x10000)

ParamValue = int | str | bytes


def gbk_or_bytes(data: bytes) -> str | bytes:
    """GBK text when ``data`` is GBK that re-encodes to the same bytes, else ``data`` itself.

    Nothing is stripped (NUL padding included), so the value always rebuilds byte for byte;
    bytes holding a control character (NUL padding among them) are not text for
    :func:`~protocol.fields.decode_text` and so stay bytes.
    """
    try:
        text = decode_text(data)
    except TextDecodeError:
        return data
    try:
        same = encode_text(text) == data
    except LocalProtocolError:  # pragma: no cover - decoded text always re-encodes
        same = False
    return text if same else data


def typed_value(param_id: int, data: bytes) -> ParamValue:
    """The value of parameter ``param_id`` from its wire bytes, by table 12."""
    spec = PARAMS.get(param_id)
    if spec is None or spec.type is ParamType.BYTES:
        return data
    if spec.type is ParamType.STRING:
        return gbk_or_bytes(data)
    if len(data) != spec.size:
        return data
    return int.from_bytes(data, "big")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalParameter(Record):
    """One parameter item (id DWORD, length BYTE, value).

    ``value`` is int, str or bytes as :func:`typed_value` says.

    The value is normalised on construction: bytes that are a valid encoding of the id's type
    become the typed value, so equal wire bytes always give equal records.  Building checks the
    type: an int needs a numeric id and must fit its width, a str needs a STRING id; bytes are
    written as they are for any id.
    """

    param_id: int
    value: ParamValue

    def __post_init__(self) -> None:
        if isinstance(self.value, bytes):
            object.__setattr__(self, "value", typed_value(self.param_id, self.value))

    @classmethod
    def named(cls, name: str, value: ParamValue) -> TerminalParameter:
        """A standard parameter by its table-12 name (``named("heartbeat_interval_s", 30)``)."""
        try:
            spec = PARAMS_BY_NAME[name]
        except KeyError:
            raise LocalProtocolError(f"no terminal parameter named {name!r}") from None
        return cls(param_id=spec.param_id, value=value)

    @property
    def spec(self) -> ParamSpec | None:
        return PARAMS.get(self.param_id)

    @property
    def name(self) -> str | None:
        spec = self.spec
        return spec.name if spec is not None else None

    @property
    def raw(self) -> bytes:
        """The value's wire bytes; raises :class:`LocalProtocolError` if it does not fit."""
        value, spec = self.value, self.spec
        if isinstance(value, bytes):
            return value
        if isinstance(value, int):
            if spec is None or spec.size is None or spec.type not in _INT_SIZES:
                raise LocalProtocolError(f"parameter 0x{self.param_id:04x} is not numeric")
            try:
                return value.to_bytes(spec.size, "big")
            except OverflowError:
                raise LocalProtocolError(
                    f"{value} does not fit parameter 0x{self.param_id:04x} ({spec.type.value})"
                ) from None
        if spec is None or spec.type is not ParamType.STRING:
            raise LocalProtocolError(f"parameter 0x{self.param_id:04x} is not a STRING")
        return encode_text(value)

    def to_build(self) -> dict[str, Any]:
        return {"param_id": self.param_id, "value": self.raw}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": f"0x{self.param_id:04x}",
            "name": self.name,
            "value": jsonable(self.value),
        }


# Parameter item: id, value length, value.
_PARAM_ITEM = Struct(
    "param_id" / DWORD,
    "value" / Prefixed(BYTE, GreedyBytes),
)

# 0x8103 and 0x0104 bodies end in the items; the count is the tuple's length when building.
_PARAM_ITEMS = GreedyRange(_PARAM_ITEM)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _ParamList(Message):
    """Shared behaviour of 0x8103 and 0x0104: a parameter tuple and the count as declared."""

    NESTED: ClassVar[Mapping[str, type[Record]]] = {"params": TerminalParameter}

    params: tuple[TerminalParameter, ...] = ()
    # The count BYTE as received; None for a message built here.  Not part of equality: the
    # count written is always len(params).
    declared_count: int | None = dataclasses.field(default=None, compare=False)

    @property
    def param_count(self) -> int:
        """The count BYTE as received, or the number of items for a message built here."""
        return self.declared_count if self.declared_count is not None else len(self.params)

    @property
    def param_ids(self) -> list[int]:
        return [p.param_id for p in self.params]

    @property
    def count_mismatch(self) -> bool:
        """True when the received count BYTE disagreed with the items present."""
        return self.declared_count is not None and self.declared_count != len(self.params)

    def get(self, key: int | str) -> ParamValue | None:
        """The value of the first parameter with this id or table-12 name, if present."""
        if isinstance(key, str):
            spec = PARAMS_BY_NAME.get(key)
            if spec is None:
                return None
            key = spec.param_id
        for param in self.params:
            if param.param_id == key:
                return param.value
        return None


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetTerminalParams(_ParamList):
    """0x8103 set terminal parameters (8.9): count BYTE, then the items."""

    MSG_ID: ClassVar[int] = 0x8103
    SCHEMA: ClassVar[Construct] = Struct(
        "declared_count" / Rebuild(BYTE, len_(this.params)),
        "params" / _PARAM_ITEMS,
        Terminated,
    )


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryTerminalParams(Message):
    """0x8104 query all terminal parameters (8.10): empty body; answered by 0x0104."""

    MSG_ID: ClassVar[int] = 0x8104
    SCHEMA: ClassVar[Construct] = Struct(Terminated)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuerySpecifiedParams(Message):
    """0x8106 query specified terminal parameters (8.11): count BYTE, then DWORD ids."""

    MSG_ID: ClassVar[int] = 0x8106
    SCHEMA: ClassVar[Construct] = Struct(
        "param_ids" / PrefixedArray(BYTE, DWORD),
        Terminated,
    )
    param_ids: tuple[int, ...] = ()


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryParamsResponse(_ParamList):
    """0x0104 query terminal parameters response (8.12): reply serial WORD, count BYTE, items.

    ``reply_serial`` is the serial of the 0x8104/0x8106 answered.  The answer is often longer
    than one frame and arrives sub-packaged; decode the reassembled body.
    """

    MSG_ID: ClassVar[int] = 0x0104
    SCHEMA: ClassVar[Construct] = Struct(
        "reply_serial" / WORD,
        "declared_count" / Rebuild(BYTE, len_(this.params)),
        "params" / _PARAM_ITEMS,
        Terminated,
    )
    reply_serial: int


__all__ = [
    "PARAMS",
    "PARAMS_BY_NAME",
    "VENDOR_PARAM_IDS",
    "ParamSpec",
    "ParamType",
    "ParamValue",
    "QueryParamsResponse",
    "QuerySpecifiedParams",
    "QueryTerminalParams",
    "SetTerminalParams",
    "TerminalParameter",
    "gbk_or_bytes",
    "typed_value",
]
