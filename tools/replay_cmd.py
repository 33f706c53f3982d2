"""``jt808 replay``: recorded connections (capture files) sent again to a server on this machine.

    jt808 replay FILE_OR_DIR... --target 127.0.0.1:6808 [--speed X | --fast] [--json]

Each capture file becomes one connection; see :mod:`tools.replay` for the timing, the one
rewrite (auth codes) and how long a connection waits for the server's answers.  A summary goes
to standard output at the end, with ``--json`` a final machine-readable line.

Exit status: 0 when every connection opened and every replayed report (0x0200/0x0704) was
acknowledged, 1 otherwise, 2 for usage errors (including files that are not captures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

import trio

from protocol.capture import CaptureError
from tools.replay import (
    DEFAULT_AUTH_WAIT_S,
    DEFAULT_LINGER_S,
    DEFAULT_MAX_LINGER_S,
    MAX_CONNECTIONS,
    CaptureInfo,
    ReplayConfig,
    Replayer,
    ReplayStats,
    capture_files,
    inspect,
)
from tools.simulate import DEFAULT_PORT, check_loopback
from tools.text import progress

EXIT_OK = 0
EXIT_LOSS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# A progress line a second on a terminal (standard error), none into a pipe or a log.
PROGRESS_S = 1.0
EXAMPLES = """\
examples:
  jt808 replay captures/ --target 127.0.0.1:6808
  jt808 replay captures/*.jt808cap --fast --json
  jt808 replay one.jt808cap --speed 10
"""


class UsageError(Exception):
    """A command line that cannot run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="capture files, or directories of them (*.jt808cap)",
    )
    add(
        "--target",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="server to replay to (loopback only; default %(default)s)",
    )
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="replay X times as fast as recorded (default %(default)s)",
    )
    timing.add_argument("--fast", action="store_true", help="send every chunk as soon as possible")
    add(
        "--linger-s",
        type=float,
        default=DEFAULT_LINGER_S,
        metavar="S",
        help="after the last chunk, wait for answers until S s pass without one "
        "(default %(default)s)",
    )
    add(
        "--max-linger-s",
        type=float,
        default=DEFAULT_MAX_LINGER_S,
        metavar="S",
        help="after the last chunk, close after S s at most (default %(default)s)",
    )
    add(
        "--auth-wait-s",
        type=float,
        default=DEFAULT_AUTH_WAIT_S,
        metavar="S",
        help="how long a 0x0102 waits for the 0x8100 of its replayed 0x0100 (default %(default)s)",
    )
    add("--json", action="store_true", help="end with one JSON line of the statistics")


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"--target {text!r}: expected HOST:PORT")
    try:
        return check_loopback(host.strip("[]")), int(port_text)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from exc


def build(args: argparse.Namespace) -> tuple[ReplayConfig, list[CaptureInfo]]:
    """The replay the command line asks for; raises :class:`UsageError`."""
    host, port = parse_target(args.target)
    try:
        config = ReplayConfig(
            host=host,
            port=port,
            speed=None if args.fast else args.speed,
            linger_s=args.linger_s,
            max_linger_s=args.max_linger_s,
            auth_wait_s=args.auth_wait_s,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    paths = capture_files(args.files)
    if not paths:
        raise UsageError("no capture files found")
    if len(paths) > MAX_CONNECTIONS:
        raise UsageError(
            f"{len(paths)} files; one process replays at most {MAX_CONNECTIONS}: "
            "split them over several replays"
        )
    infos = []
    for path in paths:
        try:
            infos.append(inspect(path))
        except (CaptureError, OSError) as exc:
            raise UsageError(f"{path}: {exc}") from exc
    return config, infos


def summary(stats: ReplayStats, config: ReplayConfig) -> str:
    timing = "as fast as possible" if config.speed is None else f"at {config.speed:g}x"
    acks = ", ".join(f"{result}: {n}" for result, n in sorted(stats.ack_results.items()))
    return "\n".join(
        [
            (
                f"jt808 replay: {stats.files} files to {config.host}:{config.port} {timing}, "
                f"{stats.elapsed_s:.1f} s"
            ),
            (
                f"  connections  {stats.connections} opened, {stats.connect_failures} failed, "
                f"{stats.peer_closed} closed by the server, {stats.unreadable_files} unreadable, "
                f"{stats.truncated_files} truncated"
            ),
            (
                f"  sent         {sum(stats.frames_sent.values())} frames, "
                f"{stats.bytes_sent} bytes; reports {stats.reports_sent} "
                f"({stats.positions_sent} positions)"
            ),
            (
                f"  received     {sum(stats.frames_received.values())} frames, "
                f"{stats.bytes_received} bytes, {stats.bad_frames_received} bad; "
                f"0x8001 results {{{acks}}}"
            ),
            (
                f"  reports      acked {stats.reports_acked} ({stats.positions_acked} positions), "
                f"unanswered {stats.reports_unanswered} ({stats.positions_unanswered} positions)"
            ),
            (
                f"  auth codes   {stats.registrations} issued, {stats.auth_rewrites} 0x0102 "
                f"rewritten, {stats.auth_as_recorded} sent as recorded"
            ),
        ]
    )


def progress_line(stats: ReplayStats, elapsed_s: float) -> str:
    return (
        f"[{elapsed_s:6.1f}s] connections {stats.connections + stats.connect_failures}"
        f"/{stats.files} ({stats.connect_failures} failed)  sent {sum(stats.frames_sent.values())}"
        f" frames  reports acked {stats.reports_acked}/{stats.reports_sent}"
    )


async def _replay(replayer: Replayer, err: IO[str], every_s: float | None) -> None:
    """The replay, with a progress line on ``err`` every ``every_s`` (None: none)."""
    async with trio.open_nursery() as nursery:
        if every_s is not None:
            nursery.start_soon(_show_progress, replayer, err, every_s)
        await replayer.run()
        nursery.cancel_scope.cancel()


async def _show_progress(replayer: Replayer, err: IO[str], every_s: float) -> None:
    start = trio.current_time()
    while True:
        await trio.sleep(every_s)
        err.write(progress_line(replayer.stats, trio.current_time() - start) + "\n")
        err.flush()


def exit_status(stats: ReplayStats) -> int:
    failed = stats.connect_failures or stats.unreadable_files or stats.reports_unanswered
    return EXIT_LOSS if failed else EXIT_OK


def run(
    args: argparse.Namespace, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        config, infos = build(args)
    except UsageError as exc:
        err.write(f"jt808 replay: {exc}\n")
        return EXIT_USAGE
    replayer = Replayer(config, infos)
    status: int | None = None
    every_s = PROGRESS_S if progress(err) else None
    try:
        trio.run(_replay, replayer, err, every_s)
    except* KeyboardInterrupt:  # Ctrl-C: trio raises it inside a group from the task tree
        status = EXIT_INTERRUPTED
        err.write("jt808 replay: interrupted\n")
    stats = replayer.stats
    out.write(summary(stats, config) + "\n")
    if args.json:
        out.write(json.dumps(stats.to_json(), separators=(",", ":")) + "\n")
    out.flush()
    return status if status is not None else exit_status(stats)


__all__ = ["add_arguments", "build", "parse_target", "run", "summary"]
