"""The terminal simulator against a fake platform built from our own codec, over loopback TCP.

Timing tests run under ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``):
virtual time jumps whenever every task waits, so a 10-minute run takes milliseconds and the
retransmission instants can be checked exactly.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ingest.capture import read_capture
from protocol import Edition, Packet, StreamDecoder, encode, encode_raw
from protocol.errors import RESULT_MESSAGE_ERROR, RESULT_NOT_SUPPORTED, RESULT_SUCCESS
from protocol.fields import GMT8
from protocol.messages.base import Fragment, Message
from protocol.messages.control import LocationQuery, TemporaryTracking, TerminalControl
from protocol.messages.location import (
    ALARM_EMERGENCY,
    ALARM_POWER_CUT,
    STATUS_ACC_ON,
    LocationBatch,
    LocationQueryResponse,
    LocationReport,
)
from protocol.messages.multimedia import MultimediaData, MultimediaUploadResponse
from protocol.messages.params import (
    QueryParamsResponse,
    QueryTerminalParams,
    SetTerminalParams,
    TerminalParameter,
)
from protocol.messages.terminal import (
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalGeneralResponse,
    TerminalRegister,
    TerminalRegisterResponse,
)
from protocol.messages.text import TextMessage
from protocol.reassembly import Duplicate, Reassembled, Reassembler
from tools import simulate_cmd
from tools.scenario import parse_scenario
from tools.simulate import (
    KUNMING_BBOX,
    SimConfig,
    Simulator,
    Stats,
    scenario_config,
    scenario_fleet,
    synthetic_jpeg,
)

WALL = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
DEVICE_START = datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
ACKED_IDS = frozenset({0x0002, 0x0102, 0x0200, 0x0704, 0x0801})
RESPONSE_IDS = frozenset({0x0001, 0x0104, 0x0201})

Downlink = Message | tuple[int, bytes]


@dataclass
class Arrival:
    conn: int
    at: float
    packet: Packet
    transmission: int  # how often this (phone, id, serial) has arrived, from 1


@dataclass
class FakePlatform:
    """A JT/T 808 platform for the tests: answers 0x0100, 0x0102, 0x0002, 0x0200, 0x0704 and
    sub-packaged 0x0801 as the standard says, and misbehaves on request.

    ``drop(arrival)`` True: no answer.  ``close(arrival)`` True: close the connection instead
    of answering.  ``ack_delay_s``: answer reports that late.  ``downlinks`` are sent after a
    successful 0x0102 on the first connection.  ``media_retransmit``: the first 0x8800 asks for
    these packages again.
    """

    drop: Callable[[Arrival], bool] = lambda arrival: False
    close: Callable[[Arrival], bool] = lambda arrival: False
    ack_delay_s: float = 0.0
    downlinks: Sequence[Downlink] = ()
    media_retransmit: tuple[int, ...] = ()
    refuse_auth: bool = False
    arrivals: list[Arrival] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    media: list[MultimediaData] = field(default_factory=list)
    downlink_serials: list[int] = field(default_factory=list)
    max_in_flight: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._seen: Counter[tuple[str, int, int]] = Counter()
        self._reassembler = Reassembler()
        self._media_asked = False
        self._in_flight = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def of(self, msg_id: int, conn: int | None = None) -> list[Arrival]:
        return [
            a
            for a in self.arrivals
            if a.packet.msg_id == msg_id and (conn is None or a.conn == conn)
        ]

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = len(self.peers)
        host, port = stream.socket.getpeername()[:2]
        self.peers.append(f"{host}:{port}")
        decoder = StreamDecoder()
        lock = trio.Lock()
        serials = iter(range(1, 0x10000))

        async def send(message: Downlink, packet: Packet, delay: float = 0.0) -> None:
            if delay:
                await trio.sleep(delay)
            header = packet.header
            serial = next(serials)
            if isinstance(message, tuple):
                wire = encode_raw(message[0], message[1], phone=header.phone, serial=serial,
                                  edition=header.layout)  # fmt: skip
            else:
                wire = encode(message, phone=header.phone, serial=serial, edition=header.layout)
            async with lock:
                try:
                    await stream.send_all(wire)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if isinstance(message, PlatformGeneralResponse) and message.reply_msg_id in (
                0x0200,
                0x0704,
            ):
                self._in_flight -= 1
            if not isinstance(message, PlatformGeneralResponse | TerminalRegisterResponse):
                self.downlink_serials.append(serial)

        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    decoder.feed(data)
                    for event in decoder:
                        assert isinstance(event, Packet), event
                        if not await self._answer(conn, event, send, nursery):
                            await stream.aclose()
                            nursery.cancel_scope.cancel()
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

    async def _answer(
        self, conn: int, packet: Packet, send: Callable[..., Any], nursery: trio.Nursery
    ) -> bool:
        header = packet.header
        key = (header.phone, header.msg_id, header.serial)
        self._seen[key] += 1
        arrival = Arrival(conn, trio.current_time(), packet, self._seen[key])
        self.arrivals.append(arrival)
        if header.msg_id in (0x0200, 0x0704) and arrival.transmission == 1:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if self.close(arrival):
            return False
        if header.msg_id in RESPONSE_IDS or self.drop(arrival):
            return True
        message = packet.message

        def ack(result: int = RESULT_SUCCESS) -> PlatformGeneralResponse:
            return PlatformGeneralResponse(
                reply_serial=header.serial, reply_msg_id=header.msg_id, result=result
            )

        if isinstance(message, TerminalRegister):
            code = f"code{header.phone[-6:]}"
            await send(TerminalRegisterResponse(reply_serial=header.serial, result=0,
                                                auth_code=code), packet)  # fmt: skip
        elif isinstance(message, TerminalAuth):
            ok = message.auth_code == f"code{header.phone[-6:]}" and not self.refuse_auth
            await send(ack(RESULT_SUCCESS if ok else 1), packet)
            if ok and conn == 0:
                for downlink in self.downlinks:
                    await send(downlink, packet)
        elif isinstance(message, Fragment):
            await send(ack(), packet)
            outcome = self._reassembler.feed(packet, now=trio.current_time()).outcome
            if isinstance(outcome, Reassembled):
                media = outcome.packet.message
                assert isinstance(media, MultimediaData)
                self.media.append(media)
                asked = () if self._media_asked else self.media_retransmit
                self._media_asked = True
                await send(MultimediaUploadResponse(media_id=media.media_id,
                                                     retransmit_ids=asked), packet)  # fmt: skip
            elif isinstance(outcome, Duplicate) and outcome.after_completion:
                media_id = self.media[-1].media_id
                await send(MultimediaUploadResponse(media_id=media_id), packet)
        elif header.msg_id in (0x0200, 0x0704) and self.ack_delay_s:
            nursery.start_soon(send, ack(), packet, self.ack_delay_s)
        else:
            await send(ack(), packet)
        return True


async def simulate(
    platform: FakePlatform, *, fleet: Any = None, during: Any = None, **overrides: Any
) -> tuple[Simulator, Stats]:
    """Run the platform and a simulator against it; returns both when the simulator ends."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(platform.run)
        settings: dict[str, Any] = {
            "port": port,
            "terminals": 1,
            "interval_s": 10.0,
            "duration_s": None,
            "max_reports": 3,
            "ramp_s": 0.0,
            "progress_s": None,
            "start_time": DEVICE_START,
            "edition_2019_ratio": 0.0,
            **overrides,
        }
        sim = Simulator(SimConfig(**settings), fleet, wall_clock=lambda: WALL)
        if during is not None:
            nursery.start_soon(during, sim)
        stats = await sim.run()
        nursery.cancel_scope.cancel()
    return sim, stats


