"""``jt808 simulate``: a fleet of simulated JT/T 808 terminals against a server on this machine.

Synthetic fleets (``--terminals``, routes around Kunming) or a scripted one (``--scenario``, see
:mod:`tools.scenario`).  A progress line goes to standard error every second; the summary to
standard output at the end, with ``--json`` a final machine-readable line (the counters of
:class:`tools.simulate.Stats`, ``p50_ack_ms``/``p99_ack_ms`` and the latency histogram, whose
bucket counts of several processes add up).

Exit status: 0 when every terminal got online and every message was answered, 1 when messages
failed or were still unanswered at the end (or a terminal never got online), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from pathlib import Path
from typing import IO

import trio

from tools.scenario import ScenarioError, alarm_mask, load_scenario
from tools.simulate import (
    DEFAULT_ACK_TIMEOUT_S,
    DEFAULT_CAPTURE_MAX_BYTES,
    DEFAULT_MEDIA_BYTES,
    DEFAULT_PORT,
    DEFAULT_RETRIES,
    DEFAULT_WINDOW,
    KUNMING_BBOX,
    MAX_BATCH,
    AlarmWindow,
    Progress,
    SimConfig,
    Simulator,
    Stats,
    TerminalSpec,
    check_loopback,
    scenario_config,
    scenario_fleet,
)

EXIT_OK = 0
EXIT_LOSS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Descriptors a process needs besides its connections: standard streams, the trio wake-up
# pipe and epoll, imported modules, capture files closing, with room to spare.
FD_RESERVE = 64
EXAMPLES = """\
examples:
  jt808 simulate --terminals 1000 --interval-s 5 --duration-s 60
  jt808 simulate --scenario fleet.toml --capture captures/ --json
  jt808 simulate --terminals 10 --alarm power_cut@30+60 --target 127.0.0.1:7000
"""


class UsageError(Exception):
    """A command line that cannot run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--target",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="server to load (loopback only; default %(default)s)",
    )
    add("--terminals", type=int, default=10, metavar="N", help="terminals (default %(default)s)")
    add(
        "--interval-s",
        type=float,
        default=5.0,
        metavar="S",
        help="reporting interval, 0 for heartbeats only (default %(default)s)",
    )
    add(
        "--duration-s",
        type=float,
        default=None,
        metavar="S",
        help="run time (default 60, or the scenario's length)",
    )
    add(
        "--max-reports",
        type=int,
        default=None,
        metavar="N",
        help="stop each terminal after N reports",
    )
    add(
        "--edition-2019-ratio",
        type=float,
        default=0.5,
        metavar="R",
        help="share of 2019 terminals, the rest 2013 (default %(default)s)",
    )
    add(
        "--phone-base",
        type=int,
        default=13_800_000_000,
        metavar="N",
        help="phone of terminal 0; terminal i gets N + i (default %(default)s)",
    )
    add("--scenario", type=Path, metavar="FILE", help="TOML scenario: a scripted fleet")
    add(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help=f"positions per 0x0704 batch, 1 for single 0x0200 (max {MAX_BATCH})",
    )
    add(
        "--group",
        type=int,
        default=1,
        metavar="N",
        help="write reports in groups of N separate 0x0200 frames (fewer writes per position)",
    )
    add(
        "--media-every-s",
        type=float,
        default=None,
        metavar="S",
        help="upload a sub-packaged 0x0801 photo every S seconds",
    )
    add(
        "--media-bytes",
        type=int,
        default=DEFAULT_MEDIA_BYTES,
        metavar="N",
        help="size of each photo (default %(default)s)",
    )
    add(
        "--alarm",
        action="append",
        default=[],
        metavar="NAMES[@START_S[+DURATION_S]]",
        help=(
            "raise alarm bits (table 24 names or bit numbers, comma-separated) from START_S "
            "for DURATION_S on every synthetic terminal; repeatable, e.g. power_cut@30+60"
        ),
    )
    add(
        "--ack-timeout-s",
        type=float,
        default=DEFAULT_ACK_TIMEOUT_S,
        metavar="S",
        help="first ack timeout T1 (parameter 0x0002; default %(default)s)",
    )
    add(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="retransmissions, T(n+1) = T(n) x (n+1); parameter 0x0003 (default %(default)s)",
    )
    add(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help="unacknowledged messages per terminal (default %(default)s)",
    )
    add(
        "--heartbeat-s",
        type=float,
        default=30.0,
        metavar="S",
        help="heartbeat after S idle seconds (default %(default)s)",
    )
    add(
        "--ramp-s",
        type=float,
        default=1.0,
        metavar="S",
        help="spread the connects over S seconds (default %(default)s)",
    )
    add(
        "--drain-s",
        type=float,
        default=5.0,
        metavar="S",
        help="time after the end to collect outstanding acks (default %(default)s)",
    )
    add(
        "--bbox",
        default=None,
        metavar="LON_MIN,LAT_MIN,LON_MAX,LAT_MAX",
        help="area of the synthetic routes (default: Kunming)",
    )
    add("--seed", type=int, default=808, help="seed of routes and timings (default %(default)s)")
    add(
        "--source-addresses",
        default="",
        metavar="A,B,...",
        help="bind connections to these loopback addresses in turn: 127.0.0.2,127.0.0.3",
    )
    add("--capture", type=Path, metavar="DIR", help="record each connection's sent bytes here")
    add(
        "--capture-max-bytes",
        type=int,
        default=DEFAULT_CAPTURE_MAX_BYTES,
        metavar="N",
        help="stop recording a connection at N bytes (default %(default)s)",
    )
    add(
        "--progress-s",
        type=float,
        default=1.0,
        metavar="S",
        help="progress line interval on stderr, 0 for none (default %(default)s)",
    )
    add("--json", action="store_true", help="end with one JSON line of the statistics")


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"--target {text!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        return check_loopback(host), int(port_text)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from exc


