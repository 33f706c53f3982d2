"""The ingestion server over real TCP, with our own codec as the fake terminal."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingest import (
    InMemoryPositionSink,
    InMemoryTerminalRegistry,
    Metrics,
    Server,
    ServerConfig,
)
from ingest.capture import read_capture
from protocol import Edition, Packet, StreamDecoder, encode
from protocol.errors import RESULT_FAILURE, RESULT_MESSAGE_ERROR, RESULT_NOT_SUPPORTED
from protocol.fields import GMT8
from protocol.framing import frame
from protocol.header import Header, build_header
from protocol.messages.base import Message
from protocol.messages.location import STATUS_FIXED, LocationBatch, LocationReport
from protocol.messages.terminal import (
    REGISTER_TERMINAL_UNKNOWN,
    Heartbeat,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalLogout,
    TerminalRegister,
    TerminalRegisterResponse,
)
from tests.operator_auth import AUTH_HEADER, memory_access

PHONE = "013800138000"
PHONE_2019 = "00000000013912345678"
T0 = datetime(2024, 5, 1, 8, 30, tzinfo=GMT8)
WALL = datetime(2024, 5, 1, 0, 30, tzinfo=UTC)


def base_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(**{"host": "127.0.0.1", "port": 0, "http_port": 0, **overrides})


def report(n: int) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=STATUS_FIXED,
        latitude=30_000_000 + n,
        longitude=120_000_000 + n,
        altitude_m=10,
        speed=n % 1000,
        direction=n % 360,
        time=T0,
    )


def registration() -> TerminalRegister:
    return TerminalRegister(
        province=31,
        city=100,
        manufacturer="ACME1",
        model="T-808",
        terminal_id="ID00001",
        plate_color=1,
        plate="沪A12345",
    )


class FakeTerminal:
    """A terminal built from our codec: encodes uplinks, decodes downlinks."""

    def __init__(self, stream: trio.SocketStream, phone: str, edition: Edition) -> None:
        self.stream = stream
        self.phone = phone
        self.edition = edition
        self.decoder = StreamDecoder()
        self._serials = itertools.count(1)

    @classmethod
    async def connect(
        cls, port: int, phone: str = PHONE, edition: Edition = Edition.V2013
    ) -> FakeTerminal:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), phone, edition)

    def frame(self, message: Message, serial: int | None = None) -> tuple[bytes, int]:
        serial = next(self._serials) if serial is None else serial
        return encode(message, phone=self.phone, serial=serial, edition=self.edition), serial

    async def send(self, message: Message, serial: int | None = None) -> int:
        wire, serial = self.frame(message, serial)
        await self.stream.send_all(wire)
        return serial

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> Packet:
        while True:
            event = self.decoder.next_event()
            if event is not None:
                assert isinstance(event, Packet), event
                return event
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)

    async def ack(self, serial: int, msg_id: int, result: int = 0) -> Packet:
        reply = await self.recv()
        assert reply.message == PlatformGeneralResponse(
            reply_serial=serial, reply_msg_id=msg_id, result=result
        ), reply.message
        return reply

    async def request(self, message: Message) -> Packet:
        await self.send(message)
        return await self.recv()

    async def login(self) -> str:
        serial = await self.send(registration())
        reply = await self.recv()
        assert isinstance(reply.message, TerminalRegisterResponse)
        assert reply.message.reply_serial == serial
        assert reply.message.result == 0
        code = reply.message.auth_code
        assert code
        await self.authenticate(code)
        return code

    async def authenticate(self, code: str, result: int = 0) -> None:
        imei = "860000000000001" if self.edition is Edition.V2019 else None
        firmware = "1.0.7" if self.edition is Edition.V2019 else None
        serial = await self.send(TerminalAuth(auth_code=code, imei=imei, software_version=firmware))
        await self.ack(serial, 0x0102, result)

    async def closed(self) -> bool:
        """True when the server closed the connection (after any replies still in flight)."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Harness:
    server: Server
    sink: InMemoryPositionSink
    registry: InMemoryTerminalRegistry
    port: int
    nursery: trio.Nursery
    terminals: list[FakeTerminal]

    async def terminal(self, phone: str = PHONE, edition: Edition = Edition.V2013) -> FakeTerminal:
        terminal = await FakeTerminal.connect(self.port, phone, edition)
        self.terminals.append(terminal)
        return terminal

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@asynccontextmanager
async def running(
    config: ServerConfig | None = None, *, sink: InMemoryPositionSink | None = None
) -> AsyncIterator[Harness]:
    sink = sink if sink is not None else InMemoryPositionSink()
    registry = InMemoryTerminalRegistry()
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        config or base_config(),
        sink=sink,
        registry=registry,
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
        wall_clock=lambda: WALL,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        ports = await nursery.start(server.run)
        harness = Harness(server, sink, registry, ports[0], nursery, [])
        try:
            yield harness
        finally:
            for terminal in harness.terminals:
                await trio.aclose_forcefully(terminal.stream)
            nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 - polls the server's state from outside
        await trio.sleep(0.005)