def balanced(stats: Stats) -> bool:
    """Every message sent has exactly one fate."""
    fates = stats.acked + stats.rejected + stats.failed + stats.abandoned + stats.outstanding
    return stats.sent == fates


def reports(arrivals: Sequence[Arrival]) -> list[LocationReport]:
    out = []
    for arrival in arrivals:
        message = arrival.packet.message
        if isinstance(message, LocationReport) and arrival.transmission == 1:
            out.append(message)
    return out


# ---------------------------------------------------------------------------------------------
# The normal life of a fleet


async def test_fleet_registers_authenticates_and_every_report_is_acknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform()
    with trio.fail_after(600):  # virtual seconds
        sim, stats = await simulate(
            platform, terminals=4, edition_2019_ratio=0.5, max_reports=5, ramp_s=2.0
        )
    assert stats.registrations == stats.authentications == 4
    assert stats.positions_sent == stats.positions_acked == 20
    assert stats.sent == stats.acked == 4 * (2 + 5)
    assert stats.retransmitted == stats.failed == stats.outstanding == 0
    assert stats.latency.count == stats.acked
    assert balanced(stats)
    editions = Counter(a.packet.header.layout for a in platform.of(0x0100))
    assert editions == {Edition.V2013: 2, Edition.V2019: 2}
    for terminal in sim.terminals:
        mine = [a for a in platform.arrivals if a.packet.phone == terminal.phone]
        ids = [a.packet.msg_id for a in mine]
        assert ids == [0x0100, 0x0102] + [0x0200] * 5
        assert len(terminal.phone) == (20 if terminal.spec.edition is Edition.V2019 else 12)
        positions = reports(mine)
        times = [p.time for p in positions if p.time is not None]
        assert len(times) == len(positions)
        gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
        assert gaps == {10.0}
        mileage = [m for p in positions if (m := p.mileage_km) is not None]
        assert len(mileage) == len(positions)
        assert mileage == sorted(mileage)
        lon_min, lat_min, lon_max, lat_max = KUNMING_BBOX
        for position in positions:
            assert lon_min <= position.lon <= lon_max
            assert lat_min <= position.lat <= lat_max
            assert 0 <= position.speed_kmh <= 80
            if position.speed_kmh > 0:
                assert position.status & STATUS_ACC_ON


