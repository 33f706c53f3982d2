"""The operator port's caps (:mod:`ingest.limits`), each at a small setting: body size (413),
head size and header count (431), slow heads and bodies (closed at their deadline),
connections per address (the address's slowest head makes room, else 429) and alert streams
per owner (429) and in total (503)."""

from __future__ import annotations

import time
from typing import Any

import h11
import pytest
import trio
from prometheus_client import CollectorRegistry

from ingest import (
    ConfigError,
    InMemoryAlertFeed,
    InMemoryPositionSink,
    OperatorHttp,
    Server,
    ServerConfig,
    load_config,
)
from ingest.access import VIEWER, Principal
from ingest.interfaces import InMemoryTerminalRegistry
from ingest.limits import HttpLimits, KeyedCounts
from tests.operator_auth import TEST_TOKEN, memory_access
from tests.test_http_hardening import (
    get,
    operator,
    parse_reply,
    post,
    request_bytes,
    send_raw,
    serving,
)

COMMANDS = "/terminals/13800138000/commands"


async def echo(phone: str, msg_id: object, body: object) -> dict[str, Any]:
    return {"phone": phone}


async def test_a_body_past_its_cap_is_413_whether_declared_or_chunked() -> None:
    http = operator(command=echo, limits=HttpLimits(max_body_bytes=1024))
    with trio.fail_after(10):
        async with serving(http) as port:
            declared = await post(port, COMMANDS, b"{" + b" " * 2000 + b"}")
            assert (declared.status, declared.json()["max"]) == (413, 1024)
            head = request_bytes("POST", COMMANDS).replace(
                b"content-length: 0", b"transfer-encoding: chunked"
            )
            chunks = b"".join(b"100\r\n" + b" " * 256 + b"\r\n" for _ in range(8))
            chunked = await send_raw(port, head + chunks + b"0\r\n\r\n")
            assert chunked.status == 413
            fits = await post(port, COMMANDS, {"msg_id": "0x8201"})
            assert fits.status == 200


async def test_heads_past_their_size_or_header_count_are_431() -> None:
    http = operator(limits=HttpLimits(max_head_bytes=1024, max_headers=8))
    with trio.fail_after(10):
        async with serving(http) as port:
            # request_bytes sends host, content-length and authorization: 3 of the 8.
            five = {f"x-extra-{n}": "1" for n in range(5)}
            assert (
                await send_raw(port, request_bytes("GET", "/healthz", headers=five))
            ).status == 200
            six = {f"x-extra-{n}": "1" for n in range(6)}
            too_many = await send_raw(port, request_bytes("GET", "/healthz", headers=six))
            assert too_many.status == 431
            assert "8 header fields" in too_many.json()["detail"]
            large = request_bytes("GET", "/healthz", headers={"x-large": "a" * 2000})
            assert (await send_raw(port, large)).status == 431


async def trickle(port: int, data: bytes, interval_s: float) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time; what came back before the server closed, and when."""
    start = time.monotonic()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()

    async def read() -> None:
        try:
            while chunk := await stream.receive_some(4096):
                received.extend(chunk)
        except trio.BrokenResourceError:
            pass
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        try:
            for byte in data:
                await stream.send_all(bytes([byte]))
                await trio.sleep(interval_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.sleep_forever()  # until the reader sees the close
    await stream.aclose()
    return bytes(received), time.monotonic() - start


async def test_slow_heads_and_bodies_are_closed_at_their_deadline() -> None:
    limits = HttpLimits(head_timeout_s=1.0, body_timeout_s=1.0)
    http = operator(command=echo, limits=limits)
    with trio.fail_after(15):
        async with serving(http) as port:
            answer, took = await trickle(port, request_bytes("GET", "/healthz"), 0.2)
            assert answer == b""
            assert 0.9 < took < 2.0
            body = b'{"msg_id": "0x8201"}'
            head = request_bytes("POST", COMMANDS, body)[: -len(body)]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(head)  # a whole head at once: the body trickles
            start = time.monotonic()
            for byte in body[:5]:
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.3)
            assert await stream.receive_some(100) == b""
            assert time.monotonic() - start < 2.0
            await stream.aclose()
            assert http.open_connections == 0


async def open_stream(
    port: int, source: str, token: str = TEST_TOKEN
) -> tuple[int, trio.SocketStream]:
    """An alert stream request from ``source`` with ``token``: its status and connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "test"), ("authorization", f"Bearer {token}")]
    request = h11.Request(method="GET", target="/alerts/stream", headers=headers)
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Response):
            return event.status_code, stream
        else:  # pragma: no cover - the server answers every stream request
            raise AssertionError(event)


