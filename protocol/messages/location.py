"""Location reports: 0x0200, 0x0201, 0x0500 and 0x0704 (JT/T 808-2019 8.18, 8.20, 8.31, 8.43).

The basic information is 28 bytes (table 23); additional items follow as id/length/value
(table 27).  Standard items decode into named records; any other item, and a standard item whose
length is not the standard's, is kept byte for byte as :class:`RawItem`.  An item whose declared
length runs past the body ends the walk: it is kept (truncated) and the report is still good,
because one vendor's odd item must not cost the position.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar, Self

from construct import Adapter, Bytes, Construct, ConstructError, If, Struct, Terminated, this

from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.fields import BYTE, DWORD, WORD, BcdTime, bcd_time_to_datetime
from protocol.header import Edition
from protocol.messages.base import Message, Record, jsonable, register

# Table 24 (alarm flags) bits the platform's rules care about.
ALARM_EMERGENCY = 1 << 0
ALARM_OVERSPEED = 1 << 1
ALARM_GNSS_FAULT = 1 << 4
ALARM_GNSS_ANTENNA_CUT = 1 << 5
ALARM_GNSS_ANTENNA_SHORT = 1 << 6
ALARM_POWER_UNDERVOLTAGE = 1 << 7
ALARM_POWER_CUT = 1 << 8
ALARM_ILLEGAL_IGNITION = 1 << 27
ALARM_ILLEGAL_DISPLACEMENT = 1 << 28

# Table 25 (status bits).
STATUS_ACC_ON = 1 << 0
STATUS_FIXED = 1 << 1
STATUS_SOUTH = 1 << 2
STATUS_WEST = 1 << 3

# Table 23: location basic information, 28 bytes.
LOCATION_BASIC = Struct(
    "alarm" / DWORD,
    "status" / DWORD,
    "latitude" / DWORD,  # 1e-6 degree, sign in status bit 2
    "longitude" / DWORD,  # 1e-6 degree, sign in status bit 3
    "altitude_m" / WORD,
    "speed" / WORD,  # 1/10 km/h
    "direction" / WORD,  # 0-359, north = 0, clockwise
    "time" / BcdTime,  # GMT+8
)
LOCATION_BASIC_SIZE = 28
# LOCATION_BASIC is the reference; every report passes through this struct equivalent of its
# first 22 bytes (the BCD time is read by bcd_time_to_datetime, as BcdTime does).
_BASIC = struct.Struct(">IIIIHHH")


# ---------------------------------------------------------------------------------------------
# Additional items (table 27)


class Item(Record):
    """A standard additional item; ``SCHEMA`` describes its value bytes."""

    __slots__ = ()
    ITEM_ID: ClassVar[int]
    SCHEMA: ClassVar[Construct]

    @property
    def item_id(self) -> int:
        return self.ITEM_ID

    @classmethod
    def decode_value(cls, data: bytes) -> Self:
        """Decode the value bytes; ConstructError unless they are exactly the schema."""
        return cls.from_parsed(_exact(cls.SCHEMA).parse(data))

    def encode_value(self) -> bytes:
        try:
            return bytes(self.SCHEMA.build(self.to_build()))
        except ConstructError as exc:
            raise LocalProtocolError(f"item 0x{self.ITEM_ID:02x}: {exc}") from exc


ITEM_TYPES: dict[int, type[Item]] = {}
# Items holding one unsigned integer of a fixed width: id -> (class, width).  Every report
# carries a few of them, so they are read with int.from_bytes rather than a construct parse
# (tests/test_location_fastpath.py checks both give the same items).
_UNSIGNED_ITEMS: dict[int, tuple[type[Item], int]] = {}
_EXACT: dict[int, Construct] = {}


def _exact(schema: Construct) -> Construct:
    """``schema`` that must consume the whole value (built once per schema)."""
    exact = _EXACT.get(id(schema))
    if exact is None:
        exact = _EXACT[id(schema)] = Struct(*schema.subcons, Terminated)
    return exact


class _SignMagnitude16(Adapter):  # type: ignore[misc]
    """A WORD whose top bit is the sign and whose low 15 bits are the magnitude."""

    def _decode(self, obj: int, context: Any, path: str) -> int:
        return -(obj & 0x7FFF) if obj & 0x8000 else obj

    def _encode(self, obj: int, context: Any, path: str) -> int:
        if not -0x7FFF <= obj <= 0x7FFF:
            raise LocalProtocolError(f"{obj} does not fit sign-and-magnitude 16 bits")
        return 0x8000 | -obj if obj < 0 else obj


def _item(cls: type[Item]) -> type[Item]:
    ITEM_TYPES[cls.ITEM_ID] = cls
    return cls


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Mileage(Item):
    """0x01: odometer, DWORD in 1/10 km."""

    ITEM_ID: ClassVar[int] = 0x01
    SCHEMA: ClassVar[Construct] = Struct("value" / DWORD)
    value: int

    @property
    def km(self) -> float:
        return self.value / 10

    def to_json(self) -> dict[str, Any]:
        return {"mileage_km": self.km}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Fuel(Item):
    """0x02: fuel gauge, WORD in 1/10 L."""

    ITEM_ID: ClassVar[int] = 0x02
    SCHEMA: ClassVar[Construct] = Struct("value" / WORD)
    value: int

    def to_json(self) -> dict[str, Any]:
        return {"fuel_l": self.value / 10}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecorderSpeed(Item):
    """0x03: speed from the driving recorder, WORD in 1/10 km/h."""

    ITEM_ID: ClassVar[int] = 0x03
    SCHEMA: ClassVar[Construct] = Struct("value" / WORD)
    value: int

    def to_json(self) -> dict[str, Any]:
        return {"recorder_speed_kmh": self.value / 10}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AlarmEventId(Item):
    """0x04: id of an alarm event that needs manual confirmation, WORD from 1 (2013+)."""

    ITEM_ID: ClassVar[int] = 0x04
    SCHEMA: ClassVar[Construct] = Struct("value" / WORD)
    value: int

    def to_json(self) -> dict[str, Any]:
        return {"alarm_event_id": self.value}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TirePressure(Item):
    """0x05: tyre pressures, BYTE[30] in Pa units of the standard, 0xFF = invalid (2019)."""

    ITEM_ID: ClassVar[int] = 0x05
    SCHEMA: ClassVar[Construct] = Struct("values" / Bytes(30))
    values: bytes

    def to_json(self) -> dict[str, Any]:
        return {"tire_pressure": list(self.values)}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CarriageTemperature(Item):
    """0x06: carriage temperature in degrees Celsius, -32767..32767 (2019).

    Table 27 says the top bit marks a negative value, so the WORD is sign and magnitude, not
    two's complement.
    """

    ITEM_ID: ClassVar[int] = 0x06
    SCHEMA: ClassVar[Construct] = Struct("value" / _SignMagnitude16(WORD))
    value: int

    def to_json(self) -> dict[str, Any]:
        return {"carriage_temperature_c": self.value}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OverspeedInfo(Item):
    """0x11: overspeed alarm details (table 28): location type, then the area id unless 0."""

    ITEM_ID: ClassVar[int] = 0x11
    SCHEMA: ClassVar[Construct] = Struct(
        "location_type" / BYTE,  # 0 none, 1 circle, 2 rectangle, 3 polygon, 4 route section
        "area_id" / If(this.location_type != 0, DWORD),
    )
    location_type: int
    area_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"location_type": self.location_type, "area_id": self.area_id}


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AreaRouteAlarm(Item):
    """0x12: entering/leaving an area or route (table 29)."""

    ITEM_ID: ClassVar[int] = 0x12
    SCHEMA: ClassVar[Construct] = Struct(
        "location_type" / BYTE,  # 1 circle, 2 rectangle, 3 polygon, 4 route
        "area_id" / DWORD,
        "direction" / BYTE,  # 0 in, 1 out
    )
    location_type: int
    area_id: int
    direction: int

    def to_json(self) -> dict[str, Any]:
        return {
            "location_type": self.location_type,
            "area_id": self.area_id,
            "direction": self.direction,
        }


@_item
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RouteTimeAlarm(Item):
    """0x13: route section driving time too short/long (table 30)."""

    ITEM_ID: ClassVar[int] = 0x13
    SCHEMA: ClassVar[Construct] = Struct(
        "route_id" / DWORD,
        "duration_s" / WORD,
        "result" / BYTE,  # 0 too short, 1 too long
    )
    route_id: int
    duration_s: int
    result: int

    def to_json(self) -> dict[str, Any]:
        return {"route_id": self.route_id, "duration_s": self.duration_s, "result": self.result}


def _scalar_item(item_id: int, field: Construct, json_name: str, doc: str) -> type[Item]:
    """Items holding one unsigned integer (0x25, 0x2A, 0x2B, 0x30, 0x31)."""

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class _Scalar(Item):
        ITEM_ID: ClassVar[int] = item_id
        SCHEMA: ClassVar[Construct] = Struct("value" / field)
        value: int

        def to_json(self) -> dict[str, Any]:
            return {json_name: self.value}

    _Scalar.__doc__ = doc
    return _Scalar


ExtendedSignal = _item(
    _scalar_item(0x25, DWORD, "extended_signal", "0x25: extended vehicle signal bits (table 31).")
)
ExtendedSignal.__name__ = ExtendedSignal.__qualname__ = "ExtendedSignal"
IoStatus = _item(_scalar_item(0x2A, WORD, "io_status", "0x2A: IO status bits (table 32)."))
IoStatus.__name__ = IoStatus.__qualname__ = "IoStatus"
AnalogInputs = _item(
    _scalar_item(0x2B, DWORD, "analog", "0x2B: analog inputs AD0 (bits 0-15), AD1 (16-31).")
)
AnalogInputs.__name__ = AnalogInputs.__qualname__ = "AnalogInputs"
SignalStrength = _item(
    _scalar_item(0x30, BYTE, "signal_strength", "0x30: wireless network signal strength.")
)
SignalStrength.__name__ = SignalStrength.__qualname__ = "SignalStrength"
GnssSatellites = _item(
    _scalar_item(0x31, BYTE, "gnss_satellites", "0x31: number of GNSS satellites in view.")
)
GnssSatellites.__name__ = GnssSatellites.__qualname__ = "GnssSatellites"

_UNSIGNED_ITEMS.update(
    {
        cls.ITEM_ID: (cls, cls.SCHEMA.sizeof())
        for cls in (
            Mileage,
            Fuel,
            RecorderSpeed,
            AlarmEventId,
            ExtendedSignal,
            IoStatus,
            AnalogInputs,
            SignalStrength,
            GnssSatellites,
        )
    }
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RawItem(Record):
    """An item kept as bytes: vendor ids, reserved ids, standard ids of a foreign length.

    ``declared_length`` is set only when the item's length byte promised more bytes than the
    body had (the item was cut off); it keeps the re-encoded bytes identical to what came in.
    """

    item_id: int
    data: bytes
    declared_length: int | None = None

    @property
    def truncated(self) -> bool:
        return self.declared_length is not None

    def encode_value(self) -> bytes:
        return self.data

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"raw": self.data.hex()}
        if self.declared_length is not None:
            out["declared_length"] = self.declared_length
        return out


AnyItem = Item | RawItem


def decode_item(item_id: int, data: bytes) -> AnyItem:
    unsigned = _UNSIGNED_ITEMS.get(item_id)
    if unsigned is not None and len(data) == unsigned[1]:
        return unsigned[0](value=int.from_bytes(data, "big"))  # type: ignore[call-arg]
    return decode_item_reference(item_id, data)


def decode_item_reference(item_id: int, data: bytes) -> AnyItem:
    """:func:`decode_item` through the construct schemas only."""
    cls = ITEM_TYPES.get(item_id)
    if cls is not None:
        try:
            return cls.decode_value(data)
        except ConstructError:
            pass  # a vendor reusing a standard id with another length: keep the bytes
    return RawItem(item_id=item_id, data=data)


def parse_items(
    data: bytes, decode: Callable[[int, bytes], AnyItem] | None = None
) -> tuple[tuple[AnyItem, ...], bytes]:
    """Walk the id/length/value items; return them and any bytes left that form no item.

    The walk is a plain loop: each step is two bytes of header, and the tolerance rules (an
    overrunning item ends the walk and is kept cut short; a lone trailing byte is returned as
    leftover) do not fit a declarative repeater.
    """
    items: list[AnyItem] = []
    pos = 0
    end = len(data)
    while pos + 2 <= end:
        item_id = data[pos]
        length = data[pos + 1]
        stop = pos + 2 + length
        if stop > end:
            items.append(RawItem(item_id=item_id, data=data[pos + 2 : end], declared_length=length))
            return tuple(items), b""
        items.append((decode or decode_item)(item_id, data[pos + 2 : stop]))
        pos = stop
    return tuple(items), data[pos:]


def build_items(items: tuple[AnyItem, ...]) -> bytes:
    out = bytearray()
    for item in items:
        value = item.encode_value()
        length = item.declared_length if isinstance(item, RawItem) and item.truncated else None
        if length is None:
            length = len(value)
        if length > 0xFF:
            raise LocalProtocolError(f"item 0x{item.item_id:02x} is longer than 255 bytes")
        out += bytes((item.item_id, length))
        out += value
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Location information


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Location(Record):
    """Location basic information and additional items (tables 23-27).

    ``latitude``/``longitude`` are the raw unsigned magnitudes in 1e-6 degree as on the wire;
    :attr:`lat`/:attr:`lon` apply the signs from status bits 2 and 3.  ``speed`` is in 1/10 km/h.
    ``time`` is GMT+8, or None when the device sent an impossible date.  ``leftover`` holds
    bytes after the last whole item (a lone id byte, say).
    """

    alarm: int
    status: int
    latitude: int
    longitude: int
    altitude_m: int
    speed: int
    direction: int
    time: datetime | None
    items: tuple[AnyItem, ...] = ()
    leftover: bytes = b""

    @property
    def lat(self) -> float:
        value = self.latitude / 1e6
        return -value if self.status & STATUS_SOUTH else value

    @property
    def lon(self) -> float:
        value = self.longitude / 1e6
        return -value if self.status & STATUS_WEST else value

    @property
    def speed_kmh(self) -> float:
        return self.speed / 10

    @property
    def acc_on(self) -> bool:
        return bool(self.status & STATUS_ACC_ON)

    @property
    def items_clean(self) -> bool:
        """False when the item walk did not end exactly at the end of the body."""
        if self.leftover:
            return False
        for item in self.items:  # noqa: SIM110 - a plain loop: runs for every stored position
            if type(item) is RawItem and item.truncated:
                return False
        return True

    def find(self, item_type: type[Item]) -> Item | None:
        """The first item of a standard type, if any."""
        for item in self.items:
            if isinstance(item, item_type):
                return item
        return None

    @property
    def mileage_km(self) -> float | None:
        item = self.find(Mileage)
        return item.km if isinstance(item, Mileage) else None

    def item_ids(self) -> list[int]:
        return [item.item_id for item in self.items]

    @classmethod
    def parse_location(cls, data: bytes) -> Self:
        """Table 23 basic information and the additional items (as ``cls``: a
        :class:`LocationReport` is built straight from its body, with no copy)."""
        if len(data) < LOCATION_BASIC_SIZE:
            raise BodyDecodeError(
                f"location needs {LOCATION_BASIC_SIZE} bytes of basic information, got {len(data)}"
            )
        alarm, status, latitude, longitude, altitude, speed, direction = _BASIC.unpack_from(data)
        items, leftover = parse_items(data[LOCATION_BASIC_SIZE:])
        return cls(
            alarm=alarm,
            status=status,
            latitude=latitude,
            longitude=longitude,
            altitude_m=altitude,
            speed=speed,
            direction=direction,
            time=bcd_time_to_datetime(data[22:LOCATION_BASIC_SIZE]),
            items=items,
            leftover=leftover,
        )

    @classmethod
    def parse_location_reference(cls, data: bytes) -> Location:
        """:meth:`parse_location` through the construct schemas only (tests compare)."""
        basic = LOCATION_BASIC.parse(data)
        rest = data[LOCATION_BASIC_SIZE:]
        items, leftover = parse_items(rest, decode=decode_item_reference)
        return Location(
            alarm=basic.alarm,
            status=basic.status,
            latitude=basic.latitude,
            longitude=basic.longitude,
            altitude_m=basic.altitude_m,
            speed=basic.speed,
            direction=basic.direction,
            time=basic.time,
            items=items,
            leftover=leftover,
        )

    def build_location(self) -> bytes:
        try:
            basic = LOCATION_BASIC.build(
                {
                    "alarm": self.alarm,
                    "status": self.status,
                    "latitude": self.latitude,
                    "longitude": self.longitude,
                    "altitude_m": self.altitude_m,
                    "speed": self.speed,
                    "direction": self.direction,
                    "time": self.time,
                }
            )
        except ConstructError as exc:
            raise LocalProtocolError(f"location: {exc}") from exc
        return bytes(basic) + build_items(self.items) + self.leftover

    def location_fields(self) -> dict[str, Any]:
        """Every field of the location record, for building a subclass from it."""
        return {name: getattr(self, name) for name in _LOCATION_FIELDS}

    def extras_json(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for item in self.items:
            key = f"0x{item.item_id:02x}"
            value = item.to_json()
            if key in extras:  # ids may repeat (vendor items); keep every occurrence
                previous = extras[key]
                extras[key] = (
                    [*previous, value]
                    if isinstance(previous, list)
                    else [
                        previous,
                        value,
                    ]
                )
            else:
                extras[key] = value
        return extras

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alarm": self.alarm,
            "status": self.status,
            "lat": self.lat,
            "lon": self.lon,
            "altitude_m": self.altitude_m,
            "speed_kmh": self.speed_kmh,
            "direction": self.direction,
            "time": jsonable(self.time),
            "extras": self.extras_json(),
        }
        if not self.items_clean:
            out["items_clean"] = False
        if self.leftover:
            out["leftover"] = self.leftover.hex()
        return out


_LOCATION_FIELDS = tuple(field.name for field in dataclasses.fields(Location))


# ---------------------------------------------------------------------------------------------
# Messages


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocationReport(Location, Message):
    """0x0200 location information report (8.18)."""

    MSG_ID: ClassVar[int] = 0x0200

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        return cls.parse_location(body)

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        return self.build_location()

    @classmethod
    def from_location(cls, location: Location) -> LocationReport:
        return cls(**location.location_fields())


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _ReplyWithLocation(Message):
    """A reply serial WORD followed by location information (0x0201, 0x0500)."""

    reply_serial: int
    location: Location

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        if len(body) < 2:
            raise BodyDecodeError(f"0x{cls.MSG_ID:04x} body of {len(body)} bytes")
        return cls(
            reply_serial=int.from_bytes(body[:2], "big"),
            location=Location.parse_location(body[2:]),
        )

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        if not 0 <= self.reply_serial <= 0xFFFF:
            raise LocalProtocolError("reply_serial must fit a WORD")
        return self.reply_serial.to_bytes(2, "big") + self.location.build_location()


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocationQueryResponse(_ReplyWithLocation):
    """0x0201 answer to 0x8201 location query (8.20)."""

    MSG_ID: ClassVar[int] = 0x0201


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VehicleControlResponse(_ReplyWithLocation):
    """0x0500 answer to 0x8500 vehicle control (8.31)."""

    MSG_ID: ClassVar[int] = 0x0500


BATCH_NORMAL = 0
BATCH_BACKFILL = 1  # "blind area" back-filled positions (8.43, table 61)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocationBatch(Message):
    """0x0704 batch upload of positions (8.43, table 60).

    ``batch_type`` 0 = normal batch, 1 = back-filled positions recorded while offline.
    The count WORD is derived from ``positions`` when encoding; a body whose count disagrees
    with the items present keeps what it holds and is not rejected.
    """

    MSG_ID: ClassVar[int] = 0x0704
    batch_type: int
    positions: tuple[Location, ...]

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        if len(body) < 3:
            raise BodyDecodeError(f"0x0704 body of {len(body)} bytes")
        count = int.from_bytes(body[:2], "big")
        batch_type = body[2]
        positions: list[Location] = []
        pos = 3
        for index in range(count):
            if pos + 2 > len(body):
                raise BodyDecodeError(f"0x0704 declares {count} positions, body ends at {index}")
            length = int.from_bytes(body[pos : pos + 2], "big")
            item = body[pos + 2 : pos + 2 + length]
            if len(item) != length:
                raise BodyDecodeError(f"0x0704 position {index} overruns the body")
            positions.append(Location.parse_location(item))
            pos += 2 + length
        return cls(batch_type=batch_type, positions=tuple(positions))

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        out = bytearray(len(self.positions).to_bytes(2, "big"))
        out.append(self.batch_type)
        for location in self.positions:
            data = location.build_location()
            out += len(data).to_bytes(2, "big")
            out += data
        return bytes(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_type": self.batch_type,
            "count": len(self.positions),
            "positions": [p.to_json() for p in self.positions],
        }
