"""The terminal simulator behind ``jt808 simulate``: many JT/T 808 terminals per process.

Each simulated terminal is one trio task (plus a reader task while connected) that behaves the
way JT/T 808-2013/2019 asks a terminal to:

* **Connection** (clause 5.1-5.3): it connects, registers with 0x0100 once (expecting 0x8100
  with an auth code, table 9), authenticates with 0x0102 on every connection (expecting 0x8001
  result 0), and then reports.  When the link drops, or a message stays unacknowledged after
  the last retransmission (clause 5.3: "达到重传次数后仍未收到应答" means the link is down), it
  reconnects with exponential backoff and authenticates again.  A rejected auth code makes it
  register again.
* **Acknowledgement and retransmission** (clause 6.1, formula (1); terminal parameters 0x0002
  and 0x0003): every message it originates waits for its 0x8001 (0x8100 for 0x0100), matched
  by reply serial and reply id.  Unanswered, it is sent again with the same serial after the
  timeout ``T(n+1) = T(n) x (n + 1)`` with ``T(1) = ack_timeout_s``, at most ``retries`` times.
  Messages still unacknowledged when the link drops are sent again after the next
  authentication (positions are not thrown away; heartbeats and handshake messages are).
* **Window**: at most ``window`` of its messages are unacknowledged at once; a position that
  falls due while the window is full waits for room, and ticks that pass meanwhile are skipped
  and counted (``skipped``), so a slow server shows up as missing rate, never as unbounded
  memory.
* **Reports**: 0x0200 at ``interval_s`` along its route (or ``batch`` positions per 0x0704, or
  ``group`` separate 0x0200 frames written together, as a terminal catching up does),
  ACC on while it moves, the odometer item 0x01 accumulating, the time from the device clock
  (GMT+8).  An alarm bit that rises or falls sends a report at once.  Heartbeats 0x0002 go out
  when nothing else was sent for ``heartbeat_s`` (clause 5.2).  Optional 0x0801 uploads of a
  synthetic JPEG are sub-packaged (clause 4.4.3) and each package is acknowledged on its own;
  0x8800 and 0x8003 retransmission lists are honoured.
* **Downlinks**: 0x8104/0x8106 -> 0x0104 with its parameters, 0x8201 -> 0x0201 with the current
  position, 0x8103 (applies heartbeat, timeout, retry count and interval), 0x8105 and 0x8300
  -> 0x0001 result 0, any other platform message -> 0x0001 result 3 (not supported), a
  platform frame that does not decode but has a header -> 0x0001 result 2.

Device time is injected: the clock starts at ``SimConfig.start_time`` and runs with trio's clock
times ``time_scale``, so under ``trio.testing.MockClock`` a run is exactly reproducible, and a
scenario (:mod:`tools.scenario`) produces the same positions every time.

Load: the hot path (0x0200/0x0704/0x0002 out, 0x8001 in) is framed with ``struct`` instead of
the construct schemas (about 5 us instead of 40 us a frame); tests check byte for byte that
both paths agree.  Everything is bounded: terminals per process, window, route pool,
receive buffer, capture file size, and the run itself (``duration_s``, ``max_reports``, a
hard stop ``drain_s`` after the end).  Only loopback addresses are accepted as targets and
source addresses.

Statistics (:class:`Stats`): messages sent (first transmissions), acknowledged (0x8001 result 0
or 4), rejected (any other result), retransmitted, failed (no ack after the last retry),
abandoned (heartbeats and handshake messages pending when a link dropped) and outstanding at
the end; ``sent == acked + rejected + failed + abandoned + outstanding``.  Positions are counted
as well (a 0x0704 carries several).  Ack latency runs from a message's first transmission to its
acknowledgement, kept in a fixed log-bucket histogram (:class:`LatencyHistogram`).  A sub-package
the platform asks for again (0x8800, 0x8003) counts as a new message.  ``downlinks`` counts
platform messages other than the answers 0x8001 and 0x8100; ``replies`` the answers to them.

Sockets: the simulator talks TCP through trio's high-level API, except :func:`open_stream`,
which binds the socket to a chosen loopback source address first (trio.open_tcp_stream has no
local-address parameter); it is the one place here that uses ``trio.socket``.

Capture: with ``capture_dir`` every connection's *outbound* bytes are recorded in the capture
format of :mod:`protocol.capture` (header, then ``offset_ns``/``length``/``data`` records), see
:class:`CaptureFile`.  The peer recorded is the simulated terminal's own address, which is what
the server's capture of the same connection would show.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import heapq
import ipaddress
import logging
import math
import os
import random
import struct
import zlib
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO, Final

import trio

from protocol import capture
from protocol.codec import MAX_BODY, Packet, decode_frame, encode, encode_split, parse_frame
from protocol.errors import (
    RESULT_ALARM_CONFIRMED,
    RESULT_MESSAGE_ERROR,
    RESULT_NOT_SUPPORTED,
    RESULT_SUCCESS,
    LocalProtocolError,
    RemoteProtocolError,
)
from protocol.fields import GMT8
from protocol.framing import MAX_ESCAPED_FRAME, FrameSplitter, check_code, escape
from protocol.header import Edition
from protocol.messages.base import Fragment, Message, is_downlink
from protocol.messages.control import LocationQuery, PlatformRetransmitRequest, TerminalControl
from protocol.messages.location import (
    STATUS_ACC_ON,
    STATUS_FIXED,
    STATUS_SOUTH,
    STATUS_WEST,
    GnssSatellites,
    Location,
    LocationBatch,
    LocationQueryResponse,
    LocationReport,
    Mileage,
    SignalStrength,
)
from protocol.messages.multimedia import (
    EVENT_TIMER,
    FORMAT_JPEG,
    MEDIA_IMAGE,
    MultimediaData,
    MultimediaUploadResponse,
)
from protocol.messages.params import (
    QueryParamsResponse,
    QuerySpecifiedParams,
    QueryTerminalParams,
    SetTerminalParams,
    TerminalParameter,
)
from protocol.messages.terminal import (
    REGISTER_OK,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalGeneralResponse,
    TerminalRegister,
    TerminalRegisterResponse,
)
from protocol.messages.text import TextMessage
from tools.scenario import DEFAULT_ALTITUDE_M, Scenario, Waypoint

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Limits and defaults (each with its reason)

DEFAULT_PORT = 6808
# A process may hold at most 20,000 descriptors here; more terminals than that need several
# processes anyway, so a larger number is a typo.
MAX_TERMINALS = 20_000
# Unacknowledged messages per terminal.  The standard sets no limit; devices keep a handful in
# flight (many strictly one).  Each costs one frame copy for retransmission (~60 bytes for a
# 0x0200), so 256 bound a terminal's retransmission memory to ~16 KB.
MAX_WINDOW = 256
DEFAULT_WINDOW = 8
# Parameters 0x0002/0x0003 (table 12): common defaults of 10 s and 3 retransmissions.
DEFAULT_ACK_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
# Beyond 10 retransmissions T(n) = T(1) * n! is days long; no device is configured so.
MAX_RETRIES = 10
# Synthetic routes are shared: terminal i drives route i mod 64 from its own starting phase.
# 64 routes of ~60 legs keep the route memory below 1 MB however many terminals run.
ROUTE_POOL = 64
ROUTE_LEGS = 30
# Kunming (25.04 N, 102.71 E): a box of about 20 x 18 km around the centre.
KUNMING_BBOX = (102.61, 24.96, 102.81, 25.12)
# Receive size: platform messages are small (an 0x8001 is 20 bytes); one read holds many.
RECV_BYTES = 16 * 1024
# The receive buffer holds at most one unfinished frame plus one read.
MAX_BUFFERED = MAX_ESCAPED_FRAME + RECV_BYTES
# Device seconds are rounded to the microsecond (Simulator.device_seconds); a tick is due when
# its instant is reached to within that rounding.
_TICK_SLACK_S = 1e-6
# One 0x0801 upload is held in memory per terminal (for 0x8800/0x8003 resends): 1 MiB caps it.
MAX_MEDIA_BYTES = 1024 * 1024
DEFAULT_MEDIA_BYTES = 4096
# Capture: at most this many bytes buffered per connection before a write to the file, and at
# most capture_max_bytes per file (the server's default).
CAPTURE_FLUSH_BYTES = 64 * 1024
DEFAULT_CAPTURE_MAX_BYTES = 64 * 1024 * 1024
# Registration and authentication refused this many times in a row: the terminal gives up.
MAX_HANDSHAKE_FAILURES = 5

# Message ids (JT/T 808-2019 chapter 8).
MSG_HEARTBEAT = 0x0002
MSG_REGISTER = TerminalRegister.MSG_ID
MSG_AUTH = TerminalAuth.MSG_ID
MSG_LOCATION = LocationReport.MSG_ID
MSG_BATCH = LocationBatch.MSG_ID
MSG_MEDIA = MultimediaData.MSG_ID
MSG_PLATFORM_ACK = PlatformGeneralResponse.MSG_ID
MSG_TERMINAL_ACK = TerminalGeneralResponse.MSG_ID

# ---------------------------------------------------------------------------------------------
# Fast framing of the hot messages

# Table 2: message body properties.
_VERSION_FLAG = 0x4000  # bit 14, 2019 header
_SUBPACKAGE = 0x2000  # bit 13
_ENCRYPTION = 0x1C00  # bits 10-12
_LENGTH = 0x03FF  # bits 0-9
# Table 3: id WORD, properties WORD, (2019: version BYTE), phone BCD[6]/BCD[10], serial WORD.
_HEADER_2013 = struct.Struct(">HH6sH")
_HEADER_2019 = struct.Struct(">HHB10sH")
# An 0x8001 (table 5: reply serial WORD, reply id WORD, result BYTE) after either header.
_ACK_BODY = struct.Struct(">HHB")
_ACK_2013 = struct.Struct(">HH6sHHHB")
_ACK_2019 = struct.Struct(">HHB10sHHHB")
_ACK_CONTENT_2013 = _ACK_2013.size + 1  # plus the check code
_ACK_CONTENT_2019 = _ACK_2019.size + 1
# Table 23: location basic information.
_BASIC = struct.Struct(">IIIIHHH6s")
# Additional items (table 27): 0x01 odometer DWORD (1/10 km), 0x30 signal BYTE, 0x31 satellites.
_ITEMS = struct.Struct(">BBIBBBBBB")
LOCATION_BODY_SIZE = _BASIC.size + _ITEMS.size
# 0x0704 (table 60): count WORD, type BYTE, then per position a length WORD and the body; the
# whole batch must fit one frame body (10-bit length), so at most this many positions.
MAX_BATCH = (MAX_BODY - 3) // (2 + LOCATION_BODY_SIZE)
_BATCH_HEAD = struct.Struct(">HB")
_WORD = struct.Struct(">H")
_FLAG = b"\x7e"


class Wire:
    """Frames one terminal's messages with ``struct`` (the construct path costs ~8x more).

    ``phone`` is left-padded with zeros to the header's BCD width: 12 digits (2013) or 20
    (2019).  :meth:`frame` gives exactly what :func:`protocol.encode_raw` gives.
    """

    __slots__ = ("_bcd", "_v2019", "edition", "phone", "protocol_version")

    def __init__(self, phone: str, edition: Edition, *, protocol_version: int = 1) -> None:
        self.edition = edition
        self._v2019 = edition is Edition.V2019
        digits = phone.rjust(20 if self._v2019 else 12, "0")
        if len(digits) > (20 if self._v2019 else 12) or not (digits.isdigit() and digits.isascii()):
            raise LocalProtocolError(f"{phone!r} does not fit the {edition.value} phone field")
        self.phone = digits
        self._bcd = bytes.fromhex(digits)
        self.protocol_version = protocol_version

    def frame(self, msg_id: int, serial: int, body: bytes) -> bytes:
        size = len(body)
        if size > MAX_BODY:
            raise LocalProtocolError(f"0x{msg_id:04x} body of {size} bytes needs sub-packaging")
        if self._v2019:
            head = _HEADER_2019.pack(
                msg_id, _VERSION_FLAG | size, self.protocol_version, self._bcd, serial
            )
        else:
            head = _HEADER_2013.pack(msg_id, size, self._bcd, serial)
        content = head + body
        return _FLAG + escape(content + bytes((check_code(content),))) + _FLAG


def parse_ack(content: bytes) -> tuple[int, int, int] | None:
    """(reply serial, reply id, result) of an 0x8001 frame's unescaped content, or None.

    None means "not a plain, well-formed 0x8001": the caller decodes the frame the ordinary way
    (which also reports a bad check code).  Agrees with :func:`protocol.codec.decode_frame`
    for every input it accepts (tested).
    """
    size = len(content)
    if size == _ACK_CONTENT_2013:
        layout, flag = _ACK_2013, 0
    elif size == _ACK_CONTENT_2019:
        layout, flag = _ACK_2019, _VERSION_FLAG
    else:
        return None
    if content[0] != 0x80 or content[1] != 0x01:
        return None
    properties = content[2] << 8 | content[3]
    if properties & (_VERSION_FLAG | _SUBPACKAGE | _ENCRYPTION) != flag:
        return None
    if properties & _LENGTH != _ACK_BODY.size:
        return None
    if check_code(content[:-1]) != content[-1]:
        return None
    fields = layout.unpack_from(content)
    return fields[-3], fields[-2], fields[-1]


def bcd_time(moment: datetime) -> bytes:
    """BCD[6] YYMMDDhhmmss in GMT+8 (table 23)."""
    local = moment.astimezone(GMT8)
    if not 2000 <= local.year <= 2099:
        raise LocalProtocolError(f"{local.year} does not fit a two-digit BCD year")
    return bytes.fromhex(
        f"{local.year - 2000:02d}{local.month:02d}{local.day:02d}"
        f"{local.hour:02d}{local.minute:02d}{local.second:02d}"
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """What a terminal reports at one instant, in wire units (table 23 and items 0x01/0x30/0x31).

    ``latitude``/``longitude`` are magnitudes in 1e-6 degree with the hemisphere in ``status``;
    ``speed`` is in 1/10 km/h, ``mileage`` in 1/10 km.
    """

    alarm: int
    status: int
    latitude: int
    longitude: int
    altitude_m: int
    speed: int
    direction: int
    time: datetime
    mileage: int
    signal: int = 25
    satellites: int = 12

    def body(self) -> bytes:
        """The 0x0200 body, byte for byte what :meth:`location` encodes to."""
        return _BASIC.pack(
            self.alarm,
            self.status,
            self.latitude,
            self.longitude,
            self.altitude_m,
            self.speed,
            self.direction,
            bcd_time(self.time),
        ) + _ITEMS.pack(0x01, 4, self.mileage, 0x30, 1, self.signal, 0x31, 1, self.satellites)

    def location(self, *, items: bool = True) -> Location:
        return Location(
            alarm=self.alarm,
            status=self.status,
            latitude=self.latitude,
            longitude=self.longitude,
            altitude_m=self.altitude_m,
            speed=self.speed,
            direction=self.direction,
            time=self.time,
            items=(
                (
                    Mileage(value=self.mileage),
                    SignalStrength.decode_value(bytes((self.signal,))),
                    GnssSatellites.decode_value(bytes((self.satellites,))),
                )
                if items
                else ()
            ),
        )


def batch_body(bodies: Sequence[bytes], *, batch_type: int = 0) -> bytes:
    """A 0x0704 body from location bodies (table 60), as :class:`LocationBatch` encodes it."""
    out = [_BATCH_HEAD.pack(len(bodies), batch_type)]
    for body in bodies:
        out.append(_WORD.pack(len(body)))
        out.append(body)
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Motion


def seeded(*parts: object) -> random.Random:
    """A reproducible generator for one purpose (routes, phases, backoff, media bytes).

    Simulation, not secrecy: the same seed must give the same fleet on every run.
    """
    return random.Random(":".join(map(str, parts)))  # noqa: S311


# Metres per degree of latitude, and of longitude at the equator (WGS-84 mean, equirectangular:
# legs are short, so the error against a geodesic is well below a metre per kilometre).
_M_PER_DEG = 111_320.0


def leg_metrics(lon0: float, lat0: float, lon1: float, lat1: float) -> tuple[float, int]:
    """Length in metres and heading (0-359, north = 0, clockwise) of a straight leg."""
    dy = (lat1 - lat0) * _M_PER_DEG
    dx = (lon1 - lon0) * _M_PER_DEG * math.cos(math.radians((lat0 + lat1) / 2))
    heading = round(math.degrees(math.atan2(dx, dy))) % 360
    return math.hypot(dx, dy), heading


@dataclasses.dataclass(frozen=True, slots=True)
class Leg:
    """One stretch of a timeline: moving in a straight line, or standing (``speed_kmh`` 0)."""

    t0: float
    t1: float
    lon0: float
    lat0: float
    lon1: float
    lat1: float
    speed_kmh: float
    heading: int
    dist0_m: float
    length_m: float
    acc_on: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Fix:
    lon: float
    lat: float
    speed_kmh: float
    heading: int
    distance_m: float
    acc_on: bool


class Timeline:
    """A vehicle's motion as a function of time (seconds from the timeline's origin).

    Before the origin the vehicle stands at its first point with ACC off; after the last leg it
    stands at the last point with ACC off, unless the timeline is ``periodic`` (a round trip
    driven over and over, the odometer still counting up).
    """

    __slots__ = ("_first", "_last", "_starts", "distance_m", "legs", "period_s", "periodic")

    def __init__(self, legs: Sequence[Leg], *, origin: tuple[float, float], periodic: bool) -> None:
        self.legs = tuple(legs)
        self._starts = [leg.t0 for leg in self.legs]
        self._first = origin
        last = self.legs[-1] if self.legs else None
        self._last = (last.lon1, last.lat1) if last else origin
        self.period_s = last.t1 if last else 0.0
        self.distance_m = (last.dist0_m + last.length_m) if last else 0.0
        self.periodic = periodic and self.period_s > 0

    def at(self, t: float) -> Fix:
        legs = self.legs
        if not legs or t < 0:
            heading = legs[0].heading if legs else 0
            return Fix(self._first[0], self._first[1], 0.0, heading, 0.0, acc_on=False)
        laps = 0.0
        if self.periodic:
            laps, t = divmod(t, self.period_s)
        elif t >= self.period_s:
            last = legs[-1]
            return Fix(last.lon1, last.lat1, 0.0, last.heading, self.distance_m, acc_on=False)
        leg = legs[bisect_right(self._starts, t) - 1]
        span = leg.t1 - leg.t0
        frac = (t - leg.t0) / span if span > 0 else 0.0
        return Fix(
            leg.lon0 + (leg.lon1 - leg.lon0) * frac,
            leg.lat0 + (leg.lat1 - leg.lat0) * frac,
            leg.speed_kmh,
            leg.heading,
            laps * self.distance_m + leg.dist0_m + leg.length_m * frac,
            acc_on=leg.acc_on,
        )


def timeline_from_waypoints(
    waypoints: Sequence[Waypoint], *, speed_kmh: float, periodic: bool = False
) -> Timeline:
    """Drive the waypoints in straight legs; see :mod:`tools.scenario` for the semantics."""
    if not waypoints:
        raise ValueError("a route needs at least one waypoint")
    legs: list[Leg] = []
    t = 0.0
    dist = 0.0
    heading = 0

    def stand(point: Waypoint, seconds: float, *, acc_on: bool) -> None:
        nonlocal t
        if seconds > 0:
            legs.append(
                Leg(
                    t0=t, t1=t + seconds, lon0=point.lon, lat0=point.lat, lon1=point.lon,
                    lat1=point.lat, speed_kmh=0.0, heading=heading, dist0_m=dist, length_m=0.0,
                    acc_on=acc_on,
                )
            )  # fmt: skip
            t += seconds

    first = waypoints[0]
    if len(waypoints) > 1:
        heading = leg_metrics(first.lon, first.lat, waypoints[1].lon, waypoints[1].lat)[1]
    stand(first, first.dwell_s, acc_on=True)
    stand(first, first.park_s, acc_on=False)
    for a, b in pairwise(waypoints):
        length, bearing = leg_metrics(a.lon, a.lat, b.lon, b.lat)
        speed = a.speed_kmh or speed_kmh
        duration = length / (speed / 3.6)
        if duration > 0:
            heading = bearing
            legs.append(
                Leg(
                    t0=t, t1=t + duration, lon0=a.lon, lat0=a.lat, lon1=b.lon, lat1=b.lat,
                    speed_kmh=speed, heading=heading, dist0_m=dist, length_m=length, acc_on=True,
                )
            )  # fmt: skip
            t += duration
            dist += length
        stand(b, b.dwell_s, acc_on=True)
        stand(b, b.park_s, acc_on=False)
    return Timeline(legs, origin=(first.lon, first.lat), periodic=periodic)


# Street grid: mostly straight on or a right-angle turn, now and then a diagonal.
_TURNS = ((0.55, 0), (0.75, -90), (0.95, 90), (1.0, 45))


def synthetic_route(
    rng: random.Random, bbox: tuple[float, float, float, float], *, legs: int = ROUTE_LEGS
) -> tuple[Waypoint, ...]:
    """A road-like out-and-back route inside ``bbox`` (lon_min, lat_min, lon_max, lat_max).

    City streets (150-1200 m at 20-50 km/h), now and then an arterial road (0.8-3 km at
    50-80 km/h); traffic lights (10-60 s, ACC on) at 40 % of the corners and a parking stop
    (2-15 min, ACC off) at 5 %.  The way back retraces the way out.
    """
    lon_min, lat_min, lon_max, lat_max = bbox
    margin_lon, margin_lat = (lon_max - lon_min) * 0.1, (lat_max - lat_min) * 0.1
    lon = rng.uniform(lon_min + margin_lon, lon_max - margin_lon)
    lat = rng.uniform(lat_min + margin_lat, lat_max - margin_lat)
    heading = rng.choice((0, 90, 180, 270))
    points = [(lon, lat)]
    speeds: list[float] = []  # of the leg leaving points[k]
    stops: list[tuple[float, float]] = []  # dwell and park on arriving at points[k + 1]
    for _ in range(legs):
        arterial = rng.random() < 0.2
        length = rng.uniform(800, 3000) if arterial else rng.uniform(150, 1200)
        speed = rng.uniform(50, 80) if arterial else rng.uniform(20, 50)
        draw = rng.random()
        turn = next(angle for bound, angle in _TURNS if draw < bound)
        for candidate in (heading + turn, heading - turn, heading + 180):
            rad = math.radians(candidate % 360)
            dlat = length * math.cos(rad) / _M_PER_DEG
            dlon = length * math.sin(rad) / (_M_PER_DEG * math.cos(math.radians(lat)))
            if lon_min <= lon + dlon <= lon_max and lat_min <= lat + dlat <= lat_max:
                heading = candidate % 360
                break
        else:
            continue  # boxed in at this length: draw another
        lon, lat = lon + dlon, lat + dlat
        points.append((lon, lat))
        speeds.append(speed)
        dwell = rng.uniform(10, 60) if rng.random() < 0.4 else 0.0
        park = rng.uniform(120, 900) if rng.random() < 0.05 else 0.0
        stops.append((dwell, park))
    way = tuple(
        Waypoint(
            lon=p_lon,
            lat=p_lat,
            speed_kmh=speeds[k] if k < len(speeds) else None,
            dwell_s=stops[k - 1][0] if k else 0.0,
            park_s=stops[k - 1][1] if k else 0.0,
        )
        for k, (p_lon, p_lat) in enumerate(points)
    )
    return _round_trip(way)


def _round_trip(way: tuple[Waypoint, ...]) -> tuple[Waypoint, ...]:
    """The way out and back along the same points (leg speeds mirrored)."""
    back = [
        Waypoint(
            lon=way[k].lon,
            lat=way[k].lat,
            speed_kmh=way[k - 1].speed_kmh if k > 0 else None,
            dwell_s=way[k].dwell_s,
            park_s=way[k].park_s,
        )
        for k in range(len(way) - 2, -1, -1)
    ]
    last = way[-1]
    turn = dataclasses.replace(last, speed_kmh=way[-2].speed_kmh if len(way) > 1 else None)
    return (*way[:-1], turn, *back)


# ---------------------------------------------------------------------------------------------
# Alarms


@dataclasses.dataclass(frozen=True, slots=True)
class AlarmWindow:
    """Alarm ``bits`` set for device seconds ``start_s <= t < end_s`` of the run."""

    bits: int
    start_s: float
    end_s: float = math.inf


def alarm_bits(windows: Sequence[AlarmWindow], t: float) -> int:
    bits = 0
    for window in windows:
        if window.start_s <= t < window.end_s:
            bits |= window.bits
    return bits


def next_alarm_change(windows: Sequence[AlarmWindow], t: float) -> float:
    """The first window edge after device second ``t`` (inf if none)."""
    best = math.inf
    for window in windows:
        for edge in (window.start_s, window.end_s):
            if t < edge < best:
                best = edge
    return best


# ---------------------------------------------------------------------------------------------
# Statistics


class LatencyHistogram:
    """Ack latencies in fixed log buckets: 16 per doubling from 1 us, 512 in all.

    Memory is fixed (512 counters: up to 2**32 us, about 72 minutes; longer lands in the last
    bucket) whatever the number of samples, the resolution is 2**(1/16) - 1 = 4.4 %, and
    histograms of several processes merge by adding counts.  A percentile is reported as the
    upper edge of its bucket, so it never understates.
    """

    PER_DOUBLING: Final = 16
    BUCKETS: Final = 512

    __slots__ = ("count", "counts", "max_s", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        index = int(math.log2(micros) * self.PER_DOUBLING) + 1 if micros >= 1 else 0
        self.counts[min(index, self.BUCKETS - 1)] += 1
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    @classmethod
    def upper_edge_s(cls, index: int) -> float:
        return float(2 ** (index / cls.PER_DOUBLING) / 1e6)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) in seconds, None without samples."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(self.upper_edge_s(index), self.max_s)
        return self.max_s  # pragma: no cover - the counts add up to count

    def merge(self, other: LatencyHistogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.count += other.count
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "us",
            "per_doubling": self.PER_DOUBLING,
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},
            "total_s": self.total_s,
            "max_s": self.max_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyHistogram:
        out = cls()
        for key, count in data["counts"].items():
            out.counts[int(key)] += int(count)
            out.count += int(count)
        out.total_s = float(data["total_s"])
        out.max_s = float(data["max_s"])
        return out


class Stats:
    """Counters of one simulator process (trio runs the terminals on one thread: no locks)."""

    COUNTERS: Final = (
        "terminals",
        "connected",
        "online",
        "connects",
        "connect_failures",
        "disconnects",
        "registrations",
        "register_failures",
        "authentications",
        "auth_failures",
        "gave_up",
        "sent",
        "acked",
        "rejected",
        "retransmitted",
        "failed",
        "abandoned",
        "outstanding",
        "late_acks",
        "positions_sent",
        "positions_acked",
        "positions_failed",
        "skipped",
        "heartbeats",
        "media_uploads",
        "media_packages",
        "media_confirmed",
        "downlinks",
        "replies",
        "bad_frames",
        "bytes_sent",
        "bytes_received",
    )

    def __init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.latency = LatencyHistogram()
        self.elapsed_s = 0.0
        # Why connections failed to open ("connection refused": n), for the summary.
        self.connect_errors: collections.Counter[str] = collections.Counter()

    terminals: int
    connected: int  # gauge: connections open now
    online: int  # gauge: authenticated connections now
    connects: int
    connect_failures: int
    disconnects: int
    registrations: int
    register_failures: int
    authentications: int
    auth_failures: int
    gave_up: int
    sent: int
    acked: int
    rejected: int
    retransmitted: int
    failed: int
    abandoned: int
    outstanding: int
    late_acks: int
    positions_sent: int
    positions_acked: int
    positions_failed: int
    skipped: int
    heartbeats: int
    media_uploads: int
    media_packages: int
    media_confirmed: int
    downlinks: int
    replies: int
    bad_frames: int
    bytes_sent: int
    bytes_received: int

    def to_json(self, *, histogram: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        p50, p99 = self.latency.percentile(0.50), self.latency.percentile(0.99)
        out["p50_ack_ms"] = round(p50 * 1e3, 3) if p50 is not None else None
        out["p99_ack_ms"] = round(p99 * 1e3, 3) if p99 is not None else None
        out["max_ack_ms"] = round(self.latency.max_s * 1e3, 3)
        out["elapsed_s"] = round(self.elapsed_s, 3)
        rate = self.positions_acked / self.elapsed_s if self.elapsed_s > 0 else 0.0
        out["positions_acked_per_s"] = round(rate, 1)
        out["connect_errors"] = dict(self.connect_errors)
        if histogram:
            out["latency_histogram"] = self.latency.to_json()
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """A snapshot for the progress line; rates are over the last ``window_s``."""

    elapsed_s: float
    stats: Stats
    positions_per_s: float
    acks_per_s: float


# ---------------------------------------------------------------------------------------------
# Capture (the format of protocol/capture.py, which ingest/capture.py writes as well)


class CaptureFile:
    """One connection's outbound bytes, one record per send.

    Records are buffered (at most :data:`CAPTURE_FLUSH_BYTES`) and written from a worker thread,
    so the terminals never block on the disk; a file stops growing at ``max_bytes`` (the records
    up to there stay whole).  The name follows the server's (:func:`protocol.capture.capture_name`):
    ``<UTC start %Y%m%dT%H%M%S.%fZ>-<pid>-<connection number>.jt808cap``.
    """

    def __init__(
        self, file: BinaryIO, path: Path, *, start: float, encoder: capture.CaptureEncoder
    ) -> None:
        self._file = file
        self.path = path
        self._start = start
        self._encoder = encoder
        self._buffer = bytearray()

    @property
    def written(self) -> int:
        return self._encoder.written

    @property
    def stopped(self) -> bool:
        return self._encoder.stopped

    @stopped.setter
    def stopped(self, value: bool) -> None:
        self._encoder.stopped = value

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        connection: int,
        peer: str,
        wall: datetime,
        start: float,
        max_bytes: int,
    ) -> CaptureFile:
        path = directory / capture.capture_name(wall, pid=os.getpid(), connection=connection)
        file = await trio.to_thread.run_sync(path.open, "xb")
        encoder = capture.CaptureEncoder(start=wall, peer=peer, max_bytes=max_bytes)
        out = cls(file, path, start=start, encoder=encoder)
        out._buffer += encoder.header()
        return out

    def record(self, data: bytes, *, now: float) -> bool:
        """Buffer a record of ``data`` sent at trio time ``now``; True when a flush is due."""
        if self._encoder.stopped:
            return False
        packed = self._encoder.record(data, offset=capture.offset_ns(now, self._start))
        if packed is None:
            logger.warning(
                "capture %s reached %s bytes; recording stopped", self.path, self.written
            )
            return bool(self._buffer)
        self._buffer += packed
        return len(self._buffer) >= CAPTURE_FLUSH_BYTES

    async def flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            await trio.to_thread.run_sync(self._file.write, data)

    async def aclose(self) -> None:
        await self.flush()
        await trio.to_thread.run_sync(self._file.close)


# ---------------------------------------------------------------------------------------------
# Configuration


def check_loopback(host: str) -> str:
    """``host`` as an IP literal if it is a loopback address; raises ValueError otherwise.

    The simulator is a load generator: it must never be pointed at somebody else's server.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (only loopback targets)") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address (only loopback targets)")
    return str(address)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """One simulator run.  Times are real seconds unless named device time.

    ``interval_s`` is the reporting interval in device seconds (0: no reports, heartbeats
    only); device time runs ``time_scale`` times faster than real time from ``start_time``
    (None: the wall clock when the run starts).  ``duration_s`` ends the run (None: when every
    terminal reached ``max_reports``); terminals then get ``drain_s`` to collect their acks
    before they are cut off.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    terminals: int = 10
    interval_s: float = 5.0
    duration_s: float | None = 60.0
    max_reports: int | None = None
    edition_2019_ratio: float = 0.5
    phone_base: int = 13_800_000_000
    batch: int = 1
    group: int = 1
    media_every_s: float | None = None
    media_bytes: int = DEFAULT_MEDIA_BYTES
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    window: int = DEFAULT_WINDOW
    heartbeat_s: float = 30.0
    ramp_s: float = 1.0
    drain_s: float = 5.0
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    seed: int = 808
    bbox: tuple[float, float, float, float] = KUNMING_BBOX
    alarms: tuple[AlarmWindow, ...] = ()
    source_addresses: tuple[str, ...] = ()
    capture_dir: Path | None = None
    capture_max_bytes: int = DEFAULT_CAPTURE_MAX_BYTES
    start_time: datetime | None = None
    time_scale: float = 1.0
    progress_s: float | None = 1.0

    def __post_init__(self) -> None:
        problems = []
        try:
            v6 = ":" in check_loopback(self.host)
            sources = [check_loopback(source) for source in self.source_addresses]
            problems += [
                f"source {s} is not of the target's family" for s in sources if (":" in s) != v6
            ]
        except ValueError as exc:
            problems.append(str(exc))
        if not 0 < self.port <= 0xFFFF:
            problems.append("port must be 1..65535")
        if not 1 <= self.terminals <= MAX_TERMINALS:
            problems.append(f"terminals must be 1..{MAX_TERMINALS} per process")
        if not 0 <= self.edition_2019_ratio <= 1:
            problems.append("edition_2019_ratio must be 0..1")
        if not 1 <= self.batch <= MAX_BATCH:
            problems.append(f"batch must be 1..{MAX_BATCH} (one 0x0704 per frame)")
        if not 1 <= self.window <= MAX_WINDOW:
            problems.append(f"window must be 1..{MAX_WINDOW}")
        if not 1 <= self.group <= self.window:
            problems.append("group must be 1..window")
        if self.group > 1 and self.batch > 1:
            problems.append("group and batch exclude each other")
        if not 0 <= self.retries <= MAX_RETRIES:
            problems.append(f"retries must be 0..{MAX_RETRIES}")
        if not 1 <= self.media_bytes <= MAX_MEDIA_BYTES:
            problems.append(f"media_bytes must be 1..{MAX_MEDIA_BYTES}")
        if self.max_reports is not None and self.max_reports < 1:
            problems.append("max_reports must be >= 1")
        if self.duration_s is None and (self.max_reports is None or self.interval_s == 0):
            problems.append("a run needs duration_s, or max_reports with reports, to end")
        if self.phone_base < 0 or self.phone_base + self.terminals > 10**12:
            problems.append("phone_base + terminals must fit 12 digits")
        positive = ("ack_timeout_s", "heartbeat_s", "time_scale", "connect_timeout_s")
        problems += [f"{name} must be > 0" for name in positive if not getattr(self, name) > 0]
        non_negative = ("interval_s", "ramp_s", "drain_s", "reconnect_min_s")
        problems += [f"{n} must be >= 0" for n in non_negative if not getattr(self, n) >= 0]
        for name in ("duration_s", "media_every_s", "progress_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0")
        if self.reconnect_max_s < self.reconnect_min_s:
            problems.append("reconnect_max_s must be >= reconnect_min_s")
        lon_min, lat_min, lon_max, lat_max = self.bbox
        if not (-180 <= lon_min < lon_max <= 180 and -90 <= lat_min < lat_max <= 90):
            problems.append("bbox must be lon_min,lat_min,lon_max,lat_max")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalSpec:
    """Who one simulated terminal is and how it moves.

    ``motion_offset_s`` maps device seconds of the run to timeline seconds
    (``t_timeline = t_device - motion_offset_s``); ``interval_s`` is in device seconds.
    """

    index: int
    phone: str
    edition: Edition
    plate: str
    timeline: Timeline
    plate_color: int = 1
    motion_offset_s: float = 0.0
    mileage0_m: float = 0.0
    altitude_m: int = DEFAULT_ALTITUDE_M
    interval_s: float = 5.0
    report_phase_s: float = 0.0
    alarms: tuple[AlarmWindow, ...] = ()
    province: int = 53  # GB/T 2260: Yunnan
    city: int = 100  # Kunming (5301xx)

    @property
    def terminal_id(self) -> str:
        # 0x0100 terminal id: 7 bytes (2013), 30 bytes (2019).
        return (
            f"S{self.index % 10**6:06d}"
            if self.edition is not Edition.V2019
            else (f"SIM{self.index:012d}")
        )

    @property
    def imei(self) -> str:
        return f"86{self.index % 10**13:013d}"  # 15 digits (table 10)


# Plates: province character and city letter, then five of these (no I or O, as on real plates).
_PLATE_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def synthetic_plate(index: int) -> str:
    digits = []
    for _ in range(5):
        index, rem = divmod(index, len(_PLATE_CHARS))
        digits.append(_PLATE_CHARS[rem])
    return "云A" + "".join(reversed(digits))


def is_2019(index: int, ratio: float) -> bool:
    """Spread the 2019 terminals evenly: exactly ``round(n * ratio)`` among the first n."""
    return math.floor((index + 1) * ratio + 0.5) > math.floor(index * ratio + 0.5)


def synthetic_fleet(config: SimConfig) -> list[TerminalSpec]:
    """``config.terminals`` terminals on a shared pool of synthetic routes, all seeded."""
    routes: list[Timeline] = []
    for number in range(min(ROUTE_POOL, config.terminals)):
        rng = seeded(config.seed, "route", number)
        waypoints = synthetic_route(rng, config.bbox)
        routes.append(timeline_from_waypoints(waypoints, speed_kmh=40.0, periodic=True))
    fleet = []
    for index in range(config.terminals):
        rng = seeded(config.seed, "terminal", index)
        timeline = routes[index % len(routes)]
        fleet.append(
            TerminalSpec(
                index=index,
                phone=str(config.phone_base + index),
                edition=Edition.V2019
                if is_2019(index, config.edition_2019_ratio)
                else Edition.V2013,
                plate=synthetic_plate(index),
                timeline=timeline,
                motion_offset_s=-rng.uniform(0, timeline.period_s),
                mileage0_m=rng.uniform(1_000, 300_000) * 1000,
                interval_s=config.interval_s,
                # Spread the fleet's reports over the interval rather than in one burst.
                report_phase_s=round(rng.uniform(0, config.interval_s), 3),
                alarms=config.alarms,
            )
        )
    return fleet


def scenario_fleet(scenario: Scenario) -> list[TerminalSpec]:
    """The scenario's vehicles as terminal specs (device seconds from the fleet start)."""
    fleet = scenario.fleet
    out = []
    for index, vehicle in enumerate(scenario.vehicles):
        start = vehicle.start or fleet.start
        alarms = tuple(
            AlarmWindow(
                bits=event.bits,
                start_s=(event.at - fleet.start).total_seconds(),
                end_s=(
                    (event.at - fleet.start).total_seconds() + event.duration_s
                    if event.duration_s is not None
                    else math.inf
                ),
            )
            for event in vehicle.alarms
        )
        out.append(
            TerminalSpec(
                index=index,
                phone=vehicle.phone,
                edition=vehicle.edition,
                plate=vehicle.plate,
                plate_color=vehicle.plate_color,
                timeline=timeline_from_waypoints(vehicle.waypoints, speed_kmh=vehicle.speed_kmh),
                motion_offset_s=(start - fleet.start).total_seconds(),
                mileage0_m=vehicle.mileage_km * 1000,
                altitude_m=vehicle.altitude_m,
                interval_s=vehicle.interval_s or fleet.interval_s,
                alarms=alarms,
            )
        )
    return out


