"""The operator HTTP port: ``/metrics``, ``/healthz``, ``/terminals``, commands, alerts and
master data.

A few endpoints on top of h11 (the HTTP/1.1 state machine; we parse nothing ourselves).
One request per connection (``Connection: close``), which is all Prometheus scrapes and
operators' curl need.

* ``GET /metrics`` -- the Prometheus text exposition of the server's registry.
* ``GET /healthz`` -- the node's health as JSON: ``{"status": "ok" | "degraded" |
  "unavailable", ...details}`` from the ``health`` callable given (for example
  ``{"status": "degraded", "database": "unreachable", "spooling": true}``).  200 for ok and
  degraded (the node still serves its terminals: an orchestrator must not restart it), 503
  for unavailable.  Without ``health``, the older ``healthy`` flag: 200 ``{"status": "ok"}``
  or 503 ``{"status": "unavailable"}``.
* ``GET /terminals`` -- JSON list of this node's online sessions (phone, node, edition, peer,
  connected_since, last_seen), from the callable given.
* ``POST /terminals/{phone}/commands`` -- body ``{"msg_id": "0x8201", "body": {...}}`` (see
  :mod:`ingest.commands` for the field format): sends the command to the terminal, on whichever
  node holds it, and answers 200 with ``{"phone", "node", "command": {"msg_id", "serial",
  "attempts"}, "reply": {"msg_id", "serial", "body"}}`` once the terminal answered.  Errors are
  ``{"error": kind, "detail": text}`` with 400 (``bad_request``: not JSON, unknown id or
  field, a value that does not fit), 404 (``offline``), 502 (``node_unreachable``), 503
  (``busy``) or 504 (``timeout``: no answer through every resend).
* ``GET /alerts/stream`` -- the live alert events as server-sent events (``text/event-stream``,
  chunked): each event is ``id: <seq>`` and ``data: <alert JSON>``.  Query parameters ``unit``,
  ``rule``, ``state`` and ``severity`` select events (exact match); the stream resumes after
  the ``Last-Event-ID`` header or ``?after=SEQ`` (``after=0``: everything the feed still holds),
  else it starts with the next event.  A ``rule`` or ``state`` the feed's
  :class:`~ingest.interfaces.AlertVocabulary` does not know is answered 400 ``{"error":
  "bad_request", "detail", "parameter", "value", "valid": [...]}``.  A comment line goes out
  whenever :data:`HEARTBEAT_S` pass without a write, however the feed waits, so proxies and
  ``jt808 alerts tail`` do not take an idle stream for a dead one.  At most
  :data:`MAX_STREAMS` streams run at once (more are
  answered 503); a client that does not take an event within :data:`REQUEST_TIMEOUT_S` is
  disconnected (nothing is buffered for it beyond the socket's own buffer).  404 when the node
  runs no alert feed.  When the feed cannot answer (its database is down) a new stream is
  answered 503 ``unavailable`` and an open one is ended cleanly (one log line); the client
  resumes with Last-Event-ID, so nothing is lost and no stream holds a slot through an outage.
* Master data (when the node has a :class:`~ingest.interfaces.MasterDataAdmin`, else 404):
  ``POST /vehicles`` (a JSON list of vehicle objects), ``POST /fences`` (a GeoJSON
  FeatureCollection) and ``POST /filings`` (one filing object or a list) answer 201 with
  ``{"ids": [...]}`` in input order once the change is in effect (no restart);
  ``GET /vehicles`` (list), ``GET /fences`` (FeatureCollection) and ``GET /filings`` (list;
  ``?since=ISO`` keeps filings ending at or after it, China time without an offset).  Bad
  JSON or shape is 400 ``{"error": "bad_request", "detail"}``; refused data is 400
  ``{"error": "invalid", "detail", "problems": [...]}`` listing every problem, and nothing is
  stored.  The object formats are :class:`~ingest.interfaces.MasterDataAdmin`'s.

* The operator console (when the node serves one: :mod:`ingest.console_api`): its page under
  ``/console/``, ``/session``, ``/positions/*``, ``/vehicles/{id}/track|bindings``,
  ``/alerts``, ``/alerts/{id}[/notes]`` and ``/reports/violations``.

Operator access
    Every request but ``/healthz`` (and ``/metrics`` while ``metrics_public``) needs
    ``Authorization: Bearer <token>`` (or the console's session cookie) of an account
    (:class:`~ingest.interfaces.OperatorAccess`; without one the port lets nobody in): none,
    or an unknown, expired or revoked token, is 401 with ``WWW-Authenticate: Bearer``; a
    request the account's role or unit does not allow is 403 ``{"error": "forbidden", ...}``
    and stores nothing (:mod:`ingest.access` decides).  An
    address that sent ``login_lockout.failures`` wrong tokens within its window is answered 429
    without any check for the lock-out's time.  Writes name their account and address to the
    audit trail; ``GET /audit?since=ISO&user=NAME&limit=N`` (admins) reads it.

Any endpoint whose backing service cannot answer now
(:class:`~ingest.interfaces.ServiceUnavailableError`) answers 503 ``{"error": "unavailable",
"detail"}``.  Request bodies must be UTF-8 JSON (RFC 8259) nested at most
:data:`MAX_JSON_DEPTH` deep, without NaN or infinite numbers; anything else is 400.

Fault isolation
    Each connection is one task, and one guard around its handling (:meth:`OperatorHttp._serve`)
    contains every ``Exception`` raised while serving it: the traceback is logged once, the
    request is answered 500 ``{"error": "internal"}`` if no response had begun (else the
    connection is closed), ``jt808_contained_errors{where="http"}`` counts it, and the port goes
    on serving.  A client that goes away or speaks broken HTTP is not an error of ours: it gets
    a 4xx or its connection is closed.  Cancellation is never caught.

Slow clients and slots
    Reading a request head is cheap and bounded by time: a head must arrive within
    :data:`HEAD_TIMEOUT_S` of the connection, and up to :data:`MAX_OPEN_CONNECTIONS`
    connections may be open at once.  When that many are open, a new connection takes the
    place of the one that has been reading its head longest, so trickling clients cannot shut
    the port to a health probe.  Short requests (``/healthz``, ``/metrics``, ``/terminals``
    and every error answer) are answered as soon as their head is read, without any slot;
    only long-running requests take one: a command (:data:`MAX_COMMANDS`), an alert stream
    (:data:`MAX_STREAMS`) or a master-data request (:data:`MAX_MASTERDATA_REQUESTS`), each
    answered 503 ``busy`` when its slots are taken.  One address may hold
    :data:`~ingest.limits.MAX_CONNECTIONS_PER_ADDRESS` connections (at that cap its own
    slowest head makes room, else the new one is answered 429 and closed) and one user
    :data:`~ingest.limits.MAX_STREAMS_PER_USER` alert streams (429 beyond).  Every cap is a
    setting (:class:`~ingest.limits.HttpLimits`); :mod:`ingest.limits` gives their reasons.

TLS
    Given an ``ssl.SSLContext`` (:func:`ingest.tls.server_context`) the port speaks HTTPS only.
    The handshake is part of reading the head, within the same deadline; a client that fails
    it (plain HTTP, an unknown CA, a stalled handshake) loses its own connection only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest import access
from ingest.access import Actor, AuditEntry, Principal
from ingest.commands import CommandError
from ingest.interfaces import (
    AlertFeed,
    AlertFilter,
    AlertVocabulary,
    MasterDataAdmin,
    MasterDataRejected,
    OperatorAccess,
    ServiceUnavailableError,
    UnknownAlertValueError,
)
from ingest.limits import (
    HEAD_TIMEOUT_S,
    MAX_CONNECTIONS_PER_ADDRESS,
    MAX_MASTERDATA_BODY_BYTES,
    MAX_OPEN_CONNECTIONS,
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_HEAD_BYTES,
    MAX_REQUEST_HEADERS,
    MAX_STREAMS,
    MAX_STREAMS_PER_USER,
    REQUEST_TIMEOUT_S,
    HttpLimits,
    KeyedCounts,
)
from ingest.lockout import AuthLockout, LockoutPolicy
from ingest.metrics import Metrics

if TYPE_CHECKING:
    from ingest.console_api import ConsoleApi

logger = logging.getLogger(__name__)

# The caps of heads, bodies, connections and streams (and their reasons) are in ingest.limits;
# the names above are the defaults, which an OperatorHttp built without limits takes.
RECV_BYTES = 4096
# No short endpoint takes a body; one sent anyway is read (so that closing the connection does
# not reset it before the client reads our answer) up to this, within the head's time.
MAX_SHORT_BODY_BYTES = 16 * 1024
# Commands wait for their terminal up to the whole retransmission schedule: 16 at once is a
# few operators' worth; more are answered 503 "busy".
MAX_COMMANDS = 16
# Master-data requests at once (more are answered 503 "busy"): writes serialise on the version
# row anyway and the database adapter runs two at a time, and four bound the bodies held to
# 64 MiB (see MAX_MASTERDATA_BODY_BYTES; their parsed form is several times that).
MAX_MASTERDATA_REQUESTS = 4
# JSON nesting accepted in a body.  The deepest document an endpoint takes is a GeoJSON
# MultiPolygon (collection, features, feature, geometry, coordinates, polygon, ring, point:
# 8 levels); 64 is eight times that, and far inside Python's recursion limit (1,000 frames)
# that the JSON decoder and the code walking the document spend a few of per level.
MAX_JSON_DEPTH = 64
# A comment line on a stream this long after its last write: common proxies close a response
# idle for 60 s (nginx ``proxy_read_timeout``), and ``jt808 alerts tail`` reads with a timeout
# of three of these.
HEARTBEAT_S = 15.0
# Events read from the feed per round: bounds one round's memory, ~100 KB of JSON.
STREAM_BATCH = 100
EVENT_STREAM = "text/event-stream"

JSON = "application/json"
_COMMANDS_PATH = re.compile(rb"/terminals/([^/]+)/commands")
_MASTERDATA_PATHS = frozenset({b"/vehicles", b"/fences", b"/filings"})
# One filing with every version of it (GET only); ids are bigint identities (18 digits fit).
_FILING_PATH = re.compile(rb"/filings/([0-9]{1,18})")
_STREAM_PATH = b"/alerts/stream"
_AUDIT_PATH = b"/audit"
# Client addresses whose failed logins are remembered.  Operators and their tools come from a
# few dozen addresses; 10,000 entries (each a few failure times) are under 10 MB, and past
# that the address that failed longest ago is forgotten first, so a flood from many addresses
# cannot grow memory.
MAX_LOGIN_ADDRESSES = 10_000
# The login lock-out when none is given: 20 failures within 5 minutes lock an address for 5
# (the defaults of ingest.config, where the reasons are).
LOGIN_LOCKOUT = LockoutPolicy(failures=20, window_s=300.0, lockout_s=300.0)
# Audit rows ``GET /audit`` answers at most (``?limit=`` lowers it): ~1 KB each, 10 MB.
MAX_AUDIT_ROWS = 10_000
# An event id is an alert_events seq, a PostgreSQL bigint: 18 digits stay below 2**63.
_EVENT_ID = re.compile(r"[0-9]{1,18}")
# Filing times without an offset are China time, as in the CSV import.
CHINA = timezone(timedelta(hours=8))
HEALTH_STATUSES = {"ok": 200, "degraded": 200, "unavailable": 503}

# (phone, msg_id, body) -> JSON answer; raises CommandError subclasses.
CommandRunner = Callable[[str, object, object], Awaitable[dict[str, Any]]]

# The 500 answer when h11 cannot produce one (its state broken by the error being contained).
_INTERNAL_BODY = b'{"error": "internal"}'
_INTERNAL_RAW = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_INTERNAL_BODY), _INTERNAL_BODY)
)
# The answer to a plain connection past its address's cap, sent before its request is read.
_CROWDED_BODY = b'{"error": "too_many_connections"}'
_CROWDED_RAW = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_CROWDED_BODY), _CROWDED_BODY)
)
# Sending that answer waits no longer than this (it fits any socket buffer; this is a backstop).
_CROWDED_SEND_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    """A whole response: status, body, its type and, for 405, the methods allowed."""

    status: int
    body: bytes
    content_type: str = JSON
    allow: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


class _Exchange:
    """One connection: its stream, h11 state, the request once read, and whether a response
    has begun (after which an error can only close the connection)."""

    __slots__ = ("address", "conn", "principal", "request", "started", "stream")

    def __init__(self, stream: trio.abc.Stream, address: str, max_head_bytes: int) -> None:
        self.stream = stream
        self.address = address
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.request: h11.Request | None = None
        self.principal: Principal | None = None  # once authenticated
        self.started = False

    def describe(self) -> str:
        if self.request is None:
            return "a request"
        method = self.request.method.decode("ascii", "replace")
        return f"{method} {self.request.target[:200].decode('ascii', 'replace')}"


class OperatorHttp:
    """Serves the operator endpoints.  Start :meth:`run` with ``nursery.start``.

    ``health`` (a dict with ``status`` ok/degraded/unavailable and details) is preferred to the
    older ``healthy`` flag when both are given; with neither, ``/healthz`` answers ok while the
    port serves.  ``metrics`` (optional) receives ``jt808_http_requests{status}`` for every
    answer and ``jt808_contained_errors{where="http"}`` for every error contained.
    ``heartbeat_s`` is the alert streams' heartbeat interval (tests shorten it).  ``limits``
    are the port's caps (None: the defaults of :mod:`ingest.limits`, as this module names
    them); with ``tls`` (a server-side context) the port speaks HTTPS only.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        terminals: Callable[[], list[dict[str, Any]]],
        healthy: Callable[[], bool] | None = None,
        health: Callable[[], Mapping[str, Any]] | None = None,
        command: CommandRunner | None = None,
        alerts: AlertFeed | None = None,
        masterdata: MasterDataAdmin | None = None,
        metrics: Metrics | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        limits: HttpLimits | None = None,
        tls: ssl.SSLContext | None = None,
        access: OperatorAccess | None = None,
        metrics_public: bool = True,
        login_lockout: LockoutPolicy = LOGIN_LOCKOUT,
        console: ConsoleApi | None = None,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        self.host = host
        self.port = port
        self.registry = registry
        self.terminals = terminals
        self.healthy = healthy
        self.health = health
        self.command = command
        self.alerts = alerts
        self.masterdata = masterdata
        self.metrics = metrics
        self.heartbeat_s = heartbeat_s
        self.limits = limits if limits is not None else _default_limits()
        self.tls = tls
        self.access = access
        self.metrics_public = metrics_public
        # The operator console's page, session and data (ingest.console_api), if served.
        self.console = console
        # Failed logins per client address (the per-phone scope of the lock-out is unused).
        self._logins = AuthLockout(
            per_phone=LockoutPolicy(failures=0, window_s=1.0, lockout_s=1.0),
            per_address=login_lockout,
            max_keys=MAX_LOGIN_ADDRESSES,
        )
        self._open: set[_Exchange] = set()
        # Connections per client address, and alert streams per owner (see stream_owner).
        self._per_address = KeyedCounts()
        self._stream_owners = KeyedCounts()
        # The connections still reading their head, oldest first (dicts keep insertion order):
        # the ones a new connection may take the place of.
        self._reading: dict[_Exchange, trio.CancelScope] = {}
        self._command_slots = trio.CapacityLimiter(MAX_COMMANDS)
        self._stream_slots = trio.CapacityLimiter(self.limits.max_streams)
        self._masterdata_slots = trio.CapacityLimiter(MAX_MASTERDATA_REQUESTS)

    @property
    def open_connections(self) -> int:
        """Connections of the port now (reading, being answered or streaming)."""
        return len(self._open)

    async def run(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound port(s)."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        scheme = "HTTP" if self.tls is None else "HTTPS"
        logger.info("operator %s on %s port(s) %s", scheme, self.host, ports)
        async with trio.open_nursery() as nursery:
            if self.console is not None:  # its positions hub serves while the port does
                await nursery.start(self.console.run)
            task_status.started(ports)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    # -- one connection

    async def _serve(self, stream: trio.SocketStream) -> None:
        # The TLS handshake happens on the first read, within the head's deadline.
        wrapped: trio.abc.Stream = stream
        if self.tls is not None:
            wrapped = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        exchange = _Exchange(wrapped, _peer_address(stream), self.limits.max_head_bytes)
        refused = self._admit(exchange)
        if refused is not None:
            if refused == "address" and self.tls is None:
                self._count(429)
                with (
                    trio.move_on_after(_CROWDED_SEND_S),
                    contextlib.suppress(trio.BrokenResourceError),
                ):
                    await stream.send_all(_CROWDED_RAW)
            await trio.aclose_forcefully(stream)
            return
        self._open.add(exchange)
        self._per_address.add(exchange.address)
        try:
            await self._handle(exchange)
        except Exception as exc:  # noqa: BLE001 - the one guard of a request: see the module
            await self._contain(exchange, exc)
        finally:
            self._open.discard(exchange)
            self._per_address.remove(exchange.address)
            self._reading.pop(exchange, None)
            await trio.aclose_forcefully(stream)

    def _admit(self, exchange: _Exchange) -> str | None:
        """Room for one more connection, from its address and on the port: at either cap, the
        connection (of that address, or any) reading its head longest is cancelled to make room
        (it closes at once).  None: admitted; else the cap that refused it, ``"address"`` or
        ``"port"``, every connection concerned being past its head."""
        limits = self.limits
        if self._per_address[exchange.address] >= limits.max_connections_per_address:
            return None if self._make_room(exchange.address) else "address"
        if len(self._open) >= limits.max_connections:
            return None if self._make_room(None) else "port"
        return None

    def _make_room(self, address: str | None) -> bool:
        """Cancel the connection (from ``address``, or any) reading its head longest; False
        when there is none."""
        oldest = next((e for e in self._reading if address in (None, e.address)), None)
        if oldest is None:
            logger.debug(
                "operator HTTP: %s connections busy (%s from %s); refused one",
                len(self._open),
                self._per_address[address] if address else "any",
                address or "anywhere",
            )
            return False
        self._reading.pop(oldest).cancel()
        logger.debug("operator HTTP: %s connections open; closed the slowest", len(self._open))
        return True

    def stream_owner(self, exchange: _Exchange) -> str:
        """Whose share of the alert streams a stream request counts against: the client's
        address.  (Requests that carry a user count against the user instead, wherever they
        come from: this is the one place to say so.)"""
        if exchange.principal is not None:
            return f"user {exchange.principal.name}"
        return exchange.address

    async def _contain(self, exchange: _Exchange, exc: Exception) -> None:
        """The guard's handling of an error raised while serving ``exchange``."""
        if _peer_fault(exc):
            logger.debug("operator HTTP client dropped: %r", exc)
            return
        logger.error(
            "operator HTTP: %s failed (%s); the port goes on serving",
            exchange.describe(),
            "connection closed" if exchange.started else "answered 500",
            exc_info=exc,
        )
        if self.metrics is not None:
            self.metrics.contained_errors.labels("http").inc()
        if exchange.started:
            return
        try:
            data = _response(exchange, _Answer(500, _INTERNAL_BODY))
        except h11.LocalProtocolError:
            data = _INTERNAL_RAW
        exchange.started = True
        self._count(500)
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await exchange.stream.send_all(data)

    async def _handle(self, exchange: _Exchange) -> None:
        head = trio.CancelScope(deadline=trio.current_time() + self.limits.head_timeout_s)
        self._reading[exchange] = head
        request = None
        with head:
            request = await self._read_head(exchange)
        self._reading.pop(exchange, None)
        if request is None:
            return  # closed, too slow, made room for another, or answered 4xx already
        if not await self._authorise(exchange, request, head.deadline):
            return  # answered 401, 403, 429 or 503
        kind = self._kind(request)
        if kind is None:
            content = await self._read_body(exchange, MAX_SHORT_BODY_BYTES, head.deadline)
            if content is not None:
                await self._reply(exchange, await self._short_scoped(exchange, request))
            return
        slots = {
            "command": self._command_slots,
            "stream": self._stream_slots,
            "masterdata": self._masterdata_slots,
            "audit": self._masterdata_slots,  # a database read like master data's
            "positions": self._stream_slots,  # the console's position stream
            "console": self.console.slots if self.console is not None else self._command_slots,
        }[kind]
        slot = object()
        try:
            slots.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            detail = f"{slots.total_tokens} {kind} requests are running on this port"
            await self._reply(exchange, _error(503, "busy", detail))
            return
        try:
            await self._long(exchange, request, kind)
        finally:
            slots.release_on_behalf_of(slot)

    def _kind(self, request: h11.Request) -> str | None:
        """Which slot a request needs: ``command``, ``stream``, ``masterdata``, or None for a
        short one (answered at once, without a slot)."""
        method, path = request.method, _path(request)
        if self.command is not None and method == b"POST" and _COMMANDS_PATH.fullmatch(path):
            return "command"
        if self.alerts is not None and method == b"GET" and path == _STREAM_PATH:
            return "stream"
        if (
            self.masterdata is not None
            and method in (b"GET", b"HEAD", b"POST")
            and path in _MASTERDATA_PATHS
        ):
            return "masterdata"
        if (
            self.masterdata is not None
            and method in (b"GET", b"HEAD")
            and _FILING_PATH.fullmatch(path)
        ):
            return "masterdata"
        if self.access is not None and method in (b"GET", b"HEAD") and path == _AUDIT_PATH:
            return "audit"
        return None if self.console is None else self.console.kind(method, path)

    # -- access

    async def _authorise(self, exchange: _Exchange, request: h11.Request, deadline: float) -> bool:
        """Whether the request may go on (public, or its bearer token's account may make it:
        :mod:`ingest.access`); else it is answered 401, 403, 429 (its address failed too often:
        not even checked) or 503 (the accounts cannot be read now)."""
        method = request.method.decode("ascii", "replace")
        route = access.route_of(_path(request).decode("utf-8", "replace"))
        if access.is_public(route, metrics_public=self.metrics_public, method=method):
            return True
        # A bearer token, else the console's session cookie (which a write must back with the
        # console's header: access.forgery_problem).
        token = access.bearer_token(_header(request, b"authorization"))
        by_cookie = False
        if token is None:
            token = access.session_token(_header(request, b"cookie"))
            by_cookie = token is not None
        principal = await self.login(exchange, token)
        if isinstance(principal, _Answer):
            await self._deny(exchange, principal, deadline)
            return False
        exchange.principal = principal
        if not access.allowed(principal, method, route):
            detail = (
                f"{method} {route} needs the {access.required_role(method, route)} role; "
                f"{principal.name} is a {principal.role}"
            )
            await self._deny(exchange, _error(403, "forbidden", detail), deadline)
            return False
        forgery = access.forgery_problem(
            method, by_cookie=by_cookie, console_header=_header(request, access.CONSOLE_HEADER)
        )
        if forgery is not None:
            await self._deny(exchange, _error(403, "forbidden", forgery), deadline)
            return False
        return True

    async def login(self, exchange: _Exchange, token: str | None) -> Principal | _Answer:
        """The account of ``token`` (None: no token given), or the answer refusing it: 429 for
        an address that failed too often (not even checked), 401 (a wrong token counts as a
        failed login of the address), 503 when the accounts cannot be read now."""
        now = trio.current_time()
        if self._logins.locked(phone="", address=exchange.address, now=now):
            if self.metrics is not None:
                self.metrics.http_login_refused.inc()
            detail = "too many requests with a wrong token from this address; try again later"
            return _error(429, "too_many_failures", detail)
        principal = None
        if token is not None and self.access is not None:
            try:
                principal = await self.access.authenticate(token)
            except ServiceUnavailableError as exc:
                return _error(503, "unavailable", str(exc))
        if principal is None:
            if self.metrics is not None:
                reason = "missing" if token is None else "invalid"
                self.metrics.http_login_failures.labels(reason).inc()
            if token is not None:
                self._logins.failure(phone=None, address=exchange.address, now=now)
            return _UNAUTHORISED if token is None else _BAD_TOKEN
        return principal

    async def _deny(self, exchange: _Exchange, answer: _Answer, deadline: float) -> None:
        """Answer a refused request, after reading a short body it sent (so that closing the
        connection does not reset it before the client reads the answer).  A client waiting
        for ``100 Continue`` gets the answer at once, and sends no body."""
        if not exchange.conn.they_are_waiting_for_100_continue:
            with trio.move_on_after(max(0.0, deadline - trio.current_time())):
                with contextlib.suppress(h11.RemoteProtocolError):
                    await _body(exchange, MAX_SHORT_BODY_BYTES)
        await self._reply(exchange, answer)

    def _actor(self, exchange: _Exchange) -> Actor | None:
        principal = exchange.principal
        return None if principal is None else Actor(name=principal.name, source=exchange.address)

    async def _short_scoped(self, exchange: _Exchange, request: h11.Request) -> _Answer:
        """:meth:`_short`, with ``/terminals`` limited to a unit-bound principal's unit."""
        answer = self._short(request)
        principal = exchange.principal
        if answer.status != 200 or _path(request) != b"/terminals":
            return answer
        if principal is None or principal.unit is None:
            return answer
        try:
            vehicles = [] if self.masterdata is None else await self.masterdata.vehicles()
        except ServiceUnavailableError as exc:
            return _error(503, "unavailable", str(exc))
        phones = access.phones_of_unit(principal, vehicles)
        return _Answer(
            200,
            _json([t for t in self.terminals() if str(t.get("phone", "")).lstrip("0") in phones]),
        )

    # -- reading

    async def _read_head(self, exchange: _Exchange) -> h11.Request | None:
        """The request head; None if the client closed first or sent no HTTP (answered 4xx)."""
        conn = exchange.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reply(exchange, _protocol_error(exc))
                return None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await exchange.stream.receive_some(RECV_BYTES)))
            elif isinstance(event, h11.Request):
                exchange.request = event
                problem = _head_problem(event, self.limits)
                if problem is not None:
                    await self._reply(exchange, _error(431, "bad_request", problem))
                    return None
                return event
            else:
                return None  # ConnectionClosed: it left without asking anything

    async def _read_body(self, exchange: _Exchange, cap: int, deadline: float) -> bytes | None:
        """The request's body by ``deadline``; None when the request was answered instead (413
        past ``cap``, 400 for a malformed body) or the client was too slow (closed)."""
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                content = await _body(exchange, cap)
            except h11.RemoteProtocolError as exc:
                await self._reply(exchange, _protocol_error(exc))
                return None
        if scope.cancelled_caught:
            logger.debug("operator HTTP: %s: body too slow; closed", exchange.describe())
            return None
        if content is None:
            await self._reply(
                exchange, _Answer(413, _json({"error": "request body too large", "max": cap}))
            )
        return content

    # -- answering

    async def _reply(self, exchange: _Exchange, answer: _Answer) -> None:
        """Send a whole response (no body for HEAD) within the timeout."""
        data = _response(exchange, answer)
        exchange.started = True
        self._count(answer.status)
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            await exchange.stream.send_all(data)

    def _count(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.http_requests.labels(str(status)).inc()

    def _short(self, request: h11.Request) -> _Answer:
        """The answer to a request that needs no slot (see :meth:`_kind`)."""
        method, path = request.method, _path(request)
        page = None if self.console is None else self.console.static(request)
        if page is not None:
            return page
        if _COMMANDS_PATH.fullmatch(path):
            return _NOT_FOUND if self.command is None else _not_allowed("POST")
        if path in _MASTERDATA_PATHS:
            return _NOT_FOUND if self.masterdata is None else _not_allowed("GET, HEAD, POST")
        if _FILING_PATH.fullmatch(path):
            return _NOT_FOUND if self.masterdata is None else _not_allowed("GET, HEAD")
        if path == _STREAM_PATH:
            return _NOT_FOUND if self.alerts is None else _not_allowed("GET")
        if path == _AUDIT_PATH:
            return _NOT_FOUND if self.access is None else _not_allowed("GET, HEAD")
        if method not in (b"GET", b"HEAD"):
            return _not_allowed("GET, HEAD")
        if path == b"/metrics":
            return _Answer(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path == b"/healthz":
            return self._health()
        if path == b"/terminals":
            return _Answer(200, _json(self.terminals()))
        return _NOT_FOUND

    def _health(self) -> _Answer:
        if self.health is not None:
            report = dict(self.health())
            status = report.get("status")
            code = HEALTH_STATUSES.get(status) if isinstance(status, str) else None
            if code is None:  # the callable's bug: contained, answered 500
                known = ", ".join(HEALTH_STATUSES)
                raise ValueError(f"health status {status!r} is not one of {known}")
            return _Answer(code, _json(report))
        if self.healthy is None or self.healthy():
            return _Answer(200, _json({"status": "ok"}))
        return _Answer(503, _json({"status": "unavailable"}))

    # -- long-running requests

    async def _long(self, exchange: _Exchange, request: h11.Request, kind: str) -> None:
        if kind in ("stream", "positions"):
            owner = self.stream_owner(exchange)
            cap = self.limits.max_streams_per_user
            if not self._stream_owners.try_add(owner, cap):
                detail = f"{cap} streams are open for {owner} on this port"
                await self._reply(exchange, _error(429, "too_many_streams", detail))
                return
            try:
                if kind == "positions":
                    assert self.console is not None
                    await self.console.serve(self, exchange, request, kind)
                else:
                    assert self.alerts is not None
                    await self._alert_stream(exchange, request, self.alerts)
            finally:
                self._stream_owners.remove(owner)
            return
        if kind == "console":
            assert self.console is not None
            await self.console.serve(self, exchange, request, kind)
            return
        path = _path(request)
        limits = self.limits
        cap = limits.max_body_bytes if kind == "command" else limits.max_masterdata_body_bytes
        content = await self._read_body(exchange, cap, trio.current_time() + limits.body_timeout_s)
        if content is None:
            return
        if kind == "command":
            match = _COMMANDS_PATH.fullmatch(path)
            assert match is not None
            phone = match.group(1).decode("ascii", "replace")
            answer = await self._command(exchange, phone, content)
        elif kind == "audit":
            answer = await self._audit(exchange, request)
        else:
            answer = await self._masterdata(exchange, request, path, content)
        await self._reply(exchange, answer)

    async def _command(self, exchange: _Exchange, phone: str, content: bytes) -> _Answer:
        assert self.command is not None
        try:
            document = parse_json(content)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if not isinstance(document, dict):
            return _error(400, "bad_request", 'expected {"msg_id": ..., "body": {...}}')
        unknown = sorted(set(document) - {"msg_id", "body"})
        if unknown or "msg_id" not in document:
            detail = f"unknown key(s) {', '.join(unknown)}" if unknown else "msg_id is required"
            return _error(400, "bad_request", detail)
        try:
            refused = await self._command_refused(exchange, phone, document)
            if refused is not None:
                return refused
            result = await self.command(phone, document["msg_id"], document.get("body"))
        except CommandError as error:
            return _Answer(error.status, _json(error.to_json()))
        except ServiceUnavailableError as exc:
            return _error(503, "unavailable", str(exc))
        return _Answer(200, _json(result))

    async def _command_refused(
        self, exchange: _Exchange, phone: str, document: Mapping[str, Any]
    ) -> _Answer | None:
        """403 for a terminal of another unit than the principal's; else None, once the
        command is in the audit trail (a command that cannot be recorded is not sent)."""
        principal = exchange.principal
        if principal is None:
            return None
        if principal.unit is not None:
            vehicles = None if self.masterdata is None else await self.masterdata.vehicles()
            if not access.may_command(principal, phone, vehicles):
                detail = f"terminal {phone[:20]} is not fitted to a vehicle of {principal.unit}"
                return _error(403, "forbidden", detail)
        actor = self._actor(exchange)
        if self.access is not None and actor is not None:
            entry = AuditEntry(
                actor=actor,
                action="command.send",
                kind="terminal",
                key=phone[:40],
                unit=principal.unit,
                after={"msg_id": document["msg_id"], "body": document.get("body")},
            )
            await self.access.record(entry)
        return None

    async def _masterdata(
        self, exchange: _Exchange, request: h11.Request, path: bytes, content: bytes
    ) -> _Answer:
        admin = self.masterdata
        assert admin is not None
        principal = exchange.principal
        try:
            one = _FILING_PATH.fullmatch(path)
            if one is not None:
                return await _one_filing(admin, int(one.group(1)), principal)
            if request.method in (b"GET", b"HEAD"):
                try:
                    since = _masterdata_query(request, path)
                except ValueError as exc:
                    return _error(400, "bad_request", str(exc))
                document = await _read_masterdata(admin, path, since)
                if principal is not None and principal.unit is not None:
                    document = await _scoped_read(admin, path, document, principal)
                return _Answer(200, _json(document))
            try:
                document = _masterdata_document(path, parse_json(content))
            except ValueError as exc:
                return _error(400, "bad_request", str(exc))
            if principal is not None:
                problems = await _write_problems(admin, path, document, principal)
                if problems:
                    detail = f"{principal.name} may not write this; nothing stored"
                    body = {"error": "forbidden", "detail": detail, "problems": problems}
                    return _Answer(403, _json(body))
            actor = self._actor(exchange)
            if path == b"/fences":
                ids = await admin.add_fences(document, actor=actor)
            elif path == b"/filings":
                ids = await admin.add_filings(document, actor=actor)
            else:
                ids = await admin.add_vehicles(document, actor=actor)
        except MasterDataRejected as exc:
            detail = f"{len(exc.problems)} problem(s), nothing stored"
            body = {"error": "invalid", "detail": detail, "problems": list(exc.problems)}
            return _Answer(400, _json(body))
        except ServiceUnavailableError as exc:
            return _error(503, "unavailable", str(exc))
        return _Answer(201, _json({"ids": ids}))

    async def _audit(self, exchange: _Exchange, request: h11.Request) -> _Answer:
        """``GET /audit?since=ISO&user=U&limit=N``: the audit trail, oldest first (an admin
        bound to a unit sees the rows about its unit)."""
        assert self.access is not None
        principal = exchange.principal
        try:
            since, user, limit = _audit_query(request)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        unit = None if principal is None else principal.unit
        try:
            rows = await self.access.audit(since=since, user=user, unit=unit, limit=limit)
        except ServiceUnavailableError as exc:
            return _error(503, "unavailable", str(exc))
        return _Answer(200, _json(rows))

    async def _alert_stream(
        self, exchange: _Exchange, request: h11.Request, feed: AlertFeed
    ) -> None:
        try:
            filters, after = _stream_params(request, feed.vocabulary)
        except UnknownAlertValueError as exc:
            await self._reply(exchange, _unknown_value(exc))
            return
        except ValueError as exc:
            await self._reply(exchange, _error(400, "bad_request", str(exc)))
            return
        if exchange.principal is not None:
            try:
                unit = access.alert_unit(exchange.principal, filters.unit)
            except ValueError as exc:
                await self._reply(exchange, _error(403, "forbidden", str(exc)))
                return
            filters = dataclasses.replace(filters, unit=unit)
        try:
            # Also the probe that the feed answers at all, before the 200 goes out.
            head_seq = await feed.last_seq()
        except ServiceUnavailableError as exc:
            await self._reply(exchange, _error(503, "unavailable", str(exc)))
            return
        cursor = head_seq if after is None else after
        async with trio.open_nursery() as nursery:
            # The client says nothing after its request: end of input means it left, and its
            # stream slot is freed at once instead of at the next heartbeat.
            nursery.start_soon(_until_closed, exchange.stream, nursery.cancel_scope)
            await self._send_events(exchange, feed, filters, cursor, nursery)
            nursery.cancel_scope.cancel()

    async def _send_events(
        self,
        exchange: _Exchange,
        feed: AlertFeed,
        filters: AlertFilter,
        cursor: int,
        nursery: trio.Nursery,
    ) -> None:
        """The 200 and the events; heartbeats from a task started in ``nursery``, which is
        cancelled when they find the client too slow."""
        headers = [
            ("content-type", EVENT_STREAM),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),  # nginx: pass events on at once
            ("connection", "close"),
        ]
        # No content-length: h11 sends the body chunked (or until close to an HTTP/1.0 client).
        head = exchange.conn.send(h11.Response(status_code=200, headers=headers)) or b""
        exchange.started = True
        self._count(200)
        body = _EventBody(exchange.conn, exchange.stream)
        if not await body.send(b": alert stream\n\n", head=head):
            return
        nursery.start_soon(body.heartbeats, self.heartbeat_s, nursery.cancel_scope)
        try:
            await _stream_events(body, feed, filters, cursor)
        except ServiceUnavailableError as exc:
            # Ended rather than retried here: the client resumes with Last-Event-ID when the
            # feed is back, and a stream does not hold its slot through an outage.
            logger.warning("alert stream ended: %s", exc)
            await body.end()


class _EventBody:
    """The body of one alert stream's response, written by two tasks (events, heartbeats).

    A socket takes one sender at a time and h11 must frame chunks in the order they are sent,
    so each write holds the lock.  The time of the last write paces the heartbeats.
    """

    __slots__ = ("_conn", "_ended", "_lock", "_stream", "last_write")

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._lock = trio.Lock()
        self._ended = False
        self.last_write = trio.current_time()

    async def send(self, data: bytes, *, head: bytes = b"") -> bool:
        """Send ``data`` as one chunk, after ``head`` (the response head) if given; False if
        the client is too slow to take it (it is then dropped) or the body has ended."""
        async with self._lock:
            # A heartbeat handed the lock as the body ends must not write past its end (h11
            # would raise): taking a lock handed over is no checkpoint, so the cancellation
            # that follows the end has not reached it yet.
            if self._ended:
                return False
            sent = await _send(self._stream, head + _chunk(self._conn, data))
            self.last_write = trio.current_time()
        return sent

    async def end(self) -> None:
        """End the body (the client sees a complete response)."""
        async with self._lock:
            self._ended = True
            await _send(self._stream, self._conn.send(h11.EndOfMessage()) or b"")

    async def heartbeats(self, interval_s: float, done: trio.CancelScope) -> None:
        """Send a comment whenever ``interval_s`` pass without a write.  Paced by the clock
        alone: a feed that polls (and returns after each quiet poll) or one whose events the
        filters pass over must not hold the heartbeat back.  Cancels ``done`` once the client
        is too slow to take one."""
        while True:
            await trio.sleep_until(self.last_write + interval_s)
            if trio.current_time() < self.last_write + interval_s:
                continue  # an event went out meanwhile: the interval starts again from it
            if not await self.send(b": heartbeat\n\n"):
                done.cancel()
                return


async def _stream_events(
    body: _EventBody, feed: AlertFeed, filters: AlertFilter, cursor: int
) -> None:
    """Send events after ``cursor`` as they come, until the client is too slow to take one
    (returns) or the feed fails (raises)."""
    while True:
        head_seq = await feed.last_seq()
        events = await feed.events_after(cursor, STREAM_BATCH, filters)
        if events:
            text = b"".join(b"id: %d\ndata: %s\n\n" % (seq, _json(alert)) for seq, alert in events)
            if not await body.send(text):
                return
        if len(events) >= STREAM_BATCH:
            cursor = events[-1][0]
            continue
        # Every event up to ``head_seq`` was seen: skip the ones the filters passed over, so
        # they do not wake this stream again.  An event committed after ``head_seq`` was read
        # may have been sent too: never step back behind it (it would be sent twice).
        cursor = max(cursor, head_seq, events[-1][0] if events else 0)
        await feed.wait_for_new(cursor)


# ---------------------------------------------------------------------------------------------
# Request parts


async def _body(exchange: _Exchange, cap: int) -> bytes | None:
    """The body of the request just read (None past ``cap``); h11.RemoteProtocolError for a
    malformed one.  The caller bounds the time."""
    conn = exchange.conn
    assert exchange.request is not None
    for name, value in exchange.request.headers:
        if name == b"content-length" and int(value) > cap:  # h11 checked it is digits
            return None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:  # curl asks before larger bodies
                continuing = h11.InformationalResponse(status_code=100, headers=[])
                await exchange.stream.send_all(conn.send(continuing) or b"")
            conn.receive_data(bytes(await exchange.stream.receive_some(RECV_BYTES)))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > cap:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:  # pragma: no cover - h11 raises for a body cut short
            raise h11.RemoteProtocolError(f"unexpected {event!r} in the request body")


def _default_limits() -> HttpLimits:
    """The caps by this module's names of them (read when a port is built, so a test may
    change one here first)."""
    return HttpLimits(
        max_head_bytes=MAX_REQUEST_HEAD_BYTES,
        max_headers=MAX_REQUEST_HEADERS,
        head_timeout_s=HEAD_TIMEOUT_S,
        body_timeout_s=REQUEST_TIMEOUT_S,
        max_body_bytes=MAX_REQUEST_BODY_BYTES,
        max_masterdata_body_bytes=MAX_MASTERDATA_BODY_BYTES,
        max_connections=MAX_OPEN_CONNECTIONS,
        max_connections_per_address=min(MAX_CONNECTIONS_PER_ADDRESS, MAX_OPEN_CONNECTIONS),
        max_streams=MAX_STREAMS,
        max_streams_per_user=min(MAX_STREAMS_PER_USER, MAX_STREAMS),
    )


def _head_problem(request: h11.Request, limits: HttpLimits) -> str | None:
    """Why a whole head is too large (None: it is not).  h11 refuses a head that grows past
    ``max_head_bytes`` while incomplete; one that arrived whole in a single read is measured
    here (its parts as sent, bar a few bytes of separators)."""
    if len(request.headers) > limits.max_headers:
        return f"more than {limits.max_headers} header fields"
    size = len(request.method) + len(request.target) + 11  # " " " HTTP/1.1" CRLF
    size += sum(len(name) + len(value) + 4 for name, value in request.headers)  # ": " CRLF
    if size > limits.max_head_bytes:
        return f"request head larger than {limits.max_head_bytes} bytes"
    return None


def _peer_address(stream: trio.SocketStream) -> str:
    """The client's address (without its port), the key of the per-address caps."""
    try:
        peer = stream.socket.getpeername()
    except OSError:  # it has gone already: it will not be served long enough to matter
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _path(request: h11.Request) -> bytes:
    return request.target.split(b"?", 1)[0]


def _masterdata_query(request: h11.Request, path: bytes) -> datetime | None:
    """``since`` of a master-data GET (None: not given); ValueError for bad parameters."""
    _, _, query = request.target.partition(b"?")
    params = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=False)
    known = {"since"} if path == b"/filings" else set()
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {sorted(known)}")
    if "since" not in params:
        return None
    text = params["since"][-1]
    try:
        since = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since must be an ISO 8601 time, got {text[:60]!r}") from None
    return since if since.tzinfo is not None else since.replace(tzinfo=CHINA)


