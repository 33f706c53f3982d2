"""What the commands that call a node's operator port share: HTTPS with the operator's CA.

A node whose operator port has a certificate (``http_tls_cert``) is called with an
``https://`` URL.  Its certificate is checked against ``--cacert FILE`` (or ``JT808_CACERT``):
a PEM file of the CA that signed it, or the self-signed certificate itself; without one,
against the system's trusted CAs.  The host name in the URL must match the certificate.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

CACERT_ENV = "JT808_CACERT"
# What the commands hand urllib (they need not import ssl themselves).
ClientContext = ssl.SSLContext


class ClientSetupError(Exception):
    """The client cannot be set up as asked (say, an unreadable CA file); a usage error."""


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cacert",
        type=Path,
        metavar="FILE",
        help=f"PEM CA certificate(s) to check an https:// node against (default ${CACERT_ENV}, "
        "else the system's CAs)",
    )


def tls_context(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientContext | None:
    """The context for ``urlopen`` (None: urllib's default, the system's CAs), from
    ``--cacert`` or ``JT808_CACERT``; :class:`ClientSetupError` for a CA file that cannot be
    used."""
    environ = os.environ if environ is None else environ
    cacert: Path | None = getattr(args, "cacert", None)
    if cacert is None and environ.get(CACERT_ENV):
        cacert = Path(environ[CACERT_ENV])
    if cacert is None:
        return None
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ClientSetupError(f"cannot use CA file {cacert}: {detail}") from exc
