"""The ``jt808`` command: one entry point, one sub-command per job.

This module is the application wiring: it is the one place allowed to import every package, and
it imports each sub-command's module only when that sub-command runs, so ``jt808 decode`` never
loads the database driver.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# sub-command -> (module, help).  Each module has ``add_arguments(parser)`` and ``run(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("tools.serve_cmd", "run the JT/T 808 server"),
    "decode": ("tools.decode_cmd", "decode JT/T 808 frames to JSON lines"),
    "simulate": ("tools.simulate_cmd", "simulate a fleet of JT/T 808 terminals (loopback only)"),
    "replay": ("tools.replay_cmd", "replay captured terminal traffic (loopback only)"),
    "db": ("tools.db_cmd", "database administration: migrate"),
    "export": ("tools.export_cmd", "export stored positions as CSV"),
    "send": ("tools.send_cmd", "send a downlink command to a terminal through a node"),
    "terminals": ("tools.terminals_cmd", "terminal registrations: show, provision, reset"),
    "vehicles": ("tools.vehicles_cmd", "vehicle registry: import CSV"),
    "fences": ("tools.fences_cmd", "geofences: import GeoJSON"),
    "filings": ("tools.filings_cmd", "trip filings and dispatch orders: import CSV"),
    "alerts": ("tools.alerts_cmd", "alerts: list history, tail the live stream"),
    "rules": ("tools.rules_cmd", "rule engines: run one, judge a past period again"),
    "report": ("tools.report_cmd", "periodic reports: violations per unit and rule"),
}

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jt808", description="JT/T 808 ingestion server and tools"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
