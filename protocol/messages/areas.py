"""Areas and routes: 0x8600-0x8607 (JT/T 808-2013 8.35-8.42) and 0x8608/0x0608 (new in 2019).

The area records (:class:`AreaCircle`, :class:`AreaRectangle`, :class:`AreaPolygon`,
:class:`Route` with :class:`RoutePoint`) are what the geofence engine works from, so they are
plain records independent of the message that carried them.

Common rules of the area bodies:

* The area attribute WORD decides which optional fields are on the wire: bit 0 a time window
  (start and end BCD[6]), bit 1 a speed limit (maximum speed WORD in km/h and overspeed
  duration BYTE in seconds; 2019 adds a night maximum speed WORD).  A field whose bit is clear
  is None; building a value for a field whose bit is clear is an error.
* 2019 appends a name (WORD length + GBK) to each circle, rectangle, polygon and route; the name
  is None in 2011/2013 bodies.
* Latitudes/longitudes are the raw DWORDs in 1e-6 degree, always unsigned; the hemisphere is in
  attribute bits (area bits 6/7, route segment bits 2/3), which the ``lat``/``lon`` properties
  apply.
* Time windows are kept as the 12 BCD digits YYMMDDhhmmss, not as datetimes: the standard lets
  the date part be zeros for a window that repeats (000000083000-000000180000 means 08:30 to
  18:00 every day), which no datetime can hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from construct import Construct, Container, Error, PrefixedArray, Struct, Switch, this

from protocol.errors import LocalProtocolError
from protocol.fields import BYTE, DWORD, IS_2019, WORD, BcdDigits, PrefixedText, present_if
from protocol.header import Edition
from protocol.messages.base import Message, Record, register

# Area attribute WORD bits (2013 8.35; the same for rectangles and polygons, 8.37/8.39).
AREA_BY_TIME = 1 << 0  # start/end time follow
AREA_SPEED_LIMIT = 1 << 1  # max speed, overspeed duration (and 2019 night max speed) follow
AREA_ENTER_ALARM_DRIVER = 1 << 2
AREA_ENTER_ALARM_PLATFORM = 1 << 3
AREA_EXIT_ALARM_DRIVER = 1 << 4
AREA_EXIT_ALARM_PLATFORM = 1 << 5
AREA_SOUTH = 1 << 6  # 0 north latitude, 1 south
AREA_WEST = 1 << 7  # 0 east longitude, 1 west
AREA_NO_DOOR_OPENING = 1 << 8  # 2013+
AREA_ENTER_RADIO_OFF = 1 << 14  # 2013+: switch the communication module off inside
AREA_ENTER_COLLECT_GNSS = 1 << 15  # 2013+: collect detailed GNSS data inside

# Route attribute WORD bits (2013 8.41): bit 0 as for areas, bit 1 reserved, bits 2-5 alarms.
ROUTE_BY_TIME = 1 << 0

# Route segment attribute BYTE bits (2013 8.41).
SEGMENT_BY_TIME = 1 << 0  # too-long/too-short driving time thresholds follow
SEGMENT_SPEED_LIMIT = 1 << 1  # max speed, overspeed duration (and 2019 night max speed)
SEGMENT_SOUTH = 1 << 2
SEGMENT_WEST = 1 << 3

# 0x8600/0x8602 setting attribute.
AREA_UPDATE = 0  # replace the terminal's areas of this shape
AREA_APPEND = 1
AREA_MODIFY = 2

# Area/route kinds of 0x8608/0x0608 (and of location items 0x11/0x12).
KIND_CIRCLE = 1
KIND_RECTANGLE = 2
KIND_POLYGON = 3
KIND_ROUTE = 4

# "at most 125 areas per message; send more in several messages" (2013 8.36, 8.38, 8.40, 8.42).
MAX_DELETE_IDS = 125


def _signed(value: int, negative: bool) -> float:
    degrees = value / 1e6
    return -degrees if negative else degrees


# ---------------------------------------------------------------------------------------------
# Optional field groups, each conditioned on ``this.attribute`` of the record being parsed.

_TIME_WINDOW = (
    "start_time" / present_if(this.attribute & AREA_BY_TIME, BcdDigits(6)),
    "end_time" / present_if(this.attribute & AREA_BY_TIME, BcdDigits(6)),
)
_SPEED_LIMIT = (
    "max_speed_kmh" / present_if(this.attribute & AREA_SPEED_LIMIT, WORD),
    "overspeed_duration_s" / present_if(this.attribute & AREA_SPEED_LIMIT, BYTE),
)
_NIGHT_SPEED = "night_max_speed_kmh" / present_if(
    IS_2019, present_if(this.attribute & AREA_SPEED_LIMIT, WORD)
)
_NAME = "name" / present_if(IS_2019, PrefixedText(WORD))


class _Area(Record):
    """Helpers shared by the area records (all have ``attribute``)."""

    __slots__ = ()
    attribute: int

    @property
    def by_time(self) -> bool:
        return bool(self.attribute & AREA_BY_TIME)

    @property
    def speed_limited(self) -> bool:
        return bool(self.attribute & AREA_SPEED_LIMIT)

    def _lat(self, value: int) -> float:
        return _signed(value, bool(self.attribute & AREA_SOUTH))

    def _lon(self, value: int) -> float:
        return _signed(value, bool(self.attribute & AREA_WEST))


# Circle area item (2013 8.35; 2019 adds night max speed and name).
AREA_CIRCLE = Struct(
    "area_id" / DWORD,
    "attribute" / WORD,
    "latitude" / DWORD,  # centre, 1e-6 degree
    "longitude" / DWORD,
    "radius_m" / DWORD,
    *_TIME_WINDOW,
    *_SPEED_LIMIT,
    _NIGHT_SPEED,
    _NAME,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AreaCircle(_Area):
    """A circular area: centre (1e-6 degree), radius in metres, optional rules.

    ``start_time``/``end_time`` are 12 BCD digits YYMMDDhhmmss (zero date parts repeat daily),
    present when attribute bit 0 is set; ``max_speed_kmh``/``overspeed_duration_s`` (and in
    2019 ``night_max_speed_kmh``) when bit 1 is set; ``name`` in 2019 only.
    """

    area_id: int
    attribute: int
    latitude: int
    longitude: int
    radius_m: int
    start_time: str | None = None
    end_time: str | None = None
    max_speed_kmh: int | None = None
    overspeed_duration_s: int | None = None
    night_max_speed_kmh: int | None = None
    name: str | None = None

    @property
    def lat(self) -> float:
        return self._lat(self.latitude)

    @property
    def lon(self) -> float:
        return self._lon(self.longitude)


# Rectangle area item (2013 8.37; 2019 adds night max speed and name).
AREA_RECTANGLE = Struct(
    "area_id" / DWORD,
    "attribute" / WORD,
    "top_left_latitude" / DWORD,
    "top_left_longitude" / DWORD,
    "bottom_right_latitude" / DWORD,
    "bottom_right_longitude" / DWORD,
    *_TIME_WINDOW,
    *_SPEED_LIMIT,
    _NIGHT_SPEED,
    _NAME,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AreaRectangle(_Area):
    """A rectangular area given by its top-left and bottom-right corners (1e-6 degree).

    Optional fields as for :class:`AreaCircle`.
    """

    area_id: int
    attribute: int
    top_left_latitude: int
    top_left_longitude: int
    bottom_right_latitude: int
    bottom_right_longitude: int
    start_time: str | None = None
    end_time: str | None = None
    max_speed_kmh: int | None = None
    overspeed_duration_s: int | None = None
    night_max_speed_kmh: int | None = None
    name: str | None = None

    @property
    def top_left_lat(self) -> float:
        return self._lat(self.top_left_latitude)

    @property
    def top_left_lon(self) -> float:
        return self._lon(self.top_left_longitude)

    @property
    def bottom_right_lat(self) -> float:
        return self._lat(self.bottom_right_latitude)

    @property
    def bottom_right_lon(self) -> float:
        return self._lon(self.bottom_right_longitude)


AREA_POINT = Struct("latitude" / DWORD, "longitude" / DWORD)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AreaPoint(Record):
    """A polygon vertex, raw 1e-6 degree magnitudes (the hemisphere is the polygon's)."""

    latitude: int
    longitude: int


# Polygon area: the whole 0x8604 body (2013 8.39).  2019 puts the night max speed and the name
# after the vertices, not next to the other speed fields.
AREA_POLYGON = Struct(
    "area_id" / DWORD,
    "attribute" / WORD,
    *_TIME_WINDOW,
    *_SPEED_LIMIT,
    "vertices" / PrefixedArray(WORD, AREA_POINT),
    _NIGHT_SPEED,
    _NAME,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AreaPolygon(_Area):
    """A polygon area; the vertex count WORD is derived from ``vertices``.

    Optional fields as for :class:`AreaCircle`.
    """

    NESTED: ClassVar[Mapping[str, type[Record]]] = {"vertices": AreaPoint}
    area_id: int
    attribute: int
    vertices: tuple[AreaPoint, ...]
    start_time: str | None = None
    end_time: str | None = None
    max_speed_kmh: int | None = None
    overspeed_duration_s: int | None = None
    night_max_speed_kmh: int | None = None
    name: str | None = None

    @property
    def coordinates(self) -> tuple[tuple[float, float], ...]:
        """The vertices as signed (lat, lon) degrees."""
        return tuple((self._lat(v.latitude), self._lon(v.longitude)) for v in self.vertices)

    def to_area(self) -> AreaPolygon:
        """This polygon as a plain record (for the message subclass)."""
        return AreaPolygon(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(AreaPolygon)}
        )


# Route turning point / segment (2013 8.41; 2019 adds the night max speed).
ROUTE_POINT = Struct(
    "point_id" / DWORD,
    "segment_id" / DWORD,
    "latitude" / DWORD,
    "longitude" / DWORD,
    "width_m" / BYTE,  # width of the segment from this point to the next
    "attribute" / BYTE,
    "time_too_long_s" / present_if(this.attribute & SEGMENT_BY_TIME, WORD),
    "time_too_short_s" / present_if(this.attribute & SEGMENT_BY_TIME, WORD),
    "max_speed_kmh" / present_if(this.attribute & SEGMENT_SPEED_LIMIT, WORD),
    "overspeed_duration_s" / present_if(this.attribute & SEGMENT_SPEED_LIMIT, BYTE),
    "night_max_speed_kmh"
    / present_if(IS_2019, present_if(this.attribute & SEGMENT_SPEED_LIMIT, WORD)),
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RoutePoint(Record):
    """A route turning point and the segment that starts there.

    ``attribute`` is the segment attribute BYTE (``SEGMENT_*``): bit 0 adds the driving-time
    thresholds ``time_too_long_s``/``time_too_short_s``, bit 1 the speed limit (and in 2019
    ``night_max_speed_kmh``), bits 2/3 give the hemisphere of this point.
    """

    point_id: int
    segment_id: int
    latitude: int
    longitude: int
    width_m: int
    attribute: int
    time_too_long_s: int | None = None
    time_too_short_s: int | None = None
    max_speed_kmh: int | None = None
    overspeed_duration_s: int | None = None
    night_max_speed_kmh: int | None = None

    @property
    def lat(self) -> float:
        return _signed(self.latitude, bool(self.attribute & SEGMENT_SOUTH))

    @property
    def lon(self) -> float:
        return _signed(self.longitude, bool(self.attribute & SEGMENT_WEST))


# Route: the whole 0x8606 body (2013 8.41; 2019 appends the name).
ROUTE = Struct(
    "route_id" / DWORD,
    "attribute" / WORD,
    *_TIME_WINDOW,
    "points" / PrefixedArray(WORD, ROUTE_POINT),
    _NAME,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Route(Record):
    """A route: id, attribute WORD (``ROUTE_BY_TIME``, alarm bits), optional time window,
    turning points (count derived), and the 2019 name."""

    NESTED: ClassVar[Mapping[str, type[Record]]] = {"points": RoutePoint}
    route_id: int
    attribute: int
    points: tuple[RoutePoint, ...]
    start_time: str | None = None
    end_time: str | None = None
    name: str | None = None

    @property
    def by_time(self) -> bool:
        return bool(self.attribute & ROUTE_BY_TIME)

    def to_route(self) -> Route:
        """This route as a plain record (for the message subclass)."""
        return Route(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Route)})


AnyArea = AreaCircle | AreaRectangle | AreaPolygon | Route

# ---------------------------------------------------------------------------------------------
# Messages


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetCircleAreas(Message):
    """0x8600 set circular areas (2013 8.35): ``setting_type`` (``AREA_UPDATE``/``APPEND``/
    ``MODIFY``) and the areas (count BYTE derived)."""

    MSG_ID: ClassVar[int] = 0x8600
    SCHEMA: ClassVar[Construct] = Struct(
        "setting_type" / BYTE, "areas" / PrefixedArray(BYTE, AREA_CIRCLE)
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"areas": AreaCircle}
    setting_type: int
    areas: tuple[AreaCircle, ...]


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetRectangleAreas(Message):
    """0x8602 set rectangular areas (2013 8.37): as 0x8600 with rectangles."""

    MSG_ID: ClassVar[int] = 0x8602
    SCHEMA: ClassVar[Construct] = Struct(
        "setting_type" / BYTE, "areas" / PrefixedArray(BYTE, AREA_RECTANGLE)
    )
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"areas": AreaRectangle}
    setting_type: int
    areas: tuple[AreaRectangle, ...]


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetPolygonArea(AreaPolygon, Message):
    """0x8604 set polygon area (2013 8.39): one polygon per message; the body is the polygon."""

    MSG_ID: ClassVar[int] = 0x8604
    SCHEMA: ClassVar[Construct] = AREA_POLYGON


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetRoute(Route, Message):
    """0x8606 set route (2013 8.41): one route per message; the body is the route."""

    MSG_ID: ClassVar[int] = 0x8606
    SCHEMA: ClassVar[Construct] = ROUTE


