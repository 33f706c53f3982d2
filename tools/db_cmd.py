"""``jt808 db migrate``: apply the storage migrations (idempotent; the server also does it)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


EXAMPLES = """\
examples:
  jt808 db migrate --dsn postgresql://jt808@db/jt808
  jt808 db migrate --backend partitioned
  jt808 db status --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrating = actions.add_parser(
        "migrate",
        help="create or update the schema",
        description="Create or update the schema (idempotent; the server also does it).",
        epilog="examples:\n  jt808 db migrate --dsn postgresql://jt808@db/jt808\n"
        "  jt808 db migrate --backend partitioned\n",
    )
    migrating.add_argument(
        "--backend",
        choices=["auto", "timescaledb", "partitioned"],
        default="auto",
        help="positions storage for a new schema (default auto: TimescaleDB when the extension "
        "is installed, or available and in shared_preload_libraries; else partitions)",
    )
    add_database_arguments(migrating)
    status = actions.add_parser(
        "status",
        help="backend, schema version, partitions or chunks, jobs, unlinked positions, "
        "rule engines",
        description="The database's state: backend, schema version, partitions or chunks, "
        "jobs, unlinked positions, rule engines.",
        epilog="examples:\n  jt808 db status\n  jt808 db status --json --dsn "
        "postgresql://jt808@db/jt808\n",
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    add_database_arguments(status)


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` (or ``JT808_DSN``) and ``--data-dir`` for the embedded default."""
    parser.add_argument("--dsn", help="PostgreSQL connection string (default: $JT808_DSN)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="embedded database location when no DSN is given (default ./jt808-data)",
    )


def resolve(args: argparse.Namespace) -> tuple[str | None, Path]:
    dsn = args.dsn or os.environ.get("JT808_DSN") or None
    data_dir = args.data_dir or Path(os.environ.get("JT808_DATA_DIR") or "jt808-data")
    return dsn, data_dir


def run(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from storage import StorageError, current_backend, database_dsn, migrate  # noqa: PLC0415

    configured, data_dir = resolve(args)
    try:
        with (
            database_dsn(configured, data_dir / "pgdata") as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            if args.action == "status":
                from storage.status import database_status, format_status  # noqa: PLC0415

                status = database_status(conn)
                print(
                    json.dumps(status, ensure_ascii=False) if args.json else format_status(status)
                )
                return 0
            migrate(conn, backend=args.backend)
            print(f"schema is current (backend: {current_backend(conn)})", flush=True)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    return 0
