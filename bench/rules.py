"""Rule evaluation rate: positions per second through the whole engine, all rules on.

Builds a synthetic but realistic world around Kunming (25.04 N, 102.71 E):

* 1,000 fences: a permitted area per unit (large irregular polygons), forbidden zones
  (circles and polygons), designated parking (small circles and rectangles, per unit),
  destination areas and speed-limit zones (some with daily time windows, some with night
  limits) -- a mix of circles, rectangles and polygons;
* 2,000 vehicles in 20 units (2 % exempt), each starting at its unit's parking;
* tracks alternating parked spells (ACC off, a report every 5 minutes, a few metres of GNSS
  jitter) and drives (ACC on, a report every 30 s, 20-110 km/h towards random waypoints up to
  25 km away), from the evening before the National Day holiday (2026-09-30) into it, with
  a power-cut alarm
  now and then; filings for most vehicles, many with a destination;

then feeds the positions in arrival order (all vehicles interleaved) in batches to a fresh
engine and times it (fence index built once, outside the timing; the engine sorts, contains,
detects trips and runs every rule).  Each figure is the median of several runs on one pinned
core; the last line of output is one JSON object.

    .venv/bin/python bench/rules.py [--quick] [--positions N] [--batch B] [--runs R] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

# Run from a checkout without relying on how the editable install maps the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alerts.calendar import GMT8, WorkingCalendar
from alerts.engine import RuleEngine
from alerts.lifecycle import InMemoryAlertStore
from alerts.model import Filing, PositionBatch, Registry, Vehicle
from geofence.geodesy import metres_per_degree
from geofence.index import FenceIndex
from geofence.model import (
    Circle,
    DailyWindow,
    Fence,
    FenceKind,
    Polygon,
    Rectangle,
)

CENTRE = (102.71, 25.04)
UNITS = 20
VEHICLES = 2000
FENCES = 1000
START = datetime(2026, 9, 30, 19, 0, tzinfo=GMT8)
KX, KY = (float(v) for v in metres_per_degree(CENTRE[1]))


def _blob(
    rng: np.random.Generator, lon: float, lat: float, radius_m: float, vertices: int
) -> Polygon:
    """An irregular star-shaped polygon (valid by construction: angles sorted)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = radius_m * rng.uniform(0.6, 1.0, vertices)
    ring = [
        (lon + r * np.cos(a) / KX, lat + r * np.sin(a) / KY)
        for a, r in zip(angles, radii, strict=True)
    ]
    return Polygon.from_exterior(ring)


def _near(rng: np.random.Generator, spread_m: float) -> tuple[float, float]:
    dx, dy = rng.normal(0, spread_m, 2)
    return CENTRE[0] + dx / KX, CENTRE[1] + dy / KY


def build_fences(rng: np.random.Generator) -> list[Fence]:
    fences: list[Fence] = []

    def add(**kw: object) -> None:
        fid = len(fences) + 1
        fences.append(Fence(id=fid, name=f"{kw['kind']}-{fid}", **kw))  # type: ignore[arg-type]

    for u in range(UNITS):  # permitted areas: one big polygon per unit
        lon, lat = _near(rng, 5000)
        add(
            kind=FenceKind.PERMITTED,
            unit=f"unit-{u:02d}",
            shape=_blob(rng, lon, lat, rng.uniform(25e3, 40e3), 120),
        )
    shape: Circle | Rectangle | Polygon
    for i in range(150):  # forbidden zones
        lon, lat = _near(rng, 15000)
        shape = (
            Circle(lon=lon, lat=lat, radius_m=rng.uniform(150, 600))
            if i % 2
            else _blob(rng, lon, lat, rng.uniform(300, 800), 16)
        )
        add(kind=FenceKind.FORBIDDEN, shape=shape)
    for i in range(400):  # designated parking, 20 per unit
        lon, lat = _near(rng, 12000)
        if i % 8 < 5:
            shape = Circle(lon=lon, lat=lat, radius_m=rng.uniform(60, 150))
        else:
            w, h = rng.uniform(80, 200, 2)
            shape = Rectangle(
                west=lon - w / KX, south=lat - h / KY, east=lon + w / KX, north=lat + h / KY
            )
        add(kind=FenceKind.PARKING, unit=f"unit-{i % UNITS:02d}", shape=shape)
    for i in range(250):  # destinations
        lon, lat = _near(rng, 20000)
        size = rng.uniform(1000, 5000)
        if i % 3 == 0:
            shape = Circle(lon=lon, lat=lat, radius_m=size)
        elif i % 3 == 1:
            shape = Rectangle(
                west=lon - size / KX,
                south=lat - size / KY,
                east=lon + size / KX,
                north=lat + size / KY,
            )
        else:
            shape = _blob(rng, lon, lat, size, 24)
        add(kind=FenceKind.DESTINATION, shape=shape)
    for i in range(FENCES - len(fences)):  # speed zones, some timed, some with night limits
        lon, lat = _near(rng, 12000)
        size = rng.uniform(300, 1500)
        if i % 3 == 0:
            shape = Circle(lon=lon, lat=lat, radius_m=size)
        elif i % 3 == 1:
            shape = Rectangle(
                west=lon - size / KX,
                south=lat - size / KY,
                east=lon + size / KX,
                north=lat + size / KY,
            )
        else:
            shape = _blob(rng, lon, lat, size, 12)
        window = (
            DailyWindow(start=datetime(2000, 1, 1, 7).time(), end=datetime(2000, 1, 1, 19).time())
            if i % 4 == 0
            else None
        )
        add(
            kind=FenceKind.DESTINATION,
            shape=shape,
            window=window,
            max_speed_kmh=float(rng.choice([40, 60, 60, 80])),
            overspeed_duration_s=int(rng.choice([10, 30])),
            night_max_speed_kmh=30.0 if i % 5 == 0 else None,
        )
    return fences


