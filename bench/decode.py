"""Frames per second: the declarative StreamDecoder against the numpy batch decoder.

Builds a realistic buffer of location traffic (0x0200 in the 2013 and 2019 layouts, a share
with additional items 0x01/0x30/0x31, whatever 0x7D/0x7E escapes the values produce, a few
heartbeats and 0x0704 batch uploads in between) and times

(a) the declarative path: ``StreamDecoder`` fed 64 KiB reads, one frame at a time;
(b) the batch path: ``decode_locations`` over the whole buffer, framing, unescaping and check
    codes included.

Each figure is the median of several runs on one pinned core.  The last line of output is one
JSON object with both rates.

    .venv/bin/python bench/decode.py [--quick] [--frames N] [--runs R] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import numpy as np

import protocol
from protocol.batch import KIND_LOCATION, decode_locations
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.location import (
    GnssSatellites,
    Item,
    LocationBatch,
    LocationReport,
    Mileage,
    SignalStrength,
)
from protocol.messages.terminal import Heartbeat

READ_SIZE = 64 * 1024  # what a server reads per receive
POOL = 4000  # distinct frames; the buffer repeats them in random order


def _location(rng: np.random.Generator, *, items: bool) -> LocationReport:
    when = datetime(2026, 5, 1, tzinfo=GMT8) + timedelta(seconds=int(rng.integers(0, 86400 * 30)))
    extra: tuple[Item, ...] = ()
    if items:
        extra = (
            Mileage(value=int(rng.integers(0, 5_000_000))),
            SignalStrength(value=int(rng.integers(0, 32))),  # type: ignore[call-arg]
            GnssSatellites(value=int(rng.integers(0, 30))),  # type: ignore[call-arg]
        )
    return LocationReport(
        alarm=int(rng.choice([0, 0, 0, 1, 2, 1 << 8])),
        status=int(rng.choice([0x3, 0xC0003, 0x2])),
        latitude=int(rng.integers(18_000_000, 45_000_000)),
        longitude=int(rng.integers(100_000_000, 125_000_000)),
        altitude_m=int(rng.integers(0, 3000)),
        speed=int(rng.integers(0, 1200)),
        direction=int(rng.integers(0, 360)),
        time=when,
        items=extra,
    )


def build_buffer(frames: int, seed: int = 808) -> tuple[bytes, int]:
    """``frames`` wire frames as one buffer; returns it and the number of location rows."""
    rng = np.random.default_rng(seed)
    pool: list[bytes] = []
    rows: list[int] = []
    for i in range(POOL):
        edition = Edition.V2019 if rng.random() < 0.3 else Edition.V2013
        digits = 20 if edition is Edition.V2019 else 12
        phone = "".join(str(d) for d in rng.integers(0, 10, digits))
        serial = int(rng.integers(0, 0x10000))
        message: protocol.messages.base.Message
        if i % 100 == 0:
            message, n = Heartbeat(), 0
        elif i % 100 == 1:
            positions = tuple(_location(rng, items=True) for _ in range(3))
            message, n = LocationBatch(batch_type=1, positions=positions), 3
        else:
            message, n = _location(rng, items=rng.random() < 0.6), 1
        pool.append(protocol.encode(message, phone=phone, serial=serial, edition=edition))
        rows.append(n)
    pick = rng.integers(0, POOL, frames)
    return b"".join(pool[i] for i in pick), int(np.asarray(rows)[pick].sum())


def declarative(data: bytes) -> int:
    decoder = protocol.StreamDecoder()
    count = 0
    for i in range(0, len(data), READ_SIZE):
        decoder.feed(data[i : i + READ_SIZE])
        for _event in decoder:
            count += 1
    return count


def batch(data: bytes) -> int:
    return int(decode_locations(data).frames.size)


def median_rate(fn: Callable[[bytes], int], data: bytes, frames: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        seen = fn(data)
        times.append(time.perf_counter() - start)
        if seen != frames:
            raise SystemExit(f"{fn.__name__} saw {seen} frames, expected {frames}")
    return frames / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small buffer, fewer runs")
    parser.add_argument("--frames", type=int, default=None, help="frames in the buffer")
    parser.add_argument("--runs", type=int, default=5, help="runs per path (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile one batch run")
    args = parser.parse_args(argv)
    frames = args.frames or (20_000 if args.quick else 100_000)
    runs = min(args.runs, 3) if args.quick else args.runs
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to cpu {cpu}")

    data, rows = build_buffer(frames)
    check = decode_locations(data)
    escaped = int(np.count_nonzero(np.frombuffer(data, np.uint8) == 0x7D))
    print(
        f"buffer: {frames} frames, {len(data) / 1e6:.1f} MB, {rows} location rows, "
        f"{escaped} escapes; batch decoded {check.locations.size} rows, "
        f"{int((check.frames['kind'] != KIND_LOCATION).sum())} frames for the declarative path"
    )
    if check.locations.size != rows:
        raise SystemExit("batch decoder lost location rows")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(decode_locations, data)
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)

    # The declarative path is slow: time it on at most 20k frames (the rate does not depend on
    # the buffer size; each frame is decoded on its own).
    sample_frames = min(frames, 20_000)
    sample = data if sample_frames == frames else build_buffer(sample_frames)[0]
    decl = median_rate(declarative, sample, sample_frames, runs)
    print(f"(a) declarative StreamDecoder: {decl:12,.0f} frames/s ({sample_frames} frames)")
    fast = median_rate(batch, data, frames, max(runs, 5))
    print(f"(b) batch decode_locations:    {fast:12,.0f} frames/s ({frames} frames)")
    print(f"speed-up: {fast / decl:.0f}x")
    print(json.dumps({"declarative_frames_per_s": round(decl), "batch_frames_per_s": round(fast)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
