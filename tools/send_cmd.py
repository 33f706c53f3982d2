"""``jt808 send``: send a downlink command to a terminal through a node's operator port.

    jt808 send 13800138000 0x8201
    jt808 send 13800138000 0x8300 --body '{"flag": 8, "text": "请回调度中心"}'
    jt808 send 13800138000 0x8106 --body '{"param_ids": ["0x0001", "0x0013"]}' --http http://node2:9808

It POSTs ``{"msg_id": MSG_ID, "body": BODY}`` to ``URL/terminals/PHONE/commands`` (any node of
the cluster: the command reaches the node holding the terminal; an ``https://`` node is checked
against ``--cacert`` / ``JT808_CACERT``) and prints the JSON answer: the
terminal's reply on success, ``{"error": ..., "detail": ...}`` otherwise.  Exit status 0 when the
terminal answered, 1 for an error answer or an unreachable node, 2 for usage errors (such as a
``--body`` that is not a JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from tools.operator_client import (
    ClientContext,
    ClientSetupError,
    add_tls_arguments,
    tls_context,
)
from tools.operator_token import add_token_argument, auth_headers

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
HTTP_OK = 200

DEFAULT_URL = "http://127.0.0.1:9808"
EXAMPLES = """\
examples:
  jt808 send 13800138000 0x8201                              where are you (position query)
  jt808 send 13800138000 0x8300 --body '{"flag": 8, "text": "请回调度中心"}'
  jt808 send 13800138000 0x8106 --body '{"param_ids": ["0x0001"]}' --http http://node2:9808
"""
# The node waits for the terminal through the whole retransmission schedule (90 s with the
# defaults) plus a relay to another node; the client must wait a little longer than that.
DEFAULT_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("phone", help="terminal phone number (leading zeros optional)")
    parser.add_argument("msg_id", metavar="MSG_ID", help="command message id, e.g. 0x8201")
    parser.add_argument(
        "--body",
        default="{}",
        metavar="JSON",
        help="the command's fields as a JSON object (default: {})",
    )
    parser.add_argument(
        "--http",
        dest="url",
        default=DEFAULT_URL,
        metavar="URL",
        help=f"operator HTTP port of any node (default {DEFAULT_URL})",
    )
    add_tls_arguments(parser)
    add_token_argument(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )


def run(args: argparse.Namespace) -> int:
    try:
        body = json.loads(args.body)
    except json.JSONDecodeError as exc:
        print(f"jt808 send: --body is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(body, dict):
        print("jt808 send: --body must be a JSON object", file=sys.stderr)
        return EXIT_USAGE
    url = f"{args.url.rstrip('/')}/terminals/{urllib.parse.quote(args.phone)}/commands"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        print(f"jt808 send: {args.url} is not an http:// URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        context = tls_context(args)
    except ClientSetupError as exc:
        print(f"jt808 send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    document = {"msg_id": args.msg_id, "body": body}
    status, answer = post_json(
        url, document, args.timeout, context=context, headers=auth_headers(args)
    )
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return EXIT_OK if status == HTTP_OK else EXIT_FAILED


def post_json(
    url: str,
    document: dict[str, Any],
    timeout_s: float,
    *,
    context: ClientContext | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """POST ``document``; the HTTP status and the decoded JSON answer (status 0 and an error
    object when the node cannot be reached or does not answer JSON)."""
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the caller
        url,
        data=json.dumps(document).encode("utf-8"),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        opened = urllib.request.urlopen(request, timeout=timeout_s, context=context)  # noqa: S310
        with opened as response:
            status, content = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, content = exc.code, exc.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return 0, {"error": "unreachable", "detail": f"{url}: {exc}"}
    try:
        return status, json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return status, {"error": "bad_answer", "detail": content[:200].decode("latin-1")}