_ID_LIST = Struct("ids" / PrefixedArray(BYTE, DWORD))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _DeleteAreas(Message):
    """Count BYTE and that many DWORD ids; no ids deletes every area of the kind.

    At most :data:`MAX_DELETE_IDS` ids are sent per message; more are still read.
    """

    SCHEMA: ClassVar[Construct] = _ID_LIST
    ids: tuple[int, ...] = ()

    @property
    def deletes_all(self) -> bool:
        return not self.ids

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        if len(self.ids) > MAX_DELETE_IDS:
            raise LocalProtocolError(
                f"0x{self.MSG_ID:04x}: {len(self.ids)} ids; at most {MAX_DELETE_IDS} per message"
            )
        return Message.encode(self, edition)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeleteCircleAreas(_DeleteAreas):
    """0x8601 delete circular areas (2013 8.36)."""

    MSG_ID: ClassVar[int] = 0x8601


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeleteRectangleAreas(_DeleteAreas):
    """0x8603 delete rectangular areas (2013 8.38)."""

    MSG_ID: ClassVar[int] = 0x8603


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeletePolygonAreas(_DeleteAreas):
    """0x8605 delete polygon areas (2013 8.40)."""

    MSG_ID: ClassVar[int] = 0x8605


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeleteRoutes(_DeleteAreas):
    """0x8607 delete routes (2013 8.42)."""

    MSG_ID: ClassVar[int] = 0x8607


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryAreas(Message):
    """0x8608 query area or route data (2019): ``query_type`` (``KIND_*``) and the ids to report.

    The id count is a DWORD (derived); no ids asks for every area or route of the kind.
    """

    MSG_ID: ClassVar[int] = 0x8608
    SCHEMA: ClassVar[Construct] = Struct("query_type" / BYTE, "ids" / PrefixedArray(DWORD, DWORD))
    query_type: int
    ids: tuple[int, ...] = ()


