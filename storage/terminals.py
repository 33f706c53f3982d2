"""Terminal registration and authentication records (JT/T 808-2019 8.5-8.8; article 18).

The ``terminals`` table keeps each terminal's auth code, so a terminal that registered once
authenticates again after a server restart.  :class:`TerminalStore` runs the statements on one
dedicated connection in a worker thread, which keeps them strictly ordered.  Registrations and
authentications come in storms (every terminal of a fleet reconnects after a network or server
restart), and each is a write whose commit waits for a WAL flush; so those that arrive while a
batch is being written are written together next, in one transaction with one commit (group
commit), and each caller gets its own statement's result.

Identity: a phone that holds an auth code belongs to the terminal that obtained it.  A 0x0100
for that phone from a terminal with another manufacturer or terminal id is refused with table 9
result 3 (terminal already registered), atomically in the upsert itself, so two nodes cannot
both hand the phone out; the same terminal registering again gets a new code.  The platform
centre releases a phone with :meth:`TerminalStore.reset` (``jt808 terminals reset``).  Every
registration, refusal and release is kept in ``terminal_events``.

Errors are typed, never a raw driver exception: :class:`~storage.errors.DatabaseUnavailableError`
when the database cannot be reached, answers too slowly or has no schema yet (the caller may
decide from what it knows, or leave the terminal to retry), and
:class:`~storage.errors.DataRejectedError` when the database refuses the values.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from storage.errors import DatabaseUnavailableError, DataRejectedError, StorageError

logger = logging.getLogger(__name__)

POLICY_OPEN = "open"
POLICY_REGISTRY = "registry"

# JT/T 808-2019 table 9 results used here.
REGISTER_OK = 0
REGISTER_TERMINAL_TAKEN = 3
REGISTER_TERMINAL_UNKNOWN = 4

# Connecting to a database that does not answer must not hold the terminals' logins for long.
CONNECT_TIMEOUT_S = 5
# A batch of logins not written by then is given up as "database unavailable": the terminals
# are answered from the cache or retry, instead of all waiting on a database that hangs.
WRITE_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What a 0x0100 said, plus the auth code to issue and the policy to apply."""

    phone: str
    province: int
    city: int
    manufacturer: str
    model: str
    terminal_id: str
    plate_color: int
    plate: str
    auth_code: str
    policy: str
    at: datetime
    peer: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRecord:
    phone: str
    provisioned: bool
    auth_code: str | None
    imei: str | None
    firmware: str | None
    plate: str | None
    registered_at: datetime | None
    manufacturer: str | None = None
    terminal_id: str | None = None


# The identity test is in the upsert itself, so two nodes cannot both hand a phone out: the
# phone is free (never registered, or released), or the 0x0100 comes from the terminal that
# holds it (same manufacturer and a non-empty terminal id).  No row: refused.
_UPSERT = """
WITH old AS (SELECT auth_code FROM terminals WHERE phone = %(phone)s)
INSERT INTO terminals AS t (phone, auth_code, registered_at, province_id, city_id,
                            manufacturer, model, terminal_id, plate_color, plate, updated_at)
VALUES (%(phone)s, %(auth_code)s, %(at)s, %(province)s, %(city)s, %(manufacturer)s, %(model)s,
        %(terminal_id)s, %(plate_color)s, %(plate)s, %(at)s)
ON CONFLICT (phone) DO UPDATE SET
    auth_code = excluded.auth_code, registered_at = excluded.registered_at,
    province_id = excluded.province_id, city_id = excluded.city_id,
    manufacturer = excluded.manufacturer, model = excluded.model,
    terminal_id = excluded.terminal_id, plate_color = excluded.plate_color,
    plate = excluded.plate, updated_at = excluded.updated_at
WHERE t.auth_code IS NULL
   OR (btrim(coalesce(excluded.terminal_id, '')) <> ''
       AND btrim(t.terminal_id) = btrim(excluded.terminal_id)
       AND t.manufacturer IS NOT DISTINCT FROM excluded.manufacturer)
RETURNING EXISTS (SELECT FROM old WHERE auth_code IS NOT NULL) AS reregistered
"""
_UPDATE_PROVISIONED = """
WITH old AS (SELECT auth_code FROM terminals WHERE phone = %(phone)s)
UPDATE terminals AS t SET auth_code = %(auth_code)s, registered_at = %(at)s,
    province_id = %(province)s, city_id = %(city)s, manufacturer = %(manufacturer)s,
    model = %(model)s, terminal_id = %(terminal_id)s, plate_color = %(plate_color)s,
    plate = %(plate)s, updated_at = %(at)s
WHERE phone = %(phone)s AND provisioning_state = 'provisioned'
  AND (t.auth_code IS NULL
       OR (btrim(%(terminal_id)s) <> '' AND btrim(t.terminal_id) = btrim(%(terminal_id)s)
           AND t.manufacturer IS NOT DISTINCT FROM %(manufacturer)s))
RETURNING EXISTS (SELECT FROM old WHERE auth_code IS NOT NULL) AS reregistered
"""
_PROVISIONED = "SELECT provisioning_state = 'provisioned' FROM terminals WHERE phone = %s"
_AUTHENTICATE = """
UPDATE terminals SET imei = coalesce(%(imei)s, imei), firmware = coalesce(%(firmware)s, firmware),
    updated_at = %(at)s
WHERE phone = %(phone)s AND auth_code = %(auth_code)s
"""
_LOOKUP = """
SELECT phone, provisioning_state = 'provisioned' AS provisioned, auth_code, imei, firmware,
       plate, registered_at, manufacturer, terminal_id
FROM terminals WHERE phone = %s
"""
_KNOWN_CODES = "SELECT phone, auth_code FROM terminals WHERE auth_code IS NOT NULL"
_PROVISION = """
INSERT INTO terminals (phone, provisioning_state) VALUES (%s, 'provisioned')
ON CONFLICT (phone) DO UPDATE SET provisioning_state = 'provisioned', updated_at = now()
"""
_RESET = """
UPDATE terminals SET auth_code = NULL, terminal_id = NULL, updated_at = now()
WHERE phone = %s
RETURNING manufacturer, model, plate
"""
_EVENT = """
INSERT INTO terminal_events (phone, at, event, actor, detail)
VALUES (%s, coalesce(%s, now()), %s, %s, %s)
"""