# ---------------------------------------------------------------------------------------------


async def test_register_authenticate_and_report_positions() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            code = await terminal.login()
            assert h.registry.terminals[PHONE].auth_code == code
            assert not h.registry.terminals[PHONE].provisioned  # open policy

            serial = await terminal.send(report(1))
            await terminal.ack(serial, 0x0200)
            # ack=durable: the position is in the sink by the time its ack arrives
            assert [r.location.latitude for r in h.sink.records] == [30_000_001]
            record = h.sink.records[0]
            assert (record.phone, record.serial, record.msg_id) == (PHONE, serial, 0x0200)
            assert record.batch_type is None
            assert record.received_at == WALL

            batch = LocationBatch(batch_type=1, positions=(report(2), report(3)))
            serial = await terminal.send(batch)
            await terminal.ack(serial, 0x0704)
            assert [(r.batch_type, r.index) for r in h.sink.records[1:]] == [(1, 0), (1, 1)]
            assert h.metric("jt808_frames_total", {"msg_id": "0x0200"}) == 1
            await wait_until(lambda: h.metric("jt808_ack_latency_seconds_count") == 2)
            await terminal.aclose()


async def test_2019_terminal_gets_2019_replies_and_its_imei_is_recorded() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal(PHONE_2019, Edition.V2019)
            await terminal.login()
            info = h.registry.terminals[PHONE_2019]
            assert (info.imei, info.software_version) == ("860000000000001", "1.0.7")
            serial = await terminal.send(Heartbeat())
            reply = await terminal.ack(serial, 0x0002)
            assert reply.header.layout is Edition.V2019
            assert reply.header.phone == PHONE_2019
            await terminal.aclose()


async def test_serials_of_replies_count_up() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            serials = []
            for _ in range(3):
                serial = await terminal.send(Heartbeat())
                serials.append((await terminal.ack(serial, 0x0002)).serial)
            assert serials == [serials[0], serials[0] + 1, serials[0] + 2]
            await terminal.aclose()


async def test_unauthenticated_reports_are_refused_and_not_stored() -> None:
    config = base_config(max_failures=3)
    with trio.fail_after(10):
        async with running(config) as h:
            terminal = await h.terminal()
            for n in range(2):
                serial = await terminal.send(report(n))
                await terminal.ack(serial, 0x0200, RESULT_FAILURE)
            serial = await terminal.send(TerminalAuth(auth_code="wrong"))
            await terminal.ack(serial, 0x0102, RESULT_FAILURE)  # third failure: closed
            assert await terminal.closed()
            assert h.sink.records == []
            assert h.sink.submitted == 0
            assert h.metric("jt808_auth_failures_total") == 1
            assert h.metric("jt808_refused_messages_total") == 2


