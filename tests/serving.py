"""The whole ``jt808 serve`` wiring in the test process: real server, operator port, writer,
spool, terminal store and cache, against a real database (usually through
:class:`tests.db_proxy.DatabaseProxy`, so tests can cut it)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio
from prometheus_client import CollectorRegistry

from ingest import ServerConfig
from tests.operator_auth import AUTH_LINE, store_token
from tools.serve_cmd import Running, serve


@asynccontextmanager
async def serving(dsn: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Running]:
    """``serve()`` until the block ends (then cancelled: a hard stop)."""
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "http_port": 0, **overrides})
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: serve(
                config,
                dsn,
                data_dir,
                metrics_registry=CollectorRegistry(),
                handle_signals=False,
                tune_gc=False,
                task_status=task_status,
            )
        )
        # The operator port wants a token: the test admin's (tests.operator_auth), stored once
        # serve() has migrated the schema.  A test that starts with the database down calls
        # only the public endpoints (and an authenticated one would be 503 then anyway).
        with contextlib.suppress(psycopg.OperationalError):
            await trio.to_thread.run_sync(store_token, dsn)
        try:
            yield running
        finally:
            nursery.cancel_scope.cancel()


async def http(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    timeout_s: float = 10.0,
    auth: bool = True,
) -> tuple[int, Any]:
    """One request to the operator port, as the test admin unless ``auth`` is false:
    (status, JSON body or text)."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            if auth:
                head += AUTH_LINE
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            await stream.send_all(head.encode() + b"\r\n" + (body or b""))
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    status = int(status_line.split()[1])
    _, _, payload = rest.partition(b"\r\n\r\n")
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode("utf-8", "replace")


def metric(running: Running, name: str, labels: dict[str, str] | None = None) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