# The driver's errors that say the values are at fault; every other driver error says the
# database (or the way to it) is, and is reported as unavailable.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)

Work = Callable[[psycopg.Connection[Any]], Any]


@dataclasses.dataclass(slots=True)
class _Write:
    """One queued piece of work and, once its batch is written, its result or error."""

    work: Work
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: Any = None
    error: StorageError | None = None


def _typed(exc: psycopg.Error) -> StorageError:
    """The typed error for a driver error.  Only the first line of the message: psycopg's
    DETAIL lines may quote the values sent (auth codes)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, _DATA_ERRORS):
        return DataRejectedError(f"{type(exc).__name__}: {first}")
    # Everything else -- connection failures, a schema not yet migrated, a statement
    # cancelled -- is the database's state, not the request's: a later try may succeed.
    return DatabaseUnavailableError(f"{type(exc).__name__}: {first}")


class TerminalStore:
    """Registration, authentication and provisioning against the ``terminals`` table."""

    # Statements per transaction: one commit for the batch, still short enough that a batch
    # never holds its row locks for long.
    MAX_BATCH = 500

    def __init__(self, dsn: str, *, write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self._dsn = dsn
        self._write_timeout_s = write_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._thread_lock = threading.Lock()  # one statement at a time on the connection
        self._limiter = trio.CapacityLimiter(1)
        # Bounded by the callers: each connection task waits on at most one write.
        self._queue: list[_Write] = []
        self._writing = False

    # -- the connection (worker thread, under the thread lock)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        return self._conn

    def _forget_broken(self) -> None:
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._conn = None

    def _run_one(self, work: Work) -> Any:
        """``work`` in its own transaction; typed errors."""
        with self._thread_lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    return work(conn)
            except psycopg.Error as exc:
                self._forget_broken()
                raise _typed(exc) from exc

    def _run_batch(self, writes: Sequence[_Write]) -> None:
        """Run ``writes`` in one transaction; if it fails, each on its own (so that one bad
        statement fails alone and a broken connection fails them all, as each would)."""
        with self._thread_lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    for write in writes:
                        write.result = write.work(conn)
            except psycopg.Error:
                self._forget_broken()
            else:
                return
        for write in writes:
            try:
                write.result = self._run_one(write.work)
            except StorageError as exc:
                write.error = exc

    async def _write(self, work: Work) -> Any:
        """Queue ``work``; the first caller to find no batch in progress writes batches until
        the queue is empty (shielded, and bounded by the write timeout: the others wait on
        it), the rest wait.  Raises the typed error of its own work."""
        write = _Write(work)
        self._queue.append(write)
        if self._writing:
            await write.done.wait()
        else:
            self._writing = True
            try:
                with trio.CancelScope(shield=True):
                    while self._queue:
                        batch = self._queue[: self.MAX_BATCH]
                        del self._queue[: self.MAX_BATCH]
                        try:
                            await self._run_batch_in_thread(batch)
                        finally:
                            for done in batch:
                                done.done.set()
            finally:
                self._writing = False
        if write.error is not None:
            raise write.error
        return write.result

    async def _run_batch_in_thread(self, batch: list[_Write]) -> None:
        with trio.move_on_after(self._write_timeout_s):
            await trio.to_thread.run_sync(
                self._run_batch, batch, limiter=self._limiter, abandon_on_cancel=True
            )
            return
        # The thread goes on in the background; its connection is dropped when it returns.
        error = DatabaseUnavailableError(f"no answer within {self._write_timeout_s} s")
        for write in batch:
            if write.error is None and write.result is None:
                write.error = error

    async def _read(self, work: Work) -> Any:
        with trio.move_on_after(self._write_timeout_s):
            return await trio.to_thread.run_sync(
                self._run_one, work, limiter=self._limiter, abandon_on_cancel=True
            )
        raise DatabaseUnavailableError(f"no answer within {self._write_timeout_s} s")

    # -- registration and authentication

    async def register(self, registration: Registration) -> int:
        """Record a registration; returns the table 9 result code.  Written together with
        the other registrations and authentications waiting (see the module docstring)."""
        params = dataclasses.asdict(registration)

        def work(conn: psycopg.Connection[Any]) -> int:
            if registration.policy == POLICY_REGISTRY:
                row = conn.execute(_UPDATE_PROVISIONED, params).fetchone()
                if row is None:
                    provisioned = conn.execute(_PROVISIONED, (registration.phone,)).fetchone()
                    if not (provisioned and provisioned[0]):
                        return REGISTER_TERMINAL_UNKNOWN
                    _event(conn, registration, "registration_refused")
                    return REGISTER_TERMINAL_TAKEN
            else:
                row = conn.execute(_UPSERT, params).fetchone()
                if row is None:
                    _event(conn, registration, "registration_refused")
                    return REGISTER_TERMINAL_TAKEN
            _event(conn, registration, "reregistered" if row[0] else "registered")
            return REGISTER_OK

        result: int = await self._write(work)
        return result

    async def authenticate(
        self, *, phone: str, auth_code: str, imei: str | None, firmware: str | None, at: datetime
    ) -> bool:
        """True if ``auth_code`` is the terminal's; records IMEI and firmware (2019).  Written
        together with the other registrations and authentications waiting."""
        params = {
            "phone": phone,
            "auth_code": auth_code,
            "imei": imei,
            "firmware": firmware,
            "at": at,
        }

        def work(conn: psycopg.Connection[Any]) -> bool:
            return bool(conn.execute(_AUTHENTICATE, params).rowcount == 1)

        ok: bool = await self._write(work)
        return ok

    async def lookup(self, phone: str) -> TerminalRecord | None:
        def work(conn: psycopg.Connection[Any]) -> TerminalRecord | None:
            found = conn.cursor(row_factory=dict_row).execute(_LOOKUP, (phone,)).fetchone()
            return TerminalRecord(**found) if found else None

        record: TerminalRecord | None = await self._read(work)
        return record

    async def known_codes(self) -> dict[str, str]:
        """Every registered terminal's phone and auth code (to fill a cache)."""

        def work(conn: psycopg.Connection[Any]) -> dict[str, str]:
            return {str(p): str(c) for p, c in conn.execute(_KNOWN_CODES).fetchall()}

        codes: dict[str, str] = await self._read(work)
        return codes

    # -- the platform centre (synchronous: the command line)

    def lookup_sync(self, phone: str) -> TerminalRecord | None:
        def work(conn: psycopg.Connection[Any]) -> TerminalRecord | None:
            found = conn.cursor(row_factory=dict_row).execute(_LOOKUP, (phone,)).fetchone()
            return TerminalRecord(**found) if found else None

        record: TerminalRecord | None = self._run_one(work)
        return record

    def provision_sync(self, phone: str) -> None:
        """Mark a terminal as installed through the platform centre (article 18)."""
        self._run_one(lambda conn: conn.execute(_PROVISION, (phone,)))

    def reset_sync(self, phone: str, *, actor: str, reason: str | None = None) -> bool:
        """Release ``phone``: its auth code and terminal id are cleared, so the next 0x0100
        for it registers whatever terminal sends it (a terminal replaced or moved, article
        18).  Recorded in ``terminal_events``.  False if the phone is unknown."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(_RESET, (phone,)).fetchone()
            if row is None:
                return False
            detail = {"manufacturer": row[0], "model": row[1], "plate": row[2]}
            if reason:
                detail["reason"] = reason
            conn.execute(_EVENT, (phone, None, "reset", actor, Jsonb(detail)))
            return True

        released: bool = self._run_one(work)
        return released

    def events_sync(self, phone: str) -> list[dict[str, Any]]:
        """The phone's identity events, oldest first."""

        def work(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            query = (
                "SELECT at, event, actor, detail FROM terminal_events WHERE phone = %s "
                "ORDER BY at, id"
            )
            return list(conn.cursor(row_factory=dict_row).execute(query, (phone,)).fetchall())

        events: list[dict[str, Any]] = self._run_one(work)
        return events

    def close(self) -> None:
        with self._thread_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _event(conn: psycopg.Connection[Any], registration: Registration, event: str) -> None:
    detail = {
        "manufacturer": registration.manufacturer,
        "model": registration.model,
        "terminal_id": registration.terminal_id,
        "plate": registration.plate,
        "policy": registration.policy,
    }
    conn.execute(
        _EVENT,
        (registration.phone, registration.at, event, registration.peer or None, Jsonb(detail)),
    )