def build_world(
    rng: np.random.Generator, fences: list[Fence]
) -> tuple[Registry, list[Filing], dict[int, tuple[float, float]]]:
    vehicles = [
        Vehicle(
            id=10_000 + i,
            phone=f"0139{i:08d}",
            plate=f"云A{i:05d}",
            unit=f"unit-{i % UNITS:02d}",
            exempt=i % 50 == 49,
        )
        for i in range(VEHICLES)
    ]
    parking = [f for f in fences if f.kind is FenceKind.PARKING]
    destinations = [
        f for f in fences if f.kind is FenceKind.DESTINATION and f.max_speed_kmh is None
    ]
    homes: dict[int, tuple[float, float]] = {}
    filings: list[Filing] = []
    for i, vehicle in enumerate(vehicles):
        spot = parking[(i % UNITS) + UNITS * int(rng.integers(0, len(parking) // UNITS))]
        shape = spot.shape
        if isinstance(shape, Circle):
            homes[i] = (shape.lon, shape.lat)
        elif isinstance(shape, Rectangle):
            homes[i] = ((shape.west + shape.east) / 2, (shape.south + shape.north) / 2)
        if rng.random() < 0.7:  # most vehicles have filings for the days simulated
            for day in range(3):
                begin = START + timedelta(days=day, hours=float(rng.uniform(1, 4)))
                dest = (
                    destinations[int(rng.integers(0, len(destinations)))].id
                    if rng.random() < 0.5
                    else None
                )
                filings.append(
                    Filing(
                        id=len(filings) + 1,
                        vehicle=vehicle.id,
                        start=begin,
                        end=begin + timedelta(hours=float(rng.uniform(4, 10))),
                        filed_at=begin - timedelta(hours=12),
                        destination_fence=dest,
                        purpose="official business",
                        approver="office",
                    )
                )
    return Registry(vehicles), filings, homes


def build_tracks(
    rng: np.random.Generator, homes: dict[int, tuple[float, float]], per_vehicle: int
) -> PositionBatch:
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("v", "t", "lon", "lat", "speed", "status", "alarm", "mileage")
    }
    t0 = int(START.timestamp())
    for v in range(VEHICLES):
        lon, lat = homes[v]
        t = t0 + int(rng.integers(0, 600))
        odo = int(rng.integers(10_000, 500_000))
        made = 0
        while made < per_vehicle:
            # parked spell: ACC off, every 300 s, jitter of a few metres
            k = int(rng.integers(4, 30))
            cols["v"].append(np.full(k, v))
            cols["t"].append(t + 300 * np.arange(k))
            cols["lon"].append(lon + rng.normal(0, 4, k) / KX)
            cols["lat"].append(lat + rng.normal(0, 4, k) / KY)
            cols["speed"].append(np.abs(rng.normal(0, 0.5, k)))
            cols["status"].append(np.full(k, 0b10))
            cols["alarm"].append(np.where(rng.random(k) < 2e-4, 1 << 8, 0))
            cols["mileage"].append(np.full(k, odo))
            t += 300 * k
            made += k
            # drive: ACC on, every 30 s, towards a waypoint
            k = int(rng.integers(20, 120))
            target = (CENTRE[0] + rng.normal(0, 12000) / KX, CENTRE[1] + rng.normal(0, 12000) / KY)
            frac = np.linspace(0, 1, k + 1)[1:]
            path_lon = lon + (target[0] - lon) * frac + rng.normal(0, 3, k) / KX
            path_lat = lat + (target[1] - lat) * frac + rng.normal(0, 3, k) / KY
            # town traffic mostly; now and then an expressway run
            cruise = 90.0 if rng.random() < 0.1 else 40.0
            speed = np.clip(rng.normal(cruise, 8, k), 10, 115)
            step_km = speed * 30 / 3600
            cols["v"].append(np.full(k, v))
            cols["t"].append(t + 30 * np.arange(k))
            cols["lon"].append(path_lon)
            cols["lat"].append(path_lat)
            cols["speed"].append(speed)
            cols["status"].append(np.full(k, 0b11))
            cols["alarm"].append(np.where(rng.random(k) < 2e-4, 1 << 8, 0))
            cols["mileage"].append(odo + np.cumsum(step_km * 10).astype(np.int64))
            odo = int(cols["mileage"][-1][-1])
            lon, lat = float(path_lon[-1]), float(path_lat[-1])
            t += 30 * k
            made += k
            if rng.random() < 0.5:  # go home now and then
                lon, lat = homes[v]
    arrays = {k: np.concatenate(c) for k, c in cols.items()}
    order = np.argsort(arrays["t"], kind="stable")  # arrival order: vehicles interleaved
    return PositionBatch.from_arrays(
        vehicle=arrays["v"][order],
        time=arrays["t"][order],
        lon=arrays["lon"][order],
        lat=arrays["lat"][order],
        speed_kmh=arrays["speed"][order],
        status=arrays["status"][order],
        alarm=arrays["alarm"][order],
        mileage=arrays["mileage"][order],
    )


def _slice(batch: PositionBatch, lo: int, hi: int) -> PositionBatch:
    return PositionBatch(
        **{f: getattr(batch, f)[lo:hi] for f in PositionBatch.__dataclass_fields__}
    )


@dataclasses.dataclass(frozen=True, slots=True)
class World:
    index: FenceIndex
    registry: Registry
    filings: list[Filing]
    calendar: WorkingCalendar
    positions: PositionBatch


def run_once(world: World, batch: int) -> tuple[float, int, int]:
    """Feed every position through a fresh engine; (seconds, alert events, alerts kept)."""
    store = InMemoryAlertStore()
    engine = RuleEngine(
        registry=world.registry,
        fences=world.index,
        calendar=world.calendar,
        filings=world.filings,
        store=store,
    )
    positions = world.positions
    chunks = [
        _slice(positions, lo, min(lo + batch, len(positions)))
        for lo in range(0, len(positions), batch)
    ]
    events = 0
    start = time.perf_counter()
    for chunk in chunks:
        events += len(engine.process(chunk).alerts)
    events += len(engine.tick(int(positions.time.max()) + 3600).alerts)
    elapsed = time.perf_counter() - start
    return elapsed, events, len(store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer positions and runs")
    parser.add_argument("--positions", type=int, default=None, help="positions in total")
    parser.add_argument("--batch", type=int, default=20_000, help="positions per engine call")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    args = parser.parse_args(argv)
    total = args.positions or (200_000 if args.quick else 1_000_000)
    runs = min(args.runs, 3) if args.quick else args.runs
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to cpu {cpu}")

    rng = np.random.default_rng(808)
    fences = build_fences(rng)
    start = time.perf_counter()
    index = FenceIndex(fences, margin_m=20.0)
    build_s = time.perf_counter() - start
    shapes = {
        name: sum(type(f.shape).__name__ == name for f in fences)
        for name in ("Circle", "Rectangle", "Polygon")
    }
    registry, filings, homes = build_world(rng, fences)
    positions = build_tracks(rng, homes, max(total // VEHICLES, 10))
    calendar = WorkingCalendar(years=range(2026, 2028))
    print(
        f"world: {len(fences)} fences {shapes}, index built in {build_s * 1e3:.0f} ms; "
        f"{len(registry)} vehicles, {len(filings)} filings, {len(positions)} positions "
        f"in batches of {args.batch}"
    )

    world = World(index, registry, filings, calendar, positions)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_once, world, args.batch)
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumtime").print_stats(30)

    times = []
    for _ in range(runs):
        elapsed, events, kept = run_once(world, args.batch)
        times.append(elapsed)
        rate = len(positions) / elapsed
        print(
            f"  run: {elapsed:.2f} s, {rate:,.0f} positions/s, {events} alert events, {kept} alerts"
        )
    rate = len(positions) / statistics.median(times)
    print(f"median: {rate:,.0f} positions/s with {len(fences)} fences and all rules on")
    print(json.dumps({"positions_per_s": round(rate), "fences": len(fences)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
