"""The operator port's caps, each with the reason for its number, and the counters behind the
per-address ones.

Every cap is a setting of :class:`~ingest.config.ServerConfig` (``http_*``, see
:meth:`~ingest.config.ServerConfig.http_limits`); the constants below are the defaults.  What
happens at each cap:

* a head over ``max_head_bytes`` or with more than ``max_headers`` fields: 431;
* a head not read within ``head_timeout_s`` of the connection (the TLS handshake included):
  the connection is closed;
* a body over its cap (``max_body_bytes`` for commands, ``max_masterdata_body_bytes``): 413
  ``{"error": "request body too large", "max": N}``, whether declared or chunked;
* a long request's body not read within ``body_timeout_s``: the connection is closed;
* ``max_connections`` open: the connection reading its head longest is closed to make room;
  when none is, the new one is closed;
* ``max_connections_per_address`` open from one address: the same among that address's
  connections; a plain HTTP connection refused is answered 429 ``too_many_connections``;
* ``max_streams`` alert streams: 503 ``busy``; ``max_streams_per_user`` of one owner: 429
  ``too_many_streams``.

Streams are counted per *owner* (:meth:`ingest.http.OperatorHttp.stream_owner`): the user the
request's token belongs to, so an operator's streams are capped wherever they come from; a
port without accounts (tests, tools) counts them per client address instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

# A request is a GET line and a few headers; h11 refuses heads past this size (431).
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# curl sends 3-4 headers, a browser about 15, and a reverse proxy adds a handful of forwarding
# headers: 64 is four times the most a real client sends.  The head's size alone allows ~4,000
# minimal headers ("a:b" lines), each a tuple h11 builds and every handler may walk.
MAX_REQUEST_HEADERS = 64
# A request head is one packet from curl, Prometheus or an orchestrator's probe.  5 s outlasts
# two retransmissions of a lost packet (TCP's first retransmission timeout is 1 s, then 2 s:
# RFC 6298), and is all a client that trickles its head holds a connection for.  A TLS
# handshake (two round trips) fits in it the same way.
HEAD_TIMEOUT_S = 5.0
# A client gets this long to send a long request's body, and again to take the response (a
# command's own wait for the terminal is bounded by its retransmission schedule).  The largest
# body taken (16 MiB of master data, below) needs 13 Mbit/s to arrive in time.
REQUEST_TIMEOUT_S = 10.0
# A command body is a few fields; a 0x8108 firmware package or a long route given as JSON hex
# is the largest, and 1 MiB holds far more than one such command's 64 Ki packages need.
MAX_REQUEST_BODY_BYTES = 1024 * 1024
# Master data is posted in bulk: a fence set of 1,000 polygons of ~100 vertices is ~4 MB of
# GeoJSON, and a year of a unit's filings a few MB.  16 MiB holds that with room and still
# bounds what one request may make us hold.
MAX_MASTERDATA_BODY_BYTES = 16 * 1024 * 1024
# Connections of this port at once, whatever they are doing.  File descriptors are shared with
# the terminal port: ~18,000 terminal connections under a 20,000 descriptor limit leave ~2,000
# for database connections, spool, media and capture files and this port; 512 keeps most of
# that for the rest.  Each holds at most a head and a short body here (2 x 16 KiB): 16 MiB.
MAX_OPEN_CONNECTIONS = 512
# One address's share of those.  Every request has a connection of its own: an operator's
# ``alerts tail``, a dashboard with a few streams, a Prometheus scrape and a probe are a handful
# each, and a reverse proxy or NAT in front of a control room some dozens.  64 is an eighth of
# the port, so one misbehaving host leaves the other seven eighths to everyone else.  Behind a
# proxy every client has the proxy's address: raise it there.
MAX_CONNECTIONS_PER_ADDRESS = 64
# Alert streams hold their connection for as long as the operator watches: a few operators'
# ``alerts tail`` and a dashboard or two.  More are answered 503.  Each costs a task, a socket
# buffer and one database wait (``LISTEN`` wake-ups, a query per batch of events).
MAX_STREAMS = 8
# One user's share of the streams: a tail and a dashboard are two, and a client reconnecting
# before the node has seen its old connection close briefly holds one more; half the port's
# streams, so one account (or one leaked token) cannot take all of them.
MAX_STREAMS_PER_USER = 4


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """The operator port's caps (see the module docstring for what each does at its cap)."""

    max_head_bytes: int = MAX_REQUEST_HEAD_BYTES
    max_headers: int = MAX_REQUEST_HEADERS
    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = REQUEST_TIMEOUT_S
    max_body_bytes: int = MAX_REQUEST_BODY_BYTES
    max_masterdata_body_bytes: int = MAX_MASTERDATA_BODY_BYTES
    max_connections: int = MAX_OPEN_CONNECTIONS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    max_streams: int = MAX_STREAMS
    max_streams_per_user: int = MAX_STREAMS_PER_USER

    def __post_init__(self) -> None:
        problems = limit_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError("; ".join(problems))


def limit_problems(values: Mapping[str, float], prefix: str = "") -> list[str]:
    """What is wrong with the caps ``values`` (the fields of :class:`HttpLimits` by name;
    empty: nothing); names in the messages get ``prefix``."""
    problems = [
        f"{prefix}{name} must be a positive number of seconds"
        if name.endswith("_s")
        else f"{prefix}{name} must be at least 1"
        for name, value in values.items()
        if not _positive(value)
    ]
    problems.extend(
        f"{prefix}{share} must not exceed {prefix}{whole}"
        for share, whole in _SHARES
        if values[share] > values[whole]
    )
    return problems


_SHARES = (
    ("max_connections_per_address", "max_connections"),
    ("max_streams_per_user", "max_streams"),
)


def _positive(value: float) -> bool:
    return value >= 1 if isinstance(value, int) else value > 0 and math.isfinite(value)


class KeyedCounts:
    """How many of something each key (an address, a user) holds now.

    A key is forgotten when its count returns to zero, so the table holds at most one entry per
    thing held (it is bounded by the caps it enforces, not by the keys ever seen).
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def try_add(self, key: str, cap: int) -> bool:
        """Count one more for ``key`` unless it holds ``cap`` already."""
        if self[key] >= cap:
            return False
        self.add(key)
        return True

    def remove(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)
