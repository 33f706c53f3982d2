"""``jt808 vehicles``: the vehicle registry.

``jt808 vehicles import FILE.csv`` loads vehicles (columns ``plate,phone,unit,category,exempt``
and optionally ``max_speed_kmh``), matched by plate; a phone that moves from one vehicle to
another closes the old terminal binding and opens a new one.

``jt808 vehicles history PLATE [--json]`` shows the terminals the vehicle was fitted with, from
when to when (article 18: terminals change only through the platform centre).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import psycopg

from storage import StorageError, upsert_vehicles, vehicle_rows_from_csv
from storage.masterdata import vehicle_bindings
from tools.db_cmd import add_database_arguments
from tools.masterdata_cmd import add_encoding_argument, connect, run_import

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  jt808 vehicles import vehicles.csv
  jt808 vehicles import 车辆.csv --encoding gbk --dsn postgresql://jt808@db/jt808
  jt808 vehicles history 云A12345
"""
IMPORT_EXAMPLES = """\
columns (a header line first; matched by plate):
  plate          the number plate, e.g. 云A12345
  phone          the terminal's phone number, up to 20 digits; empty: no terminal yet
  unit           the owning unit
  category       retained, platform or rental (article 5)
  exempt         true/false, yes/no or 1/0: exempt vehicles raise no alerts
  max_speed_kmh  optional: the vehicle's own speed limit

The file may be UTF-8 (with or without BOM) or GBK/GB 18030 as Excel saves it on a Chinese
Windows; the encoding used is printed with the result.

examples:
  jt808 vehicles import vehicles.csv
  jt808 vehicles import 车辆.csv --encoding gbk --dsn postgresql://jt808@db/jt808

  plate,phone,unit,category,exempt,max_speed_kmh
  云A12345,013800000001,昆明市财政局,retained,false,80
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    importing = actions.add_parser(
        "import",
        help="load vehicles (CSV) from FILE",
        description="Load vehicles from a CSV file, all or nothing: every problem is listed "
        "by line.",
        epilog=IMPORT_EXAMPLES,
    )
    importing.add_argument("file", type=Path, metavar="FILE")
    add_encoding_argument(importing)
    add_database_arguments(importing)
    importing.set_defaults(run=run)
    history = actions.add_parser(
        "history",
        help="the terminals a vehicle was fitted with, over time",
        description="The terminals a vehicle was fitted with, from when to when.  Example: "
        "jt808 vehicles history 云A12345",
    )
    history.add_argument("plate", metavar="PLATE")
    history.add_argument("--json", action="store_true", help="one JSON object a line")
    add_database_arguments(history)
    history.set_defaults(run=run_history)


def _load(text: str, conn: psycopg.Connection[Any]) -> int:
    return upsert_vehicles(conn, vehicle_rows_from_csv(text))


def run(args: argparse.Namespace) -> int:
    return run_import(args, _load, "vehicles")


def run_history(args: argparse.Namespace) -> int:
    try:
        with connect(args) as conn:
            bindings = vehicle_bindings(conn, args.plate)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    if bindings is None:
        logger.error("%s: no such vehicle", args.plate)
        return 1
    for binding in bindings:
        since, until = binding["valid_from"], binding["valid_to"]
        if args.json:
            print(
                json.dumps(
                    {
                        "phone": binding["phone"],
                        "from": None if since is None else since.isoformat(),
                        "to": None if until is None else until.isoformat(),
                    }
                )
            )
        else:
            start = "(first known)" if since is None else since.isoformat()
            end = "now" if until is None else until.isoformat()
            print(f"{binding['phone']}  {start} .. {end}")
    if not bindings and not args.json:
        print(f"{args.plate}: no terminal fitted so far")
    return 0
