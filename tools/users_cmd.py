"""``jt808 users``: operator accounts of the operator port.

    jt808 users add NAME --role viewer|dispatcher|admin [--unit U]
    jt808 users list [--json]

A role allows what the one before it does and more (``ingest.access``): a viewer reads, a
dispatcher also files trips and sends commands, an admin also edits vehicles, fences and the
exempt flag.  ``--unit`` binds the account to one unit's vehicles, filings, terminals and
alerts.  An account signs in with a token (``jt808 tokens create NAME``).  Changes are in the
audit trail under the user running the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import psycopg

from storage import StorageError, access
from tools.db_cmd import add_database_arguments
from tools.masterdata_cmd import connect

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXAMPLES = """\
examples:
  jt808 users add wang --role dispatcher --unit 昆明市财政局
  jt808 users add admin --role admin
  jt808 users list --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    adding = actions.add_parser("add", help="create an account")
    adding.add_argument("name", metavar="NAME", help="account name (letters, digits, . _ @ -)")
    adding.add_argument("--role", required=True, choices=access.ROLES, help="what it may do")
    adding.add_argument("--unit", help="bind it to this unit's vehicles, filings and alerts")
    add_database_arguments(adding)
    adding.set_defaults(run=run_add)
    listing = actions.add_parser("list", help="list the accounts")
    listing.add_argument("--json", action="store_true", help="one JSON record a line")
    add_database_arguments(listing)
    listing.set_defaults(run=run_list)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - the sub-command's run is used
    return int(args.run(args))


def run_add(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            access.add_user(conn, args.name, args.role, args.unit)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    where = f" of unit {args.unit}" if args.unit else ""
    print(f"user {args.name}: {args.role}{where}; next: jt808 tokens create {args.name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            rows = access.users(conn)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    if args.json:
        for row in rows:
            record = {**row, "created_at": row["created_at"].isoformat()}
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        return 0
    sys.stdout.write(f"{'NAME':<24}{'ROLE':<12}{'UNIT':<24}TOKENS\n")
    for row in rows:
        sys.stdout.write(
            f"{row['name']:<24}{row['role']:<12}{row['unit'] or '-':<24}{row['tokens']}\n"
        )
    sys.stdout.write(f"{len(rows)} user(s)\n")
    return 0
