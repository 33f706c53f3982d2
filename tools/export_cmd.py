"""``jt808 export``: positions of a time range (and unit) as CSV, for inspection, finance and
audit departments (article 7 of the regulation)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timedelta, timezone

from tools.db_cmd import add_database_arguments, resolve
from tools.text import progress

logger = logging.getLogger(__name__)

CHINA = timezone(timedelta(hours=8))
EXAMPLES = """\
examples:
  jt808 export --from 2026-10-01 --to 2026-11-01 --csv october.csv
  jt808 export --from 2026-10-01T08:00 --to 2026-10-01T18:00 --unit 昆明市财政局 > day.csv
"""


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=CHINA)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="start",
        type=_time,
        required=True,
        help="start (ISO 8601; China time when no offset)",
    )
    parser.add_argument("--to", dest="end", type=_time, required=True, help="end, exclusive")
    parser.add_argument("--unit", help="only this owning unit's vehicles")
    parser.add_argument(
        "--csv", metavar="FILE", help="CSV file to write (default: standard output)"
    )
    # The former spelling, still accepted (as in scripts written for it).
    parser.add_argument("--output", "-o", dest="csv", help=argparse.SUPPRESS)
    add_database_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from storage import StorageError, database_dsn, export_positions_csv  # noqa: PLC0415

    configured, data_dir = resolve(args)
    counted = Counted(shown=progress())
    try:
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            psycopg.connect(dsn) as conn,
        ):
            if args.csv:
                with open(args.csv, "wb") as out:
                    export_positions_csv(
                        conn, out, args.start, args.end, unit=args.unit, progress=counted
                    )
            else:
                export_positions_csv(
                    conn, sys.stdout.buffer, args.start, args.end, unit=args.unit, progress=counted
                )
    except OSError as exc:
        logger.error("cannot write %s: %s", args.csv, exc.strerror or exc)  # noqa: TRY400
        return 1
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400
        return 1
    counted.clear()
    # The result line: on standard output, unless the CSV itself goes there.
    line = f"exported {counted.rows} rows to {args.csv or 'standard output'}"
    print(line, file=sys.stdout if args.csv else sys.stderr, flush=True)
    return 0


class Counted:
    """The export's progress callback: keeps the counts; on a terminal, a progress line on
    standard error at most every :data:`PROGRESS_S` seconds."""

    def __init__(self, *, shown: bool) -> None:
        self.rows = 0
        self.bytes = 0
        self._shown = shown
        self._drawn = False
        self._last = time.monotonic()

    def __call__(self, rows: int, written: int) -> None:
        self.rows, self.bytes = rows, written
        now = time.monotonic()
        if self._shown and now - self._last >= PROGRESS_S:
            self._last = now
            self._drawn = True
            sys.stderr.write(f"\rexporting: {rows} rows, {written / 1e6:.1f} MB")
            sys.stderr.flush()

    def clear(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")


# A progress line twice a second at most (a terminal redraws it in place).
PROGRESS_S = 0.5
