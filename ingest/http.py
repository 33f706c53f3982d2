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
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest.commands import CommandBusyError, CommandError

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

JSON = "application/json"
_COMMANDS_PATH = re.compile(rb"/terminals/([^/]+)/commands")

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
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.terminals = terminals
        self.healthy = healthy
        self.command = command
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
        elif isinstance(event, h11.Data) and request is not None:
            body += event.data
            if len(body) > MAX_REQUEST_BODY_BYTES:
                return request, None
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")