def parse_alarm(text: str) -> AlarmWindow:
    """``NAMES[@START_S[+DURATION_S]]`` as an alarm window of the run."""
    names, _, timing = text.partition("@")
    start_text, _, duration_text = timing.partition("+")
    try:
        bits = alarm_mask([name for name in names.split(",") if name])
        start = float(start_text) if start_text else 0.0
        duration = float(duration_text) if duration_text else math.inf
    except ValueError as exc:
        raise UsageError(f"--alarm {text!r}: {exc}") from exc
    if not (math.isfinite(start) and start >= 0 and duration > 0):
        raise UsageError(f"--alarm {text!r}: expected START_S >= 0 and DURATION_S > 0")
    return AlarmWindow(bits=bits, start_s=start, end_s=start + duration)


def parse_bbox(text: str | None) -> tuple[float, float, float, float]:
    if text is None:
        return KUNMING_BBOX
    try:
        lon_min, lat_min, lon_max, lat_max = (float(part) for part in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--bbox {text!r}: expected LON_MIN,LAT_MIN,LON_MAX,LAT_MAX") from exc
    return lon_min, lat_min, lon_max, lat_max


def build(args: argparse.Namespace) -> tuple[SimConfig, list[TerminalSpec] | None]:
    """The run the command line asks for; raises :class:`UsageError`."""
    host, port = parse_target(args.target)
    sources = tuple(part.strip() for part in args.source_addresses.split(",") if part.strip())
    try:
        sources = tuple(check_loopback(source) for source in sources)
    except ValueError as exc:
        raise UsageError(f"--source-addresses: {exc}") from exc
    if args.capture is not None and not args.capture.is_dir():
        raise UsageError(f"--capture {args.capture}: not a directory")
    try:
        config = SimConfig(
            host=host,
            port=port,
            terminals=args.terminals,
            interval_s=args.interval_s,
            duration_s=60.0 if args.duration_s is None else args.duration_s,
            max_reports=args.max_reports,
            edition_2019_ratio=args.edition_2019_ratio,
            phone_base=args.phone_base,
            batch=args.batch,
            group=args.group,
            media_every_s=args.media_every_s,
            media_bytes=args.media_bytes,
            ack_timeout_s=args.ack_timeout_s,
            retries=args.retries,
            window=args.window,
            heartbeat_s=args.heartbeat_s,
            ramp_s=args.ramp_s,
            drain_s=args.drain_s,
            seed=args.seed,
            alarms=tuple(parse_alarm(text) for text in args.alarm),
            source_addresses=sources,
            capture_dir=args.capture,
            capture_max_bytes=args.capture_max_bytes,
            progress_s=args.progress_s or None,
            bbox=parse_bbox(args.bbox),
        )
        fleet = None
        if args.scenario is not None:
            scenario = load_scenario(args.scenario)
            config = scenario_config(scenario, config, duration_s=args.duration_s)
            fleet = scenario_fleet(scenario)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _check_descriptors(config)
    return config, fleet


def _check_descriptors(config: SimConfig) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_terminal = 2 if config.capture_dir is not None else 1  # a socket, and a capture file
    needed = config.terminals * per_terminal + FD_RESERVE
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise UsageError(
            f"{config.terminals} terminals need about {needed} file descriptors, this process "
            f"may open {soft}: run several simulator processes"
        )


def progress_line(progress: Progress) -> str:
    stats = progress.stats
    return (
        f"[{progress.elapsed_s:6.1f}s] online {stats.online}/{stats.terminals}"
        f"  sent {stats.sent}  acked {stats.acked}  retx {stats.retransmitted}"
        f"  failed {stats.failed}  pos/s {progress.positions_per_s:.1f}"
        f"  ack p50 {_ms(stats.latency.percentile(0.5))} p99 {_ms(stats.latency.percentile(0.99))}"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def summary(stats: Stats, config: SimConfig) -> str:
    latency = stats.latency
    rate = stats.positions_acked / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    lines = [
        (
            f"jt808 simulate: {stats.terminals} terminals, {stats.elapsed_s:.1f} s against "
            f"{config.host}:{config.port}"
        ),
        (
            f"  connections  {stats.connects} opened, {stats.connect_failures} failed to open"
            f"{_reasons(stats)}, {stats.authentications} authenticated, {stats.gave_up} gave up"
        ),
        (
            f"  messages     sent {stats.sent}  acked {stats.acked}  rejected {stats.rejected}  "
            f"retransmitted {stats.retransmitted}  failed {stats.failed}  "
            f"abandoned {stats.abandoned}  outstanding {stats.outstanding}"
        ),
        (
            f"  positions    sent {stats.positions_sent}  acked {stats.positions_acked} "
            f"({rate:.1f}/s)  failed {stats.positions_failed}  skipped ticks {stats.skipped}"
        ),
        (
            f"  ack latency  p50 {_ms(latency.percentile(0.5))}  "
            f"p99 {_ms(latency.percentile(0.99))}  "
            f"max {_ms(latency.max_s if latency.count else None)}"
        ),
        (
            f"  other        heartbeats {stats.heartbeats}  media uploads {stats.media_uploads} "
            f"({stats.media_packages} packages)  downlinks {stats.downlinks}  "
            f"replies {stats.replies}  bad frames {stats.bad_frames}"
        ),
    ]
    return "\n".join(lines)


def _reasons(stats: Stats) -> str:
    """Why connections failed to open: " (connection refused)", with counts when several."""
    errors = stats.connect_errors.most_common()
    if not errors:
        return ""
    if len(errors) == 1:
        return f" ({errors[0][0]})"
    return " (" + ", ".join(f"{reason}: {n}" for reason, n in errors) + ")"


def exit_status(sim: Simulator) -> int:
    stats = sim.stats
    never_online = sum(1 for terminal in sim.terminals if not terminal.ever_online)
    if stats.failed or stats.outstanding or never_online:
        return EXIT_LOSS
    return EXIT_OK


def run(
    args: argparse.Namespace, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        config, fleet = build(args)
    except UsageError as exc:
        err.write(f"jt808 simulate: {exc}\n")
        return EXIT_USAGE

    def show(progress: Progress) -> None:
        err.write(progress_line(progress) + "\n")
        err.flush()

    sim = Simulator(config, fleet, on_progress=show)
    status: int | None = None
    try:
        trio.run(sim.run)
    except* KeyboardInterrupt:  # Ctrl-C: trio raises it inside a group from the task tree
        status = EXIT_INTERRUPTED
        err.write("jt808 simulate: interrupted\n")
    stats = sim.stats
    if status is not None:  # interrupted: count what is still unanswered
        stats.outstanding = sum(len(t.pending) for t in sim.terminals)
    out.write(summary(stats, config) + "\n")
    if args.json:
        out.write(json.dumps(stats.to_json(), separators=(",", ":")) + "\n")
    out.flush()
    return status if status is not None else exit_status(sim)


__all__ = ["add_arguments", "build", "parse_alarm", "parse_target", "run", "summary"]
