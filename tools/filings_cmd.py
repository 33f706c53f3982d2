"""``jt808 filings``: trip filings (报备) and dispatch orders.

``jt808 filings import FILE.csv [--historical]`` loads filings, columns
``plate,start,end,destination,purpose,passengers,approver`` and optionally ``filed_at`` (what the
dispatcher's system claims as the filing time), ``state`` (default: approved) and ``id`` (the
filing a row corrects).  Times are ISO 8601, China time without an offset; ``destination`` names a
fence or is empty.  A filing is matched by ``id``, else by vehicle and window.  The platform
stamps when each filing arrives, and that time is what the rules count (article 21); with
``--historical`` (migrating a former platform's records) the file's ``filed_at`` counts instead,
for windows that ended 30 days ago or more.

``jt808 filings history PLATE [--json]`` shows every version of the vehicle's filings: when each
arrived, what it claimed, and what it said.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from storage import (
    StorageError,
    filing_rows_from_csv,
    load_fence_rows,
    load_registry_rows,
    upsert_filings,
)
from storage.access import append_audit
from storage.masterdata import filing_history
from storage.schema import CHINA
from tools.db_cmd import add_database_arguments
from tools.masterdata_cmd import add_encoding_argument, connect, run_import

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  jt808 filings import filings.csv
  jt808 filings history 云A12345
"""
IMPORT_EXAMPLES = """\
columns (a header line first; times ISO 8601, China time without an offset):
  plate        the vehicle's number plate, e.g. 云A12345
  start, end   the trip's window
  destination  a fence's name, or empty
  purpose, passengers, approver
  filed_at     optional: when the dispatcher's system says it was filed
  state        optional: pending, approved (default), rejected or cancelled
  id           optional: the filing this row corrects

The file may be UTF-8 (with or without BOM) or GBK/GB 18030 as Excel saves it on a Chinese
Windows; the encoding used is printed with the result.  Every problem is listed by line.

examples:
  jt808 filings import filings.csv
  jt808 filings import 报备.csv --encoding gbk --dsn postgresql://jt808@db/jt808

  plate,start,end,destination,purpose,passengers,approver
  云A12345,2026-10-08T09:00,2026-10-08T12:00,Dali office,inspection,李伟,王芳
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    importing = actions.add_parser(
        "import",
        help="load trip filings (CSV) from FILE",
        description="Load trip filings from a CSV file.  Example: jt808 filings import filings.csv",
    )
    importing.add_argument("file", type=Path, metavar="FILE")
    importing.epilog = IMPORT_EXAMPLES
    add_encoding_argument(importing)
    importing.add_argument(
        "--historical",
        action="store_true",
        help="a former platform's records: the file's filed_at counts (windows ended 30+ days "
        "ago only)",
    )
    add_database_arguments(importing)
    importing.set_defaults(run=run)
    history = actions.add_parser(
        "history",
        help="every version of a vehicle's filings",
        description="Every version of a vehicle's filings, oldest first, with when each "
        "arrived.  Example: jt808 filings history 云A12345",
    )
    history.add_argument("plate", metavar="PLATE")
    history.add_argument("--json", action="store_true", help="one JSON object a line")
    add_database_arguments(history)
    history.set_defaults(run=run_history)


def _load(text: str, conn: psycopg.Connection[Any], *, historical: bool, file: Path) -> int:
    # Plates and destinations are checked with the rest, so one run lists every problem.
    plates = {row["plate"] for row in load_registry_rows(conn)}
    fences = {row["name"] for row in load_fence_rows(conn)}
    rows = filing_rows_from_csv(text, now=datetime.now(UTC), plates=plates, fences=fences)
    if not historical:
        return len(upsert_filings(conn, rows))
    # A historical import sets times the rules believe: the act itself goes into the audit
    # trail, with the file's checksum, in the same transaction as the filings.
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    with conn.transaction():
        ids = upsert_filings(conn, rows, historical=True)
        append_audit(
            conn,
            action="filings.import_historical",
            kind="file",
            key=file.name,
            after={"sha256": digest, "filings": ids},
        )
    logger.warning(
        "historical import of %d filing(s) from %s (sha256 %s): their own filing times count",
        len(ids),
        file,
        digest,
    )
    return len(ids)


def run(args: argparse.Namespace) -> int:
    return run_import(args, partial(_load, historical=args.historical, file=args.file), "filings")


def run_history(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            versions = filing_history(conn, plate=args.plate)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    if versions is None:
        logger.error("%s: no such vehicle", args.plate)
        return 1
    for version in versions:
        if args.json:
            print(json.dumps({k: _jsonable(v) for k, v in version.items()}, ensure_ascii=False))
        else:
            print(_line(version))
    if not versions and not args.json:
        print(f"{args.plate}: no filings")
    return 0


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _line(version: dict[str, Any]) -> str:
    def at(value: datetime | None) -> str:
        return "-" if value is None else value.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")

    claimed = version["claimed_filed_at"]
    claim = "" if claimed is None else f", claimed {at(claimed)}"
    kind = " (historical)" if version["historical"] else ""
    return (
        f"filing {version['filing']} v{version['version']}: received {at(version['received_at'])}"
        f"{claim}{kind}; {at(version['start'])} .. {at(version['end'])} "
        f"{version['destination'] or '-'} {version['state']} {version['purpose']}".rstrip()
    )
