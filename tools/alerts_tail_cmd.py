"""``jt808 alerts tail``: follow a node's live alert stream (``GET /alerts/stream``).

Prints one readable line per alert event (device time, rule, state, plate, unit, severity),
or the alert's JSON with ``--json``.  After a dropped connection it reconnects with the last
event id it saw (``Last-Event-ID``), so no event is lost or shown twice while the node still
holds it.  Ctrl-C exits 130; ``--count N`` stops after N events (exit 0).

The stream is read with ``urllib.request`` line by line (``http.client`` undoes the chunked
transfer encoding); tools open no sockets themselves.  An ``https://`` node is checked against
``--cacert`` / ``JT808_CACERT`` (:mod:`tools.operator_client`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from tools.operator_client import (
    ClientContext,
    ClientSetupError,
    add_tls_arguments,
    tls_context,
)
from tools.operator_token import add_token_argument, auth_headers

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
DEFAULT_HTTP = "http://127.0.0.1:9808"
# The node writes at least every 15 s (a heartbeat comment 15 s after its last write,
# ``ingest.http.HEARTBEAT_S``), so this is the longest a live stream goes without a byte; three
# missed heartbeats mean the connection is dead, and a proxy or a busy node delaying one or two
# does not make a quiet platform look like a dead one.  (A timeout per socket read: urllib
# applies it to every receive, not to the whole response.)
READ_TIMEOUT_S = 45.0
# Reconnect after 1 s, doubling up to 30 s while the node stays unreachable.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
# An SSE event is one alert (~1 KB); a line past this is not our node's (guards readline).
MAX_LINE_BYTES = 1024 * 1024


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit", help="only this unit's alerts")
    parser.add_argument("--rule", help="only this rule (holiday_sealing, out_of_area, ...)")
    parser.add_argument("--state", help="only this state (open, pending_backfill, ...)")
    parser.add_argument("--severity", help="only this severity")
    parser.add_argument("--json", action="store_true", help="print each alert as JSON")
    parser.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="URL",
        help=f"the node's operator HTTP address (default {DEFAULT_HTTP})",
    )
    add_tls_arguments(parser)
    add_token_argument(parser)
    parser.add_argument(
        "--after", type=int, metavar="SEQ", help="start after this event id (0: all held)"
    )
    parser.add_argument("--count", type=int, metavar="N", help="stop after N events")


def run_tail(
    args: argparse.Namespace,
    *,
    out: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> int:
    """Follow the stream; returns the exit code.  ``read_timeout_s``: the longest silence
    taken from a connected node before reconnecting (tests shorten it with the heartbeat)."""
    out = out if out is not None else sys.stdout
    if args.count is not None and args.count < 1:
        logger.error("--count must be at least 1")
        return 2
    try:
        context = tls_context(args)
    except ClientSetupError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - a usage error, not a crash
        return 2
    auth = auth_headers(args)
    filters = {
        key: getattr(args, key)
        for key in ("unit", "rule", "state", "severity")
        if getattr(args, key) is not None
    }
    url = args.http.rstrip("/") + "/alerts/stream"
    if filters:
        url += "?" + urllib.parse.urlencode(filters)
    last_id: str | None = None if args.after is None else str(args.after)
    shown = 0
    delay = RETRY_FIRST_S
    try:
        while True:
            try:
                for event_id, data in _events(
                    url, last_id, timeout_s=read_timeout_s, context=context, headers=auth
                ):
                    last_id = event_id or last_id
                    delay = RETRY_FIRST_S
                    out.write(_render(data, as_json=args.json) + "\n")
                    out.flush()
                    shown += 1
                    if args.count is not None and shown >= args.count:
                        return EXIT_OK
                logger.warning("stream ended; reconnecting")
            except urllib.error.HTTPError as exc:
                # 503: the node's stream cap, 429: this client's share of it; both heal.
                if exc.code not in (429, 503):
                    body = exc.read().decode(errors="replace")
                    logger.error("%s: HTTP %s %s", url, exc.code, body)  # noqa: TRY400
                    return EXIT_FAILURE
                logger.warning("%s: busy; retrying in %.0f s", url, delay)
            except (OSError, ValueError) as exc:  # URLError, timeouts, resets, bad lines
                logger.warning("%s: %s; retrying in %.0f s", url, exc, delay)
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _events(
    url: str,
    last_id: str | None,
    *,
    timeout_s: float = READ_TIMEOUT_S,
    context: ClientContext | None = None,
    headers: Mapping[str, str] | None = None,
) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each event of one connection (server-sent events framing: fields up to a
    blank line; comment lines start with a colon)."""
    sent = {"Accept": "text/event-stream", **(headers or {})}
    if last_id is not None:
        sent["Last-Event-ID"] = last_id
    request = urllib.request.Request(url, headers=sent)  # noqa: S310 - the operator's URL
    opened = urllib.request.urlopen(request, timeout=timeout_s, context=context)  # noqa: S310
    with opened as response:
        event_id: str | None = None
        data: list[str] = []
        while True:
            raw = response.readline(MAX_LINE_BYTES)
            if not raw:
                return
            if not raw.endswith(b"\n"):
                raise ValueError("event line too long or cut off")
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    yield event_id, "\n".join(data)
                event_id, data = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


def _render(data: str, *, as_json: bool) -> str:
    if as_json:
        return data
    alert: dict[str, Any] = json.loads(data)
    detail = alert.get("detail") or {}
    extra = ""
    if alert.get("deadline"):
        extra += f" deadline={alert['deadline']}"
    if isinstance(detail, dict) and detail.get("alarm"):
        extra += f" alarm={detail['alarm']}"
    return (
        f"{alert.get('updated_at', '?')}  {alert.get('rule', '?'):<18} "
        f"{alert.get('state', '?'):<16} {alert.get('plate') or '-'}  "
        f"unit={alert.get('unit') or '-'} severity={alert.get('severity', '?')} "
        f"phone={alert.get('phone', '?')}{extra}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """For a stand-alone ``tail`` command; ``jt808 alerts`` uses :func:`add_tail_arguments`."""
    add_tail_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_tail(args)
