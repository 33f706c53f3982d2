"""A lean JT/T 808 load generator: many terminals, one 0x0200 frame per write, little CPU.

    .venv/bin/python bench/loadgen.py --port 6808 [--host 127.0.0.1] [--terminals 10000]
        [--rate 15000] [--duration-s 30] [--warmup-s S] [--group 1] [--window 1]
        [--processes N] [--connect-rate 1000] [--ack-timeout-s 10] [--json]

Each simulated terminal connects to a ``jt808 serve`` on a loopback address, registers (0x0100,
its 0x8100 answer read with :class:`protocol.StreamDecoder` for the auth code) and
authenticates (0x0102, answered 0x8001 result 0), all built with the project's codec.  Once
the whole fleet is online (or ``--online-timeout-s`` has passed) every terminal reports every
``terminals / rate`` seconds, the phases of the fleet spread evenly over that period, so the
server sees a steady ``--rate`` of 0x0200 frames a second, each its own TCP write as terminals
on the road send them.  ``--group N`` writes N frames together every N periods instead (a
terminal catching up after a blind area): the same rate, fewer writes.

Per terminal:

* 0x0200 frames are patched, not encoded: one frame per terminal is built with
  :func:`protocol.encode` (30 % of the fleet JT/T 808-2019, spread evenly as
  ``jt808 simulate`` does), and each report changes only the header's serial, the device time
  (BCD), the latitude and longitude, and the check code (clause 4.4.4, the XOR of the header
  and body, updated from the XOR of the fixed bytes), then escapes 0x7E and 0x7D (clause 6.1)
  where they occur.  :class:`ReportFrames` is that template; a test checks it against the
  codec byte for byte.
* Report ``k`` of a terminal carries device time ``start + k`` seconds (the device clock
  advances one second per report), so no two reports of a terminal share the storage's natural
  key (phone, device time, fix) and ``sent == acked == stored`` can be checked.
* At most ``--window`` reports are unacknowledged at once (1 by default: a terminal waits for
  each answer).  A report that falls due while the window is full waits for room (it is written
  as soon as an ack frees the window), at most ``window`` of them; ticks beyond that are
  skipped and counted (``skipped``), so a slow server shows as missing rate, never as memory.
* Acks (0x8001 with reply id 0x0200) are matched by reply serial on their connection; a report
  whose ack does not come is sent again with the same serial after the timeout
  ``T(n+1) = T(n) x (n + 1)``, ``T(1) = --ack-timeout-s`` (clause 6.1, formula (1); terminal
  parameters 0x0002/0x0003), ``--retries`` times, then counted ``failed``.
* A connection the server closes is not reopened: its terminal stops, what it had outstanding
  is counted ``abandoned`` (the figures then show the loss).

Measured: latency from a report's first write to its ack, in a fixed-bucket histogram
(:class:`Histogram`: 16 buckets per doubling from 1 us, 4.4 % wide; percentiles are bucket
upper edges; the processes' histograms merge by adding counts), in the steady window (which
opens ``--warmup-s`` after the reports start and lasts ``--duration-s``) and over the whole run.
``cpu_us_per_report``: user + system CPU of the generator's processes in the steady window
(``getrusage``) divided by the reports acknowledged in it; ``*_whole_run`` the same over the
run (connections and handshakes included).

Processes: ``--processes`` (default: as few as the descriptor limit and the rate allow) each
run a share of the terminals (terminal ``g`` goes to process ``g mod processes``, so each
process's phases are spread evenly too) in a plain ``select.epoll`` loop over non-blocking
sockets, each from its own loopback source addresses (127.0.0.2 and up, at most 5,000
connections each: :data:`CONNECTIONS_PER_SOURCE`).  The parent coordinates them over pipes: it
waits until every process has its fleet online, gives all the same start time, and collects
their figures.

Bounds: the target and the source addresses must be loopback; every phase has a deadline
(connecting, waiting for the fleet, warm-up, the steady window, a drain of ``--drain-s`` for the
outstanding acks) and the parent kills a process that outlives the whole run by
:data:`STRAGGLER_S`.  The last line with ``--json`` is one JSON object (:func:`summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

# Run as a script, this file's folder is first on sys.path; the project's packages live one
# level up (as pytest arranges for tests).
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from protocol import Edition, Packet, RemoteProtocolError, StreamDecoder, encode  # noqa: E402
from protocol.fields import GMT8  # noqa: E402
from protocol.framing import unescape  # noqa: E402
from protocol.messages.location import (  # noqa: E402
    STATUS_ACC_ON,
    STATUS_FIXED,
    GnssSatellites,
    LocationReport,
    Mileage,
    SignalStrength,
)
from protocol.messages.terminal import (  # noqa: E402
    REGISTER_OK,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalRegister,
    TerminalRegisterResponse,
)

# Message ids (JT/T 808-2019 chapter 8).
MSG_LOCATION: Final = LocationReport.MSG_ID  # 0x0200
MSG_REGISTER: Final = TerminalRegister.MSG_ID  # 0x0100
MSG_AUTH: Final = TerminalAuth.MSG_ID  # 0x0102
# 0x8001 results (table 5): 0 success; 4 is "alarm acknowledged", an acceptance too.
ACK_RESULTS_OK: Final = frozenset({0, 4})

# A process may hold at most 20,000 descriptors here: room for the epoll, the pipe and the
# interpreter's own beside the connections.
CONNECTIONS_PER_PROCESS: Final = 18_000
# Ephemeral ports 32768-60999: ~28,000 per source address, and connect() gets slow as a source
# address fills up (the kernel scans for a free port), so each takes at most this many.
CONNECTIONS_PER_SOURCE: Final = 5_000
# Reports a second one process is given at most: it costs about 15 us of its own CPU per
# report at one frame per write on the reference machine, so this keeps it under a core.
REPORTS_PER_PROCESS: Final = 50_000
# Linux: choose the local port at connect(), not at bind() (linux/in.h; Linux 4.2+).  bind()
# with port 0 reserves a port per socket and searches the range one by one.
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# One recv per readable connection: an ack is 20 (2013) or 25 (2019) bytes, a window of 64 of
# them under 2 KiB; a downlink command frame is at most 2,090 bytes escaped.
RECV_BYTES: Final = 4096
# What a connection may buffer undecoded: a couple of the largest frames (2,090 bytes) and a
# window of acks; a server sending more than this without frame boundaries is broken.
MAX_DECODER_BYTES: Final = 16 * 1024
# Bytes waiting for a writable socket per connection: a window of retransmitted reports is
# under 64 x 2 x 60 bytes; more means the server stopped reading, and the terminal gives up.
MAX_OUT_BYTES: Final = 64 * 1024
# Largest window: the server's own cap on stored-but-unacknowledged messages per connection
# (``max_unacked`` = 64); past it the server stops reading.
MAX_WINDOW: Final = 64

# Handshake (0x0100/0x0102, and the TCP connect): sent again after this, like any message
# (clause 6.1), at most HANDSHAKE_TRIES times; then the terminal gives up.
HANDSHAKE_TIMEOUT_S: Final = 10.0
HANDSHAKE_TRIES: Final = 3
# Timeouts are checked by a sweep over the process's terminals this often; the standard's
# timeouts are seconds (default 10 s), a quarter second late is immaterial.
SWEEP_S: Final = 0.25
# The parent gives the start time this far ahead, so every process has it before it comes.
START_MARGIN_S: Final = 0.5
# After the drain, a process has this long to report before it is killed.
STRAGGLER_S: Final = 30.0

# Table 23 position: near Kunming (25.04 N, 102.71 E), in 1e-6 degrees; each report moves the
# fix a little (5 m) so the positions of a terminal differ, wrapping after 4,096 reports.
LAT0: Final = 24_900_000
LON0: Final = 102_600_000
SPREAD: Final = 300_000
STEP: Final = 50
STEP_MASK: Final = 4095

# Additional items of every report (table 27): odometer 0x01 (1/10 km), wireless signal 0x30,
# GNSS satellites 0x31, as most terminals send them.
_ITEMS: Final = (
    Mileage(value=123_456),
    SignalStrength.decode_value(bytes((25,))),
    GnssSatellites.decode_value(bytes((12,))),
)

_WORD = struct.Struct(">H")
_LAT_LON = struct.Struct(">II")
# 0x8001 after the header's phone: platform serial, reply serial, reply id, result (table 5),
# then the check code.
_ACK_TAIL = struct.Struct(">HHHBB")


def xor_fold(data: bytes) -> int:
    """The XOR of all bytes of ``data`` (clause 4.4.4's check code), folded as one integer."""
    value = int.from_bytes(data, "big")
    width = len(data) * 8
    shift = 8
    while shift < width:
        shift *= 2
    while shift > 8:
        shift //= 2
        value ^= value >> shift
    return value & 0xFF


def is_2019(index: int, ratio: float) -> bool:
    """Spread the 2019 terminals evenly: exactly ``round(n * ratio)`` among the first n."""
    return math.floor((index + 1) * ratio + 0.5) > math.floor(index * ratio + 0.5)


def check_loopback(host: str) -> str:
    """``host`` if it is a loopback IPv4 address (or ``localhost``), else ValueError."""
    address = "127.0.0.1" if host == "localhost" else host
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if parsed.version != 4 or not parsed.is_loopback:
        raise ValueError(f"{host} is not an IPv4 loopback address: load goes to this machine only")
    return address


# ---------------------------------------------------------------------------------------------
# Frames


class DeviceClock:
    """Device times ``start + k`` seconds as BCD[6] (table 23, GMT+8), with their XOR.

    Shared by every terminal of a process (each terminal's report ``k`` carries ``bcd(k)``);
    the table grows as the reports go on, one entry per device second.
    """

    __slots__ = ("bcd", "start", "xor")

    def __init__(self, start: datetime) -> None:
        self.start = start.astimezone(GMT8).replace(microsecond=0)
        self.bcd: list[bytes] = []
        self.xor: list[int] = []

    def time(self, k: int) -> datetime:
        return self.start + timedelta(seconds=k)

    def extend(self, k: int) -> None:
        """Make ``bcd[k]`` and ``xor[k]`` exist."""
        while len(self.bcd) <= k:
            t = self.time(len(self.bcd))
            if not 2000 <= t.year <= 2099:
                raise ValueError(f"{t.year} does not fit a two-digit BCD year")
            bcd = bytes.fromhex(t.strftime("%y%m%d%H%M%S"))
            self.bcd.append(bcd)
            self.xor.append(xor_fold(bcd))


class ReportFrames:
    """The 0x0200 frames of one terminal, patched from one frame the codec encoded.

    :meth:`frame` ``(serial, k)`` is exactly ``protocol.encode(self.report(k), phone=phone,
    serial=serial, edition=edition)``: the same alarm, status, altitude, speed, direction and
    items (0x01 mileage, 0x30 signal, 0x31 satellites) every time, report ``k``'s position
    (:meth:`position`) and device time (``clock.time(k)``).
    """

    __slots__ = (
        "_content",
        "_lat_at",
        "_serial_at",
        "_time_at",
        "_time_end",
        "_xor",
        "clock",
        "edition",
        "lat0",
        "lon0",
        "phone",
    )

    def __init__(
        self, phone: str, edition: Edition, clock: DeviceClock, *, lat0: int, lon0: int
    ) -> None:
        self.phone = phone
        self.edition = edition
        self.clock = clock
        self.lat0 = lat0
        self.lon0 = lon0
        wire = encode(self.report(0), phone=phone, serial=0, edition=edition)
        content, _ = unescape(wire[1:-1])  # header, body, check code
        # Header (clause 4.4.3, table 3): 12 bytes (2013), 17 with the version byte and a
        # 10-byte phone (2019); the serial is its last WORD.  Body (table 23): alarm DWORD,
        # status DWORD, latitude DWORD, longitude DWORD, altitude WORD, speed WORD,
        # direction WORD, time BCD[6].
        header = 17 if edition is Edition.V2019 else 12
        self._serial_at = header - 2
        self._lat_at = header + 8
        self._time_at = header + 22
        self._time_end = header + 28
        if content[self._lat_at : self._lat_at + 8] != _LAT_LON.pack(lat0, lon0):
            raise AssertionError("0x0200 layout differs from table 23")  # pragma: no cover
        # The check code is the XOR of every byte: that of the bytes that never change, with
        # the patched fields zeroed, is computed once.
        fixed = bytearray(content[:-1])
        fixed[self._serial_at : self._serial_at + 2] = bytes(2)
        fixed[self._lat_at : self._lat_at + 8] = bytes(8)
        fixed[self._time_at : self._time_end] = bytes(6)
        self._xor = xor_fold(bytes(fixed))
        self._content = bytearray(content)

    def position(self, k: int) -> tuple[int, int]:
        """Report ``k``'s latitude and longitude (1e-6 degree, north and east)."""
        step = (k & STEP_MASK) * STEP
        return self.lat0 + step, self.lon0 + step

    def report(self, k: int) -> LocationReport:
        """Report ``k`` as the codec's message."""
        lat, lon = self.position(k)
        return LocationReport(
            alarm=0,
            status=STATUS_ACC_ON | STATUS_FIXED,
            latitude=lat,
            longitude=lon,
            altitude_m=1890,
            speed=400,  # 1/10 km/h
            direction=90,
            time=self.clock.time(k),
            items=_ITEMS,
        )

    def frame(self, serial: int, k: int) -> bytes:
        """Report ``k`` with header serial ``serial``, flags included, escaped."""
        clock = self.clock
        if k >= len(clock.bcd):
            clock.extend(k)
        content = self._content
        _WORD.pack_into(content, self._serial_at, serial)
        step = (k & STEP_MASK) * STEP
        lat = self.lat0 + step
        lon = self.lon0 + step
        _LAT_LON.pack_into(content, self._lat_at, lat, lon)
        content[self._time_at : self._time_end] = clock.bcd[k]
        # Clause 4.4.4: XOR of the fixed bytes, the time's and those of serial, latitude and
        # longitude (XOR is bytewise, so the three integers fold together).
        value = serial ^ lat ^ lon
        value ^= value >> 16
        value ^= value >> 8
        content[-1] = (value ^ self._xor ^ clock.xor[k]) & 0xFF
        data = bytes(content)
        # Clause 6.1: 0x7D -> 0x7D 0x01 first, then 0x7E -> 0x7D 0x02.  Latitudes from 24.97 to
        # 25.10 N are 0x017D.... and 0x017E....: nearly half the fleet escapes every frame.
        if b"\x7d" in data:
            data = data.replace(b"\x7d", b"\x7d\x01")
        if b"\x7e" in data:
            data = data.replace(b"\x7e", b"\x7d\x02")
        return b"\x7e" + data + b"\x7e"


def terminal_frames(config: LoadConfig, index: int, clock: DeviceClock) -> ReportFrames:
    """Terminal ``index`` of the fleet: its phone, edition and starting position."""
    edition = Edition.V2019 if is_2019(index, config.edition_2019_ratio) else Edition.V2013
    return ReportFrames(
        str(config.phone_base + index),
        edition,
        clock,
        lat0=LAT0 + index * 7_919 % SPREAD,
        lon0=LON0 + index * 104_729 % SPREAD,
    )


def ack_prefix(phone: str, edition: Edition) -> bytes:
    """The bytes an 0x8001 to this terminal starts with, before the header's serial: the flag,
    message id, properties (body length 5, the 2019 version flag and version 1) and phone.
    The phone is BCD (no 0x7D or 0x7E can occur), so these bytes are never escaped."""
    wire = encode(
        PlatformGeneralResponse(reply_serial=0, reply_msg_id=MSG_LOCATION, result=0),
        phone=phone,
        serial=0,
        edition=edition,
    )
    header = 17 if edition is Edition.V2019 else 12
    return wire[: 1 + header - 2]


# ---------------------------------------------------------------------------------------------
# Statistics


class Histogram:
    """Latencies in fixed log buckets: 16 per doubling from 1 us, 512 in all (up to 2**32 us).

    The same buckets and JSON form as ``tools.simulate.LatencyHistogram``: histograms of several
    processes merge by adding counts; a percentile is the upper edge of its bucket (never an
    understatement).  :meth:`record` is inlined in the worker's hot path.
    """

    PER_DOUBLING: Final = 16
    BUCKETS: Final = 512

    __slots__ = ("counts", "max_s", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.total_s = 0.0
        self.max_s = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        index = int(math.log2(micros) * self.PER_DOUBLING) + 1 if micros >= 1 else 0
        self.counts[min(index, self.BUCKETS - 1)] += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def merge(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) in seconds, as its bucket's upper edge; None if
        empty."""
        total = self.count
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(2 ** (index / self.PER_DOUBLING) / 1e6, self.max_s)
        return self.max_s  # pragma: no cover - the counts add up to the total

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "us",
            "per_doubling": self.PER_DOUBLING,
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},
            "total_s": self.total_s,
            "max_s": self.max_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        out = cls()
        for key, count in data["counts"].items():
            out.counts[int(key)] += int(count)
        out.total_s = float(data["total_s"])
        out.max_s = float(data["max_s"])
        return out


# Counters of a process, added up across processes.  ``sent`` counts first transmissions;
# ``sent == acked + rejected + failed + abandoned + outstanding`` at the end.
COUNTERS: Final = (
    "terminals",
    "online",
    "gave_up",
    "connect_errors",
    "register_refused",
    "auth_refused",
    "sent",
    "acked",
    "rejected",
    "retransmitted",
    "failed",
    "abandoned",
    "outstanding",
    "skipped",
    "duplicate_acks",
    "writes",
    "bad_frames",
    "other_frames",
    "slow_reads",
    "disconnects",
)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """What to run.  ``rate`` is 0x0200 frames a second over the whole fleet; each terminal
    reports every ``terminals / rate`` seconds (``group`` frames every ``group`` periods)."""

    port: int
    host: str = "127.0.0.1"
    terminals: int = 10_000
    rate: float = 15_000.0
    duration_s: float = 30.0
    warmup_s: float | None = None  # default: one write period of a terminal plus 2 s
    group: int = 1
    window: int = 1
    processes: int | None = None  # default: enough for the descriptors and the rate
    connect_rate: float = 1_000.0  # new connections a second, whole fleet
    online_timeout_s: float = 60.0  # after the connect ramp
    ack_timeout_s: float = 10.0  # parameter 0x0002's usual default
    retries: int = 3  # parameter 0x0003's usual default
    drain_s: float = 10.0
    edition_2019_ratio: float = 0.3
    phone_base: int = 14_000_000_000
    source_base: int = 2  # source addresses 127.0.0.<source_base> and up
    serial_start: int = 0
    device_start: datetime | None = None  # default: the wall clock when a process starts

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.port < 65_536:
            problems.append("port must be 1..65535")
        if self.terminals < 1:
            problems.append("terminals must be at least 1")
        if self.rate <= 0:
            problems.append("rate must be positive")
        if not 1 <= self.group <= MAX_WINDOW:
            problems.append(f"group must be 1..{MAX_WINDOW}")
        if not self.group <= self.window <= MAX_WINDOW:
            problems.append(f"window must be group..{MAX_WINDOW}")
        if self.processes is not None and not 1 <= self.processes <= self.terminals:
            problems.append("processes must be 1..terminals")
        elif math.ceil(self.terminals / self.process_count) > CONNECTIONS_PER_PROCESS:
            problems.append(f"at most {CONNECTIONS_PER_PROCESS} terminals per process")
        if self.duration_s <= 0 or self.connect_rate <= 0 or self.ack_timeout_s <= 0:
            problems.append("duration, connect rate and ack timeout must be positive")
        if not 0 <= self.edition_2019_ratio <= 1:
            problems.append("edition_2019_ratio must be 0..1")
        if self.phone_base < 0 or self.phone_base + self.terminals > 10**12:
            problems.append("phone_base + terminals must fit 12 digits")
        if not 0 <= self.serial_start <= 0xFFFF:
            problems.append("serial_start must be a WORD")
        if problems:
            raise ValueError("; ".join(problems))
        check_loopback(self.host)

    @property
    def period_s(self) -> float:
        """Seconds between two writes of one terminal."""
        return self.terminals / self.rate * self.group

    @property
    def warmup(self) -> float:
        return self.period_s + 2.0 if self.warmup_s is None else self.warmup_s

    @property
    def process_count(self) -> int:
        if self.processes is not None:
            return self.processes
        return max(
            math.ceil(self.terminals / CONNECTIONS_PER_PROCESS),
            math.ceil(self.rate / REPORTS_PER_PROCESS),
        )

    def sources(self, process: int) -> list[str]:
        """Process ``process``'s source addresses (disjoint from the other processes')."""
        share = len(range(process, self.terminals, self.process_count))
        per = max(
            math.ceil(self.terminals / self.process_count / CONNECTIONS_PER_SOURCE),
            1,
        )
        needed = max(1, math.ceil(share / CONNECTIONS_PER_SOURCE))
        first = self.source_base + process * per
        if first + needed - 1 > 254:
            raise ValueError("too many connections for the 127.0.0.x source addresses")
        return [f"127.0.0.{first + i}" for i in range(needed)]


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """The run's marks, in ``time.monotonic()`` seconds (one clock for every process on
    Linux): reports start at ``start``, the steady window is [steady, steady_end), no report
    is written after ``steady_end``, and the drain ends at ``drain_until``."""

    start: float
    steady: float
    steady_end: float
    drain_until: float


# ---------------------------------------------------------------------------------------------
# One process


class _Terminal:
    """One terminal of a process: its connection, serials, frames and outstanding reports."""

    __slots__ = (
        "ack_prefix",
        "ack_size",
        "auth_code",
        "deadline",
        "decoder",
        "fd",
        "frames",
        "handshake",
        "index",
        "k",
        "out",
        "owed",
        "pending",
        "register_serial",
        "serial",
        "sock",
        "source",
        "state",
        "timeout_s",
        "tries",
    )

    def __init__(self, index: int, frames: ReportFrames, source: str, serial: int) -> None:
        self.index = index
        self.frames = frames
        self.source = source
        self.serial = serial
        self.k = 0  # reports sent: the next report's number
        self.state = _CONNECTING
        self.sock: socket.socket | None = None
        self.fd = -1
        edition = frames.edition
        self.ack_prefix = ack_prefix(frames.phone, edition)
        # The unescaped 0x8001 frame: flags, header, 5-byte body, check code.
        self.ack_size = len(self.ack_prefix) + _ACK_TAIL.size + 1
        self.auth_code = ""
        self.register_serial = -1  # the 0x0100 in flight or last answered
        self.decoder: StreamDecoder | None = StreamDecoder(max_buffered_bytes=MAX_DECODER_BYTES)
        # Reports written and not yet acknowledged: serial -> (first write, report number).
        self.pending: dict[int, tuple[float, int]] = {}
        self.owed = 0  # reports due, waiting for room in the window
        self.deadline = 0.0  # when the oldest outstanding message is sent again (0: none)
        self.timeout_s = 0.0
        self.tries = 0
        self.handshake = b""  # the handshake message in flight, for its retransmission
        self.out = b""  # bytes the socket did not take yet

    def next_serial(self) -> int:
        serial = self.serial
        self.serial = (serial + 1) & 0xFFFF
        return serial


# Terminal states.
_CONNECTING = 0
_REGISTERING = 1
_AUTHENTICATING = 2
_ONLINE = 3
_GONE = 4


class _LocalControl:
    """The coordinator for a single process run in the caller's thread: the reports start
    :data:`START_MARGIN_S` after the fleet is online."""

    def __init__(self, config: LoadConfig, hook: Callable[[str, float], None] | None) -> None:
        self.config = config
        self.hook = hook
        self.schedule: Schedule | None = None
        self.online_wall = 0.0

    def fileno(self) -> int | None:
        return None

    def online(self, status: dict[str, int]) -> None:
        del status
        self.online_wall = time.time()
        if self.hook:
            self.hook("online", self.online_wall)
        self.schedule = make_schedule(self.config, time.monotonic())

    def poll(self) -> Schedule | None:
        return self.schedule

    def mark(self, phase: str) -> None:
        if self.hook:
            self.hook(phase, time.time())


class _PipeControl:
    """The coordinator in the parent process, over a pipe."""

    def __init__(self, pipe: multiprocessing.connection.Connection) -> None:
        self.pipe = pipe

    def fileno(self) -> int | None:
        return self.pipe.fileno()

    def online(self, status: dict[str, int]) -> None:
        self.pipe.send(("online", status))

    def poll(self) -> Schedule | None:
        if self.pipe.poll():
            message = self.pipe.recv()
            if isinstance(message, Schedule):
                return message
        return None

    def mark(self, phase: str) -> None:
        del phase  # the parent keeps the marks itself


_Control = _LocalControl | _PipeControl


def make_schedule(config: LoadConfig, now: float) -> Schedule:
    start = now + START_MARGIN_S
    steady = start + config.warmup
    end = steady + config.duration_s
    return Schedule(start, steady, end, end + config.drain_s)


class _Worker:
    """One process's share of the fleet, in one ``select.epoll`` loop.

    The loop: wait for readiness (or the next due report, or the next sweep), read every
    readable connection (acks are matched, handshakes advanced), write the reports that fell
    due, and every :data:`SWEEP_S` retransmit what timed out and start the connections due by
    the connect ramp.  ``now`` is read once per wake-up and stands for the whole pass.
    """

    def __init__(self, config: LoadConfig, process: int, control: _Control) -> None:
        self.config = config
        self.control = control
        self.stats = dict.fromkeys(COUNTERS, 0)
        start = config.device_start or datetime.now(GMT8)
        self.clock = DeviceClock(start)
        sources = config.sources(process)
        count = config.process_count
        self.terminals: list[_Terminal] = []
        for n, index in enumerate(range(process, config.terminals, count)):
            frames = terminal_frames(config, index, self.clock)
            source = sources[n // CONNECTIONS_PER_SOURCE]
            self.terminals.append(_Terminal(index, frames, source, config.serial_start))
        self.stats["terminals"] = len(self.terminals)
        # Terminal i of this process is terminal process + i * count of the fleet, whose
        # phase is its share of the write period: the fleet's writes are spread evenly, and so
        # are each process's.
        period = config.period_s
        self.phases = [t.index / config.terminals * period for t in self.terminals]
        self.epoll = select.epoll()
        # Terminals by descriptor: no descriptor reaches the process's limit (20,000 here).
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.by_fd: list[_Terminal | None] = [None] * (limit if limit > 0 else 65_536)
        # Histograms by phase: before the steady window, in it, after it.
        self.histograms = [Histogram(), Histogram(), Histogram()]
        self.histogram_phase = 0
        self.counts = self.histograms[0].counts
        self.max_latency = 0.0
        self.total_latency = 0.0
        self.snapshots: dict[str, tuple[dict[str, int], float]] = {}

    # -- connections and handshakes ----------------------------------------------------------

    def _connect(self, t: _Terminal, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.0)  # non-blocking
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            # Reports are small and each is its own write: do not let Nagle hold one back
            # behind an unacknowledged segment (a terminal's modem sends each at once).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((t.source, 0))
            code = sock.connect_ex((self.config.host, self.config.port))
        except OSError:
            sock.close()
            self.stats["connect_errors"] += 1
            self._retry_later(t, now)
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.stats["connect_errors"] += 1
            self._retry_later(t, now)
            return
        t.sock = sock
        t.fd = sock.fileno()
        self.by_fd[t.fd] = t
        t.state = _CONNECTING
        t.deadline = now + HANDSHAKE_TIMEOUT_S
        self.epoll.register(t.fd, select.EPOLLOUT)

    def _retry_later(self, t: _Terminal, now: float) -> None:
        t.state = _CONNECTING
        t.deadline = now + HANDSHAKE_TIMEOUT_S  # the sweep connects it again (or gives up)

    def _give_up(self, t: _Terminal) -> None:
        self._close(t)
        t.state = _GONE
        self.stats["gave_up"] += 1

    def _close(self, t: _Terminal) -> None:
        if t.sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(t.fd)
            self.by_fd[t.fd] = None
            t.sock.close()
            t.sock = None
            t.fd = -1

    def _connected(self, t: _Terminal, now: float) -> None:
        assert t.sock is not None
        error = t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._close(t)
            self.stats["connect_errors"] += 1
            self._retry_later(t, now)
            return
        self.epoll.modify(t.fd, select.EPOLLIN)
        t.tries = 0
        self._send_register(t, now)

    def _send_register(self, t: _Terminal, now: float) -> None:
        # Table 8 (2019) / table 7 (2013): manufacturer 11/5 bytes, terminal id 30/7 bytes.
        index = t.index
        v2019 = t.frames.edition is Edition.V2019
        message = TerminalRegister(
            province=53,  # GB/T 2260: Yunnan
            city=100,
            manufacturer="LOADGEN0001" if v2019 else "LOADG",
            model="JT808-LOADGEN",
            terminal_id=f"LG{index:012d}" if v2019 else f"L{index % 10**6:06d}",
            plate_color=1,
            plate=f"云L{index % 100_000:05d}",
        )
        t.register_serial = self._send_handshake(t, message, _REGISTERING, now)

    def _send_auth(self, t: _Terminal, now: float) -> None:
        if t.frames.edition is Edition.V2019:
            message = TerminalAuth(
                auth_code=t.auth_code,
                imei=f"86{t.index % 10**13:013d}",  # 15 digits (table 10)
                software_version="LOADGEN-1",
            )
        else:
            message = TerminalAuth(auth_code=t.auth_code)
        self._send_handshake(t, message, _AUTHENTICATING, now)

    def _send_handshake(
        self, t: _Terminal, message: TerminalRegister | TerminalAuth, state: int, now: float
    ) -> int:
        """Send ``message`` and await its answer in ``state``; its serial."""
        frames = t.frames
        serial = t.next_serial()
        t.handshake = encode(message, phone=frames.phone, serial=serial, edition=frames.edition)
        t.state = state
        t.deadline = now + HANDSHAKE_TIMEOUT_S
        t.pending = {serial: (now, -1)}
        self._write(t, t.handshake)
        return serial

    def _on_handshake_packet(self, t: _Terminal, packet: Packet, now: float) -> None:
        message = packet.message
        if (
            isinstance(message, TerminalRegisterResponse)
            and t.state in (_REGISTERING, _AUTHENTICATING)
            and message.reply_serial == t.register_serial
        ):
            if message.result != REGISTER_OK or not message.auth_code:
                self.stats["register_refused"] += 1
                self._give_up(t)
                return
            if message.auth_code == t.auth_code:
                return
            # The answer to the 0x0100, or to its retransmission: a registration sent twice
            # is answered twice, each time with a new code, and the last one is the one the
            # platform keeps.  Authenticate with it (an answer to an earlier 0x0102 no
            # longer matches the serial awaited).
            if t.state == _REGISTERING:
                t.tries = 0
            t.auth_code = message.auth_code
            self._send_auth(t, now)
        elif (
            isinstance(message, PlatformGeneralResponse)
            and t.state == _AUTHENTICATING
            and message.reply_msg_id == MSG_AUTH
            and message.reply_serial in t.pending
        ):
            if message.result != 0:
                # A stale code (table 5 result 1): register again, as a terminal does, a few
                # times at most.
                self.stats["auth_refused"] += 1
                t.tries += 1
                if t.tries >= HANDSHAKE_TRIES:
                    self._give_up(t)
                else:
                    t.auth_code = ""
                    self._send_register(t, now)
                return
            t.state = _ONLINE
            t.pending = {}
            t.deadline = 0.0
            t.tries = 0
            t.handshake = b""
            self.stats["online"] += 1
        else:
            self.stats["other_frames"] += 1

    # -- bytes --------------------------------------------------------------------------------

    def _write(self, t: _Terminal, data: bytes) -> None:
        self.stats["writes"] += 1
        if t.out:
            if len(t.out) + len(data) > MAX_OUT_BYTES:
                self._drop(t)
                return
            t.out += data
            return
        sock = t.sock
        if sock is None:
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(t)
            return
        if sent < len(data):
            t.out = data[sent:]
            self.epoll.modify(t.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, t: _Terminal) -> None:
        sock = t.sock
        if sock is None:
            return
        try:
            sent = sock.send(t.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(t)
            return
        t.out = t.out[sent:]
        if not t.out:
            self.epoll.modify(t.fd, select.EPOLLIN)

    def _drop(self, t: _Terminal) -> None:
        """The connection is gone (closed, reset, or stuck): the terminal stops."""
        self.stats["disconnects"] += 1
        if t.state == _ONLINE:
            self.stats["abandoned"] += len(t.pending)
        else:
            self.stats["gave_up"] += 1
        t.pending = {}
        t.out = b""
        t.owed = 0
        self._close(t)
        t.state = _GONE

    def _read_slow(self, t: _Terminal, data: bytes, now: float) -> None:
        """Everything but a lone, unescaped 0x8001: decode with the codec."""
        self.stats["slow_reads"] += 1
        decoder = t.decoder
        if decoder is None:
            decoder = t.decoder = StreamDecoder(max_buffered_bytes=MAX_DECODER_BYTES)
            # The decoder dropped last time may have held an opening flag (see below): give it
            # back.  A flag too many is harmless (7E 7E is an empty frame, skipped).
            decoder.feed(b"\x7e")
        decoder.feed(data)
        while t.state != _GONE and (event := decoder.next_event()) is not None:
            if isinstance(event, RemoteProtocolError):
                self.stats["bad_frames"] += 1
                continue
            message = event.message
            if t.state == _ONLINE and isinstance(message, PlatformGeneralResponse):
                self._on_ack(t, message.reply_serial, message.reply_msg_id, message.result, now)
            elif t.state == _ONLINE:
                self.stats["other_frames"] += 1
            else:
                self._on_handshake_packet(t, event, now)
        # Nothing but a flag left (the splitter keeps a frame's closing flag, which may open the
        # next): acks take the fast path again.
        if t.state == _ONLINE and decoder.buffered <= 1:
            t.decoder = None

    def _on_ack(self, t: _Terminal, serial: int, msg_id: int, result: int, now: float) -> None:
        if msg_id != MSG_LOCATION:
            self.stats["other_frames"] += 1
            return
        entry = t.pending.pop(serial, None)
        if entry is None:
            self.stats["duplicate_acks"] += 1  # the answer to a retransmission, or late
            return
        if result in ACK_RESULTS_OK:
            self.stats["acked"] += 1
            self._record(now - entry[0])
        else:
            self.stats["rejected"] += 1
        self._after_ack(t, now)

    def _record(self, seconds: float) -> None:
        micros = seconds * 1e6
        index = int(math.log2(micros) * 16) + 1 if micros >= 1 else 0
        self.counts[index if index < 512 else 511] += 1
        self.total_latency += seconds
        self.max_latency = max(self.max_latency, seconds)

    def _after_ack(self, t: _Terminal, now: float) -> None:
        pending = t.pending
        if pending:
            if not t.tries:
                # The oldest outstanding report's timeout (dicts keep insertion order).
                t.deadline = next(iter(pending.values()))[0] + self.config.ack_timeout_s
        else:
            t.deadline = 0.0
            t.tries = 0
        if t.owed:
            self._send_reports(t, now)

    # -- reports ------------------------------------------------------------------------------

    def _due(self, t: _Terminal, now: float) -> None:
        """A write of ``group`` reports falls due for ``t``."""
        owed = t.owed + self.config.group
        window = self.config.window
        if owed > window:
            # A terminal keeps at most a window's worth of reports waiting; the rest of the
            # ticks it missed are skipped (counted), so a slow server costs rate, not memory.
            self.stats["skipped"] += owed - window
            owed = window
        t.owed = owed
        if len(t.pending) < window:
            self._send_reports(t, now)

    def _send_reports(self, t: _Terminal, now: float) -> None:
        pending = t.pending
        count = min(t.owed, self.config.window - len(pending))
        if count <= 0:
            return
        t.owed -= count
        frames = t.frames
        if not pending:
            t.deadline = now + self.config.ack_timeout_s
            t.timeout_s = self.config.ack_timeout_s
        k = t.k
        t.k = k + count
        self.stats["sent"] += count
        if count == 1:
            serial = t.serial
            t.serial = (serial + 1) & 0xFFFF
            pending[serial] = (now, k)
            self._write(t, frames.frame(serial, k))
            return
        parts = []
        for n in range(k, k + count):
            serial = t.serial
            t.serial = (serial + 1) & 0xFFFF
            pending[serial] = (now, n)
            parts.append(frames.frame(serial, n))
        self._write(t, b"".join(parts))

    def _sweep(self, now: float) -> None:
        """Retransmit what timed out; redo timed-out connects and handshakes."""
        for t in self.terminals:
            deadline = t.deadline
            if not deadline or now < deadline:
                continue
            state = t.state
            if state == _ONLINE:
                self._retransmit(t, now)
            elif state == _GONE:
                continue
            elif t.tries + 1 >= HANDSHAKE_TRIES:
                self._give_up(t)
            elif state == _CONNECTING:
                self._close(t)
                t.tries += 1
                self._connect(t, now)
            elif state in (_REGISTERING, _AUTHENTICATING):
                t.tries += 1
                t.deadline = now + HANDSHAKE_TIMEOUT_S * (t.tries + 1)
                self._write(t, t.handshake)

    def _retransmit(self, t: _Terminal, now: float) -> None:
        """Clause 6.1: no answer within T(n): send again with the same serial, and wait
        T(n+1) = T(n) x (n + 1); after ``retries`` the reports count as failed."""
        if t.tries >= self.config.retries:
            self.stats["failed"] += len(t.pending)
            t.pending = {}
            t.deadline = 0.0
            t.tries = 0
            if t.owed:
                self._send_reports(t, now)
            return
        t.tries += 1
        t.timeout_s *= t.tries + 1
        t.deadline = now + t.timeout_s
        frames = t.frames
        self.stats["retransmitted"] += len(t.pending)
        self._write(t, b"".join(frames.frame(s, k) for s, (_, k) in t.pending.items()))

    def _outstanding(self) -> int:
        """Reports written and neither acknowledged nor given up."""
        s = self.stats
        return s["sent"] - s["acked"] - s["rejected"] - s["failed"] - s["abandoned"]

    # -- the loop -----------------------------------------------------------------------------

    def _snapshot(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.snapshots[name] = (dict(self.stats), usage.ru_utime + usage.ru_stime)

    def _switch_histogram(self, phase: int) -> None:
        """Latencies go to histogram ``phase`` from now on (the running sum and maximum are
        kept beside the counts in the hot path and credited here)."""
        current = self.histograms[self.histogram_phase]
        current.total_s += self.total_latency
        current.max_s = max(current.max_s, self.max_latency)
        self.total_latency = self.max_latency = 0.0
        self.histogram_phase = phase
        self.counts = self.histograms[phase].counts

    def run(self) -> dict[str, Any]:
        config = self.config
        control = self.control
        stats = self.stats
        epoll = self.epoll
        by_fd = self.by_fd
        terminals = self.terminals
        phases = self.phases
        count = len(terminals)
        monotonic = time.monotonic
        poll = epoll.poll
        epollout = select.EPOLLOUT
        ack_tail = _ACK_TAIL.unpack_from
        on_ack = self._on_ack
        read_slow = self._read_slow
        due = self._due

        control_fd = control.fileno()
        if control_fd is not None:
            epoll.register(control_fd, select.EPOLLIN)
        self._snapshot("begin")
        begun = monotonic()
        # The connect ramp: this process's share of the fleet's connection rate.
        connect_every = config.process_count / config.connect_rate
        online_deadline = begun + count * connect_every + config.online_timeout_s
        connected = 0
        schedule: Schedule | None = None
        announced = False
        # Report scheduling: terminal ``cursor`` is next, in write period ``cycle``.
        cursor = cycle = 0
        next_due = math.inf
        period = config.period_s
        base = 0.0
        phase = 0  # 0 before the steady window, 1 in it, 2 after it
        next_sweep = begun
        draining = False

        while True:
            now = monotonic()
            # Connect ramp.
            while connected < count and begun + connected * connect_every <= now:
                self._connect(terminals[connected], now)
                connected += 1
            if not announced and (
                now >= online_deadline
                or (connected == count and stats["online"] + stats["gave_up"] >= count)
            ):
                announced = True
                control.online({k: stats[k] for k in ("online", "gave_up", "terminals")})
                self._snapshot("online")
            if announced and schedule is None:
                schedule = control.poll()
                if schedule is not None:
                    if control_fd is not None:
                        epoll.unregister(control_fd)  # nothing more comes that way
                    base = schedule.start
                    next_due = base + phases[0] if count else math.inf
            if schedule is not None:
                if phase == 0 and now >= schedule.steady:
                    phase = 1
                    self._switch_histogram(1)
                    self._snapshot("steady")
                    control.mark("steady")
                if phase == 1 and now >= schedule.steady_end:
                    phase = 2
                    self._switch_histogram(2)
                    self._snapshot("steady_end")
                    control.mark("steady_end")
                    next_due = math.inf
                    draining = True
                    for t in terminals:
                        t.owed = 0
                if draining and (now >= schedule.drain_until or not self._outstanding()):
                    break
            elif now >= online_deadline + STRAGGLER_S:
                break  # the coordinator is gone

            # Reports that fell due (not one is written after the steady window).
            while next_due <= now:
                t = terminals[cursor]
                if t.state == _ONLINE:
                    due(t, now)
                cursor += 1
                if cursor == count:
                    cursor = 0
                    cycle += 1
                    base = schedule.start + cycle * period if schedule else 0.0
                next_due = base + phases[cursor]

            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_S

            wait = min(next_due, next_sweep) - monotonic()
            if connected < count:
                wait = min(wait, begun + connected * connect_every - monotonic())
            events = poll(wait if wait > 0 else 0)
            now = monotonic()
            for fd, mask in events:
                conn = by_fd[fd]
                if conn is None:
                    continue  # the control pipe: read above
                if conn.state == _CONNECTING:
                    self._connected(conn, now)  # writable, or an error: SO_ERROR tells
                    continue
                if mask & epollout:
                    self._flush(conn)
                    if conn.sock is None:
                        continue
                if not mask & ~epollout:
                    continue
                sock = conn.sock
                if sock is None:
                    continue
                try:
                    data = sock.recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    self._drop(conn)
                    continue
                if not data:
                    self._drop(conn)
                    continue
                # The fast path: exactly one unescaped 0x8001 to this terminal, check code
                # valid (the XOR of the content with its check code is zero).
                if (
                    conn.decoder is None
                    and len(data) == conn.ack_size
                    and data.startswith(conn.ack_prefix)
                    and data[-1] == 0x7E
                    and data.count(b"\x7e") == 2
                    and b"\x7d" not in data
                ):
                    # Clause 4.4.4: the XOR of the content and its check code is zero (an
                    # ack's content is under 32 bytes: five folds of one integer).
                    value = int.from_bytes(data[1:-1], "big")
                    value ^= value >> 128
                    value ^= value >> 64
                    value ^= value >> 32
                    value ^= value >> 16
                    value ^= value >> 8
                    if value & 0xFF:
                        read_slow(conn, data, now)
                        continue
                    _, reply_serial, reply_id, result, _ = ack_tail(data, len(conn.ack_prefix))
                    on_ack(conn, reply_serial, reply_id, result, now)
                else:
                    read_slow(conn, data, now)

        self._snapshot("end")
        self._switch_histogram(2)
        stats["outstanding"] = self._outstanding()
        for t in terminals:
            self._close(t)
        self.epoll.close()
        return self._result()

    def _result(self) -> dict[str, Any]:
        whole = Histogram()
        for histogram in self.histograms:
            whole.merge(histogram)
        snaps = self.snapshots
        out: dict[str, Any] = {
            "counters": dict(self.stats),
            "histogram_steady": self.histograms[1].to_json(),
            "histogram_all": whole.to_json(),
            "cpu_s_all": snaps["end"][1] - snaps["begin"][1],
            "online_at_start": snaps["online"][0]["online"] if "online" in snaps else 0,
        }
        if "steady" in snaps and "steady_end" in snaps:
            before, after = snaps["steady"], snaps["steady_end"]
            out["cpu_s_steady"] = after[1] - before[1]
            out["steady_counters"] = {k: after[0][k] - before[0][k] for k in COUNTERS}
        return out


def run_process(
    config: LoadConfig, process: int, pipe: multiprocessing.connection.Connection
) -> None:
    """A child process's entry point: run its share, send the result to the parent."""
    # The per-report garbage is acyclic (tuples, bytes) and freed by reference counting; the
    # cyclic collector would only walk the thousands of long-lived terminals again and again.
    gc.disable()
    worker = _Worker(config, process, _PipeControl(pipe))
    gc.freeze()
    pipe.send(("result", worker.run()))