async def _read_masterdata(admin: MasterDataAdmin, path: bytes, since: datetime | None) -> Any:
    if path == b"/vehicles":
        return await admin.vehicles()
    if path == b"/fences":
        return await admin.fences()
    return await admin.filings(since)


async def _units(admin: MasterDataAdmin) -> dict[str, str]:
    """plate -> unit of every vehicle."""
    return {str(v["plate"]): str(v["unit"]) for v in await admin.vehicles()}


async def _one_filing(
    admin: MasterDataAdmin, filing_id: int, principal: Principal | None
) -> _Answer:
    """``GET /filings/{id}``: the filing and every version of it (migration 13); 404 when there
    is none, or when it is another unit's vehicle's (a unit-bound principal)."""
    found = await admin.filing(filing_id)
    if (
        found is not None
        and principal is not None
        and principal.unit is not None
        and not access.visible_by_plate(principal, [found], await _units(admin))
    ):
        found = None
    if found is None:
        return _error(404, "not_found", f"no filing {filing_id}")
    return _Answer(200, _json(found))


async def _scoped_read(
    admin: MasterDataAdmin, path: bytes, document: Any, principal: Principal
) -> Any:
    """A master-data list as a unit-bound principal sees it (fences are every unit's)."""
    if path == b"/vehicles":
        return access.visible(principal, document)
    if path == b"/filings":
        return access.visible_by_plate(principal, document, await _units(admin))
    return document