async def test_batches_carry_several_positions(autojump_clock: trio.testing.MockClock) -> None:
    platform = FakePlatform()
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(platform, batch=4, max_reports=10, interval_s=5.0)
    batches = [a.packet.message for a in platform.of(0x0704)]
    assert [len(b.positions) for b in batches if isinstance(b, LocationBatch)] == [4, 4, 2]
    assert stats.positions_sent == stats.positions_acked == 10
    assert stats.sent == stats.acked == 2 + 3


async def test_groups_write_separate_reports_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform()
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(platform, group=5, window=8, max_reports=10, interval_s=1.0)
    arrivals = platform.of(0x0200)
    assert len(arrivals) == 10
    # One write per group of five: five frames at one instant, their positions a second apart.
    assert len({a.at for a in arrivals}) == 2
    times = [p.time for p in reports(arrivals) if p.time is not None]
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(times)] == [1.0] * 9
    assert arrivals[5].at - arrivals[4].at == pytest.approx(5.0)
    assert stats.positions_sent == stats.positions_acked == 10
    assert stats.sent == stats.acked == 2 + 10


async def test_heartbeats_keep_an_idle_terminal_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform()
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(
            platform, interval_s=0.0, max_reports=None, duration_s=100.0, heartbeat_s=30.0
        )
    beats = platform.of(0x0002)
    assert len(beats) == stats.heartbeats == 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
    assert gaps == pytest.approx([30.0, 30.0])
    assert stats.acked == stats.sent


# ---------------------------------------------------------------------------------------------
# Acknowledgements, retransmission, reconnection


def first_report_of_conn0(arrival: Arrival) -> bool:
    return arrival.packet.msg_id == 0x0200 and arrival.packet.serial == 2


