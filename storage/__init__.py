"""PostgreSQL storage of the JT/T 808 platform (the only package that imports psycopg).

Interface for the server
========================

Build rows purely, submit them, acknowledge when durable::

    from storage import PositionWriter, WriterConfig, Spool, position_rows

    writer = PositionWriter(dsn, config=WriterConfig(), spool=Spool(spool_dir))
    await nursery.start(writer.run)
    ...
    # in a connection task, for a decoded 0x0200 (one location) or 0x0704 (many):
    rows = position_rows(header, [report], received_at)            # pure, no I/O
    rows = position_rows(header, batch.positions, received_at, batch_type=batch.batch_type)
    completion = await writer.submit(rows)   # waits only when the writer is at its cap
    if (await completion.wait()).durable:    # Durability.DATABASE or Durability.SPOOL
        ...send the 0x8001 acknowledgement...
    # Durability.FAILED: do not acknowledge; the terminal retransmits later.

* :func:`position_row` / :func:`position_rows` -> :class:`PositionRow`: pure builders from the
  frame :class:`~protocol.header.Header`, a :class:`~protocol.messages.location.Location`, the
  aware ``received_at`` and the 0x0704 ``batch_type`` (None otherwise).
* :class:`PositionWriter` -- trio service (``async def run(*, task_status)``); batches by size
  or age (:class:`WriterConfig`), binary COPY from worker threads under a CapacityLimiter,
  exactly-once on the natural key ``(phone, device_time, fix_key)``, spools to :class:`Spool`
  when the database is down or slow, replays the spool when it is back.  ``submit`` applies
  back-pressure at ``WriterConfig.pending_cap`` rows; ``drain()`` flushes and waits.
  Cancelling ``run`` flushes the open batch in a shielded scope before returning.
* :class:`Completion` -> :class:`Durability` (``DATABASE``, ``SPOOL``, ``FAILED``).

Database administration
=======================

* :func:`migrate` (sync psycopg connection) -- versioned migrations, idempotent; picks the
  TimescaleDB or the partitioned backend once.  :func:`ensure_partitions` creates daily
  partitions ahead (the writer also does it hourly); :func:`drop_partitions_before` is the
  retention of the partitioned backend.
* :func:`refresh_daily_stats`, :func:`positions_per_unit`, :func:`export_positions_csv`
  (``jt808 export``) in :mod:`storage.reports`; views ``vehicle_latest_position``,
  ``vehicle_daily_stats``, ``unit_category_daily``.
* :func:`database_dsn` / :func:`embedded_postgres` -- a private PostgreSQL when no DSN is
  configured (optional extra ``embedded``).

Multimedia and the cluster
==========================

* :class:`MediaStore` (:mod:`storage.media`) -- 0x0801 uploads as fsynced files under a media
  directory plus a ``multimedia`` row; ``await store.save(MediaFile(...))``.
* :class:`SessionTable` and :class:`NotifyBus` (:mod:`storage.sessions`) -- the ``sessions``
  table of online terminals per node, and JSON messages between nodes over LISTEN/NOTIFY
  (commands relayed to the node holding a terminal).

Rule engine data
================

* :class:`AlertRepository` (:mod:`storage.alerts`) -- the engine's alert store with dicts
  (``Alert.to_json()``), an ``alert_events`` log and ``NOTIFY jt808_alerts`` for live tails.
* :mod:`storage.masterdata` -- vehicles, fences and filings as plain rows (CSV parsing, upserts,
  loads) and :func:`masterdata_version`, bumped by any change, for reloads without a restart.
* :class:`TripRepository` (:mod:`storage.trips`) -- detected trips, upserted by (vehicle,
  start) as they start and end.
* :func:`violations_by_unit_rule` (:mod:`storage.reports_violations`) -- the periodic report.

Metrics are in :mod:`storage.metrics` (prometheus_client, default registry).
"""

from __future__ import annotations

from storage.alerts import ALERT_CHANNEL, AlertRepository
from storage.embedded import database_dsn, embedded_postgres
from storage.errors import StorageError, WriterClosedError
from storage.masterdata import (
    MASTERDATA_CHANNEL,
    MasterDataError,
    changed_since,
    filing_rows_from_csv,
    filing_rows_from_json,
    load_fence_rows,
    load_filing_rows,
    load_registry_rows,
    masterdata_version,
    upsert_fences,
    upsert_filings,
    upsert_vehicles,
    vehicle_ids,
    vehicle_rows_from_csv,
    vehicle_rows_from_json,
)
from storage.media import MediaFile, MediaStore, StoredMedia, media_path
from storage.reports import export_positions_csv, positions_per_unit, refresh_daily_stats
from storage.reports_violations import ViolationCount, month_bounds, violations_by_unit_rule
from storage.rows import COLUMNS, PositionRow, encode_copy_binary, position_row, position_rows
from storage.schema import (
    MIGRATIONS,
    TimescaleOptions,
    current_backend,
    drop_partitions_before,
    ensure_partitions,
    migrate,
)
from storage.sessions import NotifyBus, SessionTable
from storage.spool import Spool
from storage.terminals import Registration, TerminalRecord, TerminalStore
from storage.trips import TRIP_COLUMNS, TripRepository
from storage.writer import Completion, Durability, PositionWriter, WriterConfig

__all__ = [
    "ALERT_CHANNEL",
    "COLUMNS",
    "MASTERDATA_CHANNEL",
    "MIGRATIONS",
    "TRIP_COLUMNS",
    "AlertRepository",
    "Completion",
    "Durability",
    "MasterDataError",
    "MediaFile",
    "MediaStore",
    "NotifyBus",
    "PositionRow",
    "PositionWriter",
    "Registration",
    "SessionTable",
    "Spool",
    "StorageError",
    "StoredMedia",
    "TerminalRecord",
    "TerminalStore",
    "TimescaleOptions",
    "TripRepository",
    "ViolationCount",
    "WriterClosedError",
    "WriterConfig",
    "changed_since",
    "current_backend",
    "database_dsn",
    "drop_partitions_before",
    "embedded_postgres",
    "encode_copy_binary",
    "ensure_partitions",
    "export_positions_csv",
    "filing_rows_from_csv",
    "filing_rows_from_json",
    "load_fence_rows",
    "load_filing_rows",
    "load_registry_rows",
    "masterdata_version",
    "media_path",
    "migrate",
    "month_bounds",
    "position_row",
    "position_rows",
    "positions_per_unit",
    "refresh_daily_stats",
    "upsert_fences",
    "upsert_filings",
    "upsert_vehicles",
    "vehicle_ids",
    "vehicle_rows_from_csv",
    "vehicle_rows_from_json",
    "violations_by_unit_rule",
]
