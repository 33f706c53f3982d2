"""The batched position writer: a trio service in front of the database and the spool.

Rows submitted by the server's connection tasks accumulate into one open batch, sealed when it
reaches ``batch_rows``, or when a database connection is free and its first row is
``batch_gather_s`` old (group commit: under load the batch grows while the connections are busy,
so a busy writer makes few large batches and an idle one adds only the short gather window to
an acknowledgement's latency).  A sealed batch is
written by a worker thread holding one sync psycopg connection (psycopg's async API is
asyncio-only), under a :class:`trio.CapacityLimiter` of ``connections`` threads, with binary COPY
and exactly-once dedup (storage/pgstore.py).  Each :meth:`PositionWriter.submit` gets a
:class:`Completion` that resolves to

* ``Durability.DATABASE`` -- committed;
* ``Durability.SPOOL`` -- the database was unreachable, failed or slower than
  ``write_timeout_s``; the batch was fsynced to the local spool and will be replayed;
* ``Durability.FAILED`` -- not durable: the spool is full (or absent, or its disk failed), or
  the database refused these rows as invalid.  The server must not acknowledge them; the
  terminal will retransmit.  Always logged at ERROR and counted.

After a failure the writer sends batches straight to the spool (no waiting for timeouts) and a
recovery task probes the database with exponential back-off; once it answers, new batches go to
the database again and the spool is replayed, oldest record first, into the staging path.

Back-pressure: at most ``max_pending_rows`` rows may be submitted and not yet durable; a
submit beyond that waits, so a slow database slows the terminals' acknowledgements instead of
growing memory.

``submit`` is the server's per-message hot path: it allocates one small :class:`Completion`
(the completions of a batch share one event) and reads the clock only to open a batch.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
import trio

from storage import metrics
from storage.bindings import BindingCache
from storage.errors import StorageError, WriterClosedError
from storage.pgstore import DATA_ERRORS, PgPositionStore, WriteResult
from storage.rows import PositionRow, encode_copy_binary
from storage.schema import ensure_partitions
from storage.spool import Spool

logger = logging.getLogger(__name__)

# Partition upkeep that could not run (the database away) is tried again this often.
UPKEEP_RETRY_S = 60.0


class Durability(enum.Enum):
    DATABASE = "database"
    SPOOL = "spool"
    FAILED = "failed"

    @property
    def durable(self) -> bool:
        """True when the rows survive a crash: acknowledge them."""
        return self is not Durability.FAILED


class _Batch:
    """Submits collected into one database write; their completions share its event."""

    __slots__ = ("event", "opened_at", "outcomes", "parts", "result", "rows")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.parts: list[Sequence[PositionRow]] = []
        self.rows = 0
        self.event = trio.Event()
        self.result: Durability | None = None
        # per-submit outcomes differing from ``result`` (rows refused, partly spooled)
        self.outcomes: dict[int, Durability] | None = None


class Completion:
    """The outcome of one :meth:`PositionWriter.submit`; ``await completion.wait()``.

    Small on purpose (the server makes one per message): the completions of one batch share
    the batch's event.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    @property
    def result(self) -> Durability | None:
        """The outcome, or None while the rows are still in flight."""
        batch = self._batch
        if batch.outcomes is not None and self._index in batch.outcomes:
            return batch.outcomes[self._index]
        return batch.result

    async def wait(self) -> Durability:
        await self._batch.event.wait()
        result = self.result
        assert result is not None
        return result


def _resolved_batch() -> _Batch:
    batch = _Batch(0.0)
    batch.result = Durability.DATABASE
    batch.event.set()
    return batch


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WriterConfig:
    """Writer settings; units in the names.

    ``batch_rows``/``batch_gather_s``: a 5,000-row batch takes 12-25 ms to COPY and commit
    here (bench/storage.py), so the per-batch costs (round trips, the commit's WAL flush) are
    spread thin.  A batch is written once a connection is free and it is ``batch_gather_s``
    old: 10 ms lets the reports that arrive together (many terminals report on the same
    second) share a commit, while an idle writer adds little to an acknowledgement's delay.
    ``max_pending_rows`` (None: ``(connections + 2) * batch_rows``): one batch per connection
    in flight, one filling and one of slack; more would only add latency and memory (about
    1 KB per row in Python).
    ``write_timeout_s``: a batch not committed by then goes to the spool.
    ``dedup``: "adaptive" tries direct COPY and falls back to staging on a repeat, then stays
    on staging for ``staging_batches_after_repeat`` batches; "staging" always stages.
    """

    batch_rows: int = 5_000
    batch_gather_s: float = 0.01
    max_pending_rows: int | None = None
    connections: int = 2
    write_timeout_s: float = 5.0
    connect_timeout_s: float = 3.0
    retry_min_s: float = 0.5
    retry_max_s: float = 30.0
    dedup: Literal["adaptive", "staging"] = "adaptive"
    staging_batches_after_repeat: int = 8
    partition_check_s: float = 3600.0
    partition_days_ahead: int = 7

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.connections < 1:
            raise ValueError("batch_rows and connections must be positive")
        if self.max_pending_rows is not None and self.max_pending_rows < self.batch_rows:
            raise ValueError("max_pending_rows must hold at least one batch")

    @property
    def pending_cap(self) -> int:
        if self.max_pending_rows is not None:
            return self.max_pending_rows
        return (self.connections + 2) * self.batch_rows