async def test_registry_policy_refuses_unknown_terminals() -> None:
    with trio.fail_after(10):
        async with running(base_config(registration="registry")) as h:
            terminal = await h.terminal()
            reply = await terminal.request(registration())
            assert reply.message == TerminalRegisterResponse(
                reply_serial=1, result=REGISTER_TERMINAL_UNKNOWN
            )
            h.registry.provision("013800138001")
            known = await h.terminal("013800138001")
            await known.login()
            assert h.registry.terminals["013800138001"].provisioned
            await terminal.aclose()
            await known.aclose()


async def test_a_retransmitted_report_is_stored_once_and_acked_twice() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            serial = await terminal.send(report(7))
            await terminal.ack(serial, 0x0200)
            await terminal.send(report(7), serial=serial)
            await terminal.ack(serial, 0x0200)
            assert len(h.sink.records) == 1
            assert h.metric("jt808_retransmissions_total") == 1

            # Same serial, other body: a new report (the terminal's serial wrapped or it reset)
            await terminal.send(report(8), serial=serial)
            await terminal.ack(serial, 0x0200)
            assert len(h.sink.records) == 2

            # A reconnecting terminal retransmitting on its new connection is deduplicated too.
            await terminal.aclose()
            again = await h.terminal()
            await again.login()
            await again.send(report(8), serial=serial)
            await again.ack(serial, 0x0200)
            assert len(h.sink.records) == 2
            await again.aclose()


async def test_bad_frames_do_not_disturb_good_frames_or_other_connections() -> None:
    with trio.fail_after(10):
        async with running() as h:
            noisy = await h.terminal()
            quiet = await h.terminal("013800138009")
            await noisy.login()
            await quiet.login()

            good, serial = noisy.frame(report(1))
            bad_check = bytearray(noisy.frame(report(2), serial=40)[0])
            bad_check[-2] ^= 0x55  # corrupt the check code (no escape bytes in this frame)
            oversize = b"\x7e" + b"\x11" * 5000 + b"\x7e"
            garbage = b"\x00\xff hello \x7d\x7d\x7e\x7e"
            await noisy.send_raw(garbage + bytes(bad_check) + oversize)
            # The bad check code is answered "message error" at its serial.
            await noisy.ack(40, 0x0200, RESULT_MESSAGE_ERROR)
            # protocol.framing drops what follows an oversize frame in the same read, so the
            # good frame goes in its own write once the oversize one was seen.
            await wait_until(
                lambda: h.metric("jt808_decode_errors_total", {"kind": "frame_too_large"}) == 1
            )
            await noisy.send_raw(good)
            await noisy.ack(serial, 0x0200)
            assert [r.location.latitude for r in h.sink.records] == [30_000_001]

            serial = await quiet.send(report(3))
            await quiet.ack(serial, 0x0200)
            assert h.metric("jt808_decode_errors_total", {"kind": "checksum"}) == 1
            assert h.metric("jt808_decode_errors_total", {"kind": "frame_too_large"}) == 1

            # A message we do not handle is "not supported"; the connection goes on.
            serial = await noisy.send(TerminalRegisterResponse(reply_serial=1, result=1))
            await noisy.ack(serial, 0x8100, RESULT_NOT_SUPPORTED)
            serial = await noisy.send(Heartbeat())
            await noisy.ack(serial, 0x0002)
            await noisy.aclose()
            await quiet.aclose()


async def test_junk_flood_keeps_buffers_under_their_caps() -> None:
    config = base_config()
    with trio.fail_after(20):
        async with running(config) as h:
            flood = await h.terminal()
            await flood.login()
            # 2 MiB without a flag, then 2 MiB of one endless "frame", then a good frame
            chunk = b"\x01" * 65536
            for _ in range(32):
                await flood.send_raw(chunk)
            await flood.send_raw(b"\x7e")
            for _ in range(32):
                await flood.send_raw(chunk)
            serial = await flood.send(report(1))
            await flood.ack(serial, 0x0200)
            connection = next(iter(h.server._connections))
            assert connection.decoder.buffered <= config.max_buffered_bytes
            assert h.metric("jt808_decoder_buffered_bytes") <= config.max_buffered_bytes
            await flood.aclose()


