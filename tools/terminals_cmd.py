"""``jt808 terminals``: the platform centre's hand on terminal registrations (article 18).

    jt808 terminals show 13800138000              # registration, identity and its events
    jt808 terminals provision 13800138000 ...     # installed through the platform centre
    jt808 terminals reset 13800138000 --reason "terminal replaced"

A registered phone belongs to the terminal that registered it: a 0x0100 for it from another
terminal is answered result 3 (terminal already registered).  ``reset`` releases the phone, so
the next terminal to register it gets it (a replaced or moved terminal); the release is kept in
the phone's event log with who did it and why.  A phone is given as the terminal sends it or
without its leading zeros.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import platform
from typing import Any

from tools.db_cmd import add_database_arguments, resolve

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXAMPLES = """\
examples:
  jt808 terminals show 13800138000
  jt808 terminals provision 13800138000 13800138001
  jt808 terminals reset 13800138000 --reason "terminal replaced"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show", "provision", "reset"])
    parser.add_argument("phones", nargs="+", metavar="PHONE", help="terminal phone number(s)")
    parser.add_argument("--reason", help="reset: why the phone is released (kept in its log)")
    parser.add_argument(
        "--actor",
        help="reset: who releases it (default: this machine's user@host)",
    )
    add_database_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import psycopg  # noqa: PLC0415

    from ingest.cluster import phone_candidates  # noqa: PLC0415
    from ingest.commands import BadCommandError  # noqa: PLC0415
    from storage import StorageError, TerminalStore, database_dsn, migrate  # noqa: PLC0415

    configured, data_dir = resolve(args)
    try:
        phones = [phone_candidates(phone) for phone in args.phones]
    except BadCommandError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - a usage error
        return 2
    actor = args.actor or f"{getpass.getuser()}@{platform.node()}"
    status = EXIT_OK
    try:
        with database_dsn(configured, data_dir / "pgdata") as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrate(conn)
            store = TerminalStore(dsn)
            try:
                for given, forms in zip(args.phones, phones, strict=True):
                    if not _act(store, args.action, given, forms, actor, args.reason):
                        status = EXIT_FAILED
            finally:
                store.close()
    except StorageError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported, not a crash
        return EXIT_FAILED
    return status


def _act(  # noqa: PLR0917 - one call site, the fields of one action
    store: Any, action: str, given: str, forms: list[str], actor: str, reason: str | None
) -> bool:
    phone = next((form for form in forms if store.lookup_sync(form) is not None), None)
    if action == "provision":
        # A new phone is stored as a terminal sends it: BCD[6] (12 digits) when it fits, else
        # the 2019 BCD[10] (20 digits); give the 20-digit form for a 2019 terminal.
        target = phone or next((form for form in forms if len(form) in (12, 20)), forms[-1])
        store.provision_sync(target)
        print(f"{target}: provisioned")
        return True
    if phone is None:
        logger.error("%s: no such terminal", given)
        return False
    if action == "reset":
        store.reset_sync(phone, actor=actor, reason=reason)
        print(f"{phone}: released; the next terminal to register it gets it")
        return True
    record = store.lookup_sync(phone)
    events = store.events_sync(phone)
    document = {
        "phone": record.phone,
        "provisioned": record.provisioned,
        "registered": record.auth_code is not None,
        "registered_at": _iso(record.registered_at),
        "manufacturer": record.manufacturer,
        "terminal_id": record.terminal_id,
        "plate": record.plate,
        "imei": record.imei,
        "firmware": record.firmware,
        "events": [
            {
                "at": _iso(event["at"]),
                "event": event["event"],
                "actor": event["actor"],
                "detail": event["detail"],
            }
            for event in events
        ],
    }
    print(json.dumps(document, ensure_ascii=False, indent=2))
    return True


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
