"""Area and route messages (0x8600-0x8608, 0x0608) and the area records they carry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import RemoteProtocolError, decode, encode
from protocol.errors import BodyDecodeError, LocalProtocolError
from protocol.header import Edition
from protocol.messages.areas import (
    AREA_BY_TIME,
    AREA_SOUTH,
    AREA_SPEED_LIMIT,
    AREA_WEST,
    KIND_CIRCLE,
    KIND_POLYGON,
    KIND_RECTANGLE,
    KIND_ROUTE,
    MAX_DELETE_IDS,
    SEGMENT_BY_TIME,
    SEGMENT_SOUTH,
    SEGMENT_SPEED_LIMIT,
    SEGMENT_WEST,
    AnyArea,
    AreaCircle,
    AreaPoint,
    AreaPolygon,
    AreaRectangle,
    DeleteCircleAreas,
    DeletePolygonAreas,
    DeleteRectangleAreas,
    DeleteRoutes,
    QueryAreas,
    QueryAreasResponse,
    Route,
    RoutePoint,
    SetCircleAreas,
    SetPolygonArea,
    SetRectangleAreas,
    SetRoute,
)
from protocol.messages.base import Message
from tests.vectors import load_cases

MY_IDS = {0x8600, 0x8601, 0x8602, 0x8603, 0x8604, 0x8605, 0x8606, 0x8607, 0x8608, 0x0608}
CASES = [c for c in load_cases() if c["valid"] and c["msg_id"] and int(c["msg_id"], 16) in MY_IDS]

# "区域" in GBK, with its WORD length
NAME_QUYU = bytes.fromhex("0004c7f8d3f2")

# ---------------------------------------------------------------------------------------------
# Shared vectors (the file holds none for these ids today; any added later are checked here)


def test_vectors_for_my_ids_decode_and_reencode() -> None:
    # The shared file has no area frames today; any added later are checked here.
    for case in CASES:
        wire = bytes.fromhex(case["hex"])
        packet = decode(wire)
        assert type(packet.message).__module__ == SetCircleAreas.__module__, case["id"]
        for key, value in case["expect"].items():
            if ":" not in key and hasattr(packet.message, key):
                assert getattr(packet.message, key) == value, (case["id"], key)
        header = packet.header
        rebuilt = encode(
            packet.message,
            phone=header.phone,
            serial=header.serial,
            edition=packet.edition,
            protocol_version=header.protocol_version or 1,
        )
        assert rebuilt == wire, case["id"]


# ---------------------------------------------------------------------------------------------
# Hand-written bodies, laid out field by field from the standard's tables

CIRCLE_2013 = bytes.fromhex(
    "01"  # setting type: append
    "01"  # one area
    "00000001"  # area id
    "0043"  # attribute: by time, speed limit, south (bit 6)
    "01c9c380"  # centre latitude 30.000000
    "07270e00"  # centre longitude 120.000000
    "000001f4"  # radius 500 m
    "000000083000"  # start: every day 08:30:00
    "000000180000"  # end: every day 18:00:00
    "003c"  # 60 km/h
    "0a"  # for 10 s
)
CIRCLE_2019 = CIRCLE_2013 + bytes.fromhex("0028") + NAME_QUYU  # night 40 km/h, name


def _circle(edition: Edition) -> AreaCircle:
    is_2019 = edition is Edition.V2019
    return AreaCircle(
        area_id=1,
        attribute=AREA_BY_TIME | AREA_SPEED_LIMIT | AREA_SOUTH,
        latitude=30_000_000,
        longitude=120_000_000,
        radius_m=500,
        start_time="000000083000",
        end_time="000000180000",
        max_speed_kmh=60,
        overspeed_duration_s=10,
        night_max_speed_kmh=40 if is_2019 else None,
        name="区域" if is_2019 else None,
    )


@pytest.mark.parametrize(
    ("edition", "body"),
    [(Edition.V2011, CIRCLE_2013), (Edition.V2013, CIRCLE_2013), (Edition.V2019, CIRCLE_2019)],
)
def test_circle_golden(edition: Edition, body: bytes) -> None:
    message = SetCircleAreas.decode(body, edition)
    assert message == SetCircleAreas(setting_type=1, areas=(_circle(edition),))
    assert message.encode(edition) == body
    (area,) = message.areas
    assert area.lat == -30.0
    assert area.lon == 120.0
    assert area.by_time
    assert area.speed_limited


def test_circle_without_optional_fields() -> None:
    body = bytes.fromhex("000100000002008001c9c38007270e0000000064")
    (area,) = SetCircleAreas.decode(body, Edition.V2013).areas
    assert area == AreaCircle(
        area_id=2, attribute=AREA_WEST, latitude=30_000_000, longitude=120_000_000, radius_m=100
    )
    assert (area.lat, area.lon) == (30.0, -120.0)
    assert area.start_time is None
    assert area.max_speed_kmh is None
    # 2019: the name is always there, the night speed only with bit 1
    assert SetCircleAreas.decode(body + b"\x00\x00", Edition.V2019).areas[0].name == ""


def test_rectangle_golden() -> None:
    body = bytes.fromhex(
        "02"  # modify
        "01"
        "0000000a"  # area id 10
        "0001"  # by time
        "01c9c380"
        "07270e00"  # top left
        "01c7e000"
        "0728f480"  # bottom right
        "200101000000"
        "201231235959"
    )
    (area,) = SetRectangleAreas.decode(body, Edition.V2013).areas
    assert area == AreaRectangle(
        area_id=10,
        attribute=AREA_BY_TIME,
        top_left_latitude=30_000_000,
        top_left_longitude=120_000_000,
        bottom_right_latitude=29_876_224,
        bottom_right_longitude=120_124_544,
        start_time="200101000000",
        end_time="201231235959",
    )
    assert (area.top_left_lat, area.top_left_lon) == (30.0, 120.0)
    assert (area.bottom_right_lat, area.bottom_right_lon) == (29.876224, 120.124544)
    assert SetRectangleAreas.decode(body, Edition.V2013).encode(Edition.V2013) == body


POLYGON_2013 = bytes.fromhex(
    "00000005"  # area id
    "0002"  # speed limit
    "0050"  # 80 km/h
    "05"  # for 5 s
    "0003"  # three vertices
    "01c9c380"  # 30.0
    "07270e00"  # 120.0
    "01c9c380"  # 30.0
    "0728f480"  # 120.124544
    "01c7e000"  # 29.876224
    "0728f480"  # 120.124544
)
# 2019 puts the night speed and name after the vertices
POLYGON_2019 = POLYGON_2013 + bytes.fromhex("003c") + NAME_QUYU


@pytest.mark.parametrize(
    ("edition", "body"), [(Edition.V2013, POLYGON_2013), (Edition.V2019, POLYGON_2019)]
)
def test_polygon_golden(edition: Edition, body: bytes) -> None:
    message = SetPolygonArea.decode(body, edition)
    is_2019 = edition is Edition.V2019
    expected = AreaPolygon(
        area_id=5,
        attribute=AREA_SPEED_LIMIT,
        max_speed_kmh=80,
        overspeed_duration_s=5,
        vertices=(
            AreaPoint(latitude=30_000_000, longitude=120_000_000),
            AreaPoint(latitude=30_000_000, longitude=120_124_544),
            AreaPoint(latitude=29_876_224, longitude=120_124_544),
        ),
        night_max_speed_kmh=60 if is_2019 else None,
        name="区域" if is_2019 else None,
    )
    assert message.to_area() == expected
    assert message.encode(edition) == body
    assert message.coordinates[2] == (29.876224, 120.124544)


def test_polygon_hemisphere_applies_to_every_vertex() -> None:
    polygon = AreaPolygon(
        area_id=1,
        attribute=AREA_SOUTH | AREA_WEST,
        vertices=(AreaPoint(latitude=1_500_000, longitude=2_000_000),),
    )
    assert polygon.coordinates == ((-1.5, -2.0),)


ROUTE_HEAD = bytes.fromhex(
    "00000064"  # route id 100
    "0001"  # route attribute: by time
    "000000070000"  # every day from 07:00
    "000000190000"  # to 19:00
    "0002"  # two turning points
)
POINT_1 = bytes.fromhex(
    "00000001"  # point id
    "0000000b"  # segment id 11
    "01c9c380"  # latitude 30.0
    "07270e00"  # longitude 120.0
    "1e"  # segment width 30 m
    "03"  # segment attribute: driving time and speed limit
    "0e10"  # too long after 3600 s
    "003c"  # too short under 60 s
    "0050"  # 80 km/h
    "05"  # for 5 s
)
POINT_2 = bytes.fromhex(
    "00000002"  # point id
    "0000000c"  # segment id 12
    "01c7e000"  # latitude 29.876224
    "0728f480"  # longitude 120.124544
    "14"  # width 20 m
    "0c"  # south, west; no rules
)
ROUTE_2013 = ROUTE_HEAD + POINT_1 + POINT_2
# 2019: night speed (40 km/h) after the point's speed fields, the name after the points
ROUTE_2019 = ROUTE_HEAD + POINT_1 + bytes.fromhex("0028") + POINT_2 + NAME_QUYU


@pytest.mark.parametrize(
    ("edition", "body"), [(Edition.V2013, ROUTE_2013), (Edition.V2019, ROUTE_2019)]
)
def test_route_golden(edition: Edition, body: bytes) -> None:
    message = SetRoute.decode(body, edition)
    is_2019 = edition is Edition.V2019
    expected = Route(
        route_id=100,
        attribute=1,
        start_time="000000070000",
        end_time="000000190000",
        points=(
            RoutePoint(
                point_id=1,
                segment_id=11,
                latitude=30_000_000,
                longitude=120_000_000,
                width_m=30,
                attribute=SEGMENT_BY_TIME | SEGMENT_SPEED_LIMIT,
                time_too_long_s=3600,
                time_too_short_s=60,
                max_speed_kmh=80,
                overspeed_duration_s=5,
                night_max_speed_kmh=40 if is_2019 else None,
            ),
            RoutePoint(
                point_id=2,
                segment_id=12,
                latitude=29_876_224,
                longitude=120_124_544,
                width_m=20,
                attribute=SEGMENT_SOUTH | SEGMENT_WEST,
            ),
        ),
        name="区域" if is_2019 else None,
    )
    assert message.to_route() == expected
    assert message.by_time
    assert message.encode(edition) == body
    assert (message.points[1].lat, message.points[1].lon) == (-29.876224, -120.124544)


@pytest.mark.parametrize(
    "cls", [DeleteCircleAreas, DeleteRectangleAreas, DeletePolygonAreas, DeleteRoutes]
)
def test_delete_lists(cls: type[DeleteCircleAreas]) -> None:
    body = bytes.fromhex("020000000100000002")
    message = cls.decode(body, Edition.V2013)
    assert message.ids == (1, 2)
    assert not message.deletes_all
    assert message.encode(Edition.V2013) == body
    everything = cls.decode(b"\x00", Edition.V2019)
    assert everything.deletes_all
    assert everything.encode(Edition.V2019) == b"\x00"
    with pytest.raises(LocalProtocolError):
        cls(ids=tuple(range(MAX_DELETE_IDS + 1))).encode(Edition.V2013)
    with pytest.raises(BodyDecodeError):
        cls.decode(bytes.fromhex("0200000001"), Edition.V2013)


def test_query_and_response() -> None:
    query = QueryAreas.decode(bytes.fromhex("03000000020000000500000006"), Edition.V2019)
    assert query == QueryAreas(query_type=KIND_POLYGON, ids=(5, 6))
    assert QueryAreas.decode(bytes.fromhex("0400000000"), Edition.V2019).ids == ()

    body = bytes.fromhex("0100000001") + CIRCLE_2019[2:]
    response = QueryAreasResponse.decode(body, Edition.V2019)
    assert response == QueryAreasResponse(query_type=KIND_CIRCLE, areas=(_circle(Edition.V2019),))
    assert response.encode(Edition.V2019) == body

    body = bytes.fromhex("0300000002") + POLYGON_2019 + POLYGON_2019
    response = QueryAreasResponse.decode(body, Edition.V2019)
    assert [type(a) for a in response.areas] == [AreaPolygon, AreaPolygon]
    assert response.encode(Edition.V2019) == body

    body = bytes.fromhex("0400000001") + ROUTE_2019
    assert QueryAreasResponse.decode(body, Edition.V2019).encode(Edition.V2019) == body


def test_query_response_of_unknown_type() -> None:
    assert QueryAreasResponse.decode(bytes.fromhex("0900000000"), Edition.V2019) == (
        QueryAreasResponse(query_type=9)
    )
    with pytest.raises(BodyDecodeError):
        QueryAreasResponse.decode(bytes.fromhex("0900000001ff"), Edition.V2019)
    with pytest.raises(BodyDecodeError):
        QueryAreasResponse.decode(bytes.fromhex("0100000002") + CIRCLE_2019[2:], Edition.V2019)
    mismatched = QueryAreasResponse(query_type=KIND_RECTANGLE, areas=(_circle(Edition.V2019),))
    with pytest.raises(LocalProtocolError):
        mismatched.encode(Edition.V2019)
    with pytest.raises(LocalProtocolError):
        QueryAreasResponse(query_type=9, areas=(_circle(Edition.V2019),)).encode(Edition.V2019)


def test_fields_the_wire_cannot_carry_are_refused() -> None:
    base = _circle(Edition.V2013)
    cases = [
        # 2019 fields in a 2013 body
        (_circle(Edition.V2019), Edition.V2013),
        # a speed limit without the attribute bit
        (AreaCircle(**{**_fields(base), "attribute": AREA_BY_TIME}), Edition.V2013),
        # the attribute bit without the values
        (AreaCircle(**{**_fields(base), "max_speed_kmh": None}), Edition.V2013),
        # 2019 without the night speed that bit 1 requires
        (AreaCircle(**{**_fields(base), "name": "x"}), Edition.V2019),
        # a time that is not 12 BCD digits
        (AreaCircle(**{**_fields(base), "start_time": "2024-01-01"}), Edition.V2013),
    ]
    for area, edition in cases:
        with pytest.raises(LocalProtocolError):
            SetCircleAreas(setting_type=0, areas=(area,)).encode(edition)
    with pytest.raises(LocalProtocolError):
        SetCircleAreas(setting_type=0, areas=(base,) * 256).encode(Edition.V2013)


def _fields(area: AreaCircle) -> dict[str, Any]:
    return {name: getattr(area, name) for name in AreaCircle.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# Properties

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
BCD12 = st.text("0123456789", min_size=12, max_size=12)
NAMES = st.text(
    st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5),
    ),
    max_size=30,
)


@st.composite
def _rules(
    draw: st.DrawFn, edition: Edition, attribute: int, *, speed: bool = True
) -> dict[str, Any]:
    """The optional fields an area attribute (or a route attribute, ``speed=False``) calls for."""
    is_2019 = edition is Edition.V2019
    out: dict[str, Any] = {}
    if attribute & AREA_BY_TIME:
        out["start_time"] = draw(BCD12)
        out["end_time"] = draw(BCD12)
    if speed and attribute & AREA_SPEED_LIMIT:
        out["max_speed_kmh"] = draw(U16)
        out["overspeed_duration_s"] = draw(U8)
        if is_2019:
            out["night_max_speed_kmh"] = draw(U16)
    if is_2019:
        out["name"] = draw(NAMES)
    return out


@st.composite
def circles(draw: st.DrawFn, edition: Edition) -> AreaCircle:
    attribute = draw(U16)
    return AreaCircle(
        area_id=draw(U32),
        attribute=attribute,
        latitude=draw(U32),
        longitude=draw(U32),
        radius_m=draw(U32),
        **draw(_rules(edition, attribute)),
    )


@st.composite
def rectangles(draw: st.DrawFn, edition: Edition) -> AreaRectangle:
    attribute = draw(U16)
    return AreaRectangle(
        area_id=draw(U32),
        attribute=attribute,
        top_left_latitude=draw(U32),
        top_left_longitude=draw(U32),
        bottom_right_latitude=draw(U32),
        bottom_right_longitude=draw(U32),
        **draw(_rules(edition, attribute)),
    )


VERTICES = st.lists(st.builds(AreaPoint, latitude=U32, longitude=U32), max_size=12).map(tuple)


@st.composite
def polygons(draw: st.DrawFn, edition: Edition, cls: type[AreaPolygon] = AreaPolygon) -> Any:
    attribute = draw(U16)
    return cls(
        area_id=draw(U32),
        attribute=attribute,
        vertices=draw(VERTICES),
        **draw(_rules(edition, attribute)),
    )


@st.composite
def route_points(draw: st.DrawFn, edition: Edition) -> RoutePoint:
    attribute = draw(U8)
    extra: dict[str, Any] = {}
    if attribute & SEGMENT_BY_TIME:
        extra["time_too_long_s"] = draw(U16)
        extra["time_too_short_s"] = draw(U16)
    if attribute & SEGMENT_SPEED_LIMIT:
        extra["max_speed_kmh"] = draw(U16)
        extra["overspeed_duration_s"] = draw(U8)
        if edition is Edition.V2019:
            extra["night_max_speed_kmh"] = draw(U16)
    return RoutePoint(
        point_id=draw(U32),
        segment_id=draw(U32),
        latitude=draw(U32),
        longitude=draw(U32),
        width_m=draw(U8),
        attribute=attribute,
        **extra,
    )


@st.composite
def routes(draw: st.DrawFn, edition: Edition, cls: type[Route] = Route) -> Any:
    attribute = draw(U16)
    return cls(
        route_id=draw(U32),
        attribute=attribute,
        points=tuple(draw(st.lists(route_points(edition), max_size=6))),
        **draw(_rules(edition, attribute, speed=False)),
    )


IDS = st.lists(U32, max_size=MAX_DELETE_IDS).map(tuple)
AREA_STRATEGIES: dict[int, Callable[[Edition], st.SearchStrategy[AnyArea]]] = {
    KIND_CIRCLE: circles,
    KIND_RECTANGLE: rectangles,
    KIND_POLYGON: polygons,
    KIND_ROUTE: routes,
}


@st.composite
def query_responses(draw: st.DrawFn, edition: Edition) -> QueryAreasResponse:
    query_type = draw(st.sampled_from(sorted(AREA_STRATEGIES)))
    areas = draw(st.lists(AREA_STRATEGIES[query_type](edition), max_size=3))
    return QueryAreasResponse(query_type=query_type, areas=tuple(areas))


STRATEGIES: dict[str, Callable[[Edition], st.SearchStrategy[Message]]] = {
    "0x8600": lambda e: st.builds(
        SetCircleAreas, setting_type=U8, areas=st.lists(circles(e), max_size=4).map(tuple)
    ),
    "0x8601": lambda e: st.builds(DeleteCircleAreas, ids=IDS),
    "0x8602": lambda e: st.builds(
        SetRectangleAreas, setting_type=U8, areas=st.lists(rectangles(e), max_size=4).map(tuple)
    ),
    "0x8603": lambda e: st.builds(DeleteRectangleAreas, ids=IDS),
    "0x8604": lambda e: polygons(e, SetPolygonArea),
    "0x8605": lambda e: st.builds(DeletePolygonAreas, ids=IDS),
    "0x8606": lambda e: routes(e, SetRoute),
    "0x8607": lambda e: st.builds(DeleteRoutes, ids=IDS),
    "0x8608": lambda e: st.builds(
        QueryAreas, query_type=U8, ids=st.lists(U32, max_size=40).map(tuple)
    ),
    "0x0608": query_responses,
}
CLASSES: dict[str, type[Message]] = {
    "0x8600": SetCircleAreas,
    "0x8601": DeleteCircleAreas,
    "0x8602": SetRectangleAreas,
    "0x8603": DeleteRectangleAreas,
    "0x8604": SetPolygonArea,
    "0x8605": DeletePolygonAreas,
    "0x8606": SetRoute,
    "0x8607": DeleteRoutes,
    "0x8608": QueryAreas,
    "0x0608": QueryAreasResponse,
}


def test_every_message_has_a_strategy() -> None:
    assert set(STRATEGIES) == {f"0x{i:04x}" for i in MY_IDS} == set(CLASSES)
    for name, cls in CLASSES.items():
        assert f"0x{cls.MSG_ID:04x}" == name


@pytest.mark.parametrize("edition", list(Edition), ids=lambda e: str(e.value))
@pytest.mark.parametrize("msg", sorted(STRATEGIES))
@settings(max_examples=70)
@given(data=st.data())
def test_round_trip(msg: str, edition: Edition, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[msg](edition))
    body = message.encode(edition)
    decoded = type(message).decode(body, edition)
    assert decoded == message
    assert decoded.encode(edition) == body


@pytest.mark.parametrize("edition", list(Edition), ids=lambda e: str(e.value))
@pytest.mark.parametrize("msg", sorted(CLASSES))
@settings(max_examples=60)
@given(body=st.binary(max_size=64))
def test_arbitrary_bodies_decode_or_fail_typed(msg: str, edition: Edition, body: bytes) -> None:
    cls = CLASSES[msg]
    try:
        message = cls.decode(body, edition)
    except RemoteProtocolError:
        return
    assert isinstance(message, cls)


@pytest.mark.parametrize("kind", sorted(AREA_STRATEGIES))
@settings(max_examples=40)
@given(data=st.data())
def test_set_message_area_equals_query_response_area(kind: int, data: st.DataObject) -> None:
    """The geofence engine gets the same records from 0x86xx and from 0x0608."""
    edition = Edition.V2019
    area = data.draw(AREA_STRATEGIES[kind](edition))
    response = QueryAreasResponse(query_type=kind, areas=(area,))
    (decoded,) = QueryAreasResponse.decode(response.encode(edition), edition).areas
    assert decoded == area