async def test_a_second_connection_takes_over_the_terminal() -> None:
    with trio.fail_after(10):
        async with running() as h:
            old = await h.terminal()
            code = await old.login()
            new = await h.terminal()
            await new.authenticate(code)
            assert await old.closed()
            await wait_until(lambda: len(h.server._connections) == 1)
            assert [t["phone"] for t in h.server.terminals()] == [PHONE]
            serial = await new.send(report(1))
            await new.ack(serial, 0x0200)
            assert h.metric("jt808_takeovers_total") == 1
            assert h.metric("jt808_connections_closed_total", {"reason": "taken over"}) == 1
            await new.aclose()
            await wait_until(lambda: not h.server._connections)
            assert list(h.server.directory.holders()) == []


async def test_a_stalled_sink_stops_acks_and_reading_until_it_resumes() -> None:
    config = base_config(max_unacked=4)
    with trio.fail_after(10):
        async with running(config) as h:
            terminal = await h.terminal()
            await terminal.login()
            h.sink.stall()
            serials = [await terminal.send(report(n)) for n in range(10)]
            await wait_until(lambda: h.sink.submitted == 4)
            await wait_until(lambda: h.metric("jt808_connections_backpressured") == 1)
            await trio.sleep(0.1)
            assert h.sink.submitted == 4  # not reading: the rest waits in the socket
            with trio.move_on_after(0.1) as scope:
                await terminal.recv()
            assert scope.cancelled_caught  # no ack while nothing is durable

            h.sink.resume()
            for serial in serials:
                await terminal.ack(serial, 0x0200)
            assert len(h.sink.records) == 10
            assert h.metric("jt808_connections_backpressured") == 0
            assert h.metric("jt808_unacked_reports") == 0
            await terminal.aclose()


async def test_frames_of_one_read_are_stored_together_and_acked_in_order() -> None:
    """Several reports, a retransmission and a heartbeat in one write: the heartbeat is
    answered at once, every report's ack leaves once it is durable, in arrival order."""
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            first, first_serial = terminal.frame(report(1))
            await terminal.send_raw(first)
            await terminal.ack(first_serial, 0x0200)
            frames = [terminal.frame(report(n)) for n in range(2, 6)]
            repeat = first  # the terminal missed the ack and sends it again
            beat, beat_serial = terminal.frame(Heartbeat())
            h.sink.stall()
            await terminal.send_raw(b"".join(w for w, _ in frames) + repeat + beat)
            await wait_until(lambda: h.sink.submitted == 5)
            await terminal.ack(beat_serial, 0x0002)  # needs no storage: answered at once
            with trio.move_on_after(0.1) as scope:
                await terminal.recv()
            assert scope.cancelled_caught  # nothing stored yet, so no report is acked
            h.sink.resume()
            for _, serial in frames:
                await terminal.ack(serial, 0x0200)
            await terminal.ack(first_serial, 0x0200)
            assert len(h.sink.records) == 5  # the repeat is stored once
            assert h.metric("jt808_unacked_reports") == 0
            await terminal.aclose()


async def test_a_batch_that_is_not_durable_is_not_acknowledged() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            h.sink.durable = False
            lost = await terminal.send(report(1))
            await wait_until(lambda: h.metric("jt808_batches_not_durable_total") == 1)
            h.sink.durable = True
            serial = await terminal.send(Heartbeat())
            await terminal.ack(serial, 0x0002)  # nothing for the lost report came first
            await terminal.send(report(1), serial=lost)  # the terminal retransmits
            await terminal.ack(lost, 0x0200)
            assert len(h.sink.records) == 1
            await terminal.aclose()


async def test_immediate_acks_do_not_wait_for_storage() -> None:
    with trio.fail_after(10):
        async with running(base_config(ack="immediate")) as h:
            terminal = await h.terminal()
            await terminal.login()
            h.sink.stall()
            serial = await terminal.send(report(1))
            await terminal.ack(serial, 0x0200)
            assert h.sink.records == []
            h.sink.resume()
            await wait_until(lambda: len(h.sink.records) == 1)
            await terminal.aclose()


