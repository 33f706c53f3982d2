"""The working-day calendar: the State Council schedules of 2025 and 2026, sealing periods."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import holidays
import numpy as np
import pytest

from alerts.calendar import GMT8, SealingPeriod, WorkingCalendar, china_day, posix

CALENDAR = WorkingCalendar(years=range(2025, 2028))


@pytest.mark.parametrize(
    ("day", "working"),
    [
        (date(2026, 9, 20), True),  # Sunday, make-up working day for National Day
        (date(2026, 10, 10), True),  # Saturday, make-up working day
        (date(2026, 10, 1), False),
        (date(2026, 10, 3), False),
        (date(2026, 10, 6), False),  # Tuesday, substituted day off (for 09-20)
        (date(2026, 10, 7), False),  # Wednesday, substituted day off (for 10-10)
        (date(2026, 10, 8), True),
        (date(2026, 9, 25), False),  # Mid-Autumn Festival
        (date(2026, 1, 4), True),  # Sunday after New Year, worked
        (date(2026, 2, 14), True),  # Saturday before Spring Festival, worked
        (date(2026, 2, 16), False),  # Spring Festival's Eve
        (date(2026, 2, 23), False),  # Monday, substituted day off
        (date(2026, 2, 28), True),  # Saturday, worked
        (date(2025, 10, 8), False),  # 2025: National Day + Mid-Autumn to 10-08
        (date(2025, 10, 11), True),  # Saturday, worked
        (date(2025, 9, 28), True),  # Sunday, worked
        (date(2026, 9, 19), False),  # an ordinary Saturday
        (date(2026, 9, 21), True),  # an ordinary Monday
    ],
)
def test_working_days_follow_the_official_schedule(day: date, working: bool) -> None:
    assert CALENDAR.is_working_day(day) is working


def test_names_and_official_schedules() -> None:
    assert CALENDAR.holiday_name(date(2026, 10, 1)) == "国庆节"
    name = CALENDAR.holiday_name(date(2026, 10, 6))
    assert name is not None
    assert "调休" in name
    assert "2026-09-20" in name
    assert CALENDAR.holiday_name(date(2026, 9, 21)) is None
    assert CALENDAR.has_official_schedule(2025)
    assert CALENDAR.has_official_schedule(2026)
    assert not CALENDAR.has_official_schedule(2099)


def test_vectorised_sealing_matches_holidays_package() -> None:
    reference = holidays.country_holidays("CN", years=[2025, 2026])
    start = int(datetime(2025, 1, 1, tzinfo=GMT8).timestamp())
    times = start + np.arange(0, 2 * 366 * 86400, 3 * 3600 + 17, dtype=np.int64)
    times = times[times < int(datetime(2027, 1, 1, tzinfo=GMT8).timestamp())]
    got = CALENDAR.sealed_mask(times)
    want = [not reference.is_working_day(china_day(int(t))) for t in times]
    assert got.tolist() == want


def test_days_are_china_days() -> None:
    # 2026-10-01 00:30 in China is still 09-30 in UTC.
    moment = datetime(2026, 9, 30, 16, 30, tzinfo=UTC)
    assert china_day(moment) == date(2026, 10, 1)
    assert CALENDAR.is_sealed(moment)
    assert not CALENDAR.is_sealed(moment - timedelta(hours=1))
    assert CALENDAR.sealing_reason(moment) == "holiday: 国庆节"
    assert CALENDAR.sealing_reason(datetime(2026, 9, 19, 9, tzinfo=GMT8)) == "weekend"
    with pytest.raises(ValueError, match="naive"):
        posix(datetime(2026, 10, 1))


def test_local_sealing_periods() -> None:
    calendar = WorkingCalendar(
        years=[2026],
        sealing_periods=[
            SealingPeriod(
                start=datetime(2026, 6, 1, 18, tzinfo=GMT8),
                end=datetime(2026, 6, 2, 8, tzinfo=GMT8),
                name="flood emergency",
            ),
            SealingPeriod(
                start=datetime(2026, 6, 2, 7, tzinfo=GMT8),
                end=datetime(2026, 6, 2, 9, tzinfo=GMT8),
            ),
        ],
    )
    assert not calendar.is_sealed(datetime(2026, 6, 1, 17, 59, tzinfo=GMT8))
    assert calendar.is_sealed(datetime(2026, 6, 1, 18, tzinfo=GMT8))
    assert (
        calendar.sealing_reason(datetime(2026, 6, 1, 20, tzinfo=GMT8)) == "local: flood emergency"
    )
    assert calendar.is_sealed(datetime(2026, 6, 2, 8, 30, tzinfo=GMT8))  # merged overlap
    assert not calendar.is_sealed(datetime(2026, 6, 2, 9, tzinfo=GMT8))
    with pytest.raises(ValueError, match="ends before"):
        SealingPeriod(
            start=datetime(2026, 6, 2, tzinfo=GMT8), end=datetime(2026, 6, 1, tzinfo=GMT8)
        )


def test_add_working_days_and_deadlines() -> None:
    friday = date(2026, 9, 18)
    assert [CALENDAR.add_working_days(friday, n) for n in (1, 2, 3, 4)] == [
        date(2026, 9, 20),
        date(2026, 9, 21),
        date(2026, 9, 22),
        date(2026, 9, 23),
    ]
    assert CALENDAR.add_working_days(date(2026, 9, 30), 1) == date(2026, 10, 8)
    deadline = CALENDAR.backfill_deadline(datetime(2026, 9, 30, 23, 59, tzinfo=GMT8))
    assert deadline == datetime(2026, 10, 10, 23, 59, 59, tzinfo=GMT8)
    assert deadline.isoformat() == "2026-10-10T23:59:59+08:00"
    with pytest.raises(ValueError, match="at least 1"):
        CALENDAR.add_working_days(friday, 0)


def test_table_grows_beyond_its_years() -> None:
    calendar = WorkingCalendar(years=[2026])
    assert calendar.is_working_day(date(2030, 10, 1)) is False
    when = np.array([int(datetime(2031, 1, 1, 12, tzinfo=GMT8).timestamp())])
    assert calendar.sealed_mask(when).tolist() == [True]
    assert calendar.sealed_mask(np.zeros(0, dtype=np.int64)).size == 0
