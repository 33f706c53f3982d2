"""Downlink commands: JSON to messages, the retransmission schedule, answers matched by serial,
the operator HTTP endpoint, ``jt808 send`` and relaying between two in-process nodes."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import h11
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingest import InMemoryPositionSink, InMemoryTerminalRegistry, Metrics, Server
from ingest.commands import (
    BadCommandError,
    CommandTimeoutError,
    NodeUnreachableError,
    TerminalOfflineError,
    message_from_json,
    retransmit_schedule,
)
from ingest.interfaces import InMemorySessionRecords, InMemoryTransport
from protocol import Packet
from protocol.errors import RESULT_NOT_SUPPORTED
from protocol.fields import GMT8
from protocol.messages.areas import AreaPoint, SetPolygonArea
from protocol.messages.control import LocationQuery, TerminalRetransmitRequest
from protocol.messages.location import LocationQueryResponse
from protocol.messages.multimedia import CameraShootResponse, MediaSearch
from protocol.messages.params import QueryParamsResponse, SetTerminalParams, TerminalParameter
from protocol.messages.terminal import TerminalGeneralResponse
from protocol.messages.text import TextMessage
from tests.operator_auth import AUTH_HEADER, TEST_TOKEN, memory_access
from tests.test_ingest_server import PHONE, WALL, FakeTerminal, base_config, report, wait_until
from tools import cli

# -- JSON to messages ---------------------------------------------------------------------------


def test_the_retransmission_timeout_grows_as_t_n_plus_1_is_t_n_times_n_plus_1() -> None:
    assert retransmit_schedule(10, 0) == (10,)
    assert retransmit_schedule(10, 3) == (10, 20, 60, 240)
    assert retransmit_schedule(2.5, 2) == (2.5, 5.0, 15.0)


def test_commands_are_built_from_their_json_fields() -> None:
    assert message_from_json("0x8201", None) == LocationQuery()
    assert message_from_json("8300", {"flag": 8, "text": "请回电"}) == TextMessage(
        flag=8, text="请回电"
    )
    params = message_from_json(
        0x8103,
        {
            "params": [
                {"param_id": "0x0001", "value": 30},
                {"param_id": 0x0013, "value": "jt808.example.org:6808"},
                {"param_id": 0xF001, "value": {"hex": "0102"}},
            ]
        },
    )
    assert params == SetTerminalParams(
        params=(
            TerminalParameter(param_id=1, value=30),
            TerminalParameter(param_id=0x13, value="jt808.example.org:6808"),
            TerminalParameter(param_id=0xF001, value=b"\x01\x02"),
        )
    )
    area = message_from_json(
        "0x8604",
        {
            "area_id": 5,
            "attribute": 0,
            "vertices": [{"latitude": 1, "longitude": 2}, {"latitude": 3, "longitude": 4}],
        },
    )
    assert area == SetPolygonArea(
        area_id=5,
        attribute=0,
        vertices=(AreaPoint(latitude=1, longitude=2), AreaPoint(latitude=3, longitude=4)),
    )
    search = message_from_json(
        "0x8802",
        {"media_type": 0, "channel": 0, "event": 0, "start": "2024-05-01T08:00:00+08:00"},
    )
    assert search == MediaSearch(
        media_type=0, channel=0, event=0, start=datetime(2024, 5, 1, 8, tzinfo=GMT8)
    )


@pytest.mark.parametrize(
    ("msg_id", "body", "complaint"),
    [
        ("0x8300", {"flag": 8, "text": "x", "colour": 1}, "unknown field(s) colour"),
        ("0x8300", {"flag": 8}, "field text is required"),
        ("0x8300", {"flag": "eight", "text": "x"}, "body.flag: expected an integer"),
        ("0x8802", {"media_type": 0, "channel": 0, "event": 0, "start": "2024-05-01"}, "offset"),
        ("0x8900", {"passthrough_type": 1, "content": "zz"}, "hex"),
        ("0x8604", {"area_id": 1, "attribute": 0, "vertices": {}}, "expected a list"),
        ("0x0200", {}, "not a downlink"),
        ("0x8001", {}, "platform answer"),
        ("0x8fff", {}, "not a downlink"),
        ("hello", {}, "not a hex message id"),
        ("0x8201", [], "expected an object"),
    ],
)
def test_commands_that_do_not_fit_are_refused(msg_id: str, body: Any, complaint: str) -> None:
    with pytest.raises(BadCommandError, match=re.escape(complaint)):
        message_from_json(msg_id, body)


# -- through the server -------------------------------------------------------------------------


@dataclass
class Node:
    server: Server
    port: int
    http_port: int

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@asynccontextmanager
async def node(nursery: trio.Nursery, **kwargs: Any) -> AsyncIterator[Node]:
    config: dict[str, Any] = {"node_id": "node-a", **kwargs.pop("config", {})}
    sink = InMemoryPositionSink()
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        base_config(**config),
        sink=sink,
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
        wall_clock=lambda: WALL,
        **kwargs,
    )
    async with trio.open_nursery() as inner:
        await inner.start(sink.run)
        ports = await inner.start(server.run)
        http_ports = await inner.start(server.operator_http(memory_access()).run)
        try:
            yield Node(server, ports[0], http_ports[0])
        finally:
            inner.cancel_scope.cancel()


async def post(port: int, target: str, document: Any) -> tuple[int, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps(document).encode()
    headers = [("host", "test"), ("content-type", "application/json"), AUTH_HEADER]
    headers.append(("content-length", str(len(body))))
    request = h11.Request(method="POST", target=target, headers=headers)
    await stream.send_all(
        conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )
    status, content = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            content += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await stream.aclose()
    return status, json.loads(content)


async def online(port: int, phone: str = PHONE) -> FakeTerminal:
    terminal = await FakeTerminal.connect(port, phone)
    await terminal.login()
    return terminal


async def answer_location(terminal: FakeTerminal) -> Packet:
    """Wait for a 0x8201 and answer it with a 0x0201; returns the command."""
    command = await terminal.recv()
    assert isinstance(command.message, LocationQuery)
    fix = report(3)
    await terminal.send(LocationQueryResponse(reply_serial=command.serial, location=fix))
    return command


async def test_a_command_round_trip_over_http() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            terminal = await online(a.port)
            nursery.start_soon(answer_location, terminal)
            status, answer = await post(
                a.http_port, "/terminals/13800138000/commands", {"msg_id": "0x8201"}
            )
            assert status == 200
            assert answer["phone"] == PHONE
            assert answer["node"] == "node-a"
            assert answer["command"]["msg_id"] == "0x8201"
            assert answer["command"]["attempts"] == 1
            assert answer["reply"]["msg_id"] == "0x0201"
            assert answer["reply"]["body"]["reply_serial"] == answer["command"]["serial"]
            assert answer["reply"]["body"]["location"]["lat"] == report(3).lat
            assert a.metric("jt808_commands_total", {"outcome": "answered"}) == 1
            await terminal.aclose()


async def test_offline_terminals_and_bad_requests_get_typed_errors() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            target = "/terminals/13800138000/commands"
            status, answer = await post(a.http_port, target, {"msg_id": "0x8201"})
            assert (status, answer["error"]) == (404, "offline")
            status, answer = await post(
                a.http_port, target, {"msg_id": "0x8300", "body": {"flag": 1, "txt": "x"}}
            )
            assert (status, answer["error"]) == (400, "bad_request")
            assert "unknown field(s) txt" in answer["detail"]
            status, answer = await post(a.http_port, target, {"msg": "0x8201"})
            assert status == 400
            status, answer = await post(
                a.http_port, "/terminals/abc/commands", {"msg_id": "0x8201"}
            )
            assert (status, answer["error"]) == (400, "bad_request")
            assert a.metric("jt808_commands_total", {"outcome": "offline"}) == 1


async def test_a_command_is_resent_on_the_schedule_then_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = {"command_timeout_s": 10, "command_retries": 2}
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery, node(nursery, config=config) as a:
            terminal = await online(a.port)
            arrivals: list[tuple[float, int]] = []

            async def ignore() -> None:
                while True:
                    command = await terminal.recv()
                    arrivals.append((trio.current_time(), command.serial))

            async with trio.open_nursery() as reader:
                reader.start_soon(ignore)
                start = trio.current_time()
                with pytest.raises(CommandTimeoutError, match="3 sending"):
                    await a.server.command(PHONE, "0x8201", {})
                reader.cancel_scope.cancel()
            assert trio.current_time() - start == pytest.approx(10 + 20 + 60)
            times = [round(at - start) for at, _ in arrivals]
            assert times == [0, 10, 30]  # T1 = 10, T2 = T1 x 2, T3 = T2 x 3
            assert len({serial for _, serial in arrivals}) == 1  # resent with its serial
            assert a.metric("jt808_command_resends_total") == 2
            assert a.metric("jt808_commands_total", {"outcome": "timeout"}) == 1
            await terminal.aclose()


async def test_a_receipt_stops_resends_and_the_specific_answer_settles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shoot = {
        "channel": 1,
        "command": 1,
        "interval_s": 0,
        "save": 0,
        "resolution": 1,
        "quality": 5,
        "brightness": 128,
        "contrast": 64,
        "saturation": 64,
        "chroma": 128,
    }
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            terminal = await online(a.port)

            async def camera() -> None:
                command = await terminal.recv()
                receipt = TerminalGeneralResponse(
                    reply_serial=command.serial, reply_msg_id=0x8801, result=0
                )
                await terminal.send(receipt)
                await trio.sleep(25)  # past T1 and T2: no resend, the receipt came
                await terminal.send(
                    CameraShootResponse(reply_serial=command.serial, result=0, media_ids=(7,))
                )

            nursery.start_soon(camera)
            answer = await a.server.command(PHONE, "0x8801", shoot)
            assert answer["reply"]["msg_id"] == "0x0805"
            assert answer["reply"]["body"]["media_ids"] == [7]
            assert answer["command"]["attempts"] == 1

            # A failure answer settles at once, whatever the command expects.
            async def refuse() -> None:
                command = await terminal.recv()
                await terminal.send(
                    TerminalGeneralResponse(
                        reply_serial=command.serial,
                        reply_msg_id=command.msg_id,
                        result=RESULT_NOT_SUPPORTED,
                    )
                )

            nursery.start_soon(refuse)
            start = trio.current_time()
            answer = await a.server.command(PHONE, "0x8201", {})
            assert answer["reply"]["msg_id"] == "0x0001"
            assert answer["reply"]["body"]["result"] == RESULT_NOT_SUPPORTED
            assert trio.current_time() - start < 1
            await terminal.aclose()


async def test_a_disconnect_fails_the_waiting_command() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            terminal = await online(a.port)

            async def hang_up() -> None:
                await terminal.recv()
                await terminal.aclose()

            nursery.start_soon(hang_up)
            with pytest.raises(TerminalOfflineError):
                await a.server.command(PHONE, "0x8201", {})


async def test_a_long_command_goes_in_packages_and_the_terminal_may_ask_for_some_again() -> None:
    params = [{"param_id": 0x0013, "value": f"server-{n:03d}.example.org:6808"} for n in range(60)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            terminal = await online(a.port)

            async def device() -> None:
                first = await terminal.recv()
                assert first.header.subpackage
                total = first.header.package_total
                assert total is not None
                assert total >= 2
                packages = [first] + [await terminal.recv() for _ in range(total - 1)]
                await terminal.send(
                    TerminalRetransmitRequest(original_serial=first.serial, packet_ids=(2,))
                )
                again = await terminal.recv()
                assert again.header.package_index == 2
                assert again.serial == packages[1].serial
                await terminal.send(
                    TerminalGeneralResponse(
                        reply_serial=packages[-1].serial, reply_msg_id=0x8103, result=0
                    )
                )

            nursery.start_soon(device)
            answer = await a.server.command(PHONE, "0x8103", {"params": params})
            assert answer["reply"]["msg_id"] == "0x0001"
            assert answer["reply"]["body"]["result"] == 0
            await terminal.aclose()


async def test_jt808_send_posts_to_the_operator_port(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, node(nursery) as a:
            terminal = await online(a.port)
            nursery.start_soon(answer_location, terminal)
            url = f"http://127.0.0.1:{a.http_port}"
            argv = ["send", "13800138000", "0x8201", "--http", url, "--token", TEST_TOKEN]
            code = await trio.to_thread.run_sync(cli.main, argv)
            assert code == 0
            answer = json.loads(capsys.readouterr().out)
            assert answer["reply"]["msg_id"] == "0x0201"

            argv = ["send", "13800138999", "0x8201", "--http", url, "--token", TEST_TOKEN]
            assert await trio.to_thread.run_sync(cli.main, argv) == 1
            assert json.loads(capsys.readouterr().out)["error"] == "offline"
            assert cli.main(["send", PHONE, "0x8201", "--body", "[1]"]) == 2
            await terminal.aclose()


async def test_a_command_given_to_one_node_reaches_the_terminal_on_another() -> None:
    sessions, transport = InMemorySessionRecords(), InMemoryTransport()
    shared = {"sessions": sessions, "transport": transport}
    with trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            node(nursery, config={"node_id": "node-a"}, **shared) as a,
            node(nursery, config={"node_id": "node-b"}, **shared) as b,
        ):
            terminal = await online(b.port)
            await wait_until(lambda: PHONE in sessions.rows)  # written off the connection task
            assert sessions.rows[PHONE][0] == "node-b"
            nursery.start_soon(answer_location, terminal)
            status, answer = await post(
                a.http_port, "/terminals/13800138000/commands", {"msg_id": "0x8201"}
            )
            assert status == 200, answer
            assert answer["node"] == "node-b"
            assert answer["reply"]["msg_id"] == "0x0201"
            assert b.metric("jt808_commands_relayed_total") == 1

            # A parameter answer (0x0104) goes back the same way.
            async def parameters() -> None:
                command = await terminal.recv()
                values = tuple(TerminalParameter(param_id=1, value=n) for n in range(3))
                await terminal.send(QueryParamsResponse(reply_serial=command.serial, params=values))

            nursery.start_soon(parameters)
            answer = await a.server.command("13800138000", "0x8104", None)
            assert [p["value"] for p in answer["reply"]["body"]["params"]] == [0, 1, 2]

            await terminal.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert sessions.rows == {}
            with pytest.raises(TerminalOfflineError):
                await a.server.command(PHONE, "0x8201", {})


async def test_a_command_for_a_terminal_on_a_node_that_is_gone_fails_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sessions, transport = InMemorySessionRecords(), InMemoryTransport()
    with trio.fail_after(100):
        async with (
            trio.open_nursery() as nursery,
            node(nursery, sessions=sessions, transport=transport) as a,
        ):
            # a row left by a node that crashed
            await sessions.online(PHONE, "node-z", WALL, "10.0.0.1:4000")
            start = trio.current_time()
            status, answer = await post(
                a.http_port, f"/terminals/{PHONE}/commands", {"msg_id": "0x8201"}
            )
            assert (status, answer["error"]) == (502, "node_unreachable")
            assert trio.current_time() - start < 10  # not the whole command schedule

            # a node that takes messages but never answers them
            silent: trio.MemorySendChannel[dict[str, Any]]
            silent, inbox = trio.open_memory_channel[dict[str, Any]](10)
            await nursery.start(transport.listen, "node-y", silent)
            await sessions.online(PHONE, "node-y", WALL, "10.0.0.2:4000")
            with pytest.raises(NodeUnreachableError, match="did not take the command"):
                await a.server.command(PHONE, "0x8201", {})
            assert (await inbox.receive())["type"] == "command"
            nursery.cancel_scope.cancel()
