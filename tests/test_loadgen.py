"""The lean load generator of the benchmarks (``bench/loadgen.py``): its frames against the
codec, and a short run against an in-memory server."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import trio
from prometheus_client import CollectorRegistry

from bench import loadgen
from ingest import InMemoryPositionSink, InMemoryTerminalRegistry, Metrics, Server, ServerConfig
from protocol import Edition, Packet, StreamDecoder, encode
from protocol.fields import GMT8
from protocol.messages.location import Location

DEVICE_START = datetime(2024, 5, 1, 8, 30, tzinfo=GMT8)
# Serials around 0x7D7D and 0x7E7E put the flag and the escape byte in the header.
SERIALS = [*range(0x7D70, 0x7E90), *range(0xFFF0, 0x10000), *range(16)]


def test_patched_frames_are_the_codecs_frames() -> None:
    clock = loadgen.DeviceClock(DEVICE_START)
    for edition in (Edition.V2013, Edition.V2019):
        frames = loadgen.ReportFrames(
            "13912345678", edition, clock, lat0=loadgen.LAT0, lon0=loadgen.LON0
        )
        wires = []
        for k, serial in enumerate(SERIALS):
            wire = frames.frame(serial, k)
            assert wire == encode(
                frames.report(k), phone=frames.phone, serial=serial, edition=edition
            ), (edition, serial, k)
            wires.append(wire)
        # Both escapes occurred, in the body and in the check code.
        assert any(b"\x7d\x01" in w for w in wires)
        assert any(b"\x7d\x02" in w for w in wires)
        assert any(w[-3] == 0x7D for w in wires)

        decoder = StreamDecoder()
        decoder.feed(b"".join(wires))
        events = list(decoder)
        assert len(events) == len(wires)
        for k, (event, serial) in enumerate(zip(events, SERIALS, strict=True)):
            assert isinstance(event, Packet), event
            assert event.header.msg_id == 0x0200
            assert event.header.serial == serial
            assert event.header.version_flag is (edition is Edition.V2019)
            assert event.phone.lstrip("0") == "13912345678"
            assert event.message == frames.report(k)


def test_ack_prefix_is_the_start_of_the_servers_ack() -> None:
    from protocol.messages.terminal import PlatformGeneralResponse  # noqa: PLC0415

    for edition in (Edition.V2013, Edition.V2019):
        prefix = loadgen.ack_prefix("13912345678", edition)
        ack = encode(
            PlatformGeneralResponse(reply_serial=7, reply_msg_id=0x0200, result=0),
            phone="13912345678",
            serial=0x1234,
            edition=edition,
        )
        assert ack.startswith(prefix)
        assert len(ack) == len(prefix) + 8 + 1


async def test_fleet_reports_are_acknowledged_and_stored_once() -> None:
    sink = InMemoryPositionSink()
    server = Server(
        ServerConfig(host="127.0.0.1", port=0, http_port=0),
        sink=sink,
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            ports = await nursery.start(server.run)
            config = loadgen.LoadConfig(
                port=ports[0],
                terminals=20,
                rate=200.0,  # ten reports a second per terminal
                warmup_s=0.3,
                duration_s=1.5,
                drain_s=5.0,
                processes=1,
                # 0x0100 and 0x0102 take two serials: reports from 0x7C7D, so the first two
                # carry 0x7D and 0x7E in their serials (and so do the acks to them).
                serial_start=0x7C7B,
                device_start=DEVICE_START,
            )
            out = await trio.to_thread.run_sync(loadgen.run_in_process, config)
            nursery.cancel_scope.cancel()

    assert out["online"] == 20
    assert out["sent"] > 100
    assert out["sent"] == out["acked"] == len(sink.records)
    assert out["retransmitted"] == out["failed"] == out["abandoned"] == out["outstanding"] == 0
    assert out["bad_frames"] == out["duplicate_acks"] == 0
    assert out["steady_acked"] > 0
    # Most acks take the fast path; the handshake answers (two per terminal) and the escaped
    # acks go through the codec.
    assert 0 < out["slow_reads"] < 2 * 20 + out["acked"] // 2
    assert out["p99_ack_ms"] is not None

    clock = loadgen.DeviceClock(DEVICE_START)
    by_phone: dict[str, list[tuple[int, Location]]] = defaultdict(list)
    editions = set()
    for record in sink.records:
        assert record.header.msg_id == 0x0200
        editions.add(record.header.version_flag)
        by_phone[record.phone].append((record.header.serial, record.location))
    assert editions == {False, True}
    assert len(by_phone) == 20
    for phone, reports in by_phone.items():
        index = int(phone) - config.phone_base
        frames = loadgen.terminal_frames(config, index, clock)
        times = [location.time for _, location in reports]
        assert len(set(times)) == len(times), phone  # distinct device times
        for k, (serial, location) in enumerate(reports):
            assert serial == 0x7C7D + k
            expected = frames.report(k)
            assert location.time == expected.time
            assert (location.latitude, location.longitude) == (
                expected.latitude,
                expected.longitude,
            )
