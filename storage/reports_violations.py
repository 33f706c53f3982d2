"""Periodic violation reports (articles 23-24): violations per owning unit and rule.

A violation counts in the period in which its episode *opened* (China time), whatever the day it
was declared: an unfiled trip on 30 September whose back-filing deadline passes on 9 October is
a September violation.  Only alerts in state ``violation`` count (resolved back-filings and
open episodes do not).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, TextIO

import psycopg

from storage.errors import StorageError
from storage.schema import CHINA

__all__ = [
    "BACKFILL_FIGURES",
    "CSV_COLUMNS",
    "BackfillCount",
    "ViolationCount",
    "backfilling_by_unit",
    "month_bounds",
    "violations_by_unit_rule",
    "write_csv",
]

# ASCII digits, the whole string: ``\d`` also takes other scripts' digits (full-width "２０２６"
# is a number to int()) and ``$`` matches before a final newline, and the period is echoed
# into a CSV's file name in a response header, which may hold neither.
_PERIOD_RE = re.compile(r"([0-9]{4})-([0-9]{2})")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ViolationCount:
    unit: str
    rule: str
    violations: int
    vehicles: int  # distinct vehicles with a violation of this rule


def month_bounds(period: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` as the China-time month [start, end)."""
    match = _PERIOD_RE.fullmatch(period)
    if match is None:
        raise StorageError(f"period must be YYYY-MM, got {period!r}")
    year, month = int(match.group(1)), int(match.group(2))
    if not 1 <= month <= 12:
        raise StorageError(f"period month must be 01-12, got {period!r}")
    try:
        first = date(year, month, 1)
        nxt = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    except ValueError:  # the year 0, or 9999-12 (whose end would be the year 10000)
        raise StorageError(f"period {period!r} is out of the calendar's range") from None
    start = datetime.combine(first, datetime.min.time(), CHINA)
    return start, datetime.combine(nxt, datetime.min.time(), CHINA)


def violations_by_unit_rule(
    conn: psycopg.Connection[Any],
    start: datetime,
    end: datetime,
    *,
    unit: str | None = None,
) -> list[ViolationCount]:
    """Violations opened in [start, end), per unit and rule, ordered by unit then rule."""
    if start.tzinfo is None or end.tzinfo is None:
        raise StorageError("report bounds must be timezone-aware")
    rows = conn.execute(
        "SELECT unit, rule, count(*), count(DISTINCT vehicle_id) FROM alerts "
        "WHERE state = 'violation' AND opened_at >= %s AND opened_at < %s "
        "AND (%s::text IS NULL OR unit = %s::text) "
        "GROUP BY unit, rule ORDER BY unit, rule",
        (start, end, unit, unit),
    ).fetchall()
    return [
        ViolationCount(unit=u, rule=r, violations=int(n), vehicles=int(v)) for u, r, n, v in rows
    ]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BackfillCount:
    """Back-filings (article 21) of one unit's trips that began in the period."""

    unit: str
    in_time: int  # back-filed within the deadline: resolved
    late: int  # back-filed after the deadline: still a violation
    claimed_earlier: int  # a filing claimed a filing time well before the platform got it


def backfilling_by_unit(
    conn: psycopg.Connection[Any],
    start: datetime,
    end: datetime,
    *,
    unit: str | None = None,
) -> list[BackfillCount]:
    """Per unit, the episodes opened in [start, end) that were back-filed in time, back-filed
    late, or covered by a filing claiming an earlier time than its receipt (as the rule engine
    recorded them in the alert's detail: ``backfilled``, ``late_filings``, ``claimed_earlier``).
    Units with none of the three are left out."""
    if start.tzinfo is None or end.tzinfo is None:
        raise StorageError("report bounds must be timezone-aware")
    rows = conn.execute(
        "SELECT unit, "
        "count(*) FILTER (WHERE state = 'resolved' AND detail @> '{\"backfilled\": true}'), "
        "count(*) FILTER (WHERE state = 'violation' AND detail ? 'late_filings'), "
        "count(*) FILTER (WHERE detail ? 'claimed_earlier') "
        "FROM alerts WHERE opened_at >= %s AND opened_at < %s "
        "AND (%s::text IS NULL OR unit = %s::text) "
        "AND (detail ? 'backfilled' OR detail ? 'late_filings' OR detail ? 'claimed_earlier') "
        "GROUP BY unit ORDER BY unit",
        (start, end, unit, unit),
    ).fetchall()
    return [
        BackfillCount(unit=u, in_time=int(a), late=int(b), claimed_earlier=int(c))
        for u, a, b, c in rows
    ]


# The CSV of the report (``jt808 report violations --csv`` and the operator port's
# ``/reports/violations?format=csv``): one row per unit and rule, then the back-filing figures,
# one row per unit and figure, in the "rule" column.
CSV_COLUMNS = ("period", "unit", "rule", "violations", "vehicles")
BACKFILL_FIGURES = ("backfilled_in_time", "backfilled_late", "claimed_earlier_than_receipt")


def write_csv(
    period: str,
    counts: Sequence[ViolationCount],
    out: TextIO,
    backfilling: Sequence[BackfillCount] = (),
) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in counts:
        writer.writerow((period, c.unit, c.rule, c.violations, c.vehicles))
    for b in backfilling:
        for figure, value in zip(
            BACKFILL_FIGURES, (b.in_time, b.late, b.claimed_earlier), strict=True
        ):
            writer.writerow((period, b.unit, figure, value, ""))
