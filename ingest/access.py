"""Who may do what on the operator port: the one place roles and units are checked.

Pure: the operator port (:mod:`ingest.http`) asks :func:`required_role` and the unit checks
below, with the values it read; nothing here does I/O.

Roles, each allowed what the one before it is:

* ``viewer`` reads: terminals, vehicles, fences, filings, alerts and their streams, positions,
  tracks, reports (and ``/metrics`` when it is not public);
* ``dispatcher`` also files and edits trip filings, sends commands to terminals, and writes
  notes on alerts (acknowledging them);
* ``admin`` also edits vehicles (with their exempt flag) and fences, and reads the audit trail.
  Accounts and tokens are managed with the ``jt808`` command on the database host.

A principal bound to a unit sees and edits only that unit's vehicles, filings, terminals and
alerts: lists are filtered, a write that touches another unit's vehicle is forbidden as a
whole (nothing is stored), and so is a command to another unit's terminal or a stream of
another unit's alerts.  Fences are geography every unit uses: read by all, edited only by an
admin bound to no unit (a fence may apply to every unit).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

VIEWER = "viewer"
DISPATCHER = "dispatcher"
ADMIN = "admin"
ROLES = (VIEWER, DISPATCHER, ADMIN)  # weakest first
_RANK = {role: rank for rank, role in enumerate(ROLES)}

# Routes as the table names them; a command's path carries the phone.
COMMANDS = "/terminals/{phone}/commands"
_COMMANDS_PATH = re.compile(r"/terminals/[^/]+/commands")
FILING = "/filings/{id}"
_FILING_PATH = re.compile(r"/filings/[0-9]+")
# The console's routes (ingest.console_api); an alert id is the engine's episode id, which may
# hold any character but "/" once percent-decoded.
TRACK = "/vehicles/{id}/track"
BINDINGS = "/vehicles/{id}/bindings"
ALERT = "/alerts/{id}"
ALERT_NOTES = "/alerts/{id}/notes"
CONSOLE = "/console/{path}"
_TEMPLATES = (
    (re.compile(r"/vehicles/[0-9]+/track"), TRACK),
    (re.compile(r"/vehicles/[0-9]+/bindings"), BINDINGS),
    (re.compile(r"/alerts/[^/]+/notes"), ALERT_NOTES),
    (re.compile(r"/console/.*"), CONSOLE),
)

# (method, route) -> the weakest role allowed.  HEAD is GET.  A route or method missing here
# is left to the port to answer (404, 405) once the caller is authenticated.
ROUTE_ROLES: Mapping[tuple[str, str], str] = {
    ("GET", "/metrics"): VIEWER,
    ("GET", "/terminals"): VIEWER,
    ("GET", "/vehicles"): VIEWER,
    ("GET", "/fences"): VIEWER,
    ("GET", "/filings"): VIEWER,
    ("GET", FILING): VIEWER,
    ("GET", "/alerts/stream"): VIEWER,
    ("GET", "/session"): VIEWER,
    ("GET", "/positions/latest"): VIEWER,
    ("GET", "/positions/stream"): VIEWER,
    ("GET", TRACK): VIEWER,
    ("GET", BINDINGS): VIEWER,
    ("GET", "/alerts"): VIEWER,
    ("GET", ALERT): VIEWER,
    ("GET", "/reports/violations"): VIEWER,
    ("POST", "/filings"): DISPATCHER,
    ("POST", COMMANDS): DISPATCHER,
    ("POST", ALERT_NOTES): DISPATCHER,
    ("POST", "/vehicles"): ADMIN,
    ("POST", "/fences"): ADMIN,
    ("GET", "/audit"): ADMIN,
}
# Answered without a token.  /metrics is added when the configuration makes it public.  The
# console's page holds no data (it asks the API for it), and logging in and out need none.
PUBLIC_ROUTES = frozenset({"/healthz", "/", "/console", CONSOLE})
PUBLIC_METHOD_ROUTES = frozenset({("POST", "/session"), ("DELETE", "/session")})
# The console's session: the cookie carrying the token (ingest.console_api sets it), and the
# header a write authenticated by it must carry.  A cross-site form cannot set a header, and a
# cross-site script may only with a CORS preflight this port never answers: with SameSite on
# the cookie, two defences against request forgery.
SESSION_COOKIE = "jt808_session"
CONSOLE_HEADER = b"x-jt808-console"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated operator: account name, role, and the unit it is bound to (None:
    every unit)."""

    name: str
    role: str
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.role not in _RANK:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")

    def at_least(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Actor:
    """Who makes a write, for the audit trail: an account name and where the request came from
    (the client's address, or ``cli``)."""

    name: str
    source: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One row of the audit trail that the port appends itself (master-data changes are
    recorded by the database as they are stored)."""

    actor: Actor
    action: str
    kind: str
    key: str | None
    unit: str | None = None
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


def route_of(path: str) -> str:
    """The route a request path belongs to (a path with an id names its template)."""
    if _COMMANDS_PATH.fullmatch(path):
        return COMMANDS
    if _FILING_PATH.fullmatch(path):
        return FILING
    for pattern, template in _TEMPLATES:
        if pattern.fullmatch(path):
            return template
    if path.startswith("/alerts/") and path != "/alerts/stream" and "/" not in path[8:]:
        return ALERT
    return path


def is_public(route: str, *, metrics_public: bool, method: str = "GET") -> bool:
    return (
        route in PUBLIC_ROUTES
        or ("GET" if method == "HEAD" else method, route) in PUBLIC_METHOD_ROUTES
        or (metrics_public and route == "/metrics")
    )


def required_role(method: str, route: str) -> str | None:
    """The weakest role allowed ``method`` on ``route``; None when the table does not name it
    (any authenticated principal then gets the port's 404 or 405)."""
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, route))


