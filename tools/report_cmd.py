"""``jt808 report violations --period 2026-10 [--unit U] [--csv FILE] [--png FILE]``.

The periodic violation report of articles 23-24: violations per owning unit and rule for a
China-time month (counted in the month their episode opened), as a table on standard output,
optionally as CSV and as a PNG bar chart (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import csv
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
from tools.db_cmd import add_database_arguments, resolve

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("period", "unit", "rule", "violations", "vehicles")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", choices=["violations"], help="violations per unit and rule")
    parser.add_argument("--period", required=True, help="month, YYYY-MM (China time)")
    parser.add_argument("--unit", help="only this owning unit")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write CSV to FILE")
    parser.add_argument("--png", type=Path, metavar="FILE", help="also draw a bar chart to FILE")
    add_database_arguments(parser)


def write_table(period: str, counts: Sequence[ViolationCount], out: TextIO) -> None:
    width = max([4, *(len(c.unit) for c in counts)])
    out.write(f"Violations {period}\n")
    out.write(f"{'UNIT'.ljust(width)}  {'RULE'.ljust(17)}  VIOLATIONS  VEHICLES\n")
    for c in counts:
        out.write(
            f"{c.unit.ljust(width)}  {c.rule.ljust(17)}  {c.violations:>10}  {c.vehicles:>8}\n"
        )
    out.write(f"{'total'.ljust(width)}  {''.ljust(17)}  {sum(c.violations for c in counts):>10}\n")


def write_csv(period: str, counts: Sequence[ViolationCount], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in counts:
        writer.writerow((period, c.unit, c.rule, c.violations, c.vehicles))


def draw_png(period: str, counts: Sequence[ViolationCount], path: Path) -> None:
    """Grouped bars: one group per unit, one bar per rule."""
    import matplotlib  # noqa: PLC0415 - only this report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    units = sorted({c.unit for c in counts})
    rules = sorted({c.rule for c in counts})
    value = {(c.unit, c.rule): c.violations for c in counts}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(units) + 3), 4.5), dpi=100)
    try:
        width = 0.8 / max(1, len(rules))
        for i, rule in enumerate(rules):
            xs = [u + i * width - 0.4 + width / 2 for u in range(len(units))]
            ax.bar(xs, [value.get((unit, rule), 0) for unit in units], width, label=rule)
        ax.set_xticks(range(len(units)), units)
        ax.set_ylabel("violations")
        ax.set_title(f"Violations per unit and rule, {period}")
        if rules:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no violations", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    configured, data_dir = resolve(args)
    try:
        start, end = month_bounds(args.period)
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            counts = violations_by_unit_rule(conn, start, end, unit=args.unit)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    write_table(args.period, counts, sys.stdout)
    try:
        if args.csv is not None:
            with args.csv.open("w", encoding="utf-8", newline="") as out:
                write_csv(args.period, counts, out)
        if args.png is not None:
            draw_png(args.period, counts, args.png)
    except OSError as exc:
        logger.error("%s", exc)  # noqa: TRY400
        return 1
    return 0
