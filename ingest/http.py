"""The operator HTTP port: ``/metrics``, ``/healthz`` and ``/terminals``.

A few GET endpoints on top of h11 (the HTTP/1.1 state machine; we parse nothing ourselves).
One request per connection (``Connection: close``), which is all Prometheus scrapes and
operators' curl need.

* ``/metrics`` -- the Prometheus text exposition of the server's registry.
* ``/healthz`` -- 200 ``{"status": "ok"}`` while the server accepts terminals, else 503.
* ``/terminals`` -- JSON list of online sessions (phone, edition, peer, connected_since,
  last_seen), from the callable given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

# A request is a GET line and a few headers; h11 refuses heads past this size.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
RECV_BYTES = 4096
# Operators and one or two scrapers: 32 concurrent requests is plenty, and bounds tasks.
MAX_CONNECTIONS = 32
# A slow client gets this long for its whole request and response.
REQUEST_TIMEOUT_S = 10.0

JSON = "application/json"


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
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.terminals = terminals
        self.healthy = healthy
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

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
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            logger.debug("operator HTTP client dropped: %r", exc)
        finally:
            self._limiter.release_on_behalf_of(stream)
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        request: h11.Request | None = None
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
            elif isinstance(event, h11.Request):
                request = event
            else:
                return  # the client closed or sent nothing usable
        status, content_type, body = self._respond(request)
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
        await stream.send_all(data)

    def _respond(self, request: h11.Request) -> tuple[int, str, bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, JSON, _json({"error": "method not allowed"})
        path = request.target.split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == b"/healthz":
            if self.healthy():
                return 200, JSON, _json({"status": "ok"})
            return 503, JSON, _json({"status": "unavailable"})
        if path == b"/terminals":
            return 200, JSON, _json(self.terminals())
        return 404, JSON, _json({"error": "not found"})


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")