async def _write_problems(
    admin: MasterDataAdmin, path: bytes, document: Any, principal: Principal
) -> list[str]:
    """Why the principal may not make this write (:mod:`ingest.access`); empty: it may."""
    if principal.unit is None:
        return []
    if path == b"/fences":
        return access.fence_write_problems(principal)
    units = await _units(admin)
    if path == b"/vehicles":
        return access.vehicle_write_problems(principal, document, units)
    return access.filing_write_problems(principal, document, units)


def _audit_query(request: h11.Request) -> tuple[datetime | None, str | None, int]:
    """``since``, ``user`` and ``limit`` of a ``GET /audit``; ValueError for bad ones."""
    _, _, query = request.target.partition(b"?")
    params = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=False)
    known = {"since", "user", "limit"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {sorted(known)}")
    one = {key: values[-1] for key, values in params.items()}
    since = None
    if "since" in one:
        try:
            since = datetime.fromisoformat(one["since"])
        except ValueError:
            raise ValueError(f"since must be an ISO 8601 time, got {one['since'][:60]!r}") from None
        since = since if since.tzinfo is not None else since.replace(tzinfo=CHINA)
    limit = MAX_AUDIT_ROWS
    if "limit" in one:
        found = bounded_int(one["limit"], 1, MAX_AUDIT_ROWS)
        if found is None:
            raise ValueError(f"limit must be 1 to {MAX_AUDIT_ROWS}")
        limit = found
    return since, one.get("user"), limit


def bounded_int(text: str, low: int, high: int) -> int | None:
    """The decimal number ``text`` when it is one from ``low`` to ``high`` (None otherwise).

    ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses), and the value is
    what is compared, not a prefix of the text: "0000000011000000" is eleven million, which a
    check of its first nine characters took for 1.  Leading zeros are dropped before ``int``
    sees the text, so a long run of them is no digit-limit error either.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if low <= value <= high else None


def _header(request: h11.Request, name: bytes) -> bytes | None:
    """The last value of header ``name`` (lower case, as h11 gives names)."""
    value = None
    for key, field in request.headers:
        if key == name:
            value = field
    return value


def _masterdata_document(path: bytes, document: Any) -> Any:
    """The posted document in the shape its endpoint takes; ValueError otherwise."""
    if path == b"/fences":
        if not isinstance(document, dict):
            raise ValueError("expected a GeoJSON FeatureCollection object")
        return document
    if isinstance(document, dict) and path == b"/filings":
        document = [document]
    if not isinstance(document, list):
        what = "a filing object or a list" if path == b"/filings" else "a list"
        raise ValueError(f"expected {what} of objects")  # noqa: TRY004 - answered 400
    return document


def _stream_params(
    request: h11.Request, vocabulary: AlertVocabulary
) -> tuple[AlertFilter, int | None]:
    """Filters and the resume point of an ``/alerts/stream`` request; ValueError if bad
    (:class:`UnknownAlertValueError` for a rule or state outside ``vocabulary``)."""
    _, _, query = request.target.partition(b"?")
    params = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=False)
    known = {"unit", "rule", "state", "severity", "after"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {sorted(known)}")
    one = {key: values[-1] for key, values in params.items()}
    after_text: str | None = one.pop("after", None)
    for name, value in request.headers:
        if name == b"last-event-id":  # h11 lower-cases header names
            after_text = value.decode("ascii", "replace").strip() or after_text
    after = None
    if after_text is not None:
        if not _EVENT_ID.fullmatch(after_text):
            raise ValueError(f"event id {after_text[:40]!r} is not a sequence number")
        after = int(after_text)
    filters = AlertFilter(**one)
    vocabulary.check(filters)
    return filters, after


# ---------------------------------------------------------------------------------------------
# JSON bodies

# A JSON string token: from a quote through escapes to the closing quote, or to the end of the
# input when it has none.  Unambiguous, so matching is linear (possessive: no backtracking
# state is kept, which makes escape-heavy input 20 times cheaper); applied left to right it
# splits valid JSON exactly as a parser does (outside strings a quote always opens one).
_STRING_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
# Opening brackets as +1, closing as -1 (as signed bytes); every other byte is dropped.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
# Depth is tracked this many brackets at a time, so a deep document is refused after one
# chunk rather than after a walk of all of it.
_DEPTH_CHUNK = 64 * 1024


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether the JSON text ``data`` (UTF-8) nests arrays and objects deeper than ``limit``.

    Brackets inside strings do not count.  Exact for valid JSON; for invalid JSON it counts the
    prefix a parser would read before failing the same way, so a text it passes cannot make a
    parser nest deeper.  Linear time, in C loops.
    """
    steps = memoryview(_STRING_TOKEN.sub(b"", data).translate(_STEPS, _NOT_BRACKETS)).cast("b")
    depth = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        chunk = steps[start : start + _DEPTH_CHUNK]
        if max(itertools.accumulate(chunk, initial=depth)) > limit:
            return True
        depth += sum(chunk)
    return False


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(content: bytes) -> Any:
    """The JSON document of a request body.

    ValueError, its message fit for the answer's detail, for anything else: not UTF-8 (RFC
    8259 8.1), not JSON, nested deeper than :data:`MAX_JSON_DEPTH` (refused before parsing, so
    nesting cannot exhaust the stack), NaN or infinite numbers (JSON has none), an integer past
    Python's digit limit.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not JSON: the body is not UTF-8 ({exc})") from None
    if json_depth_exceeds(content, MAX_JSON_DEPTH):
        raise ValueError(f"not JSON we take: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:  # cannot happen below the depth cap; a backstop all the same
        raise ValueError(f"not JSON we take: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, the digit limit, non-finite numbers
        raise ValueError(f"not JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Answers


def _json(value: Any) -> bytes:
    # backslashreplace: an unpaired surrogate (from a JSON "\ud800" echoed in a detail) cannot
    # be UTF-8, and comes out as the JSON escape it came in as.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _error(status: int, kind: str, detail: str) -> _Answer:
    return _Answer(status, _json({"error": kind, "detail": detail}))


def _unknown_value(exc: UnknownAlertValueError) -> _Answer:
    """400 naming the filter value no alert carries, and the values that exist."""
    body = {
        "error": "bad_request",
        "detail": str(exc),
        "parameter": exc.field,
        "value": exc.value[:200],  # a query value may be up to a head long: echo a prefix
        "valid": list(exc.valid),
    }
    return _Answer(400, _json(body))


def _protocol_error(exc: h11.RemoteProtocolError) -> _Answer:
    """The answer to a request h11 could not read: 400 or 431, or 501 for a transfer coding
    other than chunked."""
    status = exc.error_status_hint
    return _error(status, "not_implemented" if status == 501 else "bad_request", str(exc))


def _not_allowed(allow: str) -> _Answer:
    return _Answer(405, _json({"error": "method not allowed", "allow": allow}), allow=allow)


_NOT_FOUND = _Answer(404, _json({"error": "not found"}))
# RFC 6750 3: a request without credentials gets the scheme; one with a bad token its error.
_UNAUTHORISED = _Answer(
    401,
    _json(
        {"error": "unauthorized", "detail": "an operator token is needed (Authorization: Bearer)"}
    ),
    headers=(("www-authenticate", 'Bearer realm="jt808"'),),
)
_BAD_TOKEN = _Answer(
    401,
    _json({"error": "unauthorized", "detail": "the token is unknown, expired or revoked"}),
    headers=(("www-authenticate", 'Bearer realm="jt808", error="invalid_token"'),),
)


def _response(exchange: _Exchange, answer: _Answer) -> bytes:
    """The bytes of a whole response through h11 (no body for a HEAD request)."""
    conn = exchange.conn
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
    ]
    if answer.allow is not None:
        headers.append(("allow", answer.allow))
    headers.extend(answer.headers)
    data = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
    request = exchange.request
    if request is None or request.method != b"HEAD":
        data += conn.send(h11.Data(data=answer.body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


def _peer_fault(exc: BaseException) -> bool:
    """Whether ``exc`` (or every error of a group) is the client's doing: it went away, or
    its HTTP broke where no answer could be sent."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_peer_fault(e) for e in exc.exceptions)
    return isinstance(
        exc, trio.BrokenResourceError | trio.ClosedResourceError | h11.RemoteProtocolError
    )


async def _until_closed(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client closes its side (anything it sends is discarded)."""
    try:
        while await stream.receive_some(RECV_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


def _chunk(conn: h11.Connection, data: bytes) -> bytes:
    return conn.send(h11.Data(data=data)) or b""


async def _send(stream: trio.abc.Stream, data: bytes) -> bool:
    """Send within the timeout; False if the client is too slow (it is then dropped)."""
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        await stream.send_all(data)
        return True
    logger.info("alert stream client too slow: disconnected")
    return False
