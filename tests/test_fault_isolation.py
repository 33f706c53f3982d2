"""Fault isolation in the terminal server: an error while handling one connection ends that
connection only; a registry that cannot decide leaves a login unanswered; failed logins are
locked out; a peer cannot flood the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

from ingest import InMemoryTerminalRegistry, RegistrationOutcome
from ingest.interfaces import AuthRequest, Completion, PositionRecord, RegistrationRequest
from protocol.errors import RESULT_FAILURE, RESULT_MESSAGE_ERROR
from protocol.messages.terminal import TerminalAuth
from tests.test_ingest_server import (
    PHONE,
    FakeTerminal,
    base_config,
    report,
    running,
    wait_until,
)

OTHER = "013900000001"


class FaultyRegistry(InMemoryTerminalRegistry):
    """Raises (or cannot decide) for the phones listed; the in-memory registry otherwise."""

    def __init__(self, base: InMemoryTerminalRegistry) -> None:
        super().__init__()
        self.terminals = base.terminals
        self.raise_for: set[str] = set()
        self.undecided = False
        self.calls = 0

    async def register(self, request: RegistrationRequest) -> RegistrationOutcome:
        self.calls += 1
        if request.phone in self.raise_for:
            raise RuntimeError("registry bug")
        if self.undecided:
            return RegistrationOutcome(result=None)
        return await super().register(request)

    async def authenticate(self, request: AuthRequest) -> bool | None:
        self.calls += 1
        if request.phone in self.raise_for:
            raise RuntimeError("registry bug")
        if self.undecided:
            return None
        return await super().authenticate(request)


async def steady(terminal: FakeTerminal, count: int) -> None:
    for n in range(count):
        serial = await terminal.send(report(n))
        await terminal.ack(serial, 0x0200)


async def test_an_error_in_one_connection_closes_only_that_connection() -> None:
    with trio.fail_after(20):
        async with running() as h:
            good = await h.terminal()
            await good.login()
            registry = FaultyRegistry(h.registry)
            registry.raise_for.add(OTHER)
            h.server.registry = registry
            victim = await h.terminal(OTHER)
            await victim.send(TerminalAuth(auth_code="whatever"))
            assert await victim.closed()
            await wait_until(
                lambda: h.metric("jt808_contained_errors_total", {"where": "connection"}) == 1
            )
            assert h.metric("jt808_connections_closed_total", {"reason": "internal error"}) == 1
            await steady(good, 5)  # the other terminal never noticed
            newcomer = await h.terminal("013900000002")
            await newcomer.login()  # and the server still accepts
            await steady(newcomer, 2)


@pytest.mark.parametrize("path", ["task", "readiness"])
async def test_an_error_while_storing_closes_only_that_connection(path: str) -> None:
    """A sink that raises for one terminal, on the connection's task (``submit``) and in the
    readiness loop (``submit_nowait``, ingest.readiness)."""
    with trio.fail_after(20):
        async with running() as h:
            good = await h.terminal()
            await good.login()
            bad = await h.terminal(OTHER)
            await bad.login()
            submit = h.sink.submit
            submit_nowait = h.sink.submit_nowait

            async def failing(records: Sequence[PositionRecord]) -> Completion:
                if records[0].phone == OTHER:
                    raise RuntimeError("sink bug")
                return await submit(records)

            def failing_now(records: Sequence[PositionRecord]) -> Completion | None:
                if records[0].phone == OTHER:
                    raise RuntimeError("sink bug")
                return submit_nowait(records)

            if path == "task":
                h.server.submit_nowait = None  # every position through the task's submit
                h.server.sink.submit = failing  # type: ignore[method-assign]
            else:
                h.server.submit_nowait = failing_now
            await bad.send(report(1))
            assert await bad.closed()
            await steady(good, 5)
            assert {r.phone for r in h.sink.records} == {PHONE}


async def test_a_registry_that_cannot_decide_leaves_the_login_unanswered() -> None:
    with trio.fail_after(20):
        async with running() as h:
            first = await h.terminal()
            code = await first.login()
            await first.aclose()
            registry = FaultyRegistry(h.registry)
            registry.undecided = True
            h.server.registry = registry
            terminal = await h.terminal()
            await terminal.send(TerminalAuth(auth_code=code))
            with trio.move_on_after(0.5) as waited:
                await terminal.recv()
            assert waited.cancelled_caught  # no answer: the terminal will send it again
            assert h.metric("jt808_logins_unanswered_total", {"msg": "authenticate"}) == 1
            registry.undecided = False
            await terminal.authenticate(code)  # its retransmission is answered
            await steady(terminal, 2)


async def test_repeated_authentication_failures_lock_the_phone_out() -> None:
    config = base_config(auth_failures_per_phone=3, max_failures=2)
    with trio.fail_after(20):
        async with running(config) as h:
            owner = await h.terminal()
            code = await owner.login()
            await owner.aclose()
            registry = FaultyRegistry(h.registry)
            h.server.registry = registry
            for _ in range(2):  # two connections of a guesser, closed after two failures each
                guesser = await h.terminal()
                for _ in range(2):
                    await guesser.authenticate("guess", result=RESULT_FAILURE)
                assert await guesser.closed()
            assert h.metric("jt808_auth_lockouts_total", {"scope": "phone"}) == 1
            asked = registry.calls
            terminal = await h.terminal()
            await terminal.authenticate(code, result=RESULT_FAILURE)  # locked: refused unchecked
            assert registry.calls == asked
            # the guesser's fourth attempt and the owner's were refused by the lock-out
            assert h.metric("jt808_auth_locked_total", {"scope": "phone"}) == 2
            other = await h.terminal(OTHER)
            await other.login()  # another phone is not affected


async def test_a_junk_flood_logs_a_few_lines_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(20):
        async with running() as h:
            good = await h.terminal()
            await good.login()
            flooder = await h.terminal(OTHER)
            wire, _ = flooder.frame(report(1))
            bad = wire[:-2] + bytes([wire[-2] ^ 0xFF]) + wire[-1:]  # wrong check code
            with caplog.at_level(logging.WARNING, logger="ingest.server"):
                await flooder.send_raw(bad * 500)
                await wait_until(
                    lambda: h.metric("jt808_decode_errors_total", {"kind": "checksum"}) == 500
                )
            bad_frame_lines = [r for r in caplog.records if "bad frame" in r.getMessage()]
            assert len(bad_frame_lines) == h.server.quiet.burst
            assert h.metric("jt808_log_lines_suppressed_total", {"kind": "checksum"}) == 495
            (held,) = h.server.quiet.ended(trio.current_time() + h.server.quiet.window_s)
            assert held.count == 495
            await steady(good, 2)


async def test_a_nul_in_an_auth_code_is_a_message_error_and_reaches_no_registry() -> None:
    # The frame that once ended the process: 0x0102 whose auth code holds a NUL byte.
    frame = bytes.fromhex("7e0102000501360000002002da6162006364cd7e")
    with trio.fail_after(20):
        async with running() as h:
            registry = FaultyRegistry(h.registry)
            h.server.registry = registry
            attacker = await FakeTerminal.connect(h.port, "013600000020")
            h.terminals.append(attacker)
            await attacker.send_raw(frame)
            reply = await attacker.recv()
            assert getattr(reply.message, "result", None) == RESULT_MESSAGE_ERROR
            assert registry.calls == 0
            good = await h.terminal()
            await good.login()
            await steady(good, 2)


async def test_connection_events_are_summed_up_not_logged_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(20), caplog.at_level(logging.INFO, logger="ingest.server"):
        async with running() as h:
            for n in range(5):
                terminal = await h.terminal(f"01390000010{n}")
                await terminal.login()
                await terminal.aclose()
            await wait_until(lambda: h.server.activity["closed: peer closed"] == 5)
            stays = await h.terminal()
            await stays.login()
            info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert not [line for line in info if "connected from" in line or "closed:" in line]
            summary = h.server.activity_summary()
            assert summary == (
                "terminals in the last 60 s: 6 connected; 6 registered; 6 authenticated; "
                "5 closed (peer closed 5); 1 online, 1 connections open"
            )
            assert h.server.activity_summary() is None  # reset: nothing since


async def test_a_write_that_does_not_finish_in_time_closes_the_connection() -> None:
    """The reaper enforces send_timeout_s on a write in progress (a peer that stopped
    reading): that connection closes, others go on."""
    with trio.fail_after(20):
        async with running(base_config(send_timeout_s=30)) as h:
            good = await h.terminal()
            await good.login()
            stuck = await h.terminal(OTHER)
            await stuck.login()
            (connection,) = [c for c in h.server._connections if c.phone == OTHER]
            now = trio.current_time()
            connection._send_since = now - 29  # a write begun 29 s ago: not yet
            connection.expire(now)
            assert not connection.stopping()
            connection._send_since = now - 30
            connection.expire(now)
            assert await stuck.closed()
            await wait_until(
                lambda: h.metric("jt808_connections_closed_total", {"reason": "send timeout"}) == 1
            )
            await steady(good, 3)


async def test_a_write_the_socket_cannot_take_at_once_is_finished_in_order() -> None:
    """Writes go straight to the descriptor; what the kernel does not take (a peer slow to
    read) is finished by trio's send_all, and the peer gets every byte in order."""
    import socket  # noqa: PLC0415

    with trio.fail_after(20):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            (connection,) = list(h.server._connections)
            connection.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            terminal.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            payload = bytes(range(256)) * 1024  # 256 KiB: far more than both buffers
            written: list[bool] = []

            async def write() -> None:
                written.append(await connection._send_wire(payload))
                written.append(await connection._send_wire(b"after"))

            received = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await trio.sleep(0.2)
                assert not written  # blocked on the slow reader, nothing lost
                while len(received) < len(payload) + 5:
                    received += await terminal.stream.receive_some(65536)
            assert written == [True, True]
            assert bytes(received) == payload + b"after"


async def test_one_settled_batch_acknowledges_every_connection_in_it() -> None:
    """The server's acknowledging task: a stalled sink holds the acks of several
    connections; when it resumes they all leave, in each connection's order, and a
    connection that closed meanwhile is simply skipped."""
    with trio.fail_after(20):
        async with running(base_config(max_unacked=4)) as h:
            terminals = [await h.terminal(f"01390000020{n}") for n in range(3)]
            for terminal in terminals:
                await terminal.login()
            h.sink.stall()
            sent: dict[FakeTerminal, list[int]] = {}
            for terminal in terminals:
                sent[terminal] = [await terminal.send(report(n)) for n in range(4)]
            await wait_until(lambda: h.sink.submitted == 12)
            await terminals[2].aclose()  # gone before its batch settles
            await wait_until(lambda: len(h.server._connections) == 2)
            h.sink.resume()
            for terminal in terminals[:2]:
                for serial in sent[terminal]:
                    await terminal.ack(serial, 0x0200)
            await steady(terminals[0], 5)  # room again: the reader goes on
            assert h.metric("jt808_unacked_reports") == 0