async def test_logout_is_acknowledged_then_the_connection_closes() -> None:
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal()
            await terminal.login()
            serial = await terminal.send(TerminalLogout())
            await terminal.ack(serial, 0x0003)
            assert await terminal.closed()


async def test_idle_connections_are_closed(autojump_clock: trio.testing.MockClock) -> None:
    config = base_config(heartbeat_interval_s=30)  # idle timeout 3 x 30 s
    with trio.fail_after(1000):
        async with running(config) as h:
            terminal = await h.terminal()
            await terminal.login()
            start = trio.current_time()
            for _ in range(3):  # heartbeats keep it open past 90 s
                await trio.sleep(60)
                serial = await terminal.send(Heartbeat())
                await terminal.ack(serial, 0x0002)
            assert await terminal.closed()
            assert trio.current_time() - start == pytest.approx(180 + 90, abs=1)
            assert h.metric("jt808_connections_closed_total", {"reason": "idle timeout"}) == 1


async def test_a_slow_loris_is_closed_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = base_config(heartbeat_interval_s=30, auth_timeout_s=1000)
    with trio.fail_after(1000):
        async with running(config) as h:
            loris = await h.terminal("013800138077")
            wire, _ = loris.frame(report(1))
            honest = await h.terminal()
            await honest.login()

            async def drip() -> None:
                for byte in wire[:-1]:  # never the closing flag
                    await loris.send_raw(bytes([byte]))
                    await trio.sleep(5)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip)
                for n in range(4):
                    serial = await honest.send(report(n))
                    await honest.ack(serial, 0x0200)
                    await trio.sleep(20)
                assert await loris.closed()
                assert trio.current_time() < 100  # closed at 90 s, though bytes kept coming
                nursery.cancel_scope.cancel()
            assert len(h.sink.records) == 4


async def test_unauthenticated_connections_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = base_config(auth_timeout_s=20)
    with trio.fail_after(1000):
        async with running(config) as h:
            terminal = await h.terminal()
            assert await terminal.closed()
            assert trio.current_time() == pytest.approx(20, abs=1)
            assert h.metric("jt808_connections_closed_total", {"reason": "auth timeout"}) == 1


async def test_graceful_shutdown_waits_for_in_flight_acks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = InMemoryPositionSink(delay_s=3)
    config = base_config(shutdown_grace_s=10)
    with trio.fail_after(100):
        async with trio.open_nursery() as outer:
            await outer.start(sink.run)
            server = Server(
                config, sink=sink, registry=InMemoryTerminalRegistry(), wall_clock=lambda: WALL
            )
            ports = await outer.start(server.run)
            terminal = await FakeTerminal.connect(ports[0])
            await terminal.login()
            serial = await terminal.send(report(1))
            await wait_until(lambda: sink.submitted == 1)
            server.shutdown()
            await terminal.ack(serial, 0x0200)  # sent during the grace period
            assert len(sink.records) == 1
            assert await terminal.closed()
            await terminal.aclose()
            await wait_until(lambda: not server.accepting)
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream("127.0.0.1", ports[0])
            outer.cancel_scope.cancel()


async def test_shutdown_gives_up_after_the_grace(autojump_clock: trio.testing.MockClock) -> None:
    config = base_config(shutdown_grace_s=5)
    with trio.fail_after(100):
        async with running(config) as h:
            terminal = await h.terminal()
            await terminal.login()
            h.sink.stall()
            await terminal.send(report(1))
            await wait_until(lambda: h.sink.submitted == 1)
            start = trio.current_time()
            h.server.shutdown()
            assert await terminal.closed()
            assert trio.current_time() - start == pytest.approx(5, abs=0.5)


async def test_connections_past_the_cap_are_refused() -> None:
    with trio.fail_after(10):
        async with running(base_config(max_connections=1)) as h:
            first = await h.terminal()
            await first.login()
            second = await h.terminal("013800138002")
            assert await second.closed()
            assert h.metric("jt808_connections_refused_total") == 1
            serial = await first.send(Heartbeat())
            await first.ack(serial, 0x0002)
            await first.aclose()


