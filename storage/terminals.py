"""Terminal registration and authentication records (JT/T 808-2019 8.5-8.8; article 18).

The ``terminals`` table keeps each terminal's auth code, so a terminal that registered once
authenticates again after a server restart.  :class:`TerminalStore` runs the statements on one
dedicated connection in a worker thread, which keeps them strictly ordered.  Registrations and
authentications come in storms (every terminal of a fleet reconnects after a network or server
restart), and each is a write whose commit waits for a WAL flush; so those that arrive while a
batch is being written are written together next, in one transaction with one commit (group
commit), and each caller gets its own statement's result.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row

logger = logging.getLogger(__name__)

POLICY_OPEN = "open"
POLICY_REGISTRY = "registry"

# JT/T 808-2019 table 9 results used here.
REGISTER_OK = 0
REGISTER_TERMINAL_UNKNOWN = 4


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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalRecord:
    phone: str
    provisioned: bool
    auth_code: str | None
    imei: str | None
    firmware: str | None
    plate: str | None
    registered_at: datetime | None


_UPSERT = """
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
"""
_UPDATE_PROVISIONED = """
UPDATE terminals SET auth_code = %(auth_code)s, registered_at = %(at)s,
    province_id = %(province)s, city_id = %(city)s, manufacturer = %(manufacturer)s,
    model = %(model)s, terminal_id = %(terminal_id)s, plate_color = %(plate_color)s,
    plate = %(plate)s, updated_at = %(at)s
WHERE phone = %(phone)s AND provisioning_state = 'provisioned'
"""
_AUTHENTICATE = """
UPDATE terminals SET imei = coalesce(%(imei)s, imei), firmware = coalesce(%(firmware)s, firmware),
    updated_at = %(at)s
WHERE phone = %(phone)s AND auth_code = %(auth_code)s
"""
_LOOKUP = """
SELECT phone, provisioning_state = 'provisioned' AS provisioned, auth_code, imei, firmware,
       plate, registered_at
FROM terminals WHERE phone = %s
"""
_PROVISION = """
INSERT INTO terminals (phone, provisioning_state) VALUES (%s, 'provisioned')
ON CONFLICT (phone) DO UPDATE SET provisioning_state = 'provisioned', updated_at = now()
"""


@dataclasses.dataclass(slots=True)
class _Write:
    """One queued statement and, once its batch is written, its row count or error."""

    query: str
    params: Sequence[Any] | Mapping[str, Any]
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    rowcount: int = 0
    error: BaseException | None = None


class TerminalStore:
    """Registration, authentication and provisioning against the ``terminals`` table."""

    # Statements per transaction: one commit for the batch, still short enough that a batch
    # never holds its row locks for long.
    MAX_BATCH = 500

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._thread_lock = threading.Lock()  # one statement at a time on the connection
        self._limiter = trio.CapacityLimiter(1)
        # Bounded by the callers: each connection task waits on at most one write.
        self._queue: list[_Write] = []
        self._writing = False

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        return self._conn

    def _run(self, query: str, params: Sequence[Any] | Mapping[str, Any]) -> int:
        with self._thread_lock:
            try:
                rowcount: int = self._connection().execute(query, params).rowcount
            except psycopg.OperationalError:
                self._conn = None  # reconnect on the next call
                raise
            return rowcount

    def _run_batch(self, writes: Sequence[_Write]) -> None:
        """Write ``writes`` in one transaction; if it fails, each on its own (so that one bad
        statement fails alone and a broken connection fails them all, as each would)."""
        with self._thread_lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    for write in writes:
                        write.rowcount = conn.execute(write.query, write.params).rowcount
            except psycopg.Error:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
            else:
                return
        for write in writes:
            try:
                write.rowcount = self._run(write.query, write.params)
            except psycopg.Error as exc:
                write.error = exc

    async def _write(self, query: str, params: Sequence[Any] | Mapping[str, Any]) -> int:
        """Queue a statement; the first caller to find no batch in progress writes batches
        until the queue is empty (shielded: the others wait on it), the rest wait."""
        write = _Write(query, params)
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
                            await trio.to_thread.run_sync(
                                self._run_batch, batch, limiter=self._limiter
                            )
                        finally:
                            for done in batch:
                                done.done.set()
            finally:
                self._writing = False
        if write.error is not None:
            raise write.error
        return write.rowcount

    def lookup_sync(self, phone: str) -> TerminalRecord | None:
        with self._thread_lock:
            row = self._connection().cursor(row_factory=dict_row).execute(_LOOKUP, (phone,))
            found = row.fetchone()
        return TerminalRecord(**found) if found else None

    def provision_sync(self, phone: str) -> None:
        """Mark a terminal as installed through the platform centre (article 18)."""
        self._run(_PROVISION, (phone,))

    async def register(self, registration: Registration) -> int:
        """Record a registration; returns the table 9 result code.  Written together with
        the other registrations and authentications waiting (see the module docstring)."""
        params = dataclasses.asdict(registration)
        if registration.policy == POLICY_REGISTRY:
            updated = await self._write(_UPDATE_PROVISIONED, params)
            return REGISTER_OK if updated else REGISTER_TERMINAL_UNKNOWN
        await self._write(_UPSERT, params)
        return REGISTER_OK

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
        return await self._write(_AUTHENTICATE, params) == 1

    async def lookup(self, phone: str) -> TerminalRecord | None:
        return await trio.to_thread.run_sync(self.lookup_sync, phone, limiter=self._limiter)

    def close(self) -> None:
        with self._thread_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
