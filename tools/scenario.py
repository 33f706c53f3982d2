"""Scenario files for ``jt808 simulate``: a scripted fleet in TOML.

A scenario says which vehicle (phone, plate, edition) drives where (waypoints, longitude first),
when (its start in device time) and how fast, and which alarm bits it raises at which device
times, so a rule-engine scenario replays the same positions every time.  Device time is the
terminals' own clock (GMT+8, the zone of the 0x0200 BCD time, JT/T 808-2019 table 23);
``time_scale`` runs it faster than real time.

Example::

    [fleet]
    start = 2024-05-01T07:59:00+08:00   # device clock when the run starts
    time_scale = 10.0                   # device seconds per real second
    interval_s = 10.0                   # reporting interval, device seconds
    heartbeat_s = 60.0                  # heartbeat when idle, device seconds

    [[vehicle]]
    phone = "13800000001"
    plate = "云A12345"
    edition = 2019
    start = 2024-05-01T08:00:00+08:00
    speed_kmh = 40.0
    mileage_km = 12000.0
    waypoints = [
        [102.7100, 25.0400],                                 # lon, lat
        { lon = 102.7200, lat = 25.0400, speed_kmh = 95.0 },  # speed of the leg leaving it
        { lon = 102.7200, lat = 25.0500, dwell_s = 60.0 },    # stands, engine on
        { lon = 102.7300, lat = 25.0500, park_s = 600.0 },    # parks, engine off
    ]

    [[vehicle.alarm]]
    bits = ["power_cut"]                # names or bit numbers of table 24
    at = 2024-05-01T08:05:00+08:00
    duration_s = 120.0                  # omitted: until the end of the run

Semantics: before its ``start`` a vehicle stands at its first waypoint with ACC off; then it
waits ``dwell_s`` (ACC on) and ``park_s`` (ACC off) of the first waypoint, drives each leg in a
straight line at the leaving waypoint's ``speed_kmh`` (else the vehicle's), and on arrival at a
waypoint stands for its ``dwell_s`` then ``park_s``.  After the last waypoint it stands with ACC
off.  Datetimes without an offset are GMT+8.

:func:`parse_scenario` and :func:`load_scenario` return frozen dataclasses; every problem raises
a :class:`ScenarioError` subclass naming the file and the key path (``vehicle[2].alarm[0].at``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Final

from protocol.errors import LocalProtocolError
from protocol.fields import GMT8, encode_text
from protocol.header import Edition

# Table 24 (JT/T 808-2019; 2013 bits 12-14 as named there), alarm flag bits by name.
ALARM_BITS: Final[Mapping[str, int]] = {
    "emergency": 0,
    "overspeed": 1,
    "fatigue": 2,
    "danger_warning": 3,
    "gnss_fault": 4,
    "gnss_antenna_cut": 5,
    "gnss_antenna_short": 6,
    "power_undervoltage": 7,
    "power_cut": 8,
    "display_fault": 9,
    "tts_fault": 10,
    "camera_fault": 11,
    "ic_card_fault": 12,
    "overspeed_warning": 13,
    "fatigue_warning": 14,
    "daily_driving_overtime": 18,
    "parking_overtime": 19,
    "area_in_out": 20,
    "route_in_out": 21,
    "route_time": 22,
    "route_deviation": 23,
    "vss_fault": 24,
    "fuel_abnormal": 25,
    "theft": 26,
    "illegal_ignition": 27,
    "illegal_displacement": 28,
    "collision": 29,
    "rollover": 30,
    "illegal_door_open": 31,
}

# Caps: a scenario is a script for a test or a demo, not a fleet database.  One simulator
# process holds at most ~20,000 connections (the descriptor limit here); 10,000 waypoints are a
# day of driving with a point every 10 s; 1,000 alarm events per vehicle are far more than a
# rule scenario needs.  The caps keep a typo (or a generated file gone wrong) from eating memory.
MAX_VEHICLES = 20_000
MAX_WAYPOINTS = 10_000
MAX_ALARMS = 1_000
# Faster than an hour per second turns 10 s reporting into microseconds: no longer a replay.
MAX_TIME_SCALE = 3600.0
# Vehicles on Chinese roads: 120 km/h motorway limit; above 220 is a typo, not a scenario.
MAX_SPEED_KMH = 220.0
# 0x0100 plate colours (JT/T 697.7): 0 not registered, 1 blue, 2 yellow, 3 black, 4 white,
# 5 green, 9 other (2019).
PLATE_COLORS = frozenset({0, 1, 2, 3, 4, 5, 9})
# BCD[6] phone in 2011/2013 headers, BCD[10] in 2019 (clause 4.4.3, table 3).
PHONE_DIGITS = {Edition.V2013: 12, Edition.V2019: 20}
# Kunming's altitude, the default region of the simulator.
DEFAULT_ALTITUDE_M = 1890


# ---------------------------------------------------------------------------------------------
# Errors


class ScenarioError(Exception):
    """A scenario file that cannot be used; ``where`` is the key path, ``source`` the file."""

    def __init__(self, detail: str, *, source: str, where: str = "") -> None:
        self.detail = detail
        self.source = source
        self.where = where
        location = f"{source}: {where}" if where else source
        super().__init__(f"{location}: {detail}")


class ScenarioSyntaxError(ScenarioError):
    """Not valid TOML."""


class UnknownKeyError(ScenarioError):
    """A key the format does not define (a typo must not be ignored silently)."""

    def __init__(self, key: str, *, source: str, where: str, allowed: frozenset[str]) -> None:
        self.key = key
        self.allowed = allowed
        super().__init__(
            f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
            source=source,
            where=where,
        )


class MissingKeyError(ScenarioError):
    """A required key is absent."""


class ScenarioValueError(ScenarioError):
    """A value of the wrong type or out of range."""


# ---------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Waypoint:
    """A point of a route.  ``speed_kmh`` is the speed of the leg leaving it (None: the
    vehicle's); on arrival the vehicle stands ``dwell_s`` with ACC on, then ``park_s`` off."""

    lon: float
    lat: float
    speed_kmh: float | None = None
    dwell_s: float = 0.0
    park_s: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AlarmEvent:
    """Alarm flag ``bits`` (a table-24 mask) set from ``at`` for ``duration_s`` (None: to the
    end of the run)."""

    bits: int
    at: datetime
    duration_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VehiclePlan:
    """One scripted vehicle.  ``phone`` is the digit string (left-padded with zeros to the
    header's BCD width); ``start`` None means the fleet's start."""

    phone: str
    plate: str
    edition: Edition
    waypoints: tuple[Waypoint, ...]
    plate_color: int = 1
    start: datetime | None = None
    speed_kmh: float = 40.0
    mileage_km: float = 0.0
    altitude_m: int = DEFAULT_ALTITUDE_M
    interval_s: float | None = None
    alarms: tuple[AlarmEvent, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FleetSettings:
    """Run settings, device time.  ``duration_s`` None means until the last vehicle is done."""

    start: datetime
    time_scale: float = 1.0
    interval_s: float = 10.0
    heartbeat_s: float = 60.0
    duration_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    fleet: FleetSettings
    vehicles: tuple[VehiclePlan, ...]
    source: str = "<scenario>"


# ---------------------------------------------------------------------------------------------
# Parsing

_FLEET_KEYS = frozenset({"start", "time_scale", "interval_s", "heartbeat_s", "duration_s"})
_VEHICLE_KEYS = frozenset(
    {
        "phone",
        "plate",
        "plate_color",
        "edition",
        "start",
        "speed_kmh",
        "mileage_km",
        "altitude_m",
        "interval_s",
        "waypoints",
        "alarm",
    }
)
_WAYPOINT_KEYS = frozenset({"lon", "lat", "speed_kmh", "dwell_s", "park_s"})
_ALARM_KEYS = frozenset({"bits", "at", "duration_s"})
_TOP_KEYS = frozenset({"fleet", "vehicle"})


class _Reader:
    """Typed access to one TOML table, with the key path for error messages."""

    def __init__(self, table: Any, *, source: str, where: str, allowed: frozenset[str]) -> None:
        if not isinstance(table, dict):
            raise ScenarioValueError("expected a table", source=source, where=where)
        self.table: dict[str, Any] = table
        self.source = source
        self.where = where
        for key in table:
            if key not in allowed:
                raise UnknownKeyError(key, source=source, where=self.path(key), allowed=allowed)

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, detail: str) -> ScenarioValueError:
        return ScenarioValueError(detail, source=self.source, where=self.path(key))

    def require(self, key: str) -> Any:
        if key not in self.table:
            raise MissingKeyError(
                "required key is missing", source=self.source, where=self.path(key)
            )
        return self.table[key]

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float,
        high: float = math.inf,
        open_low: bool = False,
    ) -> float:
        value = self.optional_number(key, low=low, high=high, open_low=open_low)
        return default if value is None else value

    def optional_number(
        self, key: str, *, low: float, high: float = math.inf, open_low: bool = False
    ) -> float | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {type(value).__name__}")
        value = float(value)
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or value > high:
            bound = f"> {low}" if open_low else f">= {low}"
            raise self.error(key, f"{value} is out of range ({bound}, <= {high})")
        return value

    def required_number(self, key: str, *, low: float, high: float) -> float:
        self.require(key)
        value = self.optional_number(key, low=low, high=high)
        if value is None:  # pragma: no cover - require() raised
            raise MissingKeyError(
                "required key is missing", source=self.source, where=self.path(key)
            )
        return value

    def text(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def moment(self, key: str) -> datetime:
        """A required datetime; one without an offset is GMT+8 (the device clock's zone)."""
        return self._moment(key, self.require(key))

    def optional_moment(self, key: str) -> datetime | None:
        return self._moment(key, self.table[key]) if key in self.table else None

    def _moment(self, key: str, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo is not None else value.replace(tzinfo=GMT8)
        if isinstance(value, date | time):
            raise self.error(key, "expected a date and time (2024-05-01T08:00:00+08:00)")
        raise self.error(key, f"expected a datetime, got {type(value).__name__}")


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    """Parse a scenario from TOML text; raises :class:`ScenarioError`."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioSyntaxError(str(exc), source=source) from exc
    top = _Reader(document, source=source, where="", allowed=_TOP_KEYS)
    fleet = _fleet(_Reader(top.require("fleet"), source=source, where="fleet", allowed=_FLEET_KEYS))
    vehicles_raw = top.require("vehicle")
    if not isinstance(vehicles_raw, list) or not vehicles_raw:
        raise top.error("vehicle", "expected one or more [[vehicle]] tables")
    if len(vehicles_raw) > MAX_VEHICLES:
        raise top.error("vehicle", f"{len(vehicles_raw)} vehicles; at most {MAX_VEHICLES}")
    vehicles = tuple(
        _vehicle(_Reader(raw, source=source, where=f"vehicle[{i}]", allowed=_VEHICLE_KEYS))
        for i, raw in enumerate(vehicles_raw)
    )
    seen: dict[str, int] = {}
    for index, vehicle in enumerate(vehicles):
        key = vehicle.phone.lstrip("0")
        if key in seen:
            raise ScenarioValueError(
                f"phone {vehicle.phone} is also vehicle[{seen[key]}]'s",
                source=source,
                where=f"vehicle[{index}].phone",
            )
        seen[key] = index
    return Scenario(fleet=fleet, vehicles=vehicles, source=source)


def load_scenario(path: Path | str) -> Scenario:
    """Read and parse a scenario file; raises :class:`ScenarioError` (also when unreadable)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read: {exc}", source=str(path)) from exc
    return parse_scenario(text, source=str(path))


def _fleet(reader: _Reader) -> FleetSettings:
    return FleetSettings(
        start=reader.moment("start"),
        time_scale=reader.number("time_scale", 1.0, low=0, high=MAX_TIME_SCALE, open_low=True),
        interval_s=reader.number("interval_s", 10.0, low=0, open_low=True),
        heartbeat_s=reader.number("heartbeat_s", 60.0, low=0, open_low=True),
        duration_s=reader.optional_number("duration_s", low=0, open_low=True),
    )


def _vehicle(reader: _Reader) -> VehiclePlan:
    edition_raw = reader.table.get("edition", 2013)
    if isinstance(edition_raw, bool) or edition_raw not in (2013, 2019):
        raise reader.error("edition", f"expected 2013 or 2019, got {edition_raw!r}")
    edition = Edition(edition_raw)
    phone = reader.text("phone")
    width = PHONE_DIGITS[edition]
    if not phone.isdigit() or not phone.isascii() or len(phone) > width:
        raise reader.error("phone", f"expected up to {width} digits for {edition.value}")
    plate = reader.text("plate")
    try:
        encode_text(plate)
    except LocalProtocolError as exc:
        raise reader.error("plate", "not encodable as GBK") from exc
    color = reader.table.get("plate_color", 1)
    if isinstance(color, bool) or color not in PLATE_COLORS:
        raise reader.error("plate_color", f"expected one of {sorted(PLATE_COLORS)}")
    altitude = reader.table.get("altitude_m", DEFAULT_ALTITUDE_M)
    if isinstance(altitude, bool) or not isinstance(altitude, int) or not 0 <= altitude <= 0xFFFF:
        raise reader.error("altitude_m", "expected an integer 0..65535 (a WORD, table 23)")
    waypoints = _waypoints(reader)
    alarms_raw = reader.table.get("alarm", [])
    if not isinstance(alarms_raw, list):
        raise reader.error("alarm", "expected [[vehicle.alarm]] tables")
    if len(alarms_raw) > MAX_ALARMS:
        raise reader.error("alarm", f"{len(alarms_raw)} alarm events; at most {MAX_ALARMS}")
    alarms = tuple(
        _alarm(
            _Reader(
                raw, source=reader.source, where=reader.path(f"alarm[{i}]"), allowed=_ALARM_KEYS
            )
        )
        for i, raw in enumerate(alarms_raw)
    )
    return VehiclePlan(
        phone=phone,
        plate=plate,
        plate_color=color,
        edition=edition,
        start=reader.optional_moment("start"),
        speed_kmh=reader.number("speed_kmh", 40.0, low=0, high=MAX_SPEED_KMH, open_low=True),
        # The odometer item 0x01 is a DWORD of 1/10 km (table 27).
        mileage_km=reader.number("mileage_km", 0.0, low=0, high=0xFFFFFFFF / 10),
        altitude_m=altitude,
        interval_s=reader.optional_number("interval_s", low=0, open_low=True),
        waypoints=waypoints,
        alarms=alarms,
    )


def _waypoints(reader: _Reader) -> tuple[Waypoint, ...]:
    raw = reader.require("waypoints")
    if not isinstance(raw, list) or not raw:
        raise reader.error("waypoints", "expected a non-empty array of points")
    if len(raw) > MAX_WAYPOINTS:
        raise reader.error("waypoints", f"{len(raw)} waypoints; at most {MAX_WAYPOINTS}")
    out = []
    for index, point in enumerate(raw):
        where = reader.path(f"waypoints[{index}]")
        table = point
        if isinstance(point, list):
            if len(point) != 2:
                raise ScenarioValueError("expected [lon, lat]", source=reader.source, where=where)
            table = {"lon": point[0], "lat": point[1]}
        item = _Reader(table, source=reader.source, where=where, allowed=_WAYPOINT_KEYS)
        out.append(
            Waypoint(
                lon=item.required_number("lon", low=-180, high=180),
                lat=item.required_number("lat", low=-90, high=90),
                speed_kmh=item.optional_number(
                    "speed_kmh", low=0, high=MAX_SPEED_KMH, open_low=True
                ),
                dwell_s=item.number("dwell_s", 0.0, low=0),
                park_s=item.number("park_s", 0.0, low=0),
            )
        )
    return tuple(out)


def alarm_mask(value: Any) -> int:
    """A table-24 mask from a name, a bit number or a list of them; raises ValueError."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected at least one alarm bit")
    mask = 0
    for item in items:
        bit = item
        if isinstance(item, str):
            name = item.strip().lower()
            if name in ALARM_BITS:
                mask |= 1 << ALARM_BITS[name]
                continue
            if not name.isdigit():
                raise ValueError(f"unknown alarm {item!r} (known: {', '.join(ALARM_BITS)})")
            bit = int(name)
        # Table 24 flags are a DWORD: bits 0..31.
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
            raise ValueError(f"alarm bit {item!r} is not a name or a bit number 0..31")
        mask |= 1 << bit
    return mask


def _alarm(reader: _Reader) -> AlarmEvent:
    try:
        bits = alarm_mask(reader.require("bits"))
    except ValueError as exc:
        raise reader.error("bits", str(exc)) from exc
    return AlarmEvent(
        bits=bits,
        at=reader.moment("at"),
        duration_s=reader.optional_number("duration_s", low=0, open_low=True),
    )


__all__ = [
    "ALARM_BITS",
    "AlarmEvent",
    "FleetSettings",
    "MissingKeyError",
    "Scenario",
    "ScenarioError",
    "ScenarioSyntaxError",
    "ScenarioValueError",
    "UnknownKeyError",
    "VehiclePlan",
    "Waypoint",
    "alarm_mask",
    "load_scenario",
    "parse_scenario",
]
