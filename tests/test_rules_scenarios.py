"""Acceptance scenarios of the rule engine, on real 2025/2026 calendar days.

A small world around Kunming: the unit's permitted area, a garage (designated parking), a
forbidden zone, a destination with a filing, a speed-limited zone.  Tracks are built the way
terminals report: every 30 s while driving (ACC on), every 10 minutes while parked (ACC off).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime, timedelta

import numpy as np
import pytest

from alerts import (
    AlertState,
    Filing,
    InMemoryAlertStore,
    PositionBatch,
    Registry,
    RuleEngine,
    RulesConfig,
    Vehicle,
    WorkingCalendar,
)
from alerts.calendar import GMT8
from alerts.lifecycle import Alert
from alerts.rules import OutOfAreaRule, Severity, TerminalOfflineRule
from geofence import Circle, Fence, FenceKind, Rectangle
from geofence.geodesy import metres_per_degree
from protocol.batch import LOCATION_DTYPE
from protocol.messages.location import ALARM_POWER_CUT

HOME = (102.71, 25.04)  # Kunming
KX, KY = (float(v) for v in metres_per_degree(HOME[1]))
EDGE_LON = 102.80  # east edge of the permitted area

FENCES = [
    Fence(
        id=1,
        name="kunming",
        kind=FenceKind.PERMITTED,
        unit="gov",
        shape=Rectangle(west=102.50, south=24.80, east=EDGE_LON, north=25.30),
    ),
    Fence(
        id=2,
        name="garage",
        kind=FenceKind.PARKING,
        unit="gov",
        shape=Circle(lon=HOME[0], lat=HOME[1], radius_m=120),
    ),
    Fence(
        id=3,
        name="club",
        kind=FenceKind.FORBIDDEN,
        shape=Circle(lon=102.65, lat=25.10, radius_m=300),
    ),
    Fence(
        id=4,
        name="yuxi",
        kind=FenceKind.DESTINATION,
        shape=Rectangle(west=102.85, south=24.90, east=103.00, north=25.10),
    ),
    Fence(
        id=6,
        name="qujing",
        kind=FenceKind.PERMITTED,
        unit="qujing-gov",  # another unit's jurisdiction
        shape=Rectangle(west=103.05, south=24.90, east=103.30, north=25.10),
    ),
    Fence(
        id=5,
        name="school",
        kind=FenceKind.DESTINATION,
        shape=Circle(lon=102.70, lat=24.98, radius_m=800),
        max_speed_kmh=30.0,
        overspeed_duration_s=10,
    ),
]

CAR = Vehicle(id=101, phone="013800000001", plate="云A00001", unit="gov")
SPECIAL = Vehicle(id=102, phone="013800000002", plate="云A00002", unit="gov", exempt=True)
CALENDAR = WorkingCalendar(years=range(2025, 2028))


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=GMT8)


def offset(p: tuple[float, float], east_m: float, north_m: float = 0.0) -> tuple[float, float]:
    return (p[0] + east_m / KX, p[1] + north_m / KY)


class Track:
    """A terminal's reports, built step by step."""

    def __init__(self, start: datetime, *, vehicle: int = 0, pos: tuple[float, float] = HOME):
        self.vehicle = vehicle
        self.t = start
        self.pos = pos
        self.rows: list[tuple[int, int, float, float, float, int, int]] = []

    def emit(self, speed: float, *, acc: bool, alarm: int = 0) -> None:
        status = (1 if acc else 0) | 2  # ACC, fixed
        when = int(self.t.timestamp())
        self.rows.append((self.vehicle, when, self.pos[0], self.pos[1], speed, status, alarm))

    def park(self, minutes: float, *, every_s: int = 600, alarm: int = 0) -> Track:
        end = self.t + timedelta(minutes=minutes)
        while self.t < end:
            self.emit(0.0, acc=False, alarm=alarm)
            self.t += timedelta(seconds=every_s)
        return self

    def drive(
        self, to: tuple[float, float], *, kmh: float = 40.0, every_s: int = 30, alarm: int = 0
    ) -> Track:
        dist = float(np.hypot((to[0] - self.pos[0]) * KX, (to[1] - self.pos[1]) * KY))
        steps = max(1, round(dist / (kmh / 3.6 * every_s)))
        start = self.pos
        for i in range(1, steps + 1):
            f = i / steps
            self.pos = (start[0] + (to[0] - start[0]) * f, start[1] + (to[1] - start[1]) * f)
            self.emit(kmh, acc=True, alarm=alarm)
            self.t += timedelta(seconds=every_s)
        return self

    def jitter(self, minutes: float, *, sigma_m: float, every_s: int = 30, seed: int = 1) -> Track:
        """Sit still (ACC on, idling) with GNSS noise of ``sigma_m`` metres."""
        rng = np.random.default_rng(seed)
        centre = self.pos
        end = self.t + timedelta(minutes=minutes)
        while self.t < end:
            dx, dy = rng.normal(0, sigma_m, 2)
            self.pos = offset(centre, float(dx), float(dy))
            self.emit(0.0, acc=True)
            self.t += timedelta(seconds=every_s)
        self.pos = centre
        return self

    def batch(self, lo: int = 0, hi: int | None = None) -> PositionBatch:
        rows = np.array(self.rows[lo:hi], dtype=np.float64)
        return PositionBatch.from_arrays(
            vehicle=rows[:, 0],
            time=rows[:, 1],
            lon=rows[:, 2],
            lat=rows[:, 3],
            speed_kmh=rows[:, 4],
            status=rows[:, 5],
            alarm=rows[:, 6],
        )


