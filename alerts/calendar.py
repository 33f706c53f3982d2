"""The Chinese working-day calendar and sealing periods, in China time (GMT+8).

Working days come from the ``holidays`` package's China calendar
(``holidays.country_holidays("CN")``, class ``holidays.China``), which carries the State
Council's yearly schedule: statutory holidays, the *substituted days off* (调休, weekdays off
in exchange for a weekend worked) and the *make-up working days* (补班, weekends worked, held
in ``weekend_workdays``).  A day is a working day when it is a weekday
that is not a holiday or day off, or a weekend day on the make-up list -- what
``HolidayBase.is_working_day`` answers.  The 2026 schedule (National Day 10-01..10-07 off;
Sunday 09-20 and Saturday 10-10 worked) needs ``holidays`` >= 0.85; for a year whose schedule
the package does not carry, only the statutory days and weekends are known
(:meth:`WorkingCalendar.has_official_schedule` tells).

*Sealed* (节假日封存, article 22) means a non-working day or a local sealing period from
configuration.  The back-filing deadline of article 21 is the end (23:59:59 China time) of the
``n``-th working day after the day a trip started.

Instants are POSIX seconds (ints) or aware datetimes; days are China-time calendar dates.
Lookups are table-driven so that a whole batch of positions is classified with numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta

import holidays
import numpy as np
import numpy.typing as npt

from protocol.fields import GMT8

__all__ = ["GMT8", "SealingPeriod", "WorkingCalendar", "china_day", "posix"]

I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

_GMT8_S = 8 * 3600
_DAY_S = 86400
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_THURSDAY = 3  # 1970-01-01, day 0, was a Thursday (Monday = 0)
# The day table is built for this many years around the years first asked for and grown on
# demand; 40 years of bools is 15 kB.
_DEFAULT_YEARS = range(2020, 2041)
_LANGUAGE = "zh_CN"  # holiday names in alert details are for Chinese operators
# Bounds the search for the n-th working day: the longest runs of non-working days in the
# official schedules are 9-10 days (Spring Festival 2026; 2020 with its Covid extension), so
# each working day is found within a couple of weeks, far inside this.
_MAX_SCAN_DAYS = 370


def posix(when: datetime | int) -> int:
    """POSIX seconds of an aware datetime (or an int, returned as is)."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(f"naive datetime {when!r}: give a timezone (devices report GMT+8)")
        return math.floor(when.timestamp())
    return int(when)


