"""Geofence model, GeoJSON import, the vectorised index and its accuracy."""

from __future__ import annotations

import json
import math
import time as time_module
from collections.abc import Mapping
from datetime import datetime, time

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from geofence import (
    Circle,
    DailyWindow,
    Fence,
    FenceError,
    FenceIndex,
    FenceKind,
    GeoJSONError,
    PeriodWindow,
    Polygon,
    Rectangle,
    fence_from_area,
    fences_from_geojson,
    fences_to_geojson,
)
from geofence.geodesy import distance_m, metres_per_degree
from geofence.model import GMT8, window_contains, window_from_bcd
from geofence.segments import (
    concat_ranges,
    ffill_index,
    first_in_segment,
    run_begin,
    segment_starts,
)
from protocol.messages.areas import (
    AREA_BY_TIME,
    AREA_SOUTH,
    AREA_SPEED_LIMIT,
    AreaCircle,
    AreaPoint,
    AreaPolygon,
    AreaRectangle,
    SetPolygonArea,
)

KUNMING = (102.71, 25.04)
KX, KY = (float(v) for v in metres_per_degree(KUNMING[1]))


def fence(shape: Circle | Rectangle | Polygon, **kw: object) -> Fence:
    values: dict[str, object] = {"id": 1, "name": "f", "kind": FenceKind.FORBIDDEN}
    values.update(kw)
    return Fence(shape=shape, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Model


def test_shapes_are_validated() -> None:
    with pytest.raises(FenceError, match="radius"):
        Circle(lon=102.7, lat=25.0, radius_m=0)
    with pytest.raises(FenceError, match="WGS-84"):
        Circle(lon=202.7, lat=25.0, radius_m=10)
    with pytest.raises(FenceError, match="west < east"):
        Rectangle(west=103.0, south=25.0, east=102.0, north=26.0)
    with pytest.raises(FenceError, match="not closed"):
        Polygon(parts=((((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),),))
    bowtie = [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    with pytest.raises(FenceError, match="not valid"):
        Polygon.from_exterior(bowtie)
    with pytest.raises(FenceError, match="positive"):
        fence(Circle(lon=102.7, lat=25.0, radius_m=10), max_speed_kmh=0.0)


def test_fences_from_jtt808_areas() -> None:
    circle = AreaCircle(
        area_id=7,
        attribute=AREA_BY_TIME | AREA_SPEED_LIMIT,
        latitude=25_040_000,
        longitude=102_710_000,
        radius_m=500,
        start_time="000000083000",
        end_time="000000180000",
        max_speed_kmh=40,
        overspeed_duration_s=15,
        night_max_speed_kmh=30,
        name="school",
    )
    f = fence_from_area(circle, kind=FenceKind.FORBIDDEN)
    assert f.id == 7
    assert f.area_id == 7
    assert f.name == "school"
    assert f.shape == Circle(lon=102.71, lat=25.04, radius_m=500.0)
    assert f.window == DailyWindow(start=time(8, 30), end=time(18, 0))
    assert (f.max_speed_kmh, f.overspeed_duration_s, f.night_max_speed_kmh) == (40.0, 15, 30.0)

    rect = AreaRectangle(
        area_id=8,
        attribute=AREA_BY_TIME | AREA_SOUTH,
        top_left_latitude=25_100_000,
        top_left_longitude=102_600_000,
        bottom_right_latitude=25_000_000,
        bottom_right_longitude=102_800_000,
        start_time="261001000000",
        end_time="261008000000",
    )
    f = fence_from_area(rect, kind=FenceKind.PERMITTED, name="south")
    assert f.shape == Rectangle(west=102.6, south=-25.1, east=102.8, north=-25.0)
    assert f.window == PeriodWindow(
        start=datetime(2026, 10, 1, tzinfo=GMT8), end=datetime(2026, 10, 8, tzinfo=GMT8)
    )
    assert f.max_speed_kmh is None

    vertices = ((25_000_000, 102_700_000), (25_000_000, 102_800_000), (25_100_000, 102_750_000))
    polygon = SetPolygonArea(
        area_id=9,
        attribute=0,
        vertices=tuple(AreaPoint(latitude=a, longitude=o) for a, o in vertices),
    )
    f = fence_from_area(polygon.to_area(), kind=FenceKind.PARKING)
    assert f.name == "area-9"
    assert isinstance(f.shape, Polygon)
    exterior = f.shape.parts[0][0]
    assert exterior[0] == exterior[-1] == (102.7, 25.0)
    assert len(exterior) == 4  # closed
    assert isinstance(polygon.to_area(), AreaPolygon)


def test_bcd_windows() -> None:
    assert window_from_bcd(None, None) is None
    with pytest.raises(FenceError, match="two 12-digit"):
        window_from_bcd("000000083000", None)
    with pytest.raises(FenceError, match="wildcards"):
        window_from_bcd("000101083000", "000101180000")
    with pytest.raises(FenceError):
        window_from_bcd("261301000000", "261302000000")  # month 13
    overnight = DailyWindow(start=time(22), end=time(6))
    assert window_contains(overnight, datetime(2026, 10, 1, 23, tzinfo=GMT8))
    assert window_contains(overnight, datetime(2026, 10, 1, 5, 59, tzinfo=GMT8))
    assert not window_contains(overnight, datetime(2026, 10, 1, 6, tzinfo=GMT8))


# ---------------------------------------------------------------------------------------------
# GeoJSON


def _feature(geometry: Mapping[str, object], **props: object) -> dict[str, object]:
    return {"type": "Feature", "geometry": geometry, "properties": props}


def test_geojson_import_and_round_trip() -> None:
    ring = [[102.6, 25.0], [102.8, 25.0], [102.8, 25.1], [102.6, 25.1], [102.6, 25.0]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            _feature({"type": "Polygon", "coordinates": [ring]}, name="area", kind="permitted"),
            {
                **_feature(
                    {"type": "Polygon", "coordinates": [ring]},
                    name="box",
                    kind="parking",
                    shape="rectangle",
                    unit="gov",
                ),
                "id": "42",
            },
            _feature(
                {"type": "Point", "coordinates": [102.7, 25.05]},
                name="school",
                kind="forbidden",
                radius_m=300,
                max_speed_kmh=30,
                overspeed_duration_s=10,
                start_time="07:30",
                end_time="17:30:00",
            ),
            _feature(
                {"type": "MultiPolygon", "coordinates": [[ring]]},
                name="yuxi",
                kind="destination",
                start_time="2026-10-01T00:00:00",
                end_time="2026-10-08T00:00:00+08:00",
            ),
        ],
    }
    fences = fences_from_geojson(json.dumps(doc))
    assert [f.id for f in fences] == [1, 42, 43, 44]
    assert fences[1].shape == Rectangle(west=102.6, south=25.0, east=102.8, north=25.1)
    assert fences[1].unit == "gov"
    assert fences[2].shape == Circle(lon=102.7, lat=25.05, radius_m=300.0)
    assert fences[2].window == DailyWindow(start=time(7, 30), end=time(17, 30))
    window = fences[3].window
    assert isinstance(window, PeriodWindow)
    assert window.start == datetime(2026, 10, 1, tzinfo=GMT8)
    again = fences_from_geojson(fences_to_geojson(fences))
    assert again == fences


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (_feature({"type": "Point", "coordinates": [1, 2]}, kind="parking"), "name is required"),
        (_feature({"type": "Point", "coordinates": [1, 2]}, name="x", kind="car"), "kind"),
        (_feature({"type": "Point", "coordinates": [1, 2]}, name="x", kind="parking"), "radius"),
        (
            _feature(
                {"type": "LineString", "coordinates": [[1, 2], [3, 4]]}, name="x", kind="parking"
            ),
            "unsupported geometry",
        ),
        (
            _feature(
                {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
                name="x",
                kind="parking",
                shape="rectangle",
            ),
            "rectangle",
        ),
        (
            _feature(
                {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]},
                name="x",
                kind="parking",
            ),
            "not valid",
        ),
        (
            _feature({"type": "Point", "coordinates": [1, 2]}, name="x", kind="parking", colour=1),
            "unknown properties",
        ),
        (
            _feature(
                {"type": "Point", "coordinates": [1, 2]},
                name="x",
                kind="parking",
                radius_m=5,
                start_time="08:00",
            ),
            "go together",
        ),
        (
            {"type": "Feature", "geometry": None, "properties": {"name": "x", "kind": "parking"}},
            "geometry",
        ),
        ("nonsense", "not a GeoJSON Feature"),
    ],
)
def test_geojson_errors_name_the_feature(feature: object, message: str) -> None:
    doc = {"type": "FeatureCollection", "features": [feature]}
    with pytest.raises(GeoJSONError, match=message) as info:
        fences_from_geojson(doc)
    assert info.value.problems[0].startswith("feature 0")