AREA_RECORDS: dict[int, type[AnyArea]] = {
    KIND_CIRCLE: AreaCircle,
    KIND_RECTANGLE: AreaRectangle,
    KIND_POLYGON: AreaPolygon,
    KIND_ROUTE: Route,
}

# 0x0608: query type BYTE, count DWORD, then that many areas in the layout of the matching set
# message (the circle/rectangle item, or the whole polygon/route body).  The 2019 table types
# the list as DWORD while its text says "area or route data"; we follow the text, as the other
# implementations do.
_QUERY_RESPONSE = Struct(
    "query_type" / BYTE,
    "areas"
    / PrefixedArray(
        DWORD,
        Switch(
            this._.query_type,  # PrefixedArray opens a nested context
            {
                KIND_CIRCLE: AREA_CIRCLE,
                KIND_RECTANGLE: AREA_RECTANGLE,
                KIND_POLYGON: AREA_POLYGON,
                KIND_ROUTE: ROUTE,
            },
            default=Error,
        ),
    ),
)


@register
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryAreasResponse(Message):
    """0x0608 query area or route data response (2019).

    ``areas`` are records of the type ``query_type`` names (:data:`AREA_RECORDS`); a body of another
    query type can only be read when it holds no areas.
    """

    MSG_ID: ClassVar[int] = 0x0608
    SCHEMA: ClassVar[Construct] = _QUERY_RESPONSE
    query_type: int
    areas: tuple[AnyArea, ...] = ()

    @classmethod
    def from_parsed(cls, parsed: Container) -> Self:
        record = AREA_RECORDS.get(parsed.query_type)
        if record is None:
            return cls(query_type=parsed.query_type)
        return cls(
            query_type=parsed.query_type, areas=tuple(record.from_parsed(a) for a in parsed.areas)
        )

    def to_build(self) -> dict[str, Any]:
        record = AREA_RECORDS.get(self.query_type)
        for area in self.areas:
            if record is None or not isinstance(area, record):
                raise LocalProtocolError(
                    f"0x0608 of query type {self.query_type} cannot carry a {type(area).__name__}"
                )
        return {"query_type": self.query_type, "areas": [area.to_build() for area in self.areas]}