def china_day(when: datetime | int) -> date:
    """The China-time calendar date of an instant."""
    return date.fromordinal((posix(when) + _GMT8_S) // _DAY_S + _EPOCH_ORDINAL)


def _china(years: Iterable[int]) -> holidays.HolidayBase:
    """The ``holidays`` China calendar (``holidays.China``) for ``years``."""
    return holidays.country_holidays("CN", years=list(years), language=_LANGUAGE)


def _day_number(d: date) -> int:
    return d.toordinal() - _EPOCH_ORDINAL


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SealingPeriod:
    """A local sealing period [start, end) from configuration, e.g. a provincial order."""

    start: datetime
    end: datetime
    name: str = "local sealing period"

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("sealing period times must be timezone-aware")
        if self.end <= self.start:
            raise ValueError(f"sealing period {self.name!r} ends before it starts")


class WorkingCalendar:
    """Working days, sealed instants and back-filing deadlines (see the module docstring)."""

    def __init__(
        self,
        *,
        sealing_periods: Sequence[SealingPeriod] = (),
        years: Iterable[int] = _DEFAULT_YEARS,
    ) -> None:
        year_list = sorted(set(years))
        if not year_list:
            raise ValueError("years must not be empty")
        self._china = _china(year_list)
        self._first_year = year_list[0]
        self._last_year = year_list[-1]
        self._build_table()
        self.sealing_periods = tuple(sorted(sealing_periods, key=lambda p: p.start))
        starts = [posix(p.start) for p in self.sealing_periods]
        ends = [posix(p.end) for p in self.sealing_periods]
        # Merged, sorted intervals for the vectorised test.
        merged: list[list[int]] = []
        for s, e in sorted(zip(starts, ends, strict=True)):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._seal_start = np.array([m[0] for m in merged], dtype=np.int64)
        self._seal_end = np.array([m[1] for m in merged], dtype=np.int64)

    # -----------------------------------------------------------------------------------------
    # Day table

    def _build_table(self) -> None:
        first = date(self._first_year, 1, 1)
        last = date(self._last_year, 12, 31)
        self._day0 = _day_number(first)
        days = (last - first).days + 1
        # Weekdays work unless listed as a holiday or day off; weekends rest unless listed as
        # a make-up working day (what HolidayBase.is_working_day answers, for the whole range).
        weekday = (np.arange(self._day0, self._day0 + days) + _THURSDAY) % 7
        working = weekday < 5
        off = [_day_number(d) - self._day0 for d in self._china]
        working[[i for i in off if 0 <= i < days]] = False
        extra = [_day_number(d) - self._day0 for d in self._china.weekend_workdays]
        working[[i for i in extra if 0 <= i < days]] = True
        self._working = working

    def _ensure(self, first_day: int, last_day: int) -> None:
        lo_year = date.fromordinal(first_day + _EPOCH_ORDINAL).year
        hi_year = date.fromordinal(last_day + _EPOCH_ORDINAL).year
        if lo_year >= self._first_year and hi_year <= self._last_year:
            return
        self._first_year = min(self._first_year, lo_year)
        self._last_year = max(self._last_year, hi_year)
        self._china = _china(range(self._first_year, self._last_year + 1))
        self._build_table()

    def has_official_schedule(self, year: int) -> bool:
        """Whether the installed ``holidays`` carries the State Council schedule for ``year``
        (substituted days off and make-up working days), not just the statutory days."""
        china = _china([year])
        if any(d.year == year for d in china.weekend_workdays):
            return True
        return any("调休" in str(name) for name in china.values())

    # -----------------------------------------------------------------------------------------
    # Days

    def is_working_day(self, day: date) -> bool:
        n = _day_number(day)
        self._ensure(n, n)
        return bool(self._working[n - self._day0])

    def holiday_name(self, day: date) -> str | None:
        """The holiday or day-off name ``holidays`` gives the day (None for ordinary days)."""
        self._ensure(_day_number(day), _day_number(day))
        name = self._china.get(day)
        return None if name is None else str(name)

    def add_working_days(self, start: date, n: int) -> date:
        """The ``n``-th working day after ``start`` (``start`` itself does not count)."""
        if n < 1:
            raise ValueError("n must be at least 1")
        day = start
        found = 0
        for _ in range(_MAX_SCAN_DAYS * n):
            day += timedelta(days=1)
            if self.is_working_day(day):
                found += 1
                if found == n:
                    return day
        raise ValueError(f"no {n} working days within {_MAX_SCAN_DAYS * n} days of {start}")

    def backfill_deadline(self, started: datetime | int, working_days: int = 3) -> datetime:
        """End (23:59:59 China time) of the ``working_days``-th working day after the day
        ``started`` falls on: the article 21 back-filing deadline."""
        day = self.add_working_days(china_day(started), working_days)
        return datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=GMT8)

    # -----------------------------------------------------------------------------------------
    # Instants

    def is_sealed(self, when: datetime | int) -> bool:
        """Whether the instant falls on a non-working day or in a local sealing period."""
        return bool(self.sealed_mask(np.array([posix(when)], dtype=np.int64))[0])

    def sealing_reason(self, when: datetime | int) -> str | None:
        """Why the instant is sealed ("holiday: National Day", "weekend", "local: ..."), or
        None when it is not."""
        t = posix(when)
        for period in self.sealing_periods:
            if posix(period.start) <= t < posix(period.end):
                return f"local: {period.name}"
        day = china_day(t)
        if self.is_working_day(day):
            return None
        name = self.holiday_name(day)
        return f"holiday: {name}" if name else "weekend"

    def sealed_mask(self, times: I64) -> Bools:
        """Vectorised :meth:`is_sealed` over POSIX seconds."""
        t = np.asarray(times, dtype=np.int64)
        if t.size == 0:
            return np.zeros(0, dtype=bool)
        day = (t + _GMT8_S) // _DAY_S
        self._ensure(int(day.min()), int(day.max()))
        sealed = ~self._working[day - self._day0]
        if self._seal_start.size:
            k = np.searchsorted(self._seal_start, t, side="right") - 1
            inside = (k >= 0) & (t < self._seal_end[np.maximum(k, 0)])
            sealed |= inside
        return np.asarray(sealed, dtype=bool)
