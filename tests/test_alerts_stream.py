"""``GET /alerts/stream`` (server-sent events on the operator port) and ``jt808 alerts tail``."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

import tools.alerts_tail_cmd
from ingest import AlertFilter, InMemoryAlertFeed, OperatorHttp
from ingest.http import HEARTBEAT_S, MAX_STREAMS
from ingest.limits import HttpLimits
from tests.operator_auth import AUTH_HEADER, TEST_TOKEN, memory_access
from tools.alerts_tail_cmd import add_tail_arguments, run_tail


def alert(
    n: int, *, unit: str = "gov", rule: str = "holiday_sealing", **extra: Any
) -> dict[str, Any]:
    return {
        "id": f"{rule}:0138:{n}",
        "rule": rule,
        "state": "pending_backfill",
        "phone": "013800000001",
        "vehicle": 101,
        "plate": "云A00001",
        "unit": unit,
        "severity": "high",
        "opened_at": "2026-10-03T09:30:00+08:00",
        "updated_at": "2026-10-03T09:30:00+08:00",
        "deadline": "2026-10-10T23:59:59+08:00",
        "closed_at": None,
        "detail": {"n": n},
        **extra,
    }


@asynccontextmanager
async def operator_port(
    feed: InMemoryAlertFeed | None, limits: HttpLimits | None = None
) -> AsyncIterator[int]:
    http = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        healthy=lambda: True,
        alerts=feed,
        limits=limits,
        access=memory_access(),
    )
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(http.run)
        yield ports[0]
        nursery.cancel_scope.cancel()


class Stream:
    """An SSE client over h11: the response head, then events and comments as they come."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False

    @classmethod
    async def open(cls, port: int, target: str, headers: dict[str, str] | None = None) -> Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[("host", "test"), AUTH_HEADER, *(headers or {}).items()],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        self = cls(stream, conn)
        while not self.status:
            await self._pump()
        return self

    async def _pump(self) -> None:
        event = self.conn.next_event()
        if event is h11.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            self.status = event.status_code
            self.headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            self.body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            self.ended = True

    async def blocks(self, n: int) -> list[str]:
        """The next ``n`` blank-line separated blocks (events or comments)."""
        while self.body.count(b"\n\n") < n and not self.ended:
            await self._pump()
        *blocks, rest = bytes(self.body).split(b"\n\n", n)
        self.body = bytearray(rest)
        return [b.decode() for b in blocks]

    async def events(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        out = []
        while len(out) < n:
            for block in await self.blocks(1):
                if block.startswith(":"):
                    continue
                lines = dict(line.split(": ", 1) for line in block.split("\n"))
                out.append((int(lines["id"]), json.loads(lines["data"])))
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_events_filters_and_resume_with_last_event_id() -> None:
    feed = InMemoryAlertFeed()
    with trio.fail_after(10):
        async with operator_port(feed) as port:
            feed.publish(alert(1))  # before the stream: not sent without a resume point
            live = await Stream.open(port, "/alerts/stream")
            assert live.status == 200
            assert live.headers["content-type"] == "text/event-stream"
            assert live.headers["transfer-encoding"] == "chunked"
            assert await live.blocks(1) == [": alert stream"]
            only_police = await Stream.open(port, "/alerts/stream?unit=police&after=0")
            feed.publish(alert(2))
            feed.publish(alert(3, unit="police", rule="terminal_tamper"))
            feed.publish(alert(4))
            got = await live.events(3)
            assert [(seq, a["detail"]["n"]) for seq, a in got] == [(2, 2), (3, 3), (4, 4)]
            assert got[0][1] == alert(2)
            assert [s for s, _ in await only_police.events(1)] == [3]
            await live.aclose()
            await only_police.aclose()

            resumed = await Stream.open(port, "/alerts/stream", {"Last-Event-ID": "2"})
            assert [s for s, _ in await resumed.events(2)] == [3, 4]
            await resumed.aclose()
            by_query = await Stream.open(port, "/alerts/stream?after=0&rule=holiday_sealing")
            assert [s for s, _ in await by_query.events(3)] == [1, 2, 4]
            await by_query.aclose()
            combined = await Stream.open(
                port, "/alerts/stream?after=0&unit=gov&state=pending_backfill&severity=high"
            )
            assert [s for s, _ in await combined.events(3)] == [1, 2, 4]
            await combined.aclose()


async def test_bad_requests_and_no_feed() -> None:
    with trio.fail_after(10):
        async with operator_port(InMemoryAlertFeed()) as port:
            bad = await Stream.open(port, "/alerts/stream?colour=red")
            assert bad.status == 400
            bad_id = await Stream.open(port, "/alerts/stream", {"Last-Event-ID": "x"})
            assert bad_id.status == 400
            await bad.aclose()
            await bad_id.aclose()
        async with operator_port(None) as port:
            missing = await Stream.open(port, "/alerts/stream")
            assert missing.status == 404
            await missing.aclose()


async def test_heartbeat_keeps_an_idle_stream_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = InMemoryAlertFeed()
    async with operator_port(feed) as port:
        stream = await Stream.open(port, "/alerts/stream")
        assert await stream.blocks(1) == [": alert stream"]
        before = trio.current_time()
        assert await stream.blocks(2) == [": heartbeat", ": heartbeat"]
        assert trio.current_time() - before >= 2 * HEARTBEAT_S
        feed.publish(alert(1))
        assert [s for s, _ in await stream.events(1)] == [1]
        await stream.aclose()


async def test_streams_past_the_cap_are_refused() -> None:
    with trio.fail_after(10):
        # Every stream is the test user's: its share is the whole port here (see test_http_limits).
        limits = HttpLimits(max_streams_per_user=MAX_STREAMS)
        async with operator_port(InMemoryAlertFeed(), limits) as port:
            streams = [await Stream.open(port, "/alerts/stream") for _ in range(MAX_STREAMS)]
            assert {s.status for s in streams} == {200}
            refused = await Stream.open(port, "/alerts/stream")
            assert refused.status == 503
            await refused.aclose()
            await streams[0].aclose()
            with trio.fail_after(5):  # the slot comes back once the server sees the close
                while True:
                    again = await Stream.open(port, "/alerts/stream")
                    await again.aclose()
                    if again.status == 200:
                        break
                    await trio.sleep(0.01)
            for s in streams[1:]:
                await s.aclose()


async def test_the_ring_buffer_keeps_the_newest() -> None:
    feed = InMemoryAlertFeed(max_events=3)
    for n in range(1, 6):
        assert feed.publish(alert(n)) == n
    assert await feed.last_seq() == 5
    assert [s for s, _ in await feed.events_after(0, 10, AlertFilter())] == [3, 4, 5]
    assert [s for s, _ in await feed.events_after(3, 10, AlertFilter())] == [4, 5]
    assert [s for s, _ in await feed.events_after(0, 1, AlertFilter())] == [3]
    assert await feed.events_after(5, 10, AlertFilter()) == []


def tail_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tail_arguments(parser)
    return parser.parse_args([*argv, "--token", TEST_TOKEN])


async def test_alerts_tail_prints_json_and_readable_lines() -> None:
    feed = InMemoryAlertFeed()
    feed.publish(alert(1, unit="police"))
    feed.publish(alert(2))
    with trio.fail_after(15):
        async with operator_port(feed) as port:
            url = f"http://127.0.0.1:{port}"
            out = io.StringIO()
            args = tail_args(
                "--http", url, "--unit", "gov", "--after", "0", "--count", "1", "--json"
            )
            code = await trio.to_thread.run_sync(lambda: run_tail(args, out=out))
            assert code == 0
            assert json.loads(out.getvalue()) == alert(2)

            out = io.StringIO()
            args = tail_args("--http", url, "--after", "0", "--count", "2")
            assert await trio.to_thread.run_sync(lambda: run_tail(args, out=out)) == 0
            first, second = out.getvalue().splitlines()
            assert "holiday_sealing" in first
            assert "pending_backfill" in first
            assert "云A00001" in first
            assert "unit=police" in first
            assert "unit=gov" in second
            assert "severity=high" in second

            out = io.StringIO()
            bad = tail_args("--http", url + "/nope", "--count", "1")
            # an unknown path is a 404: not retried, exit 1
            assert await trio.to_thread.run_sync(lambda: run_tail(bad, out=out)) == 1


def test_alerts_tail_reconnects_with_the_last_event_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a drop, the next request carries the id of the last event shown."""
    seen: list[str | None] = []
    streams = [
        [("7", json.dumps(alert(7)))],
        [("8", json.dumps(alert(8)))],
    ]

    def fake_events(url: str, last_id: str | None, *, timeout_s: float, **_: Any) -> Any:
        seen.append(last_id)
        if not streams:
            raise OSError("gone")
        yield from streams.pop(0)

    monkeypatch.setattr(tools.alerts_tail_cmd, "_events", fake_events)
    out = io.StringIO()
    assert run_tail(tail_args("--count", "2", "--json"), out=out, sleep=lambda s: None) == 0
    assert seen == [None, "7"]
    assert [json.loads(line)["detail"]["n"] for line in out.getvalue().splitlines()] == [7, 8]
