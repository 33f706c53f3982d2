"""Trip detection: starts, stops, drift, distances, and feeding in any chunks."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.trips import MOVING, PARKED, STOPPING, Trip, TripConfig, TripDetector, TripFeed
from geofence.geodesy import metres_per_degree

T0 = 1_790_000_000  # 2026-09-21 22:13 China time
KX, KY = (float(v) for v in metres_per_degree(25.04))


@dataclasses.dataclass
class Rows:
    vehicle: list[int] = dataclasses.field(default_factory=list)
    t: list[int] = dataclasses.field(default_factory=list)
    lon: list[float] = dataclasses.field(default_factory=list)
    lat: list[float] = dataclasses.field(default_factory=list)
    speed: list[float] = dataclasses.field(default_factory=list)
    acc: list[bool] = dataclasses.field(default_factory=list)
    mileage: list[int] = dataclasses.field(default_factory=list)

    def add(
        self,
        *,
        vehicle: int = 0,
        t: int,
        east_m: float,
        speed: float,
        acc: bool,
        mileage: int = -1,
        north_m: float = 0.0,
    ) -> None:
        self.vehicle.append(vehicle)
        self.t.append(t)
        self.lon.append(102.71 + east_m / KX)
        self.lat.append(25.04 + north_m / KY)
        self.speed.append(speed)
        self.acc.append(acc)
        self.mileage.append(mileage)

    def feed(self, detector: TripDetector, lo: int = 0, hi: int | None = None) -> TripFeed:
        sl = slice(lo, hi)
        return detector.feed(
            np.array(self.vehicle[sl], dtype=np.int64),
            np.array(self.t[sl], dtype=np.int64),
            np.array(self.lon[sl]),
            np.array(self.lat[sl]),
            np.array(self.speed[sl]),
            acc=np.array(self.acc[sl], dtype=bool),
            fixed=np.ones(len(self.t[sl]), dtype=bool),
            mileage=np.array(self.mileage[sl], dtype=np.int64),
        )


def drive_day(rows: Rows, *, vehicle: int = 0, mileage: bool = True, t0: int = T0) -> int:
    """Parked 1 h, 10 km east at 36 km/h, parked 1 h.  Returns the end time."""
    t = t0
    odo = 50_000
    for _ in range(6):  # parked, ACC off, drifting a few metres
        rows.add(
            vehicle=vehicle,
            t=t,
            east_m=3.0 * (_ % 2),
            speed=1.0,
            acc=False,
            mileage=odo if mileage else -1,
        )
        t += 600
    for i in range(1, 101):  # 100 x 30 s at 10 m/s
        odo += 1  # 1/10 km per 100 m step
        rows.add(
            vehicle=vehicle,
            t=t,
            east_m=100.0 * i,
            speed=36.0,
            acc=True,
            mileage=odo if mileage else -1,
        )
        t += 30
    for _ in range(6):
        rows.add(
            vehicle=vehicle,
            t=t,
            east_m=10_000.0,
            speed=0.0,
            acc=False,
            mileage=odo if mileage else -1,
        )
        t += 600
    return t


def test_a_trip_with_odometer_distance() -> None:
    rows = Rows()
    drive_day(rows)
    detector = TripDetector(1)
    feed = rows.feed(detector)
    assert [(s.started_at - T0, s.row) for s in feed.started] == [(3600, 6)]
    (trip,) = feed.ended
    assert trip.started_at == T0 + 3600
    assert trip.ended_at == T0 + 3600 + 100 * 30  # the first stopped report
    assert trip.distance_source == "mileage"
    assert trip.distance_m == 10_000.0
    assert abs(trip.track_distance_m - 10_000) < 10
    assert (trip.start_lon, trip.start_lat) == (102.71, 25.04)
    assert abs((trip.end_lon - 102.71) * KX - 10_000) < 1
    phases = feed.phase.tolist()
    assert phases[:6] == [PARKED] * 6
    assert set(phases[6:106]) == {MOVING}
    assert phases[106] == STOPPING
    assert phases[-1] == PARKED
    assert feed.seq[6] == 1
    assert feed.seq[0] == -1


def test_track_distance_without_odometer() -> None:
    rows = Rows()
    drive_day(rows, mileage=False)
    (trip,) = rows.feed(TripDetector(1)).ended
    assert trip.distance_source == "track"
    assert abs(trip.distance_m - 10_000) < 10


def test_implausible_odometer_falls_back_to_the_track() -> None:
    rows = Rows()
    drive_day(rows)
    rows.mileage[-7:] = [9_000_000] * 7  # a jump of 900,000 km
    (trip,) = rows.feed(TripDetector(1)).ended
    assert trip.distance_source == "track"


def test_drift_while_parked_starts_nothing() -> None:
    rng = np.random.default_rng(1)
    rows = Rows()
    t = T0
    for i in range(400):  # ~3 h, idling with ACC on half the time, GNSS noise of 40 m
        dx, dy = rng.normal(0, 40, 2)
        rows.add(
            t=t, east_m=float(dx), north_m=float(dy), speed=float(rng.uniform(0, 4)), acc=i % 2 == 0
        )
        t += 30
    feed = rows.feed(TripDetector(1))
    assert feed.started == []
    assert set(feed.phase.tolist()) == {PARKED}


def test_towing_moves_the_anchor_without_a_trip() -> None:
    rows = Rows()
    rows.add(t=T0, east_m=0, speed=0, acc=False)
    rows.add(t=T0 + 600, east_m=2000, speed=0, acc=False)  # ACC off, 2 km away
    rows.add(t=T0 + 1200, east_m=2010, speed=0, acc=True)  # ignition, idling
    rows.add(t=T0 + 1230, east_m=2050, speed=3, acc=True)
    detector = TripDetector(1)
    assert rows.feed(detector).started == []
    assert abs((detector.anchor_lon[0] - 102.71) * KX - 2000) < 1


def test_short_stops_do_not_split_long_ones_do() -> None:
    def run(stop_s: int) -> list[Trip]:
        rows = Rows()
        t = T0
        rows.add(t=t, east_m=0, speed=0, acc=False)
        t += 600
        for i in range(1, 21):
            rows.add(t=t, east_m=300.0 * i, speed=36, acc=True)
            t += 30
        for _ in range(stop_s // 60):  # a stop, ACC on, at the lights or longer
            rows.add(t=t, east_m=6000.0, speed=0, acc=True)
            t += 60
        for i in range(1, 21):
            rows.add(t=t, east_m=6000.0 + 300.0 * i, speed=36, acc=True)
            t += 30
        rows.add(t=t, east_m=12_000, speed=0, acc=False)
        rows.add(t=t + 3600, east_m=12_000, speed=0, acc=False)
        return rows.feed(TripDetector(1)).ended

    assert len(run(120)) == 1
    trips = run(900)
    assert len(trips) == 2
    assert trips[0].ended_at + 0 < trips[1].started_at


def test_tick_ends_a_trip_whose_stop_lasted() -> None:
    rows = Rows()
    rows.add(t=T0, east_m=0, speed=0, acc=False)
    for i in range(1, 11):
        rows.add(t=T0 + 30 * i, east_m=300.0 * i, speed=36, acc=True)
    rows.add(t=T0 + 330, east_m=3000, speed=0, acc=False)  # ACC off, then the terminal sleeps
    detector = TripDetector(1)
    feed = rows.feed(detector)
    assert feed.ended == []
    assert detector.tick(T0 + 330 + 299) == []
    (trip,) = detector.tick(T0 + 330 + 300)
    assert trip.ended_at == T0 + 330
    assert trip.row == -1
    assert detector.phase[0] == PARKED


def test_without_acc_requirement_movement_alone_counts() -> None:
    rows = Rows()
    rows.add(t=T0, east_m=0, speed=0, acc=False)
    for i in range(1, 6):
        rows.add(t=T0 + 30 * i, east_m=300.0 * i, speed=36, acc=False)
    assert rows.feed(TripDetector(1)).started == []
    relaxed = TripDetector(1, TripConfig(require_acc=False))
    assert len(rows.feed(relaxed).started) == 1


track_steps = st.lists(
    st.tuples(
        st.integers(0, 2),  # vehicle
        st.integers(10, 900),  # seconds since its previous report
        st.floats(0, 800),  # metres moved east since its previous report
        st.floats(0, 90),  # speed
        st.booleans(),  # ACC
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=60)
@given(track_steps, st.lists(st.integers(1, 80), max_size=4))
def test_feeding_in_chunks_changes_nothing(
    steps: list[tuple[int, int, float, float, bool]], cuts: list[int]
) -> None:
    rows = Rows()
    clock = [T0, T0, T0]
    east = [0.0, 0.0, 0.0]
    odo = [1000, 1000, 1000]
    for vehicle, dt, moved, speed, acc in steps:
        clock[vehicle] += dt
        east[vehicle] += moved
        odo[vehicle] += int(moved // 100)
        rows.add(
            vehicle=vehicle,
            t=clock[vehicle],
            east_m=east[vehicle],
            speed=speed,
            acc=acc,
            mileage=odo[vehicle],
        )

    def run(bounds: list[int]) -> tuple[list[tuple[int, int, int]], list[Trip], list[int]]:
        detector = TripDetector(3)
        started: list[tuple[int, int, int]] = []
        ended: list[Trip] = []
        phases: list[int] = []
        for lo, hi in itertools.pairwise(bounds):
            order = sorted(range(lo, hi), key=lambda i: rows.vehicle[i])  # group by vehicle
            chunk = Rows(
                *[[getattr(rows, f.name)[i] for i in order] for f in dataclasses.fields(Rows)]
            )
            feed = chunk.feed(detector)
            started += [(s.vehicle, s.seq, s.started_at) for s in feed.started]
            ended += [dataclasses.replace(t, row=0) for t in feed.ended]
            back = [0] * len(order)
            for k, i in enumerate(order):
                back[i - lo] = int(feed.phase[k])
            phases += back
        return started, ended, phases

    def rounded(trips: list[Trip]) -> list[Trip]:
        return sorted(
            (
                dataclasses.replace(
                    t,
                    distance_m=round(t.distance_m, 6),
                    track_distance_m=round(t.track_distance_m, 6),
                )
                for t in trips
            ),
            key=lambda t: (t.vehicle, t.seq),
        )

    whole = run([0, len(rows.t)])
    bounds = sorted({0, len(rows.t), *(c for c in cuts if c < len(rows.t))})
    split = run(bounds)
    assert sorted(split[0]) == sorted(whole[0])
    assert rounded(split[1]) == rounded(whole[1])
    assert split[2] == whole[2]
