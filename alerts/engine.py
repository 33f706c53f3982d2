"""The rule engine: batches of positions in, alert records and trips out.

:class:`RuleEngine` holds the master data (vehicles, fences, filings, calendar, rules), a
per-vehicle state in numpy arrays, and an :class:`~alerts.lifecycle.AlertStore`.  The wiring
calls three things:

* :meth:`RuleEngine.process` with a :class:`~alerts.model.PositionBatch` (any order, any mix
  of vehicles).  Rows are sorted by (vehicle, device time); each vehicle's rows must come
  after the ones it already evaluated -- an older row is *late* and is counted and skipped
  (``hold_s`` holds rows back to let back-filled reports of a blind spot slot in first);
* :meth:`RuleEngine.add_filings` / :meth:`RuleEngine.remove_filings` when filings change;
* :meth:`RuleEngine.tick` with the clock, for what only the passing of time reveals: the
  back-filing deadline, a terminal gone silent, a trip whose stop has lasted, a vehicle that
  did not come back.

Each returns an :class:`EngineResult`: the alert records created or changed (in the order of
their data time -- the SSE stream's events), the trips that started and ended (the trips
table) and counters.

How a batch is evaluated (everything per row is a numpy pass over the whole batch; Python
runs only per *transition* -- a trip start, an episode opening or closing):

1. containment of every fixed position against every fence at once (:class:`FenceIndex`);
2. the covering filing of every row (a sorted search), the sealed flag (a day table);
3. trips (:class:`~alerts.trips.TripDetector`);
4. per rule, a boolean "episode active" per row, whose edges open and close alerts.

Everything is judged at the device's time in the report, so replaying the same positions
gives the same alerts, and every record's times come from the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from alerts.calendar import WorkingCalendar, posix
from alerts.lifecycle import (
    Alert,
    AlertStore,
    InMemoryAlertStore,
    Lifecycle,
    episode_id,
    to_datetime,
)
from alerts.model import Filing, PositionBatch, Registry
from alerts.rules import (
    AlertState,
    ForbiddenZoneRule,
    HolidaySealingRule,
    OutOfAreaRule,
    OverdueReturnRule,
    OvernightParkingRule,
    OverspeedRule,
    RulesConfig,
    TerminalOfflineRule,
    TerminalTamperRule,
    UnfiledTripRule,
)
from alerts.trips import PARKED, TripConfig, TripDetector, TripFeed
from geofence.hysteresis import INSIDE, OUTSIDE, FenceTracker, debounce, signal_from
from geofence.index import KIND_CODE, FenceIndex, Hits
from geofence.model import Fence, FenceKind
from geofence.segments import ffill_index, run_begin, segment_ends, segment_starts
from protocol.batch import TIME_ABSENT
from protocol.messages.location import STATUS_ACC_ON, STATUS_FIXED

__all__ = ["EngineResult", "RuleEngine", "TripRecord"]

I8 = npt.NDArray[np.int8]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

_GMT8_S = 8 * 3600
_DAY_S = 86400
_VEHICLE_SHIFT = 1 << 33  # sort keys: vehicle * 2**33 + POSIX seconds (good until 2242)
_NONE = -1

# The judged per-vehicle state and its value for a vehicle nothing is known of: (attribute,
# value).  RuleEngine._alloc grows these; RuleEngine._reset forgets them for some vehicles.
_FRESH_STATE: tuple[tuple[str, Any], ...] = (
    ("last_t", _NONE),  # device time of the last evaluated row
    ("max_t", _NONE),  # latest device time received (hold_s)
    ("last_acc", False),
    ("oa_state", 0),  # out_of_area debounce
    ("oa_sign", 0),
    ("oa_len", 0),
    ("oa_transit", _NONE),  # start of a filed transit stretch
    ("os_since", _NONE),  # start of the current overspeed run
    ("tamper_bits", 0),
    ("park_near_last", True),  # last fix near its parking
    ("away", _NONE),  # filing a vehicle left under, until back home
    ("home_last", True),
    ("sealed_trip", _NONE),  # trip already judged sealed
)

# Held rows (``hold_s``) are capped: past this many the oldest are evaluated anyway.  A
# million rows is 50 minutes of a 10,000-vehicle fleet reporting every 30 s, about 60 MB.
_MAX_HELD_ROWS = 1_000_000

# JT/T 808-2019 table 24 bit names, for alert details.
_ALARM_NAMES = {
    4: "gnss_module_fault",
    5: "gnss_antenna_cut",
    6: "gnss_antenna_short",
    7: "power_undervoltage",
    8: "power_cut",
    27: "illegal_ignition",
    28: "illegal_displacement",
}

_PERMITTED = KIND_CODE[FenceKind.PERMITTED]
_FORBIDDEN = KIND_CODE[FenceKind.FORBIDDEN]
_PARKING = KIND_CODE[FenceKind.PARKING]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TripRecord:
    """A trip for the trips table (``ended_at`` None while it runs)."""

    vehicle: int
    phone: str
    seq: int
    started_at: datetime
    start_lon: float
    start_lat: float
    ended_at: datetime | None = None
    end_lon: float | None = None
    end_lat: float | None = None
    distance_km: float | None = None
    distance_source: str | None = None
    filing: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("started_at", "ended_at"):
            value = out[key]
            out[key] = None if value is None else value.isoformat()
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EngineResult:
    """What one call produced; see the module docstring."""

    alerts: list[Alert]
    trips_started: list[TripRecord]
    trips_ended: list[TripRecord]
    evaluated: int = 0  # rows judged
    late: int = 0  # rows not newer than their vehicle's last judged row (skipped)
    rejudged: int = 0  # vehicles judged again from an earlier time (RuleEngine.rejudge)
    ignored: int = 0  # unknown or exempt vehicles, no device time
    held: int = 0  # rows waiting in the hold_s window


class _Filings:
    """Filings as sorted arrays for a vectorised "which filing covers (vehicle, time)".

    A filing covers a time from ``max(start - early, filed_at)`` -- it cannot cover anything
    before it reached the platform; earlier uses are back-filed through the lifecycle -- to
    ``end + late``, and a version of it only until the next version came (``superseded_at``):
    each moment is judged by the version in force then.  Among the filings covering a time,
    the one ending last is given.
    """

    def __init__(
        self,
        filings: Iterable[Filing],
        registry: Registry,
        fences: FenceIndex,
        *,
        early_s: int,
        late_s: int,
    ) -> None:
        rows = []
        filed_ends = set()  # (filing, filed end) of the versions in force now
        for f in filings:
            index = registry.index_of_id.get(f.vehicle)
            if index is None:
                continue
            if f.superseded_at is None:
                filed_ends.add((f.id, posix(f.end)))
            start = max(posix(f.start) - early_s, posix(f.filed_at))
            end = posix(f.end) + late_s
            if f.superseded_at is not None:
                end = min(end, posix(f.superseded_at) - 1)
            dest = -1
            if f.destination_fence is not None:
                dest = fences.position_of_id.get(f.destination_fence, -1)
            rows.append((index, start, end, f.id, dest))
        rows = [r for r in rows if r[1] <= r[2]]
        rows.sort()
        self.vehicle = np.array([r[0] for r in rows], dtype=np.int64)
        self.start = np.array([r[1] for r in rows], dtype=np.int64)
        self.end = np.array([r[2] for r in rows], dtype=np.int64)
        self.id = np.array([r[3] for r in rows], dtype=np.int64)
        self.dest = np.array([r[4] for r in rows], dtype=np.int64)
        self.key = self.vehicle * _VEHICLE_SHIFT + self.start
        # Running max of end within each vehicle's filings, and which filing holds it.
        value = self.vehicle * (1 << 40) + self.end
        running = np.maximum.accumulate(value) if value.size else value
        holder = np.where(value == running, np.arange(value.size), 0)
        self.best = np.maximum.accumulate(holder) if holder.size else holder
        # Filed end per filing id (overdue deadlines), without the slack: the version in force
        # (even one that covers nothing: filed after its window).
        by_id = sorted(filed_ends)
        self._ids = np.array([r[0] for r in by_id], dtype=np.int64)
        self._ends = np.array([r[1] for r in by_id], dtype=np.int64)

    def lookup(self, vehicle: I64, time: I64) -> I64:
        """Position of the covering filing per row, or -1."""
        if self.key.size == 0:
            return np.full(vehicle.size, _NONE, dtype=np.int64)
        k = np.searchsorted(self.key, vehicle * _VEHICLE_SHIFT + time, side="right") - 1
        kk = np.maximum(k, 0)
        best = self.best[kk]
        ok = (k >= 0) & (self.vehicle[kk] == vehicle) & (self.end[best] >= time)
        return np.where(ok, best, _NONE)

    def take(self, column: I64, position: I64) -> I64:
        """``column`` at each position, -1 where the position is -1."""
        if column.size == 0:
            return np.full(position.size, _NONE, dtype=np.int64)
        return np.where(position >= 0, column[np.maximum(position, 0)], _NONE)

    def filed_end(self, filing_id: I64) -> I64:
        """Filed end (POSIX) per filing id; a huge value for ids not known (never overdue)."""
        never = np.iinfo(np.int64).max // 2
        if self._ids.size == 0:
            return np.full(filing_id.size, never, dtype=np.int64)
        at = np.clip(np.searchsorted(self._ids, filing_id), 0, self._ids.size - 1)
        return np.where(self._ids[at] == filing_id, self._ends[at], never)


def _shift(values: npt.NDArray[Any], starts: Bools, first: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Each row's previous row in its segment; ``first`` (per row) for segment starts."""
    out = np.empty_like(values)
    if values.size:
        out[1:] = values[:-1]
        out[starts] = first[starts]
    return out


