"""``jt808 report violations --period 2026-10 [--unit U] [--csv FILE] [--png FILE]``.

The periodic violation report of articles 23-24: violations per owning unit and rule for a
China-time month (counted in the month their episode opened), as a table on standard output,
optionally as CSV and as a PNG chart in Chinese and English (``tools/report_chart.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import psycopg

from storage import (
    StorageError,
    ViolationCount,
    database_dsn,
    month_bounds,
    violations_by_unit_rule,
)
from storage.reports_violations import BackfillCount, backfilling_by_unit, write_csv
from tools.db_cmd import add_database_arguments, resolve
from tools.report_chart import ChartFontError, draw_png
from tools.text import display_width, pad

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  jt808 report violations --period 2026-10
  jt808 report violations --period 2026-10 --unit 昆明市财政局 --csv oct.csv --png oct.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", choices=["violations"], help="violations per unit and rule")
    parser.add_argument("--period", required=True, help="month, YYYY-MM (China time)")
    parser.add_argument("--unit", help="only this owning unit")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write CSV to FILE")
    parser.add_argument("--png", type=Path, metavar="FILE", help="also draw a bar chart to FILE")
    add_database_arguments(parser)


def write_table(period: str, counts: Sequence[ViolationCount], out: TextIO) -> None:
    # By display width: a Chinese unit name takes two columns a character.
    width = max([4, *(display_width(c.unit) for c in counts)])
    out.write(f"Violations {period}\n")
    out.write(f"{'UNIT'.ljust(width)}  {'RULE'.ljust(17)}  VIOLATIONS  VEHICLES\n")
    for c in counts:
        out.write(
            f"{pad(c.unit, width)}  {c.rule.ljust(17)}  {c.violations:>10}  {c.vehicles:>8}\n"
        )
    out.write(f"{'total'.ljust(width)}  {''.ljust(17)}  {sum(c.violations for c in counts):>10}\n")


def write_backfilling(period: str, counts: Sequence[BackfillCount], out: TextIO) -> None:
    """Article 21: back-filings of the period's trips per unit."""
    if not counts:
        return
    width = max([4, *(display_width(c.unit) for c in counts)])
    out.write(f"\nBack-filing {period}\n")
    out.write(f"{'UNIT'.ljust(width)}  IN TIME  LATE  CLAIMED EARLIER THAN RECEIPT\n")
    for c in counts:
        out.write(f"{pad(c.unit, width)}  {c.in_time:>7}  {c.late:>4}  {c.claimed_earlier:>28}\n")


def run(args: argparse.Namespace) -> int:
    configured, data_dir = resolve(args)
    try:
        start, end = month_bounds(args.period)
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            counts = violations_by_unit_rule(conn, start, end, unit=args.unit)
            backfilling = backfilling_by_unit(conn, start, end, unit=args.unit)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    write_table(args.period, counts, sys.stdout)
    write_backfilling(args.period, backfilling, sys.stdout)
    try:
        if args.csv is not None:
            with args.csv.open("w", encoding="utf-8", newline="") as out:
                write_csv(args.period, counts, out, backfilling)
        if args.png is not None:
            draw_png(args.period, counts, args.png, backfilling)
    except (OSError, ChartFontError) as exc:
        logger.error("%s", exc)  # noqa: TRY400
        return 1
    return 0