def test_geojson_collects_every_problem() -> None:
    point = {"type": "Point", "coordinates": [102.7, 25.0]}
    doc = {
        "type": "FeatureCollection",
        "features": [
            _feature(point, name="a", kind="parking", radius_m=10),
            _feature(point, name="a", kind="parking", radius_m=10),
            _feature(point, name="b", kind="nope", radius_m=10),
        ],
    }
    with pytest.raises(GeoJSONError) as info:
        fences_from_geojson(doc)
    assert len(info.value.problems) == 2
    assert "name already used" in info.value.problems[0]
    with pytest.raises(GeoJSONError, match="not JSON"):
        fences_from_geojson("{")
    with pytest.raises(GeoJSONError, match="FeatureCollection"):
        fences_from_geojson({"type": "Feature"})


# ---------------------------------------------------------------------------------------------
# Distances


@pytest.mark.parametrize(
    ("lon", "lat", "geodesic_m"),
    # Vincenty's inverse on WGS-84 from Kunming (102.71, 25.04).
    [
        (102.7105, 25.0405, 74.9250),
        (102.72, 25.04, 1009.1738),
        (102.71, 25.13, 9969.6738),
        (102.80, 25.10, 11252.9071),
        (102.60, 24.95, 14923.5405),
        (103.20, 25.40, 63470.0746),
    ],
)
def test_distance_matches_the_geodesic(lon: float, lat: float, geodesic_m: float) -> None:
    d = float(distance_m(KUNMING[0], KUNMING[1], lon, lat))
    tolerance = 1e-6 if geodesic_m < 20_000 else 1e-5
    assert abs(d - geodesic_m) / geodesic_m < tolerance


