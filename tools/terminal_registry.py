"""The server's terminal registry: the ``terminals`` table, with a cache for outages.

:class:`DatabaseRegistry` is the ``ingest.TerminalRegistry`` of ``jt808 serve``.  The database
decides whenever it can answer (identity rule and group commit in
:class:`storage.TerminalStore`).  When it cannot:

* an authentication is decided from :class:`storage.terminal_cache.TerminalCodeCache` (the
  codes this node saw issued or proven, and the table as last read), so terminals reconnecting
  during an outage get back online and their positions are spooled and acknowledged; a phone
  the cache does not know is left unanswered (the terminal retries);
* a registration is left unanswered: a code that is not in the database is not durable, and
  the terminal asks again on its own schedule.

Values the database refuses (a data error) are a refusal, never an exception: the registry
never raises for its store's sake.  :meth:`DatabaseRegistry.run` is a service (supervised by
the serve command): it loads the cache file, fills the cache from the database and keeps it
fresh, and saves it to disk when it changed.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING

import trio

from ingest import RegistrationOutcome
from storage import Registration
from storage.errors import DatabaseUnavailableError, DataRejectedError

if TYPE_CHECKING:
    from ingest import RegistrationRequest
    from ingest.interfaces import AuthRequest, TerminalInfo
    from ingest.metrics import Metrics
    from storage import TerminalStore
    from storage.terminal_cache import TerminalCodeCache

logger = logging.getLogger(__name__)

# The table is read whole this often, so registrations made on other nodes reach this node's
# cache; a read of 100,000 rows takes well under a second.
REFRESH_S = 300.0
# Until the first read succeeds (the database was down at start), it is tried this often.
RETRY_S = 15.0
# Changes reach the file within this time (and at shutdown).
SAVE_S = 30.0


class DatabaseRegistry:
    """``ingest.TerminalRegistry`` over the ``terminals`` table; see the module docstring."""

    def __init__(
        self,
        store: TerminalStore,
        cache: TerminalCodeCache,
        *,
        metrics: Metrics | None = None,
        refresh_s: float = REFRESH_S,
        retry_s: float = RETRY_S,
        save_s: float = SAVE_S,
    ) -> None:
        self._store = store
        self.cache = cache
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._save_s = save_s
        self.refreshed = trio.Event()  # the cache was filled from the database at least once

    async def register(self, request: RegistrationRequest) -> RegistrationOutcome:
        message = request.message
        registration = Registration(
            phone=request.phone,
            province=message.province,
            city=message.city,
            manufacturer=message.manufacturer,
            model=message.model,
            terminal_id=message.terminal_id,
            plate_color=message.plate_color,
            plate=message.plate,
            auth_code=request.auth_code,
            policy=request.policy,
            at=request.at,
            peer=request.peer,
        )
        try:
            result = await self._store.register(registration)
        except DatabaseUnavailableError as exc:
            logger.warning("phone=%s registration undecided: %s", request.phone, exc)
            return RegistrationOutcome(result=None)
        except DataRejectedError as exc:
            # The codec and the session check what a terminal sends; this is the backstop.
            logger.warning("phone=%s registration refused by the database: %s", request.phone, exc)
            return RegistrationOutcome(result=4)  # table 9: terminal not in the database
        if result == 0:
            self.cache.put(request.phone, request.auth_code)
        return RegistrationOutcome(
            result=result, auth_code=request.auth_code if result == 0 else None
        )

    async def authenticate(self, request: AuthRequest) -> bool | None:
        try:
            ok = await self._store.authenticate(
                phone=request.phone,
                auth_code=request.auth_code,
                imei=request.imei,
                firmware=request.software_version,
                at=request.at,
            )
        except DataRejectedError as exc:
            logger.warning(
                "phone=%s authentication refused by the database: %s", request.phone, exc
            )
            return False
        except DatabaseUnavailableError as exc:
            known = self.cache.get(request.phone)
            if known is None:
                logger.warning(
                    "phone=%s authentication undecided (not in the cache): %s", request.phone, exc
                )
                return None
            if self._metrics is not None:
                self._metrics.logins_from_cache.inc()
            # Constant time, as any comparison of a secret should be.
            return hmac.compare_digest(known.encode(), request.auth_code.encode())
        if ok:
            self.cache.put(request.phone, request.auth_code)
        return ok

    async def lookup(self, phone: str) -> TerminalInfo | None:
        from ingest.interfaces import TerminalInfo  # noqa: PLC0415

        try:
            record = await self._store.lookup(phone)
        except (DatabaseUnavailableError, DataRejectedError):
            return None
        if record is None:
            return None
        return TerminalInfo(
            phone=record.phone,
            provisioned=record.provisioned,
            auth_code=record.auth_code,
            plate=record.plate,
            terminal_id=record.terminal_id,
            imei=record.imei,
            software_version=record.firmware,
            registered_at=record.registered_at,
        )

    # -- the cache service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the file, then keep the cache filled from the database and saved."""
        loaded = await trio.to_thread.run_sync(self.cache.load)
        if loaded:
            logger.info("terminal cache: %s auth codes from %s", loaded, self.cache.path)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._saver)
                while True:
                    self.cache.begin_refresh()
                    try:
                        codes = await self._store.known_codes()
                    except DatabaseUnavailableError as exc:
                        logger.info("terminal cache not refreshed: %s", exc)
                        await trio.sleep(self._retry_s)
                        continue
                    self.cache.replace_all(codes)
                    self.refreshed.set()
                    await trio.sleep(self._refresh_s)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.save)

    async def _saver(self) -> None:
        while True:
            await trio.sleep(self._save_s)
            await trio.to_thread.run_sync(self.cache.save)
