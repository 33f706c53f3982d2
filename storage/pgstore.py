"""The synchronous database side of the writer: one psycopg connection per store.

A :class:`PgPositionStore` is used by one worker thread at a time (the trio writer hands it
out); nothing here knows about trio.

Two ways to store a batch, both exactly-once thanks to the unique index on the natural key:

* **direct**: binary COPY straight into ``positions``.  Fastest (PostgreSQL's COPY inserts
  rows in multi-row groups), and correct as long as no row is a repeat: a repeat hits the unique
  index, PostgreSQL aborts the COPY and nothing of the batch is kept.
* **staging**: binary COPY into a per-connection temporary table, then ``INSERT ... SELECT ...
  ON CONFLICT DO NOTHING`` into ``positions`` in the same transaction; repeats are skipped and
  counted.  ``vehicle_id`` is filled from ``vehicles.phone`` here when the row has none.

:meth:`PgPositionStore.write_rows` tries direct and redoes the batch through staging when the
COPY hits the unique index (or goes straight to staging when asked); the writer asks for
staging while repeats are frequent.  Spool replays always use staging.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

from storage.masterdata import LINK_LOCK
from storage.rows import COLUMN_NAMES, COLUMN_TYPES, NATURAL_KEY, PositionRow

logger = logging.getLogger(__name__)

_COLS = ", ".join(COLUMN_NAMES)
_STAGE = "jt808_positions_stage"
COPY_DIRECT = f"COPY positions ({_COLS}) FROM STDIN (FORMAT BINARY)"
COPY_STAGE = f"COPY {_STAGE} ({_COLS}) FROM STDIN (FORMAT BINARY)"
_SELECT_STAGED = ", ".join(
    "coalesce(s.vehicle_id, v.id)" if c == "vehicle_id" else f"s.{c}" for c in COLUMN_NAMES
)
# Taken while positions are given vehicles (see storage.masterdata.upsert_vehicles).
LINK_SHARED = f"SELECT pg_advisory_xact_lock_shared({LINK_LOCK})"
INSERT_STAGED = (
    f"INSERT INTO positions ({_COLS}) SELECT {_SELECT_STAGED} FROM {_STAGE} s "  # noqa: S608
    "LEFT JOIN vehicles v ON v.phone = s.phone "
    f"ON CONFLICT ({', '.join(NATURAL_KEY)}) DO NOTHING"
)
CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE positions INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)

# Errors that mean "these rows are bad", not "the database is unavailable": retrying them or
# spooling them would fail again.
DATA_ERRORS: tuple[type[Exception], ...] = (
    psycopg.DataError,
    psycopg.errors.NotNullViolation,
    psycopg.errors.CheckViolation,
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)


class JsonTextDumper(Dumper):
    """Binary jsonb from JSON text already serialised by the row builder (version byte 1)."""

    oid = psycopg.adapters.types["jsonb"].oid
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        text: str = obj
        return b"\x01" + text.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class WriteResult:
    rows: int
    inserted: int
    fell_back: bool = False  # direct COPY hit the unique key and the batch went via staging

    @property
    def duplicates(self) -> int:
        return self.rows - self.inserted


class PgPositionStore:
    """One connection that writes position batches.

    ``statement_timeout_s`` bounds each statement server-side and the TCP user timeout bounds
    a dead network, so a worker thread always comes back even if the trio side gave up on it.
    """

    def __init__(
        self,
        dsn: str,
        *,
        statement_timeout_s: float = 5.0,
        connect_timeout_s: float = 3.0,
        application_name: str = "jt808-writer",
    ) -> None:
        self.dsn = dsn
        self.statement_timeout_s = statement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._abandoned = False
        # The vehicles as of master-data version _vehicles_version, read when a batch holds a
        # phone the writer's map does not know (see _vehicles_for).
        self._vehicles: dict[str, int] = {}
        self._vehicles_version: int | None = None

    # -- connection ---------------------------------------------------------------------------

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        timeout_ms = max(1, int(self.statement_timeout_s * 1000))
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout_s)),
            application_name=self.application_name,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=timeout_ms,
        )
        try:
            conn.adapters.register_dumper(None, JsonTextDumper)
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            conn.execute(CREATE_STAGE)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``getattr(self, method)(...)`` as the one user of this store (worker thread).

        If :meth:`abandon` was called meanwhile (the trio side timed out), the connection is
        closed when the call returns.
        """
        with self._lock:
            self._busy = True
        try:
            return getattr(self, method)(*args, **kwargs)
        finally:
            with self._lock:
                self._busy = False
                if self._abandoned:
                    self.close()

    def abandon(self) -> None:
        """Give up on this store: close it now if idle, else when its running call returns."""
        with self._lock:
            self._abandoned = True
            if not self._busy:
                self.close()

    # -- writing ------------------------------------------------------------------------------

    def run_upkeep(self, fn: Callable[[psycopg.Connection[Any]], None]) -> None:
        fn(self.connection())

    def ping(self) -> None:
        self.connection().execute("SELECT 1")

    def load_vehicles(self) -> dict[str, int]:
        rows = (
            self.connection()
            .execute("SELECT phone, id FROM vehicles WHERE phone IS NOT NULL")
            .fetchall()
        )
        return dict(rows)

    def write_rows(
        self,
        rows: Sequence[PositionRow],
        *,
        staging: bool = False,
        vehicles: Mapping[str, int] | None = None,
    ) -> WriteResult:
        """Store ``rows`` exactly once (see the module docstring); commit before returning."""
        conn = self.connection()
        if not staging:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    known = self._vehicles_for(cur, rows, vehicles or {})
                    self._copy_rows(cur, COPY_DIRECT, rows, known)
            except psycopg.errors.UniqueViolation:
                pass  # a repeat: the transaction rolled back, redo via staging
            else:
                return WriteResult(len(rows), len(rows))
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(LINK_SHARED)  # the staged insert joins vehicles itself
            self._copy_rows(cur, COPY_STAGE, rows, {})
            cur.execute(INSERT_STAGED)
            inserted = cur.rowcount
        return WriteResult(len(rows), inserted, fell_back=not staging)

    def _vehicles_for(
        self, cur: psycopg.Cursor[Any], rows: Sequence[PositionRow], vehicles: Mapping[str, int]
    ) -> Mapping[str, int]:
        """The vehicle map to store ``rows`` with.  ``vehicles`` (the writer's, refreshed now
        and then) when it knows every phone; otherwise the registry as this transaction sees
        it, under the link lock taken shared, so that a vehicle imported meanwhile either is
        seen here or, when its import commits later, links these rows itself
        (``storage.masterdata.upsert_vehicles``)."""
        get = vehicles.get
        if all(row[-1] is not None or get(row[1]) is not None for row in rows):
            return vehicles
        cur.execute(LINK_SHARED)
        row = cur.execute("SELECT version FROM masterdata_state").fetchone()
        version = None if row is None else int(row[0])
        if version != self._vehicles_version or version is None:
            cur.execute("SELECT phone, id FROM vehicles WHERE phone IS NOT NULL")
            self._vehicles = dict(cur.fetchall())
            self._vehicles_version = version
        return self._vehicles

    def write_payload(self, payload: bytes) -> WriteResult:
        """Store a binary COPY stream of positions rows (a spool record) via staging."""
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(LINK_SHARED)
            with cur.copy(COPY_STAGE) as copy:
                copy.write(payload)
            staged = cur.rowcount
            cur.execute(INSERT_STAGED)
            inserted = cur.rowcount
        return WriteResult(staged, inserted)

    @staticmethod
    def _copy_rows(
        cur: psycopg.Cursor[Any],
        statement: str,
        rows: Sequence[PositionRow],
        vehicles: Mapping[str, int],
    ) -> None:
        with cur.copy(statement) as copy:
            copy.set_types(COLUMN_TYPES)
            write_row = copy.write_row
            if not vehicles:
                for row in rows:
                    write_row(row)
                return
            get = vehicles.get
            for row in rows:
                if row[-1] is None and (vehicle_id := get(row[1])) is not None:
                    write_row(row[:-1] + (vehicle_id,))  # noqa: RUF005 - 15% faster than unpacking
                else:
                    write_row(row)
