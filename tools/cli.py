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
    "filings": ("tools.filings_cmd", "trip filings and dispatch orders: import CSV, versions"),
    "alerts": ("tools.alerts_cmd", "alerts: list history, tail the live stream"),
    "rules": ("tools.rules_cmd", "rule engines: run one, judge a past period again"),
    "report": ("tools.report_cmd", "periodic reports: violations per unit and rule"),
    "users": ("tools.users_cmd", "operator accounts: add, list"),
    "tokens": ("tools.tokens_cmd", "operator bearer tokens: create, list, revoke"),
    "audit": ("tools.audit_cmd", "the audit trail of writes: list"),
}

EXIT_USAGE = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXAMPLES = """\
examples:
  jt808 serve --dsn postgresql://jt808@db/jt808
  jt808 --log-level WARNING vehicles import vehicles.csv
  jt808 decode --raw captures/20261003T003000.000000Z-4242-1.jt808cap
  jt808 COMMAND --help                        each command's flags and examples

Results go to standard output, log lines to standard error.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each flag's default shown unless the help gives
    it already or there is none to show (None, False: the flag is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if (
            text is None
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or (isinstance(default, list | tuple) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _finish(parser: argparse.ArgumentParser, epilog: str | None = None) -> None:
    """Every sub-command's parser: the help formatter, ``--log-level`` (given after the
    sub-command too) and, for one without examples of its own, those of its command."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in dict.fromkeys(action.choices.values()):
            child.formatter_class = HelpFormatter
            if child.epilog is None:
                child.epilog = epilog
            if "--log-level" not in child._option_string_actions:
                child.add_argument(
                    "--log-level",
                    choices=LOG_LEVELS,
                    default=argparse.SUPPRESS,
                    help="as before the sub-command: DEBUG, INFO (default), WARNING or ERROR",
                )
            _finish(child, child.epilog)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jt808",
        description="JT/T 808 ingestion server and tools",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log lines shown")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name, help=help_text, description=help_text, epilog=getattr(module, "EXAMPLES", None)
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    _finish(parser)
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