# Scenarios about back-filing tick the clock days ahead; silent terminals are not the point.
QUIET = dataclasses.replace(RulesConfig(), terminal_offline=TerminalOfflineRule(enabled=False))


def make_engine(
    *,
    config: RulesConfig | None = None,
    filings: tuple[Filing, ...] = (),
    store: InMemoryAlertStore | None = None,
) -> RuleEngine:
    return RuleEngine(
        registry=Registry([CAR, SPECIAL]),
        fences=FENCES,
        calendar=CALENDAR,
        config=config,
        filings=filings,
        store=store,
    )


def store_of(engine: RuleEngine) -> list[Alert]:
    store = engine.store
    assert isinstance(store, InMemoryAlertStore)
    return store.all()


def rules_of(engine: RuleEngine) -> Counter[str]:
    return Counter(a.rule for a in store_of(engine))


def filing(
    start: datetime,
    end: datetime,
    *,
    filed_at: datetime | None = None,
    fid: int = 1,
    destination: int | None = None,
) -> Filing:
    return Filing(
        id=fid,
        vehicle=CAR.id,
        start=start,
        end=end,
        filed_at=filed_at or start - timedelta(days=1),
        destination_fence=destination,
        purpose="inspection",
        passengers="2",
        approver="director",
    )


def errand(start: datetime) -> Track:
    """Garage -> 5 km east -> back, inside the permitted area."""
    return Track(start).park(30).drive(offset(HOME, 5000)).park(20).drive(HOME).park(60)


# ---------------------------------------------------------------------------------------------
# Holiday sealing and unfiled trips (articles 17, 21, 22)


def test_national_day_drive_without_filing_raises_holiday_sealing() -> None:
    engine = make_engine()
    engine.process(Track(at(2026, 10, 3, 9, 0)).park(30).drive(offset(HOME, 5000)).park(60).batch())
    alerts = store_of(engine)
    assert [a.rule for a in alerts] == ["holiday_sealing"]
    alert = alerts[0]
    assert alert.state is AlertState.PENDING_BACKFILL
    assert alert.severity is Severity.HIGH
    assert alert.opened_at == at(2026, 10, 3, 9, 30)
    # 3 working days after Saturday 10-03: 10-08 Thu, 10-09 Fri, 10-10 Sat (make-up day).
    assert alert.deadline == at(2026, 10, 10, 23, 59, 59)
    assert "国庆节" in alert.detail["sealed"]
    record = alert.to_json()
    assert set(record) == {
        "id",
        "rule",
        "state",
        "phone",
        "vehicle",
        "plate",
        "unit",
        "severity",
        "opened_at",
        "updated_at",
        "deadline",
        "closed_at",
        "detail",
    }
    assert record["opened_at"] == "2026-10-03T09:30:00+08:00"
    assert record["deadline"] == "2026-10-10T23:59:59+08:00"
    assert Alert.from_json(record) == alert


