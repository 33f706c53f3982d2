"""Connections parked with the readiness loop (ingest.readiness): plain reports handled there,
everything else handed to the connection's task, and a loop that fails wakes every parked
connection."""

from __future__ import annotations

import socket

import trio

from protocol.errors import RESULT_NOT_SUPPORTED
from protocol.messages.params import QueryTerminalParams
from protocol.messages.terminal import Heartbeat, PlatformGeneralResponse
from tests.test_ingest_server import PHONE, report, running, wait_until

OTHER = "013900000001"


async def test_plain_reports_and_heartbeats_are_handled_without_waking_the_task() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            await wait_until(lambda: len(h.server.readiness) == 1)
            handovers = h.server.readiness.handovers
            for n in range(20):
                serial = await terminal.send(report(n) if n % 5 else Heartbeat())
                await terminal.ack(serial, 0x0200 if n % 5 else 0x0002)
            assert h.server.readiness.handovers == handovers
            assert len(h.server.readiness) == 1
            assert len(h.sink.records) == 16
            assert {r.phone for r in h.sink.records} == {PHONE}


async def test_other_frames_go_to_the_task_and_the_connection_parks_again() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            await wait_until(lambda: len(h.server.readiness) == 1)
            handovers = h.server.readiness.handovers
            # A platform message sent uplink: not supported, answered by the task.
            serial = await terminal.send(QueryTerminalParams())
            await terminal.ack(serial, 0x8104, RESULT_NOT_SUPPORTED)
            assert h.server.readiness.handovers == handovers + 1
            await wait_until(lambda: len(h.server.readiness) == 1)
            # A read holding a plain report and then another frame: the report is handled,
            # the other frame is handed over, and both are answered (the report's ack once
            # it is stored, so after the other reply).
            first, report_serial = terminal.frame(report(1))
            second, query_serial = terminal.frame(QueryTerminalParams())
            await terminal.send_raw(first + second)
            replies = {(await terminal.recv()).message for _ in range(2)}
            assert replies == {
                PlatformGeneralResponse(reply_serial=report_serial, reply_msg_id=0x0200, result=0),
                PlatformGeneralResponse(
                    reply_serial=query_serial, reply_msg_id=0x8104, result=RESULT_NOT_SUPPORTED
                ),
            }
            assert len(h.sink.records) == 1
            await wait_until(lambda: len(h.server.readiness) == 1)


async def test_the_end_of_the_stream_while_parked_closes_the_connection() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            await wait_until(lambda: len(h.server.readiness) == 1)
            await terminal.aclose()
            h.terminals.clear()
            await wait_until(
                lambda: h.metric("jt808_connections_closed_total", {"reason": "peer closed"}) == 1
            )
            assert len(h.server.readiness) == 0


class _Broken:
    """A parked entry whose handler fails: the loop itself then fails."""

    woken = False

    def readable(self) -> None:
        raise RuntimeError("readiness bug")

    def wake(self) -> None:
        self.woken = True


async def test_a_failing_loop_wakes_every_parked_connection_and_restarts() -> None:
    with trio.fail_after(20):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            readiness = h.server.readiness
            await wait_until(lambda: len(readiness) == 1)
            left, right = socket.socketpair()
            with left, right:
                broken = _Broken()
                readiness.park(left.fileno(), broken)
                right.send(b"x")
                await wait_until(lambda: broken.woken)
                assert not readiness.running
                # Served by its own task meanwhile, then parked again after the restart.
                serial = await terminal.send(report(1))
                await terminal.ack(serial, 0x0200)
                await wait_until(
                    lambda: h.metric("jt808_service_restarts_total", {"service": "readiness"}) == 1
                )
                await wait_until(lambda: readiness.running)
                serial = await terminal.send(report(2))
                await terminal.ack(serial, 0x0200)
                await wait_until(lambda: len(readiness) == 1)
                handovers = readiness.handovers
                serial = await terminal.send(report(3))
                await terminal.ack(serial, 0x0200)
                assert readiness.handovers == handovers
            assert len(h.sink.records) == 3
