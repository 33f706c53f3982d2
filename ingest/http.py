"""The operator HTTP port: ``/metrics``, ``/healthz``, ``/terminals`` and commands.

A few endpoints on top of h11 (the HTTP/1.1 state machine; we parse nothing ourselves).
One request per connection (``Connection: close``), which is all Prometheus scrapes and
operators' curl need.

* ``GET /metrics`` -- the Prometheus text exposition of the server's registry.
* ``GET /healthz`` -- 200 ``{"status": "ok"}`` while the server accepts terminals, else 503.
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
  else it starts with the next event.  A comment line every :data:`HEARTBEAT_S` keeps proxies
  from closing an idle stream.  At most :data:`MAX_STREAMS` streams run at once (more are
  answered 503); a client that does not take an event within :data:`REQUEST_TIMEOUT_S` is
  disconnected (nothing is buffered for it beyond the socket's own buffer).  404 when the node
  runs no alert feed.
* Master data (when the node has a :class:`~ingest.interfaces.MasterDataAdmin`, else 404):
  ``POST /vehicles`` (a JSON list of vehicle objects), ``POST /fences`` (a GeoJSON
  FeatureCollection) and ``POST /filings`` (one filing object or a list) answer 201 with
  ``{"ids": [...]}`` in input order once the change is in effect (no restart);
  ``GET /vehicles`` (list), ``GET /fences`` (FeatureCollection) and ``GET /filings`` (list;
  ``?since=ISO`` keeps filings ending at or after it, China time without an offset).  Bad
  JSON or shape is 400 ``{"error": "bad_request", "detail"}``; refused data is 400
  ``{"error": "invalid", "detail", "problems": [...]}`` listing every problem, and nothing is
  stored.  The object formats are :class:`~ingest.interfaces.MasterDataAdmin`'s.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest.commands import CommandBusyError, CommandError
from ingest.interfaces import AlertFeed, AlertFilter, MasterDataAdmin, MasterDataRejected

logger = logging.getLogger(__name__)

# A request is a GET line and a few headers; h11 refuses heads past this size.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
RECV_BYTES = 4096
# Operators and one or two scrapers: 32 concurrent requests is plenty, and bounds tasks.
MAX_CONNECTIONS = 32
# Commands wait for their terminal up to the whole retransmission schedule; at most half the
# connections may do so, so that scrapes and health checks always find room.  More are
# answered 503 "busy".
MAX_COMMANDS = MAX_CONNECTIONS // 2
# A slow client gets this long to send its request, and again to take the response (a
# command's own wait for the terminal is bounded by its retransmission schedule).
REQUEST_TIMEOUT_S = 10.0
# A command body is a few fields; a 0x8108 firmware package or a long route given as JSON hex
# is the largest, and 1 MiB holds far more than one such command's 64 Ki packages need.
MAX_REQUEST_BODY_BYTES = 1024 * 1024
# Master data is posted in bulk: a fence set of 1,000 polygons of ~100 vertices is ~4 MB of
# GeoJSON, and a year of a unit's filings a few MB.  16 MiB holds that with room and still
# bounds what one request may make us hold (four such requests are 64 MiB).
MAX_MASTERDATA_BODY_BYTES = 16 * 1024 * 1024
# Alert streams hold their connection for as long as the operator watches: a quarter of the
# connections (a few operators' ``alerts tail`` and a dashboard or two), so that scrapes,
# health checks and commands always find room.  More are answered 503.
MAX_STREAMS = MAX_CONNECTIONS // 4
# A comment line on an idle stream this often: common proxies close a response idle for 60 s
# (nginx ``proxy_read_timeout``), and the client's read timeout can be a few of these.
HEARTBEAT_S = 15.0
# Events read from the feed per round: bounds one round's memory, ~100 KB of JSON.
STREAM_BATCH = 100
EVENT_STREAM = "text/event-stream"

JSON = "application/json"
_COMMANDS_PATH = re.compile(rb"/terminals/([^/]+)/commands")
_MASTERDATA_PATHS = frozenset({b"/vehicles", b"/fences", b"/filings"})
# Filing times without an offset are China time, as in the CSV import.
CHINA = timezone(timedelta(hours=8))

# (phone, msg_id, body) -> JSON answer; raises CommandError subclasses.
CommandRunner = Callable[[str, object, object], Awaitable[dict[str, Any]]]


class OperatorHttp:
    """Serves the operator endpoints.  Start :meth:`run` with ``nursery.start``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        terminals: Callable[[], list[dict[str, Any]]],
        healthy: Callable[[], bool],
        command: CommandRunner | None = None,
        alerts: AlertFeed | None = None,
        masterdata: MasterDataAdmin | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.terminals = terminals
        self.healthy = healthy
        self.command = command
        self.alerts = alerts
        self.masterdata = masterdata
        self._stream_slots = trio.CapacityLimiter(MAX_STREAMS)
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._command_slots = trio.CapacityLimiter(MAX_COMMANDS)

    async def run(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound port(s)."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        logger.info("operator HTTP on %s port(s) %s", self.host, ports)
        async with trio.open_nursery() as nursery:
            task_status.started(ports)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            self._limiter.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            logger.debug("operator HTTP client dropped: %r", exc)
        finally:
            self._limiter.release_on_behalf_of(stream)
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
            received = await _read_request(conn, stream)
        if scope.cancelled_caught or received is None:
            return  # too slow, closed, or nothing usable
        request, content = received
        path = request.target.split(b"?", 1)[0]
        if request.method == b"GET" and path == b"/alerts/stream" and self.alerts is not None:
            await self._alert_stream(conn, stream, request, self.alerts)
            return
        if content is None:
            status, content_type, body = 413, JSON, _json({"error": "request body too large"})
        else:
            status, content_type, body = await self._respond(request, content)
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        response = h11.Response(status_code=status, headers=headers)
        data = conn.send(response) or b""
        if request.method != b"HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            await stream.send_all(data)

    async def _respond(self, request: h11.Request, content: bytes) -> tuple[int, str, bytes]:
        path = request.target.split(b"?", 1)[0]
        match = _COMMANDS_PATH.fullmatch(path)
        if match is not None:
            if request.method != b"POST":
                return 405, JSON, _json({"error": "method not allowed", "allow": "POST"})
            return await self._command(match.group(1).decode("ascii", "replace"), content)
        if path in _MASTERDATA_PATHS:
            return await self._masterdata(request, path, content)
        if request.method not in (b"GET", b"HEAD"):
            return 405, JSON, _json({"error": "method not allowed"})
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == b"/healthz":
            if self.healthy():
                return 200, JSON, _json({"status": "ok"})
            return 503, JSON, _json({"status": "unavailable"})
        if path == b"/terminals":
            return 200, JSON, _json(self.terminals())
        return 404, JSON, _json({"error": "not found"})

    async def _alert_stream(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, feed: AlertFeed
    ) -> None:
        try:
            filters, after = _stream_params(request)
        except ValueError as exc:
            await _send_whole(
                conn, stream, 400, _json({"error": "bad_request", "detail": str(exc)})
            )
            return
        slot = object()
        try:
            self._stream_slots.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            detail = f"{MAX_STREAMS} alert streams are open on this port"
            await _send_whole(conn, stream, 503, _json({"error": "busy", "detail": detail}))
            return
        try:
            await self._serve_stream(conn, stream, feed, filters, after)
        finally:
            self._stream_slots.release_on_behalf_of(slot)

    async def _serve_stream(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        feed: AlertFeed,
        filters: AlertFilter,
        after: int | None,
    ) -> None:
        async with trio.open_nursery() as nursery:
            # The client says nothing after its request: end of input means it left, and its
            # stream slot is freed at once instead of at the next heartbeat.
            nursery.start_soon(_until_closed, stream, nursery.cancel_scope)
            await self._send_events(conn, stream, feed, filters, after)
            nursery.cancel_scope.cancel()

    async def _send_events(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        feed: AlertFeed,
        filters: AlertFilter,
        after: int | None,
    ) -> None:
        cursor = await feed.last_seq() if after is None else after
        headers = [
            ("content-type", EVENT_STREAM),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),  # nginx: pass events on at once
            ("connection", "close"),
        ]
        # No content-length: h11 sends the body chunked (or until close to an HTTP/1.0 client).
        head = conn.send(h11.Response(status_code=200, headers=headers)) or b""
        if not await _send(stream, head + _chunk(conn, b": alert stream\n\n")):
            return
        while True:
            head_seq = await feed.last_seq()
            events = await feed.events_after(cursor, STREAM_BATCH, filters)
            if events:
                body = b"".join(
                    b"id: %d\ndata: %s\n\n" % (seq, _json(alert)) for seq, alert in events
                )
                if not await _send(stream, _chunk(conn, body)):
                    return
            if len(events) >= STREAM_BATCH:
                cursor = events[-1][0]
                continue
            # Every event up to ``head_seq`` was seen: skip the ones the filters passed over,
            # so they do not wake this stream again.  An event committed after ``head_seq``
            # was read may have been sent too: never step back behind it (it would be sent
            # twice).
            cursor = max(cursor, head_seq, events[-1][0] if events else 0)
            with trio.move_on_after(HEARTBEAT_S) as idle:
                await feed.wait_for_new(cursor)
            if idle.cancelled_caught and not await _send(stream, _chunk(conn, b": heartbeat\n\n")):
                return

    async def _masterdata(
        self, request: h11.Request, path: bytes, content: bytes
    ) -> tuple[int, str, bytes]:
        admin = self.masterdata
        if admin is None:
            return 404, JSON, _json({"error": "not found"})
        try:
            if request.method in (b"GET", b"HEAD"):
                return 200, JSON, _json(await _read_masterdata(admin, request, path))
            if request.method != b"POST":
                return 405, JSON, _json({"error": "method not allowed", "allow": "GET, POST"})
            document = json.loads(content)
            if path == b"/fences":
                if not isinstance(document, dict):
                    raise ValueError("expected a GeoJSON FeatureCollection object")  # noqa: TRY301
                ids = await admin.add_fences(document)
            else:
                if isinstance(document, dict) and path == b"/filings":
                    document = [document]
                if not isinstance(document, list):
                    what = "a filing object or a list" if path == b"/filings" else "a list"
                    raise ValueError(f"expected {what} of objects")  # noqa: TRY301
                add = admin.add_filings if path == b"/filings" else admin.add_vehicles
                ids = await add(document)
        except MasterDataRejected as exc:
            detail = f"{len(exc.problems)} problem(s), nothing stored"
            body = {"error": "invalid", "detail": detail, "problems": list(exc.problems)}
            return 400, JSON, _json(body)
        except UnicodeDecodeError as exc:
            return 400, JSON, _json({"error": "bad_request", "detail": f"not JSON: {exc}"})
        except json.JSONDecodeError as exc:
            return 400, JSON, _json({"error": "bad_request", "detail": f"not JSON: {exc}"})
        except ValueError as exc:
            return 400, JSON, _json({"error": "bad_request", "detail": str(exc)})
        return 201, JSON, _json({"ids": ids})

    async def _command(self, phone: str, content: bytes) -> tuple[int, str, bytes]:
        if self.command is None:
            return 404, JSON, _json({"error": "not found"})
        try:
            document = json.loads(content)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return 400, JSON, _json({"error": "bad_request", "detail": f"not JSON: {exc}"})
        if not isinstance(document, dict):
            detail = 'expected {"msg_id": ..., "body": {...}}'
            return 400, JSON, _json({"error": "bad_request", "detail": detail})
        unknown = sorted(set(document) - {"msg_id", "body"})
        if unknown or "msg_id" not in document:
            detail = f"unknown key(s) {', '.join(unknown)}" if unknown else "msg_id is required"
            return 400, JSON, _json({"error": "bad_request", "detail": detail})
        slot = object()
        try:
            self._command_slots.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            busy = CommandBusyError(f"{MAX_COMMANDS} commands are running on this port")
            return busy.status, JSON, _json(busy.to_json())
        try:
            result = await self.command(phone, document["msg_id"], document.get("body"))
        except CommandError as error:
            return error.status, JSON, _json(error.to_json())
        finally:
            self._command_slots.release_on_behalf_of(slot)
        return 200, JSON, _json(result)


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes | None] | None:
    """The request and its body (None if the body passes the cap); None if the client closed
    or sent nothing usable."""
    request: h11.Request | None = None
    body = bytearray()
    cap = MAX_REQUEST_BODY_BYTES
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:  # curl asks before larger bodies
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            conn.receive_data(await stream.receive_some(RECV_BYTES))
        elif isinstance(event, h11.Request):
            request = event
            if request.target.split(b"?", 1)[0] in _MASTERDATA_PATHS:
                cap = MAX_MASTERDATA_BODY_BYTES
        elif isinstance(event, h11.Data) and request is not None:
            body += event.data
            if len(body) > cap:
                return request, None
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


