"""Schema migration as a background service, so a node starts while its database is down.

After a power cut the server may come back before PostgreSQL does.  It must still accept
terminals and acknowledge their positions through the spool; so the migration at start is not a
precondition of serving but a service: :class:`SchemaMigrator` reports itself started at once,
tries :func:`storage.schema.migrate` in a worker thread, and retries with a back-off until it
succeeds.  :attr:`SchemaMigrator.ready` is set once the schema is current; whatever writes to
the database (the position writer, the rule engine) waits for it and spools or queues meanwhile.

Several workers or nodes may migrate at once: :func:`~storage.schema.migrate` holds an advisory
lock, so one applies the migrations and the others find them applied.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import trio

from storage.schema import BackendChoice, migrate

logger = logging.getLogger(__name__)

# Connecting to a database that does not answer must not hold the attempt for long.
CONNECT_TIMEOUT_S = 5
# The first retries come quickly (a database restarting is back within seconds), then every
# half minute: a migration attempt is one connection, cheap for a database coming back.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


class SchemaMigrator:
    """Migrates ``dsn`` in the background; see the module docstring.

    Start with ``await nursery.start(migrator.run)``; :meth:`run` returns once the schema is
    current.  Errors other than an unreachable database (a schema created for another backend,
    a migration the database refuses) are raised from :meth:`run`, for its supervisor to log
    and retry.
    """

    def __init__(
        self,
        dsn: str,
        *,
        retry_first_s: float = RETRY_FIRST_S,
        retry_max_s: float = RETRY_MAX_S,
        backend: BackendChoice = "auto",
    ) -> None:
        self._dsn = dsn
        self._backend: BackendChoice = backend
        self._retry_first_s = retry_first_s
        self._retry_max_s = retry_max_s
        self.ready = trio.Event()
        # Set after the first attempt, whatever its outcome: a node starting with its
        # database up waits for this, so its other services find the schema in place.
        self.attempted = trio.Event()
        self.attempts = 0
        self.last_error: str | None = None
        self.applied: list[int] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = self._retry_first_s
        while not self.ready.is_set():
            self.attempts += 1
            try:
                self.applied = await trio.to_thread.run_sync(self._migrate, abandon_on_cancel=True)
            except psycopg.OperationalError as exc:
                self.attempted.set()
                first = self.last_error is None
                self.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else "?"
                (logger.error if first else logger.info)(
                    "database unreachable, schema not checked (%s); serving from the spool, "
                    "retrying in %.0f s",
                    self.last_error,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self.last_error = None
            self.ready.set()
            self.attempted.set()
            if self.applied:
                logger.info("schema migrated: applied %s", self.applied)
            elif self.attempts > 1:
                logger.warning("database reachable; schema is current")

    def _migrate(self) -> list[int]:
        conn: psycopg.Connection[Any]
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            return migrate(conn, backend=self._backend)
