"""The daily statistics kept fresh by a background service.

:class:`DailyStatsRefresher` calls :func:`storage.reports.refresh_daily_stats` every
``interval_s`` in a worker thread, so ``vehicle_daily_stats`` (and ``unit_category_daily``)
show the current day and late-received data within about one interval, with no operator
step.  Every node may run one: the refreshes take turns under an advisory lock, and a refresher
that finds the statistics refreshed (by any process) within the last half interval skips its
turn, so a cluster does about one refresh per interval whatever its number of nodes.

A refresh that fails (the database down, the schema not yet migrated) is logged and tried
again at the next interval; :meth:`DailyStatsRefresher.run` ends only when cancelled.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import psycopg
import trio

from storage.reports import DailyStatsRefresh, refresh_daily_stats

logger = logging.getLogger(__name__)

# Five minutes: the daily figures are read by people (reports, dashboards) for whom a few
# minutes' delay does not matter, and each refresh recomputes the whole current day: for a
# fleet of 5,000 positions/s that is up to 430 million rows at the end of the day (one
# partition scan), which must stay a small share of the database's time.
DEFAULT_INTERVAL_S = 300.0

# Connecting to a database that does not answer must not hold the attempt for long.
CONNECT_TIMEOUT_S = 5


class DailyStatsRefresher:
    """Refreshes the daily statistics of ``dsn`` every ``interval_s``; see the module docstring.

    Start with ``await nursery.start(refresher.run)``.  With ``ready`` (the schema migrator's
    ``ready`` event), the first refresh waits for the schema to be current; without it, the
    refreshes fail and are retried until it is.  ``refreshes`` / ``failures`` count the
    attempts, ``last`` is the latest successful result, ``last_error`` the latest failure
    (None after a success).
    """

    def __init__(
        self,
        dsn: str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        ready: trio.Event | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._dsn = dsn
        self._interval_s = interval_s
        self._ready = ready
        self.refreshes = 0
        self.failures = 0
        self.last: DailyStatsRefresh | None = None
        self.last_error: str | None = None
        self._streak = 0  # failures since the last success

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._ready is not None:
            await self._ready.wait()
        while True:
            await self.refresh_once()
            await trio.sleep(self._interval_s)

    async def refresh_once(self) -> bool:
        """One refresh in a worker thread; True when it succeeded.  Never raises but
        cancellation."""
        try:
            # Cancelling (shutdown) does not wait for the thread: its refresh commits on its
            # own, or is rolled back when the process ends, and the next one redoes it.
            result = await trio.to_thread.run_sync(self._refresh, abandon_on_cancel=True)
        except psycopg.OperationalError as exc:
            first = self._failed(exc)
            # the first failure of a run of them stands out; the retries do not flood the log
            (logger.error if first else logger.info)(
                "daily statistics not refreshed, database unreachable (%s); retrying in %.0f s",
                self.last_error,
                self._interval_s,
            )
            return False
        except Exception as exc:
            self._failed(exc)
            logger.exception("daily statistics not refreshed; retrying in %.0f s", self._interval_s)
            return False
        if self._streak:
            logger.warning("daily statistics refreshed again after %d failures", self._streak)
        self._streak = 0
        self.refreshes += 1
        self.last = result
        self.last_error = None
        return True

    def _failed(self, exc: Exception) -> bool:
        """Record a failure; True when it is the first since a success (or the start)."""
        self.failures += 1
        self._streak += 1
        text = str(exc).strip()
        self.last_error = text.splitlines()[0] if text else type(exc).__name__
        return self._streak == 1

    def _refresh(self) -> DailyStatsRefresh:
        conn: psycopg.Connection[Any]
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            return refresh_daily_stats(
                conn, unless_refreshed_within=timedelta(seconds=self._interval_s / 2)
            )