def scenario_config(scenario: Scenario, base: SimConfig, *, duration_s: float | None) -> SimConfig:
    """``base`` with the scenario's clock, heartbeat and length.

    Without ``duration_s`` the run lasts the scenario's ``duration_s`` or, if it has none,
    until every vehicle finished its route plus two reporting intervals (device time).
    """
    fleet = scenario.fleet
    if duration_s is None:
        device_s = fleet.duration_s
        if device_s is None:
            ends = []
            for vehicle, spec in zip(scenario.vehicles, scenario_fleet(scenario), strict=True):
                ends.append(spec.motion_offset_s + spec.timeline.period_s + 2 * spec.interval_s)
                ends.extend(
                    (e.at - fleet.start).total_seconds() + (e.duration_s or 0)
                    for e in vehicle.alarms
                )
            device_s = max(*ends, fleet.interval_s)
        duration_s = device_s / fleet.time_scale
    return dataclasses.replace(
        base,
        terminals=len(scenario.vehicles),
        start_time=fleet.start,
        time_scale=fleet.time_scale,
        interval_s=fleet.interval_s,
        heartbeat_s=fleet.heartbeat_s / fleet.time_scale,
        duration_s=duration_s,
    )


# ---------------------------------------------------------------------------------------------
# Connecting

Connect = Callable[[str, int, str | None], Awaitable[trio.abc.Stream]]