class DatabaseUnavailableError(StorageError):
    """The database did not take a write in time (connection, server or timeout failure)."""


class RowsRejectedError(StorageError):
    """The database refused the rows themselves (a data error); retrying will not help."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PositionWriter:
    """See the module docstring.  Start with ``await nursery.start(writer.run)``.

    ``dsn`` is the database; ``spool`` the local spool (None: failures are not durable).
    ``wall_clock`` gives the current time for partition upkeep; trio's clock drives batching
    and timeouts.  ``store_factory`` makes the per-thread database stores (tests inject
    failures with it).
    """

    def __init__(
        self,
        dsn: str,
        *,
        config: WriterConfig | None = None,
        spool: Spool | None = None,
        wall_clock: Callable[[], datetime] = _utcnow,
        store_factory: Callable[[], PgPositionStore] | None = None,
        schema_ready: trio.Event | None = None,
    ) -> None:
        self.config = config or WriterConfig()
        self.spool = spool
        # Set once the schema is current (storage.migrator); until then batches are spooled,
        # as during an outage, and the recovery task waits for it.
        self._schema_ready = schema_ready
        self._went_down = False  # logged as an outage, as opposed to a start before the schema
        self._wall_clock = wall_clock
        self._store_factory = store_factory or functools.partial(
            PgPositionStore,
            dsn,
            statement_timeout_s=self.config.write_timeout_s,
            connect_timeout_s=self.config.connect_timeout_s,
            bindings=BindingCache(),  # one map of terminal bindings for all the stores
        )
        self._cap = self.config.pending_cap
        self._batch_rows = self.config.batch_rows
        self._limiter = trio.CapacityLimiter(self.config.connections)
        self._spool_limiter = trio.CapacityLimiter(1)  # appends in order, one fsync at a time
        self._inflight = trio.Semaphore(self.config.connections)
        self._idle_stores: list[PgPositionStore] = []
        self._running = False
        self._nursery: trio.Nursery | None = None
        # batches: the one filling, and full ones waiting for a connection
        self._open: _Batch | None = None
        self._ready: collections.deque[_Batch] = collections.deque()
        self._batch_opened = trio.Event()
        self._wake = trio.Event()  # a batch sealed or a connection freed
        # back-pressure
        self._outstanding = 0
        self._space = trio.Event()
        # database health
        self._db_up = True
        self._staging_left = 0
        self._recover = trio.Event()

    # -- public API ---------------------------------------------------------------------------

    @property
    def db_up(self) -> bool:
        return self._db_up

    @property
    def outstanding_rows(self) -> int:
        """Rows submitted and not yet resolved."""
        return self._outstanding

    async def submit(self, rows: Sequence[PositionRow]) -> Completion:
        """Queue ``rows`` (positions of one or more messages); wait while at the cap.

        Returns at once with a :class:`Completion` when there is room.  Raises
        :class:`WriterClosedError` when the writer is not running.
        """
        if not self._running:
            raise WriterClosedError("the position writer is not running")
        count = len(rows)
        if not count:
            return Completion(_resolved_batch(), 0)
        while self._outstanding + count > self._cap and self._outstanding:
            await self._space.wait()
            if not self._running:
                raise WriterClosedError("the position writer stopped")
        completion = self._queue(rows, count)
        if self._open is None:
            # The batch just filled: let the batcher hand it to a thread now, so the
            # database works while the caller goes on filling the next one.
            await trio.lowlevel.checkpoint()
        return completion

    def submit_nowait(self, rows: Sequence[PositionRow]) -> Completion | None:
        """:meth:`submit` without waiting: None (nothing queued) when the writer is at its
        cap.  Raises :class:`WriterClosedError` when the writer is not running."""
        if not self._running:
            raise WriterClosedError("the position writer is not running")
        count = len(rows)
        if not count:
            return Completion(_resolved_batch(), 0)
        if self._outstanding + count > self._cap and self._outstanding:
            return None
        return self._queue(rows, count)

    def _queue(self, rows: Sequence[PositionRow], count: int) -> Completion:
        # The server's hot path: a few attribute updates, no metrics, no clock read except for
        # a batch's first submit.
        batch = self._open
        if batch is None:
            batch = self._open = _Batch(trio.current_time())
            self._batch_opened.set()
        completion = Completion(batch, len(batch.parts))
        batch.parts.append(rows)
        batch.rows += count
        self._outstanding += count
        if batch.rows >= self._batch_rows:
            self._seal()
        return completion

    async def drain(self) -> None:
        """Flush the open batch now and wait until every submitted row is resolved."""
        while self._outstanding:
            if self._open is not None:
                self._seal()
            await self._space.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then flush what is left (shielded) and close."""
        if self._running:
            raise StorageError("PositionWriter.run() is already running")
        self._running = True
        gated = self._schema_ready is not None and not self._schema_ready.is_set()
        self._db_up = not gated
        metrics.DB_UP.set(0 if gated else 1)
        if gated or (self.spool is not None and not self.spool.is_empty()):
            self._recover.set()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._batcher)
                nursery.start_soon(self._recovery_loop)
                nursery.start_soon(self._maintenance_loop)
                task_status.started()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                if self._open is not None:
                    self._seal()
                while self._ready:
                    await self._write_batch(self._ready.popleft())
                self._notify_space()
                for store in self._idle_stores:
                    store.close()
                self._idle_stores.clear()
                # Threads abandoned by cancelled upkeep calls close their connections when
                # they return; wait for that (bounded) so none outlives the writer.
                borrowers: list[object] = []
                with trio.move_on_after(self.config.write_timeout_s):
                    for _ in range(self.config.connections):
                        borrower = object()
                        await self._limiter.acquire_on_behalf_of(borrower)
                        borrowers.append(borrower)
                for borrower in borrowers:
                    self._limiter.release_on_behalf_of(borrower)

    # -- batching -----------------------------------------------------------------------------

    def _seal(self) -> None:
        """Move the open batch to the ready queue."""
        assert self._open is not None
        self._ready.append(self._open)
        self._open = None
        self._wake.set()

    def _notify_space(self) -> None:
        self._space.set()
        self._space = trio.Event()

    def _finish(
        self,
        batch: _Batch,
        outcome: Durability,
        outcomes: dict[int, Durability] | None = None,
    ) -> None:
        """Resolve every completion of ``batch``: ``outcome`` unless ``outcomes`` says else."""
        batch.outcomes = outcomes or None
        batch.result = outcome
        by_outcome = dict.fromkeys(Durability, 0)
        by_outcome[outcome] = batch.rows
        for index, other in (outcomes or {}).items():
            size = len(batch.parts[index])
            by_outcome[outcome] -= size
            by_outcome[other] += size
        for kind, rows in by_outcome.items():
            if rows:
                metrics.ROWS.labels(kind.value).inc(rows)
        metrics.BATCHES.labels(outcome.value).inc()
        self._outstanding -= batch.rows
        metrics.PENDING_ROWS.set(self._outstanding)
        batch.parts = []  # the rows are stored (or given up); free them now
        batch.event.set()
        self._notify_space()

    async def _batcher(self) -> None:
        while True:
            if not self._ready:
                if self._open is None:
                    self._batch_opened = trio.Event()
                    await self._batch_opened.wait()
                    continue
                # Seal the open batch once it is old enough and a connection can take it; while
                # every connection is busy it keeps growing (group commit).
                self._wake = trio.Event()
                if self._inflight.value:
                    due = self._open.opened_at + self.config.batch_gather_s
                    if trio.current_time() >= due:
                        self._seal()
                        continue
                    with trio.move_on_at(due):
                        await self._wake.wait()
                else:
                    await self._wake.wait()
                continue
            await self._inflight.acquire()
            if not self._ready:  # drained meanwhile by a shutdown
                self._inflight.release()
                continue
            assert self._nursery is not None
            self._nursery.start_soon(self._batch_task, self._ready.popleft())

    async def _batch_task(self, batch: _Batch) -> None:
        try:
            # Shielded: once taken, a batch is always resolved, even during shutdown; every
            # step inside is bounded by a timeout.
            with trio.CancelScope(shield=True):
                await self._write_batch(batch)
        finally:
            self._inflight.release()
            self._wake.set()

    # -- writing a batch ----------------------------------------------------------------------

    async def _write_batch(self, batch: _Batch) -> None:
        if self._db_up:
            rows = list(itertools.chain.from_iterable(batch.parts))
            staging = self.config.dedup == "staging" or self._staging_left > 0
            started = trio.current_time()
            try:
                result = await self._db_call("write_rows", rows, staging=staging)
            except RowsRejectedError:
                await self._isolate(batch)
                return
            except DatabaseUnavailableError as exc:
                self._mark_down(str(exc))
            else:
                metrics.WRITE_SECONDS.observe(trio.current_time() - started)
                self._note_dedup(result, staging=staging)
                self._finish(batch, Durability.DATABASE)
                return
        outcomes = await self._spool_parts(batch, range(len(batch.parts)))
        self._finish(batch, Durability.SPOOL, outcomes)

    def _note_dedup(self, result: WriteResult, *, staging: bool) -> None:
        if result.duplicates:
            metrics.DUPLICATES.inc(result.duplicates)
        if result.fell_back:
            metrics.DEDUP_FALLBACKS.inc()
        if self.config.dedup == "adaptive":
            if result.fell_back or (staging and result.duplicates):
                self._staging_left = self.config.staging_batches_after_repeat
            elif staging:
                self._staging_left = max(0, self._staging_left - 1)

    async def _isolate(self, batch: _Batch) -> None:
        """A batch with invalid rows: store each submit's rows alone, fail only the bad ones."""
        logger.error(
            "database refused a batch as invalid; storing its %d parts one by one",
            len(batch.parts),
        )
        outcomes: dict[int, Durability] = {}
        for index, rows in enumerate(batch.parts):
            try:
                result = await self._db_call("write_rows", rows, staging=True)
            except RowsRejectedError:
                metrics.REJECTED_ROWS.inc(len(rows))
                logger.exception(
                    "phone %s: %d position(s) refused by the database, NOT durable",
                    rows[0].phone,
                    len(rows),
                )
                outcomes[index] = Durability.FAILED
            except DatabaseUnavailableError as exc:
                self._mark_down(str(exc))
                rest = range(index, len(batch.parts))
                spooled = await self._spool_parts(batch, rest)
                outcomes.update({i: spooled.get(i, Durability.SPOOL) for i in rest})
                break
            else:
                self._note_dedup(result, staging=True)
        self._finish(batch, Durability.DATABASE, outcomes)

    async def _spool_parts(self, batch: _Batch, indexes: range) -> dict[int, Durability]:
        """Spool the given parts of ``batch``; the parts that did NOT become SPOOL."""
        spool = self.spool
        if spool is None:
            logger.error("no spool configured: %d position(s) NOT durable", batch.rows)
            return dict.fromkeys(indexes, Durability.FAILED)
        outcomes: dict[int, Durability] = {}
        good = list(indexes)
        try:
            payload = await trio.to_thread.run_sync(
                encode_copy_binary,
                list(itertools.chain.from_iterable(batch.parts[i] for i in good)),
            )
        except DATA_ERRORS:
            # Find the submits that cannot be encoded; spool the others.
            good = []
            for i in indexes:
                try:
                    encode_copy_binary(batch.parts[i])
                except DATA_ERRORS:
                    logger.exception(
                        "phone %s: rows cannot be encoded, NOT durable", batch.parts[i][0].phone
                    )
                    metrics.REJECTED_ROWS.inc(len(batch.parts[i]))
                    outcomes[i] = Durability.FAILED
                else:
                    good.append(i)
            payload = encode_copy_binary(
                list(itertools.chain.from_iterable(batch.parts[i] for i in good))
            )
        if good:
            ok = await trio.to_thread.run_sync(spool.append, payload, limiter=self._spool_limiter)
            if not ok:
                outcomes.update(dict.fromkeys(good, Durability.FAILED))
            self._recover.set()  # a record appended after a replay finished gets replayed too
        return outcomes

    # -- database calls -----------------------------------------------------------------------

    async def _db_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``store.<method>(...)`` in a worker thread with the write timeout.

        Raises :class:`RowsRejectedError` for data errors (the store stays usable) and
        :class:`DatabaseUnavailableError` for everything else, including the timeout (the
        thread is abandoned and closes its connection when it returns).
        """
        store = self._idle_stores.pop() if self._idle_stores else self._store_factory()
        job = functools.partial(store.run, method, *args, **kwargs)
        reusable = False
        try:
            with trio.move_on_after(self.config.write_timeout_s):
                try:
                    result = await trio.to_thread.run_sync(
                        job, abandon_on_cancel=True, limiter=self._limiter
                    )
                except DATA_ERRORS as exc:
                    reusable = True
                    metrics.DB_ERRORS.labels("data").inc()
                    raise RowsRejectedError(f"{type(exc).__name__}: {exc}") from exc
                except (psycopg.Error, OSError) as exc:
                    metrics.DB_ERRORS.labels(type(exc).__name__).inc()
                    raise DatabaseUnavailableError(f"{type(exc).__name__}: {exc}") from exc
                reusable = True
                return result
            metrics.DB_ERRORS.labels("timeout").inc()
            raise DatabaseUnavailableError(f"no answer within {self.config.write_timeout_s} s")
        finally:
            # On errors, timeouts and cancellation alike, a store whose thread may still be
            # running is closed by that thread when it returns.
            if reusable:
                self._idle_stores.append(store)
            else:
                store.abandon()

    def _mark_down(self, why: str) -> None:
        self._went_down = True
        if self._db_up:
            logger.error(
                "database unavailable (%s): batches go to the spool (%s) until it is back",
                why,
                self.spool.directory if self.spool is not None else "none configured",
            )
        self._db_up = False
        metrics.DB_UP.set(0)
        for store in self._idle_stores:
            store.abandon()
        self._idle_stores.clear()
        self._recover.set()

    # -- recovery and replay ------------------------------------------------------------------

    async def _recovery_loop(self) -> None:
        delay = self.config.retry_min_s
        while True:
            await self._recover.wait()
            self._recover = trio.Event()
            while not await self._recover_once():
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
            delay = self.config.retry_min_s

    async def _recover_once(self) -> bool:
        """Bring the database back into use and empty the spool; False to retry later."""
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        try:
            if not self._db_up:
                await self._db_call("ping")
                self._db_up = True
                metrics.DB_UP.set(1)
                if self._went_down:
                    logger.warning("database reachable again: writing batches to it")
                else:  # the schema was not ready at start; now it is
                    logger.info("database ready: writing batches to it")
            spool = self.spool
            if spool is None:
                return True
            while not spool.is_empty():
                await trio.to_thread.run_sync(spool.rotate, limiter=self._spool_limiter)
                for segment in spool.sealed_segments():
                    await self._replay_segment(spool, segment)
        except DatabaseUnavailableError as exc:
            self._mark_down(str(exc))
            return False
        except RowsRejectedError:
            logger.exception("database refused a recovery step; retrying later")
            return False
        except OSError:
            logger.exception("spool %s unreadable; retrying later", self.spool)
            return False
        return True

    async def _replay_segment(self, spool: Spool, segment: Path) -> None:
        records = await trio.to_thread.run_sync(lambda: list(spool.records(segment)))
        replayed = 0
        for payload in records:
            try:
                result: WriteResult = await self._db_call("write_payload", payload)
            except RowsRejectedError:
                # Rows that encoded should never be refused; set the record aside for a human
                # rather than retry it forever or drop it.
                kept = await trio.to_thread.run_sync(spool.quarantine, payload)
                logger.exception(
                    "spool record in %s refused by the database; kept in %s", segment, kept
                )
                continue
            replayed += result.rows
            metrics.SPOOL_REPLAYED.inc()
            if result.duplicates:
                metrics.DUPLICATES.inc(result.duplicates)
        await trio.to_thread.run_sync(spool.remove, segment, limiter=self._spool_limiter)
        logger.warning("replayed %d spooled positions from %s", replayed, segment.name)

    # -- upkeep -------------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            delay = UPKEEP_RETRY_S
            if self._db_up:
                try:
                    await self._db_call("run_upkeep", self._upkeep)
                    delay = self.config.partition_check_s
                except DatabaseUnavailableError as exc:
                    logger.warning("storage upkeep skipped: %s", exc)
                except RowsRejectedError:
                    logger.exception("storage upkeep failed")
            await trio.sleep(delay)

    def _upkeep(self, conn: psycopg.Connection[Any]) -> None:
        ensure_partitions(conn, self._wall_clock(), days_ahead=self.config.partition_days_ahead)
