"""GeoJSON import: a FeatureCollection (RFC 7946) into fences, pure (no files, no database).

Each Feature is one fence:

* ``geometry``: a ``Polygon`` or ``MultiPolygon`` (a polygon fence, or a rectangle when
  ``properties.shape`` is ``"rectangle"``: then the ring must be an axis-aligned box), or a
  ``Point`` with ``properties.radius_m`` (a circle);
* ``properties.name`` (required, unique) and ``properties.kind``: ``permitted``, ``forbidden``,
  ``parking`` or ``destination``;
* optional ``properties``: ``unit`` (the fence applies to that unit's vehicles only),
  ``max_speed_kmh``, ``overspeed_duration_s``, ``night_max_speed_kmh`` (as in JT/T 808 area
  speed limits), ``start_time``/``end_time`` -- both ``"HH:MM[:SS]"`` for a daily window
  (China time), or both ISO 8601 datetimes for a single period (no offset means GMT+8) --
  and ``area_id`` (the JT/T 808 area id the fence mirrors);
* the fence id is the Feature's ``id`` (an integer or a string of digits), else
  ``properties.id``, else assigned from ``first_id`` upwards in document order.

All problems are collected and raised together as one :class:`GeoJSONError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, time
from typing import Any

from geofence.errors import FenceError, GeoJSONError
from geofence.model import (
    GMT8,
    Circle,
    DailyWindow,
    Fence,
    FenceKind,
    PeriodWindow,
    Polygon,
    Rectangle,
    Ring,
    Shape,
    Window,
)

__all__ = ["fences_from_geojson", "fences_to_geojson"]

_KNOWN_PROPERTIES = frozenset(
    {
        "id",
        "name",
        "kind",
        "shape",
        "radius_m",
        "unit",
        "max_speed_kmh",
        "overspeed_duration_s",
        "night_max_speed_kmh",
        "start_time",
        "end_time",
        "area_id",
        "description",
    }
)


class _ProblemError(Exception):
    """One feature's problem (collected, then raised as GeoJSONError)."""


