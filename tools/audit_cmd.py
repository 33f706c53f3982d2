"""``jt808 audit list``: the audit trail of the platform's writes.

    jt808 audit list --since 2026-10-01 [--user NAME] [--json]

Every change of vehicles (the exempt flag among them), fences and filings, made through the
operator port or the command line, every command sent to a terminal and every account and
token change, oldest first: when (the database's time, shown in China time), who, from where
(a client address or ``cli``), what, and the object's value before and after.  The trail is
append-only: the database refuses to change or delete its rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import psycopg

from storage import StorageError, access
from tools.access_db import audit_json
from tools.alerts_cmd import iso_time
from tools.db_cmd import add_database_arguments
from tools.masterdata_cmd import connect

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXAMPLES = """\
examples:
  jt808 audit list --since 2026-10-01
  jt808 audit list --since 2026-10-01T08:00 --user wang --json
"""
# Characters of a value shown in the table; --json prints them whole.
_VALUE_CHARS = 120


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="audit rows from a time on, oldest first")
    listing.add_argument("--since", type=iso_time, required=True, help="ISO 8601 start")
    listing.add_argument("--user", help="only this actor (account or command-line user)")
    listing.add_argument("--unit", help="only rows about this unit")
    listing.add_argument("--json", action="store_true", help="one JSON record a line")
    add_database_arguments(listing)
    listing.set_defaults(run=run_list)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - the sub-command's run is used
    return int(args.run(args))


def run_list(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            rows = access.audit_rows(conn, since=args.since, user=args.user, unit=args.unit)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    records = [audit_json(row) for row in rows]
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        write_table(records, sys.stdout)
    return 0


def _value(value: Any) -> str:
    text = "-" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def write_table(records: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    """Two lines a row: when, who, from where, what; then before -> after."""
    for r in records:
        key = f"{r['object_kind']} {r['object_key'] or ''}".strip()
        out.write(f"{r['at'][:19]}  {r['actor']}@{r['source']}  {r['action']}  {key}\n")
        out.write(f"    {_value(r['before'])} -> {_value(r['after'])}\n")
    out.write(f"{len(records)} row(s)\n")
