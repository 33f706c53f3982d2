"""Prometheus metrics of the storage package (default registry, defined once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROWS = Counter(
    "jt808_storage_rows",
    "Position rows by outcome: database, spool (durable, replayed later) or failed (not "
    "durable: the server must not acknowledge them)",
    ["outcome"],
)
BATCHES = Counter("jt808_storage_batches", "Batches written, by outcome", ["outcome"])
DUPLICATES = Counter(
    "jt808_storage_duplicate_rows", "Rows skipped because their natural key was already stored"
)
DEDUP_FALLBACKS = Counter(
    "jt808_storage_dedup_fallbacks",
    "Direct COPY batches that hit the unique key and were redone through the staging table",
)
DB_ERRORS = Counter("jt808_storage_db_errors", "Failed database writes, by kind", ["kind"])
REJECTED_ROWS = Counter(
    "jt808_storage_rejected_rows", "Rows the database refused as data errors (not durable)"
)
DB_UP = Gauge("jt808_storage_db_up", "1 while the writer sends batches to the database")
PENDING_ROWS = Gauge(
    "jt808_storage_pending_rows", "Rows submitted to the writer and not yet durable"
)
WRITE_SECONDS = Histogram(
    "jt808_storage_batch_write_seconds",
    "Time to make one batch durable in the database",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SPOOL_BYTES = Gauge("jt808_storage_spool_bytes", "Bytes held in the spool")
SPOOL_RECORDS_WRITTEN = Counter("jt808_storage_spool_records", "Batches written to the spool")
SPOOL_FULL = Counter(
    "jt808_storage_spool_full", "Batches refused because the spool reached its size cap"
)
SPOOL_ERRORS = Counter("jt808_storage_spool_errors", "Spool writes that failed (disk errors)")
SPOOL_TORN_RECORDS = Counter(
    "jt808_storage_spool_torn_records", "Torn spool records (cut short by a crash) ignored"
)
SPOOL_REPLAYED = Counter(
    "jt808_storage_spool_replayed_records", "Spool records stored in the database by replay"
)
SPOOL_QUARANTINED = Counter(
    "jt808_storage_spool_quarantined_records",
    "Spool records the database refused at replay, set aside in rejected-*.copy files",
)
