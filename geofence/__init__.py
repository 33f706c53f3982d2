"""Geofences: the fence model, GeoJSON import, a vectorised index and enter/exit hysteresis.

Pure and array-oriented: numpy and shapely 2, no I/O, no clock.  Positions are WGS-84
(longitude, latitude) degrees; times, where a window needs one, POSIX seconds judged in China
time (GMT+8).
"""

from __future__ import annotations

from geofence.errors import FenceError, GeoJSONError
from geofence.geojson import fences_from_geojson, fences_to_geojson
from geofence.hysteresis import FenceTracker, TrackResult, debounce
from geofence.index import FenceIndex, Hits
from geofence.model import (
    Circle,
    DailyWindow,
    Fence,
    FenceKind,
    PeriodWindow,
    Polygon,
    Rectangle,
    Shape,
    Window,
    fence_from_area,
)

__all__ = [
    "Circle",
    "DailyWindow",
    "Fence",
    "FenceError",
    "FenceIndex",
    "FenceKind",
    "FenceTracker",
    "GeoJSONError",
    "Hits",
    "PeriodWindow",
    "Polygon",
    "Rectangle",
    "Shape",
    "TrackResult",
    "Window",
    "debounce",
    "fence_from_area",
    "fences_from_geojson",
    "fences_to_geojson",
]