def _window_start(time: I64, start_s: int) -> I64:
    """POSIX start of the latest daily window (China time) that began at or before ``time``."""
    local = time + _GMT8_S
    begin = local // _DAY_S * _DAY_S + start_s
    begin = np.where(begin > local, begin - _DAY_S, begin)
    return begin - _GMT8_S


def _seconds(value: Any) -> int:
    return int(value.hour) * 3600 + int(value.minute) * 60 + int(value.second)


class RuleEngine:
    """See the module docstring.

    ``registry`` vehicles are addressed by index in batches; a new registry must keep the
    indices of the old one (append only).  ``store`` defaults to an
    :class:`InMemoryAlertStore`; its open alerts are taken as the episodes in progress, so an
    engine restarted on the same store closes them instead of opening duplicates.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        fences: Sequence[Fence] | FenceIndex,
        calendar: WorkingCalendar,
        config: RulesConfig | None = None,
        trip_config: TripConfig | None = None,
        store: AlertStore | None = None,
        filings: Iterable[Filing] = (),
        hold_s: int = 0,
    ) -> None:
        self.config = config or RulesConfig()
        self.calendar = calendar
        self.store: AlertStore = store if store is not None else InMemoryAlertStore()
        self.lifecycle = Lifecycle(
            self.store, early_s=self.config.filing_early_s, late_s=self.config.filing_late_s
        )
        if hold_s < 0:
            raise ValueError("hold_s must not be negative")
        self.hold_s = hold_s
        self.trips = TripDetector(0, trip_config)
        self.tracker = FenceTracker(samples=self.config.forbidden_zone.samples)
        self.registry = Registry(())
        self.index = (
            fences
            if isinstance(fences, FenceIndex)
            else FenceIndex(fences, margin_m=self.config.margin_m)
        )
        self._filing_map: dict[tuple[int, int], Filing] = {f.key: f for f in filings}
        self._filings_of: dict[int, list[Filing]] = {}
        for f in self._filing_map.values():
            self._filings_of.setdefault(f.vehicle, []).append(f)
        self._filings: _Filings | None = None
        # Open episodes: (rule, vehicle index, key) -> alert id, and the keys per (rule, index).
        self._episodes: dict[tuple[str, int, int], str] = {}
        self._keys: dict[tuple[str, int], set[int]] = {}
        self._held: dict[str, npt.NDArray[Any]] | None = None
        # Ids of the vehicles this engine judges when several engines share the fleet (each
        # alert's clock- and filing-driven changes are then made by its vehicle's engine
        # only); None: every vehicle.
        self.judged_ids: set[int] | None = None
        self._n = 0
        self.last_t: I64 = np.zeros(0, dtype=np.int64)
        self.last_heard: I64 = np.zeros(0, dtype=np.int64)  # receipt time of the latest row
        self.max_t: I64 = np.zeros(0, dtype=np.int64)
        self.last_acc: Bools = np.zeros(0, dtype=bool)
        self.oa_state: I8 = np.zeros(0, dtype=np.int8)
        self.oa_sign: I8 = np.zeros(0, dtype=np.int8)
        self.oa_len: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self.oa_transit: I64 = np.zeros(0, dtype=np.int64)
        self.os_since: I64 = np.zeros(0, dtype=np.int64)
        self.tamper_bits: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self.park_near_last: Bools = np.zeros(0, dtype=bool)
        self.away: I64 = np.zeros(0, dtype=np.int64)
        self.home_last: Bools = np.zeros(0, dtype=bool)
        self.sealed_trip: I64 = np.zeros(0, dtype=np.int64)
        self.exempt: Bools = np.zeros(0, dtype=bool)
        self.unit_code: I64 = np.zeros(0, dtype=np.int64)
        self.speed_default: F64 = np.zeros(0)
        self.has_perm: Bools = np.zeros(0, dtype=bool)
        self.has_park: Bools = np.zeros(0, dtype=bool)
        self.set_registry(registry)
        self._load_open_episodes()

    # -----------------------------------------------------------------------------------------
    # Master data

    def _alloc(self, n: int) -> None:
        """Grow the per-vehicle state to ``n`` vehicles (new ones: nothing known)."""
        extra = n - self._n

        def grow(old: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
            return np.concatenate([old, np.full(extra, fill, dtype=old.dtype)])

        for name, fill in _FRESH_STATE:
            setattr(self, name, grow(getattr(self, name), fill))
        self.last_heard = grow(self.last_heard, _NONE)
        self._n = n

    def _reset(self, vehicles: I64) -> None:
        """Forget what was judged of ``vehicles`` (state, trips in progress, fence states,
        open episodes); when they were last heard is kept."""
        for name, fill in _FRESH_STATE:
            getattr(self, name)[vehicles] = fill
        self.trips.reset(vehicles)
        self.tracker.forget(vehicles)
        chosen = set(vehicles.tolist())
        for key in [k for k in self._episodes if k[1] in chosen]:
            del self._episodes[key]
        for rule_key in [k for k in self._keys if k[1] in chosen]:
            del self._keys[rule_key]
        if self._held is not None:
            keep = ~np.isin(self._held["vehicle"], vehicles)
            self._held = {k: a[keep] for k, a in self._held.items()}

    def export_state(self, vehicles: I64) -> dict[str, npt.NDArray[Any]]:
        """What is judged of ``vehicles`` (registry indices), as arrays keyed by vehicle id so
        that another engine (or this one after a restart) takes it back with
        :meth:`import_state` and continues exactly where this one stopped."""
        vehicles = np.asarray(vehicles, dtype=np.int64)
        ids = np.array([self.registry[i].id for i in vehicles.tolist()], dtype=np.int64)
        out: dict[str, npt.NDArray[Any]] = {"vehicle_id": ids}
        for name, _ in _FRESH_STATE:
            out[name] = getattr(self, name)[vehicles]
        out["last_heard"] = self.last_heard[vehicles]
        for name, value in self.trips.state_of(vehicles).items():
            out[f"trip_{name}"] = value
        pairs = self.tracker.pairs_of(vehicles)
        fence_ids = np.array([f.id for f in self.index.fences], dtype=np.int64)
        out["fence_vehicle_id"] = np.array(
            [self.registry[i].id for i in pairs.pop("object").tolist()], dtype=np.int64
        )
        out["fence_id"] = fence_ids[pairs.pop("fence")]
        for name, value in pairs.items():
            out[f"fence_{name}"] = value
        chosen = set(vehicles.tolist())
        episodes = [(k, v) for k, v in self._episodes.items() if k[1] in chosen]
        out["episode_vehicle_id"] = np.array(
            [self.registry[k[1]].id for k, _ in episodes], dtype=np.int64
        )
        out["episode_rule"] = np.array([k[0] for k, _ in episodes], dtype=str)
        out["episode_key"] = np.array([k[2] for k, _ in episodes], dtype=np.int64)
        out["episode_id"] = np.array([v for _, v in episodes], dtype=str)
        return out

    def import_state(self, state: Mapping[str, npt.NDArray[Any]]) -> I64:
        """Take back what :meth:`export_state` gave (vehicles no longer registered are left
        out); returns the registry indices restored."""
        index_of = self.registry.index_of_id
        ids = state["vehicle_id"].tolist()
        rows = np.array([i for i, vid in enumerate(ids) if vid in index_of], dtype=np.int64)
        vehicles = np.array([index_of[ids[i]] for i in rows.tolist()], dtype=np.int64)
        self._reset(vehicles)
        for name, _ in _FRESH_STATE:
            getattr(self, name)[vehicles] = state[name][rows]
        self.last_heard[vehicles] = np.maximum(self.last_heard[vehicles], state["last_heard"][rows])
        self.trips.restore(
            vehicles, {k[5:]: v[rows] for k, v in state.items() if k.startswith("trip_")}
        )
        fence_at = self.index.position_of_id
        pair_ids = state["fence_vehicle_id"].tolist()
        fence_ids = state["fence_id"].tolist()
        keep = [
            vid in index_of and fid in fence_at
            for vid, fid in zip(pair_ids, fence_ids, strict=True)
        ]
        if any(keep):
            mask = np.array(keep, dtype=bool)
            self.tracker.restore(
                {
                    "object": np.array(
                        [index_of[v] for v, k in zip(pair_ids, keep, strict=True) if k],
                        dtype=np.int64,
                    ),
                    "fence": np.array(
                        [fence_at[f] for f, k in zip(fence_ids, keep, strict=True) if k],
                        dtype=np.int64,
                    ),
                    **{
                        name: state[f"fence_{name}"][mask]
                        for name in ("state", "run_sign", "run_len", "since")
                    },
                }
            )
        for vid, rule, key, alert_id in zip(
            state["episode_vehicle_id"].tolist(),
            state["episode_rule"].tolist(),
            state["episode_key"].tolist(),
            state["episode_id"].tolist(),
            strict=True,
        ):
            index = index_of.get(vid)
            if index is not None:
                self._episodes[(rule, index, key)] = alert_id
                self._keys.setdefault((rule, index), set()).add(key)
        return vehicles

    def reapply_filings(self, vehicle_ids: Iterable[int]) -> EngineResult:
        """Apply the known filings of these vehicles to their alerts again (an engine taking
        vehicles over catches up with filings that came while nobody judged them)."""
        changed: list[Alert] = []
        for vehicle_id in vehicle_ids:
            for filing in self._filings_of.get(vehicle_id, ()):
                changed.extend(self.lifecycle.add_filing(filing))
        return EngineResult(alerts=_ordered(changed), trips_started=[], trips_ended=[])

    def resume(self, vehicles: I64) -> None:
        """Start judging ``vehicles`` afresh but for their episodes open in the store, which
        go on (vehicles taken over with no saved state: their earlier alerts were raised
        before the engines kept one)."""
        chosen = np.asarray(vehicles, dtype=np.int64)
        self._reset(chosen)
        ids = {self.registry[i].id for i in chosen.tolist()}
        for alert in self.store.open_alerts():
            if alert.vehicle in ids:
                self._resume_episode(alert)

    def forget(self, vehicles: I64) -> None:
        """Stop judging ``vehicles`` (another engine took them): their state is dropped."""
        self._reset(np.asarray(vehicles, dtype=np.int64))

    def rejudge(
        self,
        vehicles: Sequence[int],
        since: datetime | int,
        batch: PositionBatch,
        *,
        until: datetime | int | None = None,
    ) -> EngineResult:
        """Judge ``vehicles`` again from ``since`` on, over ``batch``: every stored position of
        theirs from ``since`` up to now, late arrivals included (a blind-area upload, a spool
        replay, a re-run of a past period).

        Their state is forgotten and rebuilt from ``batch``; episodes opened before ``since``
        are resumed from the store (they go on), those opened since are found again (ids are
        deterministic, so an alert judged before is not duplicated) and an open episode the
        new judgement no longer finds is closed as superseded.  Rows of other vehicles in
        ``batch`` are ignored.  ``until`` (a re-run of a past period) ends the period: rows
        from then on are ignored and alerts opened from then on are left alone.
        """
        since_s = posix(since)
        until_s = None if until is None else posix(until)
        chosen = np.unique(np.asarray(vehicles, dtype=np.int64))
        chosen = chosen[(chosen >= 0) & (chosen < self._n)]
        self._reset(chosen)
        members = set(chosen.tolist())
        before: list[Alert] = []
        for alert in self.store.open_alerts():
            index = self.registry.index_of_id.get(alert.vehicle)
            if index in members and posix(alert.opened_at) < since_s:
                before.append(alert)
        for alert in before:
            self._resume_episode(alert)
        mine = np.isin(batch.vehicle, chosen) & (batch.time >= since_s)
        if until_s is not None:
            mine &= batch.time < until_s
        result = self.process(batch.take(mine))
        found = set(self._episodes.values())
        superseded: list[Alert] = []
        for alert in self.store.open_alerts():
            index = self.registry.index_of_id.get(alert.vehicle)
            opened = posix(alert.opened_at)
            if (
                index in members
                and alert.id not in found
                and opened >= since_s
                and (until_s is None or opened < until_s)
            ):
                closed = self.lifecycle.close_episode(
                    alert.id,
                    at=posix(alert.opened_at),
                    state=AlertState.RESOLVED,
                    detail={"superseded": True},
                )
                if closed is not None:
                    superseded.append(closed)
        return dataclasses.replace(
            result, alerts=_ordered([*result.alerts, *superseded]), rejudged=int(chosen.size)
        )

    def set_registry(self, registry: Registry) -> None:
        """Replace the vehicles (append-only: existing indices keep their vehicle)."""
        old = self.registry
        for i, vehicle in enumerate(old.vehicles[: len(registry)]):
            if registry[i].id != vehicle.id:
                raise ValueError(
                    f"vehicle index {i} changed from id {vehicle.id} to {registry[i].id}"
                )
        if len(registry) < len(old):
            raise ValueError("vehicles cannot be removed from the registry; mark them exempt")
        self.registry = registry
        self._alloc(len(registry))
        self.trips.resize(len(registry))
        self._vehicle_info()
        self._filings = None

    def set_fences(self, fences: Sequence[Fence] | FenceIndex) -> None:
        """Replace the fence set; tracked forbidden-zone stays follow fences by id."""
        new = (
            fences
            if isinstance(fences, FenceIndex)
            else FenceIndex(fences, margin_m=self.config.margin_m)
        )
        moved = np.array(
            [new.position_of_id.get(f.id, -1) for f in self.index.fences], dtype=np.int64
        )
        self.tracker.remap(moved)
        self.index = new
        self._vehicle_info()
        self._filings = None

    def _vehicle_info(self) -> None:
        index = self.index
        vehicles = self.registry.vehicles
        self.exempt = np.array([v.exempt for v in vehicles], dtype=bool)
        self.unit_code = np.array([index.unit_code(v.unit) for v in vehicles], dtype=np.int64)
        default = self.config.overspeed.default_limit_kmh
        self.speed_default = np.array(
            [default if v.max_speed_kmh is None else v.max_speed_kmh for v in vehicles],
            dtype=np.float64,
        )

        def having(kind: int) -> Bools:
            owners = index.unit[index.kind == kind]
            if (owners == -1).any():
                return np.ones(len(vehicles), dtype=bool)
            return np.isin(self.unit_code, owners)

        self.has_perm = having(_PERMITTED)
        self.has_park = having(_PARKING)

    def add_filings(self, filings: Iterable[Filing]) -> EngineResult:
        """Add or replace filings; back-filing alerts they cover are resolved."""
        changed: list[Alert] = []
        for filing in filings:
            old = self._filing_map.get(filing.key)
            if old is not None:
                self._filings_of[old.vehicle].remove(old)
            self._filing_map[filing.key] = filing
            self._filings_of.setdefault(filing.vehicle, []).append(filing)
            if self.judged_ids is None or filing.vehicle in self.judged_ids:
                changed.extend(self.lifecycle.add_filing(filing))
        self._filings = None
        return EngineResult(alerts=_ordered(changed), trips_started=[], trips_ended=[])

    def remove_filings(self, filings: Iterable[int | tuple[int, int]]) -> None:
        """Forget filings (cancelled): every version of a filing id, or one version by its
        :attr:`Filing.key`.  Alerts they already resolved stay resolved."""
        for which in filings:
            keys = (
                [which]
                if isinstance(which, tuple)
                else [k for k in self._filing_map if k[0] == which]
            )
            for key in keys:
                old = self._filing_map.pop(key, None)
                if old is not None:
                    self._filings_of[old.vehicle].remove(old)
        self._filings = None

    def _filing_index(self) -> _Filings:
        if self._filings is None:
            self._filings = _Filings(
                self._filing_map.values(),
                self.registry,
                self.index,
                early_s=self.config.filing_early_s,
                late_s=self.config.filing_late_s,
            )
        return self._filings

    def _load_open_episodes(self) -> None:
        for alert in self.store.open_alerts():
            self._resume_episode(alert)

    def _resume_episode(self, alert: Alert) -> None:
        index = self.registry.index_of_id.get(alert.vehicle)
        if index is None:
            return
        key = int(alert.detail.get("key", 0))
        self._episodes[(alert.rule, index, key)] = alert.id
        self._keys.setdefault((alert.rule, index), set()).add(key)
        self._resume(alert.rule, index, key, alert)

    def _resume(self, rule: str, index: int, key: int, alert: Alert) -> None:
        """Seed the per-vehicle state an open episode implies, so that a restarted engine
        continues the episode instead of closing it and opening another."""
        if rule == OutOfAreaRule.NAME:
            self.oa_state[index] = OUTSIDE
        elif rule == OverspeedRule.NAME:
            self.os_since[index] = key
        elif rule == TerminalTamperRule.NAME:
            self.tamper_bits[index] |= np.uint32(1 << (key - 1))
        elif rule == OverdueReturnRule.NAME:
            self.away[index] = key
            self.home_last[index] = False
        elif rule == OvernightParkingRule.NAME:
            self.trips.parked_since[index] = key
        elif rule == ForbiddenZoneRule.NAME:
            fence = self.index.position_of_id.get(key)
            entered = alert.detail.get("entered_at")
            if fence is not None and isinstance(entered, str):
                since = posix(datetime.fromisoformat(entered))
                self.tracker.seed(np.array([index]), np.array([fence]), np.array([since]))

    # -----------------------------------------------------------------------------------------
    # Positions

    def process(self, batch: PositionBatch) -> EngineResult:
        """Evaluate a batch of positions (see the module docstring)."""
        v = batch.vehicle
        usable = (v >= 0) & (v < self._n) & (batch.time != TIME_ABSENT)
        usable[usable] &= ~self.exempt[v[usable]]
        ignored = int(usable.size - np.count_nonzero(usable))
        rows = {
            "vehicle": v[usable],
            "time": batch.time[usable],
            "lon": batch.lon[usable],
            "lat": batch.lat[usable],
            "speed": batch.speed_kmh[usable],
            "status": batch.status[usable],
            "alarm": batch.alarm[usable],
            "mileage": batch.mileage[usable],
        }
        np.maximum.at(self.last_heard, rows["vehicle"], batch.received[usable])
        if self.hold_s == 0 and self._held is None:
            return self._evaluate(rows, ignored=ignored)
        np.maximum.at(self.max_t, rows["vehicle"], rows["time"])
        if self._held is not None:
            rows = {k: np.concatenate([self._held[k], rows[k]]) for k in rows}
        ready = rows["time"] <= self.max_t[rows["vehicle"]] - self.hold_s
        return self._release(rows, ready, ignored=ignored)

    def _release(
        self, rows: dict[str, npt.NDArray[Any]], ready: Bools, *, ignored: int
    ) -> EngineResult:
        if np.count_nonzero(~ready) > _MAX_HELD_ROWS:
            # Over the cap: release the oldest held rows.
            cut = np.sort(rows["time"][~ready])[-_MAX_HELD_ROWS]
            ready |= rows["time"] < cut
        held = {k: a[~ready] for k, a in rows.items()}
        self._held = held if held["time"].size else None
        result = self._evaluate({k: a[ready] for k, a in rows.items()}, ignored=ignored)
        return dataclasses.replace(result, held=int(held["time"].size))

    def tick(self, now: datetime | int) -> EngineResult:
        """Advance the clock: deadlines, silent terminals, lasting stops, overdue returns."""
        now_s = posix(now)
        results: list[EngineResult] = []
        if self._held is not None:
            ready = self._held["time"] <= now_s - self.hold_s
            rows, self._held = self._held, None
            results.append(self._release(rows, ready, ignored=0))
        alerts: list[Alert] = []
        ended = self.trips.tick(now_s)
        for trip in ended:
            # The trip ended at its stop: judge "home" by where the last fix was.
            self.home_last[trip.vehicle] = bool(
                self.park_near_last[trip.vehicle] or not self.has_park[trip.vehicle]
            )
        alerts.extend(self.lifecycle.tick(now_s, vehicles=self.judged_ids))
        alerts.extend(self._tick_offline(now_s))
        alerts.extend(self._tick_overdue(now_s))
        trips_ended = [self._trip_record(t) for t in ended]
        for r in results:
            alerts = r.alerts + alerts
            trips_ended = r.trips_ended + trips_ended
        return EngineResult(
            alerts=_ordered(alerts),
            trips_started=[t for r in results for t in r.trips_started],
            trips_ended=trips_ended,
            evaluated=sum(r.evaluated for r in results),
            late=sum(r.late for r in results),
            held=0 if self._held is None else int(self._held["time"].size),
        )

    # -----------------------------------------------------------------------------------------

    def _evaluate(self, rows: Mapping[str, npt.NDArray[Any]], *, ignored: int) -> EngineResult:
        v = rows["vehicle"]
        t = rows["time"]
        order = np.argsort(v * _VEHICLE_SHIFT + t, kind="stable")
        v, t = v[order], t[order]
        starts = segment_starts(v)
        prev_t = _shift(t, starts, self.last_t[v])
        # Late: not newer than the vehicle's last evaluated row; repeated: the same device
        # time twice (a re-sent report).  Both are skipped and counted as late.
        keep = (t > self.last_t[v]) & (starts | (t != prev_t))
        late = int(np.count_nonzero(~keep))
        if not keep.all():
            order, v, t = order[keep], v[keep], t[keep]
        n = v.size
        if n == 0:
            return EngineResult(
                alerts=[], trips_started=[], trips_ended=[], late=late, ignored=ignored
            )
        lon = rows["lon"][order]
        lat = rows["lat"][order]
        speed = rows["speed"][order]
        status = rows["status"][order]
        alarm = rows["alarm"][order]
        mileage = rows["mileage"][order]
        starts = segment_starts(v)
        ctx = _Batch(
            self,
            v=v,
            t=t,
            lon=lon,
            lat=lat,
            speed=speed,
            status=status,
            alarm=alarm,
            mileage=mileage,
            starts=starts,
        )
        alerts, started, ended = ctx.run()
        return EngineResult(
            alerts=_ordered(alerts),
            trips_started=started,
            trips_ended=ended,
            evaluated=n,
            late=late,
            ignored=ignored,
        )

    # -----------------------------------------------------------------------------------------
    # Episode bookkeeping shared with _Batch

    def episode(self, rule: str, index: int, key: int = 0) -> str | None:
        """The id of the open ``rule`` episode of vehicle ``index`` with ``key``, if any."""
        return self._episodes.get((rule, index, key))

    def keys_of(self, rule: str, index: int) -> list[int]:
        """Keys of the open ``rule`` episodes of vehicle ``index``."""
        return sorted(self._keys.get((rule, index), ()))

    def open_episode(
        self,
        rule: str,
        index: int,
        *,
        at: int,
        detail: Mapping[str, Any],
        key: int = 0,
        started: int | None = None,
        discriminator: int | None = None,
    ) -> Alert | None:
        """Open an episode opened at ``at`` whose identity is ``started`` (default ``at``)
        and ``discriminator``; ``key`` tells it apart among the vehicle's open episodes of
        the rule (kept in the detail so a restarted engine finds it)."""
        vehicle = self.registry[index]
        alert_id = episode_id(
            rule, vehicle.phone, at if started is None else started, discriminator
        )
        self._episodes[(rule, index, key)] = alert_id
        self._keys.setdefault((rule, index), set()).add(key)
        return self.lifecycle.open_episode(
            alert_id=alert_id,
            rule=rule,
            vehicle=vehicle,
            severity=self.config.rule(rule).severity,
            opened_at=at,
            detail={**detail, "key": key} if key else dict(detail),
        )

    def close_episode(
        self,
        rule: str,
        index: int,
        *,
        key: int = 0,
        at: int,
        state: AlertState = AlertState.VIOLATION,
        detail: Mapping[str, Any] | None = None,
    ) -> Alert | None:
        """Close the open ``rule`` episode of vehicle ``index`` with ``key`` at ``at``."""
        alert_id = self._episodes.pop((rule, index, key), None)
        keys = self._keys.get((rule, index))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[(rule, index)]
        if alert_id is None:
            return None
        return self.lifecycle.close_episode(alert_id, at=at, state=state, detail=detail)

    def open_backfill(
        self,
        rule: str,
        index: int,
        *,
        at: int,
        detail: Mapping[str, Any],
        discriminator: int | None = None,
    ) -> Alert | None:
        vehicle = self.registry[index]
        cfg = (
            self.config.unfiled_trip
            if rule == UnfiledTripRule.NAME
            else self.config.holiday_sealing
        )
        return self.lifecycle.open_backfill(
            alert_id=episode_id(rule, vehicle.phone, at, discriminator),
            rule=rule,
            vehicle=vehicle,
            severity=cfg.severity,
            started_at=at,
            deadline=self.calendar.backfill_deadline(at, cfg.backfill_working_days),
            detail=detail,
            known_filings=self._filings_of.get(vehicle.id, ()),
        )

    def _trip_record(self, trip: Any, filing: int | None = None) -> TripRecord:
        vehicle = self.registry[trip.vehicle]
        return TripRecord(
            vehicle=vehicle.id,
            phone=vehicle.phone,
            seq=trip.seq,
            started_at=to_datetime(trip.started_at),
            start_lon=trip.start_lon,
            start_lat=trip.start_lat,
            ended_at=to_datetime(trip.ended_at),
            end_lon=trip.end_lon,
            end_lat=trip.end_lat,
            distance_km=round(trip.distance_m / 1000, 3),
            distance_source=trip.distance_source,
            filing=filing,
        )

    # -----------------------------------------------------------------------------------------
    # Clock-driven rules

    def _tick_offline(self, now: int) -> list[Alert]:
        cfg = self.config.terminal_offline
        if not cfg.enabled:
            return []
        threshold = np.where(self.last_acc, cfg.silent_s, cfg.parked_silent_s)
        # Silence is measured from when the terminal was last *heard*: a blind-area upload
        # reports old device times from a terminal that is very much online.
        heard = np.maximum(self.last_heard, self.last_t)
        silent = (self.last_t >= 0) & ~self.exempt & (now - heard > threshold)
        out = []
        for index in np.flatnonzero(silent).tolist():
            if self.episode(TerminalOfflineRule.NAME, index) is not None:
                continue
            began = int(heard[index] + threshold[index])
            alert = self.open_episode(
                TerminalOfflineRule.NAME,
                index,
                at=began,
                detail={
                    "last_report": _iso(int(self.last_t[index])),
                    "threshold_s": int(threshold[index]),
                    "acc_on": bool(self.last_acc[index]),
                },
            )
            if alert is not None:
                out.append(alert)
        return out

    def _tick_overdue(self, now: int) -> list[Alert]:
        cfg = self.config.overdue_return
        if not cfg.enabled:
            return []
        filings = self._filing_index()
        away = np.flatnonzero((self.away >= 0) & ~self.exempt & ~self.home_last)
        if away.size == 0:
            return []
        deadline = filings.filed_end(self.away[away]) + cfg.grace_s
        out = []
        for index, due in zip(away.tolist(), deadline.tolist(), strict=True):
            filing_id = int(self.away[index])
            if now < due or self.episode(OverdueReturnRule.NAME, index, filing_id) is not None:
                continue
            alert = self.open_episode(
                OverdueReturnRule.NAME,
                index,
                key=filing_id,
                discriminator=filing_id,
                at=int(due),
                detail={"filing": filing_id, "grace_s": cfg.grace_s},
            )
            if alert is not None:
                out.append(alert)
        return out


def _iso(seconds: int) -> str:
    return to_datetime(seconds).isoformat()


def _ordered(alerts: list[Alert]) -> list[Alert]:
    return sorted(alerts, key=lambda a: a.updated_at)


def _bits(mask: int) -> list[int]:
    return [b for b in range(32) if mask >> b & 1]


class _Batch:
    """One evaluation: the sorted rows and every per-row array the rules share."""

    def __init__(
        self,
        engine: RuleEngine,
        *,
        v: I64,
        t: I64,
        lon: F64,
        lat: F64,
        speed: F64,
        status: npt.NDArray[np.uint32],
        alarm: npt.NDArray[np.uint32],
        mileage: I64,
        starts: Bools,
    ) -> None:
        self.e = engine
        self.v, self.t, self.lon, self.lat, self.speed = v, t, lon, lat, speed
        self.status, self.alarm, self.mileage, self.starts = status, alarm, mileage, starts
        self.n = v.size
        self.ends = segment_ends(starts)
        self.acc = (status & STATUS_ACC_ON) != 0
        self.fixed = ((status & STATUS_FIXED) != 0) & np.isfinite(lon) & np.isfinite(lat)
        self.alerts: list[Alert] = []

    def add(self, alert: Alert | None) -> None:
        if alert is not None:
            self.alerts.append(alert)

    def run(self) -> tuple[list[Alert], list[TripRecord], list[TripRecord]]:
        e, cfg = self.e, self.e.config
        filings = e._filing_index()
        self.fpos = filings.lookup(self.v, self.t)
        self.covered = self.fpos >= 0
        self.cover_id = filings.take(filings.id, self.fpos)
        self.dest = filings.take(filings.dest, self.fpos)  # destination fence index or -1
        self._containment()
        self.sealed = e.calendar.sealed_mask(self.t)
        feed = e.trips.feed(
            self.v,
            self.t,
            self.lon,
            self.lat,
            self.speed,
            acc=self.acc,
            fixed=self.fixed,
            mileage=self.mileage,
        )
        self.feed = feed
        self.in_trip = feed.phase != PARKED
        # Rows that start a trip, and since when the vehicle had stood where it left from.
        self.trip_start_row = np.zeros(self.n, dtype=bool)
        self.parked_before = np.full(self.n, _NONE, dtype=np.int64)
        for s in feed.started:
            self.trip_start_row[s.row] = True
            self.parked_before[s.row] = s.parked_since
        self._parking_state()

        if cfg.unfiled_trip.enabled or cfg.holiday_sealing.enabled:
            self._trip_rules(feed)
        if cfg.out_of_area.enabled:
            self._out_of_area()
        if cfg.forbidden_zone.enabled:
            self._forbidden()
        if cfg.overspeed.enabled:
            self._overspeed()
        self._parking_rules()
        if cfg.terminal_tamper.enabled:
            self._tamper()
        self._offline()

        last = self.ends
        e.last_t[self.v[last]] = self.t[last]
        e.last_acc[self.v[last]] = self.acc[last]
        np.maximum.at(e.max_t, self.v[last], self.t[last])

        started = []
        for s in feed.started:
            vehicle = e.registry[s.vehicle]
            started.append(
                TripRecord(
                    vehicle=vehicle.id,
                    phone=vehicle.phone,
                    seq=s.seq,
                    started_at=to_datetime(s.started_at),
                    start_lon=s.lon,
                    start_lat=s.lat,
                    filing=self._filing_at(s.row),
                )
            )
        ended = []
        for trip in feed.ended:
            fpos = e._filing_index().lookup(
                np.array([trip.vehicle], dtype=np.int64),
                np.array([trip.started_at], dtype=np.int64),
            )[0]
            filing = None if fpos < 0 else int(e._filing_index().id[fpos])
            ended.append(e._trip_record(trip, filing))
        return self.alerts, started, ended

    def _filing_at(self, row: int) -> int | None:
        return None if self.cover_id[row] < 0 else int(self.cover_id[row])

    # -----------------------------------------------------------------------------------------

    def _containment(self) -> None:
        e, n = self.e, self.n
        q = np.flatnonzero(self.fixed)
        units = e.unit_code[self.v[q]]
        hits = e.index.hits(self.lon[q], self.lat[q], self.t[q], unit=units, also=self.dest[q])
        hits = Hits(sample=q[hits.sample], fence=hits.fence, inside=hits.inside)
        # Fences that apply to the row's vehicle (and time), plus its filing's destination.
        self.hits = hits
        self.applies = e.index.applies(hits.fence, e.unit_code[self.v[hits.sample]])
        kind = e.index.kind[hits.fence]
        self.perm_in, self.perm_near = e.index.any_of(hits, self.applies & (kind == _PERMITTED), n)
        self.park_in, self.park_near = e.index.any_of(hits, self.applies & (kind == _PARKING), n)
        self.forbidden_pairs = self.applies & (kind == _FORBIDDEN)

    # -----------------------------------------------------------------------------------------

    def _trip_rules(self, feed: TripFeed) -> None:
        e, cfg = self.e, self.e.config
        holiday = cfg.holiday_sealing.enabled
        if cfg.unfiled_trip.enabled:
            for s in feed.started:
                row = s.row
                # Covered: by a filing, or as the way back of a filed trip not yet home
                # (being late is overdue_return's business).
                covered = self.covered[row] or self.away_before[row] >= 0
                if covered or (holiday and self.sealed[row]):
                    continue
                self.add(
                    e.open_backfill(
                        UnfiledTripRule.NAME,
                        s.vehicle,
                        at=s.started_at,
                        detail={"trip": s.seq, "lon": _r(s.lon), "lat": _r(s.lat)},
                    )
                )
        if not holiday:
            return
        mask = self.in_trip & self.sealed & ~self.covered & (feed.seq != e.sealed_trip[self.v])
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            return
        code = self.v[rows] * (1 << 32) + feed.seq[rows]
        first = rows[segment_starts(code)]
        for row in first.tolist():
            index = int(self.v[row])
            seq = int(feed.seq[row])
            e.sealed_trip[index] = seq
            at = int(self.t[row])
            self.add(
                e.open_backfill(
                    HolidaySealingRule.NAME,
                    index,
                    at=at,
                    detail={
                        "trip": seq,
                        "sealed": e.calendar.sealing_reason(at),
                        "lon": _r(self.lon[row]),
                        "lat": _r(self.lat[row]),
                    },
                )
            )

    def _edges(
        self, active: Bools, key: I64, carried_active: Bools, carried_key: I64
    ) -> tuple[I64, I64]:
        """Rows where an episode opens / closes: ``active`` per row with its ``key``; the
        carried values are per row (taken at segment starts)."""
        prev_active = _shift(active, self.starts, carried_active)
        prev_key = _shift(key, self.starts, carried_key)
        changed = key != prev_key
        opens = np.flatnonzero(active & (~prev_active | changed))
        closes = np.flatnonzero(prev_active & (~active | changed))
        return opens, closes

    # -----------------------------------------------------------------------------------------

    def _out_of_area(self) -> None:
        e = self.e
        rule = e.config.out_of_area
        v = self.v
        dest = self.dest
        dest_in = np.zeros(self.n, dtype=bool)
        dest_near = np.zeros(self.n, dtype=bool)
        hits = self.hits
        match = hits.fence == dest[hits.sample]
        dest_near[hits.sample[match]] = True
        dest_in[hits.sample[match & hits.inside]] = True
        signal = signal_from(self.perm_in | dest_in, self.perm_near | dest_near)
        signal[~self.fixed] = 0
        # On the way to a filed destination: outside both, tolerated for transit_s at a time.
        transit = (dest >= 0) & (signal == OUTSIDE)
        since = self._run_since(transit, e.oa_transit)
        signal[transit & (self.t - since <= rule.transit_s)] = 0
        state = debounce(
            signal,
            self.starts,
            v,
            state=e.oa_state,
            run_sign=e.oa_sign,
            run_len=e.oa_len,
            samples=rule.samples,
        )
        active = (state == OUTSIDE) & e.has_perm[v]
        self._episode_rule(
            OutOfAreaRule.NAME,
            active,
            np.zeros(self.n, dtype=np.int64),
            detail_at=self._position_detail,
        )

    def _run_since(self, cond: Bools, carried: I64) -> I64:
        """Per row where ``cond`` holds, when its run of ``cond`` rows began (a run that
        continues from the previous batch keeps the start carried per vehicle in
        ``carried``, which is updated); -1 elsewhere."""
        begin = run_begin(cond, self.starts)
        b = np.maximum(begin, 0)
        since = np.where(begin >= 0, self.t[b], _NONE)
        before = carried[self.v]
        since = np.where(cond & (begin >= 0) & self.starts[b] & (before >= 0), before, since)
        last = self.ends
        carried[self.v[last]] = np.where(cond[last], since[last], _NONE)
        return since

    def _position_detail(self, row: int) -> dict[str, Any]:
        return {
            "lon": _r(self.lon[row]),
            "lat": _r(self.lat[row]),
            "speed_kmh": float(self.speed[row]),
        }

    def _episode_rule(
        self,
        rule: str,
        active: Bools,
        key: I64,
        *,
        detail_at: Callable[[int], dict[str, Any]],
        started: I64 | None = None,
        discriminate: bool = False,
    ) -> None:
        """Open and close ``rule`` episodes (at most one per vehicle) at the edges of
        ``active``; ``key`` per row tells episodes apart (a new key is a new episode),
        ``started`` gives an episode's identity time (default: the row's), and with
        ``discriminate`` the key is part of the alert id."""
        e = self.e
        carried_active = np.zeros(self.n, dtype=bool)
        carried_key = np.full(self.n, _NONE, dtype=np.int64)
        for row in np.flatnonzero(self.starts).tolist():
            for k in e.keys_of(rule, int(self.v[row])):
                carried_active[row] = True
                carried_key[row] = k
        opens, closes = self._edges(active, key, carried_active, carried_key)
        # At one row an episode may close and the next open: closes first.
        events = sorted([(r, 0) for r in closes.tolist()] + [(r, 1) for r in opens.tolist()])
        for row, kind in events:
            index = int(self.v[row])
            at = int(self.t[row])
            if kind == 0:
                ended = {"ended_lon": _r(self.lon[row]), "ended_lat": _r(self.lat[row])}
                for k in e.keys_of(rule, index):
                    self.add(e.close_episode(rule, index, key=k, at=at, detail=ended))
                continue
            k = int(key[row])
            begin = at if started is None else int(started[row])
            self.add(
                e.open_episode(
                    rule,
                    index,
                    key=k,
                    at=begin,
                    detail=detail_at(row),
                    discriminator=k if discriminate else None,
                )
            )

    # -----------------------------------------------------------------------------------------

    def _forbidden(self) -> None:
        e = self.e
        rule = e.config.forbidden_zone
        sel = self.forbidden_pairs
        hits = self.hits.select(sel)
        if len(hits) == 0 and len(e.tracker) == 0:
            return
        track = e.tracker.update(self.v, self.t, hits)
        if track.sample.size == 0:
            return
        t = self.t[track.sample]
        inside = track.state == INSIDE
        active = inside & (t - track.since >= rule.dwell_s)
        fence_id = e.index.ids[track.fence]
        # Carried: open episodes of each (vehicle, fence) key.
        first = np.flatnonzero(track.starts)
        carried_active = np.zeros(track.sample.size, dtype=bool)
        carried_key = np.full(track.sample.size, _NONE, dtype=np.int64)
        for row in first.tolist():
            index = int(track.obj[row])
            fid = int(fence_id[row])
            if e.episode(ForbiddenZoneRule.NAME, index, fid) is not None:
                carried_active[row] = True
                carried_key[row] = fid
        prev_active = _shift(active, track.starts, carried_active)
        opens = np.flatnonzero(active & ~prev_active)
        closes = np.flatnonzero(prev_active & ~active)
        # Rows are grouped by (vehicle, fence) and time-ordered within: row order is each
        # pair's event order.
        for row in sorted(opens.tolist() + closes.tolist()):
            index = int(track.obj[row])
            fid = int(fence_id[row])
            if not active[row]:
                self.add(e.close_episode(ForbiddenZoneRule.NAME, index, key=fid, at=int(t[row])))
                continue
            fence = e.index.fences[int(track.fence[row])]
            self.add(
                e.open_episode(
                    ForbiddenZoneRule.NAME,
                    index,
                    key=fid,
                    discriminator=fid,
                    at=int(t[row]),
                    started=int(track.since[row]),
                    detail={
                        "fence": fid,
                        "fence_name": fence.name,
                        "entered_at": _iso(int(track.since[row])),
                        "dwell_s": rule.dwell_s,
                        **self._position_detail(int(track.sample[row])),
                    },
                )
            )

    # -----------------------------------------------------------------------------------------

    def _overspeed(self) -> None:
        e = self.e
        rule = e.config.overspeed
        night_start, night_end = _seconds(rule.night_start), _seconds(rule.night_end)
        sod = (self.t + _GMT8_S) % _DAY_S
        if night_start < night_end:
            night = (sod >= night_start) & (sod < night_end)
        else:
            night = (sod >= night_start) | (sod < night_end)
        applying = self.hits.select(self.applies)
        limit, duration, which = e.index.speed_limits(applying, self.n, night=night)
        fenced = np.isfinite(limit)
        limit = np.where(fenced, limit, e.speed_default[self.v])
        duration = np.where(duration >= 0, duration, rule.duration_s)
        over = self.fixed & (self.speed > limit + rule.tolerance_kmh)
        since = self._run_since(over, e.os_since)
        active = over & (self.t - since >= duration)

        def detail(row: int) -> dict[str, Any]:
            fence = int(which[row])
            return {
                "speed_kmh": float(self.speed[row]),
                "limit_kmh": float(limit[row]),
                "fence": None if fence < 0 else int(e.index.ids[fence]),
                "since": _iso(int(since[row])),
                "lon": _r(self.lon[row]),
                "lat": _r(self.lat[row]),
            }

        self._episode_rule(OverspeedRule.NAME, active, since, detail_at=detail, started=since)

    # -----------------------------------------------------------------------------------------

    def _parking_state(self) -> None:
        """Per row: near its designated parking (by the last fix), home (parked there, or
        parked at all for vehicles without designated parking), and ``away`` -- the filing
        the vehicle left under and has not come home from since (-1: none)."""
        e = self.e
        v = self.v
        fix_at = ffill_index(self.fixed, self.starts)
        self.near = np.where(
            fix_at >= 0, self.park_near[np.maximum(fix_at, 0)], e.park_near_last[v]
        )
        self.prev_near = _shift(self.near, self.starts, e.park_near_last[v])
        self.home = ~self.in_trip & (self.near | ~e.has_park[v])
        event = (self.covered & ~self.home) | self.home
        value = np.where(self.home, _NONE, self.cover_id)
        at = ffill_index(event, self.starts)
        self.away = np.where(at >= 0, value[np.maximum(at, 0)], e.away[v])
        self.away_before = _shift(self.away, self.starts, e.away[v])
        last = self.ends
        e.park_near_last[v[last]] = self.near[last]
        e.home_last[v[last]] = self.home[last]
        e.away[v[last]] = self.away[last]

    def _parking_rules(self) -> None:
        """Overnight parking and overdue return."""
        cfg = self.e.config
        if cfg.overnight_parking.enabled:
            self._overnight()
        if cfg.overdue_return.enabled:
            self._overdue()

    def _overnight(self) -> None:
        e = self.e
        near, parked = self.near, ~self.in_trip
        rule = e.config.overnight_parking
        v, t = self.v, self.t
        start_s = _seconds(rule.window_start)
        length = (_seconds(rule.window_end) - start_s) % _DAY_S or _DAY_S
        prev_near = self.prev_near
        # The stop being judged: the current one on parked rows, the one just left on the row
        # that starts a trip (a sleeping terminal's first report of the morning).
        since = np.where(
            parked, self.feed.parked_since, np.where(self.trip_start_row, self.parked_before, _NONE)
        )
        outside = np.where(parked, ~near, ~prev_near) & e.has_park[v]
        ws = _window_start(t, start_s)
        overlap = np.minimum(t, ws + length) - np.maximum(since, ws)
        candidate = (
            (parked | self.trip_start_row) & (since >= 0) & outside & (overlap >= rule.min_parked_s)
        )
        events: list[tuple[int, int, int]] = []  # (row, 0 open / 1 close, opened at)
        rows = np.flatnonzero(candidate)
        if rows.size:
            code = v[rows] * _VEHICLE_SHIFT + since[rows]
            first = rows[segment_starts(code)]
            at = np.maximum(since[first], ws[first]) + rule.min_parked_s
            covered = e._filing_index().lookup(v[first], at) >= 0
            events.extend(
                (r, 0, a)
                for r, a in zip(first[~covered].tolist(), at[~covered].tolist(), strict=True)
            )
        # A stop ends when a trip starts (after being judged at that row, when it is the
        # first report since the night).
        events.extend((r, 1, 0) for r in np.flatnonzero(self.trip_start_row).tolist())
        for row, kind, when in sorted(events):
            index = int(v[row])
            if kind == 1:
                for k in e.keys_of(OvernightParkingRule.NAME, index):
                    self.add(
                        e.close_episode(OvernightParkingRule.NAME, index, key=k, at=int(t[row]))
                    )
                continue
            stop = int(since[row])
            if e.episode(OvernightParkingRule.NAME, index, stop) is not None:
                continue
            for k in e.keys_of(OvernightParkingRule.NAME, index):  # a stop left unclosed
                self.add(e.close_episode(OvernightParkingRule.NAME, index, key=k, at=stop))
            self.add(
                e.open_episode(
                    OvernightParkingRule.NAME,
                    index,
                    key=stop,
                    at=when,
                    started=stop,
                    detail={
                        "parked_since": _iso(stop),
                        "lon": _r(self.lon[row]),
                        "lat": _r(self.lat[row]),
                        "window": f"{rule.window_start:%H:%M}-{rule.window_end:%H:%M}",
                    },
                )
            )

    def _overdue(self) -> None:
        e = self.e
        rule = e.config.overdue_return
        t, away, home = self.t, self.away, self.home
        deadline = e._filing_index().filed_end(away) + rule.grace_s
        active = (away >= 0) & (t >= deadline) & ~home
        prev_away = self.away_before

        def detail(row: int) -> dict[str, Any]:
            return {
                "filing": int(away[row]),
                "filing_end": _iso(int(deadline[row] - rule.grace_s)),
                "grace_s": rule.grace_s,
                "lon": _r(self.lon[row]),
                "lat": _r(self.lat[row]),
            }

        started = np.where(prev_away == away, deadline, t)
        self._episode_rule(
            OverdueReturnRule.NAME,
            active,
            away,
            detail_at=detail,
            started=started,
            discriminate=True,
        )

    # -----------------------------------------------------------------------------------------

    def _tamper(self) -> None:
        e = self.e
        mask = np.uint32(e.config.terminal_tamper.alarm_mask)
        bits = self.alarm & mask
        prev = _shift(bits, self.starts, e.tamper_bits[self.v])
        changed = np.flatnonzero(bits != prev)
        for row in changed.tolist():
            index = int(self.v[row])
            now, before = int(bits[row]), int(prev[row])
            for bit in _bits(now ^ before):
                key = bit + 1  # 0 means "no discriminator"
                if now >> bit & 1:
                    self.add(
                        e.open_episode(
                            TerminalTamperRule.NAME,
                            index,
                            key=key,
                            discriminator=bit,
                            at=int(self.t[row]),
                            detail={
                                "alarm_bit": bit,
                                "alarm": _ALARM_NAMES.get(bit, f"bit{bit}"),
                                **self._position_detail(row),
                            },
                        )
                    )
                else:
                    self.add(
                        e.close_episode(
                            TerminalTamperRule.NAME, index, key=key, at=int(self.t[row])
                        )
                    )
        last = self.ends
        e.tamper_bits[self.v[last]] = bits[last]

    def _offline(self) -> None:
        e = self.e
        rule = e.config.terminal_offline
        v, t = self.v, self.t
        prev_t = _shift(t, self.starts, e.last_t[v])
        prev_acc = _shift(self.acc, self.starts, e.last_acc[v])
        threshold = np.where(prev_acc, rule.silent_s, rule.parked_silent_s)
        gap = (prev_t >= 0) & (t - prev_t > threshold)
        rows = set(np.flatnonzero(gap).tolist() if rule.enabled else [])
        # An episode opened by tick() closes at the vehicle's first report.
        for row in np.flatnonzero(self.starts).tolist():
            if e.episode(TerminalOfflineRule.NAME, int(v[row])) is not None:
                rows.add(row)
        for row in sorted(rows):
            index = int(v[row])
            at = int(t[row])
            if e.episode(TerminalOfflineRule.NAME, index) is None:
                began = int(prev_t[row] + threshold[row])
                e.open_episode(
                    TerminalOfflineRule.NAME,
                    index,
                    at=began,
                    detail={
                        "last_report": _iso(int(prev_t[row])),
                        "threshold_s": int(threshold[row]),
                        "acc_on": bool(prev_acc[row]),
                    },
                )
            self.add(
                e.close_episode(
                    TerminalOfflineRule.NAME,
                    index,
                    at=at,
                    state=AlertState.RESOLVED,
                    detail={"back_at": _iso(at), "silent_s": at - int(prev_t[row])},
                )
            )


def _r(value: Any) -> float:
    return round(float(value), 6)
