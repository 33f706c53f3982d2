"""``jt808 serve``: the application wiring.

This is where the packages meet: ``ingest`` serves terminals, ``storage`` keeps what they send.
The server never imports storage; the small adapters below give it the storage services in the
shape of ``ingest.interfaces`` (the sessions table and the LISTEN/NOTIFY bus fit those
protocols as they are).  Order of shutdown on SIGTERM/SIGINT (house style item 8): stop
accepting and let connections finish their in-flight acknowledgements (``Server.shutdown``),
drain the position writer, then stop the operator port and exit 0.

The rule engine runs by default (``--no-rules`` turns it off): each worker runs one
(:mod:`tools.rules_consumer`) judging the committed positions of its share of the vehicles,
whoever stored them, so with several workers, nodes or ``jt808 rules run`` processes each
vehicle is still judged by exactly one engine; acknowledgements wait for storage only.  Alerts
are kept in the database, and the operator port serves ``GET /alerts/stream`` from the
database's alert event log (:mod:`tools.rules_db`).  Master data comes from the database;
detected trips go to the trips table.  The operator port always serves master data
(``/vehicles``, ``/fences``, ``/filings``; with rules on, a successful POST reloads them before
it answers).  On shutdown the engine saves how far it judged, for its successor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:  # the heavy imports happen only when the command runs
    import trio
    from prometheus_client import CollectorRegistry

    from ingest import (
        PositionRecord,
        Server,
        ServerConfig,
    )
    from ingest.interfaces import MediaRecord
    from storage import MediaStore, PositionWriter, Spool
    from storage import writer as storage_writer
    from storage.migrator import SchemaMigrator
    from tools.rules_consumer import CommittedRuleService
    from tools.rules_db import DatabaseAlertFeed

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (see serve())
# How long the first migration attempt may hold up the start: a current schema is checked in
# milliseconds and a first install takes well under a second; a database that neither answers
# nor refuses (connect timeout 5 s) must not keep terminals waiting much longer.
SCHEMA_FIRST_ATTEMPT_S = 10.0
EXAMPLES = """\
examples:
  jt808 serve                                        embedded database in ./jt808-data
  jt808 serve --dsn postgresql://jt808@db/jt808 --registration registry --workers 4
  JT808_DSN=postgresql://jt808@db/jt808 jt808 serve --config /etc/jt808.toml

Configuration: flags, then JT808_* environment variables (JT808_DSN, JT808_PORT, ...), then
the TOML file of --config, then the defaults.  Terminals connect to --port on every interface
(--host 0.0.0.0); with --registration open any terminal may register.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ingest import add_arguments as add_server_arguments  # noqa: PLC0415

    add_server_arguments(parser)
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        type=Path,
        metavar="DIR",
        help="where the embedded database and the spool live (default ./jt808-data)",
    )


class WriterCompletion:
    """Adapts a storage completion to ``ingest.Completion``: durable in the database or spool."""

    __slots__ = ("_completion",)

    def __init__(self, completion: storage_writer.Completion) -> None:
        self._completion = completion

    async def wait(self) -> bool:
        return (await self._completion.wait()).durable

    def outcome(self) -> bool | None:
        result = self._completion.result
        return None if result is None else result.durable


class WriterSink:
    """``ingest.PositionSink`` over the storage writer."""

    def __init__(self, writer: PositionWriter) -> None:
        self._writer = writer

    async def submit(self, records: Sequence[PositionRecord]) -> WriterCompletion | NotDurable:
        from storage import WriterClosedError, position_row  # noqa: PLC0415

        rows = [
            position_row(r.header, r.location, r.received_at, batch_type=r.batch_type)
            for r in records
        ]
        try:
            return WriterCompletion(await self._writer.submit(rows))
        except WriterClosedError as exc:
            # The writer is restarting after a failure (it is supervised): these positions
            # are not durable, so they are not acknowledged and the terminal sends them again.
            logger.warning("%s position(s) not stored: %s", len(rows), exc)
            return NotDurable()

    def submit_nowait(
        self, records: Sequence[PositionRecord]
    ) -> WriterCompletion | NotDurable | None:
        """:meth:`submit` without waiting: None when the writer has no room now."""
        from storage import WriterClosedError, position_row  # noqa: PLC0415

        rows = [
            position_row(r.header, r.location, r.received_at, batch_type=r.batch_type)
            for r in records
        ]
        try:
            completion = self._writer.submit_nowait(rows)
        except WriterClosedError as exc:
            logger.warning("%s position(s) not stored: %s", len(rows), exc)
            return NotDurable()
        return None if completion is None else WriterCompletion(completion)


