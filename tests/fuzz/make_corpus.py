"""Rebuild the fuzzer's seed corpus in ``tests/fuzz/corpus/``.

    .venv/bin/python -m tests.fuzz.make_corpus

One file per wire frame of the shared vectors (valid and invalid, ``vector-<id>.bin``; a
vector's source frame, where it differs, as ``vector-<id>-source.bin``), and a few streams
of several frames (``stream-*.bin``): frames sharing a flag with junk between them, and
sub-packaged messages in order, out of order, duplicated and with a package missing, so that
the reassembler's paths are in the seeds.  Files are named by content source, so rebuilding is
idempotent.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from protocol.codec import encode_raw
from protocol.header import Edition
from tests.vectors import load_cases

CORPUS = Path(__file__).resolve().parent / "corpus"

PHONE_2013 = "013912345678"
PHONE_2019 = "00000000013912345678"

# Table 23: alarm, status, latitude, longitude, altitude, speed, direction, BCD time.
_BASIC = struct.pack(">IIIIHHH", 0, 3, 25_040_000, 102_710_000, 1890, 605, 90) + bytes.fromhex(
    "251003083000"
)


def _vectors() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for case in load_cases():
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in case["id"])
        wire = bytes.fromhex(case["hex"])
        out[f"vector-{name}.bin"] = wire
        source = case.get("source_hex")
        if source and bytes.fromhex(source) != wire:
            out[f"vector-{name}-source.bin"] = bytes.fromhex(source)
    return out


def _packages(
    msg_id: int, body: bytes, *, size: int, first_serial: int, edition: Edition
) -> list[bytes]:
    """``body`` as sub-packages of ``size`` bytes (clause 4.4.3), serials from ``first_serial``."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    phone = PHONE_2019 if edition is Edition.V2019 else PHONE_2013
    return [
        encode_raw(
            msg_id,
            piece,
            phone=phone,
            serial=(first_serial + i) & 0xFFFF,  # serials wrap (clause 4.4.3)
            edition=edition,
            package=(len(pieces), i + 1),
        )
        for i, piece in enumerate(pieces)
    ]


def _streams() -> dict[str, bytes]:
    location = encode_raw(0x0200, _BASIC + b"\x01\x04\x00\x00\x30\x39", phone=PHONE_2013, serial=7)
    location_2019 = encode_raw(
        0x0200, _BASIC, phone=PHONE_2019, serial=0x7E7D, edition=Edition.V2019
    )
    batch = encode_raw(
        0x0704,
        b"\x00\x02\x01" + (struct.pack(">H", len(_BASIC)) + _BASIC) * 2,
        phone=PHONE_2013,
        serial=8,
    )
    heartbeat = encode_raw(0x0002, b"", phone=PHONE_2013, serial=9)
    auth = encode_raw(
        0x0102,
        b"\x06a1b2c3" + b"860000000000001" + b"V1.0.2".ljust(20, b"\x00"),
        phone=PHONE_2019,
        serial=10,
        edition=Edition.V2019,
    )
    # 0x0801 multimedia upload: media id, type, format, event, channel, position, JPEG bytes.
    media = struct.pack(">IBBBB", 42, 0, 0, 1, 1) + _BASIC + b"\xff\xd8\xff\xe0" + bytes(120)
    media_packages = _packages(0x0801, media, size=48, first_serial=100, edition=Edition.V2013)
    # 0x0104 parameter answer (2019): reply serial, count, items (id DWORD, length, value).
    params = struct.pack(">HB", 5, 3) + b"".join(
        struct.pack(">IB", pid, len(value)) + value
        for pid, value in ((0x0001, b"\x00\x00\x00\x1e"), (0x0010, b"cmnet"), (0x0013, b"x" * 40))
    )
    params_packages = _packages(0x0104, params, size=24, first_serial=0xFFFE, edition=Edition.V2019)
    report = _BASIC + b"\x01\x04\x00\x00\x30\x39"  # with item 0x01 mileage
    location_packages = _packages(0x0200, report, size=20, first_serial=300, edition=Edition.V2013)
    m = media_packages
    # Against the harness' small reassembly caps (fuzz_codec.LIMITS): one series passing the
    # per-terminal byte cap, two terminals passing the process byte cap, and empty packages
    # of many series passing the process package cap.
    big = _packages(0x0801, bytes(1950), size=650, first_serial=500, edition=Edition.V2013)
    other = encode_raw(
        0x0801, bytes(700), phone="013900000001", serial=1, edition=Edition.V2013, package=(2, 1)
    )
    empties = [
        encode_raw(
            0x0900 + series,
            b"",
            phone=f"01390000001{terminal}",
            serial=series,
            package=(2, 1),
        )
        for terminal in range(5)
        for series in range(3)
    ]
    return {
        "stream-shared-flags-and-junk.bin": location[:-1]
        + batch
        + b"junk\x7d"
        + heartbeat
        + location_2019,
        "stream-auth-then-reports.bin": auth + heartbeat + location + location_2019,
        "stream-media-in-order.bin": b"".join(m),
        "stream-media-shuffled-duplicate.bin": b"".join([m[2], m[0], m[0], m[3], m[1], *m[4:]]),
        "stream-media-missing-one.bin": b"".join([m[0], m[1], *m[3:]]),
        "stream-params-2019-wrapping-serials.bin": b"".join(params_packages),
        "stream-location-packages.bin": b"".join(reversed(location_packages)),
        "stream-terminal-byte-cap.bin": b"".join(big[:2]),
        "stream-process-caps.bin": big[0] + other + b"".join(empties),
        "stream-two-series-interleaved.bin": b"".join(
            x for pair in zip(m, params_packages, strict=False) for x in pair
        ),
    }


def build() -> dict[str, bytes]:
    """Every seed file by name."""
    return {**_vectors(), **_streams()}


def main() -> int:
    CORPUS.mkdir(exist_ok=True)
    seeds = build()
    for name, data in sorted(seeds.items()):
        (CORPUS / name).write_bytes(data)
    stale = [p for p in CORPUS.iterdir() if p.name not in seeds]
    for path in stale:
        path.unlink()
    size = sum(len(d) for d in seeds.values())
    sys.stdout.write(f"{len(seeds)} seeds, {size} bytes, {len(stale)} stale removed\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
