"""The simulator's pure parts: fast framing against the codec, motion, statistics, capture."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.capture import read_capture
from protocol import Edition, decode, encode, encode_raw
from protocol.codec import decode_frame, parse_frame
from protocol.errors import RemoteProtocolError
from protocol.fields import GMT8, BcdTime
from protocol.framing import unescape
from protocol.messages.location import LocationBatch, LocationReport
from protocol.messages.terminal import PlatformGeneralResponse
from tools.scenario import Waypoint
from tools.simulate import (
    KUNMING_BBOX,
    LOCATION_BODY_SIZE,
    MAX_BATCH,
    AlarmWindow,
    CaptureFile,
    LatencyHistogram,
    Sample,
    SimConfig,
    Stats,
    Wire,
    alarm_bits,
    batch_body,
    bcd_time,
    check_loopback,
    is_2019,
    leg_metrics,
    next_alarm_change,
    parse_ack,
    synthetic_fleet,
    synthetic_plate,
    synthetic_route,
    timeline_from_waypoints,
)

EXAMPLES = settings(max_examples=200)
editions = st.sampled_from([Edition.V2013, Edition.V2019])
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59)
).map(lambda d: d.replace(microsecond=0, tzinfo=GMT8))
DWORD = st.integers(0, 0xFFFFFFFF)
WORD = st.integers(0, 0xFFFF)


@st.composite
def phones(draw: st.DrawFn, edition: Edition) -> str:
    width = 20 if edition is Edition.V2019 else 12
    return draw(st.text("0123456789", min_size=1, max_size=width))


samples = st.builds(
    Sample,
    alarm=DWORD,
    status=DWORD,
    latitude=DWORD,
    longitude=DWORD,
    altitude_m=WORD,
    speed=WORD,
    direction=WORD,
    time=moments,
    mileage=DWORD,
    signal=st.integers(0, 255),
    satellites=st.integers(0, 255),
)


# ---------------------------------------------------------------------------------------------
# Fast framing agrees with the codec


@EXAMPLES
@given(data=st.data(), edition=editions, msg_id=WORD, serial=WORD)
def test_wire_frames_like_the_codec(
    data: st.DataObject, edition: Edition, msg_id: int, serial: int
) -> None:
    phone = data.draw(phones(edition))
    body = data.draw(st.binary(max_size=1023))
    wire = Wire(phone, edition)
    expected = encode_raw(msg_id, body, phone=phone, serial=serial, edition=edition)
    assert wire.frame(msg_id, serial, body) == expected


def test_wire_refuses_what_does_not_fit() -> None:
    with pytest.raises(Exception, match="does not fit"):
        Wire("1234567890123", Edition.V2013)
    with pytest.raises(Exception, match="needs sub-packaging"):
        Wire("1", Edition.V2013).frame(0x0200, 1, bytes(1024))


@EXAMPLES
@given(sample=samples)
def test_location_body_is_what_the_codec_encodes(sample: Sample) -> None:
    body = sample.body()
    assert len(body) == LOCATION_BODY_SIZE
    report = LocationReport.from_location(sample.location())
    assert body == report.encode()
    assert LocationReport.decode(body, Edition.V2013) == report
    assert report.mileage_km == pytest.approx(sample.mileage / 10)


@settings(max_examples=50)
@given(batch=st.lists(samples, min_size=1, max_size=MAX_BATCH), kind=st.integers(0, 1))
def test_batch_body_is_what_the_codec_encodes(batch: list[Sample], kind: int) -> None:
    body = batch_body([s.body() for s in batch], batch_type=kind)
    expected = LocationBatch(batch_type=kind, positions=tuple(s.location() for s in batch))
    assert body == expected.encode()
    assert len(body) <= 1023  # MAX_BATCH positions fit one frame


@EXAMPLES
@given(moment=moments)
def test_bcd_time_is_the_codec_s(moment: datetime) -> None:
    assert bcd_time(moment) == BcdTime.build(moment)


@EXAMPLES
@given(
    data=st.data(),
    edition=editions,
    serial=WORD,
    reply=WORD,
    reply_id=WORD,
    result=st.integers(0, 255),
)
def test_parse_ack_reads_what_the_codec_reads(
    data: st.DataObject, edition: Edition, serial: int, reply: int, reply_id: int, result: int
) -> None:
    phone = data.draw(phones(edition))
    message = PlatformGeneralResponse(reply_serial=reply, reply_msg_id=reply_id, result=result)
    wire = encode(message, phone=phone, serial=serial, edition=edition)
    content, _ = unescape(wire[1:-1])
    assert parse_ack(content) == (reply, reply_id, result)
    decoded = decode(wire).message
    assert (decoded.reply_serial, decoded.reply_msg_id, decoded.result) == (reply, reply_id, result)  # type: ignore[attr-defined]


@EXAMPLES
@given(content=st.binary(min_size=0, max_size=40), flip=st.integers(0, 39), bit=st.integers(0, 7))
def test_parse_ack_never_disagrees_with_the_codec(content: bytes, flip: int, bit: int) -> None:
    # Arbitrary bytes, and real acks with one bit flipped: the fast path accepts only what the
    # declarative path decodes to the same 0x8001.
    ack = encode(
        PlatformGeneralResponse(reply_serial=7, reply_msg_id=0x0200, result=0),
        phone="13800000001",
        serial=3,
    )
    candidates = [content]
    real, _ = unescape(ack[1:-1])
    if flip < len(real):
        mutated = bytearray(real)
        mutated[flip] ^= 1 << bit
        candidates.append(bytes(mutated))
    for candidate in candidates:
        fast = parse_ack(candidate)
        if fast is None:
            continue
        packet = decode_frame(parse_frame(candidate))
        message = packet.message
        assert isinstance(message, PlatformGeneralResponse)
        assert fast == (message.reply_serial, message.reply_msg_id, message.result)


def test_parse_ack_leaves_bad_check_codes_to_the_codec() -> None:
    wire = encode(
        PlatformGeneralResponse(reply_serial=1, reply_msg_id=2, result=0), phone="1", serial=1
    )
    content = bytearray(unescape(wire[1:-1])[0])
    content[-1] ^= 0xFF
    assert parse_ack(bytes(content)) is None
    with pytest.raises(RemoteProtocolError):
        parse_frame(bytes(content))


# ---------------------------------------------------------------------------------------------
# Motion


def haversine_m(lon0: float, lat0: float, lon1: float, lat1: float) -> float:
    r = 6_371_008.8
    p0, p1 = math.radians(lat0), math.radians(lat1)
    dp, dl = p1 - p0, math.radians(lon1 - lon0)
    a = math.sin(dp / 2) ** 2 + math.cos(p0) * math.cos(p1) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def test_leg_metrics_agree_with_a_great_circle() -> None:
    rng = random.Random(1)
    for _ in range(200):
        lon0, lat0 = rng.uniform(102.6, 102.8), rng.uniform(24.9, 25.1)
        lon1, lat1 = lon0 + rng.uniform(-0.03, 0.03), lat0 + rng.uniform(-0.03, 0.03)
        length, _ = leg_metrics(lon0, lat0, lon1, lat1)
        assert length == pytest.approx(haversine_m(lon0, lat0, lon1, lat1), rel=0.005)
    assert leg_metrics(102.7, 25.0, 102.7, 25.1)[1] == 0  # north
    assert leg_metrics(102.7, 25.0, 102.8, 25.0)[1] == 90  # east
    assert leg_metrics(102.7, 25.0, 102.7, 24.9)[1] == 180
    assert leg_metrics(102.7, 25.0, 102.6, 25.0)[1] == 270


def test_a_timeline_follows_the_waypoint_semantics() -> None:
    waypoints = (
        Waypoint(lon=102.70, lat=25.00, dwell_s=30.0),
        Waypoint(lon=102.71, lat=25.00, speed_kmh=72.0, park_s=60.0),
        Waypoint(lon=102.71, lat=25.01),
    )
    timeline = timeline_from_waypoints(waypoints, speed_kmh=36.0)
    leg1, _ = leg_metrics(102.70, 25.00, 102.71, 25.00)
    leg2, _ = leg_metrics(102.71, 25.00, 102.71, 25.01)
    before = timeline.at(-5.0)
    assert (before.lon, before.lat, before.speed_kmh, before.acc_on) == (102.70, 25.00, 0.0, False)
    warming = timeline.at(10.0)
    assert warming.acc_on
    assert warming.speed_kmh == 0.0  # dwell: engine on, standing
    half = timeline.at(30.0 + leg1 / 10 / 2)  # 36 km/h = 10 m/s
    assert half.speed_kmh == 36.0
    assert half.heading == 90
    assert half.acc_on
    assert half.lon == pytest.approx(102.705)
    assert half.distance_m == pytest.approx(leg1 / 2)
    parked = timeline.at(30.0 + leg1 / 10 + 30.0)
    assert not parked.acc_on
    assert parked.speed_kmh == 0.0
    assert parked.lon == pytest.approx(102.71)
    moving = timeline.at(30.0 + leg1 / 10 + 60.0 + 1.0)
    assert moving.speed_kmh == 72.0
    assert moving.heading == 0  # the waypoint's own speed
    end = timeline.at(1e6)
    assert (end.lon, end.lat, end.speed_kmh, end.acc_on) == (102.71, 25.01, 0.0, False)
    assert end.distance_m == pytest.approx(leg1 + leg2)
    assert timeline.period_s == pytest.approx(30 + leg1 / 10 + 60 + leg2 / 20)


def test_a_single_waypoint_stands_still() -> None:
    timeline = timeline_from_waypoints([Waypoint(lon=1.0, lat=-2.0)], speed_kmh=40.0)
    fix = timeline.at(100.0)
    assert (fix.lon, fix.lat, fix.speed_kmh, fix.distance_m, fix.acc_on) == (
        1.0,
        -2.0,
        0.0,
        0.0,
        False,
    )


def test_synthetic_routes_are_road_like_round_trips() -> None:
    lon_min, lat_min, lon_max, lat_max = KUNMING_BBOX
    for seed in range(20):
        route = synthetic_route(random.Random(seed), KUNMING_BBOX)
        assert route[0].lon == route[-1].lon
        assert route[0].lat == route[-1].lat
        for point in route:
            assert lon_min <= point.lon <= lon_max
            assert lat_min <= point.lat <= lat_max
            assert point.speed_kmh is None or 20 <= point.speed_kmh <= 80
        timeline = timeline_from_waypoints(route, speed_kmh=40.0, periodic=True)
        headings = {leg.heading for leg in timeline.legs if leg.speed_kmh > 0}
        assert headings <= {0, 45, 90, 135, 180, 225, 270, 315}
        lap = timeline.period_s
        assert lap > 0
        # Periodic: the odometer keeps counting from lap to lap, the position repeats.
        a, b = timeline.at(lap * 0.3), timeline.at(lap * 2.3)
        assert (a.lon, a.lat) == pytest.approx((b.lon, b.lat))
        assert b.distance_m == pytest.approx(a.distance_m + 2 * timeline.distance_m)
        previous = timeline.at(0.0)
        for step in range(1, 200):
            fix = timeline.at(step * 10.0)
            moved = haversine_m(previous.lon, previous.lat, fix.lon, fix.lat)
            assert fix.distance_m - previous.distance_m >= moved - 1.0  # odometer >= straight
            assert fix.distance_m - previous.distance_m <= 10.0 * 80 / 3.6 + 1e-6
            previous = fix


def test_the_fleet_mixes_editions_at_the_asked_ratio() -> None:
    assert [is_2019(i, 0.25) for i in range(8)].count(True) == 2
    assert not any(is_2019(i, 0.0) for i in range(10))
    assert all(is_2019(i, 1.0) for i in range(10))
    fleet = synthetic_fleet(SimConfig(terminals=10, edition_2019_ratio=0.3))
    assert sum(spec.edition is Edition.V2019 for spec in fleet) == 3
    assert len({spec.phone for spec in fleet}) == len({spec.plate for spec in fleet}) == 10
    assert fleet[3].phone == "13800000003"
    assert all(0 <= spec.report_phase_s < 5.0 for spec in fleet)

    def shape(config: SimConfig) -> list[tuple[object, ...]]:
        return [
            (s.phone, s.motion_offset_s, s.report_phase_s, s.mileage0_m, s.timeline.legs)
            for s in synthetic_fleet(config)
        ]

    assert shape(SimConfig(terminals=10)) == shape(SimConfig(terminals=10))  # seeded
    assert shape(SimConfig(terminals=10)) != shape(SimConfig(terminals=10, seed=1))


def test_plates_are_unique_and_gbk() -> None:
    plates = {synthetic_plate(i) for i in range(50_000)}
    assert len(plates) == 50_000
    assert synthetic_plate(0) == "云A00000"
    assert all(p.encode("gb18030") for p in plates)


def test_alarm_windows() -> None:
    windows = (AlarmWindow(bits=1 << 8, start_s=10, end_s=20), AlarmWindow(bits=1, start_s=15))
    assert [alarm_bits(windows, t) for t in (9.9, 10, 15, 19.9, 20, 1e9)] == [
        0, 256, 257, 257, 1, 1,
    ]  # fmt: skip
    assert next_alarm_change(windows, 0) == 10
    assert next_alarm_change(windows, 10) == 15
    assert next_alarm_change(windows, 20) == math.inf


# ---------------------------------------------------------------------------------------------
# Statistics and configuration


def test_latency_histogram_percentiles_are_within_a_bucket() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(math.log(0.005), 1.0) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        estimate = histogram.percentile(q)
        assert estimate is not None
        assert exact <= estimate <= exact * 2 ** (1 / 16) + 1e-12
    assert histogram.percentile(1.0) == max(values)
    assert LatencyHistogram().percentile(0.5) is None


def test_latency_histograms_merge_and_round_trip_through_json() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for i in range(1, 1000):
        (a if i % 2 else b).record(i / 1e4)
    a.merge(b)
    whole = LatencyHistogram()
    for i in range(1, 1000):
        whole.record(i / 1e4)
    assert a.counts == whole.counts
    assert a.count == whole.count == 999
    again = LatencyHistogram.from_json(a.to_json())
    assert again.counts == a.counts
    assert again.percentile(0.99) == a.percentile(0.99)
    tiny, huge = LatencyHistogram(), LatencyHistogram()
    tiny.record(1e-9)
    huge.record(1e6)
    assert tiny.counts[0] == 1
    assert huge.counts[-1] == 1


def test_stats_json_has_the_bench_fields() -> None:
    stats = Stats()
    stats.positions_acked, stats.elapsed_s = 500, 2.0
    stats.latency.record(0.002)
    out = stats.to_json()
    assert out["positions_acked_per_s"] == 250.0
    assert out["p50_ack_ms"] == pytest.approx(2.0, rel=0.05)
    assert set(Stats.COUNTERS) <= set(out)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.9.8.7", "127.9.8.7"),
        ("::1", "::1"),
        ("localhost", "127.0.0.1"),
    ],
)
def test_loopback_targets(host: str, expected: str) -> None:
    assert check_loopback(host) == expected


@pytest.mark.parametrize("host", ["10.0.0.1", "8.8.8.8", "example.com", "0.0.0.0", "::"])
def test_other_targets_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match=r"loopback|IP address"):
        check_loopback(host)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"host": "192.168.0.1"}, "loopback"),
        ({"terminals": 20_001}, "terminals"),
        ({"window": 0}, "window"),
        ({"retries": 11}, "retries"),
        ({"batch": MAX_BATCH + 1}, "batch"),
        ({"duration_s": None}, "to end"),
        ({"ack_timeout_s": 0}, "ack_timeout_s"),
        ({"edition_2019_ratio": 1.5}, "ratio"),
        ({"bbox": (1.0, 2.0, 0.0, 3.0)}, "bbox"),
        ({"media_bytes": 0}, "media_bytes"),
        ({"phone_base": 999_999_999_999}, "12 digits"),
    ],
)
def test_config_is_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(**overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Capture files


async def test_capture_file_is_readable_by_the_server_s_reader(tmp_path: Path) -> None:
    wall = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    capture = await CaptureFile.open(
        tmp_path, connection=7, peer="127.0.0.2:40000", wall=wall, start=100.0, max_bytes=100
    )
    assert not capture.record(b"\x7eabc\x7e", now=100.5)
    assert not capture.record(b"\x7e" + bytes(20) + b"\x7e", now=101.25)
    capture.record(bytes(100), now=102.0)  # would pass the cap: recording stops
    assert capture.stopped
    await capture.aclose()
    assert capture.path.name.startswith("20240501T120000.123456Z-")
    assert capture.path.name.endswith("-7.jt808cap")
    header, records = read_capture(capture.path)
    assert header.peer == "127.0.0.2:40000"
    assert header.start == wall
    assert header.version == 1
    assert records == [
        (500_000_000, b"\x7eabc\x7e"),
        (1_250_000_000, b"\x7e" + bytes(20) + b"\x7e"),
    ]
    assert capture.path.stat().st_size <= 100


async def test_capture_file_flushes_in_chunks(tmp_path: Path) -> None:
    capture = await CaptureFile.open(
        tmp_path, connection=1, peer="p:1", wall=datetime(2024, 1, 1, tzinfo=UTC), start=0.0,
        max_bytes=10**9,
    )  # fmt: skip
    chunk = bytes(range(256)) * 16
    flushes = 0
    for i in range(40):
        if capture.record(chunk, now=i * 0.001):
            flushes += 1
            await capture.flush()
    await capture.aclose()
    assert flushes >= 2  # 160 KiB in 64 KiB buffers
    _, records = read_capture(capture.path)
    assert [data for _, data in records] == [chunk] * 40
