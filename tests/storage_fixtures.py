"""pytest fixtures for tests that need PostgreSQL.  Import the fixtures you use::

    from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401

* ``pg_dsn`` (session): ``JT808_TEST_DSN`` if set, else an embedded server in a temporary
  directory (storage.embedded), removed afterwards.  When the database cannot be reached the
  tests are skipped, except with ``CI=true``, where they fail: CI must never pass by skipping.
* ``pg_schema_dsn`` (function): a DSN whose ``search_path`` is a fresh scratch schema, dropped
  afterwards, so tests and colleagues sharing the server do not see each other's tables.
* ``db`` (import ``migrated_db``): that schema, migrated; ``proxy`` (import ``db_proxy``): a
  proxy in front of it that the test can cut and restore (a real outage).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from storage.embedded import embedded_postgres
from storage.errors import StorageError
from tests.db_proxy import DatabaseProxy


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"database needed in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _check(dsn: str) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable(f"database unreachable ({exc})")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    configured = os.environ.get("JT808_TEST_DSN")
    if configured:
        _check(configured)
        yield configured
        return
    with contextlib.ExitStack() as stack:
        # Not under pytest's basetemp: pytest resets that to mode 0700 whenever any pytest
        # session of the same user starts, which locks out the server's own system user.
        base = Path(tempfile.mkdtemp(prefix="jt808-test-pg-"))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        try:
            dsn = stack.enter_context(embedded_postgres(base / "data"))
        except (StorageError, OSError, subprocess.SubprocessError) as exc:
            _unavailable(f"JT808_TEST_DSN unset and no embedded PostgreSQL: {exc}")
            return
        _check(dsn)
        yield dsn


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` with ``schema`` as its search_path."""
    return make_conninfo(dsn, options=f"-c search_path={schema}")


@pytest.fixture
def pg_schema_dsn(pg_dsn: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema_dsn(pg_dsn, schema)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(name="db")
def migrated_db(pg_schema_dsn: str) -> str:
    """A scratch schema with the current migrations applied (fixture name ``db``)."""
    from storage import migrate  # noqa: PLC0415

    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


@pytest.fixture(name="proxy")
def db_proxy(db: str) -> Iterator[DatabaseProxy]:
    """A :class:`~tests.db_proxy.DatabaseProxy` in front of ``db`` (fixture name ``proxy``):
    give the server ``proxy.dsn``, then ``cut()`` and ``restore()`` it."""
    with DatabaseProxy.for_dsn(db) as proxy:
        yield proxy