def test_make_up_sunday_with_filing_raises_nothing() -> None:
    day = at(2026, 9, 20, 8, 0)  # Sunday, a make-up working day of the 2026 schedule
    engine = make_engine(filings=(filing(at(2026, 9, 20, 8, 0), at(2026, 9, 20, 12, 0)),))
    result = engine.process(errand(day).batch())
    assert result.alerts == []
    assert store_of(engine) == []
    assert [t.filing for t in result.trips_ended] == [1, 1]


def test_make_up_sunday_without_filing_is_an_unfiled_trip_not_sealing() -> None:
    engine = make_engine()
    engine.process(errand(at(2026, 9, 20, 8, 0)).batch())
    assert rules_of(engine) == {"unfiled_trip": 2}


def test_ordinary_saturday_is_sealed() -> None:
    engine = make_engine()
    engine.process(errand(at(2026, 9, 19, 8, 0)).batch())
    assert rules_of(engine) == {"holiday_sealing": 2}
    assert all(a.detail["sealed"] == "weekend" for a in store_of(engine))


@pytest.mark.parametrize(
    ("day", "deadline"),
    [
        # weekend, then Sunday 09-20 is a make-up working day: Sun, Mon, Tue
        (at(2026, 9, 18, 9, 0), at(2026, 9, 22, 23, 59, 59)),
        # an ordinary weekend: Mon, Tue, Wed
        (at(2026, 9, 11, 9, 0), at(2026, 9, 16, 23, 59, 59)),
        # Qingming: Sat-Mon 04-04..04-06 off -> Tue, Wed, Thu
        (at(2026, 4, 3, 9, 0), at(2026, 4, 9, 23, 59, 59)),
        # Spring Festival: Sat 02-14 worked, 02-15..02-23 off -> Sat 14, Tue 24, Wed 25
        (at(2026, 2, 13, 9, 0), at(2026, 2, 25, 23, 59, 59)),
        # 2025: Sunday 09-28 worked before National Day
        (at(2025, 9, 26, 9, 0), at(2025, 9, 30, 23, 59, 59)),
    ],
)
def test_unfiled_friday_trip_deadline_skips_weekends_and_holidays(
    day: datetime, deadline: datetime
) -> None:
    engine = make_engine()
    engine.process(Track(day).park(20).drive(offset(HOME, 4000)).park(30).batch())
    (alert,) = store_of(engine)
    assert alert.rule == "unfiled_trip"
    assert alert.state is AlertState.PENDING_BACKFILL
    assert alert.deadline == deadline


def test_backfiling_in_time_resolves_and_late_leaves_violation() -> None:
    engine = make_engine(config=QUIET)
    engine.process(Track(at(2026, 9, 18, 9, 0)).park(20).drive(offset(HOME, 4000)).park(30).batch())
    (pending,) = store_of(engine)
    assert pending.state is AlertState.PENDING_BACKFILL

    # Before the deadline nothing changes.
    assert engine.tick(at(2026, 9, 22, 12, 0)).alerts == []
    # A filing that does not cover the trip does not resolve it.
    other = filing(at(2026, 9, 19, 9, 0), at(2026, 9, 19, 12, 0), filed_at=at(2026, 9, 21, 9, 0))
    assert engine.add_filings([other]).alerts == []
    # The covering back-filing, filed on Monday.
    backfiled = filing(
        at(2026, 9, 18, 9, 0), at(2026, 9, 18, 11, 0), filed_at=at(2026, 9, 21, 10, 0), fid=2
    )
    (resolved,) = engine.add_filings([backfiled]).alerts
    assert resolved.id == pending.id
    assert resolved.state is AlertState.RESOLVED
    assert resolved.detail["filing"] == 2
    assert resolved.detail["backfilled"] is True
    assert resolved.closed_at == at(2026, 9, 21, 10, 0)
    # The deadline passing no longer matters.
    assert engine.tick(at(2026, 9, 23, 0, 0)).alerts == []

    # Another unfiled trip, back-filed too late.
    engine.process(Track(at(2026, 9, 24, 9, 0)).park(20).drive(offset(HOME, 4000)).park(30).batch())
    late_trip = next(a for a in store_of(engine) if a.state is AlertState.PENDING_BACKFILL)
    # Thu 09-24 -> Fri 25 is Mid-Autumn, then the weekend: Mon 28, Tue 29, Wed 30
    assert late_trip.deadline == at(2026, 9, 30, 23, 59, 59)
    assert engine.tick(at(2026, 9, 30, 23, 59, 59)).alerts == []
    (violation,) = engine.tick(at(2026, 10, 1, 0, 0)).alerts
    assert violation.id == late_trip.id
    assert violation.state is AlertState.VIOLATION
    assert violation.closed_at == late_trip.deadline
    late = filing(
        at(2026, 9, 24, 9, 0), at(2026, 9, 24, 11, 0), filed_at=at(2026, 10, 1, 8, 0), fid=3
    )
    (still,) = engine.add_filings([late]).alerts
    assert still.state is AlertState.VIOLATION
    assert still.detail["late_filings"] == [3]