class NotDurable:
    """A completion that is settled and not durable (no ack: the terminal retransmits)."""

    async def wait(self) -> bool:
        return False

    def outcome(self) -> bool | None:
        return False


class MediaStoreSink:
    """``ingest.MediaSink`` over the storage media store: True once file and row are durable."""

    def __init__(self, store: MediaStore) -> None:
        self._store = store

    async def store(self, record: MediaRecord) -> bool:
        from storage import MediaFile, StorageError  # noqa: PLC0415

        media = MediaFile(
            phone=record.phone,
            media_id=record.media_id,
            media_type=record.media_type,
            media_format=record.media_format,
            event=record.event,
            channel=record.channel,
            location=record.location,
            data=record.data,
            received_at=record.received_at,
        )
        try:
            await self._store.save(media)
        except StorageError as exc:
            logger.error("phone=%s media %s not stored: %s", record.phone, record.media_id, exc)  # noqa: TRY400 - the cause is in the message
            return False
        return True


def run(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from ingest import ConfigError, load_config  # noqa: PLC0415
    from storage import StorageError, database_dsn  # noqa: PLC0415

    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - a usage error, not a crash
        return EXIT_USAGE
    if config.rules_file is not None:
        from tools.rules_db import RulesFileError, load_rules_file  # noqa: PLC0415

        try:
            load_rules_file(config.rules_file)  # refuse a bad file before anything starts
        except RulesFileError as exc:
            logger.error("%s", exc)  # noqa: TRY400
            return EXIT_USAGE
    if not _exposure_allowed(config):
        return EXIT_USAGE
    data_dir: Path = args.data_dir or config.data_dir
    if config.dsn:
        try:
            psycopg.conninfo.conninfo_to_dict(config.dsn)
        except psycopg.ProgrammingError as exc:
            logger.error("--dsn / JT808_DSN is not a connection string: %s", exc)  # noqa: TRY400
            return EXIT_USAGE
    try:
        # No migration here: each process migrates in the background (storage.migrator), so a
        # node starts and spools while its database is still down.
        with database_dsn(config.dsn, data_dir / "pgdata") as dsn:
            if config.workers == 1:
                return _serve_process(config, dsn, data_dir)
            return _run_workers(config, dsn, data_dir, args.log_level)
    except (StorageError, psycopg.Error) as exc:  # the embedded database did not start
        logger.error("database: %s", str(exc).strip().splitlines()[0])  # noqa: TRY400
        return 1


_T = TypeVar("_T")


class ListenError(Exception):
    """A port the node cannot listen on (in use, an address not of this machine): the message
    names it."""


def _serve_process(config: ServerConfig, dsn: str, data_dir: Path) -> int:
    """Run :func:`serve` in this process; a port it cannot listen on is one error line and
    exit status 1 (not a traceback)."""
    import trio  # noqa: PLC0415

    status = EXIT_OK
    try:
        trio.run(serve, config, dsn, data_dir)
    except* ListenError as group:
        for error in _leaves(group):
            logger.error("%s", error)  # noqa: TRY400 - a configuration error, not a crash
        status = 1
    return status


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


async def _listening(
    what: str,
    host: str | None,
    port: int,
    start: Callable[[], Awaitable[_T]],
) -> _T:
    """``start()`` (a ``nursery.start`` of a listening service); an OSError before it
    listens (the port in use, an address that is not this machine's, a name that does not
    resolve) becomes a :class:`ListenError` naming the address and the port."""
    try:
        return await start()
    except* OSError as group:
        cause = _leaves(group)[0]
        reason = getattr(cause, "strerror", None) or str(cause)
        where = f"{host or '*'} port {port}"
        raise ListenError(f"cannot listen for {what} on {where}: {reason}") from None


def _exposure_allowed(config: ServerConfig) -> bool:
    """Refuse (one error line) an operator port beyond loopback without TLS unless allowed,
    or a certificate and key that cannot be used; warn about what is allowed but exposed."""
    from ingest.tls import TlsSetupError, exposure, server_context  # noqa: PLC0415

    verdict = exposure(config)
    if verdict.refusal is not None:
        logger.error("%s", verdict.refusal)
        return False
    if config.http_tls_cert is not None and config.http_tls_key is not None:
        try:
            server_context(config.http_tls_cert, config.http_tls_key)
        except TlsSetupError as exc:
            logger.error("%s", exc)  # noqa: TRY400 - a usage error, not a crash
            return False
    for warning in verdict.warnings:
        logger.warning("%s", warning)
    return True


def _run_workers(config: ServerConfig, dsn: str, data_dir: Path, log_level: str) -> int:
    """``--workers N``: N independent server processes accepting on one port (SO_REUSEPORT).

    This is how one node uses more than one core and holds more connections than one
    process's descriptor limit allows.  Each worker has its own writer and its own spool
    directory (a spool has one writer); worker ``i`` serves the operator port ``http_port + i``.
    SIGTERM/SIGINT to this parent is passed on to every worker as SIGTERM.
    """
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(config, dsn, data_dir, index, log_level),
            name=f"jt808-worker-{index}",
        )
        for index in range(config.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    failed = [f"{w.name} (exit {w.exitcode})" for w in workers if w.exitcode != 0]
    if failed:
        logger.error("workers exited with an error: %s", ", ".join(failed))
        return 1
    return EXIT_OK


def _worker_main(
    config: ServerConfig, dsn: str, data_dir: Path, index: int, log_level: str
) -> None:
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    # Leave the terminal's process group: Ctrl-C goes to the parent alone, which passes on one
    # SIGTERM, so each worker shuts down gracefully once.
    os.setpgrp()
    spool_root = config.spool_dir or data_dir / "spool"
    worker_config = dataclasses.replace(
        config,
        http_port=config.http_port + index if config.http_port else 0,
        spool_dir=spool_root / f"worker-{index}",
        # Each worker is a node of its own (it holds its own connections).
        node_id=f"{config.node_id}/{index}" if config.node_id else None,
    )
    sys.exit(_serve_process(worker_config, dsn, data_dir))


@dataclasses.dataclass(frozen=True, slots=True)
class Running:
    """What :func:`serve` reports once it serves: the server (``shutdown()`` stops it
    gracefully, as SIGTERM does) and the operator port(s)."""

    server: Server
    http_ports: list[int]


async def serve(
    config: ServerConfig,
    dsn: str,
    data_dir: Path,
    *,
    metrics_registry: CollectorRegistry | None = None,
    handle_signals: bool = True,
    tune_gc: bool = True,
    task_status: trio.TaskStatus[Running] | None = None,
) -> None:
    """Run server, operator port and storage services until SIGTERM/SIGINT, then stop in order.

    ``metrics_registry`` defaults to prometheus_client's global one (``/metrics`` then shows
    the storage layer's metrics too); tests running several servers in one process give each
    its own, and leave signals and the collector's settings to the test process
    (``handle_signals``, ``tune_gc``).  ``task_status`` receives a :class:`Running` once the
    node serves.

    Every service runs supervised (:func:`ingest.supervise.supervise`): a failure after it
    started restarts it with a back-off; only a deliberate shutdown ends the process.  The
    schema is migrated in the background, so the node serves (and spools) while the database
    is down and goes healthy by itself when it returns.
    """
    import prometheus_client  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from ingest import Metrics, PositionSink, Server  # noqa: PLC0415
    from ingest.server import default_node_id  # noqa: PLC0415
    from ingest.supervise import supervise  # noqa: PLC0415
    from storage import (  # noqa: PLC0415
        MediaStore,
        NotifyBus,
        PositionWriter,
        SessionTable,
        Spool,
        TerminalStore,
    )
    from storage.daily_stats import DailyStatsRefresher  # noqa: PLC0415
    from storage.migrator import SchemaMigrator  # noqa: PLC0415
    from storage.schema import BackendChoice  # noqa: PLC0415
    from storage.terminal_cache import TerminalCodeCache  # noqa: PLC0415
    from tools.terminal_registry import DatabaseRegistry  # noqa: PLC0415

    # One registry for the whole process, so /metrics shows the server's and the storage
    # layer's metrics (batch sizes, store latency, spool) together.
    metrics = Metrics(prometheus_client.REGISTRY if metrics_registry is None else metrics_registry)
    # (validated against ingest.config.STORAGE_BACKENDS, the values of BackendChoice)
    migrator = SchemaMigrator(dsn, backend=cast("BackendChoice", config.storage_backend))
    # vehicle_daily_stats kept fresh (every node may run one: a refresh another node made
    # recently is not repeated).
    daily_stats = DailyStatsRefresher(dsn, ready=migrator.ready)
    spool_dir = config.spool_dir or data_dir / "spool"
    spool = Spool(spool_dir)
    writer = PositionWriter(dsn, spool=spool, schema_ready=migrator.ready)
    store = TerminalStore(dsn)
    # The auth codes this node knows, for logins while the database is down; kept beside the
    # spool (one file per worker, readable by its owner only).
    registry = DatabaseRegistry(
        store, TerminalCodeCache(spool_dir / "terminals.cache"), metrics=metrics
    )
    media = MediaStore(dsn, config.media_dir or data_dir / "media")
    sessions = SessionTable(dsn)
    bus = NotifyBus(dsn)
    sink: PositionSink = WriterSink(writer)
    feed: DatabaseAlertFeed | None = None
    rules: CommittedRuleService | None = None
    closing: list[Callable[[], None]] = []
    if config.rules:
        from tools.rules_consumer import build_service  # noqa: PLC0415
        from tools.rules_db import DatabaseAlertFeed  # noqa: PLC0415

        # Alerts and their events live in the database (every put appends an event and
        # NOTIFYs), so the stream of any node shows every node's alerts.
        feed = DatabaseAlertFeed(dsn)
        rules, closers = build_service(
            dsn,
            engine_id=f"{config.node_id or default_node_id()}/rules",
            rules_file=config.rules_file,
            metrics_registry=metrics.registry,
        )
        closing.extend(closers)
    from tools.rules_db import DatabaseMasterDataAdmin  # noqa: PLC0415

    # The dispatch system posts master data to any node; with rules on, a write reloads them
    # before it is answered.
    admin = DatabaseMasterDataAdmin(dsn, after_write=None if rules is None else rules.reload)
    from tools.access_db import DatabaseOperatorAccess  # noqa: PLC0415

    # Operator accounts (jt808 users / tokens): every operator request but /healthz (and a
    # public /metrics) needs a bearer token of one.
    operator_access = DatabaseOperatorAccess(dsn)
    from ingest.console_api import ConsoleApi  # noqa: PLC0415
    from tools.console_db import DatabaseConsoleData  # noqa: PLC0415

    # The operator console: its page, its session and the data it shows, on the operator port.
    console_data = DatabaseConsoleData(dsn)
    console = ConsoleApi(
        data=console_data,
        tile_url=config.console_tile_url,
        tile_attribution=config.console_tile_attribution,
        offline_after_s=config.console_offline_after_s,
    )
    server = Server(
        config,
        sink=sink,
        alerts=feed,
        registry=registry,
        media=MediaStoreSink(media),
        sessions=sessions,
        transport=bus,
        metrics=metrics,
    )
    if tune_gc:  # process-wide: the command does it, tests running servers in-process not
        # Everything built so far (modules, config, services) lives as long as the process:
        # keep it out of the cyclic collector's scans of the objects that come and go per frame.
        gc.freeze()
        # Per frame the server allocates a few dozen short-lived container objects (header,
        # message, records, actions), almost all freed by reference counting.  At the default
        # threshold (700) that is a young collection every ~20 frames and, through the older
        # generations, repeated scans of every connection's long-lived state; a larger first
        # threshold keeps the collector's share of the CPU small at the same bounded memory.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stopped = trio.Event()

    async def run_server(
        *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await server.run(task_status=task_status)
        stopped.set()

    def supervised(
        name: str, run: Callable[..., Awaitable[object]]
    ) -> Callable[..., Awaitable[None]]:
        return functools.partial(supervise, name, run, metrics=metrics)

    try:
        async with trio.open_nursery() as services:
            if handle_signals:  # first of all: a SIGTERM at any point from here is graceful
                await services.start(_stop_on_signal, server, services.cancel_scope)
            await services.start(supervised("schema", migrator.run))
            # A database that answers is migrated before the other services start (they then
            # find their tables); one that does not is retried in the background meanwhile.
            with trio.move_on_after(SCHEMA_FIRST_ATTEMPT_S):
                await migrator.attempted.wait()
            await services.start(supervised("writer", writer.run))
            await services.start(supervised("daily-stats", daily_stats.run))
            await services.start(supervised("terminal-cache", registry.run))
            if rules is not None:
                await services.start(
                    supervised("rules", functools.partial(rules.run_after, migrator.ready))
                )
            operator_http = server.operator_http(access=operator_access)
            operator_http.masterdata = admin
            operator_http.console = console
            operator_http.health = functools.partial(_health, server, migrator, writer, spool)
            http_ports = await _listening(
                "the operator port",
                config.http_host,
                config.http_port,
                functools.partial(services.start, supervised("http", operator_http.run)),
            )
            ports = await _listening(
                "terminals",
                config.host,
                config.port,
                functools.partial(services.start, supervised("server", run_server)),
            )
            logger.info(
                "node %s serving JT/T 808 on %s port(s) %s, operator HTTP on %s:%s, ack=%s",
                server.node_id,
                config.host,
                ports,
                config.http_host,
                config.http_port,
                config.ack,
            )
            if task_status is not None:
                task_status.started(Running(server=server, http_ports=list(http_ports)))
            await stopped.wait()
            # Connections are closed and their acks sent; flush what the writer still holds.
            await writer.drain()
            services.cancel_scope.cancel()
    finally:
        store.close()
        if feed is not None:
            feed.close()
        for close in closing:
            close()
        media.close()
        operator_access.close()
        console_data.close()
        sessions.close()
        bus.close()
    logger.info("stopped")


def _health(
    server: Server, migrator: SchemaMigrator, writer: PositionWriter, spool: Spool
) -> dict[str, object]:
    """``/healthz``: ok, degraded (serving, but the database is not in use) or unavailable."""
    if not server.accepting:
        return {"status": "unavailable", "accepting": False}
    report: dict[str, object] = {"status": "ok", "accepting": True}
    if not migrator.ready.is_set():
        report["schema"] = f"not checked: {migrator.last_error or 'database unreachable'}"
    if not writer.db_up:
        report["database"] = "unreachable"
    if not spool.is_empty():
        report["spooling"] = True
    if len(report) > 2:
        report["status"] = "degraded"
    return report


async def _stop_on_signal(
    server: Server, scope: trio.CancelScope, *, task_status: Any = None
) -> None:
    """First SIGTERM/SIGINT: graceful shutdown.  A second one: stop at once.  Started (with
    ``nursery.start``) once the handlers are in place."""
    import trio  # noqa: PLC0415

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if task_status is not None:
            task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                logger.info("%s: shutting down", signal.Signals(signum).name)
                server.shutdown()
            else:
                logger.warning("%s again: stopping now", signal.Signals(signum).name)
                scope.cancel()
