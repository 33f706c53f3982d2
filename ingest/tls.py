"""TLS for the operator port, and the start-up checks of what the server exposes.

The operator port carries the platform's most sensitive operations (master data, the exempt
flag, filings, commands, live positions and alerts).  On loopback it is reached only from the
host itself; beyond loopback it must be encrypted: :func:`exposure` refuses to start a server
whose operator port listens beyond loopback without ``http_tls_cert`` and ``http_tls_key``,
unless ``allow_insecure_http`` says so (then it warns at every start).  It also warns when the
terminal port lets any device register (``registration = "open"``) from beyond loopback.

With a certificate and key the port speaks HTTPS only (:func:`server_context`: TLS 1.2 or
later, the ``ssl`` module's default ciphers); each connection's handshake runs within the
request head's deadline, and a failed one closes that connection alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingest.config import ServerConfig

# Names that always mean this host (any other name is taken as reachable from elsewhere: it
# may resolve to anything).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class TlsSetupError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only (127.0.0.0/8, ::1,
    localhost).  An empty host or a wildcard listens on every interface: False."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class Exposure:
    """What :func:`exposure` found: a reason not to start (None: start) and warnings to log."""

    refusal: str | None
    warnings: tuple[str, ...]


def exposure(config: ServerConfig) -> Exposure:
    """The start-up verdict on ``config``'s listening addresses (pure; the caller logs)."""
    warnings: list[str] = []
    refusal = None
    tls = config.http_tls_cert is not None
    if not tls and not is_loopback(config.http_host):
        where = f"the operator port {config.http_host}:{config.http_port}"
        if config.allow_insecure_http:
            warnings.append(
                f"{where} serves plain HTTP beyond loopback (allow_insecure_http = true): "
                "bearer tokens and every answer cross the network unencrypted"
            )
        else:
            refusal = (
                f"refusing to serve {where} beyond loopback without TLS: set http_tls_cert and "
                "http_tls_key (JT808_HTTP_TLS_CERT/JT808_HTTP_TLS_KEY, --http-tls-cert/"
                "--http-tls-key), or http_host = 127.0.0.1, or allow_insecure_http = true"
            )
    if config.registration == "open" and not is_loopback(config.host):
        warnings.append(
            f"terminal port {config.host}:{config.port} runs with registration = open: any "
            "device may register a phone number not yet registered; in production set "
            "registration = registry and provision terminals (jt808 terminals provision)"
        )
    return Exposure(refusal, tuple(warnings))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context for the operator port; :class:`TlsSetupError` when the
    certificate chain or key cannot be loaded (missing, unreadable, not PEM, not a pair)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except FileNotFoundError as exc:
        raise TlsSetupError(f"operator TLS: {exc.filename}: no such file") from exc
    except OSError as exc:  # ssl.SSLError is an OSError
        detail = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TlsSetupError(
            f"operator TLS: cannot use certificate {cert} with key {key}: {detail}"
        ) from exc
    return context