def test_filing_known_late_but_filed_in_time_corrects_a_violation() -> None:
    engine = make_engine(config=QUIET)
    engine.process(Track(at(2026, 9, 11, 9, 0)).park(20).drive(offset(HOME, 4000)).park(30).batch())
    (violation,) = engine.tick(at(2026, 9, 20, 0, 0)).alerts
    assert violation.state is AlertState.VIOLATION
    in_time = filing(at(2026, 9, 11, 9, 0), at(2026, 9, 11, 12, 0), filed_at=at(2026, 9, 14, 9, 0))
    (fixed,) = engine.add_filings([in_time]).alerts
    assert fixed.state is AlertState.RESOLVED
    assert fixed.detail["corrected_from"] == "violation"


def test_holiday_drive_covered_by_filing_raises_nothing() -> None:
    engine = make_engine(filings=(filing(at(2026, 10, 3, 9, 0), at(2026, 10, 3, 12, 0)),))
    engine.process(errand(at(2026, 10, 3, 9, 0)).batch())
    assert store_of(engine) == []


def test_drive_into_the_holiday_after_a_filed_workday_trip() -> None:
    """A filed trip on 09-30 that runs past midnight into National Day, beyond its filing."""
    engine = make_engine(filings=(filing(at(2026, 9, 30, 22, 0), at(2026, 9, 30, 23, 50)),))
    track = Track(at(2026, 9, 30, 22, 0)).park(10).drive(offset(HOME, -15000, 25000), kmh=12)
    engine.process(track.park(30).batch())
    assert rules_of(engine) == {"holiday_sealing": 1, "overdue_return": 1}
    (alert,) = [a for a in store_of(engine) if a.rule == "holiday_sealing"]
    assert alert.opened_at == at(2026, 10, 1, 0, 0)


# ---------------------------------------------------------------------------------------------
# Geofences (article 9)


def test_border_jitter_raises_one_out_of_area_episode() -> None:
    """Out across the east edge, back to it, then idling on the line for 40 minutes with
    15 m of GNSS noise (half the fixes on each side), then home."""
    edge = (EDGE_LON, 25.05)
    track = Track(at(2026, 9, 21, 9, 0)).park(10).drive(offset(edge, -2000))
    track.drive(offset(edge, 2000)).drive(edge).jitter(40, sigma_m=15)
    track.drive(offset(edge, -2000)).drive(HOME).park(30)
    engine = make_engine(filings=(filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 18, 0)),))
    engine.process(track.batch())
    alerts = [a for a in store_of(engine) if a.rule == "out_of_area"]
    assert len(alerts) == 1
    assert alerts[0].state is AlertState.VIOLATION
    assert alerts[0].closed_at is not None

    # The same track without hysteresis (no margin, one sample) flaps.
    bare = dataclasses.replace(RulesConfig(), margin_m=0.0, out_of_area=OutOfAreaRule(samples=1))
    flapping = make_engine(
        config=bare, filings=(filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 18, 0)),)
    )
    flapping.process(track.batch())
    assert rules_of(flapping)["out_of_area"] > 3


