"""The operator port under bad input, failing handlers, a database outage and slow clients: the
port answers for the request at fault and goes on serving the rest."""

from __future__ import annotations

import dataclasses
import json
import secrets
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import hypothesis.strategies as st
import psycopg
import pytest
import trio
from hypothesis import given
from prometheus_client import CollectorRegistry

import ingest.http
from ingest import (
    AlertFilter,
    BadCommandError,
    InMemoryAlertFeed,
    InMemoryMasterDataAdmin,
    Metrics,
    OperatorHttp,
    message_from_json,
)
from ingest.commands import NOT_COMMANDS, command_class
from ingest.http import MAX_COMMANDS, MAX_JSON_DEPTH, json_depth_exceeds, parse_json
from protocol.messages.base import REGISTRY, is_downlink
from storage.alerts import AlertRepository
from storage.errors import DatabaseUnavailableError, database_errors
from storage.masterdata import MasterDataError, connect
from tests.db_proxy import DatabaseProxy
from tests.operator_auth import AUTH_LINE, memory_access
from tests.storage_fixtures import db_proxy, migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import Stream, alert
from tests.test_masterdata_http import FENCES, VEHICLE
from tests.test_rules_service import at
from tools.rules_db import DatabaseAlertFeed, DatabaseMasterDataAdmin

# ---------------------------------------------------------------------------------------------
# A client of raw bytes


