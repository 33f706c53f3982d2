"""The rule engine's database sources, for the ``serve`` wiring.

* :class:`DatabaseMasterData` -- vehicles, fences and filings from the master-data tables
  (``jt808 vehicles|fences|filings import``), reloaded by the rule service when the tables'
  change counter moves, so imports take effect without a restart.
* :class:`DatabaseAlertFeed` -- the ``alert_events`` log as the operator port's
  ``/alerts/stream`` source: every node streams every node's alerts, and a client resumes with
  Last-Event-ID from the log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import trio

from alerts import Filing, Registry
from geofence import Fence
from ingest import AlertFilter
from storage import masterdata
from storage.alerts import AlertRepository
from tools.masterdata_cmd import fences_from_rows, filings_from_rows, registry_from_rows

# Filings ending more than this long ago cannot matter to live rules: back-filing deadlines are
# 3 working days (article 21), at most about 10 calendar days across the Spring Festival; 35
# days also covers replaying a month of recorded traffic.
FILINGS_LOOKBACK = timedelta(days=35)

# How often a waiting stream looks for new events in the log.  A log query is an index lookup
# of max(seq); twice a second keeps the stream's delay well under a person's notice.
FEED_POLL_S = 0.5


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DatabaseMasterData:
    """``tools.rules_service.MasterData`` over the master-data tables (blocking calls)."""

    def __init__(self, dsn: str, *, wall_clock: Callable[[], datetime] = _utc_now) -> None:
        self._dsn = dsn
        self._wall_clock = wall_clock

    def version(self) -> int:
        with psycopg.connect(self._dsn) as conn:
            return masterdata.masterdata_version(conn)

    def load(self) -> tuple[Registry, Sequence[Fence], Sequence[Filing]]:
        since = self._wall_clock() - FILINGS_LOOKBACK
        with psycopg.connect(self._dsn) as conn:
            registry = registry_from_rows(masterdata.load_registry_rows(conn))
            fences = fences_from_rows(masterdata.load_fence_rows(conn))
            filings = filings_from_rows(masterdata.load_filing_rows(conn, since))
        return registry, fences, filings


class DatabaseAlertFeed:
    """``ingest.AlertFeed`` over ``storage.alerts.AlertRepository`` (the ``alert_events`` log).

    Queries run in worker threads, one at a time on the repository's connection.
    """

    def __init__(self, dsn: str) -> None:
        self._repository = AlertRepository(dsn)
        self._limiter = trio.CapacityLimiter(1)

    async def last_seq(self) -> int:
        return await trio.to_thread.run_sync(self._repository.last_seq, limiter=self._limiter)

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        def query() -> list[tuple[int, dict[str, Any]]]:
            return self._repository.events_after(
                seq,
                limit,
                unit=filters.unit,
                rule=filters.rule,
                state=filters.state,
                severity=filters.severity,
            )

        return await trio.to_thread.run_sync(query, limiter=self._limiter)

    async def wait_for_new(self, after_seq: int) -> None:
        # Spurious returns are allowed: the stream asks the log again after each one.
        if await self.last_seq() <= after_seq:
            await trio.sleep(FEED_POLL_S)

    def close(self) -> None:
        self._repository.close()