@pytest.mark.parametrize(
    ("place", "fence_id"),
    [
        ((102.90, 25.00), 4),  # a destination area
        ((103.10, 25.00), 6),  # another unit's permitted area
    ],
)
def test_out_of_area_covered_by_the_filings_destination(
    place: tuple[float, float], fence_id: int
) -> None:
    trip = Track(at(2026, 9, 21, 9, 0)).park(10).drive(place, kmh=60).park(90)
    trip.drive(HOME, kmh=60)
    filed = filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 18, 0), destination=fence_id)
    engine = make_engine(filings=(filed,))
    engine.process(trip.park(30).batch())
    assert store_of(engine) == []
    # Without the destination the same filed trip leaves the permitted area.
    no_dest = make_engine(filings=(dataclasses.replace(filed, destination_fence=None),))
    no_dest.process(trip.batch())
    assert rules_of(no_dest) == {"out_of_area": 1}


def test_forbidden_zone_dwell() -> None:
    club = (102.65, 25.10)
    covered = (filing(at(2026, 9, 21, 19, 0), at(2026, 9, 21, 23, 0)),)
    short = Track(at(2026, 9, 21, 19, 0)).park(10).drive(club).park(3, every_s=60)
    short.drive(HOME).park(30)
    engine = make_engine(filings=covered)
    engine.process(short.batch())
    assert store_of(engine) == []  # passing through / 3 minutes: under the 5 minute dwell

    long = Track(at(2026, 9, 21, 19, 0)).park(10).drive(club).park(90, every_s=300)
    long.drive(HOME).park(30)
    engine = make_engine(filings=covered)
    engine.process(long.batch())
    (alert,) = store_of(engine)
    assert alert.rule == "forbidden_zone"
    assert alert.detail["fence_name"] == "club"
    assert alert.state is AlertState.VIOLATION


def test_overspeed_in_a_limited_zone() -> None:
    school = (102.70, 24.98)
    filed = (filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 12, 0)),)
    north, south = offset(school, 0, 1500), offset(school, 0, -1500)
    slow = Track(at(2026, 9, 21, 9, 0)).park(10).drive(north, kmh=60)
    slow.drive(south, kmh=25).drive(offset(south, 2500), kmh=60).drive(HOME, kmh=60).park(30)
    engine = make_engine(filings=filed)
    engine.process(slow.batch())
    assert store_of(engine) == []

    fast = Track(at(2026, 9, 21, 9, 0)).park(10).drive(north, kmh=60)
    fast.drive(south, kmh=45).drive(offset(south, 2500), kmh=60).drive(HOME, kmh=60).park(30)
    engine = make_engine(filings=filed)
    engine.process(fast.batch())
    (alert,) = store_of(engine)
    assert alert.rule == "overspeed"
    assert alert.detail["limit_kmh"] == 30.0
    assert alert.detail["fence"] == 5
    assert alert.state is AlertState.VIOLATION


# ---------------------------------------------------------------------------------------------
# Parking, returns


def test_overnight_parking_outside_the_garage() -> None:
    away = offset(HOME, 6000)
    filed = (
        filing(at(2026, 9, 21, 18, 0), at(2026, 9, 21, 20, 0)),
        filing(at(2026, 9, 22, 8, 0), at(2026, 9, 22, 9, 0), fid=2),
    )
    track = Track(at(2026, 9, 21, 18, 0)).park(10).drive(away).park(14 * 60, every_s=3600)
    track.drive(HOME).park(30)
    config = dataclasses.replace(
        RulesConfig(),
        overdue_return=dataclasses.replace(RulesConfig().overdue_return, enabled=False),
    )
    engine = make_engine(filings=filed, config=config)
    engine.process(track.batch())
    (alert,) = store_of(engine)
    assert alert.rule == "overnight_parking"
    assert alert.state is AlertState.VIOLATION
    # parked ~18:20, window from 22:00, 3 hours into it
    assert alert.opened_at == at(2026, 9, 22, 1, 0)

    # Parked in the garage overnight: nothing.
    home = Track(at(2026, 9, 21, 18, 0)).park(14 * 60, every_s=3600)
    engine = make_engine(config=config)
    engine.process(home.batch())
    assert store_of(engine) == []


