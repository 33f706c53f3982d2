"""``ingest.OperatorAccess`` over :mod:`storage.access`, for the ``serve`` wiring.

Token lookups and audit appends run in worker threads on one connection (opened on first use,
opened again after the database was lost), one at a time: each is an index lookup or a
single-row insert, well under a millisecond, so one connection keeps up with any operator
traffic.  A database that cannot answer is ``ServiceUnavailableError``: the operator port
then answers 503, never lets a request through unchecked.
"""

from __future__ import annotations

import getpass
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import psycopg
import trio

from ingest.access import AuditEntry, Principal
from ingest.interfaces import ServiceUnavailableError
from storage import access
from storage.errors import DatabaseUnavailableError, database_errors
from storage.masterdata import CHINA

CONNECT_TIMEOUT_S = 5

_T = TypeVar("_T")


class DatabaseOperatorAccess:
    """See the module docstring.  ``close()`` when done."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)

    def _call(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        with self._lock:
            try:
                with database_errors():
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(
                            self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                        )
                    return work(self._conn)
            except DatabaseUnavailableError:
                self._drop()
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        try:
            return await trio.to_thread.run_sync(self._call, work, limiter=self._limiter)
        except DatabaseUnavailableError as exc:
            raise ServiceUnavailableError(f"operator accounts are unavailable: {exc}") from exc

    async def authenticate(self, token: str) -> Principal | None:
        row = await self._run(lambda conn: access.principal_for_token(conn, token))
        if row is None:
            return None
        return Principal(name=row["name"], role=row["role"], unit=row["unit"])

    async def record(self, entry: AuditEntry) -> None:
        def append(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                # Transaction-local, so the connection's next use names nobody by mistake.
                conn.execute(
                    "SELECT set_config('jt808.actor', %s, true), "
                    "set_config('jt808.source', %s, true)",
                    (entry.actor.name, entry.actor.source),
                )
                access.append_audit(
                    conn,
                    action=entry.action,
                    kind=entry.kind,
                    key=entry.key,
                    unit=entry.unit,
                    before=entry.before,
                    after=entry.after,
                )

        await self._run(append)

    async def audit(
        self, *, since: datetime | None, user: str | None, unit: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._run(
            lambda conn: access.audit_rows(conn, since=since, user=user, unit=unit, limit=limit)
        )
        return [audit_json(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._drop()


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row as JSON values (its time in China time, as alerts show times)."""
    return {**row, "at": row["at"].astimezone(CHINA).isoformat()}


def cli_user() -> str:
    """Who runs a ``jt808`` command, for the audit trail: the operating system's user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return f"uid:{os.getuid()}"
