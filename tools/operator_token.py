"""The operator token of the commands that call a node's operator port (``jt808 send``,
``jt808 alerts tail``): ``--token TOKEN`` or, better (a command line is visible to every user
of the machine), ``JT808_TOKEN``.  Tokens come from ``jt808 tokens create NAME``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

TOKEN_ENV = "JT808_TOKEN"  # noqa: S105 - the variable's name, not a secret


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"operator bearer token (default ${TOKEN_ENV}; made by jt808 tokens create)",
    )


def auth_headers(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``Authorization`` header for the token given (none without a token: the node then
    answers 401, which the command reports)."""
    environ = os.environ if environ is None else environ
    token = getattr(args, "token", None) or environ.get(TOKEN_ENV) or None
    return {} if token is None else {"Authorization": f"Bearer {token.strip()}"}
