"""The JT/T 808 TCP server: moves bytes between sockets, the codec and the pure session.

One trio task per connection reads (at most 64 KiB a time), feeds the
:class:`~protocol.StreamDecoder`, hands each event to the connection's
:class:`~ingest.session.Session` and performs the actions it returns.  Once authenticated, a
connection waits for its next read parked with the worker's :class:`~ingest.readiness.Readiness`
loop, which handles plain reports and heartbeats itself (reading, storing, acknowledging
exactly as the task would) and wakes the task for anything else.  One task per server
(:meth:`Server._acknowledge`) waits for the batches in storage and sends the acks they release,
for every connection at once; one more (:meth:`Server._reap`) enforces the timeouts.  Decisions
live in the session; this module only does I/O, timeouts and bookkeeping.

Per-read cost: terminals send one frame per TCP write, so what a read and a write cost is most
of what a report costs.  Reads and writes go straight to the non-blocking descriptor (trio's
``send_all`` only finishes what the kernel did not take at once), no cancel scope is made per
read or per write (timeouts are checked by the reaper every :data:`REAP_INTERVAL_S`), and a
flag rather than a lock keeps one write at a time per connection.

Contract
    * ``ack = "durable"``: a 0x0200/0x0704 is acknowledged only after the sink's completion
      said durable, in arrival order; not durable means no ack (the terminal retransmits).
      ``ack = "immediate"``: acknowledged when handed to the sink.
    * Back-pressure: while ``max_unacked`` reports of a connection wait for storage, that
      connection stops reading (TCP flow control then slows the terminal).  Nothing
      acknowledged is ever dropped.
    * Timeouts: a connection is closed after ``read_timeout_s`` without a complete frame
      (bytes that never finish a frame do not count, so a slow-loris client is closed too;
      time spent waiting for storage does not count either), when it is not authenticated
      ``auth_timeout_s`` after connecting, or when a reply does not leave within
      ``send_timeout_s``; each up to :data:`REAP_INTERVAL_S` late.
    * Takeover: when a terminal authenticates, the connection that held its phone is closed.
    * Peer errors end only their connection; so does any other error while handling it
      (contained by :meth:`Server.contain`: logged, counted, the connection closed).
    * Graceful shutdown (:meth:`Server.shutdown`): stop accepting, let each connection stop
      reading and send the acks still in flight for up to ``shutdown_grace_s``, cancel what is
      left, return from :meth:`Server.run`.  Cancelling :meth:`Server.run` instead stops at once.

Sub-packaged uploads: one :class:`~ingest.uploads.Uploads` per process holds the unfinished
series of all connections (time from ``trio.current_time()``); a task sleeps until the earliest
series deadline and sends the requests for missing packages to the connection holding the
terminal at that moment (see :meth:`ingest.session.Session.upload_expired`).  Multimedia goes to
the :class:`~ingest.interfaces.MediaSink`; the 0x8800 leaves once it is stored.

Commands: :meth:`Server.command` runs a downlink command on whichever node holds the terminal
(:mod:`ingest.cluster`); on the connection holding it, the command is sent, resent on the
schedule of :func:`ingest.commands.retransmit_schedule`, and settled by the terminal's answer
(:class:`~ingest.commands.PendingCommand`).  A connection that closes fails its waiting
commands with :class:`~ingest.commands.TerminalOfflineError`.

Capture: with ``capture_dir`` set each connection's inbound bytes are recorded; the file format
is documented in :mod:`ingest.capture`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import trio

from ingest.capture import CaptureWriter
from ingest.cluster import RELAY_MARGIN_S, ClusterRouter
from ingest.commands import (
    BadCommandError,
    CommandBusyError,
    CommandError,
    CommandTimeoutError,
    PendingCommand,
    TerminalOfflineError,
    reply_json,
    retransmit_schedule,
)
from ingest.config import RECV_CHUNK_BYTES, ServerConfig
from ingest.http import OperatorHttp
from ingest.interfaces import (
    AlertFeed,
    ClusterTransport,
    Completion,
    InMemoryMediaSink,
    InMemorySessionDirectory,
    InMemorySessionRecords,
    InMemoryTransport,
    MediaSink,
    OperatorAccess,
    PositionRecord,
    PositionSink,
    SessionDirectory,
    SessionRecords,
    TerminalRegistry,
)
from ingest.lockout import AuthLockout, LockoutPolicy
from ingest.memory import release_free_memory
from ingest.metrics import Metrics
from ingest.quiet import LogLimiter
from ingest.readiness import Readiness
from ingest.session import (
    STORED_MSG_IDS,
    Action,
    Answer,
    Authenticate,
    Claim,
    Close,
    DedupCache,
    Log,
    Register,
    Send,
    Session,
    SessionPolicy,
    Store,
    StoreMedia,
)
from ingest.supervise import supervise
from ingest.tls import server_context
from ingest.uploads import Uploads, reassembly_limits
from protocol.codec import Packet, StreamDecoder
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fields import GMT8
from protocol.messages.base import Fragment, Message
from protocol.messages.control import TerminalRetransmitRequest
from protocol.messages.terminal import REGISTER_OK, REGISTER_TERMINAL_TAKEN, Heartbeat
from protocol.reassembly import Dropped, RetransmitRequest

logger = logging.getLogger(__name__)

PEER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError)
# Frames an authenticated terminal sends all day, handled by the readiness loop without waking
# the connection's task (see ingest.readiness): reports (8.18, 8.43) and heartbeats (8.3).
INLINE_MSG_IDS = STORED_MSG_IDS | {Heartbeat.MSG_ID}


def _auth_code() -> str:
    # 8 random bytes as 16 hex digits: unguessable, and short enough for the one-byte length
    # prefix of the 2019 0x0102 (table 10).
    return secrets.token_hex(8)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def default_node_id() -> str:
    """``hostname:pid``: unique per server process, also among the workers of one host."""
    return f"{socket.gethostname()}:{os.getpid()}"


# Connection events are summed up at INFO this often (the per-connection lines are DEBUG).
ACTIVITY_SUMMARY_S = 60.0
# The connections' timeouts (idle, authentication, send) are checked this often by one task,
# instead of a deadline per read and per write: timeouts of tens of seconds may fire half a
# second late, and a pass over 20,000 connections costs a few milliseconds.
REAP_INTERVAL_S = 0.5

# Commands waiting for one terminal's answers.  Terminals work through commands one at a time;
# more than a few outstanding is an operator's script gone wrong, answered "busy".
MAX_PENDING_COMMANDS = 16


class _TerminalLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the connection's terminal phone (or ``?`` before the first
    frame) and connection number."""

    def __init__(self, connection: _Connection) -> None:
        super().__init__(logger)
        self._connection = connection

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        conn = self._connection
        return f"phone={conn.session.phone or '?'} conn={conn.number} {msg}", kwargs