IP_BIND_ADDRESS_NO_PORT = getattr(trio.socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h


async def open_stream(host: str, port: int, source: str | None = None) -> trio.abc.Stream:
    """A TCP stream to ``host:port``, from loopback address ``source`` if given.

    trio.open_tcp_stream cannot bind the local end, and one source address has only ~28,000
    ephemeral ports; binding connections to 127.0.0.2, 127.0.0.3 ... lifts that limit.  This is
    the one place in the simulator that touches ``trio.socket``.
    """
    if source is None:
        return await trio.open_tcp_stream(host, port)
    family = trio.socket.AF_INET6 if ":" in source else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        # Linux: choose the local port at connect(), not bind(); bind(addr, 0) searches the
        # ports in use one by one and, with tens of thousands of connections, takes most of
        # the simulator's time (IP_BIND_ADDRESS_NO_PORT, Linux 4.2+; harmless elsewhere).
        with contextlib.suppress(OSError):
            sock.setsockopt(trio.socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def connect_failure_reason(exc: OSError) -> str:
    """Why a connect failed, as people say it ("connection refused"): the error's own text,
    or that of the first attempt trio.open_tcp_stream made (it raises one OSError for all)."""
    found: BaseException | None = exc
    while found is not None:
        if isinstance(found, OSError) and (found.errno or found.strerror):
            # (trio's strerror names the address too; the errno's text is the reason alone)
            text = os.strerror(found.errno) if found.errno else str(found.strerror)
            return text[:1].lower() + text[1:]
        if isinstance(found, BaseExceptionGroup) and found.exceptions:
            found = found.exceptions[0]
        else:
            found = found.__cause__
    return str(exc) or type(exc).__name__


def _local_address(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        name = stream.socket.getsockname()
        return f"{name[0]}:{name[1]}"
    return "unknown:0"


# ---------------------------------------------------------------------------------------------
# One terminal


class _State(enum.Enum):
    NEED_REGISTER = "need_register"
    REGISTERING = "registering"
    NEED_AUTH = "need_auth"
    AUTHENTICATING = "authenticating"
    ONLINE = "online"


class _Kind(enum.Enum):
    REGISTER = "register"
    AUTH = "auth"
    HEARTBEAT = "heartbeat"
    REPORT = "report"
    MEDIA = "media"


# Kinds worth sending again on the next connection (the data a platform must not lose).
_DURABLE = frozenset({_Kind.REPORT, _Kind.MEDIA})


class _Pending:
    """An unacknowledged message: its bytes, for retransmission, and its timer state."""

    __slots__ = ("attempt", "first_sent", "kind", "positions", "timeout", "wire")

    def __init__(self, wire: bytes, kind: _Kind, positions: int, now: float, timeout: float):
        self.wire = wire
        self.kind = kind
        self.positions = positions
        self.first_sent = now
        self.attempt = 1  # transmissions so far
        self.timeout = timeout  # T(attempt)


class _Upload:
    """The latest 0x0801 upload: its packages, kept for 0x8800/0x8003 resend requests."""

    __slots__ = ("first_serial", "media_id", "queue", "wires")

    def __init__(self, media_id: int, first_serial: int, wires: list[bytes]) -> None:
        self.media_id = media_id
        self.first_serial = first_serial
        self.wires = wires
        self.queue = list(range(len(wires)))  # indexes not sent yet


class _Connection:
    __slots__ = ("capture", "scope", "splitter", "started", "stream")

    def __init__(self, stream: trio.abc.Stream, started: float) -> None:
        self.stream = stream
        self.started = started
        self.splitter = FrameSplitter(max_buffered_bytes=MAX_BUFFERED)
        self.capture: CaptureFile | None = None
        self.scope = trio.CancelScope()


class SimTerminal:
    """One simulated terminal; :meth:`run` drives it until the simulation ends."""

    __slots__ = (
        "_batch",
        "_blocked",
        "_conn",
        "_dirty",
        "_draining",
        "_handshake_failures",
        "_last_alarm",
        "_last_send",
        "_link_reason",
        "_lot",
        "_media_id",
        "_next_media",
        "_outbox",
        "_retry_at",
        "_serial",
        "_sim",
        "_tick_k",
        "_timer_seq",
        "_timers",
        "_upload",
        "_was_online",
        "ack_timeout_s",
        "alarm_override",
        "auth_code",
        "ever_online",
        "finished",
        "heartbeat_s",
        "interval_s",
        "pending",
        "phone",
        "reports",
        "retries",
        "spec",
        "state",
        "stats",
        "wire",
    )

    def __init__(self, sim: Simulator, spec: TerminalSpec) -> None:
        config = sim.config
        self._sim = sim
        self.spec = spec
        self.wire = Wire(spec.phone, spec.edition)
        self.phone = self.wire.phone
        self.stats = sim.stats
        # Terminal parameters (table 12) that 0x8103 may change.
        self.interval_s = spec.interval_s
        self.heartbeat_s = config.heartbeat_s
        self.ack_timeout_s = config.ack_timeout_s
        self.retries = config.retries
        self.auth_code: str | None = None
        self.state = _State.NEED_REGISTER
        self.alarm_override = 0
        self.reports = 0
        self.finished = False
        self.ever_online = False
        self.pending: dict[tuple[int, int], _Pending] = {}
        self._timers: list[tuple[float, int, tuple[int, int], int]] = []
        self._timer_seq = 0
        self._serial = 0
        self._outbox: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._dirty = False
        self._draining = False  # stopping: every acknowledgement may be the last one awaited
        self._blocked = False  # waiting for room in the window
        self._conn: _Connection | None = None
        self._link_reason = ""
        self._was_online = False
        self._retry_at = 0.0
        self._handshake_failures = 0
        self._tick_k: int | None = None  # next reporting tick on the device-time grid
        self._next_media = math.inf
        self._last_send = 0.0
        self._last_alarm = 0
        self._batch: list[bytes] = []
        self._upload: _Upload | None = None
        self._media_id = 0

    # -- time and position

    def device_seconds(self, now: float) -> float:
        return self._sim.device_seconds(now)

    def sample(self, now: float) -> Sample:
        """The terminal's state at trio time ``now``."""
        return self.sample_at(self.device_seconds(now))

    def sample_at(self, device_s: float) -> Sample:
        """The terminal's state at device second ``device_s`` of the run."""
        spec = self.spec
        fix = spec.timeline.at(device_s - spec.motion_offset_s)
        status = STATUS_FIXED | (STATUS_ACC_ON if fix.acc_on else 0)
        if fix.lat < 0:
            status |= STATUS_SOUTH
        if fix.lon < 0:
            status |= STATUS_WEST
        mileage = round((spec.mileage0_m + fix.distance_m) / 100)  # item 0x01: 1/10 km
        return Sample(
            alarm=alarm_bits(spec.alarms, device_s) | self.alarm_override,
            status=status,
            latitude=round(abs(fix.lat) * 1e6),
            longitude=round(abs(fix.lon) * 1e6),
            altitude_m=spec.altitude_m,
            speed=round(fix.speed_kmh * 10),
            direction=fix.heading,
            time=self._sim.device_time(device_s),
            mileage=mileage & 0xFFFFFFFF,
        )

    def _next_serial(self, count: int = 1) -> int:
        serial = self._serial
        self._serial = (serial + count) & 0xFFFF  # serials are WORDs and wrap (table 3)
        return serial

    # -- the life of the terminal

    async def run(self, delay: float) -> None:
        sim = self._sim
        await trio.sleep(delay)
        failures = 0
        while not self._done(trio.current_time()):
            stream: trio.abc.Stream | None = None
            reason = "timed out"
            with trio.move_on_after(sim.config.connect_timeout_s):
                try:
                    source = sim.source_for(self.spec.index)
                    stream = await sim.connect(sim.config.host, sim.config.port, source)
                except OSError as exc:
                    logger.debug("phone=%s connect failed: %s", self.phone, exc)
                    reason = connect_failure_reason(exc)
            if stream is None:
                self.stats.connect_failures += 1
                self.stats.connect_errors[reason] += 1
                failures += 1
            else:
                online = await self._session(stream)
                failures = 1 if online else failures + 1
            if self._done(trio.current_time()):
                break
            await trio.sleep(self._backoff(failures))

    def _done(self, now: float) -> bool:
        """Finished, or stopping with nothing left that must be delivered."""
        if self.finished:
            return True
        stopping = now >= self._sim.stop_at or self._reports_done()
        return stopping and not self._batch and not self._durable_pending()

    def _durable_pending(self) -> bool:
        return any(p.kind in _DURABLE for p in self.pending.values())

    def _reports_done(self) -> bool:
        limit = self._sim.config.max_reports
        return limit is not None and self.reports >= limit

    def _backoff(self, failures: int) -> float:
        config = self._sim.config
        base = min(config.reconnect_max_s, config.reconnect_min_s * 2.0 ** (failures - 1))
        # Jitter in [0.5, 1) so that a fleet dropped at once does not come back at once;
        # a hash rather than a generator per terminal (whose state costs 2.5 KB each).
        draw = zlib.crc32(f"{config.seed}:{self.spec.index}:{failures}".encode()) / 2**32
        return base * (0.5 + draw / 2)

    async def _session(self, stream: trio.abc.Stream) -> bool:
        """One connection, until it drops or the terminal is done; True if it got online."""
        sim = self._sim
        now = trio.current_time()
        conn = _Connection(stream, now)
        self._conn = conn
        self.stats.connects += 1
        self.stats.connected += 1
        self.state = _State.NEED_AUTH if self.auth_code else _State.NEED_REGISTER
        self._handshake_failures = 0
        self._link_reason = ""
        self._was_online = False
        try:
            if sim.config.capture_dir is not None:
                try:
                    conn.capture = await CaptureFile.open(
                        sim.config.capture_dir,
                        connection=sim.next_connection_number(),
                        peer=_local_address(stream),
                        wall=sim.wall_clock(),
                        start=now,
                        max_bytes=sim.config.capture_max_bytes,
                    )
                except OSError as exc:
                    logger.warning("phone=%s cannot capture: %s", self.phone, exc)
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                nursery.start_soon(self._reader, conn)
                await self._drive(conn)
                nursery.cancel_scope.cancel()
        finally:
            was_online = self.state is _State.ONLINE
            self._conn = None
            self.stats.connected -= 1
            if was_online:
                self.stats.online -= 1
            self.stats.disconnects += 1
            self._after_link()
            with trio.CancelScope(shield=True):
                # Bounded: closing a socket does not block; a capture flush is <= 64 KiB.
                await trio.aclose_forcefully(stream)
                if conn.capture is not None:
                    try:
                        await conn.capture.aclose()
                    except OSError as exc:
                        logger.warning("phone=%s capture not closed cleanly: %s", self.phone, exc)
            logger.debug("phone=%s disconnected: %s", self.phone, self._link_reason or "done")
        return self._was_online

    def _link_down(self, conn: _Connection, reason: str) -> None:
        if not self._link_reason:
            self._link_reason = reason
        conn.scope.cancel()

    def _after_link(self) -> None:
        """Keep what must be delivered for the next connection; give up the rest."""
        for key, pending in list(self.pending.items()):
            if pending.kind not in _DURABLE:
                del self.pending[key]
                self.stats.abandoned += 1
        self._timers.clear()
        self._outbox.clear()
        self.state = _State.NEED_AUTH if self.auth_code else _State.NEED_REGISTER

    # -- sending

    def _track(
        self, key: tuple[int, int], wire: bytes, kind: _Kind, now: float, out: list[bytes], *,
        positions: int = 0,
    ) -> None:  # fmt: skip
        pending = _Pending(wire, kind, positions, now, self.ack_timeout_s)
        self.pending[key] = pending
        self._arm(key, pending, now)
        out.append(wire)
        stats = self.stats
        stats.sent += 1
        stats.positions_sent += positions

    def _arm(self, key: tuple[int, int], pending: _Pending, now: float) -> None:
        self._timer_seq += 1
        entry = (now + pending.timeout, self._timer_seq, key, pending.attempt)
        heapq.heappush(self._timers, entry)

    def _expire(self, now: float, out: list[bytes]) -> bool:
        """Retransmit what timed out; False when a message ran out of retransmissions."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, key, attempt = heapq.heappop(timers)
            pending = self.pending.get(key)
            if pending is None or pending.attempt != attempt:
                continue  # acknowledged, or re-armed since
            if pending.attempt > self.retries:
                del self.pending[key]
                self.stats.failed += 1
                self.stats.positions_failed += pending.positions
                logger.info(
                    "phone=%s 0x%04x serial %s unacknowledged after %s transmissions",
                    self.phone, key[0], key[1], pending.attempt,
                )  # fmt: skip
                return False
            # Formula (1): T(n+1) = T(n) x (n + 1), n the transmissions so far.
            pending.timeout *= pending.attempt + 1
            pending.attempt += 1
            self._arm(key, pending, now)
            out.append(pending.wire)
            self.stats.retransmitted += 1
        return True

    async def _transmit(self, conn: _Connection, out: list[bytes]) -> bool:
        data = out[0] if len(out) == 1 else b"".join(out)
        now = trio.current_time()
        self._last_send = now
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._link_down(conn, f"send failed: {exc}")
            return False
        self.stats.bytes_sent += len(data)
        capture = conn.capture
        if capture is not None and capture.record(data, now=now):
            try:
                await capture.flush()
            except OSError as exc:
                logger.warning("phone=%s capture failed, recording stopped: %s", self.phone, exc)
                capture.stopped = True
        return True

    def _wake(self) -> None:
        self._dirty = True
        self._lot.unpark()

    # -- the scheduler

    async def _drive(self, conn: _Connection) -> None:
        """Send what is due, sleep until the next thing is; return when done (or cancelled)."""
        sim = self._sim
        while True:
            self._dirty = False
            self._blocked = False
            now = trio.current_time()
            out = self._outbox
            self._outbox = []
            if not self._expire(now, out):
                self._link_down(conn, "no acknowledgement after the last retransmission")
                return
            state = self.state
            online = state is _State.ONLINE
            stopping = now >= sim.stop_at or self._reports_done()
            if stopping:
                if online and self._batch:
                    self._flush_batch(now, out)
                if not (self.pending if online else self._durable_pending()):
                    if out:
                        await self._transmit(conn, out)
                    self.finished = True
                    return
            if state is _State.NEED_REGISTER and now >= self._retry_at:
                self._send_register(now, out)
            elif state is _State.NEED_AUTH and now >= self._retry_at:
                self._send_auth(now, out)
            elif online and not stopping:
                self._produce(now, out)
            if self._handshake_failures >= MAX_HANDSHAKE_FAILURES:
                self.stats.gave_up += 1
                self.finished = True
                self._link_down(conn, "registration or authentication refused repeatedly")
                return
            if out and not await self._transmit(conn, out):
                return
            if self._dirty:
                continue
            self._draining = now >= sim.stop_at or self._reports_done()
            # A deadline already due that found nothing to do must not spin the loop.
            with trio.move_on_at(max(self._next_wake(now), now + _TICK_SLACK_S)):
                await self._lot.park()

    def _next_wake(self, now: float) -> float:
        wake = self._timers[0][0] if self._timers else math.inf
        sim = self._sim
        if now < sim.stop_at:
            wake = min(wake, sim.stop_at)
        if self.state in (_State.NEED_REGISTER, _State.NEED_AUTH):
            return min(wake, self._retry_at)
        if self._draining or self.state is not _State.ONLINE:
            return wake  # only retransmissions and acknowledgements are awaited now
        if len(self.pending) >= sim.config.window:
            self._blocked = True  # an acknowledgement wakes the terminal when there is room
            return wake
        if self._tick_fits():
            wake = min(wake, self._report_due())
        else:
            self._blocked = True
        wake = min(wake, self._next_media, self._last_send + self.heartbeat_s)
        if self.spec.alarms:
            change = next_alarm_change(self.spec.alarms, self.device_seconds(now))
            if change < math.inf:
                wake = min(wake, sim.trio_time(change))
        return wake

    def _send_register(self, now: float, out: list[bytes]) -> None:
        spec = self.spec
        v2019 = spec.edition is Edition.V2019
        message = TerminalRegister(
            province=spec.province,
            city=spec.city,
            manufacturer="SIMULATOR01" if v2019 else "SIMUL",  # 11 / 5 bytes (table 8)
            model="JT808-SIM",
            terminal_id=spec.terminal_id,
            plate_color=spec.plate_color,
            plate=spec.plate,
        )
        self._send_message(message, _Kind.REGISTER, now, out)
        self.state = _State.REGISTERING

    def _send_auth(self, now: float, out: list[bytes]) -> None:
        code = self.auth_code or ""
        if self.spec.edition is Edition.V2019:
            message = TerminalAuth(auth_code=code, imei=self.spec.imei, software_version="SIM-1.0")
        else:
            message = TerminalAuth(auth_code=code)
        self._send_message(message, _Kind.AUTH, now, out)
        self.state = _State.AUTHENTICATING

    def _send_message(self, message: Message, kind: _Kind, now: float, out: list[bytes]) -> None:
        serial = self._next_serial()
        wire = encode(message, phone=self.phone, serial=serial, edition=self.spec.edition)
        self._track((message.msg_id, serial), wire, kind, now, out)

    def _go_online(self, now: float) -> None:
        self.state = _State.ONLINE
        self._was_online = True
        self.ever_online = True
        self.stats.online += 1
        self.stats.authentications += 1
        self._handshake_failures = 0
        self._last_send = now
        if self.interval_s > 0:
            # Reports keep to the device-time grid phase + k * interval; ticks that passed
            # while the terminal was offline are skipped.
            first = self._tick_at_or_after(self.device_seconds(now))
            if self._tick_k is not None and first > self._tick_k:
                self.stats.skipped += first - self._tick_k
            self._tick_k = max(first, self._tick_k or 0)
        media = self._sim.config.media_every_s
        if media is not None and self._next_media == math.inf:
            self._next_media = now + media
        # Positions and media the last connection did not get acknowledged go out again.
        for key, pending in self.pending.items():
            pending.attempt = 1
            pending.timeout = self.ack_timeout_s
            self._arm(key, pending, now)
            self._outbox.append(pending.wire)
            self.stats.retransmitted += 1

    def _tick_at_or_after(self, device_s: float) -> int:
        phase = self.spec.report_phase_s
        return max(0, math.ceil((device_s - phase - _TICK_SLACK_S) / self.interval_s))

    def _report_due(self) -> float:
        """Trio time of the next reporting tick (inf when the terminal does not report)."""
        if self._tick_k is None or self.interval_s <= 0 or self._reports_done():
            return math.inf
        # A batch or group is written when its last position is due: no wake-up per position.
        ahead = self._chunk() - len(self._batch) - 1
        limit = self._sim.config.max_reports
        if limit is not None:
            ahead = min(ahead, limit - self.reports - 1)
        tick = self._tick_k + max(ahead, 0)
        return self._sim.trio_time(self.spec.report_phase_s + tick * self.interval_s)

    def _chunk(self) -> int:
        """Positions written together: a 0x0704 batch, a group of 0x0200, or one."""
        config = self._sim.config
        return max(config.batch, config.group)

    def _produce(self, now: float, out: list[bytes]) -> None:
        """The reports, uploads and heartbeats due at ``now`` (as the window allows)."""
        window = self._sim.config.window
        pending = self.pending
        bits = alarm_bits(self.spec.alarms, self.device_seconds(now)) | self.alarm_override
        if bits != self._last_alarm and len(pending) < window:
            self._send_report(self.sample(now), now, out)  # alarms are reported at once
        if now >= self._report_due() and self._tick_fits():
            self._tick(now, out)
        upload = self._upload
        if (upload is None or not upload.queue) and now >= self._next_media:
            self._start_upload(now)
            upload = self._upload
        if upload is not None:
            while upload.queue and len(pending) < window:
                index = upload.queue.pop(0)
                serial = (upload.first_serial + index) & 0xFFFF
                self._track((MSG_MEDIA, serial), upload.wires[index], _Kind.MEDIA, now, out)
                self.stats.media_packages += 1
        if not out and now >= self._last_send + self.heartbeat_s and len(pending) < window:
            serial = self._next_serial()
            wire = self.wire.frame(MSG_HEARTBEAT, serial, b"")
            self._track((MSG_HEARTBEAT, serial), wire, _Kind.HEARTBEAT, now, out)
            self.stats.heartbeats += 1

    def _tick_fits(self) -> bool:
        """Whether the window has room for what the next due tick writes."""
        config = self._sim.config
        return len(self.pending) + config.group <= config.window  # a 0x0704 is one message

    def _tick(self, now: float, out: list[bytes]) -> None:
        """Record the positions of the ticks due and write them when the chunk is full.

        Positions are functions of device time, so a batch or group samples its past ticks
        when it is written.  Ticks that passed while the window was full are skipped (and
        counted), keeping at most one chunk of backlog.
        """
        assert self._tick_k is not None, "ticks start when the terminal goes online"
        phase, interval = self.spec.report_phase_s, self.interval_s
        chunk = self._chunk()
        latest = math.floor((self.device_seconds(now) - phase + _TICK_SLACK_S) / interval)
        oldest = latest - (chunk - len(self._batch)) + 1  # the backlog kept
        if oldest > self._tick_k:
            self.stats.skipped += oldest - self._tick_k
            self._tick_k = oldest
        if chunk == 1:
            sample = self.sample_at(phase + self._tick_k * interval)
            self._tick_k += 1
            self.reports += 1
            self._send_report(sample, now, out)
            return
        while self._tick_k <= latest and len(self._batch) < chunk and not self._reports_done():
            sample = self.sample_at(phase + self._tick_k * interval)
            self._tick_k += 1
            self.reports += 1
            self._batch.append(sample.body())
            self._last_alarm = sample.alarm
        if len(self._batch) >= chunk or self._reports_done():
            self._flush_batch(now, out)

    def _flush_batch(self, now: float, out: list[bytes]) -> None:
        """Send the positions held back: one 0x0704, or a group of 0x0200 in one write."""
        bodies, self._batch = self._batch, []
        if self._sim.config.batch > 1:
            serial = self._next_serial()
            wire = self.wire.frame(MSG_BATCH, serial, batch_body(bodies))
            self._track((MSG_BATCH, serial), wire, _Kind.REPORT, now, out, positions=len(bodies))
            return
        for body in bodies:
            serial = self._next_serial()
            wire = self.wire.frame(MSG_LOCATION, serial, body)
            self._track((MSG_LOCATION, serial), wire, _Kind.REPORT, now, out, positions=1)

    def _send_report(self, sample: Sample, now: float, out: list[bytes]) -> None:
        self._last_alarm = sample.alarm
        serial = self._next_serial()
        wire = self.wire.frame(MSG_LOCATION, serial, sample.body())
        self._track((MSG_LOCATION, serial), wire, _Kind.REPORT, now, out, positions=1)

    def _start_upload(self, now: float) -> None:
        config = self._sim.config
        self._next_media = now + (config.media_every_s or math.inf)
        self._media_id += 1
        sample = self.sample(now)
        message = MultimediaData(
            media_id=self._media_id,
            media_type=MEDIA_IMAGE,
            media_format=FORMAT_JPEG,
            event=EVENT_TIMER,
            channel=1,
            location=sample.location(items=False),
            data=synthetic_jpeg(f"{config.seed}:{self.phone}:{self._media_id}", config.media_bytes),
        )
        # Sub-packages take consecutive serials (clause 4.4.3); reserve them all.
        body_size = len(message.encode(self.spec.edition))
        total = max(1, math.ceil(body_size / MAX_BODY))
        first = self._next_serial(total)
        wires = encode_split(
            message, phone=self.phone, first_serial=first, edition=self.spec.edition
        )
        self._upload = _Upload(self._media_id, first, wires)
        self.stats.media_uploads += 1

    def _resend_packages(self, upload: _Upload, indexes: Sequence[int], now: float) -> None:
        for index in indexes:
            if not 0 <= index < len(upload.wires) or index in upload.queue:
                continue
            key = (MSG_MEDIA, (upload.first_serial + index) & 0xFFFF)
            if key in self.pending:
                continue
            # A package the platform asks for again is a new message with its own ack.
            self._track(key, upload.wires[index], _Kind.MEDIA, now, self._outbox)

    # -- receiving

    async def _reader(self, conn: _Connection) -> None:
        stats = self.stats
        splitter = conn.splitter
        try:
            while True:
                data = await conn.stream.receive_some(RECV_BYTES)
                if not data:
                    self._link_down(conn, "server closed the connection")
                    return
                stats.bytes_received += len(data)
                splitter.feed(data if isinstance(data, bytes) else bytes(data))
                now = trio.current_time()
                while (raw := splitter.next_frame()) is not None:
                    if isinstance(raw, RemoteProtocolError):
                        stats.bad_frames += 1
                        continue
                    ack = parse_ack(raw.content)
                    if ack is not None:
                        self._on_ack(ack[0], ack[1], ack[2], now)
                        continue
                    try:
                        packet = decode_frame(parse_frame(raw))
                    except RemoteProtocolError as exc:
                        self._on_bad_frame(exc)
                        continue
                    self._on_packet(packet, now)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._link_down(conn, f"receive failed: {exc}")

    def _on_ack(self, serial: int, msg_id: int, result: int, now: float) -> None:
        pending = self.pending.pop((msg_id, serial), None)
        stats = self.stats
        if pending is None:
            stats.late_acks += 1
            return
        stats.latency.record(now - pending.first_sent)
        ok = result in (RESULT_SUCCESS, RESULT_ALARM_CONFIRMED)
        if ok:
            stats.acked += 1
            stats.positions_acked += pending.positions
        else:
            stats.rejected += 1
        if pending.kind is _Kind.AUTH:
            if ok:
                self._go_online(now)
            else:
                stats.auth_failures += 1
                self._handshake_failures += 1
                self.auth_code = None  # a stale code: register again
                self.state = _State.NEED_REGISTER
        elif pending.kind is _Kind.REGISTER:  # refused with 0x8001 instead of 0x8100
            self._register_refused(now)
        elif not (self._blocked or self._draining):
            return  # the scheduler is not waiting for this: spare it a wake-up
        self._wake()

    def _register_refused(self, now: float) -> None:
        self.stats.register_failures += 1
        self._handshake_failures += 1
        self.state = _State.NEED_REGISTER
        self._retry_at = now + self._backoff(self._handshake_failures)

    def _on_packet(self, packet: Packet, now: float) -> None:
        message = packet.message
        stats = self.stats
        if isinstance(message, PlatformGeneralResponse):
            self._on_ack(message.reply_serial, message.reply_msg_id, message.result, now)
            return
        if not is_downlink(packet.msg_id):
            stats.bad_frames += 1
            return
        if isinstance(message, TerminalRegisterResponse):
            pending = self.pending.pop((MSG_REGISTER, message.reply_serial), None)
            if pending is None:
                stats.late_acks += 1
                return
            stats.latency.record(now - pending.first_sent)
            if message.result == REGISTER_OK and message.auth_code:
                stats.acked += 1
                stats.registrations += 1
                self.auth_code = message.auth_code
                self.state = _State.NEED_AUTH
                self._retry_at = now
            else:
                stats.rejected += 1
                self._register_refused(now)
            self._wake()
            return
        stats.downlinks += 1
        reply = self._answer(packet, now)
        if reply is not None:
            self._reply(reply, packet)

    def _answer(self, packet: Packet, now: float) -> Message | None:
        """The reply to a platform message (None: it needs none)."""
        message = packet.message
        serial = packet.serial

        def ok(result: int = RESULT_SUCCESS) -> TerminalGeneralResponse:
            return TerminalGeneralResponse(
                reply_serial=serial, reply_msg_id=packet.msg_id, result=result
            )

        if isinstance(message, Fragment):
            return ok(RESULT_NOT_SUPPORTED)  # sub-packaged downlinks are not reassembled here
        if isinstance(message, LocationQuery):
            return LocationQueryResponse(reply_serial=serial, location=self.sample(now).location())
        if isinstance(message, QueryTerminalParams):
            return QueryParamsResponse(reply_serial=serial, params=self.parameters())
        if isinstance(message, QuerySpecifiedParams):
            wanted = set(message.param_ids)
            params = tuple(p for p in self.parameters() if p.param_id in wanted)
            return QueryParamsResponse(reply_serial=serial, params=params)
        if isinstance(message, SetTerminalParams):
            self._apply(message)
            return ok()
        if isinstance(message, TerminalControl | TextMessage):
            return ok()
        if isinstance(message, MultimediaUploadResponse):
            upload = self._upload
            if upload is not None and upload.media_id == message.media_id:
                if message.retransmit_ids:
                    self._resend_packages(upload, [i - 1 for i in message.retransmit_ids], now)
                else:
                    self.stats.media_confirmed += 1
            self._wake()
            return None
        if isinstance(message, PlatformRetransmitRequest):
            upload = self._upload
            if upload is not None and upload.first_serial == message.original_serial:
                indexes = []
                for ident in message.packet_ids:  # indexes or serials: read both ways
                    if 1 <= ident <= len(upload.wires):
                        indexes.append(ident - 1)
                    else:
                        indexes.append((ident - upload.first_serial) & 0xFFFF)
                self._resend_packages(upload, indexes, now)
                self._wake()
                return None
        return ok(RESULT_NOT_SUPPORTED)

    def _on_bad_frame(self, error: RemoteProtocolError) -> None:
        self.stats.bad_frames += 1
        header = error.header
        if header is not None and is_downlink(header.msg_id):
            self._reply(
                TerminalGeneralResponse(
                    reply_serial=header.serial, reply_msg_id=header.msg_id,
                    result=RESULT_MESSAGE_ERROR,
                ),
                None,
            )  # fmt: skip

    def _reply(self, message: Message, packet: Packet | None) -> None:
        serial = self._next_serial()
        try:
            wires = [encode(message, phone=self.phone, serial=serial, edition=self.spec.edition)]
        except LocalProtocolError:  # a long 0x0104 answer
            wires = encode_split(
                message, phone=self.phone, first_serial=serial, edition=self.spec.edition
            )
            self._next_serial(len(wires) - 1)
        self._outbox.extend(wires)
        self.stats.replies += 1
        if packet is not None:
            logger.debug("phone=%s answered 0x%04x", self.phone, packet.msg_id)
        self._wake()

    def parameters(self) -> tuple[TerminalParameter, ...]:
        """Table 12 parameters this terminal reports in 0x0104."""
        config = self._sim.config
        named = TerminalParameter.named
        params = [
            named("heartbeat_interval_s", max(1, round(self.heartbeat_s))),
            named("tcp_reply_timeout_s", max(1, math.ceil(self.ack_timeout_s))),
            named("tcp_retransmit_count", self.retries),
            named("report_interval_default_s", max(1, round(self.interval_s))),
        ]
        if self.spec.edition is Edition.V2019:  # 2019: host:port in 0x0013
            params.append(named("main_server_address", f"{config.host}:{config.port}"))
        else:
            params.append(named("main_server_address", config.host))
            params.append(named("server_tcp_port", config.port))
        params += [
            named("odometer", self.sample(trio.current_time()).mileage),
            named("province_id", self.spec.province),
            named("city_id", self.spec.city),
            named("plate", self.spec.plate),
            named("plate_color", self.spec.plate_color),
        ]
        return tuple(params)

    def _apply(self, message: SetTerminalParams) -> None:
        """Take over the parameters of 0x8103 that change this terminal's behaviour."""
        values = {p.param_id: p.value for p in message.params if isinstance(p.value, int)}
        if values.get(0x0001):
            self.heartbeat_s = float(values[0x0001])
        if values.get(0x0002):
            self.ack_timeout_s = float(values[0x0002])
        if 0x0003 in values:
            self.retries = min(values[0x0003], MAX_RETRIES)
        if values.get(0x0029):
            self.interval_s = float(values[0x0029])
            if self._tick_k is not None:
                self._tick_k = self._tick_at_or_after(self.device_seconds(trio.current_time()))


def synthetic_jpeg(seed: str, size: int) -> bytes:
    """``size`` bytes that look like a baseline JPEG: SOI, a JFIF APP0, noise, EOI."""
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    tail = b"\xff\xd9"
    if size < len(head) + len(tail):
        return (head + tail)[:size]
    noise = seeded(seed).randbytes(size - len(head) - len(tail))
    return head + noise + tail


# ---------------------------------------------------------------------------------------------
# The fleet


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Simulator:
    """Runs a fleet of :class:`SimTerminal` against one server.

    ``fleet`` defaults to :func:`synthetic_fleet`; ``connect`` to :func:`open_stream` (tests may
    pass in-memory streams); ``on_progress`` is called every ``config.progress_s`` seconds;
    ``wall_clock`` (UTC) dates the capture files and, without ``config.start_time``, the
    device clock.
    """

    def __init__(
        self,
        config: SimConfig,
        fleet: Sequence[TerminalSpec] | None = None,
        *,
        connect: Connect = open_stream,
        on_progress: Callable[[Progress], None] | None = None,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.config = config
        self.connect = connect
        self.on_progress = on_progress
        self.wall_clock = wall_clock
        self.stats = Stats()
        specs = list(fleet) if fleet is not None else synthetic_fleet(config)
        if len(specs) > MAX_TERMINALS:
            raise ValueError(f"{len(specs)} terminals; at most {MAX_TERMINALS} per process")
        self.terminals = [SimTerminal(self, spec) for spec in specs]
        self._by_phone = {t.phone: t for t in self.terminals}
        if len(self._by_phone) != len(self.terminals):
            raise ValueError("two terminals share a phone number")
        self.stats.terminals = len(self.terminals)
        self.t0 = 0.0
        self.stop_at = math.inf
        self._origin = config.start_time
        self._connections = 0

    # -- clocks

    def device_seconds(self, now: float) -> float:
        # Rounded to the microsecond, so that trio_time() and back is the identity on the
        # instants the terminals schedule (alarm edges, reporting ticks).
        return round((now - self.t0) * self.config.time_scale, 6)

    def trio_time(self, device_s: float) -> float:
        return self.t0 + device_s / self.config.time_scale

    def device_time(self, device_s: float) -> datetime:
        origin = self._origin
        assert origin is not None, "run() sets the device clock"
        return origin + timedelta(seconds=device_s)

    # -- helpers for terminals

    def source_for(self, index: int) -> str | None:
        sources = self.config.source_addresses
        return sources[index % len(sources)] if sources else None

    def next_connection_number(self) -> int:
        self._connections += 1
        return self._connections

    def terminal(self, phone: str) -> SimTerminal:
        """The terminal with this phone (as configured or as padded in its header)."""
        for key in (phone, phone.rjust(12, "0"), phone.rjust(20, "0")):
            if key in self._by_phone:
                return self._by_phone[key]
        raise KeyError(phone)

    def set_alarm(self, phone: str, bits: int) -> None:
        """Raise alarm ``bits`` (table 24) on a terminal now, on top of its scripted alarms;
        0 clears them.  The change is reported at once."""
        terminal = self.terminal(phone)
        terminal.alarm_override = bits & 0xFFFFFFFF
        terminal._wake()

    # -- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> Stats:
        config = self.config
        self.t0 = trio.current_time()
        if self._origin is None:
            self._origin = self.wall_clock().astimezone(GMT8).replace(microsecond=0)
        if config.duration_s is not None:
            self.stop_at = self.t0 + config.duration_s
        hard_stop = self.stop_at + config.drain_s
        count = len(self.terminals)
        try:
            with trio.CancelScope(deadline=hard_stop):
                async with trio.open_nursery() as nursery:
                    if self.on_progress is not None and config.progress_s is not None:
                        nursery.start_soon(self._progress_loop, config.progress_s)
                    async with trio.open_nursery() as fleet:
                        for index, terminal in enumerate(self.terminals):
                            fleet.start_soon(terminal.run, config.ramp_s * index / count)
                        task_status.started()
                    nursery.cancel_scope.cancel()
        finally:  # also when interrupted (Ctrl-C): the summary tells how long it ran
            self.stats.elapsed_s = trio.current_time() - self.t0
        self.stats.outstanding = sum(len(t.pending) for t in self.terminals)
        return self.stats

    async def _progress_loop(self, every_s: float) -> None:
        assert self.on_progress is not None
        last_positions = last_acks = 0
        last = trio.current_time()
        while True:
            await trio.sleep(every_s)
            now = trio.current_time()
            stats = self.stats
            span = max(now - last, 1e-9)
            self.on_progress(
                Progress(
                    elapsed_s=now - self.t0,
                    stats=stats,
                    positions_per_s=(stats.positions_acked - last_positions) / span,
                    acks_per_s=(stats.acked - last_acks) / span,
                )
            )
            last, last_positions, last_acks = now, stats.positions_acked, stats.acked


__all__ = [
    "KUNMING_BBOX",
    "MAX_BATCH",
    "AlarmWindow",
    "CaptureFile",
    "Fix",
    "LatencyHistogram",
    "Leg",
    "Progress",
    "Sample",
    "SimConfig",
    "SimTerminal",
    "Simulator",
    "Stats",
    "TerminalSpec",
    "Timeline",
    "Wire",
    "batch_body",
    "bcd_time",
    "check_loopback",
    "open_stream",
    "parse_ack",
    "scenario_config",
    "scenario_fleet",
    "synthetic_fleet",
    "synthetic_jpeg",
    "synthetic_plate",
    "synthetic_route",
    "timeline_from_waypoints",
]
