"""Resident memory of sub-package reassembly under a flood of series that never complete.

    .venv/bin/python bench/reassembly_memory.py [--quick] [--terminals 40] [--packages 8000]

Each terminal sends ``--packages`` packages of 1000 body bytes of one 0x0801 series announced
as 8192 packages, the terminals interleaved as their connections would be, and never the rest.
Every package goes through the server's path: encoded as a wire frame, decoded with
:func:`protocol.codec.decode` and fed to :class:`ingest.uploads.Uploads` (so the short-lived
frame buffers interleave with the stored bodies in the heap, as in a server).  Then time moves
on, as the server's upload task moves it, from one :meth:`~ingest.uploads.Uploads.next_deadline`
to the next, until every series has run out of retransmit rounds and is gone.

The resident set size (``/proc/self/statm``) is read before the flood, at its peak and after
the expiry, for four settings, each in a fresh process:

* ``old caps``: the reassembler's own defaults (256 MiB in total, 8 MiB per terminal), as
  the server had them;
* ``old caps + release``: the same, handing freed memory back (:mod:`ingest.memory`);
* ``new caps``: the server's configured defaults (``ServerConfig.reassembly_max_bytes`` and
  ``reassembly_max_bytes_per_terminal``), no release;
* ``new caps + release``: what the server runs.

The last line is one JSON object with the figures of every setting.  Linux only (statm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

from ingest.config import ServerConfig  # noqa: E402
from ingest.memory import CAN_RELEASE, release_free_memory, resident_bytes  # noqa: E402
from ingest.uploads import Uploads, reassembly_limits  # noqa: E402
from protocol.codec import decode, encode_raw  # noqa: E402
from protocol.reassembly import ReassemblyLimits, Refused, Stored  # noqa: E402

MIB = 1024 * 1024
# The series are announced as the largest a terminal may send, so none ever completes.
ANNOUNCED_PACKAGES = 8192
BODY_BYTES = 1000  # what devices put in a package (the 10-bit length allows 1023)
SETTINGS = ("old caps", "old caps + release", "new caps", "new caps + release")


def _rss_mib() -> float:
    rss = resident_bytes()
    if rss is None:
        raise SystemExit("needs /proc/self/statm (Linux)")
    return rss / MIB


def flood(setting: str, terminals: int, packages: int) -> dict[str, Any]:
    """Run one setting in this process; the figures."""
    if setting.startswith("old caps"):
        limits = ReassemblyLimits(
            package_timeout_s=30.0, retransmit_timeout_s=30.0, max_retransmit_rounds=3
        )
    else:
        limits = reassembly_limits(ServerConfig())
    release_s: list[float] = []

    def release() -> None:
        started = time.perf_counter()
        release_free_memory()
        release_s.append(time.perf_counter() - started)

    uploads = Uploads(limits, release_memory=release if setting.endswith("release") else None)
    phones = [f"0139{n:08d}" for n in range(terminals)]
    filler = bytes(range(256)) * (BODY_BYTES // 256 + 1)
    outcomes: Counter[str] = Counter()
    peak_in_flight = 0
    before = _rss_mib()

    started = time.perf_counter()
    now = 0.0
    for index in range(1, packages + 1):
        for n, phone in enumerate(phones):
            body = bytes((n & 0xFF, index & 0xFF)) + filler[2:BODY_BYTES]
            wire = encode_raw(
                0x0801, body, phone=phone, serial=index, package=(ANNOUNCED_PACKAGES, index)
            )
            result = uploads.feed(decode(wire), now=now)
            outcome = result.outcome
            outcomes[
                outcome.error.kind if isinstance(outcome, Refused) else type(outcome).__name__
            ] += 1
            for dropped in result.dropped:
                outcomes[f"dropped {dropped.reason}"] += 1
            peak_in_flight = max(peak_in_flight, uploads.bytes_in_flight)
        now += 0.001  # packages arrive back to back
    feed_s = time.perf_counter() - started
    peak = _rss_mib()
    series_at_peak = uploads.series_in_flight

    deadline = uploads.next_deadline()
    while deadline is not None:
        now = max(now, deadline)
        uploads.expire(now)
        deadline = uploads.next_deadline()
    after = _rss_mib()
    assert uploads.bytes_in_flight == 0
    return {
        "setting": setting,
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(after, 1),
        "retained_mib": round(after - before, 1),
        "peak_in_flight_mib": round(peak_in_flight / MIB, 1),
        "cap_mib": round(limits.max_bytes_total / MIB, 1),
        "series_at_peak": series_at_peak,
        "stored": outcomes[Stored.__name__],
        "outcomes": dict(sorted(outcomes.items())),
        "dropped": dict(sorted(uploads.dropped.items())),
        "releases": len(release_s),
        "release_ms_max": round(max(release_s, default=0.0) * 1000, 1),
        "feed_s": round(feed_s, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller flood (< 1 min)")
    parser.add_argument("--terminals", type=int, default=40)
    parser.add_argument("--packages", type=int, help="per terminal (default 8000; 3000 quick)")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args(argv)
    packages = args.packages or (3000 if args.quick else 8000)
    if args.setting is not None:
        print(json.dumps(flood(args.setting, args.terminals, packages)))
        return 0

    print(
        f"{args.terminals} terminals x {packages} packages of {BODY_BYTES} bytes, never completed;"
        f" malloc_trim {'available' if CAN_RELEASE else 'unavailable'}"
    )
    results = []
    for setting in SETTINGS:
        child = [sys.executable, __file__, "--setting", setting]
        sizes = ["--terminals", str(args.terminals), "--packages", str(packages)]
        out = subprocess.run([*child, *sizes], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"  {setting:20} RSS {result['rss_before_mib']:6.1f} MiB"
            f" -> peak {result['rss_peak_mib']:6.1f} -> after expiry {result['rss_after_mib']:6.1f}"
            f" (in flight at most {result['peak_in_flight_mib']} of {result['cap_mib']} MiB;"
            f" {result['releases']} release(s), longest {result['release_ms_max']} ms)"
        )
        print(f"  {'':20} outcomes {result['outcomes']}, given up {result['dropped']}")
    print(
        json.dumps(
            {
                "bench": "reassembly_memory",
                "terminals": args.terminals,
                "packages": packages,
                "body_bytes": BODY_BYTES,
                "malloc_trim": CAN_RELEASE,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