async def test_connections_per_address() -> None:
    limits = HttpLimits(max_connections_per_address=3, max_streams_per_user=3)
    http = operator(alerts=InMemoryAlertFeed(), limits=limits)
    with trio.fail_after(10):
        async with serving(http) as port:
            # Three idle connections of one address: a fourth takes the place of the oldest.
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            elsewhere = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            while http.open_connections < 4:  # noqa: ASYNC110 - the server's state, from outside
                await trio.sleep(0.01)
            assert (await get(port, "/healthz")).status == 200
            assert await idle[0].receive_some(10) == b""
            for stream in idle:
                await stream.aclose()
            # Three streams of one address, past their heads: a fourth connection is refused.
            streams = [await open_stream(port, "127.0.0.1") for _ in range(3)]
            assert [status for status, _ in streams] == [200] * 3
            refused = await get(port, "/healthz")
            assert (refused.status, refused.json()) == (429, {"error": "too_many_connections"})
            reply = await send_raw_from(port, "127.0.0.3", request_bytes("GET", "/healthz"))
            assert reply.status == 200  # other addresses are not concerned
            await elsewhere.aclose()
            await streams[0][1].aclose()
            while (await get(port, "/healthz")).status != 200:  # noqa: ASYNC110 - the server's
                await trio.sleep(0.01)  # count of the address, from outside
            for _, stream in streams[1:]:
                await stream.aclose()


async def send_raw_from(port: int, source: str, data: bytes) -> Any:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some(4096):
            received += chunk
    return parse_reply(bytes(received))


async def test_streams_per_user_and_in_total() -> None:
    limits = HttpLimits(max_streams=3, max_streams_per_user=2)
    users = {f"token-{name}": Principal(name=name, role=VIEWER) for name in ("a", "b", "c")}
    http = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        alerts=InMemoryAlertFeed(),
        limits=limits,
        access=memory_access(**users),
    )
    with trio.fail_after(10):
        async with serving(http) as port:
            # One user's share, from wherever it connects.
            first = [await open_stream(port, f"127.0.0.{n}", "token-a") for n in (1, 2)]
            assert [status for status, _ in first] == [200, 200]
            status, refused = await open_stream(port, "127.0.0.3", "token-a")
            assert status == 429
            await refused.aclose()
            status, other = await open_stream(port, "127.0.0.1", "token-b")
            assert status == 200
            status, busy = await open_stream(port, "127.0.0.1", "token-c")
            assert status == 503  # the port's streams are taken
            await busy.aclose()
            await first[0][1].aclose()
            while True:  # the user's share comes back once the server sees the close
                status, again = await open_stream(port, "127.0.0.1", "token-a")
                if status == 200:
                    break
                await again.aclose()
                await trio.sleep(0.01)
            for stream in (again, first[1][1], other):
                await stream.aclose()


def test_the_limits_are_settings_checked_together() -> None:
    config = load_config(
        None, {"JT808_HTTP_MAX_STREAMS_PER_USER": "2", "JT808_HTTP_HEAD_TIMEOUT_S": "2.5"}
    )
    assert config.http_limits == HttpLimits(max_streams_per_user=2, head_timeout_s=2.5)
    with pytest.raises(ConfigError, match="http_max_streams_per_user must not exceed"):
        ServerConfig(http_max_streams=2, http_max_streams_per_user=3)
    with pytest.raises(ConfigError, match="http_body_timeout_s must be a positive number"):
        ServerConfig(http_body_timeout_s=0)
    with pytest.raises(ValueError, match="max_headers must be at least 1"):
        HttpLimits(max_headers=0)
    server = Server(
        ServerConfig(http_max_connections_per_address=5),
        sink=InMemoryPositionSink(),
        registry=InMemoryTerminalRegistry(),
    )
    assert server.operator_http().limits.max_connections_per_address == 5


def test_keyed_counts_forget_keys_at_zero() -> None:
    counts = KeyedCounts()
    assert counts.try_add("a", 2)
    assert counts.try_add("a", 2)
    assert not counts.try_add("a", 2)
    counts.remove("a")
    counts.remove("a")
    assert (counts["a"], len(counts)) == (0, 0)