def fences_from_geojson(
    document: str | bytes | Mapping[str, Any], *, first_id: int = 1
) -> list[Fence]:
    """Parse a FeatureCollection into fences (see the module docstring)."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GeoJSONError([f"not JSON: {exc}"]) from exc
    if not isinstance(document, Mapping) or document.get("type") != "FeatureCollection":
        raise GeoJSONError(["the document is not a GeoJSON FeatureCollection"])
    features = document.get("features")
    if not isinstance(features, list):
        raise GeoJSONError(["FeatureCollection.features is not a list"])

    problems: list[str] = []
    fences: list[Fence] = []
    next_id = first_id
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for index, feature in enumerate(features):
        label = f"feature {index}"
        if isinstance(feature, Mapping):
            name = (feature.get("properties") or {}).get("name")
            if isinstance(name, str) and name:
                label = f"feature {index} ({name!r})"
        try:
            fence = _feature(feature, default_id=next_id)
        except (_ProblemError, FenceError) as exc:
            problems.append(f"{label}: {exc}")
            continue
        if fence.id in seen_ids:
            problems.append(f"{label}: id {fence.id} already used by feature {seen_ids[fence.id]}")
            continue
        if fence.name in seen_names:
            problems.append(f"{label}: name already used by feature {seen_names[fence.name]}")
            continue
        seen_ids[fence.id] = index
        seen_names[fence.name] = index
        next_id = max(next_id, fence.id + 1)
        fences.append(fence)
    if problems:
        raise GeoJSONError(problems)
    return fences


def _feature(feature: Any, *, default_id: int) -> Fence:
    if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
        raise _ProblemError("not a GeoJSON Feature")
    props = feature.get("properties") or {}
    if not isinstance(props, Mapping):
        raise _ProblemError("properties is not an object")
    return _fence(feature, props, default_id=default_id)


def _fence(feature: Mapping[str, Any], props: Mapping[str, Any], *, default_id: int) -> Fence:
    unknown = sorted(set(props) - _KNOWN_PROPERTIES)
    if unknown:
        raise _ProblemError(f"unknown properties {unknown}")
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _ProblemError("properties.name is required (a non-empty string)")
    kind_text = props.get("kind")
    try:
        kind = FenceKind(str(kind_text))
    except ValueError:
        choices = ", ".join(k.value for k in FenceKind)
        raise _ProblemError(
            f"properties.kind must be one of {choices}, got {kind_text!r}"
        ) from None
    unit = props.get("unit")
    if unit is not None and not (isinstance(unit, str) and unit):
        raise _ProblemError("properties.unit must be a non-empty string")
    return Fence(
        id=_fence_id(feature, props, default_id),
        name=name.strip(),
        kind=kind,
        shape=_shape(feature.get("geometry"), props),
        unit=unit,
        window=_window(props.get("start_time"), props.get("end_time")),
        max_speed_kmh=_number(props, "max_speed_kmh"),
        overspeed_duration_s=_integer(props, "overspeed_duration_s"),
        night_max_speed_kmh=_number(props, "night_max_speed_kmh"),
        area_id=_integer(props, "area_id"),
    )


def _fence_id(feature: Mapping[str, Any], props: Mapping[str, Any], default: int) -> int:
    for value in (feature.get("id"), props.get("id")):
        if value is None:
            continue
        if isinstance(value, bool):
            raise _ProblemError(f"id must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise _ProblemError(f"id must be an integer or a string of digits, got {value!r}")
    return default


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number, else None.  JSON integers are
    unbounded (``10**400`` parses), so the conversion itself may overflow."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _number(props: Mapping[str, Any], key: str) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    number = _finite(value)
    if number is None:
        raise _ProblemError(f"properties.{key} must be a number, got {_short(value)}")
    return number


def _short(value: Any) -> str:
    text = (
        repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a huge integer"
    )
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(props: Mapping[str, Any], key: str) -> int | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ProblemError(f"properties.{key} must be an integer, got {value!r}")
    return value


def _position(value: Any) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise _ProblemError(f"bad position {_short(value)}")
    lon, lat = _finite(value[0]), _finite(value[1])
    if lon is None or lat is None:
        raise _ProblemError(f"bad position {_short(value)}")
    return (lon, lat)


def _ring(value: Any) -> Ring:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _ProblemError("a polygon ring must be an array of positions")
    return tuple(_position(p) for p in value)


def _rings(value: Any) -> tuple[Ring, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise _ProblemError("a polygon must be a non-empty array of rings")
    return tuple(_ring(r) for r in value)


def _shape(geometry: Any, props: Mapping[str, Any]) -> Shape:
    if not isinstance(geometry, Mapping):
        raise _ProblemError("geometry is missing")
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    declared = props.get("shape")
    if declared not in (None, "circle", "rectangle", "polygon"):
        raise _ProblemError(
            f"properties.shape must be circle, rectangle or polygon, got {declared!r}"
        )
    if kind == "Point":
        if declared not in (None, "circle"):
            raise _ProblemError(f"a Point is a circle, not a {declared}")
        radius = _number(props, "radius_m")
        if radius is None:
            raise _ProblemError("a Point fence needs properties.radius_m")
        lon, lat = _position(coords)
        return Circle(lon=lon, lat=lat, radius_m=radius)
    if props.get("radius_m") is not None:
        raise _ProblemError("properties.radius_m only applies to a Point (circle)")
    if kind == "Polygon":
        rings = _rings(coords)
        if declared == "rectangle":
            return _rectangle(rings)
        if declared == "circle":
            raise _ProblemError("a circle is a Point with radius_m")
        return Polygon(parts=(rings,))
    if kind == "MultiPolygon":
        if declared not in (None, "polygon"):
            raise _ProblemError(f"a MultiPolygon is a polygon fence, not a {declared}")
        if not isinstance(coords, Sequence) or isinstance(coords, str) or not coords:
            raise _ProblemError("MultiPolygon coordinates must be a non-empty array")
        return Polygon(parts=tuple(_rings(p) for p in coords))
    raise _ProblemError(f"unsupported geometry type {kind!r} (Point, Polygon or MultiPolygon)")


def _rectangle(rings: tuple[Ring, ...]) -> Rectangle:
    if len(rings) != 1:
        raise _ProblemError("a rectangle has no holes")
    ring = rings[0]
    lons = sorted({p[0] for p in ring})
    lats = sorted({p[1] for p in ring})
    if len(ring) != 5 or ring[0] != ring[-1] or len(lons) != 2 or len(lats) != 2:
        raise _ProblemError("a rectangle must be a closed axis-aligned ring of 4 corners")
    if {(lon, lat) for lon in lons for lat in lats} != set(ring):
        raise _ProblemError("a rectangle's ring must visit its 4 corners")
    return Rectangle(west=lons[0], south=lats[0], east=lons[1], north=lats[1])


def _window(start: Any, end: Any) -> Window | None:
    if start is None and end is None:
        return None
    if not isinstance(start, str) or not isinstance(end, str):
        raise _ProblemError("start_time and end_time go together, both strings")
    daily = [_time_of_day(v) for v in (start, end)]
    if daily[0] is not None and daily[1] is not None:
        return DailyWindow(start=daily[0], end=daily[1])
    try:
        begin, finish = datetime.fromisoformat(start), datetime.fromisoformat(end)
    except ValueError:
        raise _ProblemError(
            f"start_time/end_time must both be HH:MM[:SS] or both ISO datetimes, "
            f"got {start!r}, {end!r}"
        ) from None
    begin = begin if begin.tzinfo else begin.replace(tzinfo=GMT8)
    finish = finish if finish.tzinfo else finish.replace(tzinfo=GMT8)
    return PeriodWindow(start=begin, end=finish)


def _time_of_day(text: str) -> time | None:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        return None
    numbers = [int(p) for p in parts] + [0]
    try:
        return time(numbers[0], numbers[1], numbers[2])
    except ValueError:
        return None


def fences_to_geojson(fences: Sequence[Fence]) -> dict[str, Any]:
    """The inverse of :func:`fences_from_geojson` (for export and round-trip tests)."""
    features = []
    for fence in fences:
        props: dict[str, Any] = {"name": fence.name, "kind": fence.kind.value}
        shape = fence.shape
        geometry: dict[str, Any]
        if isinstance(shape, Circle):
            geometry = {"type": "Point", "coordinates": [shape.lon, shape.lat]}
            props["radius_m"] = shape.radius_m
        elif isinstance(shape, Rectangle):
            w, s, e, n = shape.west, shape.south, shape.east, shape.north
            ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
            geometry = {"type": "Polygon", "coordinates": [ring]}
            props["shape"] = "rectangle"
        elif len(shape.parts) == 1:
            geometry = {"type": "Polygon", "coordinates": _json_rings(shape.parts[0])}
        else:
            geometry = {
                "type": "MultiPolygon",
                "coordinates": [_json_rings(part) for part in shape.parts],
            }
        if fence.unit is not None:
            props["unit"] = fence.unit
        for key in ("max_speed_kmh", "overspeed_duration_s", "night_max_speed_kmh", "area_id"):
            value = getattr(fence, key)
            if value is not None:
                props[key] = value
        window = fence.window
        if isinstance(window, DailyWindow | PeriodWindow):
            props["start_time"] = window.start.isoformat()
            props["end_time"] = window.end.isoformat()
        features.append(
            {"type": "Feature", "id": fence.id, "geometry": geometry, "properties": props}
        )
    return {"type": "FeatureCollection", "features": features}


def _json_rings(rings: tuple[Ring, ...]) -> list[list[list[float]]]:
    return [[[lon, lat] for lon, lat in ring] for ring in rings]
