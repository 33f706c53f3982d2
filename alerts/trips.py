"""Trip detection from the ACC bit, speed and displacement, for many vehicles at once.

Each vehicle is in one of three phases:

``PARKED``
    A trip starts at the first report with ACC on (status bit 0; ignored when
    ``require_acc`` is off) and either a speed of ``start_speed_kmh`` or a displacement of
    ``start_distance_m`` from where the vehicle parked (the *anchor*).  Both thresholds sit
    above what a parked receiver drifts: static GNSS speed noise stays under a few km/h and
    position noise under ~100 m even in urban canyons, so drift does not start trips.  An
    ACC-off report that far from the anchor (a towed vehicle) moves the anchor silently.
``MOVING``
    A report with ACC off or a speed under ``stop_speed_kmh`` makes the vehicle ``STOPPING``
    at that place and time.
``STOPPING``
    Speed again (ACC on and ``start_speed_kmh``) or leaving ``stop_radius_m`` of the stop
    resumes the trip; a report ``min_stop_s`` or more after the stop began ends the trip
    *at the stop* (end time and place are the stop's), and that report is then judged as
    ``PARKED`` -- it may start the next trip.  :meth:`TripDetector.tick` ends trips whose stop
    has lasted ``min_stop_s`` by the caller's clock when no report comes (sleeping terminals).

Distance is the odometer difference (item 0x01, 1/10 km) between the last reading before the
start and the reading at the stop, when both exist and the difference is plausible for the
elapsed time; otherwise the sum of the steps between reports while moving
(:func:`geofence.geodesy.distance_m`).

The detector is incremental: feed rows grouped by vehicle and in device-time order per vehicle
(:meth:`TripDetector.feed`), in one call or many -- the result is the same.  The loop is over
*transitions*, not rows: each round finds, for every vehicle at once, the first row that
changes its phase, so a batch costs a few whole-array passes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from geofence.geodesy import distance_m
from geofence.segments import concat_ranges, ffill_index, first_in_segment, segment_starts

__all__ = [
    "MOVING",
    "PARKED",
    "STOPPING",
    "Trip",
    "TripConfig",
    "TripDetector",
    "TripFeed",
    "TripStart",
]

I8 = npt.NDArray[np.int8]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

PARKED = 0
MOVING = 1
STOPPING = 2

_MILEAGE_M = 100  # item 0x01 counts 1/10 km
_MILEAGE_SLACK_M = 1000.0  # odometer rounding and reports between the stop and the reading


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TripConfig:
    """Thresholds of the detector (see the module docstring)."""

    require_acc: bool = True
    start_speed_kmh: float = 10.0
    start_distance_m: float = 300.0
    stop_speed_kmh: float = 5.0
    stop_radius_m: float = 150.0
    min_stop_s: int = 300
    max_speed_kmh: float = 250.0  # odometer differences beyond this average are not trusted

    def __post_init__(self) -> None:
        if self.stop_speed_kmh > self.start_speed_kmh:
            raise ValueError("stop_speed_kmh must not exceed start_speed_kmh")
        if min(self.start_distance_m, self.stop_radius_m, self.min_stop_s) < 0:
            raise ValueError("trip thresholds must not be negative")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TripStart:
    """A trip began: ``vehicle`` index, per-vehicle ``seq``, time and place it left from
    (the parking anchor), ``row``, the fed row that showed it, and ``parked_since``, since when
    the vehicle had stood there (-1 if unknown)."""

    vehicle: int
    seq: int
    started_at: int
    lon: float
    lat: float
    row: int
    parked_since: int = -1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Trip:
    """An ended trip (POSIX seconds, degrees, metres); ``row`` is the fed row that confirmed
    the end, -1 when :meth:`TripDetector.tick` did."""

    vehicle: int
    seq: int
    started_at: int
    ended_at: int
    start_lon: float
    start_lat: float
    end_lon: float
    end_lat: float
    distance_m: float
    distance_source: str  # "mileage" or "track"
    track_distance_m: float
    row: int = -1


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TripFeed:
    """Per fed row: the phase before and after it, the trip ``seq`` the vehicle is in after
    it (-1 when parked) and, when parked, since when (``parked_since``, -1 otherwise); plus the
    trips started and ended, in row order."""

    phase_before: I8
    phase: I8
    seq: I64
    parked_since: I64
    started: list[TripStart]
    ended: list[Trip]


# Per-vehicle state of a vehicle nothing is known of: (attribute, value, dtype).
_FRESH: tuple[tuple[str, float, type], ...] = (
    ("phase", PARKED, np.int8),
    ("anchor_lon", np.nan, np.float64),
    ("anchor_lat", np.nan, np.float64),
    ("stop_t", -1, np.int64),
    ("stop_mileage", -1, np.int64),
    ("seq", 0, np.int64),
    ("start_t", -1, np.int64),
    ("start_lon", np.nan, np.float64),
    ("start_lat", np.nan, np.float64),
    ("start_mileage", -1, np.int64),
    ("dist_m", 0.0, np.float64),
    ("parked_since", -1, np.int64),
    ("last_lon", np.nan, np.float64),
    ("last_lat", np.nan, np.float64),
    ("last_mileage", -1, np.int64),
)


class TripDetector:
    """Per-vehicle trip state for vehicles 0..n-1 (see the module docstring)."""

    def __init__(self, n_vehicles: int, config: TripConfig | None = None) -> None:
        self.config = config or TripConfig()
        self.n = 0
        self.phase = np.zeros(0, dtype=np.int8)
        self.anchor_lon = np.zeros(0)
        self.anchor_lat = np.zeros(0)
        self.stop_t = np.zeros(0, dtype=np.int64)
        self.stop_mileage = np.zeros(0, dtype=np.int64)
        self.seq = np.zeros(0, dtype=np.int64)
        self.start_t = np.zeros(0, dtype=np.int64)
        self.start_lon = np.zeros(0)
        self.start_lat = np.zeros(0)
        self.start_mileage = np.zeros(0, dtype=np.int64)
        self.dist_m = np.zeros(0)
        self.parked_since = np.zeros(0, dtype=np.int64)
        self.last_lon = np.zeros(0)
        self.last_lat = np.zeros(0)
        self.last_mileage = np.zeros(0, dtype=np.int64)
        self.resize(n_vehicles)

    def resize(self, n_vehicles: int) -> None:
        """Track ``n_vehicles`` (new ones start parked, place unknown)."""
        if n_vehicles < self.n:
            raise ValueError("vehicles cannot be removed; mark them exempt instead")
        extra = n_vehicles - self.n

        def grow(arr: npt.NDArray[np.generic], fill: float) -> npt.NDArray[np.generic]:
            return np.concatenate([arr, np.full(extra, fill, dtype=arr.dtype)])

        for name, fill, dtype in _FRESH:
            setattr(self, name, grow(getattr(self, name), fill).astype(dtype))
        self.n = n_vehicles

    def state_of(self, vehicles: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.generic]]:
        """The trip state of ``vehicles`` (for :meth:`restore`)."""
        return {name: getattr(self, name)[vehicles] for name, _, _ in _FRESH}

    def restore(
        self, vehicles: npt.NDArray[np.int64], state: dict[str, npt.NDArray[np.generic]]
    ) -> None:
        """Put back :meth:`state_of` for ``vehicles`` (in the same order)."""
        for name, _, _ in _FRESH:
            getattr(self, name)[vehicles] = state[name]

    def reset(self, vehicles: npt.NDArray[np.int64]) -> None:
        """Forget what is known of ``vehicles`` (parked, place unknown), as for a new vehicle;
        their trip numbers go on."""
        for name, fill, _ in _FRESH:
            if name != "seq":
                getattr(self, name)[vehicles] = fill

    # -----------------------------------------------------------------------------------------

    def feed(
        self,
        vehicle: I64,
        time: I64,
        lon: F64,
        lat: F64,
        speed_kmh: F64,
        *,
        acc: Bools,
        fixed: Bools,
        mileage: I64,
    ) -> TripFeed:
        """Feed rows grouped by ``vehicle``, time-ordered per vehicle (see the module doc).

        ``fixed`` marks rows with a GNSS fix (status bit 1): only those move anchors and add
        distance.  ``mileage`` is item 0x01 (1/10 km) or -1.
        """
        cfg = self.config
        n = vehicle.size
        starts = segment_starts(vehicle)
        seg_first = np.flatnonzero(starts)
        seg_v = vehicle[seg_first]
        seg_end = np.append(seg_first[1:], n)
        acc_ok = acc if cfg.require_acc else np.ones(n, dtype=bool)

        # Last fixed position and last odometer reading at or before each row.
        fix_at = ffill_index(fixed, starts)
        has_fix = fix_at >= 0
        carried = vehicle
        pos_lon = np.where(has_fix, lon[np.maximum(fix_at, 0)], self.last_lon[carried])
        pos_lat = np.where(has_fix, lat[np.maximum(fix_at, 0)], self.last_lat[carried])
        mil_at = ffill_index(mileage >= 0, starts)
        mil_ff = np.where(mil_at >= 0, mileage[np.maximum(mil_at, 0)], self.last_mileage[carried])
        mil_before = np.empty(n, dtype=np.int64)
        if n:
            mil_before[1:] = mil_ff[:-1]
            mil_before[starts] = self.last_mileage[vehicle[starts]]

        # Vehicles seen for the first time: anchor at their first fixed position.
        first_fix = first_in_segment(fixed, starts)
        fv = vehicle[first_fix]
        unknown = np.isnan(self.anchor_lon[fv]) & (self.phase[fv] == PARKED)
        self.anchor_lon[fv[unknown]] = lon[first_fix[unknown]]
        self.anchor_lat[fv[unknown]] = lat[first_fix[unknown]]
        new_parked = self.parked_since[seg_v] < 0
        self.parked_since[seg_v[new_parked & (self.phase[seg_v] == PARKED)]] = time[
            seg_first[new_parked & (self.phase[seg_v] == PARKED)]
        ]

        phase_out = np.empty(n, dtype=np.int8)
        phase_before = np.full(n, -1, dtype=np.int8)  # set once: a re-judged row keeps its first
        seq_out = np.empty(n, dtype=np.int64)
        since_out = np.empty(n, dtype=np.int64)
        seq_at_entry = self.seq.copy()
        dist_at_entry = self.dist_m.copy()
        started: list[TripStart] = []
        ended_rows: list[tuple[int, int, int]] = []  # (row, vehicle, seq) for distance fill-in
        ended_partial: list[dict[str, float | int]] = []

        cursor = seg_first.copy()
        active = np.arange(seg_first.size)
        while active.size:
            count = seg_end[active] - cursor[active]
            active, count = active[count > 0], count[count > 0]
            if not active.size:
                break
            rows = concat_ranges(cursor[active], count)
            seg = np.repeat(active, count)
            v = seg_v[seg]
            ph = self.phase[v]
            sp = speed_kmh[rows]
            ac = acc_ok[rows]
            fx = fixed[rows]
            tt = time[rows]
            d = distance_m(self.anchor_lon[v], self.anchor_lat[v], lon[rows], lat[rows])
            d = np.where(fx & np.isfinite(d), d, 0.0)
            fast = ac & (sp >= cfg.start_speed_kmh)
            far = d >= cfg.start_distance_m
            hit = np.where(
                ph == PARKED,
                (ac & (fast | far)) | (~ac & far),
                np.where(
                    ph == MOVING,
                    ~ac | (sp < cfg.stop_speed_kmh),
                    fast | (d > cfg.stop_radius_m) | (tt - self.stop_t[v] >= cfg.min_stop_s),
                ),
            )
            group_starts = segment_starts(seg)
            first = first_in_segment(hit, group_starts)
            limit = np.full(seg_first.size, np.iinfo(np.int64).max, dtype=np.int64)
            limit[seg[first]] = first
            fill = np.arange(rows.size) < limit[seg]
            fr, fph, fv2 = rows[fill], ph[fill], v[fill]
            phase_out[fr] = fph
            phase_before[fr] = np.where(phase_before[fr] < 0, fph, phase_before[fr])
            seq_out[fr] = np.where(fph == PARKED, -1, self.seq[fv2])
            since_out[fr] = np.where(fph == PARKED, self.parked_since[fv2], -1)

            # Apply each vehicle's transition at its first hit.
            hrow, hv, hph, hseg = rows[first], v[first], ph[first], seg[first]
            phase_before[hrow] = np.where(phase_before[hrow] < 0, hph, phase_before[hrow])
            consumed = np.ones(first.size, dtype=bool)
            hac = acc_ok[hrow]
            start = (hph == PARKED) & hac
            move_anchor = (hph == PARKED) & ~hac
            stop = hph == MOVING
            confirm = (hph == STOPPING) & (time[hrow] - self.stop_t[hv] >= cfg.min_stop_s)
            resume = (hph == STOPPING) & ~confirm

            if start.any():
                r, vv = hrow[start], hv[start]
                self.seq[vv] += 1
                self.start_t[vv] = time[r]
                known = np.isfinite(self.anchor_lon[vv])
                self.start_lon[vv] = np.where(known, self.anchor_lon[vv], pos_lon[r])
                self.start_lat[vv] = np.where(known, self.anchor_lat[vv], pos_lat[r])
                self.start_mileage[vv] = np.where(mil_before[r] >= 0, mil_before[r], mil_ff[r])
                self.dist_m[vv] = 0.0
                self.phase[vv] = MOVING
                started.extend(
                    TripStart(
                        vehicle=int(a),
                        seq=int(b),
                        started_at=int(c),
                        lon=float(x),
                        lat=float(y),
                        row=int(row),
                        parked_since=int(p),
                    )
                    for a, b, c, x, y, row, p in zip(
                        vv.tolist(),
                        self.seq[vv].tolist(),
                        self.start_t[vv].tolist(),
                        self.start_lon[vv].tolist(),
                        self.start_lat[vv].tolist(),
                        r.tolist(),
                        self.parked_since[vv].tolist(),
                        strict=True,
                    )
                )
                self.parked_since[vv] = -1
            if move_anchor.any():
                r, vv = hrow[move_anchor], hv[move_anchor]
                self.anchor_lon[vv] = lon[r]
                self.anchor_lat[vv] = lat[r]
            if stop.any():
                r, vv = hrow[stop], hv[stop]
                self.phase[vv] = STOPPING
                self.stop_t[vv] = time[r]
                self.anchor_lon[vv] = pos_lon[r]
                self.anchor_lat[vv] = pos_lat[r]
                self.stop_mileage[vv] = mil_ff[r]
            if resume.any():
                self.phase[hv[resume]] = MOVING
            if confirm.any():
                r, vv = hrow[confirm], hv[confirm]
                consumed[confirm] = False
                for row, veh in zip(r.tolist(), vv.tolist(), strict=True):
                    ended_rows.append((row, veh, int(self.seq[veh])))
                    ended_partial.append(self._trip_fields(veh))
                self.phase[vv] = PARKED
                self.parked_since[vv] = self.stop_t[vv]

            after = self.phase[hv]
            phase_out[hrow] = after
            seq_out[hrow] = np.where(after == PARKED, -1, self.seq[hv])
            since_out[hrow] = np.where(after == PARKED, self.parked_since[hv], -1)
            cursor[hseg] = np.where(consumed, hrow + 1, hrow)
            active = hseg

        # Track distance: steps into rows while moving (and the step that reached the stop).
        prev_phase = np.empty(n, dtype=np.int8)
        if n:
            prev_phase[1:] = phase_out[:-1]
            prev_phase[starts] = phase_before[starts]
        prev_lon = np.empty(n)
        prev_lat = np.empty(n)
        if n:
            prev_lon[1:], prev_lat[1:] = pos_lon[:-1], pos_lat[:-1]
            prev_lon[starts] = self.last_lon[vehicle[starts]]
            prev_lat[starts] = self.last_lat[vehicle[starts]]
        counted = fixed & (seq_out >= 0)
        counted &= (phase_out == MOVING) | ((phase_out == STOPPING) & (prev_phase == MOVING))
        step = np.zeros(n)
        if counted.any():
            c = np.flatnonzero(counted)
            s = distance_m(prev_lon[c], prev_lat[c], lon[c], lat[c])
            step[c] = np.where(np.isfinite(s), s, 0.0)
        code = vehicle * (1 << 32) + np.maximum(seq_out, 0)
        rows_c = np.flatnonzero(counted)
        sums: dict[int, float] = {}
        if rows_c.size:
            codes = code[rows_c]
            bounds = np.flatnonzero(segment_starts(codes))
            totals = np.add.reduceat(step[rows_c], bounds)
            for k, total in zip(codes[bounds].tolist(), totals.tolist(), strict=True):
                sums[k] = sums.get(k, 0.0) + total

        def batch_distance(veh: int, seq: int) -> float:
            return sums.get(veh * (1 << 32) + seq, 0.0)

        ended: list[Trip] = []
        for (row, veh, seq), fields in zip(ended_rows, ended_partial, strict=True):
            before = float(dist_at_entry[veh]) if seq == seq_at_entry[veh] else 0.0
            ended.append(self._make_trip(veh, seq, row, fields, before + batch_distance(veh, seq)))

        # Carry per vehicle seen.
        for veh in seg_v[self.phase[seg_v] != PARKED].tolist():
            seq = int(self.seq[veh])
            before = float(dist_at_entry[veh]) if seq == seq_at_entry[veh] else 0.0
            self.dist_m[veh] = before + batch_distance(veh, seq)
        last = seg_end - 1
        self.last_lon[seg_v] = pos_lon[last]
        self.last_lat[seg_v] = pos_lat[last]
        self.last_mileage[seg_v] = mil_ff[last]
        return TripFeed(
            phase_before=phase_before,
            phase=phase_out,
            seq=seq_out,
            parked_since=since_out,
            started=started,
            ended=ended,
        )

    def _trip_fields(self, veh: int) -> dict[str, float | int]:
        return {
            "started_at": int(self.start_t[veh]),
            "ended_at": int(self.stop_t[veh]),
            "start_lon": float(self.start_lon[veh]),
            "start_lat": float(self.start_lat[veh]),
            "end_lon": float(self.anchor_lon[veh]),
            "end_lat": float(self.anchor_lat[veh]),
            "start_mileage": int(self.start_mileage[veh]),
            "end_mileage": int(self.stop_mileage[veh]),
        }

    def _make_trip(
        self, veh: int, seq: int, row: int, f: dict[str, float | int], track: float
    ) -> Trip:
        distance, source = track, "track"
        m0, m1 = int(f["start_mileage"]), int(f["end_mileage"])
        if m0 >= 0 and m1 >= 0:
            odo = (m1 - m0) * _MILEAGE_M
            hours = max(int(f["ended_at"]) - int(f["started_at"]), 0) / 3600
            if 0 <= odo <= self.config.max_speed_kmh * 1000 * hours + _MILEAGE_SLACK_M:
                distance, source = float(odo), "mileage"
        return Trip(
            vehicle=veh,
            seq=seq,
            started_at=int(f["started_at"]),
            ended_at=int(f["ended_at"]),
            start_lon=float(f["start_lon"]),
            start_lat=float(f["start_lat"]),
            end_lon=float(f["end_lon"]),
            end_lat=float(f["end_lat"]),
            distance_m=distance,
            distance_source=source,
            track_distance_m=track,
            row=row,
        )

    def tick(self, now: int) -> list[Trip]:
        """End the trips whose stop has lasted ``min_stop_s`` by ``now`` (POSIX seconds)."""
        due = np.flatnonzero(
            (self.phase == STOPPING) & (now - self.stop_t >= self.config.min_stop_s)
        )
        ended = []
        for veh in due.tolist():
            fields = self._trip_fields(veh)
            ended.append(
                self._make_trip(veh, int(self.seq[veh]), -1, fields, float(self.dist_m[veh]))
            )
            self.phase[veh] = PARKED
            self.parked_since[veh] = self.stop_t[veh]
        return ended