def test_overnight_parking_seen_only_by_the_morning_report() -> None:
    """A sleeping terminal: the last report at 21:00, the next one when driving at 08:00."""
    away = offset(HOME, 6000)
    config = dataclasses.replace(
        RulesConfig(),
        overdue_return=dataclasses.replace(RulesConfig().overdue_return, enabled=False),
    )
    filed = (filing(at(2026, 9, 21, 20, 0), at(2026, 9, 22, 9, 0)),)
    engine = make_engine(filings=(), config=config)
    track = Track(at(2026, 9, 21, 20, 0)).park(5).drive(away).park(1, every_s=60)
    track.t = at(2026, 9, 22, 8, 0)
    track.drive(HOME).park(30)
    engine.process(track.batch())
    overnight = [a for a in store_of(engine) if a.rule == "overnight_parking"]
    assert len(overnight) == 1
    assert overnight[0].closed_at == at(2026, 9, 22, 8, 0)
    # A filing covering the night excuses it.
    engine = make_engine(filings=filed, config=config)
    engine.process(track.batch())
    assert [a for a in store_of(engine) if a.rule == "overnight_parking"] == []


def test_overdue_return_after_the_filed_end() -> None:
    away = offset(HOME, 6000)
    filed = (filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 11, 0)),)
    track = Track(at(2026, 9, 21, 9, 0)).park(10).drive(away).park(4 * 60, every_s=600)
    track.drive(HOME).park(30)
    engine = make_engine(filings=filed)
    engine.process(track.batch())
    (alert,) = store_of(engine)
    assert alert.rule == "overdue_return"
    assert alert.opened_at == at(2026, 9, 21, 12, 0)  # filed end + 1 h grace
    assert alert.detail["filing"] == 1
    assert alert.state is AlertState.VIOLATION

    # Back in the garage before the end: nothing.
    on_time = Track(at(2026, 9, 21, 9, 0)).park(10).drive(away).park(30).drive(HOME).park(600)
    engine = make_engine(filings=filed)
    engine.process(on_time.batch())
    engine.tick(at(2026, 9, 21, 23, 0))
    assert [a for a in store_of(engine) if a.rule == "overdue_return"] == []


def test_overdue_return_raised_by_the_clock() -> None:
    away = offset(HOME, 6000)
    filed = (filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 11, 0)),)
    engine = make_engine(filings=filed)
    engine.process(Track(at(2026, 9, 21, 9, 0)).park(10).drive(away).park(1, every_s=60).batch())
    assert engine.tick(at(2026, 9, 21, 11, 30)).alerts == []
    overdue = [a for a in engine.tick(at(2026, 9, 21, 12, 5)).alerts if a.rule == "overdue_return"]
    assert [a.opened_at for a in overdue] == [at(2026, 9, 21, 12, 0)]


# ---------------------------------------------------------------------------------------------
# The terminal (article 18)


def test_power_cut_alarm_raises_terminal_tamper() -> None:
    engine = make_engine()
    track = Track(at(2026, 9, 21, 8, 0)).park(30).park(20, alarm=ALARM_POWER_CUT).park(30)
    result = engine.process(track.batch())
    (opened, closed) = result.alerts
    assert opened.rule == closed.rule == "terminal_tamper"
    assert opened.id == closed.id
    assert opened.state is AlertState.OPEN
    assert opened.opened_at == at(2026, 9, 21, 8, 30)
    assert opened.detail["alarm"] == "power_cut"
    assert opened.detail["alarm_bit"] == 8
    assert closed.state is AlertState.VIOLATION
    assert closed.closed_at == at(2026, 9, 21, 8, 50)


def test_terminal_offline_by_gap_and_by_clock() -> None:
    engine = make_engine(filings=(filing(at(2026, 9, 21, 8, 0), at(2026, 9, 21, 12, 0)),))
    first = Track(at(2026, 9, 21, 8, 0)).park(10).drive(offset(HOME, 3000))
    engine.process(first.batch())
    # Silent while driving: after 15 minutes the clock opens an episode ...
    assert engine.tick(first.t + timedelta(minutes=10)).alerts == []
    (opened,) = engine.tick(first.t + timedelta(minutes=20)).alerts
    assert opened.rule == "terminal_offline"
    assert opened.state is AlertState.OPEN
    # ... and the next report closes the same episode.
    second = Track(first.t + timedelta(minutes=40), pos=first.pos).drive(HOME).park(20)
    (closed,) = engine.process(second.batch()).alerts
    assert closed.id == opened.id
    assert closed.state is AlertState.RESOLVED

    # Replaying the same reports without ticks gives the same episode from the gap alone.
    replay = make_engine(filings=(filing(at(2026, 9, 21, 8, 0), at(2026, 9, 21, 12, 0)),))
    replay.process(first.batch())
    (again,) = replay.process(second.batch()).alerts
    assert again == closed


