"""The operator account the tests call the operator port with: an admin bound to no unit.

In-process ports get :func:`memory_access`; a port backed by the database (the ``serve``
wiring) gets the same token stored by :func:`store_token`.  Requests carry
:data:`AUTH_HEADER` (or :data:`AUTH_LINE` in a raw head).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import psycopg
import trio

from ingest import OperatorHttp
from ingest.access import ADMIN, Principal
from ingest.interfaces import InMemoryOperatorAccess
from storage import access

TEST_USER = "test-admin"
TEST_TOKEN = "jt808_test-admin-token-for-the-test-suite"
PRINCIPAL = Principal(name=TEST_USER, role=ADMIN)
AUTH_HEADER = ("authorization", f"Bearer {TEST_TOKEN}")
AUTH_LINE = f"Authorization: Bearer {TEST_TOKEN}\r\n"


def memory_access(**more: Principal) -> InMemoryOperatorAccess:
    """The test admin's token, and ``more`` tokens (token -> principal)."""
    return InMemoryOperatorAccess({TEST_TOKEN: PRINCIPAL, **more})


def store_token(
    dsn: str,
    token: str = TEST_TOKEN,
    user: str = TEST_USER,
    role: str = ADMIN,
    unit: str | None = None,
) -> None:
    """Store an account and its token in a migrated database (once: again is a no-op)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not any(u["name"] == user for u in access.users(conn)):
            access.add_user(conn, user, role, unit)
        if access.principal_for_token(conn, token) is None:
            access.create_token(conn, user, None, token=token)


async def exchange(
    port: int,
    method: str,
    target: str,
    body: Any = None,
    *,
    token: str | None = TEST_TOKEN,
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, bytes, dict[bytes, bytes]]:
    """One request to the operator port on loopback (``body`` sent as JSON, ``token`` as a
    bearer token): the status, the raw body and the response headers."""
    data = b"" if body is None else json.dumps(body).encode()
    sent = [("host", "test"), ("content-length", str(len(data))), *headers]
    if token is not None:
        sent.append(("authorization", f"Bearer {token}"))
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        out = conn.send(h11.Request(method=method, target=target, headers=sent)) or b""
        out += (conn.send(h11.Data(data=data)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        status, answer, got = 0, bytearray(), {}
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, got = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        await stream.aclose()
    return status, bytes(answer), got


@asynccontextmanager
async def port_of(http: OperatorHttp) -> AsyncIterator[int]:
    """``http`` served on loopback for the block; its port."""
    async with trio.open_nursery() as nursery:
        (port,) = await nursery.start(http.run)
        yield port
        nursery.cancel_scope.cancel()
