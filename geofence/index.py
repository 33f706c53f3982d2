"""The fence index: built once per fence set, queried with whole arrays of positions.

Building (:class:`FenceIndex`) does every per-fence computation up front:

* each fence gets an *outer* and an *inner* version, grown and shrunk by a margin in metres
  (the hysteresis band of :mod:`geofence.hysteresis`): a position inside the inner shape is
  clearly inside, one outside the outer shape clearly outside, one in between is in the band;
* a shapely 2 ``STRtree`` over the outer bounding boxes finds candidate (position, fence) pairs
  for a whole array of positions at once;
* polygons are prepared shapely geometries, tested with the vectorised ``contains_xy``;
  circles are tested with numpy on the ellipsoid (:func:`geofence.geodesy.distance_from_centre_m`:
  within 8 cm on a 10 km circle), not as buffered polygons; rectangles (axis-aligned in
  lon/lat, as JT/T 808 defines them) with four comparisons;
* time windows and speed limits become plain arrays indexed by fence.

:meth:`FenceIndex.hits` returns every (position, fence) pair within the outer shape, with
whether it is also within the inner one; callers reduce those pairs to what they need (any
permitted area, which forbidden zone, the lowest speed limit) with numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import shapely

from geofence.errors import FenceError
from geofence.geodesy import distance_from_centre_m, metres_per_degree, radii_of_curvature
from geofence.model import Circle, DailyWindow, Fence, FenceKind, PeriodWindow, Rectangle

__all__ = [
    "KIND_CODE",
    "SHAPE_CIRCLE",
    "SHAPE_POLYGON",
    "SHAPE_RECTANGLE",
    "FenceIndex",
    "Hits",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

KIND_CODE: dict[FenceKind, int] = {kind: code for code, kind in enumerate(FenceKind)}
SHAPE_CIRCLE = 0
SHAPE_RECTANGLE = 1
SHAPE_POLYGON = 2

_WINDOW_NONE = 0
_WINDOW_DAILY = 1
_WINDOW_PERIOD = 2

_GMT8_S = 8 * 3600  # windows are China time (GMT+8), positions POSIX seconds
_DAY_S = 86400

# A margin never takes more than this share of a fence's size, so that the inner shape of a
# small fence (a 60 m parking circle) does not vanish: margin = min(margin_m, share * size).
_MARGIN_SHARE = 0.25
# Vertices per quarter circle when polygons are grown/shrunk: the rounded corners are at most
# margin * (1 - cos(pi/8)) ~ 8 % of the margin off a true offset curve, well inside GPS noise.
_BUFFER_QUAD_SEGS = 4
# GEOS returns an empty polygon for buffers of denormal distances; below a millimetre a margin
# is no margin.
_MIN_BUFFER_M = 1e-3
# Relative slack on circle bounding boxes in degrees: the longitude scale changes with latitude
# across the circle (cos varies < 0.1 % over 50 km at 53 N), and the box only has to contain.
_BOX_SLACK = 1.01


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Hits:
    """(position, fence) pairs within a fence's outer shape, ordered by position.

    ``sample`` indexes the queried arrays, ``fence`` the index's fences; ``inside`` says the
    position is also within the inner shape (clearly inside).  Pairs beyond the outer shape --
    clearly outside -- are not listed.
    """

    sample: I64
    fence: I64
    inside: Bools

    def __len__(self) -> int:
        return int(self.sample.size)

    def select(self, mask: Bools) -> Hits:
        return Hits(sample=self.sample[mask], fence=self.fence[mask], inside=self.inside[mask])


def _local_transform(lon0: float, lat0: float, *, inverse: bool) -> Callable[[F64], F64]:
    """Degrees <-> metres in the tangent plane at (lon0, lat0), for buffering polygons."""
    kx, ky = (float(v) for v in metres_per_degree(lat0))

    def to_metres(xy: F64) -> F64:
        return np.column_stack(((xy[:, 0] - lon0) * kx, (xy[:, 1] - lat0) * ky))

    def to_degrees(xy: F64) -> F64:
        return np.column_stack((xy[:, 0] / kx + lon0, xy[:, 1] / ky + lat0))

    return to_degrees if inverse else to_metres


def _grown(geometry: shapely.Geometry, margin_m: float) -> shapely.Geometry:
    """``geometry`` (degrees) offset by ``margin_m`` metres, outwards if positive."""
    centre = shapely.centroid(geometry)
    lon0, lat0 = float(shapely.get_x(centre)), float(shapely.get_y(centre))
    local = shapely.transform(geometry, _local_transform(lon0, lat0, inverse=False))
    moved = shapely.buffer(local, margin_m, quad_segs=_BUFFER_QUAD_SEGS)
    return shapely.transform(moved, _local_transform(lon0, lat0, inverse=True))


def _area_m2(geometry: shapely.Geometry) -> float:
    centre = shapely.centroid(geometry)
    lon0, lat0 = float(shapely.get_x(centre)), float(shapely.get_y(centre))
    return float(
        shapely.area(shapely.transform(geometry, _local_transform(lon0, lat0, inverse=False)))
    )


class FenceIndex:
    """An immutable index over a fence set (see the module docstring).

    ``margin_m`` is the hysteresis half-band in metres (each fence uses at most a quarter of
    its own size).  With ``margin_m=0`` inner, outer and exact shapes coincide: ``inside`` is
    then exactly shapely's ``contains`` (strict interior) for polygons and rectangles, and
    ``distance < radius`` for circles.
    """

    def __init__(self, fences: Sequence[Fence], *, margin_m: float = 20.0) -> None:
        if not (math.isfinite(margin_m) and margin_m >= 0):
            raise FenceError(f"margin_m must be a non-negative number, got {margin_m}")
        self.fences: tuple[Fence, ...] = tuple(fences)
        self.margin_m = float(margin_m)
        n = len(self.fences)
        self.position_of_id: dict[int, int] = {}
        self.position_of_name: dict[str, int] = {}
        for i, fence in enumerate(self.fences):
            if fence.id in self.position_of_id:
                raise FenceError(f"duplicate fence id {fence.id}")
            if fence.name in self.position_of_name:
                raise FenceError(f"duplicate fence name {fence.name!r}")
            self.position_of_id[fence.id] = i
            self.position_of_name[fence.name] = i

        self.units: tuple[str, ...] = tuple(sorted({f.unit for f in self.fences if f.unit}))
        self._unit_code = {u: i for i, u in enumerate(self.units)}
        self.ids = np.array([f.id for f in self.fences], dtype=np.int64)
        self.kind = np.array([KIND_CODE[f.kind] for f in self.fences], dtype=np.int8)
        self.unit = np.array(
            [self._unit_code[f.unit] if f.unit else -1 for f in self.fences], dtype=np.int64
        )
        self.max_speed_kmh = np.array(
            [math.nan if f.max_speed_kmh is None else f.max_speed_kmh for f in self.fences],
            dtype=np.float64,
        )
        self.night_max_speed_kmh = np.array(
            [
                math.nan if f.night_max_speed_kmh is None else f.night_max_speed_kmh
                for f in self.fences
            ],
            dtype=np.float64,
        )
        self.overspeed_duration_s = np.array(
            [-1 if f.overspeed_duration_s is None else f.overspeed_duration_s for f in self.fences],
            dtype=np.int64,
        )
        self._window_kind = np.zeros(n, dtype=np.int8)
        self._window_start = np.zeros(n, dtype=np.int64)
        self._window_end = np.zeros(n, dtype=np.int64)
        for i, fence in enumerate(self.fences):
            window = fence.window
            if isinstance(window, DailyWindow):
                self._window_kind[i] = _WINDOW_DAILY
                self._window_start[i] = window.start_s
                self._window_end[i] = window.end_s
            elif isinstance(window, PeriodWindow):
                self._window_kind[i] = _WINDOW_PERIOD
                self._window_start[i] = math.floor(window.start.timestamp())
                self._window_end[i] = math.floor(window.end.timestamp())
        self._any_window = bool(self._window_kind.any())

        self.shape = np.full(n, SHAPE_POLYGON, dtype=np.int8)
        # Circle parameters (NaN for other shapes).
        self._c_lon = np.full(n, np.nan)
        self._c_lat = np.full(n, np.nan)
        self._c_m = np.full(n, np.nan)
        self._c_n = np.full(n, np.nan)
        self._r_in = np.full(n, np.nan)
        self._r_out = np.full(n, np.nan)
        # Rectangle inner bounds (the outer bounds are the tree boxes themselves).
        self._in_w = np.full(n, np.nan)
        self._in_s = np.full(n, np.nan)
        self._in_e = np.full(n, np.nan)
        self._in_n = np.full(n, np.nan)
        self._inner = np.full(n, None, dtype=object)
        self._outer = np.full(n, None, dtype=object)
        self.margins_m = np.zeros(n)
        boxes = np.zeros((n, 4))
        for i, fence in enumerate(self.fences):
            boxes[i] = self._prepare_shape(i, fence)
        polygons = self.shape == SHAPE_POLYGON
        shapely.prepare(self._inner[polygons])
        shapely.prepare(self._outer[polygons])
        self.boxes = boxes
        self._tree = shapely.STRtree(
            shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
        )

    # -----------------------------------------------------------------------------------------
    # Building

    def _prepare_shape(self, i: int, fence: Fence) -> tuple[float, float, float, float]:
        shape = fence.shape
        if isinstance(shape, Circle):
            self.shape[i] = SHAPE_CIRCLE
            margin = min(self.margin_m, _MARGIN_SHARE * shape.radius_m)
            m, n = (float(v) for v in radii_of_curvature(shape.lat))
            self._c_lon[i], self._c_lat[i] = shape.lon, shape.lat
            self._c_m[i], self._c_n[i] = m, n
            self._r_in[i] = shape.radius_m - margin
            self._r_out[i] = shape.radius_m + margin
            self.margins_m[i] = margin
            kx, ky = (float(v) for v in metres_per_degree(shape.lat))
            dlat = self._r_out[i] / ky * _BOX_SLACK
            lat_edge = min(abs(shape.lat) + dlat, 89.0)
            dlon = self._r_out[i] / float(metres_per_degree(lat_edge)[0]) * _BOX_SLACK
            return (shape.lon - dlon, shape.lat - dlat, shape.lon + dlon, shape.lat + dlat)
        if isinstance(shape, Rectangle):
            self.shape[i] = SHAPE_RECTANGLE
            mid = 0.5 * (shape.south + shape.north)
            kx, ky = (float(v) for v in metres_per_degree(mid))
            width_m = (shape.east - shape.west) * kx
            height_m = (shape.north - shape.south) * ky
            margin = min(self.margin_m, _MARGIN_SHARE * min(width_m, height_m))
            self.margins_m[i] = margin
            # The longitude scale shrinks towards the pole: use the larger one (the edge nearer
            # the equator) for the outer box and the smaller one for the inner box, so both
            # margins are at least ``margin`` metres everywhere along the edge.
            kx_wide = float(metres_per_degree(min(abs(shape.south), abs(shape.north)))[0])
            kx_narrow = float(metres_per_degree(max(abs(shape.south), abs(shape.north)))[0])
            dlat = margin / ky
            self._in_w[i] = shape.west + margin / kx_narrow
            self._in_e[i] = shape.east - margin / kx_narrow
            self._in_s[i] = shape.south + dlat
            self._in_n[i] = shape.north - dlat
            dlon = margin / kx_wide if kx_wide > 0 else 0.0
            return (shape.west - dlon, shape.south - dlat, shape.east + dlon, shape.north + dlat)
        geometry = shape.geometry()
        size = math.sqrt(_area_m2(geometry))
        margin = min(self.margin_m, _MARGIN_SHARE * size)
        if margin < _MIN_BUFFER_M:
            margin = 0.0
        self.margins_m[i] = margin
        if margin > 0:
            inner, outer = _grown(geometry, -margin), _grown(geometry, margin)
        else:
            inner = outer = geometry
        self._inner[i] = inner
        self._outer[i] = outer
        xmin, ymin, xmax, ymax = (float(v) for v in shapely.bounds(outer))
        return (xmin, ymin, xmax, ymax)

    # -----------------------------------------------------------------------------------------
    # Queries

    def __len__(self) -> int:
        return len(self.fences)

    def unit_code(self, unit: str | None) -> int:
        """The code :attr:`unit` uses for ``unit``; -2 (matching no unit-bound fence) if none."""
        if unit is None:
            return -2
        return self._unit_code.get(unit, -2)

    def applies(self, fence: I64, unit_code: I64) -> Bools:
        """Whether each fence applies to a vehicle of the matching unit code (elementwise)."""
        owner = self.unit[fence]
        return np.asarray((owner == -1) | (owner == unit_code), dtype=bool)

    def active(self, fence: I64, time: I64) -> Bools:
        """Whether each fence's time window (if any) contains the POSIX time (elementwise)."""
        kind = self._window_kind[fence]
        ok: Bools = np.asarray(kind == _WINDOW_NONE, dtype=bool)
        timed = np.flatnonzero(~ok)
        if timed.size == 0:
            return ok
        f, t, k = fence[timed], time[timed], kind[timed]
        start = self._window_start[f]
        end = self._window_end[f]
        sod = (t + _GMT8_S) % _DAY_S
        daily = np.where(start < end, (sod >= start) & (sod < end), (sod >= start) | (sod < end))
        ok[timed] = np.where(k == _WINDOW_DAILY, daily, (t >= start) & (t < end))
        return ok

    def hits(
        self,
        lon: npt.ArrayLike,
        lat: npt.ArrayLike,
        time: npt.ArrayLike | None = None,
        *,
        unit: npt.ArrayLike | None = None,
        also: npt.ArrayLike | None = None,
    ) -> Hits:
        """Every (position, fence) pair within the fence's outer shape, for arrays of positions.

        With ``time`` (POSIX seconds per position), fences whose window does not contain the
        position's time are left out; with ``unit`` (per position, a :meth:`unit_code`),
        fences bound to another unit are, except the fence ``also`` names for the position
        (an index or -1: a filing's destination may belong to another unit).  Both filters
        run before any geometry is tested.  NaN coordinates match nothing.
        """
        x = np.ascontiguousarray(lon, dtype=np.float64)
        y = np.ascontiguousarray(lat, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError("lon and lat must be 1-d arrays of the same length")
        if x.size == 0 or not self.fences:
            empty = np.zeros(0, dtype=np.int64)
            return Hits(sample=empty, fence=empty.copy(), inside=np.zeros(0, dtype=bool))
        sample, fence = self._tree.query(shapely.points(x, y))
        sample = sample.astype(np.int64, copy=False)
        fence = fence.astype(np.int64, copy=False)
        if unit is not None and self.units:
            keep = self.applies(fence, np.asarray(unit, dtype=np.int64)[sample])
            if also is not None:
                keep |= fence == np.asarray(also, dtype=np.int64)[sample]
            sample, fence = sample[keep], fence[keep]
        if time is not None and self._any_window:
            t = np.asarray(time, dtype=np.int64)
            keep = self.active(fence, t[sample])
            sample, fence = sample[keep], fence[keep]
        px, py = x[sample], y[sample]
        shape = self.shape[fence]
        keep = np.zeros(sample.size, dtype=bool)
        inside = np.zeros(sample.size, dtype=bool)

        rows = np.flatnonzero(shape == SHAPE_CIRCLE)
        if rows.size:
            f = fence[rows]
            d = distance_from_centre_m(
                px[rows],
                py[rows],
                centre_lon=self._c_lon[f],
                centre_lat=self._c_lat[f],
                m_centre=self._c_m[f],
                n_centre=self._c_n[f],
            )
            keep[rows] = d <= self._r_out[f]
            inside[rows] = d < self._r_in[f]

        rows = np.flatnonzero(shape == SHAPE_RECTANGLE)
        if rows.size:
            f = fence[rows]
            rx, ry = px[rows], py[rows]
            keep[rows] = True  # the tree box is the outer rectangle (boundary included)
            inside[rows] = (
                (rx > self._in_w[f])
                & (rx < self._in_e[f])
                & (ry > self._in_s[f])
                & (ry < self._in_n[f])
            )

        rows = np.flatnonzero(shape == SHAPE_POLYGON)
        if rows.size:
            f = fence[rows]
            rx, ry = px[rows], py[rows]
            outer = shapely.contains_xy(self._outer[f], rx, ry)
            keep[rows] = outer
            sub = rows[outer]
            if sub.size:
                inside[sub] = shapely.contains_xy(self._inner[fence[sub]], px[sub], py[sub])

        return Hits(sample=sample[keep], fence=fence[keep], inside=inside[keep])

    def speed_limits(
        self, hits: Hits, n: int, *, night: Bools | None = None
    ) -> tuple[F64, I64, I64]:
        """Per position: the lowest speed limit of the fences it is clearly inside (NaN if
        none), that fence's overspeed duration (-1 if it gives none) and its index (-1).

        ``night`` (per position) selects a fence's night limit where it has one.
        """
        limit = np.full(n, np.inf)
        duration = np.full(n, -1, dtype=np.int64)
        which = np.full(n, -1, dtype=np.int64)
        pairs = hits.inside & np.isfinite(self.max_speed_kmh[hits.fence])
        if pairs.any():
            s, f = hits.sample[pairs], hits.fence[pairs]
            value = self.max_speed_kmh[f]
            if night is not None:
                night_value = self.night_max_speed_kmh[f]
                value = np.where(night[s] & np.isfinite(night_value), night_value, value)
            np.minimum.at(limit, s, value)
            best = value == limit[s]
            which[s[best]] = f[best]
            duration[s[best]] = self.overspeed_duration_s[f[best]]
        limit[np.isinf(limit)] = np.nan
        return limit, duration, which

    def any_of(self, hits: Hits, pairs: Bools, n: int) -> tuple[Bools, Bools]:
        """Per position: (clearly inside any of the selected pairs' fences, within the outer
        shape of any of them).  ``pairs`` selects among ``hits`` (by kind, unit, ...)."""
        inside = np.zeros(n, dtype=bool)
        near = np.zeros(n, dtype=bool)
        near[hits.sample[pairs]] = True
        inside[hits.sample[pairs & hits.inside]] = True
        return inside, near