def test_exempt_vehicle_raises_nothing() -> None:
    engine = make_engine()
    track = Track(at(2026, 10, 3, 9, 0), vehicle=1).park(30)
    track.drive((103.2, 25.5), kmh=130, alarm=ALARM_POWER_CUT).park(60)
    result = engine.process(track.batch())
    assert result.alerts == []
    assert result.ignored == len(track.rows)
    assert engine.tick(at(2026, 10, 20)).alerts == []


# ---------------------------------------------------------------------------------------------
# Device time, replays, restarts


def _day_with_everything() -> Track:
    away = offset(HOME, 6000)
    track = Track(at(2026, 9, 30, 8, 0)).park(30).drive(away).park(20, alarm=ALARM_POWER_CUT)
    track.drive((102.85, 25.05), kmh=50).jitter(10, sigma_m=20).drive(HOME).park(120)
    return track.drive(away).park(60).drive(HOME).park(60)


def _final(engine: RuleEngine) -> list[dict[str, object]]:
    return sorted((a.to_json() for a in store_of(engine)), key=lambda r: str(r["id"]))


def test_replay_in_one_batch_equals_live_in_small_batches() -> None:
    track = _day_with_everything()
    backfiling = filing(
        at(2026, 9, 30, 8, 0), at(2026, 9, 30, 10, 0), filed_at=at(2026, 9, 30, 14, 0)
    )
    live = make_engine()
    for lo in range(0, len(track.rows), 7):
        live.process(track.batch(lo, lo + 7))
        live.tick(track.rows[min(lo + 6, len(track.rows) - 1)][1] + 60)
    live.add_filings([backfiling])  # the back-filing arrives in the afternoon
    live.tick(at(2026, 10, 20))

    replay = make_engine(filings=(backfiling,))
    shuffled = track.batch()
    order = np.random.default_rng(3).permutation(len(shuffled))
    replay.process(PositionBatch(**{f: getattr(shuffled, f)[order] for f in _FIELDS}))
    replay.tick(at(2026, 10, 20))

    assert _final(live) == _final(replay)
    outcome = Counter((r["rule"], r["state"]) for r in _final(live))
    # Five trips (stops of 5 minutes or more split them); the back-filing covers the three
    # that started between 07:30 and 10:00, the other two became violations on 10-10.
    assert outcome == {
        ("unfiled_trip", "resolved"): 3,
        ("unfiled_trip", "violation"): 2,
        ("terminal_tamper", "violation"): 1,
        ("out_of_area", "violation"): 1,
        ("terminal_offline", "open"): 1,  # silent since 13:58 when the clock reads 10-20
    }


_FIELDS = ("vehicle", "time", "lon", "lat", "speed_kmh", "status", "alarm", "mileage", "received")


def test_late_rows_are_counted_and_skipped() -> None:
    track = errand(at(2026, 9, 21, 8, 0))
    engine = make_engine()
    engine.process(track.batch(10))
    result = engine.process(track.batch(0, 10))
    assert result.late == 10
    assert result.evaluated == 0


