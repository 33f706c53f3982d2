"""``jt808 vehicles import FILE.csv``: the vehicle registry (columns ``plate,phone,unit,category,
exempt`` and optionally ``max_speed_kmh``); vehicles are matched by plate."""

from __future__ import annotations

import argparse
from typing import Any

import psycopg

from storage import upsert_vehicles, vehicle_rows_from_csv
from tools.masterdata_cmd import add_import_arguments, run_import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_import_arguments(parser, "vehicles (CSV)")


def _load(text: str, conn: psycopg.Connection[Any]) -> int:
    return upsert_vehicles(conn, vehicle_rows_from_csv(text))


def run(args: argparse.Namespace) -> int:
    return run_import(args, _load, "vehicles")
