"""Sub-packaged uploads through the server: acknowledged package by package, reassembled,
stored (multimedia as a file and a row), missing packages asked for after the deadline."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingest import InMemoryPositionSink, InMemoryTerminalRegistry, Metrics, Server
from ingest.interfaces import InMemoryMediaSink, MediaSink
from ingest.session import DedupCache, Send, Session, SessionPolicy
from protocol import Edition, decode, encode_split
from protocol.header import Header
from protocol.messages.base import Message
from protocol.messages.control import PlatformRetransmitRequest
from protocol.messages.location import Location, LocationBatch
from protocol.messages.multimedia import (
    FORMAT_JPEG,
    MEDIA_IMAGE,
    MultimediaData,
    MultimediaEvent,
    MultimediaUploadResponse,
)
from protocol.messages.terminal import PlatformGeneralResponse
from protocol.reassembly import RetransmitRequest, SeriesKey
from storage import MediaStore, migrate
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_ingest_server import (
    PHONE,
    PHONE_2019,
    WALL,
    FakeTerminal,
    base_config,
    report,
)
from tools.serve_cmd import MediaStoreSink

# A JPEG-looking payload that is neither short nor regular.
PHOTO = b"\xff\xd8\xff\xe0" + bytes((n * 37 + n // 251) % 256 for n in range(5000)) + b"\xff\xd9"


def spot() -> Location:
    """The position sent with uploads: a location without additional items."""
    fix = report(1)
    return Location(**{f.name: getattr(fix, f.name) for f in dataclasses.fields(Location)})


def photo_upload(media_id: int = 42, data: bytes = PHOTO) -> MultimediaData:
    return MultimediaData(
        media_id=media_id,
        media_type=MEDIA_IMAGE,
        media_format=FORMAT_JPEG,
        event=0,
        channel=1,
        location=spot(),
        data=data,
    )


@dataclass
class App:
    server: Server
    sink: InMemoryPositionSink
    port: int
    terminals: list[FakeTerminal]

    async def terminal(self, phone: str = PHONE, edition: Edition = Edition.V2013) -> FakeTerminal:
        terminal = await FakeTerminal.connect(self.port, phone, edition)
        self.terminals.append(terminal)
        await terminal.login()
        return terminal

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@asynccontextmanager
async def serving(*, media: MediaSink, **config: Any) -> AsyncIterator[App]:
    sink = InMemoryPositionSink()
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        base_config(**config),
        sink=sink,
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
        wall_clock=lambda: WALL,
        media=media,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        ports = await nursery.start(server.run)
        app = App(server, sink, ports[0], [])
        try:
            yield app
        finally:
            for terminal in app.terminals:
                await trio.aclose_forcefully(terminal.stream)
            nursery.cancel_scope.cancel()


def packages(
    terminal: FakeTerminal, message: Message, first_serial: int, max_body: int = 512
) -> list[bytes]:
    return encode_split(
        message,
        phone=terminal.phone,
        first_serial=first_serial,
        edition=terminal.edition,
        max_body=max_body,
    )


def general(serial: int, msg_id: int, result: int = 0) -> PlatformGeneralResponse:
    return PlatformGeneralResponse(reply_serial=serial, reply_msg_id=msg_id, result=result)


async def test_a_split_upload_is_acknowledged_per_package_then_stored_and_answered() -> None:
    media = InMemoryMediaSink()
    with trio.fail_after(10):
        async with serving(media=media) as app:
            terminal = await app.terminal()
            upload = photo_upload()
            wires = packages(terminal, upload, first_serial=100)
            assert len(wires) > 5
            for index, wire in enumerate(wires):
                await terminal.send_raw(wire)
                ack = await terminal.recv()
                assert ack.message == general(100 + index, 0x0801)
            answer = await terminal.recv()
            assert answer.message == MultimediaUploadResponse(media_id=42, retransmit_ids=())
            (record,) = media.records
            assert record.data == PHOTO
            assert (record.phone, record.media_id, record.channel) == (PHONE, 42, 1)
            assert record.location == spot()
            assert record.received_at == WALL
            assert app.metric("jt808_reassembly_completed_total") == 1
            assert app.metric("jt808_media_stored_total") == 1
            assert app.metric("jt808_reassembly_series_in_flight") == 0


async def test_an_upload_that_cannot_be_stored_is_not_answered() -> None:
    media = InMemoryMediaSink()
    media.durable = False
    with trio.fail_after(10):
        async with serving(media=media) as app:
            terminal = await app.terminal()
            await terminal.send(photo_upload(data=b"\xff\xd8\xff\xd9"))  # fits one frame
            await trio.testing.wait_all_tasks_blocked()
            serial = await terminal.send(
                MultimediaEvent(media_id=7, media_type=0, media_format=0, event=1, channel=1)
            )
            # The event is acknowledged; the lost upload got nothing before it.
            assert (await terminal.recv()).message == general(serial, 0x0800)
            assert app.metric("jt808_media_failed_total") == 1


async def test_missing_multimedia_packages_are_asked_for_with_0x8800(
    autojump_clock: trio.testing.MockClock,
) -> None:
    media = InMemoryMediaSink()
    with trio.fail_after(1000):
        async with serving(media=media, reassembly_timeout_s=30) as app:
            terminal = await app.terminal(PHONE_2019, Edition.V2019)
            wires = packages(terminal, photo_upload(media_id=9), first_serial=200)
            lost = (2, 5)  # package indexes, from 1
            for index, wire in enumerate(wires, start=1):
                if index not in lost:
                    await terminal.send_raw(wire)
                    assert (await terminal.recv()).message == general(199 + index, 0x0801)
            start = trio.current_time()
            request = await terminal.recv()
            assert request.message == MultimediaUploadResponse(media_id=9, retransmit_ids=lost)
            assert trio.current_time() - start == pytest.approx(30, abs=1)
            assert request.header.layout is Edition.V2019
            assert app.metric("jt808_reassembly_retransmit_requests_total") == 1

            for index in lost:  # resent with their original serials
                await terminal.send_raw(wires[index - 1])
                assert (await terminal.recv()).message == general(199 + index, 0x0801)
            answer = await terminal.recv()
            assert answer.message == MultimediaUploadResponse(media_id=9, retransmit_ids=())
            assert [r.data for r in media.records] == [PHOTO]


async def test_other_messages_are_asked_for_with_0x8003_and_given_up_after_the_rounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with serving(
            media=InMemoryMediaSink(), reassembly_timeout_s=20, reassembly_rounds=2
        ) as app:
            terminal = await app.terminal()
            batch = LocationBatch(batch_type=1, positions=tuple(report(n) for n in range(40)))
            wires = packages(terminal, batch, first_serial=300)
            assert len(wires) >= 3
            await terminal.send_raw(wires[0])  # package 1 only
            assert (await terminal.recv()).message == general(300, 0x0704)
            missing = tuple(range(2, len(wires) + 1))
            for _ in range(2):  # two rounds of requests, 20 s apart
                request = await terminal.recv()
                assert request.message == PlatformRetransmitRequest(
                    original_serial=300, packet_ids=missing
                )
            with trio.move_on_after(100):
                await terminal.recv()
                pytest.fail("a third request was sent")
            assert app.metric("jt808_reassembly_dropped_total", {"reason": "series_timeout"}) == 1
            assert app.sink.records == []
            assert app.metric("jt808_reassembly_series_in_flight") == 0


async def test_a_split_location_batch_is_stored_and_its_last_package_acked_when_durable() -> None:
    with trio.fail_after(10):
        async with serving(media=InMemoryMediaSink()) as app:
            terminal = await app.terminal()
            batch = LocationBatch(batch_type=0, positions=tuple(report(n) for n in range(40)))
            wires = packages(terminal, batch, first_serial=500)
            app.sink.stall()
            for index, wire in enumerate(wires[:-1]):
                await terminal.send_raw(wire)
                assert (await terminal.recv()).message == general(500 + index, 0x0704)
            await terminal.send_raw(wires[-1])
            with trio.move_on_after(0.2):
                await terminal.recv()
                pytest.fail("the last package was acknowledged before the batch was stored")
            app.sink.resume()
            last = 500 + len(wires) - 1
            assert (await terminal.recv()).message == general(last, 0x0704)
            stored = [r.location.latitude for r in app.sink.records]
            assert stored == [p.latitude for p in batch.positions]
            assert {r.index for r in app.sink.records} == set(range(40))


# ---------------------------------------------------------------------------------------------
# The real media store


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


@pytest.mark.db
async def test_multimedia_is_written_to_a_file_and_recorded_in_the_database(
    db: str, tmp_path: Path
) -> None:
    store = MediaStore(db, tmp_path / "media")
    try:
        with trio.fail_after(20):
            async with serving(media=MediaStoreSink(store)) as app:
                terminal = await app.terminal()
                for first in (1000, 2000):  # sent twice: the second replaces the first
                    wires = packages(terminal, photo_upload(media_id=77), first_serial=first)
                    for wire in wires:
                        await terminal.send_raw(wire)
                        await terminal.recv()
                    answer = await terminal.recv()
                    assert answer.message == MultimediaUploadResponse(media_id=77)
    finally:
        store.close()
    path = tmp_path / "media" / PHONE / "77.jpg"
    assert path.read_bytes() == PHOTO
    assert [p.name for p in path.parent.iterdir()] == ["77.jpg"]  # no stray partial file
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT phone, media_id, media_type, media_format, channel, path, size_bytes,"
            " received_at, lat, lon, speed_kmh FROM multimedia"
        ).fetchall()
    location = spot()
    # The second upload of the same media id replaced the first.
    assert rows == [
        (
            PHONE,
            77,
            MEDIA_IMAGE,
            FORMAT_JPEG,
            1,
            str(path),
            len(PHOTO),
            WALL,
            location.lat,
            location.lon,
            location.speed_kmh,
        )
    ]


# ---------------------------------------------------------------------------------------------
# Requests for missing packages, pure


@pytest.mark.parametrize(
    ("msg_id", "media_id", "edition", "sizes"),
    [
        (0x0801, 3, Edition.V2013, [255, 255, 90]),  # 0x8800 counts its ids in a BYTE
        (0x0801, None, Edition.V2013, [255, 255, 90]),  # media id unknown: 0x8003 instead
        (0x0704, None, Edition.V2013, [255, 255, 90]),  # 0x8003 count BYTE (2013)
        (0x0704, None, Edition.V2019, [509, 91]),  # WORD count, limited by the frame (2019)
    ],
)
def test_long_lists_of_missing_packages_are_split_over_several_requests(
    msg_id: int, media_id: int | None, edition: Edition, sizes: list[int]
) -> None:
    session = Session(
        policy=SessionPolicy(), dedup=DedupCache(window_s=1, max_entries=1), new_auth_code=str
    )
    phone = PHONE_2019 if edition is Edition.V2019 else PHONE
    header = Header(
        msg_id=msg_id,
        body_length=0,
        phone=phone,
        serial=10,
        layout=edition,
        version_flag=edition is Edition.V2019,
        protocol_version=1 if edition is Edition.V2019 else None,
        subpackage=True,
        package_total=700,
        package_index=1,
    )
    request = RetransmitRequest(
        key=SeriesKey(phone, msg_id, 10, 700),
        header=header,
        round=1,
        missing=tuple(range(101, 701)),
    )
    sends = [a for a in session.upload_expired(request, media_id) if isinstance(a, Send)]
    messages = [decode(send.wire).message for send in sends]
    if media_id is not None:
        assert all(isinstance(m, MultimediaUploadResponse) for m in messages)
        assert [len(getattr(m, "retransmit_ids", ())) for m in messages] == sizes
    else:
        assert all(isinstance(m, PlatformRetransmitRequest) for m in messages)
        assert [len(getattr(m, "packet_ids", ())) for m in messages] == sizes
        assert {getattr(m, "original_serial", None) for m in messages} == {10}
    assert [decode(send.wire).header.phone for send in sends] == [phone] * len(sends)
