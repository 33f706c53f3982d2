"""``jt808 alerts list``: alert history from the database, as a table or JSON lines.

``jt808 alerts list --since 2026-10-01 [--until ISO] [--unit U] [--rule R] [--state S] [--json]``
lists the alerts *opened* in [since, until), oldest first.  Times without an offset are China
time.  The live view, ``jt808 alerts tail``, is served by :mod:`tools.alerts_tail_cmd` when that
module is present; this command adds it as a sub-command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

import psycopg

from alerts.rules import RULE_NAMES, AlertState
from storage import AlertRepository, StorageError, database_dsn
from tools.db_cmd import add_database_arguments, resolve
from tools.text import table

logger = logging.getLogger(__name__)

CHINA = timezone(timedelta(hours=8))
_TAIL_MODULE = "tools.alerts_tail_cmd"


def iso_time(text: str) -> datetime:
    """An argparse type: ISO 8601, China time without an offset."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=CHINA)


EXAMPLES = """\
examples:
  jt808 alerts list --since 2026-10-01 --until 2026-10-08 --unit 昆明市财政局
  jt808 alerts list --since 2026-10-01T08:00 --rule holiday_sealing --json
  jt808 alerts tail --rule out_of_area --http http://node2:9808
"""
LIST_EXAMPLES = """\
examples:
  jt808 alerts list --since 2026-10-01 --until 2026-10-08 --unit 昆明市财政局
  jt808 alerts list --since 2026-10-01T08:00 --rule holiday_sealing --json
"""
TAIL_EXAMPLES = """\
examples:
  jt808 alerts tail
  jt808 alerts tail --unit 昆明市财政局 --state violation --json
  jt808 alerts tail --http http://node2:9808 --after 0 --count 10
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="alerts opened in a time range",
        description="Alert history from the database: the alerts opened in [--since, "
        "--until), oldest first, as a table (times in China time) or JSON lines.  Times "
        "without an offset are China time.",
        epilog=LIST_EXAMPLES,
    )
    listing.add_argument("--since", "--from", type=iso_time, required=True, help="ISO 8601 start")
    listing.add_argument("--until", "--to", type=iso_time, help="ISO 8601 end, exclusive")
    listing.add_argument("--unit", help="only this owning unit")
    listing.add_argument("--rule", choices=RULE_NAMES, help="only this rule")
    listing.add_argument("--state", choices=[s.value for s in AlertState], help="only this state")
    listing.add_argument("--json", action="store_true", help="one JSON record a line")
    add_database_arguments(listing)
    listing.set_defaults(run=run_list)
    if importlib.util.find_spec(_TAIL_MODULE) is not None:
        tail = importlib.import_module(_TAIL_MODULE)
        tail_parser = actions.add_parser(
            "tail",
            help="follow alerts live",
            description="Follow a node's live alert stream (GET /alerts/stream): one line per "
            "alert event, or its JSON.  After a dropped connection it resumes where it left "
            "off; Ctrl-C exits 130.",
            epilog=TAIL_EXAMPLES,
        )
        tail.add_arguments(tail_parser)
        tail_parser.set_defaults(run=tail.run)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - the sub-command's run is used
    return run_list(args)


_TABLE = ("opened_at", "rule", "state", "severity", "plate", "unit", "deadline", "closed_at")


def _cell(alert: Mapping[str, Any], key: str) -> str:
    value = alert.get(key)
    if value is None:
        return "-"
    if key in ("opened_at", "deadline", "closed_at"):
        return datetime.fromisoformat(value).astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def write_table(alerts: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    """A readable table (times in China time), one alert a line, then the count.  Columns
    line up on a terminal whatever the plates and unit names (Chinese characters take two
    columns: :func:`tools.text.display_width`)."""
    rows = [[name.upper() for name in _TABLE] + ["ID"]]
    rows += [[_cell(alert, name) for name in _TABLE] + [str(alert["id"])] for alert in alerts]
    for line in table(rows):
        out.write(line + "\n")
    out.write(f"{len(alerts)} alert(s)\n")


def run_list(args: argparse.Namespace) -> int:
    configured, data_dir = resolve(args)
    try:
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            AlertRepository(dsn) as repo,
        ):
            alerts = repo.list_alerts(args.since, args.until, args.unit, args.rule, args.state)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    if args.json:
        for alert in alerts:
            sys.stdout.write(json.dumps(alert, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        write_table(alerts, sys.stdout)
    return 0
