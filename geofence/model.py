"""The fence model: what a fence is, independent of how it is indexed or stored.

A fence has a *kind* -- the vehicle's permitted area (its jurisdiction, article 9), a forbidden
zone, a designated overnight parking place, or a plain destination area that trip filings name
-- a *shape* -- circle, rectangle or polygon, the three area types of JT/T 808-2013 8.35-8.40
(0x8600-0x8604) -- and optionally a time window and a speed limit, the optional fields the
standard puts behind area attribute bits 0 and 1.

Coordinates are WGS-84 degrees, (longitude, latitude), east and north positive.  A rectangle is
axis-aligned in longitude/latitude, as JT/T 808 defines it by two corners.  Times of day are
China time (GMT+8), as terminals report them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from datetime import datetime, time
from enum import StrEnum

import shapely

from geofence.errors import FenceError
from protocol.fields import GMT8
from protocol.messages.areas import AreaCircle, AreaPolygon, AreaRectangle

__all__ = [
    "GMT8",
    "Circle",
    "DailyWindow",
    "Fence",
    "FenceKind",
    "PeriodWindow",
    "Polygon",
    "Rectangle",
    "Shape",
    "Window",
    "fence_from_area",
    "window_contains",
    "window_from_bcd",
]

Ring = tuple[tuple[float, float], ...]
"""A closed ring of (lon, lat) vertices; the last vertex repeats the first."""


class FenceKind(StrEnum):
    """What a fence means to the rules."""

    PERMITTED = "permitted"  # the area the vehicle may move in without a filing (article 9)
    FORBIDDEN = "forbidden"  # a zone the vehicle must not stay in
    PARKING = "parking"  # a designated overnight parking place
    DESTINATION = "destination"  # an area trip filings name as their destination


def _check_lon_lat(lon: float, lat: float, what: str) -> None:
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise FenceError(f"{what}: coordinates must be finite, got ({lon}, {lat})")
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise FenceError(f"{what}: ({lon}, {lat}) is not a WGS-84 longitude/latitude")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Circle:
    """A circle: centre (lon, lat) in degrees and a radius in metres on the ellipsoid."""

    lon: float
    lat: float
    radius_m: float

    def __post_init__(self) -> None:
        _check_lon_lat(self.lon, self.lat, "circle centre")
        if not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise FenceError(f"circle radius must be positive, got {self.radius_m}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rectangle:
    """An axis-aligned rectangle in degrees: west <= lon <= east, south <= lat <= north."""

    west: float
    south: float
    east: float
    north: float

    def __post_init__(self) -> None:
        _check_lon_lat(self.west, self.south, "rectangle corner")
        _check_lon_lat(self.east, self.north, "rectangle corner")
        if not (self.west < self.east and self.south < self.north):
            raise FenceError(
                f"rectangle needs west < east and south < north, got "
                f"({self.west}, {self.south}, {self.east}, {self.north})"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Polygon:
    """One or more polygons (a multipolygon), each an exterior ring and optional holes.

    ``parts`` holds, per polygon, its rings: the exterior first, then the holes.  The shape must
    be valid in the OGC sense (no self-intersections, holes inside their exterior).
    """

    parts: tuple[tuple[Ring, ...], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise FenceError("polygon has no parts")
        for part in self.parts:
            if not part:
                raise FenceError("polygon part has no rings")
            for ring in part:
                if len(ring) < 4:
                    raise FenceError(f"polygon ring needs at least 4 positions, got {len(ring)}")
                if ring[0] != ring[-1]:
                    raise FenceError("polygon ring is not closed (first != last position)")
                for lon, lat in ring:
                    _check_lon_lat(lon, lat, "polygon vertex")
        geometry = self.geometry()
        if not shapely.is_valid(geometry):
            reason = shapely.is_valid_reason(geometry)
            raise FenceError(f"polygon is not valid: {reason}")

    @classmethod
    def from_exterior(cls, vertices: Sequence[tuple[float, float]]) -> Polygon:
        """A simple polygon from its vertices, closing the ring when it is open."""
        ring = tuple((float(lon), float(lat)) for lon, lat in vertices)
        if ring and ring[0] != ring[-1]:
            ring = (*ring, ring[0])
        return cls(parts=((ring,),))

    def geometry(self) -> shapely.Geometry:
        polygons = [shapely.Polygon(part[0], holes=part[1:]) for part in self.parts]
        return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


Shape = Circle | Rectangle | Polygon


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DailyWindow:
    """A window repeating every day, China time; ``end <= start`` crosses midnight.

    This is what a JT/T 808 area time window with a zero date part means ("000000083000" to
    "000000180000": 08:30 to 18:00 every day).
    """

    start: time
    end: time

    @property
    def start_s(self) -> int:
        return self.start.hour * 3600 + self.start.minute * 60 + self.start.second

    @property
    def end_s(self) -> int:
        return self.end.hour * 3600 + self.end.minute * 60 + self.end.second


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeriodWindow:
    """A single period [start, end) given by aware datetimes."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise FenceError("period window times must be timezone-aware")
        if self.end <= self.start:
            raise FenceError(f"period window ends before it starts: {self.start} .. {self.end}")


