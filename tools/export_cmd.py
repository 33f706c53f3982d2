"""``jt808 export``: positions of a time range (and unit) as CSV, for inspection, finance and
audit departments (article 7 of the regulation)."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timedelta, timezone

from tools.db_cmd import add_database_arguments, resolve

logger = logging.getLogger(__name__)

CHINA = timezone(timedelta(hours=8))


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
    parser.add_argument("--output", "-o", help="file to write (default: standard output)")
    add_database_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from storage import StorageError, database_dsn, export_positions_csv  # noqa: PLC0415

    configured, data_dir = resolve(args)
    try:
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            psycopg.connect(dsn) as conn,
        ):
            if args.output:
                with open(args.output, "wb") as out:
                    size = export_positions_csv(conn, out, args.start, args.end, unit=args.unit)
            else:
                size = export_positions_csv(
                    conn, sys.stdout.buffer, args.start, args.end, unit=args.unit
                )
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400
        return 1
    logger.info("exported %d bytes", size)
    return 0