class Server:
    """The terminal-facing server.

    ``sink`` receives :class:`~ingest.interfaces.PositionRecord` batches, ``registry`` decides
    registrations and authentications, ``media`` keeps multimedia uploads.  ``sessions`` and
    ``transport`` connect the node to the others (the ``sessions`` table and LISTEN/NOTIFY);
    without them the node is alone.  ``alerts`` is the feed ``GET /alerts/stream`` serves on
    the operator port (None: no stream).  ``directory`` defaults to an in-process one; ``metrics``
    to a fresh registry.  ``new_auth_code`` and ``wall_clock`` are injectable for tests.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        sink: PositionSink,
        registry: TerminalRegistry,
        directory: SessionDirectory[_Connection] | None = None,
        metrics: Metrics | None = None,
        new_auth_code: Callable[[], str] = _auth_code,
        wall_clock: Callable[[], datetime] = _utc_now,
        media: MediaSink | None = None,
        sessions: SessionRecords | None = None,
        transport: ClusterTransport | None = None,
        alerts: AlertFeed | None = None,
    ) -> None:
        self.config = config
        self.alerts = alerts
        self.sink = sink
        self.registry = registry
        self.directory: SessionDirectory[_Connection] = (
            directory if directory is not None else InMemorySessionDirectory()
        )
        self.metrics = metrics if metrics is not None else Metrics()
        self.new_auth_code = new_auth_code
        self.wall_clock = wall_clock
        self.policy = SessionPolicy(
            ack=config.ack, registration=config.registration, max_failures=config.max_failures
        )
        self.dedup = DedupCache(
            window_s=config.dedup_window_s, max_entries=config.dedup_max_entries
        )
        metrics = self.metrics
        self.lockout = AuthLockout(
            per_phone=LockoutPolicy(
                failures=config.auth_failures_per_phone,
                window_s=config.auth_failure_window_s,
                lockout_s=config.auth_lockout_s,
            ),
            per_address=LockoutPolicy(
                failures=config.auth_failures_per_address,
                window_s=config.auth_failure_window_s,
                lockout_s=config.auth_lockout_s,
            ),
            on_lockout=lambda scope: metrics.auth_lockouts.labels(scope).inc(),
            on_refused=lambda scope: metrics.auth_locked.labels(scope).inc(),
        )
        self.quiet = LogLimiter()
        # Connections waiting for data park here; plain reports are then handled without
        # waking their tasks, when the sink can take positions without waiting.
        self.readiness = Readiness()
        self.submit_nowait: Callable[[Sequence[PositionRecord]], Completion | None] | None = (
            getattr(sink, "submit_nowait", None)
        )
        # Every connection's batches in storage, in submission order: (connection, tickets,
        # completion).  One task (_acknowledge) wakes when the oldest settles -- a writer's
        # batch settles the submits of many connections at once -- and sends the acks of all
        # that settled, instead of a task per connection waking per batch.  Bounded by the
        # connections' max_unacked each.
        self._settling: collections.deque[tuple[_Connection, list[int], Completion]] = (
            collections.deque()
        )
        self._settling_added = trio.Event()
        # Connections, logins and closes since the last activity summary: with tens of
        # thousands of terminals, a line per connection event would be most of the log, so
        # those lines are DEBUG and INFO gets one summary a minute.  Keys: a fixed set plus
        # the close reasons' metric labels, so the counter stays small.
        self.activity: collections.Counter[str] = collections.Counter()
        self.media: MediaSink = media if media is not None else InMemoryMediaSink()
        self.node_id = config.node_id or default_node_id()
        # Caps from the worker's memory budget (ServerConfig.reassembly_max_bytes*); the heap
        # given up by dropped series is handed back to the OS (ingest.memory).
        self.uploads = Uploads(reassembly_limits(config), release_memory=release_free_memory)
        self.command_schedule = retransmit_schedule(
            config.command_timeout_s, config.command_retries
        )
        self.cluster = ClusterRouter(
            node=self.node_id,
            sessions=sessions if sessions is not None else InMemorySessionRecords(),
            transport=transport if transport is not None else InMemoryTransport(),
            execute_local=self.execute_local,
            relay_timeout_s=sum(self.command_schedule) + RELAY_MARGIN_S,
            metrics=self.metrics,
            snapshot=self._session_rows,
        )
        self.ports: list[int] = []
        self.accepting = False
        self._connections: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._limiter = trio.CapacityLimiter(config.max_connections)
        self._shutdown = trio.Event()
        self._all_closed: trio.Event | None = None
        self._uploads_changed = trio.Event()
        self._series_seen = 0
        self._uploads_reported: dict[str, int] = {}
        self._completed_reported = 0
        self.metrics.reassembly_series.set_function(lambda: self.uploads.series_in_flight)
        self.metrics.reassembly_bytes.set_function(lambda: self.uploads.bytes_in_flight)
        self.metrics.connections_open.set_function(lambda: len(self._connections))
        self.metrics.sessions.set_function(
            lambda: sum(1 for c in self._connections if c.session.authenticated)
        )

    # -- service

    async def run(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve terminals until :meth:`shutdown`; reports the bound port(s) when listening."""
        config = self.config
        if config.workers > 1:
            listeners = await open_shared_listeners(config.port, host=config.host)
        else:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        self.ports = [listener.socket.getsockname()[1] for listener in listeners]
        async with trio.open_nursery() as nursery:
            # Background services of the server restart after a failure (ingest.supervise);
            # the connections' own failures are contained in _handle.
            await nursery.start(
                functools.partial(supervise, "cluster", self.cluster.run, metrics=self.metrics)
            )
            await nursery.start(
                functools.partial(supervise, "readiness", self.readiness.run, metrics=self.metrics)
            )
            nursery.start_soon(
                functools.partial(
                    supervise,
                    "uploads",
                    functools.partial(self._drive_uploads, nursery),
                    metrics=self.metrics,
                )
            )
            nursery.start_soon(functools.partial(supervise, "log-summaries", self._summarise_logs))
            nursery.start_soon(
                functools.partial(supervise, "activity-summaries", self._summarise_activity)
            )
            nursery.start_soon(functools.partial(supervise, "timeouts", self._reap))
            nursery.start_soon(functools.partial(supervise, "acks", self._acknowledge))
            accept_scope = trio.CancelScope()
            nursery.start_soon(self._accept, listeners, nursery, accept_scope)
            self.accepting = True
            logger.info(
                "node %s listening for terminals on %s port(s) %s",
                self.node_id,
                config.host,
                self.ports,
            )
            task_status.started(self.ports)
            await self._shutdown.wait()

            accept_scope.cancel()
            self.accepting = False
            logger.info(
                "shutting down: %s connection(s) get %s s to finish",
                len(self._connections),
                config.shutdown_grace_s,
            )
            if self._connections:
                self._all_closed = trio.Event()
                for connection in list(self._connections):
                    connection.drain()
                with trio.move_on_after(config.shutdown_grace_s):
                    await self._all_closed.wait()
            if self._connections:
                logger.warning("closing %s connection(s) after the grace", len(self._connections))
            nursery.cancel_scope.cancel()
        logger.info("server stopped")

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`run` returns when it is done."""
        self._shutdown.set()

    def operator_http(self, access: OperatorAccess | None = None) -> OperatorHttp:
        """The operator HTTP service for this server (start its ``run`` too); HTTPS when the
        config names a certificate and key (:class:`~ingest.tls.TlsSetupError` if they cannot
        be used).  ``access``: the operator accounts (None: every request but the public ones
        is answered 401)."""
        config = self.config
        tls = None
        if config.http_tls_cert is not None and config.http_tls_key is not None:
            tls = server_context(config.http_tls_cert, config.http_tls_key)
        return OperatorHttp(
            host=config.http_host,
            port=config.http_port,
            registry=self.metrics.registry,
            terminals=self.terminals,
            healthy=lambda: self.accepting,
            command=self.command,
            alerts=self.alerts,
            metrics=self.metrics,
            limits=config.http_limits,
            tls=tls,
            access=access,
            metrics_public=config.metrics_public,
            login_lockout=LockoutPolicy(
                failures=config.http_login_failures_per_address,
                window_s=config.http_login_failure_window_s,
                lockout_s=config.http_login_lockout_s,
            ),
        )

    def _session_rows(self) -> list[tuple[str, datetime, str]]:
        """This node's authenticated sessions (phone, connected_since, peer): the directory's
        holders, kept in step with ``cluster.online`` (claim) and ``cluster.offline``
        (``_handle``); the cluster rewrites the ``sessions`` rows from them after an outage."""
        return [
            (phone, c.connected_since, c.peer)
            for c in self.directory.holders()
            if (phone := c.session.phone) is not None
        ]

    def terminals(self) -> list[dict[str, Any]]:
        """Online (authenticated) sessions of this node, for ``/terminals``."""
        return [c.describe() for c in self._connections if c.session.authenticated]

    # -- commands

    async def command(self, phone: str, msg_id: object, body: object) -> dict[str, Any]:
        """Run a command given as JSON (see :mod:`ingest.commands`) on the terminal ``phone``,
        wherever it is connected; returns the JSON answer.  Raises
        :class:`~ingest.commands.CommandError` subclasses (offline, timeout, bad request, ...).
        """
        try:
            result = await self.cluster.command(phone, msg_id, body)
        except CommandError as error:
            self.metrics.commands.labels(error.kind).inc()
            raise
        self.metrics.commands.labels("answered").inc()
        return result

    async def execute_local(self, phone: str, message: Message) -> dict[str, Any] | None:
        """Run ``message`` on this node's connection to ``phone`` (exactly as the header
        spells it); None if this node holds no authenticated session of it."""
        connection = self.directory.get(phone)
        if connection is None or not connection.session.authenticated:
            return None
        return await connection.command(message)

    # -- uploads

    def uploads_touched(self) -> None:
        """A package was fed: wake the deadline task for a new series, update the metrics."""
        series = self.uploads.series_in_flight
        if series > self._series_seen:
            self._uploads_changed.set()
        self._series_seen = series
        self._report_uploads()

    async def _drive_uploads(
        self,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sleep until the earliest series deadline (or a new series), then expire."""
        task_status.started()
        while True:
            deadline = self.uploads.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._uploads_changed.wait()
            if self._uploads_changed.is_set():
                self._uploads_changed = trio.Event()
            for expiry in self.uploads.expire(trio.current_time()):
                if isinstance(expiry, RetransmitRequest):
                    self._request_missing(expiry, nursery)
                else:
                    self._given_up(expiry)
            self._series_seen = self.uploads.series_in_flight
            self._report_uploads()

    async def _summarise_logs(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Once a window, one line per (kind, address) that had lines held back."""
        task_status.started()
        while True:
            await trio.sleep(self.quiet.window_s)
            for held in self.quiet.ended(trio.current_time()):
                logger.warning(
                    "%s more %r lines from %s in the last %.0f s (rate-limited)",
                    f"{held.count:,}",
                    held.kind,
                    held.source,
                    held.window_s,
                )

    def settle_later(
        self, connection: _Connection, tickets: list[int], completion: Completion
    ) -> None:
        """Track a submitted batch; its acks go out once the sink settles it."""
        self._settling.append((connection, tickets, completion))
        self._settling_added.set()

    async def _acknowledge(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Wait for the oldest batch in storage to settle, then acknowledge every batch that
        has settled (of any connection), and again.

        The wait is on the oldest batch: one that settles before an older one waits for it
        (a writer's batches settle about in order).  A connection's acks still leave in the
        order its reports arrived: :meth:`Session.storage_done` holds them until the earlier
        ones settled.  An error while settling or acknowledging one connection's batch closes
        that connection (:meth:`contain`); the others go on.
        """
        task_status.started()
        while True:
            if not self._settling:
                self._settling_added = trio.Event()
                await self._settling_added.wait()
                continue
            oldest, _, completion = self._settling[0]
            try:
                await completion.wait()
            except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
                self._settling.popleft()
                self.contain(oldest, exc)
                continue
            now = trio.current_time()
            settling, self._settling = self._settling, collections.deque()
            touched: dict[_Connection, None] = {}
            for entry in settling:
                connection, tickets, completion = entry
                try:
                    durable = completion.outcome()
                    if durable is None:
                        self._settling.append(entry)
                    elif connection.settled(tickets, durable, now):
                        touched[connection] = None
                except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
                    self.contain(connection, exc)
            for connection in touched:
                try:
                    connection.write_acks_now()
                except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
                    self.contain(connection, exc)

    async def _reap(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every :data:`REAP_INTERVAL_S`, close the connections whose timeouts passed (see
        :meth:`_Connection.expire`)."""
        task_status.started()
        while True:
            await trio.sleep(REAP_INTERVAL_S)
            now = trio.current_time()
            for connection in list(self._connections):
                try:
                    connection.expire(now)
                except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
                    self.contain(connection, exc)

    async def _summarise_activity(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Once a minute, one INFO line of what the connections did (when they did anything)."""
        task_status.started()
        while True:
            await trio.sleep(ACTIVITY_SUMMARY_S)
            line = self.activity_summary()
            if line is not None:
                logger.info("%s", line)

    def activity_summary(self) -> str | None:
        """The activity since the last call as one line (None if there was none); resets it."""
        counts, self.activity = self.activity, collections.Counter()
        if not counts:
            return None
        parts = [
            f"{counts[key]:,} {key}"
            for key in ("connected", "registered", "authenticated", "taken over")
            if counts[key]
        ]
        closed = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("closed: ")}
        if closed:
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(closed.items()))
            parts.append(f"{sum(closed.values()):,} closed ({reasons})")
        online = sum(1 for c in self._connections if c.session.authenticated)
        return (
            f"terminals in the last {ACTIVITY_SUMMARY_S:.0f} s: {'; '.join(parts)}; "
            f"{online:,} online, {len(self._connections):,} connections open"
        )

    def _request_missing(self, request: RetransmitRequest, nursery: trio.Nursery) -> None:
        phone = request.key.phone
        connection = self.directory.get(phone)
        if connection is None or connection.stopping():
            logger.info(
                "phone=%s 0x%04x from serial %s incomplete and the terminal is not connected",
                phone,
                request.key.msg_id,
                request.key.first_serial,
            )
            return
        self.metrics.reassembly_requests.inc()
        actions = connection.session.upload_expired(request, self.uploads.media_id(request.key))
        nursery.start_soon(connection.perform_guarded, actions)

    def _given_up(self, dropped: Dropped) -> None:
        logger.warning(
            "phone=%s gave up 0x%04x from serial %s: %s of %s packages missing (%s)",
            dropped.key.phone,
            dropped.key.msg_id,
            dropped.key.first_serial,
            len(dropped.missing),
            dropped.key.total,
            dropped.reason,
        )

    def _report_uploads(self) -> None:
        for reason, count in self.uploads.dropped.items():
            before = self._uploads_reported.get(reason, 0)
            if count != before:
                self.metrics.reassembly_dropped.labels(reason).inc(count - before)
                self._uploads_reported[reason] = count
        completed = self.uploads.completed
        if completed != self._completed_reported:
            self.metrics.reassembly_completed.inc(completed - self._completed_reported)
            self._completed_reported = completed

    # -- connections

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        nursery: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            self._limiter.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            self.metrics.connections_refused.inc()
            logger.warning("refusing a connection: %s open", self.config.max_connections)
            await trio.aclose_forcefully(stream)
            return
        connection = _Connection(self, stream, next(self._numbers))
        self._connections.add(connection)
        self.metrics.connections.inc()
        self.activity["connected"] += 1
        connection.log.debug("connected from %s", connection.peer)
        try:
            with connection.scope:
                await connection.run()
        except* PEER_ERRORS as group:
            connection.close_reason = f"peer error: {group.exceptions[0]!r}"
        except* Exception as group:  # noqa: BLE001 - contained: see Server.contain
            # Fault isolation: whatever went wrong while handling this connection ends this
            # connection only; every other terminal goes on.  (Cancelled is a BaseException
            # and passes through.)
            self.contain(connection, group)
        finally:
            self._connections.discard(connection)
            self._limiter.release_on_behalf_of(stream)
            phone = connection.session.phone
            if phone is not None and self.directory.get(phone) is connection:
                self.directory.release(phone, connection)
                self.cluster.offline(phone, connection.connected_since)
            self.metrics.connections_closed.labels(connection.close_reason_label).inc()
            self.activity[f"closed: {connection.close_reason_label}"] += 1
            connection.log.debug("closed: %s", connection.close_reason)
            await connection.cleanup()
            if self._all_closed is not None and not self._connections:
                self._all_closed.set()

    def contain(self, connection: _Connection, error: BaseException) -> None:
        """An unexpected error in ``connection``'s handling: log it, count it, close it."""
        connection.close_reason = "internal error"
        self.metrics.contained_errors.labels("connection").inc()
        connection.log.error("internal error; closing this connection", exc_info=error)
        connection.scope.cancel()

    def claim(self, connection: _Connection, phone: str) -> None:
        previous = self.directory.claim(phone, connection)
        self.cluster.online(phone, connection.connected_since, connection.peer)
        if previous is not None:
            self.metrics.takeovers.inc()
            self.activity["taken over"] += 1
            connection.log.debug(
                "takes over from connection %s (%s)", previous.number, previous.peer
            )
            previous.kick()