def test_circle_boundary_accuracy() -> None:
    """Points 1 m inside/outside a 10 km circle, in every direction, are classified right."""
    index = FenceIndex([fence(Circle(lon=KUNMING[0], lat=KUNMING[1], radius_m=10_000))], margin_m=0)
    bearings = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for r, expect in ((9_999.0, True), (10_001.0, False)):
        lon = KUNMING[0] + r * np.sin(bearings) / KX
        lat = KUNMING[1] + r * np.cos(bearings) / KY
        # place the points at exactly r metres along the geodesic-ish direction
        d = distance_m(KUNMING[0], KUNMING[1], lon, lat)
        lon = KUNMING[0] + (lon - KUNMING[0]) * r / d
        lat = KUNMING[1] + (lat - KUNMING[1]) * r / d
        hits = index.hits(lon, lat)
        inside = np.zeros(bearings.size, dtype=bool)
        inside[hits.sample[hits.inside]] = True
        assert inside.tolist() == [expect] * bearings.size


# ---------------------------------------------------------------------------------------------
# Index


@st.composite
def polygons(draw: st.DrawFn) -> shapely.Polygon:
    cx = draw(st.floats(102.0, 103.0))
    cy = draw(st.floats(24.5, 25.5))
    n = draw(st.integers(3, 12))
    angles = sorted(draw(st.lists(st.floats(0, 2 * math.pi), min_size=n, max_size=n, unique=True)))
    radii = draw(st.lists(st.floats(0.005, 0.1), min_size=n, max_size=n))
    ring = [
        (cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)
    ]
    poly = shapely.Polygon(ring)
    if not poly.is_valid or poly.area < 1e-7:
        poly = shapely.Point(cx, cy).buffer(0.05, quad_segs=4)
    return poly