Window = DailyWindow | PeriodWindow


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Fence:
    """A fence.

    ``id`` is the platform's stable id (the database key; a JT/T 808 area id when converted from
    one, see ``area_id``), ``name`` is unique within a fence set (filings name their
    destination by it).  ``unit`` restricts the fence to the vehicles of one unit; None applies
    it to every vehicle.  The fence only counts during ``window`` when one is given.  A speed
    limit (``max_speed_kmh``, optionally ``night_max_speed_kmh`` as in JT/T 808-2019) applies
    to vehicles inside the fence, held for ``overspeed_duration_s`` before it is a violation.
    """

    id: int
    name: str
    kind: FenceKind
    shape: Shape
    unit: str | None = None
    window: Window | None = None
    max_speed_kmh: float | None = None
    overspeed_duration_s: int | None = None
    night_max_speed_kmh: float | None = None
    area_id: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise FenceError(f"fence {self.id} has no name")
        for label, value in (
            ("max_speed_kmh", self.max_speed_kmh),
            ("night_max_speed_kmh", self.night_max_speed_kmh),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FenceError(f"fence {self.name!r}: {label} must be positive, got {value}")
        if self.overspeed_duration_s is not None and self.overspeed_duration_s < 0:
            raise FenceError(f"fence {self.name!r}: overspeed_duration_s must not be negative")


# ---------------------------------------------------------------------------------------------
# JT/T 808 areas (0x8600 circle, 0x8602 rectangle, 0x8604 polygon) -> fences


def window_from_bcd(start: str | None, end: str | None) -> Window | None:
    """A fence window from an area's BCD[6] YYMMDDhhmmss start and end times (2013 8.35).

    A zero date part (YYMMDD = 000000) repeats daily; otherwise both are absolute times in
    China time, years 20YY.  Other zero date fields (year 00 with a month and day: a yearly
    repeat?) are not given a meaning by the standard's text and are refused.
    """
    if start is None and end is None:
        return None
    if start is None or end is None or len(start) != 12 or len(end) != 12:
        raise FenceError(f"area time window needs two 12-digit times, got {start!r} .. {end!r}")
    if not (start.isdigit() and end.isdigit()):
        raise FenceError(f"area time window is not BCD digits: {start!r} .. {end!r}")
    try:
        if start[:6] == "000000" and end[:6] == "000000":
            return DailyWindow(start=_hms(start[6:]), end=_hms(end[6:]))
        return PeriodWindow(start=_absolute(start), end=_absolute(end))
    except ValueError as exc:
        raise FenceError(f"area time window {start}..{end}: {exc}") from exc


def _hms(digits: str) -> time:
    return time(int(digits[0:2]), int(digits[2:4]), int(digits[4:6]))


def _absolute(digits: str) -> datetime:
    if "00" in (digits[0:2], digits[2:4], digits[4:6]):
        raise ValueError("partial date wildcards are not supported")
    yy, mo, dd, hh, mi, ss = (int(digits[i : i + 2]) for i in range(0, 12, 2))
    return datetime(2000 + yy, mo, dd, hh, mi, ss, tzinfo=GMT8)


def fence_from_area(
    area: AreaCircle | AreaRectangle | AreaPolygon,
    *,
    kind: FenceKind,
    fence_id: int | None = None,
    name: str | None = None,
    unit: str | None = None,
) -> Fence:
    """A fence from a JT/T 808 area record: the shape, window and speed limit it carries.

    The fence id defaults to the area id and the name to the 2019 area name (or
    ``area-<id>``).  The area's alarm bits (report entering/leaving to the driver or the
    platform) describe terminal behaviour and are not carried over: the rules decide.
    """
    shape: Shape
    if isinstance(area, AreaCircle):
        shape = Circle(lon=area.lon, lat=area.lat, radius_m=float(area.radius_m))
    elif isinstance(area, AreaRectangle):
        shape = Rectangle(
            west=min(area.top_left_lon, area.bottom_right_lon),
            east=max(area.top_left_lon, area.bottom_right_lon),
            south=min(area.top_left_lat, area.bottom_right_lat),
            north=max(area.top_left_lat, area.bottom_right_lat),
        )
    else:
        shape = Polygon.from_exterior([(lon, lat) for lat, lon in area.coordinates])
    limited = area.speed_limited
    return Fence(
        id=area.area_id if fence_id is None else fence_id,
        name=name or area.name or f"area-{area.area_id}",
        kind=kind,
        shape=shape,
        unit=unit,
        window=window_from_bcd(area.start_time, area.end_time) if area.by_time else None,
        max_speed_kmh=float(area.max_speed_kmh)
        if limited and area.max_speed_kmh is not None
        else None,
        overspeed_duration_s=area.overspeed_duration_s if limited else None,
        night_max_speed_kmh=float(area.night_max_speed_kmh)
        if limited and area.night_max_speed_kmh is not None
        else None,
        area_id=area.area_id,
    )


def window_contains(window: Window, when: datetime) -> bool:
    """Scalar reference for window membership (the index does it vectorised)."""
    if isinstance(window, PeriodWindow):
        return window.start <= when < window.end
    local = when.astimezone(GMT8)
    sod = local.hour * 3600 + local.minute * 60 + local.second
    start, end = window.start_s, window.end_s
    if start < end:
        return start <= sod < end
    return sod >= start or sod < end