# Reasons a connection ends, as metric labels (a fixed set).
_REASON_LABELS = (
    "logout",
    "too many failures",
    "peer closed",
    "idle timeout",
    "auth timeout",
    "send timeout",
    "taken over",
    "shutdown",
    "internal error",
)


class _Connection:
    """One terminal connection: its session, decoder and tasks.

    Memory matters here (a node holds tens of thousands of mostly idle connections): slots,
    and what an idle terminal never uses is made on first use -- the acknowledging task and
    its channel with the first stored report, the progress event with the first waiter, the
    log adapter per log call.
    """

    __slots__ = (
        "_backpressured",
        "_batch",
        "_batch_tickets",
        "_buffered_reported",
        "_capture",
        "_closed",
        "_commands",
        "_counted",
        "_drain_on_close",
        "_drained",
        "_fd",
        "_handed_actions",
        "_handed_end",
        "_handed_event",
        "_in_flight_reported",
        "_last_activity",
        "_nursery",
        "_parked_task",
        "_progress",
        "_read_at",
        "_read_wall",
        "_replies",
        "_send_free",
        "_send_since",
        "_sending",
        "_stop_reading",
        "close_reason",
        "config",
        "connected_at",
        "connected_since",
        "decoder",
        "firmware",
        "last_seen",
        "metrics",
        "number",
        "peer",
        "peer_host",
        "scope",
        "server",
        "session",
        "stream",
    )

    def __init__(self, server: Server, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.config = server.config
        self.stream = stream
        self._fd = stream.socket.fileno()  # written to directly (see _send_wire)
        self.number = number
        self.peer_host, self.peer = _peer_names(stream)
        self.firmware: str | None = None
        self.session = Session(
            policy=server.policy,
            dedup=server.dedup,
            new_auth_code=server.new_auth_code,
            uploads=server.uploads,
            lockout=server.lockout,
            peer_host=self.peer_host,
        )
        self.decoder = StreamDecoder(
            max_frame_bytes=self.config.max_frame_bytes,
            max_buffered_bytes=self.config.max_buffered_bytes,
        )
        self.metrics = server.metrics
        self.scope = trio.CancelScope()
        self.connected_at = trio.current_time()
        self.connected_since = server.wall_clock()
        self.last_seen = self.connected_since
        self.close_reason = "cancelled"
        self._last_activity = self.connected_at
        self._read_at = self.connected_at
        self._read_wall = self.connected_since
        self._stop_reading = False
        self._drain_on_close = False
        self._drained = False  # the last read took less than a buffer: wait before reading
        # Parked with the readiness loop (see _park): the task to wake, and what the loop
        # hands it -- the end of the stream or a read error, or the frame (or the actions of
        # one) it could not handle by itself.
        self._parked_task: trio.lowlevel.Task | None = None
        self._handed_end: bytes | OSError | None = None
        self._handed_event: Packet | RemoteProtocolError | None = None
        self._handed_actions: list[Action] | None = None
        # Timeouts are enforced by the server's reaper (Server._reap), not by a cancel scope
        # per read and per write: at one frame per read those were a tenth of a worker's CPU.
        self._backpressured = False  # waiting for storage: the idle timeout does not run
        self._sending = False  # one write at a time; others wait for _send_free
        self._send_free: trio.Event | None = None
        self._send_since: float | None = None  # when the write in progress began
        self._progress: trio.Event | None = None  # made by the first waiter
        self._nursery: trio.Nursery | None = None
        # What one read produced, handed on together in :meth:`_flush`: replies to write
        # (wire, receipt time of the report an ack answers) and positions to store.
        self._replies: list[tuple[bytes, float | None]] = []
        self._batch: list[PositionRecord] = []
        self._batch_tickets: list[int] = []
        self._capture: CaptureWriter | None = None
        self._commands: list[PendingCommand] = []  # oldest first, at most MAX_PENDING_COMMANDS
        self._closed = False
        self._buffered_reported = 0
        self._in_flight_reported = 0
        self._counted = (0, 0)

    @property
    def phone(self) -> str | None:
        return self.session.phone

    @property
    def log(self) -> _TerminalLog:
        return _TerminalLog(self)

    def is_closed(self) -> bool:
        """Cleaned up (a method: mypy must not narrow it across awaits)."""
        return self._closed

    def stopping(self) -> bool:
        """Reading has ended or is ending (a method: mypy must not narrow it across awaits)."""
        return self._stop_reading

    @property
    def close_reason_label(self) -> str:
        reason = self.close_reason
        return reason if reason in _REASON_LABELS else reason.split(":", 1)[0]

    def describe(self) -> dict[str, Any]:
        return {
            "phone": self.session.phone,
            "node": self.server.node_id,
            "edition": int(self.session.edition) if self.session.edition else None,
            "peer": self.peer,
            # China time, as every other time the platform shows
            "connected_since": self.connected_since.astimezone(GMT8).isoformat(),
            "last_seen": self.last_seen.astimezone(GMT8).isoformat(),
            "firmware": self.firmware,  # None before 2019 (0x0102 carries none)
        }

    # -- control from outside

    def kick(self) -> None:
        """Close at once: the terminal has a newer connection."""
        self.close_reason = "taken over"
        self.scope.cancel()

    def drain(self) -> None:
        """Stop reading, send the acks in flight, then close (graceful shutdown)."""
        if not self._stop_reading:
            self.close_reason = "shutdown"
        self._stop_reading = True
        self._drain_on_close = True
        # End the read in progress without cancelling anything: the pending receive returns
        # end-of-stream, and the acknowledgements can still be written.
        with contextlib.suppress(OSError):
            self.stream.socket.shutdown(socket.SHUT_RD)
        if self._progress is not None:  # a reader waiting for storage (back-pressure)
            self._progress.set()
            self._progress = None

    def expire(self, now: float) -> None:
        """Close the connection if one of its timeouts passed (called by the server's reaper):
        no complete frame for ``read_timeout_s`` (not counted while it waits for storage), not
        authenticated ``auth_timeout_s`` after connecting, a write not done in
        ``send_timeout_s``."""
        since = self._send_since
        if since is not None and now - since >= self.config.send_timeout_s:
            self._abort("send timeout")
            return
        if self._stop_reading or self._backpressured:
            return
        deadline, reason = self._read_deadline()
        if now >= deadline:
            self._abort(reason)

    # -- tasks

    async def run(self) -> None:
        if self.config.capture_dir is not None:
            await self._open_capture()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._read()
            if self._drain_on_close and self.session.pending:
                # Bounded by the grace; the server's own deadline bounds a shutdown as well.
                with trio.move_on_after(self.config.shutdown_grace_s):
                    while self.session.pending:
                        await self._progress_event().wait()
            nursery.cancel_scope.cancel()

    async def _receive(self) -> bytes:
        """The next bytes from the terminal (b"" at its end of stream).

        Straight from the non-blocking descriptor: one trip through the scheduler while
        waiting for data, where ``SocketStream.receive_some`` takes two.  After a read that
        did not fill the buffer the socket is almost always empty (a terminal on the road
        writes one frame and waits for its ack), so the next read waits first instead of
        trying a read that fails: a failed read is a system call and an exception per frame.
        A read that finds data at once still yields, so that a peer sending without pause
        cannot starve the other connections.
        """
        if not self._drained:
            try:
                data = os.read(self._fd, RECV_CHUNK_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:  # reset by the peer
                raise trio.BrokenResourceError(f"receive failed: {exc!r}") from exc
            else:
                self._drained = len(data) < RECV_CHUNK_BYTES
                await trio.lowlevel.checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(self.stream.socket)
            try:
                data = os.read(self._fd, RECV_CHUNK_BYTES)
            except BlockingIOError:
                continue  # woken without data after all
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc!r}") from exc
            self._drained = len(data) < RECV_CHUNK_BYTES
            return data

    async def _read(self) -> None:
        while not self.stopping():
            if self._can_park():
                await self._park()
                if not await self._resume():
                    return
                continue
            data = await self._receive()
            if not data:
                if not self._stop_reading:  # (after drain(), the end we asked for)
                    self.close_reason = "peer closed"
                return
            # Receipt time of this read's frames (one clock read each per read, not per frame).
            self._read_at = trio.current_time()
            self._read_wall = self.server.wall_clock()
            await self._record(data)
            self.decoder.feed(data)
            await self._take_decoded()

    async def _take_decoded(self) -> None:
        """Handle the frames decoded so far, then flush."""
        if not self.stopping():
            for event in self.decoder:
                await self._handle(event)
                if self.stopping():
                    break
        # One read usually holds several frames (a terminal catching up, or writing a
        # group at once): their positions go to storage as one submit and their replies
        # leave in one write, which is most of what a position costs here.
        await self._flush()
        self._report_buffered()

    # -- parked with the readiness loop (ingest.readiness)

    def _can_park(self) -> bool:
        """Wait for the next read with the readiness loop: an authenticated terminal whose
        last read emptied the socket, nothing left to flush, no capture, and a sink that can
        take positions without waiting."""
        return (
            self._drained
            and self.session.authenticated
            and self.server.readiness.running
            and self.server.submit_nowait is not None
            and self._capture is None
            and not self._batch
            and not self._replies
        )

    async def _park(self) -> None:
        """Sleep until the readiness loop wakes this task (or it is cancelled)."""
        self._parked_task = trio.lowlevel.current_task()
        self.server.readiness.park(self._fd, self)
        await trio.lowlevel.wait_task_rescheduled(self._unpark_on_abort)

    def _unpark_on_abort(self, _: Callable[[], object]) -> trio.lowlevel.Abort:
        self.server.readiness.unpark(self._fd)
        self._parked_task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        """Resume the parked task (called once it is unparked)."""
        task, self._parked_task = self._parked_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _hand_over(self) -> None:
        readiness = self.server.readiness
        readiness.unpark(self._fd)
        readiness.handovers += 1
        self.wake()

    def readable(self) -> None:
        """The readiness loop saw data (or the end) for this parked connection: read and
        handle it here if every frame is a plain one, else hand over to the task."""
        try:
            self._read_parked()
        except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
            self._hand_over()
            self.server.contain(self, exc)

    def _read_parked(self) -> None:
        try:
            data = os.read(self._fd, RECV_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # reset by the peer: the task raises it
            self._handed_end = exc
            self._hand_over()
            return
        if not data:
            self._handed_end = data
            self._hand_over()
            return
        self._drained = len(data) < RECV_CHUNK_BYTES
        self._read_at = trio.current_time()
        self._read_wall = self.server.wall_clock()
        self.decoder.feed(data)
        for event in self.decoder:
            if not isinstance(event, Packet) or not self._inline(event):
                self._handed_event = event
                self._hand_over()
                return
            left = self._handle_now(event)
            if left is not None:
                self._handed_actions = left
                self._hand_over()
                return
            if self.stopping():
                self._hand_over()
                return
        if not self._flush_now():
            self._hand_over()  # storage has no room: the task waits for it
            return
        self._report_buffered()

    def _inline(self, event: Packet) -> bool:
        """A frame the readiness loop handles by itself: a whole report or heartbeat of an
        authenticated terminal with room for another un-acked report."""
        return (
            event.msg_id in INLINE_MSG_IDS
            and not isinstance(event.message, Fragment)
            and self.session.authenticated
            and self.session.pending < self.config.max_unacked
        )

    def _handle_now(self, event: Packet) -> list[Action] | None:
        """:meth:`_handle` of an inline frame; the actions that need the task, if any."""
        now = self._read_at
        self._last_activity = now
        self.last_seen = self._read_wall
        self.metrics.count_frame(event.msg_id)
        actions = self.session.receive(event, now=now, wall=self.last_seen)
        left = None
        for index, action in enumerate(actions):
            if not self._act_now(action):
                left = actions[index:]
                break
        self._count_session()
        return left

    async def _resume(self) -> bool:
        """Go on from where the readiness loop stopped; False at the end of the stream."""
        end, self._handed_end = self._handed_end, None
        if isinstance(end, OSError):
            raise trio.BrokenResourceError(f"receive failed: {end!r}") from end
        if end is not None:
            if not self._stop_reading:  # (after drain(), the end we asked for)
                self.close_reason = "peer closed"
            return False
        actions, self._handed_actions = self._handed_actions, None
        event, self._handed_event = self._handed_event, None
        if actions:
            await self._perform(actions)
        if event is not None and not self.stopping():
            await self._handle(event)
        await self._take_decoded()
        return True

    def _read_deadline(self) -> tuple[float, str]:
        idle = self._last_activity + self.config.read_timeout_s
        if not self.session.authenticated:
            auth = self.connected_at + self.config.auth_timeout_s
            if auth < idle:
                return auth, "auth timeout"
        return idle, "idle timeout"

    async def _handle(self, event: Packet | RemoteProtocolError) -> None:
        now = self._read_at
        self._last_activity = now
        self.last_seen = self._read_wall
        if isinstance(event, RemoteProtocolError):
            self.metrics.decode_errors.labels(event.kind).inc()
            await self._perform(self.session.protocol_error(event, now=now))
            return
        self.metrics.count_frame(event.msg_id)
        if event.msg_id in STORED_MSG_IDS and self.session.authenticated:
            await self._wait_for_room()
            if self.stopping():
                return
            now = trio.current_time()
        actions = self.session.receive(event, now=now, wall=self.last_seen)
        self._count_session()
        if isinstance(event.message, Fragment):
            self.server.uploads_touched()
        await self._perform(actions)

    async def _wait_for_room(self) -> None:
        """Stop reading while the connection's un-acked reports are at their cap."""
        if self.session.pending < self.config.max_unacked:
            return
        await self._flush()  # what waits in this read's batch must reach storage to settle
        if self.session.pending < self.config.max_unacked:
            return
        self.metrics.backpressured.inc()
        self.log.debug("%s reports un-acked: not reading", self.session.pending)
        self._backpressured = True
        try:
            while self.session.pending >= self.config.max_unacked and not self._stop_reading:
                await self._progress_event().wait()
        finally:
            self._backpressured = False
            self.metrics.backpressured.dec()
        self._last_activity = trio.current_time()

    def _progress_event(self) -> trio.Event:
        if self._progress is None:
            self._progress = trio.Event()
        return self._progress

    def settled(self, tickets: list[int], durable: bool, now: float) -> bool:
        """Storage settled the batch holding ``tickets`` (called by the server's
        acknowledging task): queue the acks it releases.  True if there are replies to
        write; nothing happens for a connection already closed."""
        count = len(tickets)
        if self._closed:
            return False  # its share of the gauges went with cleanup()
        self.metrics.unacked.dec(count)
        self._in_flight_reported -= count
        if not durable:
            self.metrics.not_durable.inc(count)
        for ticket in tickets:
            for action in self.session.storage_done(ticket, durable, now=now):
                if isinstance(action, Send):
                    self._replies.append((action.wire, action.acked_at))
                elif isinstance(action, Log):
                    self.log.log(action.level, action.message, *action.args)
        if not self._replies:
            self._wake_progress()  # settled without acks to send (not durable, or immediate)
            return False
        return True

    def write_acks_now(self) -> None:
        """Write the queued replies without waiting (the caller serves every connection):
        what the socket does not take at once, or a write already in progress, is left to a
        task of this connection.  Wakes a reader waiting for room once the acks left."""
        if self._closed or self._nursery is None:
            return
        if self._sending:
            self._nursery.start_soon(self._write_acks_later, None)
            return
        replies, wire = self._take_replies()
        self._sending = True
        sent = self._write_now(wire)
        if sent is None:
            self._send_done()
            return
        if sent < len(wire):
            self._send_since = trio.current_time()
            self._nursery.start_soon(self._write_acks_later, memoryview(wire)[sent:], replies)
            return
        self._send_done()
        self._replies_left(replies)

    async def _write_acks_later(
        self,
        rest: memoryview | None,
        replies: list[tuple[bytes, float | None]] | None = None,
    ) -> None:
        """Finish a write the socket did not take at once (``rest``, holding the write), or
        write the queued replies once the write in progress is done (``rest`` None)."""
        if rest is None:
            await self._write_replies()
            return
        try:
            await self.stream.send_all(rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._abort(f"peer error: {exc!r}")
            return
        finally:
            self._send_done()
        self._replies_left(replies or [])

    def _wake_progress(self) -> None:
        """Wake the reader (back-pressure) and a draining close: acks have left."""
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    # -- commands

    async def command(self, message: Message) -> dict[str, Any]:
        """Send a command, resend it on the schedule, return the JSON of its answer."""
        if self._closed or self.stopping():
            raise TerminalOfflineError(f"terminal {self.phone} is disconnecting")
        if len(self._commands) >= MAX_PENDING_COMMANDS:
            raise CommandBusyError(f"{len(self._commands)} commands wait for {self.phone}")
        try:
            serials, wires = self.session.downlink(message)
        except LocalProtocolError as exc:
            raise BadCommandError(f"0x{message.msg_id:04x} does not fit: {exc}") from exc
        pending = PendingCommand(message=message, serials=serials, wires=wires)
        self._commands.append(pending)
        self.log.info("command 0x%04x serial %s", pending.msg_id, pending.serial)
        schedule = self.server.command_schedule
        try:
            for attempt, wait_s in enumerate(schedule):
                if pending.acknowledged is None:
                    if attempt:
                        self.metrics.command_resends.inc()
                        self.log.info(
                            "no answer to 0x%04x serial %s: sending again",
                            pending.msg_id,
                            pending.serial,
                        )
                    pending.attempts += 1
                    for wire in wires:
                        await self._send_wire(wire)
                with trio.move_on_after(wait_s):
                    await pending.done.wait()
                if pending.done.is_set():
                    break
        finally:
            self._commands.remove(pending)
        if pending.error is not None:
            raise pending.error
        reply = pending.reply or pending.acknowledged
        if reply is None:
            raise CommandTimeoutError(
                f"no answer to 0x{pending.msg_id:04x} from {self.phone} after "
                f"{pending.attempts} sending(s) in {sum(schedule):g} s"
            )
        phone = self.phone or "?"
        return reply_json(phone=phone, node=self.server.node_id, command=pending, reply=reply)

    async def _answer(self, packet: Packet) -> None:
        message = packet.message
        if isinstance(message, TerminalRetransmitRequest):
            for pending in self._commands:
                if pending.serial == message.original_serial:
                    self.log.info(
                        "terminal asks for packages %s of 0x%04x again",
                        message.packet_ids,
                        pending.msg_id,
                    )
                    for wire in pending.packages(message.packet_ids):
                        await self._send_wire(wire)
                    return
            self.log.info("0x0005 for serial %s matches no command", message.original_serial)
            return
        for pending in self._commands:
            if pending.offer(packet):
                self.log.info("answer 0x%04x to command 0x%04x", packet.msg_id, pending.msg_id)
                return
        self.log.debug("answer 0x%04x matches no waiting command", packet.msg_id)

    # -- actions

    async def perform(self, actions: Iterable[Action]) -> None:
        """Perform actions from outside the connection's own tasks (upload deadlines)."""
        if not self._closed:
            await self._perform(actions)
            await self._write_replies()

    async def perform_guarded(self, actions: Iterable[Action]) -> None:
        """:meth:`perform` in a task of the server's: a failure closes this connection only."""
        try:
            await self.perform(actions)
        except Exception as exc:  # noqa: BLE001 - contained: see Server.contain
            self.server.contain(self, exc)

    def _act_now(self, action: Action) -> bool:
        """Perform ``action`` if it needs no waiting (True); False (nothing done) if it does.
        Replies and positions are only queued (see :meth:`_flush`)."""
        match action:
            case Send():
                self._replies.append((action.wire, action.acked_at))
            case Store():
                self._batch.extend(action.records)
                self._batch_tickets.append(action.ticket)
            case Claim():
                self.server.claim(self, action.phone)
            case Close():
                if not self._stop_reading:
                    self.close_reason = action.reason
                self._stop_reading = True
                self._drain_on_close = self._drain_on_close or action.drain
            case Log():
                if action.kind is not None and action.level >= logging.WARNING:
                    # Lines a peer can cause at will: a budget per kind and address.
                    quiet = self.server.quiet
                    if not quiet.allow(action.kind, self.peer_host, trio.current_time()):
                        self.metrics.log_suppressed.labels(action.kind).inc()
                        return True
                self.log.log(action.level, action.message, *action.args)
            case _:
                return False
        return True

    async def _perform(self, actions: Iterable[Action]) -> None:
        """Perform ``actions``; replies and positions are only queued (see :meth:`_flush`)."""
        for action in actions:
            if self._act_now(action):
                continue
            match action:
                case Register():
                    await self._flush()  # replies before the wait on the database
                    outcome = await self.server.registry.register(action.request)
                    if outcome.result is None:
                        self.metrics.logins_unanswered.labels("register").inc()
                    else:
                        self.metrics.registrations.labels(str(outcome.result)).inc()
                        if outcome.result == REGISTER_OK:
                            self.server.activity["registered"] += 1
                        elif outcome.result == REGISTER_TERMINAL_TAKEN:
                            self.metrics.identity_refused.inc()
                    now = trio.current_time()
                    await self._perform(self.session.registration_done(action, outcome, now=now))
                case Authenticate():
                    await self._flush()
                    ok = await self.server.registry.authenticate(action.request)
                    if ok is None:
                        self.metrics.logins_unanswered.labels("authenticate").inc()
                    elif ok:
                        self.server.activity["authenticated"] += 1
                        # JT/T 808-2019 8.5 (0x0102): the software version, shown by /terminals
                        self.firmware = action.request.software_version
                    else:
                        self.metrics.auth_failures.inc()
                    now = trio.current_time()
                    await self._perform(self.session.authentication_done(action, ok, now=now))
                case StoreMedia():
                    await self._flush()
                    stored = await self.server.media.store(action.record)
                    (self.metrics.media_stored if stored else self.metrics.media_failed).inc()
                    now = trio.current_time()
                    await self._perform(self.session.media_done(action, stored, now=now))
                case Answer():
                    await self._flush()  # an answer may send packages: keep replies in order
                    await self._answer(action.packet)
        self._count_session()

    def _flush_now(self) -> bool:
        """:meth:`_flush` without waiting; False (positions left queued) if the sink has no
        room for them now."""
        if self._batch:
            submit = self.server.submit_nowait
            completion = None if submit is None else submit(self._batch)
            if completion is None:
                return False
            self._submitted(len(self._batch), completion)
            self._batch = []
        if self._replies:
            self.write_acks_now()
        return True

    async def _flush(self) -> None:
        """Hand the queued positions to storage (one submit) and write the queued replies.

        Only the reading task queues positions, so their order is the order of submission.
        """
        if self._batch:
            records, self._batch = self._batch, []
            self._submitted(len(records), await self.server.sink.submit(records))
        await self._write_replies()

    def _submitted(self, positions: int, completion: Completion) -> None:
        """The queued batch went to storage as ``completion``: count it and have its acks
        sent when it settles (Server._acknowledge)."""
        tickets, self._batch_tickets = self._batch_tickets, []
        self.metrics.positions.inc(positions)
        self.metrics.unacked.inc(len(tickets))
        self._in_flight_reported += len(tickets)
        self.server.settle_later(self, tickets, completion)

    async def _write_replies(self) -> None:
        """Write every queued reply in one send (in the order they were queued)."""
        if not self._replies:
            return
        replies, wire = self._take_replies()
        if await self._send_wire(wire):
            self._replies_left(replies)

    def _take_replies(self) -> tuple[list[tuple[bytes, float | None]], bytes]:
        """The queued replies (emptying the queue) and their bytes, joined in order."""
        replies, self._replies = self._replies, []
        wire = replies[0][0] if len(replies) == 1 else b"".join(wire for wire, _ in replies)
        return replies, wire

    def _replies_left(self, replies: list[tuple[bytes, float | None]]) -> None:
        """Replies written: observe the acks' latency, wake a reader waiting for room."""
        now = trio.current_time()
        observe = self.metrics.ack_latency.observe
        for _, acked_at in replies:
            if acked_at is not None:
                observe(now - acked_at)
        self._wake_progress()

    async def _send_wire(self, wire: bytes) -> bool:
        """Write one frame; False (and the connection closing) if it could not be written."""
        if self._closed:
            return False
        # One write at a time (the reading task and the acknowledging task both write); a
        # flag rather than a trio.Lock, whose acquire yields to the scheduler even when free.
        while self._sending:
            if self._send_free is None:
                self._send_free = trio.Event()
            await self._send_free.wait()
            if self.is_closed():
                return False
        self._sending = True
        try:
            sent = self._write_now(wire)
            if sent is None:
                return False
            if sent < len(wire):
                self._send_since = trio.current_time()  # the reaper enforces send_timeout_s
                await self.stream.send_all(memoryview(wire)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._abort(f"peer error: {exc!r}")
            return False
        finally:
            self._send_done()
        return True

    def _write_now(self, wire: bytes) -> int | None:
        """Write what the socket takes now; the bytes written, or None if the peer is gone
        (the connection is then closing).  The caller holds the write (``_sending``).

        Nearly always the socket takes the whole frame at once: straight to the non-blocking
        descriptor, without trio's send path and its two trips through the scheduler.
        """
        try:
            return os.write(self._fd, wire)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset or broken pipe
            self._abort(f"peer error: {exc!r}")
            return None

    def _send_done(self) -> None:
        self._sending = False
        self._send_since = None
        if self._send_free is not None:
            self._send_free.set()
            self._send_free = None

    def _abort(self, reason: str) -> None:
        self.close_reason = reason
        self._stop_reading = True
        self.scope.cancel()

    # -- bookkeeping

    def _count_session(self) -> None:
        counted = (self.session.retransmissions, self.session.refused)
        before = self._counted
        if counted != before:
            self.metrics.duplicates.inc(counted[0] - before[0])
            self.metrics.refused.inc(counted[1] - before[1])
            self._counted = counted

    def _report_buffered(self) -> None:
        buffered = self.decoder.buffered
        if buffered != self._buffered_reported:
            self.metrics.buffered_bytes.inc(buffered - self._buffered_reported)
            self._buffered_reported = buffered

    async def _open_capture(self) -> None:
        directory = self.config.capture_dir
        assert directory is not None
        try:
            self._capture = await CaptureWriter.open(
                directory,
                connection=self.number,
                peer=self.peer,
                wall=self.connected_since,
                start=self.connected_at,
                max_bytes=self.config.capture_max_bytes,
            )
        except OSError as exc:
            self.log.warning("cannot capture to %s: %s", directory, exc)

    async def _record(self, data: bytes) -> None:
        if self._capture is None:
            return
        try:
            written = await self._capture.record(data, now=trio.current_time())
        except OSError as exc:
            self.log.warning("capture failed, recording stopped: %s", exc)
            self._capture = None
            return
        self.metrics.capture_bytes.inc(written)

    async def cleanup(self) -> None:
        """Fail waiting commands, undo this connection's share of the gauges, close capture
        and socket."""
        self._closed = True
        for pending in self._commands:
            pending.fail(TerminalOfflineError(f"terminal {self.phone} disconnected"))
        self.metrics.buffered_bytes.dec(self._buffered_reported)
        self.metrics.unacked.dec(self._in_flight_reported)
        self._buffered_reported = self._in_flight_reported = 0
        with trio.CancelScope(shield=True):
            if self._capture is not None:
                with trio.move_on_after(5):  # a stuck disk must not hold the task forever
                    await self._capture.aclose()
            await trio.aclose_forcefully(self.stream)


# Pending-connection queue per listener; the kernel truncates it to net.core.somaxconn (trio's
# open_tcp_listeners makes the same choice, see its _compute_backlog comment).
LISTEN_BACKLOG = 0xFFFF


async def open_shared_listeners(port: int, *, host: str) -> list[trio.SocketListener]:
    """Listeners with SO_REUSEPORT, so that ``workers`` processes share one port.

    Each worker process runs its own :class:`Server` on the same port and the kernel spreads
    new connections between them (Linux 3.9+).  Takeover and retransmission dedup then work
    within a worker only.
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _peer_names(stream: trio.SocketStream) -> tuple[str, str]:
    """The peer's host and its ``host:port`` (``[host]:port`` for IPv6)."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?", "?"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address), str(address)