@settings(max_examples=60)
@given(
    st.lists(polygons(), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_polygon_containment_matches_shapely(shapes: list[shapely.Polygon], seed: int) -> None:
    fences = [
        Fence(
            id=i + 1,
            name=f"p{i}",
            kind=FenceKind.PERMITTED,
            shape=Polygon.from_exterior(list(s.exterior.coords)),
        )
        for i, s in enumerate(shapes)
    ]
    index = FenceIndex(fences, margin_m=0)
    rng = np.random.default_rng(seed)
    lon = rng.uniform(101.85, 103.15, 300)
    lat = rng.uniform(24.35, 25.65, 300)
    hits = index.hits(lon, lat)
    got = {
        (int(s), int(f)) for s, f, i in zip(hits.sample, hits.fence, hits.inside, strict=True) if i
    }
    want = {
        (i, j)
        for i in range(lon.size)
        for j, s in enumerate(shapes)
        if s.contains(shapely.Point(lon[i], lat[i]))
    }
    assert got == want
    assert np.all(np.diff(hits.sample) >= 0)


@settings(max_examples=40)
@given(
    st.floats(102.0, 103.0),
    st.floats(24.5, 25.5),
    st.floats(50, 5000),
    st.floats(50, 5000),
    st.floats(0, 40),
    st.integers(0, 2**32 - 1),
)
def test_margins_nest(lon: float, lat: float, w: float, h: float, margin: float, seed: int) -> None:
    """inside (shrunk) implies exactly inside implies listed (grown), for every shape."""
    rect = Rectangle(west=lon, south=lat, east=lon + w / KX, north=lat + h / KY)
    circle = Circle(lon=lon, lat=lat, radius_m=min(w, h))
    poly = Polygon.from_exterior(
        [(lon, lat), (lon + w / KX, lat), (lon + w / KX / 2, lat + h / KY)]
    )
    shapes: list[Circle | Rectangle | Polygon] = [rect, circle, poly]
    fences = [fence(s, id=i + 1, name=f"f{i}") for i, s in enumerate(shapes)]
    grown = FenceIndex(fences, margin_m=margin)
    exact = FenceIndex(fences, margin_m=0)
    rng = np.random.default_rng(seed)
    px = lon + rng.uniform(-1.5, 2.5, 400) * max(w, h) / KX
    py = lat + rng.uniform(-1.5, 2.5, 400) * max(w, h) / KY
    a, b = grown.hits(px, py), exact.hits(px, py)
    pairs = list(zip(a.sample.tolist(), a.fence.tolist(), strict=True))
    listed = set(pairs)
    clear = {p for p, i in zip(pairs, a.inside.tolist(), strict=True) if i}
    exact_pairs = zip(b.sample.tolist(), b.fence.tolist(), strict=True)
    inside = {p for p, i in zip(exact_pairs, b.inside.tolist(), strict=True) if i}
    assert clear <= inside <= listed


def test_margin_band_width() -> None:
    """A 20 m margin: 25 m inside is clear, 15 m inside is in the band, 15 m outside listed,
    25 m outside gone -- for each shape."""
    west = 102.70
    rect = Rectangle(west=west, south=25.0, east=west + 2000 / KX, north=25.0 + 2000 / KY)
    ring = [(west, 25.0), (west, 25.0 + 2000 / KY), (west - 2000 / KX, 25.0 + 1000 / KY)]
    poly = Polygon.from_exterior(ring)
    circle = Circle(lon=west + 1000 / KX, lat=25.0 + 1000 / KY, radius_m=1000)
    for shape, inward in ((rect, 1.0), (poly, -1.0), (circle, 1.0)):
        index = FenceIndex([fence(shape)], margin_m=20)
        y = 25.0 + 1000 / KY
        offsets = np.array([25.0, 15.0, -15.0, -25.0])  # metres inside the west/east edge
        lon = west + inward * offsets / KX
        hits = index.hits(lon, np.full(4, y))
        assert hits.sample.tolist() == [0, 1, 2]
        assert hits.inside.tolist() == [True, False, False]


def test_time_windows_and_units_filter_before_geometry() -> None:
    box = Rectangle(west=102.6, south=25.0, east=102.8, north=25.1)
    fences = [
        fence(box, id=1, name="day", window=DailyWindow(start=time(8), end=time(18))),
        fence(box, id=2, name="night", window=DailyWindow(start=time(22), end=time(6))),
        fence(
            box,
            id=3,
            name="october",
            window=PeriodWindow(
                start=datetime(2026, 10, 1, tzinfo=GMT8), end=datetime(2026, 10, 8, tzinfo=GMT8)
            ),
        ),
        fence(box, id=4, name="gov", unit="gov"),
        fence(box, id=5, name="police", unit="police"),
    ]
    index = FenceIndex(fences)
    when = [datetime(2026, 10, 2, 9, tzinfo=GMT8), datetime(2026, 9, 30, 23, tzinfo=GMT8)]
    t = np.array([int(w.timestamp()) for w in when])
    units = np.array([index.unit_code("gov"), index.unit_code("transport")])
    hits = index.hits(np.full(2, 102.7), np.full(2, 25.05), t, unit=units)
    got = {
        (int(s), index.fences[int(f)].name) for s, f in zip(hits.sample, hits.fence, strict=True)
    }
    assert got == {(0, "day"), (0, "october"), (0, "gov"), (1, "night")}
    assert index.unit_code(None) == -2


def test_speed_limits_pick_the_lowest_and_night() -> None:
    box = Rectangle(west=102.6, south=25.0, east=102.8, north=25.1)
    fences = [
        fence(box, id=1, name="a", max_speed_kmh=60.0, overspeed_duration_s=5),
        fence(box, id=2, name="b", max_speed_kmh=40.0, night_max_speed_kmh=20.0),
        fence(box, id=3, name="c"),
    ]
    index = FenceIndex(fences)
    hits = index.hits(np.array([102.7, 102.7, 103.5]), np.array([25.05, 25.05, 25.05]))
    limit, duration, which = index.speed_limits(hits, 3, night=np.array([False, True, False]))
    assert limit[:2].tolist() == [40.0, 20.0]
    assert math.isnan(limit[2])
    assert which.tolist() == [1, 1, -1]
    assert duration.tolist() == [-1, -1, -1]


def test_index_rejects_duplicates_and_handles_empty() -> None:
    c = Circle(lon=102.7, lat=25.0, radius_m=10)
    with pytest.raises(FenceError, match="duplicate fence id"):
        FenceIndex([fence(c), fence(c, name="g")])
    with pytest.raises(FenceError, match="duplicate fence name"):
        FenceIndex([fence(c), fence(c, id=2)])
    empty = FenceIndex([])
    assert len(empty.hits(np.array([1.0]), np.array([2.0]))) == 0
    assert len(FenceIndex([fence(c)]).hits(np.zeros(0), np.zeros(0))) == 0


def test_index_build_and_query_are_fast_enough() -> None:
    """1,000 fences: built once in well under a second; 20,000 positions per query."""
    rng = np.random.default_rng(5)
    fences = []
    for i in range(1000):
        lon, lat = KUNMING[0] + rng.normal(0, 0.1), KUNMING[1] + rng.normal(0, 0.1)
        shape: Circle | Rectangle | Polygon
        if i % 3 == 0:
            shape = Circle(lon=lon, lat=lat, radius_m=float(rng.uniform(50, 2000)))
        elif i % 3 == 1:
            shape = Rectangle(west=lon, south=lat, east=lon + 0.01, north=lat + 0.01)
        else:
            shape = Polygon.from_exterior(
                [(lon, lat), (lon + 0.02, lat), (lon + 0.01, lat + 0.015)]
            )
        fences.append(fence(shape, id=i + 1, name=f"f{i}"))
    start = time_module.perf_counter()
    index = FenceIndex(fences)
    px = KUNMING[0] + rng.normal(0, 0.1, 20_000)
    py = KUNMING[1] + rng.normal(0, 0.1, 20_000)
    hits = index.hits(px, py)
    assert len(hits) > 0
    assert time_module.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------
# Segment helpers against plain loops


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=40))
def test_segment_helpers_match_loops(rows: list[tuple[int, bool]]) -> None:
    rows.sort(key=lambda r: r[0])
    keys = np.array([r[0] for r in rows], dtype=np.int64)
    mask = np.array([r[1] for r in rows], dtype=bool)
    starts = segment_starts(keys)
    want_ffill, want_begin, want_first = [], [], []
    last = begin = -1
    for i, (k, m) in enumerate(rows):
        if i == 0 or k != rows[i - 1][0]:
            last = begin = -1
            seen_first = False
        if m:
            last = i
            if begin < 0 or not rows[i - 1][1]:
                begin = i
            if not seen_first:
                want_first.append(i)
                seen_first = True
        else:
            begin = -1
        want_ffill.append(last)
        want_begin.append(begin if m else -1)
    assert ffill_index(mask, starts).tolist() == want_ffill
    assert run_begin(mask, starts).tolist() == want_begin
    assert first_in_segment(mask, starts).tolist() == want_first


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 5)), max_size=20))
def test_concat_ranges(spans: list[tuple[int, int]]) -> None:
    begin = np.array([s[0] for s in spans], dtype=np.int64)
    count = np.array([s[1] for s in spans], dtype=np.int64)
    want = [i for b, c in spans for i in range(b, b + c)]
    assert concat_ranges(begin, count).tolist() == want


@pytest.mark.parametrize(
    ("properties", "coordinates"),
    [
        ({"name": "a", "kind": "parking", "radius_m": 10**400}, [102.7, 25.0]),
        ({"name": "a", "kind": "parking", "radius_m": 500}, [10**400, 25.0]),
        ({"name": "a", "kind": "parking", "radius_m": 500}, [102.7, float("nan")]),
    ],
)
def test_numbers_past_a_float_are_a_problem_not_a_crash(
    properties: dict[str, object], coordinates: list[object]
) -> None:
    # JSON integers are unbounded: converting 10**400 to a float overflows.
    feature = {"type": "Feature", "properties": properties}
    feature["geometry"] = {"type": "Point", "coordinates": coordinates}
    with pytest.raises(GeoJSONError) as caught:
        fences_from_geojson({"type": "FeatureCollection", "features": [feature]})
    assert len(caught.value.problems) == 1