# ---------------------------------------------------------------------------------------------
# The coordinator


class LoadGenerator:
    """Runs a :class:`LoadConfig` in ``config.process_count`` child processes.

    :meth:`run` blocks until the run is over and returns :func:`summary`'s figures.  ``hook``,
    if given, is called in this process with ``("online" | "steady" | "steady_end",
    time.time())`` as the phases begin (for a benchmark to take its own measurements at the
    same marks).  :attr:`pids` lists the child processes while they run.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.pids: list[int] = []
        self.marks: dict[str, float] = {}

    def run(self, hook: Callable[[str, float], None] | None = None) -> dict[str, Any]:
        config = self.config
        context = multiprocessing.get_context("spawn")
        pipes: list[multiprocessing.connection.Connection] = []
        children = []
        begun = time.monotonic()
        try:
            for process in range(config.process_count):
                parent_end, child_end = context.Pipe()
                child = context.Process(
                    target=run_process, args=(config, process, child_end), daemon=True
                )
                child.start()
                child_end.close()
                pipes.append(parent_end)
                children.append(child)
            self.pids = [c.pid for c in children if c.pid is not None]
            # Wait for every process's fleet (bounded: its own deadline, plus slack).
            ramp_s = config.terminals / config.connect_rate
            online_deadline = begun + ramp_s + config.online_timeout_s + STRAGGLER_S
            statuses = []
            for pipe in pipes:
                if not pipe.poll(max(0.0, online_deadline - time.monotonic())):
                    raise RuntimeError("a load generator process did not report its fleet")
                kind, status = pipe.recv()
                assert kind == "online", kind
                statuses.append(status)
            self._mark("online", hook)
            schedule = make_schedule(config, time.monotonic())
            for pipe in pipes:
                pipe.send(schedule)
            for name, at in (("steady", schedule.steady), ("steady_end", schedule.steady_end)):
                time.sleep(max(0.0, at - time.monotonic()))
                self._mark(name, hook)
            results = []
            for pipe in pipes:
                timeout = max(0.0, schedule.drain_until + STRAGGLER_S - time.monotonic())
                if not pipe.poll(timeout):
                    raise RuntimeError("a load generator process did not report its figures")
                kind, result = pipe.recv()
                assert kind == "result", kind
                results.append(result)
        finally:
            for child in children:
                child.join(timeout=5)
                if child.is_alive():
                    child.kill()
                    child.join()
            for pipe in pipes:
                pipe.close()
            self.pids = []
        out = summary(config, results)
        out["seconds_until_online"] = round(self.marks["online"] - self._wall(begun), 1)
        return out

    def _mark(self, phase: str, hook: Callable[[str, float], None] | None) -> None:
        wall = time.time()
        self.marks[phase] = wall
        if hook:
            hook(phase, wall)

    @staticmethod
    def _wall(monotonic: float) -> float:
        return time.time() - (time.monotonic() - monotonic)


def run_in_process(
    config: LoadConfig, hook: Callable[[str, float], None] | None = None
) -> dict[str, Any]:
    """The whole fleet in one loop in the calling thread (no child process): for tests and
    small runs.  ``config.processes`` must be 1 (or None with a small fleet)."""
    if config.process_count != 1:
        raise ValueError("run_in_process runs one process's share")
    control = _LocalControl(config, hook)
    begun = time.time()
    result = _Worker(config, 0, control).run()
    out = summary(config, [result])
    out["seconds_until_online"] = round(control.online_wall - begun, 1)
    return out


def summary(config: LoadConfig, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The processes' figures added up: counters, latency percentiles, CPU per report."""
    totals = dict.fromkeys(COUNTERS, 0)
    steady = dict.fromkeys(COUNTERS, 0)
    latency, latency_all = Histogram(), Histogram()
    cpu_all = cpu_steady = 0.0
    online_at_start = 0
    for result in results:
        online_at_start += result["online_at_start"]
        for key in COUNTERS:
            totals[key] += result["counters"][key]
            steady[key] += result.get("steady_counters", {}).get(key, 0)
        latency.merge(Histogram.from_json(result["histogram_steady"]))
        latency_all.merge(Histogram.from_json(result["histogram_all"]))
        cpu_all += result["cpu_s_all"]
        cpu_steady += result.get("cpu_s_steady", 0.0)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1e3, 2)

    acked_steady = steady["acked"]
    return {
        "terminals": config.terminals,
        "processes": len(results),
        "offered_per_s": config.rate,
        "group": config.group,
        "window": config.window,
        **totals,
        "online_at_start": online_at_start,
        "lossless_acks": totals["sent"] == totals["acked"],
        "steady_s": config.duration_s,
        "steady_sent": steady["sent"],
        "steady_acked": acked_steady,
        "steady_writes": steady["writes"],
        "acked_per_s": round(acked_steady / config.duration_s, 1),
        "p50_ack_ms": ms(latency.percentile(0.5)),
        "p99_ack_ms": ms(latency.percentile(0.99)),
        "max_ack_ms": ms(latency.max_s if latency.count else None),
        "p50_ack_ms_whole_run": ms(latency_all.percentile(0.5)),
        "p99_ack_ms_whole_run": ms(latency_all.percentile(0.99)),
        "cpu_s_steady": round(cpu_steady, 3),
        "cpu_us_per_report": round(cpu_steady / acked_steady * 1e6, 2) if acked_steady else None,
        "cpu_pct_steady": round(cpu_steady / config.duration_s * 100, 1),
        "cpu_us_per_report_whole_run": round(cpu_all / totals["acked"] * 1e6, 2)
        if totals["acked"]
        else None,
        "latency_histogram": latency.to_json(),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[LoadConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="the server (a loopback address)")
    add("--port", type=int, required=True)
    add("--terminals", type=int, default=10_000)
    add("--rate", type=float, default=15_000.0, help="0x0200 frames a second, whole fleet")
    add("--duration-s", type=float, default=30.0, help="the steady window")
    add("--warmup-s", type=float, default=None, help="default: one write period + 2 s")
    add("--group", type=int, default=1, help="frames per write (catch-up); default 1")
    add("--window", type=int, default=None, help="unacknowledged reports (default: group)")
    add("--processes", type=int, default=None)
    add("--connect-rate", type=float, default=1_000.0, help="new connections a second")
    add("--online-timeout-s", type=float, default=60.0)
    add("--ack-timeout-s", type=float, default=10.0)
    add("--retries", type=int, default=3)
    add("--drain-s", type=float, default=10.0)
    add("--edition-2019-ratio", type=float, default=0.3)
    add("--phone-base", type=int, default=14_000_000_000)
    add("--json", action="store_true", help="end with one JSON line")
    options = parser.parse_args(argv)
    try:
        config = LoadConfig(
            host=options.host,
            port=options.port,
            terminals=options.terminals,
            rate=options.rate,
            duration_s=options.duration_s,
            warmup_s=options.warmup_s,
            group=options.group,
            window=options.window or options.group,
            processes=options.processes,
            connect_rate=options.connect_rate,
            online_timeout_s=options.online_timeout_s,
            ack_timeout_s=options.ack_timeout_s,
            retries=options.retries,
            drain_s=options.drain_s,
            edition_2019_ratio=options.edition_2019_ratio,
            phone_base=options.phone_base,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, options


def describe(out: dict[str, Any]) -> str:
    """One paragraph of a run's figures."""
    catch_up = f", {out['group']} frames per write (catch-up)" if out["group"] > 1 else ""
    return (
        f"{out['terminals']} terminals in {out['processes']} process(es), offered "
        f"{out['offered_per_s']:g}/s{catch_up}, window {out['window']}: steady "
        f"{out['acked_per_s']}/s acked, ack p50 {out['p50_ack_ms']} ms p99 "
        f"{out['p99_ack_ms']} ms; whole run sent {out['sent']} acked {out['acked']} "
        f"(retransmitted {out['retransmitted']}, failed {out['failed']}, abandoned "
        f"{out['abandoned']}, outstanding {out['outstanding']}, skipped {out['skipped']}); "
        f"{out['online']} online, {out['gave_up']} gave up; generator CPU "
        f"{out['cpu_us_per_report']} us per report ({out['cpu_pct_steady']}% of a core), "
        f"{out['cpu_us_per_report_whole_run']} us over the whole run"
    )


def main(argv: Sequence[str] | None = None) -> int:
    config, options = parse_args(argv)
    out = LoadGenerator(config).run()
    print(describe(out), flush=True)
    if options.json:
        out.pop("latency_histogram")
        print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0 if out["sent"] == out["acked"] and out["acked"] else 1


if __name__ == "__main__":
    sys.exit(main())
