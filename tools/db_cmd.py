"""``jt808 db migrate``: apply the storage migrations (idempotent; the server also does it)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["migrate", "status"],
        help="migrate: create or update the schema; status: backend, schema version, "
        "partitions or chunks, jobs, unlinked positions, rule engines",
    )
    parser.add_argument("--json", action="store_true", help="status as one JSON object")
    parser.add_argument(
        "--backend",
        choices=["auto", "timescaledb", "partitioned"],
        default="auto",
        help="positions storage for a new schema (default auto: TimescaleDB when the extension "
        "is installed, or available and in shared_preload_libraries; else partitions)",
    )
    add_database_arguments(parser)


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
            logger.info("schema is current (backend: %s)", current_backend(conn))
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return 1
    return 0
