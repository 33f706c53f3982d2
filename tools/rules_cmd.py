"""``jt808 rules``: rule engines as their own processes, and re-judging history.

``jt808 rules run [--dsn DSN] [--rules-file FILE] [--metrics-port PORT]`` runs one rule engine
until SIGINT/SIGTERM: it takes its share of the vehicles with every other engine on the
database (``jt808 serve`` workers included, see :mod:`tools.rules_consumer`) and judges their
committed positions.  This is how the rules scale apart from ingestion: run ``jt808 serve
--no-rules`` and as many ``jt808 rules run`` as needed.

``jt808 rules rerun --from DATE --to DATE [--unit U] [--plate P]`` judges a past period again
from stored positions, filings and fences (after a filing was corrected, or for an audit);
running it twice changes nothing.  Prints a progress line per group of vehicles and a summary.

Examples::

    jt808 rules run --dsn postgresql://jt808@db/jt808
    jt808 rules rerun --from 2026-09-01 --to 2026-10-01 --unit 昆明市财政局
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from tools.alerts_cmd import iso_time
from tools.db_cmd import add_database_arguments, resolve

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXAMPLES = """\
examples:
  jt808 rules run --dsn postgresql://jt808@db/jt808 --metrics-port 9810
  jt808 rules rerun --from 2026-09-01 --to 2026-10-01 --unit 昆明市财政局
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_parser = actions.add_parser(
        "run",
        help="run a rule engine (shares the vehicles with every other engine)",
        description="Run a rule engine until SIGINT/SIGTERM.  Example: "
        "jt808 rules run --dsn postgresql://jt808@db/jt808",
    )
    run_parser.add_argument("--rules-file", type=Path, help="TOML rule settings")
    run_parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics on this port (default: none)"
    )
    run_parser.add_argument("--engine-id", help="this engine's name (default host:pid/rules)")
    add_database_arguments(run_parser)
    run_parser.set_defaults(run=run_engine)
    again = actions.add_parser(
        "rerun",
        help="judge a past period again",
        description="Judge [--from, --to) again from stored positions, filings and fences.  "
        "Times without an offset are China time.  Example: jt808 rules rerun "
        "--from 2026-09-01 --to 2026-10-01 --unit 昆明市财政局",
    )
    again.add_argument("--from", dest="start", type=iso_time, required=True, help="ISO 8601")
    again.add_argument("--to", dest="end", type=iso_time, required=True, help="ISO 8601, exclusive")
    again.add_argument("--unit", help="only this owning unit's vehicles")
    again.add_argument("--plate", help="only this vehicle")
    again.add_argument("--rules-file", type=Path, help="TOML rule settings")
    add_database_arguments(again)
    again.set_defaults(run=run_rerun)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - the action's run is used
    return EXIT_FAILED


def run_engine(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from ingest.server import default_node_id  # noqa: PLC0415
    from storage import StorageError, database_dsn, migrate  # noqa: PLC0415

    configured, data_dir = resolve(args)
    try:
        with database_dsn(configured, data_dir / "pgdata") as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrate(conn)
            engine_id = args.engine_id or f"{default_node_id()}/rules"
            trio.run(_serve_rules, dsn, engine_id, args.rules_file, args.metrics_port)
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    return EXIT_OK


async def _serve_rules(
    dsn: str, engine_id: str, rules_file: Path | None, metrics_port: int | None
) -> None:
    import signal  # noqa: PLC0415

    import prometheus_client  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from ingest.supervise import supervise  # noqa: PLC0415
    from tools.rules_consumer import build_service  # noqa: PLC0415

    service, closing = build_service(dsn, engine_id=engine_id, rules_file=rules_file)
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "rules", service.run)
            logger.info("rule engine %s running", engine_id)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("%s: stopping", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        for close in closing:
            close()
    logger.info("rule engine %s stopped", engine_id)


def run_rerun(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from storage import StorageError, database_dsn, migrate  # noqa: PLC0415
    from tools.rules_consumer import rerun  # noqa: PLC0415

    start: datetime = args.start
    end: datetime = args.end
    if end <= start:
        logger.error("--to must be after --from")
        return 2
    configured, data_dir = resolve(args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        with database_dsn(configured, data_dir / "pgdata") as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrate(conn)
            summary = rerun(
                dsn,
                start,
                end,
                unit=args.unit,
                plate=args.plate,
                rules_file=args.rules_file,
                progress=progress,
            )
    except (StorageError, psycopg.Error) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    changes = ", ".join(f"{n} {state}" for state, n in sorted(summary.changes.items()))
    print(
        f"re-judged {summary.vehicles} vehicle(s) over {summary.positions} position(s) "
        f"from {start.isoformat()} to {end.isoformat()}: "
        f"{sum(summary.changes.values())} alert change(s){': ' + changes if changes else ''}; "
        f"{summary.trips} trip record(s)"
    )
    return EXIT_OK


__all__ = ["add_arguments", "run", "run_engine", "run_rerun"]