async def _read_masterdata(admin: MasterDataAdmin, request: h11.Request, path: bytes) -> Any:
    """The answer to a GET of master data; ValueError for bad query parameters."""
    _, _, query = request.target.partition(b"?")
    params = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=False)
    known = {"since"} if path == b"/filings" else set()
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {sorted(known)}")
    if path == b"/vehicles":
        return await admin.vehicles()
    if path == b"/fences":
        return await admin.fences()
    since = None
    if "since" in params:
        text = params["since"][-1]
        try:
            since = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"since must be an ISO 8601 time, got {text!r}") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=CHINA)
    return await admin.filings(since)


def _stream_params(request: h11.Request) -> tuple[AlertFilter, int | None]:
    """Filters and the resume point of an ``/alerts/stream`` request; ValueError if bad."""
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
        if not after_text.isdigit():
            raise ValueError(f"event id {after_text!r} is not a sequence number")
        after = int(after_text)
    return AlertFilter(**one), after


async def _until_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client closes its side (anything it sends is discarded)."""
    try:
        while await stream.receive_some(RECV_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


def _chunk(conn: h11.Connection, data: bytes) -> bytes:
    return conn.send(h11.Data(data=data)) or b""


async def _send(stream: trio.SocketStream, data: bytes) -> bool:
    """Send within the timeout; False if the client is too slow (it is then dropped)."""
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        await stream.send_all(data)
        return True
    logger.info("alert stream client too slow: disconnected")
    return False


async def _send_whole(
    conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes
) -> None:
    headers = [("content-type", JSON), ("content-length", str(len(body))), ("connection", "close")]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await _send(stream, data)


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")