async def test_retransmission_follows_t_n_plus_1_equals_t_n_times_n_plus_1(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Lose the acks of the first report's first three transmissions.
    platform = FakePlatform(drop=lambda a: first_report_of_conn0(a) and a.transmission <= 3)
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(platform, ack_timeout_s=2.0, retries=3, max_reports=1)
    sends = [a.at for a in platform.of(0x0200)]
    offsets = [t - sends[0] for t in sends]
    # T1 = 2, T2 = T1 x 2 = 4, T3 = T2 x 3 = 12: resends 2, 6 and 18 s after the original.
    assert offsets == pytest.approx([0.0, 2.0, 6.0, 18.0])
    assert {a.packet.serial for a in platform.of(0x0200)} == {2}
    assert stats.retransmitted == 3
    assert stats.acked == stats.sent == 3
    assert stats.failed == 0


async def test_a_message_unacknowledged_after_the_last_retry_means_the_link_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform(drop=lambda a: a.conn == 0 and first_report_of_conn0(a))
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(
            platform, ack_timeout_s=2.0, retries=3, max_reports=10, interval_s=10.0
        )
    first = [a.at for a in platform.of(0x0200) if a.packet.serial == 2]
    assert [t - first[0] for t in first] == pytest.approx([0.0, 2.0, 6.0, 18.0])
    # The fourth timeout (T4 = T3 x 4 = 48 s) ends the connection; the terminal reconnects
    # and authenticates with the code it already has.
    assert len(platform.peers) == 2
    assert next(a.packet.msg_id for a in platform.arrivals if a.conn == 1) == 0x0102
    assert stats.failed == 1
    assert stats.positions_failed == 1
    assert stats.registrations == 1
    assert stats.authentications == 2
    assert stats.positions_sent == 10
    assert stats.positions_acked == 9
    assert balanced(stats)
    reconnect = next(a.at for a in platform.arrivals if a.conn == 1)
    assert reconnect - first[0] >= 18.0 + 48.0


async def test_reconnects_after_the_server_drops_and_resends_what_was_unacknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Close the first connection when the second report arrives, without answering it.
    platform = FakePlatform(
        close=lambda a: a.conn == 0 and a.packet.msg_id == 0x0200 and a.packet.serial == 3
    )
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(platform, max_reports=4, reconnect_min_s=1.0)
    assert len(platform.peers) == 2
    second = [a.packet for a in platform.arrivals if a.conn == 1]
    assert [p.msg_id for p in second[:2]] == [0x0102, 0x0200]
    assert second[1].serial == 3  # the unacknowledged report again, same serial
    assert stats.connects == 2
    assert stats.disconnects == 2
    assert stats.positions_sent == stats.positions_acked == 4
    assert stats.retransmitted == 1
    assert stats.failed == 0
    assert balanced(stats)


async def test_the_window_caps_unacknowledged_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform(ack_delay_s=7.5)
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(
            platform, interval_s=1.0, window=3, max_reports=None, duration_s=40.0,
            ack_timeout_s=20.0, drain_s=10.0,
        )  # fmt: skip
    assert platform.max_in_flight == 3
    assert stats.skipped > 0  # ticks passed while the window was full
    assert stats.retransmitted == 0
    assert stats.positions_acked == stats.positions_sent
    assert balanced(stats)
    assert stats.latency.percentile(0.5) == pytest.approx(7.5, rel=0.05)


async def test_gives_up_when_authentication_is_refused_repeatedly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform(refuse_auth=True)
    with trio.fail_after(600):  # virtual seconds
        sim, stats = await simulate(platform, duration_s=600.0, max_reports=None)
    # Each refusal makes the terminal register again; after five in a row it gives up.
    assert stats.auth_failures == stats.registrations == 5
    assert stats.gave_up == 1
    assert not sim.terminals[0].ever_online
    assert stats.elapsed_s < 600.0
    assert balanced(stats)


# ---------------------------------------------------------------------------------------------
# Downlinks


async def test_answers_platform_commands(autojump_clock: trio.testing.MockClock) -> None:
    downlinks: list[Downlink] = [
        LocationQuery(),
        QueryTerminalParams(),
        TextMessage(flag=0x08, text="请注意安全"),
        SetTerminalParams(params=(TerminalParameter.named("heartbeat_interval_s", 60),)),
        TerminalControl(command=6),
        TemporaryTracking(interval_s=5, validity_s=60),  # not supported by the simulator
        (0x8F00, b"\x01\x02"),  # an id nobody knows
        (0x8202, b"\x00"),  # 0x8202 cut short: does not decode
        QueryTerminalParams(),
    ]
    platform = FakePlatform(downlinks=downlinks)
    with trio.fail_after(600):  # virtual seconds
        _, stats = await simulate(platform, max_reports=2, heartbeat_s=30.0)
    serials = platform.downlink_serials
    assert len(serials) == len(downlinks)
    responses = [a.packet for a in platform.arrivals if a.packet.msg_id in RESPONSE_IDS]
    by_serial = {}
    for packet in responses:
        message = packet.message
        assert isinstance(
            message, TerminalGeneralResponse | LocationQueryResponse | QueryParamsResponse
        )
        by_serial[message.reply_serial] = message
    assert set(by_serial) == set(serials)
    where = by_serial[serials[0]]
    assert isinstance(where, LocationQueryResponse)
    assert where.location.mileage_km is not None
    assert where.location.time is not None
    params = by_serial[serials[1]]
    assert isinstance(params, QueryParamsResponse)
    assert params.get("heartbeat_interval_s") == 30
    assert params.get("tcp_retransmit_count") == 3
    assert params.get("plate") == "云A00000"

    def result(index: int) -> int:
        message = by_serial[serials[index]]
        assert isinstance(message, TerminalGeneralResponse)
        sent = downlinks[index]
        assert message.reply_msg_id == (sent[0] if isinstance(sent, tuple) else sent.msg_id)
        return message.result

    assert [result(i) for i in (2, 3, 4)] == [RESULT_SUCCESS] * 3
    assert result(5) == result(6) == RESULT_NOT_SUPPORTED
    assert result(7) == RESULT_MESSAGE_ERROR
    after = by_serial[serials[8]]
    assert isinstance(after, QueryParamsResponse)
    assert after.get("heartbeat_interval_s") == 60  # 0x8103 took effect
    assert stats.downlinks == len(downlinks) - 1  # the undecodable one is a bad frame
    assert stats.bad_frames == 1
    assert stats.replies == len(downlinks)


# ---------------------------------------------------------------------------------------------
# Multimedia


async def test_media_upload_is_sub_packaged_and_reassembles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    platform = FakePlatform(media_retransmit=(2,))
    with trio.fail_after(600):  # virtual seconds
        sim, stats = await simulate(
            platform, media_every_s=15.0, media_bytes=3000, max_reports=None, duration_s=20.0,
            edition_2019_ratio=1.0,
        )  # fmt: skip
    terminal = sim.terminals[0]
    assert len(platform.media) == 1
    media = platform.media[0]
    assert media.media_id == 1
    assert media.data == synthetic_jpeg(f"808:{terminal.phone}:1", 3000)
    assert media.data[:3] == b"\xff\xd8\xff"
    assert media.data[-2:] == b"\xff\xd9"
    assert media.location is not None
    assert media.location.time is not None
    packages = platform.of(0x0801)
    body = media.encode(Edition.V2019)
    total = math.ceil(len(body) / 1023)
    assert {a.packet.header.package_total for a in packages} == {total}
    first = [a.packet.header.package_index for a in packages if a.transmission == 1]
    assert first == list(range(1, total + 1))
    again = [a.packet.header.package_index for a in packages if a.transmission == 2]
    assert again == [2]  # asked for by the first 0x8800
    assert stats.media_uploads == 1
    assert stats.media_packages == total
    assert stats.media_confirmed == 1
    assert balanced(stats)


# ---------------------------------------------------------------------------------------------
# Capture and source addresses


async def test_capture_files_hold_what_each_connection_sent(tmp_path: Path) -> None:
    platform = FakePlatform()
    with trio.fail_after(20):
        await simulate(
            platform, terminals=3, edition_2019_ratio=0.5, max_reports=3, interval_s=0.05,
            capture_dir=tmp_path,
        )  # fmt: skip
    files = sorted(Path(p) for p in await trio.Path(tmp_path).iterdir())
    assert len(files) == 3
    assert all(f.name.startswith("20240501T000000.000000Z-") for f in files)
    assert all(f.suffix == ".jt808cap" for f in files)
    by_peer = {}
    for path in files:
        header, records = read_capture(path)
        assert header.version == 1
        assert header.start == WALL
        offsets = [offset for offset, _ in records]
        assert offsets == sorted(offsets)
        decoder = StreamDecoder()
        decoder.feed(b"".join(data for _, data in records))
        by_peer[header.peer] = [(p.msg_id, p.serial) for p in decoder if isinstance(p, Packet)]
    assert set(by_peer) == set(platform.peers)
    for conn, peer in enumerate(platform.peers):
        received = [(a.packet.msg_id, a.packet.serial) for a in platform.arrivals if a.conn == conn]
        assert by_peer[peer] == received


async def test_source_addresses_bind_the_local_end() -> None:
    platform = FakePlatform()
    with trio.fail_after(20):
        _, stats = await simulate(
            platform, terminals=2, source_addresses=("127.0.0.2", "127.0.0.3"), interval_s=0.05,
            max_reports=1,
        )  # fmt: skip
    assert sorted(peer.rsplit(":", 1)[0] for peer in platform.peers) == ["127.0.0.2", "127.0.0.3"]
    assert stats.positions_acked == 2


# ---------------------------------------------------------------------------------------------
# Scenarios and alarms

SCENARIO = """
[fleet]
start = 2024-05-01T07:59:00+08:00
interval_s = 10.0
heartbeat_s = 60.0

[[vehicle]]
phone = "13912345678"
plate = "云A12345"
edition = 2019
start = 2024-05-01T08:00:00+08:00
speed_kmh = 36.0
mileage_km = 100.0
waypoints = [[102.7100, 25.0400], [102.7200, 25.0400], {lon = 102.7200, lat = 25.0450}]

[[vehicle.alarm]]
bits = ["power_cut"]
at = 2024-05-01T08:01:05+08:00
duration_s = 30.0
"""


async def run_scenario(during: Any = None) -> tuple[FakePlatform, Stats]:
    scenario = parse_scenario(SCENARIO)
    platform = FakePlatform()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(platform.run)
        base = SimConfig(port=port, progress_s=None, ramp_s=0.0)
        config = scenario_config(scenario, base, duration_s=None)
        sim = Simulator(config, scenario_fleet(scenario), wall_clock=lambda: WALL)
        if during is not None:
            nursery.start_soon(during, sim)
        stats = await sim.run()
        nursery.cancel_scope.cancel()
    return platform, stats


async def test_a_scenario_replays_exactly(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):  # virtual seconds
        platform, stats = await run_scenario()
    positions = reports(platform.of(0x0200))
    start = datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
    before = [p for p in positions if p.time is not None and p.time < start]
    assert before
    assert all(p.speed == 0 and not p.acc_on for p in before)
    assert all(p.lon == 102.71 and p.lat == 25.04 for p in before)
    moving = [p for p in positions if p.speed > 0]
    assert moving
    assert all(p.speed == 360 and p.acc_on for p in moving)
    assert {p.direction for p in moving} <= {0, 90}
    last = positions[-1]
    assert last.speed == 0
    assert not last.acc_on
    assert (last.lon, last.lat) == (102.72, 25.045)
    # About 1 km east and 0.56 km north, on top of the 100 km on the odometer at the start.
    assert last.mileage_km == pytest.approx(100.0 + 1.009 + 0.557, abs=0.05)
    alarmed = [p for p in positions if p.alarm & ALARM_POWER_CUT]
    alarm_times = [p.time for p in alarmed]
    assert alarm_times[0] == datetime(2024, 5, 1, 8, 1, 5, tzinfo=GMT8)  # reported at once
    assert alarm_times[-1] == datetime(2024, 5, 1, 8, 1, 30, tzinfo=GMT8)
    cleared = next(p for p in positions if p.time == datetime(2024, 5, 1, 8, 1, 35, tzinfo=GMT8))
    assert not cleared.alarm
    assert stats.positions_acked == stats.positions_sent == len(positions)
    # Run again: the same bodies, byte for byte.
    with trio.fail_after(600):  # virtual seconds
        again, _ = await run_scenario()
    assert [p.encode() for p in reports(again.of(0x0200))] == [p.encode() for p in positions]


async def test_alarm_bits_on_demand(autojump_clock: trio.testing.MockClock) -> None:
    async def press(sim: Simulator) -> None:
        await trio.sleep(25.0)
        sim.set_alarm("13912345678", ALARM_EMERGENCY)

    with trio.fail_after(600):  # virtual seconds
        platform, _ = await run_scenario(during=press)
    pressed = [p for p in reports(platform.of(0x0200)) if p.alarm & ALARM_EMERGENCY]
    assert pressed[0].time == datetime(2024, 5, 1, 7, 59, 25, tzinfo=GMT8)


# ---------------------------------------------------------------------------------------------
# The command


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_command_runs_a_fleet_and_ends_with_json() -> None:
    platform = FakePlatform()
    ready = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(platform.run)
            token.append(trio.lowlevel.current_trio_token())
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        out, err = io.StringIO(), io.StringIO()
        args = cli_args(
            "--target", f"127.0.0.1:{platform.port}", "--terminals", "3", "--interval-s", "0.2",
            "--duration-s", "1.2", "--ramp-s", "0.1", "--progress-s", "0.5", "--json",
        )  # fmt: skip
        status = simulate_cmd.run(args, stdout=out, stderr=err)
    finally:
        if token:
            trio.from_thread.run_sync(stop.set, trio_token=token[0])
        thread.join(10)
    assert status == 0, out.getvalue() + err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("jt808 simulate: 3 terminals")
    result = json.loads(lines[-1])
    assert result["terminals"] == 3
    assert result["authentications"] == 3
    assert result["positions_acked"] == result["positions_sent"] > 0
    assert result["p99_ack_ms"] is not None
    assert result["latency_histogram"]["counts"]
    assert "online 3/3" in err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "10.0.0.1:6808"], "not a loopback address"),
        (["--target", "example.com:6808"], "not an IP address"),
        (["--target", "127.0.0.1"], "expected HOST:PORT"),
        (["--source-addresses", "192.168.1.2"], "not a loopback address"),
        (["--batch", "99"], "batch must be"),
        (["--alarm", "no_such_alarm@5"], "unknown alarm"),
        (["--alarm", "power_cut@-5"], "START_S >= 0"),
        (["--bbox", "1,2,3"], "--bbox"),
        (["--terminals", "0"], "terminals must be"),
        (["--capture", "/nonexistent/dir"], "not a directory"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str) -> None:
    err = io.StringIO()
    assert simulate_cmd.run(cli_args(*argv), stdout=io.StringIO(), stderr=err) == 2
    assert message in err.getvalue()


def test_a_bad_scenario_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.replace("speed_kmh = 36.0", "speed = 36.0"), encoding="utf-8")
    err = io.StringIO()
    assert simulate_cmd.run(cli_args("--scenario", str(path)), stderr=err) == 2
    assert "vehicle[0].speed: unknown key 'speed'" in err.getvalue()