def allowed(principal: Principal, method: str, route: str) -> bool:
    role = required_role(method, route)
    return role is None or principal.at_least(role)


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (None: absent or another
    scheme; an empty token is None too)."""
    if header is None:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def session_token(header: bytes | None) -> str | None:
    """The token of the console's session cookie in a ``Cookie`` header (None: absent)."""
    if header is None:
        return None
    for part in header.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value.strip():
            return value.strip()
    return None


def forgery_problem(method: str, *, by_cookie: bool, console_header: bytes | None) -> str | None:
    """Why a request authenticated by the session cookie may be a cross-site forgery (None:
    it is not): a state-changing one must carry ``X-JT808-Console: 1``, which a page of
    another site cannot send.  A bearer token is never sent by a browser on its own."""
    if not by_cookie or method in ("GET", "HEAD"):
        return None
    if console_header is not None and console_header.strip() == b"1":
        return None
    return f"a {method} with the session cookie needs the header X-JT808-Console: 1"


# ---------------------------------------------------------------------------------------------
# Units


def sees_unit(principal: Principal, unit: object) -> bool:
    return principal.unit is None or unit == principal.unit


def visible(principal: Principal, items: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The items (each with a ``unit``) of the principal's unit."""
    return [item for item in items if sees_unit(principal, item.get("unit"))]


def visible_by_plate(
    principal: Principal, items: Iterable[Mapping[str, Any]], units: Mapping[str, str]
) -> list[Any]:
    """The items (each with a ``plate``) whose vehicle is of the principal's unit (``units``:
    plate -> unit)."""
    return [item for item in items if sees_unit(principal, units.get(item.get("plate", "")))]


def _canonical_phone(phone: object) -> str:
    return str(phone).lstrip("0") if phone is not None else ""


def phones_of_unit(principal: Principal, vehicles: Iterable[Mapping[str, Any]]) -> set[str]:
    """The terminal phones (without leading zeros) fitted to the principal's unit's
    vehicles."""
    return {
        _canonical_phone(v.get("phone"))
        for v in vehicles
        if v.get("phone") and sees_unit(principal, v.get("unit"))
    }


def may_command(
    principal: Principal, phone: str, vehicles: Iterable[Mapping[str, Any]] | None
) -> bool:
    """Whether the principal may command the terminal ``phone``: a principal bound to a unit
    only its unit's terminals (unknown without ``vehicles``: refused)."""
    if principal.unit is None:
        return True
    if vehicles is None:
        return False
    return _canonical_phone(phone) in phones_of_unit(principal, vehicles)


def vehicle_write_problems(
    principal: Principal, items: Iterable[Any], units: Mapping[str, str]
) -> list[str]:
    """Why the principal may not write these vehicles (``units``: plate -> unit as stored):
    a principal bound to a unit writes only vehicles of its unit, and cannot take one from
    another unit."""
    if principal.unit is None:
        return []
    problems = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue  # the port's checks refuse it
        plate = item.get("plate")
        if item.get("unit") != principal.unit:
            problems.append(f"vehicle {i}: unit {item.get('unit')!r} is not {principal.unit!r}")
        elif isinstance(plate, str) and plate in units and units[plate] != principal.unit:
            problems.append(f"vehicle {i}: {plate} belongs to another unit")
    return problems


def filing_write_problems(
    principal: Principal, items: Iterable[Any], units: Mapping[str, str]
) -> list[str]:
    """Why the principal may not write these filings (``units``: plate -> unit as stored): a
    principal bound to a unit files only for its unit's vehicles."""
    if principal.unit is None:
        return []
    return [
        f"filing {i}: {item.get('plate')!r} is not a vehicle of {principal.unit!r}"
        for i, item in enumerate(items)
        if isinstance(item, Mapping) and units.get(item.get("plate", "")) != principal.unit
    ]


def fence_write_problems(principal: Principal) -> list[str]:
    if principal.unit is None:
        return []
    return ["fences apply across units: only an admin bound to no unit edits them"]


def alert_unit(principal: Principal, requested: str | None) -> str | None:
    """The unit an alert stream is limited to; ValueError when the principal may not see the
    unit asked for."""
    if principal.unit is None:
        return requested
    if requested is not None and requested != principal.unit:
        raise ValueError(f"unit {requested[:60]!r} is not {principal.unit!r}")
    return principal.unit