@dataclasses.dataclass
class Reply:
    status: int  # 0: the connection closed without an answer
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
    lines.append(AUTH_LINE.strip())  # the test admin: the port's checks come after the token's
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_reply(data: bytes, method: str = "GET") -> Reply:
    """The response in ``data`` (all the server sent before it closed)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    reply = Reply(0, {}, b"")
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break  # cut short: keep what came
        if isinstance(event, h11.Response):
            reply.status = event.status_code
            reply.headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif not isinstance(event, h11.InformationalResponse):
            break  # EndOfMessage, ConnectionClosed, NEED_DATA
    reply.body = bytes(body)
    return reply


async def send_raw(
    port: int, data: bytes, *, method: str = "GET", half_close: bool = False
) -> Reply:
    """Send ``data`` and read until the server closes (every answer closes the connection)."""
    received = bytearray()
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # reset: what arrived before it is the answer
        finally:
            await stream.aclose()
    return parse_reply(bytes(received), method)


async def get(port: int, target: str, method: str = "GET") -> Reply:
    return await send_raw(port, request_bytes(method, target), method=method)


async def post(port: int, target: str, body: bytes | Any) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await send_raw(port, request_bytes("POST", target, data))


@asynccontextmanager
async def serving(http: OperatorHttp) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        (port,) = await nursery.start(http.run)
        yield port
        nursery.cancel_scope.cancel()


def operator(**kwargs: Any) -> OperatorHttp:
    kwargs.setdefault("terminals", list)
    return OperatorHttp(
        host="127.0.0.1", port=0, registry=CollectorRegistry(), access=memory_access(), **kwargs
    )


def counted(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def healthz_quickly(port: int, within_s: float = 1.0) -> None:
    with trio.fail_after(within_s):
        assert (await get(port, "/healthz")).status == 200


# ---------------------------------------------------------------------------------------------
# Nested JSON


async def test_deep_nesting_is_refused_before_the_parser_sees_it() -> None:
    async def runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        raise AssertionError("never reached")

    admin = InMemoryMasterDataAdmin(wall_clock=lambda: at(5, 10))
    async with serving(operator(masterdata=admin, command=runner)) as port:
        reply = await post(port, "/vehicles", b"[" * 100_000)
        assert (reply.status, reply.json()["error"]) == (400, "bad_request")
        assert f"deeper than {MAX_JSON_DEPTH}" in reply.json()["detail"]
        valid = b'{"msg_id": "0x8201", "body": ' + b"[" * 1500 + b"]" * 1500 + b"}"
        reply = await post(port, "/terminals/13800138000/commands", valid)
        assert (reply.status, reply.json()["error"]) == (400, "bad_request")
        # Brackets in strings are text, not nesting.
        texty = [{**VEHICLE, "unit": "[" * 5000 + "{"}]
        assert (await post(port, "/vehicles", texty)).status == 201
        await healthz_quickly(port)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_TRICKY_TEXT = st.text(alphabet='[]{}"\\,:ab\u00e9\U0001f600\n', max_size=8)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=30,
)


@given(value=_JSON_VALUES, limit=st.integers(0, 8), ascii_only=st.booleans())
def test_the_depth_scan_is_exact_on_valid_json(value: Any, limit: int, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth_exceeds(text, limit) == (_depth(value) > limit)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"[1e999]", "out of range"),
        (b"[NaN]", "NaN is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
        (b"1" * 5000, "digits"),
        (b"\xff[]", "not UTF-8"),
        (b"\xef\xbb\xbf[]", "BOM"),
        (b'["unterminated', "not JSON"),
        (b'"\\', "not JSON"),
    ],
)
def test_bodies_that_are_not_plain_json_are_value_errors(body: bytes, detail: str) -> None:
    with pytest.raises(ValueError, match=detail):
        parse_json(body)


def _record_depth(cls: type, seen: tuple[type, ...] = ()) -> int:
    """How deep the records of a message class nest (1: no nested records)."""
    assert cls not in seen, f"{cls.__name__} contains itself"
    hints = typing.get_type_hints(cls)

    def walk(hint: Any) -> int:
        if typing.get_origin(hint) is not None:
            return max((walk(a) for a in typing.get_args(hint)), default=0)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return _record_depth(hint, (*seen, cls))
        return 0

    fields = dataclasses.fields(cls)
    return 1 + max((walk(hints[f.name]) for f in fields), default=0)


def test_command_bodies_recurse_by_the_message_types_not_by_the_input() -> None:
    # message_from_json recurses along the message's field types, and the codec's records nest
    # only a few levels: that bounds its recursion whatever the input holds.
    commands = [command_class(i) for i in REGISTRY if is_downlink(i) and i not in NOT_COMMANDS]
    assert max(map(_record_depth, commands)) <= 4
    nested: Any = 1
    for _ in range(MAX_JSON_DEPTH - 2):
        nested = [nested]
    for cls in commands:
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            with pytest.raises(BadCommandError):
                message_from_json(cls.MSG_ID, {field.name: nested})


# ---------------------------------------------------------------------------------------------
# One failing request does not end the port


class FailingAdmin(InMemoryMasterDataAdmin):
    async def vehicles(self) -> list[dict[str, Any]]:
        raise RuntimeError("injected: admin")


class FailingFeed(InMemoryAlertFeed):
    """Fails in ``last_seq`` (before a stream's head) or, with ``late``, in ``events_after``
    (after the head went out)."""

    def __init__(self, *, late: bool) -> None:
        super().__init__()
        self.late = late

    async def last_seq(self) -> int:
        if not self.late:
            raise RuntimeError("injected: feed")
        return await super().last_seq()

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        raise RuntimeError("injected: feed, streaming")


async def failing_runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
    raise RuntimeError("injected: command")


def failing_terminals() -> list[dict[str, Any]]:
    raise RuntimeError("injected: terminals")


def failing_health() -> dict[str, Any]:
    return {"status": "fine"}  # not a status: the callable's bug


FAILURES: dict[str, tuple[dict[str, Any], str, str, bytes]] = {
    "masterdata admin": (
        {"masterdata": FailingAdmin(wall_clock=lambda: at(5, 10))},
        "GET",
        "/vehicles",
        b"",
    ),
    "command runner": (
        {"command": failing_runner},
        "POST",
        "/terminals/13800138000/commands",
        b'{"msg_id": "0x8201"}',
    ),
    "terminals callable": ({"terminals": failing_terminals}, "GET", "/terminals", b""),
    "alert feed": ({"alerts": FailingFeed(late=False)}, "GET", "/alerts/stream", b""),
    "health callable": ({"health": failing_health}, "GET", "/healthz", b""),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
async def test_an_error_in_any_handler_is_answered_500_and_contained(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts, method, target, body = FAILURES[kind]
    metrics = Metrics(CollectorRegistry())
    async with serving(operator(metrics=metrics, **parts)) as port:
        for attempt in (1, 2):
            reply = await send_raw(port, request_bytes(method, target, body))
            assert (reply.status, reply.json()) == (500, {"error": "internal"})
            assert counted(metrics, "jt808_contained_errors_total", {"where": "http"}) == attempt
            assert counted(metrics, "jt808_http_requests_total", {"status": "500"}) == attempt
            # The port goes on: the next request is served.
            assert (await get(port, "/metrics")).status == 200
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 2  # logged with its traceback, once per request


async def test_a_feed_failing_mid_stream_closes_that_stream_only() -> None:
    metrics = Metrics(CollectorRegistry())
    async with serving(operator(alerts=FailingFeed(late=True), metrics=metrics)) as port:
        with trio.fail_after(10):
            stream = await Stream.open(port, "/alerts/stream")
            assert stream.status == 200
            # The head went out: the connection is just closed, in the middle of the body.
            with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
                await stream.blocks(2)
            await stream.aclose()
        assert counted(metrics, "jt808_contained_errors_total", {"where": "http"}) == 1
        await healthz_quickly(port)


# ---------------------------------------------------------------------------------------------
# Health


@pytest.mark.parametrize(
    ("report", "status"),
    [
        ({"status": "ok"}, 200),
        ({"status": "degraded", "database": "unreachable", "spooling": True}, 200),
        ({"status": "unavailable", "accepting": False}, 503),
    ],
)
async def test_healthz_reports_the_health_dict(report: dict[str, Any], status: int) -> None:
    async with serving(operator(health=lambda: report, healthy=lambda: False)) as port:
        reply = await get(port, "/healthz")
        assert (reply.status, reply.json()) == (status, report)
        assert (await get(port, "/healthz", "HEAD")).status == status


async def test_healthz_falls_back_to_the_healthy_flag() -> None:
    up = True
    async with serving(operator(healthy=lambda: up)) as port:
        assert (await get(port, "/healthz")).json() == {"status": "ok"}
        up = False
        reply = await get(port, "/healthz")
        assert (reply.status, reply.json()) == (503, {"status": "unavailable"})
    async with serving(operator()) as port:  # neither: the port answering is the health
        assert (await get(port, "/healthz")).status == 200


# ---------------------------------------------------------------------------------------------
# Broken HTTP and odd requests


async def test_broken_http_is_answered_4xx_or_closed() -> None:
    metrics = Metrics(CollectorRegistry())
    async with serving(operator(alerts=InMemoryAlertFeed(), metrics=metrics)) as port:
        assert (await send_raw(port, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")).status == 400
        huge = b"GET / HTTP/1.1\r\nhost: t\r\nx: " + b"a" * 40_000 + b"\r\n\r\n"
        assert (await send_raw(port, huge)).status == 431
        no_host = b"GET /healthz HTTP/1.1\r\n\r\n"
        assert (await send_raw(port, no_host)).status == 400
        # Chunked wins over a content-length (RFC 9112 6.3); a chunk size that is no number.
        chunked = request_bytes("POST", "/healthz", b"zz\r\n\r\n", {"transfer-encoding": "chunked"})
        assert (await send_raw(port, chunked)).status == 400
        # A request cut short, with the client's half closed: 400 or nothing, never a 500.
        cut = request_bytes("POST", "/healthz", b"{}")[:-1]
        assert (await send_raw(port, cut, half_close=True)).status in (0, 400)
        assert (await send_raw(port, b"GET /heal", half_close=True)).status in (0, 400)
        big = request_bytes("GET", "/healthz", headers={"content-length": "999999999999"})
        big = big.replace(b"content-length: 0\r\n", b"")
        assert (await send_raw(port, big)).status == 413
        reply = await get(port, "/healthz", "DELETE")
        assert (reply.status, reply.headers["allow"]) == (405, "GET, HEAD")
        assert (await get(port, "/alerts/stream", "HEAD")).status == 405
        assert (await get(port, "/%00/../x?y=%ff")).status == 404
        for last_id in ("\u00b2", "1" * 30, "-1", "x", "\u00ff\u00fe"):
            garbage = request_bytes("GET", "/alerts/stream", headers={"last-event-id": last_id})
            assert (await send_raw(port, garbage)).status == 400
        for query in ("after=%C2%B2", "after=1e3", "unit=%00", "unit=a&unit=b"):
            stream = await Stream.open(port, f"/alerts/stream?{query}")
            assert stream.status in (200, 400)
            await stream.aclose()
        await healthz_quickly(port)
    assert counted(metrics, "jt808_contained_errors_total", {"where": "http"}) == 0
    assert counted(metrics, "jt808_http_requests_total", {"status": "500"}) == 0


async def test_unpaired_surrogates_are_echoed_as_json_escapes() -> None:
    async def runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        message_from_json(msg_id, body)
        raise AssertionError("unreachable: the body has an unknown field")

    async with serving(operator(command=runner)) as port:
        body = b'{"msg_id": "0x8300", "body": {"\\ud800": 1, "flag": 1, "text": "x"}}'
        reply = await post(port, "/terminals/13800138000/commands", body)
        assert reply.status == 400
        assert "\ud800" in reply.json()["detail"]  # valid JSON that decodes back to it


# ---------------------------------------------------------------------------------------------
# Slow clients and long requests


async def test_slow_clients_do_not_hold_up_healthz_or_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest.http, "HEAD_TIMEOUT_S", 3.0)
    http = operator(alerts=InMemoryAlertFeed())
    head = request_bytes("POST", "/terminals/1/commands", b"{}")
    closed = 0

    async def trickle() -> None:
        nonlocal closed
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            for byte in head:
                await stream.send_all(bytes([byte]))
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            closed += 1
        finally:
            await stream.aclose()

    async with serving(http) as port, trio.open_nursery() as clients:
        for _ in range(40):
            clients.start_soon(trickle)
        with trio.fail_after(2):
            while http.open_connections < 40:  # noqa: ASYNC110 - the server's state, from outside
                await trio.sleep(0.01)
        for _ in range(3):
            await healthz_quickly(port, within_s=0.5)
            with trio.fail_after(0.5):
                assert (await get(port, "/metrics")).status == 200
            await trio.sleep(0.3)
        # Each holds its connection only until the head deadline.
        with trio.fail_after(3.0 + 4):
            while closed < 40:  # noqa: ASYNC110 - counts clients the server closed: no event
                await trio.sleep(0.1)
        assert http.open_connections == 0
        clients.cancel_scope.cancel()


async def test_at_the_connection_cap_the_slowest_head_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest.http, "MAX_OPEN_CONNECTIONS", 10)
    http = operator()
    async with serving(http) as port:
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(10)]
        with trio.fail_after(2):
            while http.open_connections < 10:  # noqa: ASYNC110 - the server's state, from outside
                await trio.sleep(0.01)
        await healthz_quickly(port)  # in place of the oldest idle one
        assert await idle[0].receive_some(10) == b""  # closed to make room
        for stream in idle:
            await stream.aclose()


async def test_long_requests_have_slots_of_their_own() -> None:
    started = 0

    async def hanging(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        nonlocal started
        started += 1
        await trio.sleep_forever()
        raise AssertionError

    http = operator(command=hanging)
    target = "/terminals/13800138000/commands"
    async with serving(http) as port, trio.open_nursery() as clients:
        for _ in range(MAX_COMMANDS):
            clients.start_soon(post, port, target, {"msg_id": "0x8201"})
        with trio.fail_after(5):
            while started < MAX_COMMANDS:  # noqa: ASYNC110 - the runner's count, from outside
                await trio.sleep(0.01)
        reply = await post(port, target, {"msg_id": "0x8201"})
        assert (reply.status, reply.json()["error"]) == (503, "busy")
        await healthz_quickly(port, within_s=0.5)
        with trio.fail_after(0.5):
            assert (await get(port, "/metrics")).status == 200
        clients.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# The database going away


def test_database_errors_are_typed() -> None:
    with (
        pytest.raises(DatabaseUnavailableError, match=r"OperationalError: gone$"),
        database_errors(),
    ):
        raise psycopg.OperationalError("gone\nDETAIL: the values sent")
    # The request's own fault passes unchanged.
    with pytest.raises(psycopg.errors.ProgramLimitExceeded), database_errors():
        raise psycopg.errors.ProgramLimitExceeded("index row too large")
    with pytest.raises(psycopg.DataError), database_errors():
        raise psycopg.DataError("bad value")


@pytest.mark.db
@pytest.mark.parametrize(
    "value",
    ["a\x00b", "\ud800", secrets.token_hex(8000)],  # NUL, unpaired surrogate, index too long
    ids=["nul", "surrogate", "index-entry"],
)
def test_values_the_database_cannot_hold_are_refused_as_master_data(db: str, value: str) -> None:
    def insert() -> None:
        with connect(db) as conn:
            conn.execute("CREATE TEMP TABLE t (v text PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (%s)", (value,))

    with pytest.raises(MasterDataError, match="the database refused a value"):
        insert()


@pytest.mark.db
async def test_master_data_during_an_outage_is_503_then_served_again(
    db: str, proxy: DatabaseProxy
) -> None:
    admin = DatabaseMasterDataAdmin(proxy.dsn, wall_clock=lambda: at(5, 10))
    metrics = Metrics(CollectorRegistry())
    async with serving(operator(masterdata=admin, metrics=metrics)) as port:
        with trio.fail_after(30):
            assert (await post(port, "/vehicles", [VEHICLE])).status == 201
            proxy.cut()
            for target in ("/vehicles", "/fences", "/filings"):
                reply = await get(port, target)
                assert (reply.status, reply.json()["error"]) == (503, "unavailable")
            reply = await post(port, "/fences", FENCES)
            assert (reply.status, reply.json()["error"]) == (503, "unavailable")
            # Refused by the checks before any database is asked: still 400.
            assert (await post(port, "/vehicles", [{"plate": ""}])).status == 400
            await healthz_quickly(port)
            proxy.restore()
            reply = await get(port, "/vehicles")
            assert (reply.status, [v["plate"] for v in reply.json()]) == (200, [VEHICLE["plate"]])
            assert (await get(port, "/fences")).json()["features"] == []  # the cut POST: none
            # Text PostgreSQL cannot hold is refused, not a 500.
            nul = [{**VEHICLE, "plate": "云A\x0000002", "phone": None}]
            reply = await post(port, "/vehicles", nul)
            assert (reply.status, reply.json()["error"]) == (400, "invalid")
    assert counted(metrics, "jt808_contained_errors_total", {"where": "http"}) == 0


@pytest.mark.db
async def test_alert_streams_through_an_outage(db: str, proxy: DatabaseProxy) -> None:
    repository = AlertRepository(db)  # the engine's side, straight to the database
    feed = DatabaseAlertFeed(proxy.dsn)
    metrics = Metrics(CollectorRegistry())
    try:
        async with serving(operator(alerts=feed, metrics=metrics)) as port:
            with trio.fail_after(30):
                first = repository.put(alert(1))
                stream = await Stream.open(port, "/alerts/stream?after=0")
                assert [seq for seq, _ in await stream.events(1)] == [first]
                # The database goes away: the open stream ends cleanly, new ones are 503.
                proxy.cut()
                while not stream.ended:
                    await stream.blocks(1)
                await stream.aclose()
                refused = await Stream.open(port, "/alerts/stream")
                assert refused.status == 503
                await refused.aclose()
                second = await trio.to_thread.run_sync(repository.put, alert(2))
                # Back: the client resumes after the last event it saw, and misses nothing.
                proxy.restore()
                resumed = await Stream.open(port, "/alerts/stream", {"Last-Event-ID": str(first)})
                assert resumed.status == 200
                assert [seq for seq, _ in await resumed.events(1)] == [second]
                await resumed.aclose()
    finally:
        feed.close()
        repository.close()
    assert counted(metrics, "jt808_contained_errors_total", {"where": "http"}) == 0
