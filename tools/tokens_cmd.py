"""``jt808 tokens``: bearer tokens of operator accounts.

    jt808 tokens create NAME [--expires 90d|12h|never]
    jt808 tokens list [--json]
    jt808 tokens revoke ID_OR_PREFIX

``create`` prints the token once, alone on standard output (so ``JT808_TOKEN=$(jt808 tokens
create admin)`` works); only its SHA-256 is stored, so a lost token is revoked and replaced,
never recovered.  Tokens expire after 90 days unless ``--expires`` says otherwise.  A token is
named by its id or its first characters (as ``list`` shows them).  Creating and revoking are in
the audit trail under the user running the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from storage import StorageError, access
from tools.db_cmd import add_database_arguments
from tools.masterdata_cmd import connect

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXAMPLES = """\
examples:
  export JT808_TOKEN=$(jt808 tokens create admin)
  jt808 tokens create wang --expires 12h
  jt808 tokens list
  jt808 tokens revoke jt808_3f9a
"""
# A token lives this long unless told otherwise: long enough not to burden the operators (a
# quarter), short enough that a token copied somewhere and forgotten stops working.
DEFAULT_EXPIRES = "90d"
_DURATION = re.compile(r"([1-9][0-9]{0,4})([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def duration(text: str) -> timedelta | None:
    """An argparse type: ``90d``, ``12h``, ``30m`` or ``never`` (None)."""
    if text == "never":
        return None
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected e.g. 90d, 12h, 30m or never, got {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    creating = actions.add_parser("create", help="make a token for an account (shown once)")
    creating.add_argument("name", metavar="NAME", help="the account (jt808 users add)")
    creating.add_argument(
        "--expires",
        type=duration,
        default=duration(DEFAULT_EXPIRES),
        metavar="DURATION",
        help=f"lifetime: 90d, 12h, 30m or never (default {DEFAULT_EXPIRES})",
    )
    add_database_arguments(creating)
    creating.set_defaults(run=run_create)
    listing = actions.add_parser("list", help="list the tokens (never the tokens themselves)")
    listing.add_argument("--json", action="store_true", help="one JSON record a line")
    add_database_arguments(listing)
    listing.set_defaults(run=run_list)
    revoking = actions.add_parser("revoke", help="revoke a token at once")
    revoking.add_argument("token", metavar="ID_OR_PREFIX", help="token id or first characters")
    add_database_arguments(revoking)
    revoking.set_defaults(run=run_revoke)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - the sub-command's run is used
    return int(args.run(args))


def run_create(args: argparse.Namespace) -> int:
    expires_at = None if args.expires is None else datetime.now(UTC) + args.expires
    try:
        with connect(args) as conn:
            token_id, token = access.create_token(conn, args.name, expires_at)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    until = "never expires" if expires_at is None else f"expires {expires_at:%Y-%m-%d %H:%M} UTC"
    print(f"token {token_id} for {args.name}, {until}; shown once:", file=sys.stderr)
    print(token)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            token_id = access.revoke_token(conn, args.token)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    print(f"token {token_id} revoked")
    return 0


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def run_list(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            rows = access.tokens(conn)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    now = datetime.now(UTC)
    if args.json:
        for row in rows:
            record: dict[str, Any] = {
                k: _iso(v) if isinstance(v, datetime) else v for k, v in row.items()
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        return 0
    sys.stdout.write(f"{'ID':<6}{'USER':<24}{'PREFIX':<18}{'CREATED':<18}{'STATE'}\n")
    for row in rows:
        if row["revoked_at"] is not None:
            state = f"revoked {row['revoked_at']:%Y-%m-%d}"
        elif row["expires_at"] is not None and row["expires_at"] <= now:
            state = f"expired {row['expires_at']:%Y-%m-%d}"
        elif row["expires_at"] is not None:
            state = f"expires {row['expires_at']:%Y-%m-%d}"
        else:
            state = "never expires"
        sys.stdout.write(
            f"{row['id']:<6}{row['user']:<24}{row['prefix']:<18}"
            f"{row['created_at']:%Y-%m-%d %H:%M}  {state}\n"
        )
    sys.stdout.write(f"{len(rows)} token(s)\n")
    return 0