def test_hold_window_lets_backfilled_rows_slot_in() -> None:
    """With hold_s, a blind-spot back-fill (0x0704) arriving after newer live reports is
    still evaluated in device-time order."""
    track = errand(at(2026, 9, 21, 8, 0))
    n = len(track.rows)
    engine = RuleEngine(
        registry=Registry([CAR, SPECIAL]), fences=FENCES, calendar=CALENDAR, hold_s=3600
    )
    engine.process(track.batch(n // 2))  # the live reports after the blind spot
    result = engine.process(track.batch(0, n // 2))  # the back-filled ones
    assert result.late == 0
    result = engine.tick(at(2026, 9, 22))
    assert result.late == 0
    reference = make_engine()
    reference.process(track.batch())
    reference.tick(at(2026, 9, 22))
    assert _final(engine) == _final(reference)


def test_restarted_engine_does_not_duplicate_open_episodes() -> None:
    store = InMemoryAlertStore()
    edge = (EDGE_LON, 25.05)
    track = Track(at(2026, 9, 21, 9, 0)).park(10).drive(offset(edge, 3000)).jitter(20, sigma_m=5)
    filed = (filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 18, 0)),)
    first = make_engine(store=store, filings=filed)
    first.process(track.batch())
    open_before = [a for a in store.all() if a.state is AlertState.OPEN]
    assert [a.rule for a in open_before] == ["out_of_area"]

    second = make_engine(store=store, filings=filed)  # a restart: state lost, store kept
    more = Track(track.t, pos=track.pos).jitter(20, sigma_m=5).drive(HOME).park(20)
    second.process(more.batch())
    alerts = [a for a in store.all() if a.rule == "out_of_area"]
    assert len(alerts) == 1
    assert alerts[0].state is AlertState.VIOLATION


def test_positions_from_decoder_rows() -> None:
    rows = np.zeros(2, dtype=LOCATION_DTYPE)
    rows["phone"] = [b"013800000001", b"019999999999"]
    rows["latitude"] = 25_040_000
    rows["longitude"] = 102_710_000
    rows["status"] = 0b11
    rows["speed"] = 405
    rows["time"] = int(at(2026, 9, 21, 8, 0).timestamp())
    rows["mileage"] = [1234, -1]
    batch = PositionBatch.from_locations(rows, Registry([CAR, SPECIAL]).index_of_phone)
    assert batch.vehicle.tolist() == [0, -1]
    assert batch.speed_kmh.tolist() == [40.5, 40.5]
    assert batch.lon.tolist() == [102.71, 102.71]
    assert batch.mileage.tolist() == [1234, -1]


# ---------------------------------------------------------------------------------------------
# Master data changes take effect without a restart


def test_fences_registry_and_filings_change_live() -> None:
    engine = make_engine(config=QUIET)
    # A new permitted area that excludes the garage's district: the car is now outside it.
    far = Fence(
        id=1,
        name="kunming",
        kind=FenceKind.PERMITTED,
        unit="gov",
        shape=Rectangle(west=103.0, south=24.8, east=103.2, north=25.3),
    )
    engine.set_fences([far, *FENCES[1:]])
    filed = filing(at(2026, 9, 21, 9, 0), at(2026, 9, 21, 18, 0))
    engine.add_filings([filed])
    engine.process(errand(at(2026, 9, 21, 9, 0)).batch())
    assert rules_of(engine) == {"out_of_area": 1}

    # A new vehicle appended to the registry is evaluated from its first report.
    newcomer = Vehicle(id=103, phone="013800000003", plate="云A00003", unit="gov")
    engine.set_registry(Registry([CAR, SPECIAL, newcomer]))
    engine.process(errand(at(2026, 9, 22, 9, 0)).batch())  # still vehicle 0, unfiled now
    engine.process(Track(at(2026, 9, 22, 9, 0), vehicle=2).park(10).batch())
    assert rules_of(engine)["unfiled_trip"] == 2
    with pytest.raises(ValueError, match="changed"):
        engine.set_registry(Registry([newcomer, SPECIAL, CAR]))

    # A cancelled filing no longer covers later trips.
    engine.remove_filings([filed.id])
    engine.process(errand(at(2026, 9, 21, 14, 0)).batch())  # late rows: skipped
    later = Track(at(2026, 9, 23, 9, 0)).park(10).drive(offset(HOME, 3000)).park(30)
    engine.process(later.batch())
    assert rules_of(engine)["unfiled_trip"] == 3


def test_unknown_terminals_and_missing_times_are_ignored() -> None:
    engine = make_engine()
    batch = errand(at(2026, 9, 21, 9, 0)).batch()
    batch.vehicle[:5] = -1
    batch.vehicle[5:8] = 7  # not in the registry
    batch.time[8] = np.iinfo(np.int64).min  # protocol.batch.TIME_ABSENT
    result = engine.process(batch)
    assert result.ignored == 9
    assert result.evaluated == len(batch) - 9
