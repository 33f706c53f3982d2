"""``jt808 filings import FILE.csv``: trip filings (报备) and dispatch orders, columns
``plate,start,end,destination,purpose,passengers,approver`` and optionally ``filed_at`` (default:
now) and ``state`` (default: approved).  Times are ISO 8601, China time without an offset;
``destination`` names a fence or is empty.  A filing is matched by vehicle and window."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import psycopg

from storage import filing_rows_from_csv, upsert_filings
from tools.masterdata_cmd import add_import_arguments, run_import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_import_arguments(parser, "trip filings (CSV)")


def _load(text: str, conn: psycopg.Connection[Any]) -> int:
    return len(upsert_filings(conn, filing_rows_from_csv(text, now=datetime.now(UTC))))


def run(args: argparse.Namespace) -> int:
    return run_import(args, _load, "filings")