async def test_capture_records_inbound_bytes(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with running(base_config(capture_dir=tmp_path)) as h:
            terminal = await h.terminal()
            sent = bytearray()
            for message in (registration(), Heartbeat(), report(1)):
                wire, _ = terminal.frame(message)
                sent += wire
                await terminal.send_raw(wire)
                await terminal.recv()
            await terminal.aclose()
            await wait_until(lambda: not h.server._connections)
        (path,) = await trio.Path(tmp_path).iterdir()
        header, records = await trio.to_thread.run_sync(read_capture, Path(path))
        assert header.start == WALL
        assert header.peer.startswith("127.0.0.1:")
        assert b"".join(data for _, data in records) == bytes(sent)
        offsets = [offset for offset, _ in records]
        assert offsets == sorted(offsets)


async def test_a_frame_for_an_unknown_header_edition_is_answered_in_kind() -> None:
    """A 2019 header with a body that does not decode gets a 2019 "message error" reply."""
    with trio.fail_after(10):
        async with running() as h:
            terminal = await h.terminal(PHONE_2019, Edition.V2019)
            await terminal.login()
            body = b"\x00\x01"  # far too short for a location report
            head = Header(
                msg_id=0x0200,
                body_length=len(body),
                phone=PHONE_2019,
                serial=77,
                layout=Edition.V2019,
                version_flag=True,
                protocol_version=1,
            )
            await terminal.send_raw(frame(build_header(head) + body))
            reply = await terminal.ack(77, 0x0200, RESULT_MESSAGE_ERROR)
            assert reply.header.layout is Edition.V2019
            await terminal.aclose()


# ---------------------------------------------------------------------------------------------
# Operator HTTP


async def http_get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target, headers=[("host", "test"), AUTH_HEADER])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await stream.aclose()
    return status, headers, bytes(body)


async def test_operator_http_endpoints() -> None:
    with trio.fail_after(10):
        async with running() as h:
            http_ports = await h.nursery.start(h.server.operator_http(memory_access()).run)
            port = http_ports[0]
            terminal = await h.terminal()
            await terminal.login()
            serial = await terminal.send(report(1))
            await terminal.ack(serial, 0x0200)

            status, headers, body = await http_get(port, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            assert b'jt808_frames_total{msg_id="0x0200"} 1.0' in body
            assert b"jt808_sessions_authenticated 1.0" in body

            status, _, body = await http_get(port, "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "ok"})

            status, headers, body = await http_get(port, "/terminals")
            assert status == 200
            assert headers["content-type"] == "application/json"
            (online,) = json.loads(body)
            assert online["phone"] == PHONE
            assert online["edition"] == 2013
            assert online["peer"].startswith("127.0.0.1:")
            # China time, as every other time the platform shows
            assert online["connected_since"] == "2024-05-01T08:30:00+08:00"
            assert online["last_seen"] == WALL.astimezone(GMT8).isoformat()
            assert online["firmware"] is None  # a 2013 authentication carries no version

            # a 2019 terminal's software version (0x0102) is shown
            newer = await h.terminal("13800000009", Edition.V2019)
            await newer.login()
            status, _, body = await http_get(port, "/terminals")
            (shown,) = [t for t in json.loads(body) if t["edition"] == 2019]
            assert shown["firmware"] == "1.0.7"

            status, _, _ = await http_get(port, "/nope")
            assert status == 404
            await terminal.aclose()


async def test_workers_share_the_port_with_so_reuseport() -> None:
    with trio.fail_after(10):
        async with running(base_config(workers=2)) as first:
            config = base_config(workers=2, port=first.port)
            async with running(config) as second:
                assert second.port == first.port
                for n in range(4):
                    terminal = await first.terminal(f"01380013810{n}")
                    await terminal.login()
                    serial = await terminal.send(report(n))
                    await terminal.ack(serial, 0x0200)
                assert len(first.sink.records) + len(second.sink.records) == 4
