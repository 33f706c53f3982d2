"""Master data of the rule engine: vehicles, fences and trip filings, as plain rows.

``storage`` knows nothing of the engine's classes; the wiring turns the rows loaded here into
``alerts.Vehicle``/``alerts.Filing``/``geofence.Fence`` and fence objects into the rows stored
here.  CSV parsing of vehicles and filings is here too (it is only text to rows); GeoJSON fences
are parsed by ``geofence.geojson`` in the wiring.

Imports are all-or-nothing: every problem of a file is collected and raised together as one
:class:`MasterDataError` (nothing is written), naming the CSV line or the record.

Changes take effect without a restart: any change to the three tables bumps
``masterdata_state.version`` (a trigger, migration 5) and NOTIFYs ``jt808_masterdata``; an
engine polls :func:`masterdata_version` (one row) or :func:`changed_since` and reloads.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from protocol.phone import canonical_phone
from storage.errors import StorageError, database_errors

__all__ = [
    "CATEGORIES",
    "FENCE_COLUMNS",
    "FILING_STATES",
    "MASTERDATA_CHANNEL",
    "MasterDataError",
    "changed_since",
    "connect",
    "filing_rows_from_csv",
    "load_fence_rows",
    "load_filing_rows",
    "load_registry_rows",
    "masterdata_version",
    "upsert_fences",
    "upsert_filings",
    "upsert_vehicles",
    "vehicle_rows_from_csv",
]

MASTERDATA_CHANNEL = "jt808_masterdata"

# Article 5: retained unit vehicles, platform vehicles, rental vehicles.
CATEGORIES = ("retained", "platform", "rental")
FILING_STATES = ("pending", "approved", "rejected", "cancelled")
FENCE_KINDS = ("permitted", "forbidden", "parking", "destination")
FENCE_SHAPES = ("circle", "rectangle", "polygon")

# One master-data request waits this long for its connection: an unreachable database is
# answered (DatabaseUnavailableError) within an operator's patience instead of after the TCP
# connect timeout (minutes when packets are dropped).
CONNECT_TIMEOUT_S = 5

# Filing times without an offset are China time (GMT+8), as the terminals and dispatchers use.
CHINA = timezone(timedelta(hours=8))

# Terminal phone numbers: 12 BCD digits (2011/2013) or 20 (2019), JT/T 808-2019 table 2.
_PHONE_RE = re.compile(r"^[0-9]{1,20}$")
# Positions are given their vehicle under this advisory lock (class, object): the position
# writer takes it shared for each batch, a change of terminal bindings exclusively when it
# commits (storage.bindings; storage.schema, migration 11, which spells the key out again).
LINK_LOCK = "80808, hashtext('jt808 link ' || current_schema())"
_TRUE = frozenset({"1", "true", "yes", "y", "t"})
_FALSE = frozenset({"", "0", "false", "no", "n", "f"})

VEHICLE_COLUMNS = ("plate", "phone", "unit", "category", "exempt", "max_speed_kmh")
_VEHICLE_REQUIRED = ("plate", "phone", "unit", "category", "exempt")
FILING_COLUMNS = (
    "plate",
    "start",
    "end",
    "destination",
    "purpose",
    "passengers",
    "approver",
    "filed_at",
    "state",
    "id",  # optional: the filing a row corrects (a new version of it)
)
_FILING_REQUIRED = FILING_COLUMNS[:7]
FENCE_COLUMNS = (
    "id",
    "name",
    "kind",
    "shape",
    "geometry",
    "radius_m",
    "unit",
    "daily_start",
    "daily_end",
    "period_start",
    "period_end",
    "max_speed_kmh",
    "overspeed_duration_s",
    "night_max_speed_kmh",
    "area_id",
)


class MasterDataError(StorageError):
    """Master data that cannot be imported; ``problems`` lists each, naming line or record."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:10])
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        super().__init__(f"{len(self.problems)} problem(s): {shown}{more}")


# ---------------------------------------------------------------------------------------------
# CSV -> rows (pure)


class _RowError(Exception):
    pass


def _read_csv(
    text: str, columns: Sequence[str], required: Sequence[str], problems: list[str]
) -> list[tuple[int, dict[str, str]]]:
    """The non-empty rows with their line numbers; a header problem is raised at once, a line
    with too many fields is added to ``problems`` (the caller's, with its own rows')."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))  # Excel writes a BOM
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise MasterDataError(["the file is empty (no header line)"])
    header_problems = []
    missing = [c for c in required if c not in header]
    if missing:
        header_problems.append(f"line 1: missing columns {missing}")
    unknown = [c for c in header if c not in columns]
    if unknown:
        header_problems.append(f"line 1: unknown columns {unknown} (known: {', '.join(columns)})")
    if header_problems:
        raise MasterDataError(header_problems)
    rows = []
    for raw in reader:
        if None in raw:  # every such line is named, with the other lines' problems
            problems.append(f"line {reader.line_num}: more fields than the header")
            continue
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if any(row.values()):
            rows.append((reader.line_num, row))
    return rows


def _by_line(problem: str) -> int:
    """The line number a CSV problem (``line N: ...``) names, for listing them in order."""
    number = problem.removeprefix("line ").partition(":")[0]
    return int(number) if number.isdigit() else 0


def _bool(text: str, what: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _RowError(f"{what} must be true or false, got {text!r}")


def _positive(text: str, what: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _RowError(f"{what} must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise _RowError(f"{what} must be positive, got {text!r}")
    return value


def parse_time(text: str, what: str = "time") -> datetime:
    """ISO 8601; China time when it has no offset."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _RowError(f"{what} must be an ISO 8601 time, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=CHINA)


def vehicle_rows_from_csv(text: str) -> list[dict[str, Any]]:
    """Vehicle rows from CSV (columns ``plate,phone,unit,category,exempt[,max_speed_kmh]``).

    ``phone`` may be empty (no terminal fitted yet); ``exempt`` is true/false, 1/0 or yes/no.
    """
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    plates: dict[str, int] = {}
    phones: dict[str, int] = {}
    for line, row in _read_csv(text, VEHICLE_COLUMNS, _VEHICLE_REQUIRED, problems):
        try:
            vehicle = _vehicle(row)
            if vehicle["plate"] in plates:
                raise _RowError(f"plate already on line {plates[vehicle['plate']]}")  # noqa: TRY301
            phone = vehicle["phone"]
            if phone is not None and phone in phones:
                raise _RowError(f"phone {phone} already on line {phones[phone]}")  # noqa: TRY301
        except _RowError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        out.append(vehicle)
        plates[vehicle["plate"]] = line
        if phone is not None:
            phones[phone] = line
    if problems:
        raise MasterDataError(sorted(problems, key=_by_line))
    return out


def _vehicle(row: Mapping[str, str]) -> dict[str, Any]:
    plate = row["plate"]
    if not plate:
        raise _RowError("plate is empty")
    phone = row["phone"] or None
    if phone is not None:
        # Decimal digits only, as people write a number (hex digits are a device's quirk).
        if not _PHONE_RE.match(phone):
            raise _RowError(f"phone must be up to 20 digits, got {phone!r}")
        phone = canonical_phone(phone)  # 13800138000 and 00000000013800138000: one terminal
    if not row["unit"]:
        raise _RowError("unit is empty")
    category = row["category"].lower()
    if category not in CATEGORIES:
        raise _RowError(f"category must be one of {', '.join(CATEGORIES)}, got {row['category']!r}")
    return {
        "plate": plate,
        "phone": phone,
        "unit": row["unit"],
        "category": category,
        "exempt": _bool(row["exempt"], "exempt"),
        "max_speed_kmh": _positive(row.get("max_speed_kmh", ""), "max_speed_kmh"),
    }


def filing_rows_from_csv(
    text: str,
    *,
    now: datetime,
    plates: Collection[str] | None = None,
    fences: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Filing rows from CSV (``plate,start,end,destination,purpose,passengers,approver``, and
    optionally ``filed_at`` (default ``now``) and ``state`` (default approved)).

    ``destination`` names a fence or is empty; plates and fence names are resolved by
    :func:`upsert_filings`.  Given the known ``plates`` and (active) ``fences``, an unknown
    one is a problem here already, so one error lists every problem of the file.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    for line, row in _read_csv(text, FILING_COLUMNS, _FILING_REQUIRED, problems):
        unknown = []
        if plates is not None and row["plate"] and row["plate"] not in plates:
            unknown.append(f"unknown vehicle plate {row['plate']!r}")
        destination = row["destination"]
        if fences is not None and destination and destination not in fences:
            unknown.append(f"unknown fence {destination!r} as destination")
        try:
            filing = _filing(row, now)
        except _RowError as exc:
            unknown.insert(0, str(exc))
        if unknown:
            problems.append(f"line {line}: {'; '.join(unknown)}")
            continue
        out.append({"line": line, **filing})
    if problems:
        raise MasterDataError(sorted(problems, key=_by_line))
    return out


def _filing(row: Mapping[str, str], now: datetime) -> dict[str, Any]:
    # Every problem of the row (joined in one _RowError), so one round of corrections fixes it.
    problems: list[str] = []
    if not row["plate"]:
        problems.append("plate is empty")
    times: dict[str, datetime] = {}
    for key in ("start", "end", "filed_at"):
        if row.get(key, "") or key != "filed_at":
            try:
                times[key] = parse_time(row[key], key)
            except _RowError as exc:
                problems.append(str(exc))
    if "start" in times and "end" in times and times["end"] <= times["start"]:
        problems.append(f"end {row['end']} is not after start {row['start']}")
    filed = row.get("filed_at", "")
    number = row.get("id", "")
    if number and not number.isdigit():
        problems.append(f"id must be the number of the filing to correct, got {number!r}")
    state = row.get("state", "").lower() or "approved"
    if state not in FILING_STATES:
        problems.append(f"state must be one of {', '.join(FILING_STATES)}, got {row['state']!r}")
    if problems:
        raise _RowError("; ".join(problems))
    start, end = times["start"], times["end"]
    return {
        "plate": row["plate"],
        "start": start,
        "end": end,
        "destination": row["destination"] or None,
        "purpose": row["purpose"],
        "passengers": row["passengers"],
        "approver": row["approver"],
        "filed_at": parse_time(filed, "filed_at") if filed else now,
        # what the client claims; the platform's receipt time is what counts (migration 13)
        "claimed_filed_at": parse_time(filed, "filed_at") if filed else None,
        "id": int(number) if number else None,
        "state": state,
    }


# ---------------------------------------------------------------------------------------------
# Connections for requests


@contextlib.contextmanager
def connect(
    dsn: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S
) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for one request (the operator port's), closed afterwards.

    Errors are typed for the caller: :class:`~storage.errors.DatabaseUnavailableError` when
    the database cannot answer (while connecting or at any statement), and
    :class:`MasterDataError` when it refuses a value the row checks let through -- text it
    cannot hold (NUL, an unpaired surrogate), a number out of a column's range, an index entry
    too long, a constraint (a phone another request fitted to another plate meanwhile).  A
    write refused either way stored nothing (each write is one transaction).
    """
    try:
        with (
            database_errors(),
            psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout_s) as conn,
        ):
            yield conn
    except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded) as exc:
        message = exc.diag.message_primary or str(exc).splitlines()[0]
        raise MasterDataError([f"the database refused a value: {message}"]) from exc
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800") cannot be UTF-8
        raise MasterDataError([f"the database refused a value: {exc}"]) from exc


# ---------------------------------------------------------------------------------------------
# Writing


def upsert_vehicles(
    conn: psycopg.Connection[Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    exempt_needs_reason: bool = False,
) -> int:
    """Insert or update vehicles by plate in one transaction; returns the number of rows.

    A row's ``reason`` (optional) goes to its audit row.  With ``exempt_needs_reason`` (the
    operator port) a row that changes a vehicle's exempt flag, or adds a vehicle exempt, must
    carry one: the flag silences every rule for the vehicle (article 7).

    A phone already fitted to another plate is a problem (one terminal, one vehicle).  A
    changed phone changes the terminal bindings (storage.schema, migration 11: a trigger): the
    old binding closes now, the new one opens now, or from the beginning of time for a phone
    never bound (what it sent before its vehicle was imported is that vehicle's); when the
    transaction commits, stored positions are given the vehicle of their device time.
    """
    problems: list[str] = []
    reason = ""  # as jt808.reason is set now (unset reads as empty)
    with conn.transaction():
        for row in rows:
            clash = conn.execute(
                "SELECT plate FROM vehicles WHERE phone = %s AND plate <> %s",
                (row.get("phone"), row["plate"]),
            ).fetchone()
            if clash is not None:
                problems.append(
                    f"vehicle {row['plate']}: phone {row['phone']} is fitted to {clash[0]}"
                )
                continue
            if exempt_needs_reason and not row.get("reason"):
                stored = conn.execute(
                    "SELECT exempt FROM vehicles WHERE plate = %s FOR UPDATE", (row["plate"],)
                ).fetchone()
                if (False if stored is None else bool(stored[0])) != bool(row["exempt"]):
                    problems.append(
                        f"vehicle {row['plate']}: changing exempt needs a reason "
                        '(add "reason": "..." to the item)'
                    )
                    continue
            if (row.get("reason") or "") != reason:  # transaction-local: this row's audit row
                reason = row.get("reason") or ""
                conn.execute("SELECT set_config('jt808.reason', %s, true)", (reason,))
            conn.execute(
                "INSERT INTO vehicles (plate, phone, unit, category, exempt, max_speed_kmh) "
                "VALUES (%(plate)s, %(phone)s, %(unit)s, %(category)s, %(exempt)s, "
                "%(max_speed_kmh)s) ON CONFLICT (plate) DO UPDATE SET phone = EXCLUDED.phone, "
                "unit = EXCLUDED.unit, category = EXCLUDED.category, exempt = EXCLUDED.exempt, "
                "max_speed_kmh = EXCLUDED.max_speed_kmh, updated_at = now()",
                {"max_speed_kmh": None, **row},
            )
        if problems:
            raise MasterDataError(problems)
    return len(rows)


def vehicle_bindings(conn: psycopg.Connection[Any], plate: str) -> list[dict[str, Any]] | None:
    """The terminals the vehicle ``plate`` was fitted with, oldest first (``phone,
    valid_from, valid_to``; None bounds: open); None when there is no such vehicle."""
    vehicle = conn.execute("SELECT id FROM vehicles WHERE plate = %s", (plate,)).fetchone()
    if vehicle is None:
        return None
    rows = conn.execute(
        "SELECT phone, nullif(valid_from, '-infinity'), valid_to FROM terminal_bindings "
        "WHERE vehicle_id = %s ORDER BY valid_from",
        (vehicle[0],),
    ).fetchall()
    return [{"phone": p, "valid_from": f, "valid_to": t} for p, f, t in rows]


def upsert_fences(
    conn: psycopg.Connection[Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    replace: bool = False,
) -> list[int]:
    """Insert or update fences; returns their ids, in order.

    A row with an ``id`` is stored under that id (its name may change); a row whose ``id`` is
    None is matched by ``name`` and otherwise gets a new id.  ``replace`` deactivates every
    active fence not in ``rows`` (a fence set replaced by a new file).  Keys: see
    :data:`FENCE_COLUMNS`; ``geometry`` is a GeoJSON geometry object.
    """
    ids: dict[int, int] = {}
    with conn.transaction():
        # Rows with an id first, then move the identity above them, then the rows without.
        explicit = [i for i, row in enumerate(rows) if row.get("id") is not None]
        implicit = [i for i, row in enumerate(rows) if row.get("id") is None]
        for i in explicit:
            ids[i] = _upsert_fence(conn, rows[i])
        if explicit:
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('fences', 'id'), "
                "(SELECT max(id) FROM fences))"
            )
        for i in implicit:
            ids[i] = _upsert_fence(conn, rows[i])
        if replace:
            conn.execute(
                "UPDATE fences SET active = false, updated_at = now() "
                "WHERE active AND NOT (id = ANY(%s))",
                (list(ids.values()),),
            )
    return [ids[i] for i in range(len(rows))]


def _upsert_fence(conn: psycopg.Connection[Any], row: Mapping[str, Any]) -> int:
    columns = [c for c in FENCE_COLUMNS if c != "id"]
    names = ", ".join(columns)
    values = ", ".join(f"%({c})s" for c in columns)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)
    params = {c: row.get(c) for c in FENCE_COLUMNS}
    params["geometry"] = Jsonb(row["geometry"])
    if row.get("id") is None:
        query = (
            f"INSERT INTO fences ({names}) VALUES ({values}) "  # noqa: S608 - constants
            f"ON CONFLICT (name) DO UPDATE SET {updates}, active = true, "
            "updated_at = now() RETURNING id"
        )
    else:
        clash = conn.execute(
            "SELECT id FROM fences WHERE name = %s AND id <> %s", (row["name"], row["id"])
        ).fetchone()
        if clash is not None:
            raise MasterDataError(
                [f"fence {row['name']!r} (id {row['id']}): name used by fence {clash[0]}"]
            )
        query = (
            f"INSERT INTO fences (id, {names}) VALUES (%(id)s, {values}) "  # noqa: S608
            f"ON CONFLICT (id) DO UPDATE SET {updates}, active = true, "
            "updated_at = now() RETURNING id"
        )
    try:
        with conn.transaction():
            found = conn.execute(query, params).fetchone()
    except psycopg.errors.IntegrityError as exc:
        raise MasterDataError([f"fence {row['name']!r}: {exc.diag.message_primary}"]) from exc
    if found is None:  # pragma: no cover - RETURNING always yields the row
        raise StorageError("fence was not stored")
    return int(found[0])


# A historical import (``historical=True``) takes only filings whose window ended at least this
# long ago: it is for loading the records of a platform this one replaces, never a way around
# the receipt time of current filings (article 21's 3 working days fit well inside it).
HISTORICAL_MIN_AGE = timedelta(days=30)


def upsert_filings(
    conn: psycopg.Connection[Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    historical: bool = False,
) -> list[int]:
    """Insert or update filings; returns their ids.

    Rows are :func:`filing_rows_from_csv`'s: ``plate`` is resolved to the vehicle and
    ``destination`` (a fence name or None) to an active fence.  A row with an ``id`` corrects
    that filing (its window may change); otherwise filings are matched by vehicle and window.

    The platform stamps when a filing arrives (migration 13): the rules count it from its
    receipt by the database's clock, and a time the row claims (``claimed_filed_at``) is only
    kept beside it.  Each change of content is a new version, received when it arrives; the
    same content again changes nothing, so re-importing a file is harmless.  With
    ``historical`` (migrating a former platform's records) the file's ``filed_at`` is what
    counts instead; only windows that ended at least :data:`HISTORICAL_MIN_AGE` ago are taken.
    """
    problems: list[str] = []
    ids: list[int] = []
    latest_end: datetime | None = None  # of a historical filing
    with conn.transaction():
        if historical:
            conn.execute("SELECT set_config('jt808.historical', 'on', true)")
            found = conn.execute("SELECT now() - %s", (HISTORICAL_MIN_AGE,)).fetchone()
            assert found is not None
            latest_end = found[0]
        vehicles = dict(conn.execute("SELECT plate, id FROM vehicles").fetchall())
        fences = dict(conn.execute("SELECT name, id FROM fences WHERE active").fetchall())
        for i, row in enumerate(rows):
            where = f"line {row['line']}" if "line" in row else f"filing {i}"
            vehicle = vehicles.get(row["plate"])
            if vehicle is None:
                problems.append(f"{where}: unknown vehicle plate {row['plate']!r}")
            destination = row.get("destination")
            fence = None if destination is None else fences.get(destination)
            if destination is not None and fence is None:
                problems.append(f"{where}: unknown fence {destination!r} as destination")
            if latest_end is not None and row["end"] > latest_end:
                problems.append(
                    f"{where}: a historical import takes filings whose window ended "
                    f"{HISTORICAL_MIN_AGE.days} days ago or more; this one ends {row['end']}"
                )
            if historical and row.get("claimed_filed_at") is None:
                problems.append(f"{where}: a historical import needs the filing's filed_at")
            if problems:
                continue
            values = {
                "vehicle": vehicle,
                "start": row["start"],
                "end": row["end"],
                "fence": fence,
                "purpose": row.get("purpose", ""),
                "passengers": row.get("passengers", ""),
                "approver": row.get("approver", ""),
                "claimed": row.get("claimed_filed_at"),
                # Counts only for a historical import (the trigger stamps the receipt otherwise).
                "filed": row.get("claimed_filed_at") or row.get("filed_at") or datetime.now(UTC),
                "state": row.get("state", "approved"),
                "id": row.get("id"),
            }
            found = conn.execute(
                _CORRECT_FILING if values["id"] is not None else _UPSERT_FILING, values
            ).fetchone()
            if found is None:
                problems.append(f"{where}: no filing {values['id']} to correct")
                continue
            ids.append(int(found[0]))
        if problems:
            raise MasterDataError(problems)
    return ids


_UPSERT_FILING = (
    "INSERT INTO filings (vehicle_id, starts_at, ends_at, destination_fence, purpose, "
    "passengers, approver, filed_at, claimed_filed_at, state) VALUES (%(vehicle)s, %(start)s, "
    "%(end)s, %(fence)s, %(purpose)s, %(passengers)s, %(approver)s, %(filed)s, %(claimed)s, "
    "%(state)s) ON CONFLICT (vehicle_id, starts_at, ends_at) DO UPDATE SET "
    "destination_fence = EXCLUDED.destination_fence, purpose = EXCLUDED.purpose, "
    "passengers = EXCLUDED.passengers, approver = EXCLUDED.approver, "
    "claimed_filed_at = EXCLUDED.claimed_filed_at, state = EXCLUDED.state, updated_at = now() "
    "RETURNING id"
)
_CORRECT_FILING = (
    "UPDATE filings SET vehicle_id = %(vehicle)s, starts_at = %(start)s, ends_at = %(end)s, "
    "destination_fence = %(fence)s, purpose = %(purpose)s, passengers = %(passengers)s, "
    "approver = %(approver)s, claimed_filed_at = %(claimed)s, state = %(state)s, "
    "updated_at = now() WHERE id = %(id)s RETURNING id"
)


# ---------------------------------------------------------------------------------------------
# Reading


def load_registry_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every vehicle: ``id, plate, phone, unit, category, exempt, max_speed_kmh``, by id.

    ``phone`` is None for a vehicle without a terminal (the engine cannot track it).
    """
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, plate, phone, unit, category, exempt, max_speed_kmh "
            "FROM vehicles ORDER BY id"
        ).fetchall()


def load_fence_rows(
    conn: psycopg.Connection[Any], *, include_inactive: bool = False
) -> list[dict[str, Any]]:
    """Active fences (or all), with the keys of :data:`FENCE_COLUMNS` plus ``active``, by id.

    ``daily_start``/``daily_end`` are ``datetime.time``, ``period_*`` aware datetimes.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {', '.join(FENCE_COLUMNS)}, active FROM fences "  # noqa: S608 - constants
            "WHERE %s OR active ORDER BY id",
            (include_inactive,),
        ).fetchall()


def load_filing_rows(
    conn: psycopg.Connection[Any],
    since: datetime | None = None,
    *,
    states: Sequence[str] = ("approved",),
) -> list[dict[str, Any]]:
    """Filings in ``states`` that end at or after ``since`` (None: all), by id.

    Keys: ``id, vehicle_id, plate, start, end, destination_fence, destination, purpose,
    passengers, approver, filed_at, state, received_at, claimed_filed_at, version,
    historical``.  Only approved filings count for the rules.
    """
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            'SELECT f.id, f.vehicle_id, v.plate, f.starts_at AS start, f.ends_at AS "end", '
            "f.destination_fence, d.name AS destination, f.purpose, f.passengers, f.approver, "
            "f.filed_at, f.state, f.received_at, f.claimed_filed_at, f.version, f.historical "
            "FROM filings f JOIN vehicles v ON v.id = f.vehicle_id "
            "LEFT JOIN fences d ON d.id = f.destination_fence "
            "WHERE f.state = ANY(%s) AND (%s::timestamptz IS NULL OR f.ends_at >= %s) "
            "ORDER BY f.id",
            (list(states), since, since),
        ).fetchall()


def load_filing_versions(
    conn: psycopg.Connection[Any], since: datetime | None = None
) -> list[dict[str, Any]]:
    """The approved versions of the filings any version of which ends at or after ``since``
    (None: all), by filing and version: what the rules judge by (migration 13).

    Keys: ``id`` (the filing), ``version, vehicle_id, start, end, destination_fence, purpose,
    passengers, approver, filed_at`` (what the rules count the version from),
    ``claimed_filed_at``, ``superseded_at`` (the next version's ``filed_at``; None: in force).
    """
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_FILING_VERSIONS, {"since": since}).fetchall()


_FILING_VERSIONS = """
SELECT filing_id AS id, version, vehicle_id, starts_at AS start, ends_at AS "end",
       destination_fence, purpose, passengers, approver, filed_at, claimed_filed_at,
       superseded_at
FROM (
    SELECT *, lead(filed_at) OVER (PARTITION BY filing_id ORDER BY version) AS superseded_at
    FROM filing_versions
    WHERE %(since)s::timestamptz IS NULL OR filing_id IN (
        SELECT filing_id FROM filing_versions WHERE ends_at >= %(since)s::timestamptz
    )
) v
WHERE state = 'approved'
ORDER BY filing_id, version
"""


def filing_history(
    conn: psycopg.Connection[Any], *, plate: str | None = None, filing: int | None = None
) -> list[dict[str, Any]] | None:
    """Every version of the filings of vehicle ``plate`` (or of filing ``filing``), oldest
    first: ``filing, version, received_at, filed_at, claimed_filed_at, historical, plate,
    start, end, destination, purpose, passengers, approver, state``.  None when there is no
    such vehicle or filing."""
    if plate is not None:
        if conn.execute("SELECT 1 FROM vehicles WHERE plate = %s", (plate,)).fetchone() is None:
            return None
    elif conn.execute("SELECT 1 FROM filings WHERE id = %s", (filing,)).fetchone() is None:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT f.filing_id AS filing, f.version, f.received_at, f.filed_at, "
            'f.claimed_filed_at, f.historical, v.plate, f.starts_at AS start, f.ends_at AS "end", '
            "d.name AS destination, f.purpose, f.passengers, f.approver, f.state "
            "FROM filing_versions f JOIN vehicles v ON v.id = f.vehicle_id "
            "LEFT JOIN fences d ON d.id = f.destination_fence "
            "WHERE (%(plate)s::text IS NULL OR v.plate = %(plate)s::text) "
            "AND (%(filing)s::bigint IS NULL OR f.filing_id = %(filing)s::bigint) "
            "ORDER BY f.filing_id, f.version",
            {"plate": plate, "filing": filing},
        ).fetchall()


def masterdata_version(conn: psycopg.Connection[Any]) -> int:
    """The change counter of vehicles, fences and filings (grows with every change)."""
    row = conn.execute("SELECT version FROM masterdata_state").fetchone()
    if row is None:
        raise StorageError("masterdata_state is empty: is the schema migrated?")
    return int(row[0])


def changed_since(conn: psycopg.Connection[Any], version: int) -> bool:
    """Whether master data changed after ``version`` (from :func:`masterdata_version`)."""
    return masterdata_version(conn) > version


# ---------------------------------------------------------------------------------------------
# JSON -> rows (pure): the dispatch system's POSTs, with the CSV rows' checks


def _text_fields(item: object, columns: Sequence[str], required: Sequence[str]) -> dict[str, str]:
    """A JSON object as the CSV reader's text row (null -> empty, true/false, numbers as text);
    _RowError naming every key problem."""
    if not isinstance(item, Mapping):
        raise _RowError(f"expected a JSON object, got {type(item).__name__}")
    problems = []
    missing = [c for c in required if c not in item]
    if missing:
        problems.append(f"missing keys {missing}")
    unknown = sorted(str(k) for k in item if k not in columns)
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {', '.join(columns)})")
    row: dict[str, str] = {}
    for key in columns:
        value = item.get(key)
        if value is None:
            row[key] = ""
        elif isinstance(value, bool):
            row[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            row[key] = str(value).strip()
        else:
            problems.append(f"{key} must be text, a number or null, got {type(value).__name__}")
    if problems:
        raise _RowError("; ".join(problems))
    return row


def _json_items(items: object, what: str) -> list[object]:
    if isinstance(items, Mapping):
        return [items]
    if not isinstance(items, list):
        raise MasterDataError([f"expected a JSON list of {what} objects"])
    if not items:
        raise MasterDataError([f"no {what} given"])
    return items


def vehicle_rows_from_json(items: object) -> list[dict[str, Any]]:
    """Vehicle rows from decoded JSON: one object or a list with the keys of the CSV columns
    (``plate, phone, unit, category, exempt``, optional ``max_speed_kmh``); ``phone`` may be
    null, ``exempt`` a JSON boolean.  Every problem is collected into one
    :class:`MasterDataError`, naming the item by its index (``vehicle 0``)."""
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    plates: dict[str, int] = {}
    phones: dict[str, int] = {}
    for i, item in enumerate(_json_items(items, "vehicle")):
        try:
            fields, reason = _reason_of(item)
            vehicle = _vehicle(_text_fields(fields, VEHICLE_COLUMNS, _VEHICLE_REQUIRED))
            if reason is not None:
                vehicle["reason"] = reason
            if vehicle["plate"] in plates:
                raise _RowError(f"plate already in vehicle {plates[vehicle['plate']]}")  # noqa: TRY301
            phone = vehicle["phone"]
            if phone is not None and phone in phones:
                raise _RowError(f"phone {phone} already in vehicle {phones[phone]}")  # noqa: TRY301
        except _RowError as exc:
            problems.append(f"vehicle {i}: {exc}")
            continue
        out.append(vehicle)
        plates[vehicle["plate"]] = i
        if phone is not None:
            phones[phone] = i
    if problems:
        raise MasterDataError(problems)
    return out


# The longest reason for a change the audit trail keeps: a sentence or two, an order number.
MAX_REASON_CHARS = 500


def _reason_of(item: object) -> tuple[object, str | None]:
    """The item without its optional ``reason`` (why the change is made, for the audit
    trail), and the reason; _RowError for one that is not text of 1 to
    :data:`MAX_REASON_CHARS` characters."""
    if not isinstance(item, Mapping) or "reason" not in item:
        return item, None
    reason = item["reason"]
    if reason is None:
        return {k: v for k, v in item.items() if k != "reason"}, None
    if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= MAX_REASON_CHARS:
        raise _RowError(f"reason must be text of 1 to {MAX_REASON_CHARS} characters")
    return {k: v for k, v in item.items() if k != "reason"}, reason.strip()


# A JSON filing may leave out its destination (null: no particular area).
_FILING_REQUIRED_JSON = tuple(c for c in _FILING_REQUIRED if c != "destination")


def filing_rows_from_json(
    items: object,
    *,
    now: datetime,
    plates: Collection[str] | None = None,
    fences: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Filing rows from decoded JSON: one object or a list with the keys of the CSV columns
    (``plate, start, end, destination, purpose, passengers, approver``, optional ``filed_at``
    (default ``now``), ``state`` (default approved) and ``id``); ``destination`` is a fence
    name or null.  Problems are collected as for :func:`vehicle_rows_from_json` (``filing 0``);
    given the known ``plates`` and (active) ``fences``, unknown ones are among them."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(_json_items(items, "filing")):
        try:
            fields = _text_fields(item, FILING_COLUMNS, _FILING_REQUIRED_JSON)
        except _RowError as exc:
            problems.append(f"filing {i}: {'; '.join([str(exc), *_value_problems(item, now)])}")
            continue
        before = len(problems)
        if plates is not None and fields["plate"] and fields["plate"] not in plates:
            problems.append(f"filing {i}: unknown vehicle plate {fields['plate']!r}")
        destination = fields["destination"]
        if fences is not None and destination and destination not in fences:
            problems.append(f"filing {i}: unknown fence {destination!r} as destination")
        if len(problems) > before:
            continue
        try:
            out.append(_filing(fields, now))
        except _RowError as exc:
            problems.append(f"filing {i}: {exc}")
    if problems:
        raise MasterDataError(problems)
    return out


def _value_problems(item: object, now: datetime) -> list[str]:
    """After key problems (unknown keys, a value of the wrong type) the problems of the values
    that are there, so one answer names them all; none when a required key is missing (its
    absence is the problem)."""
    if not isinstance(item, Mapping):
        return []
    if any(key not in item for key in _FILING_REQUIRED_JSON):
        return []
    # A value of the wrong type is already named: checked as empty here.
    usable = {
        key: value if isinstance(value, str | int | float) else None
        for key, value in item.items()
        if key in FILING_COLUMNS
    }
    try:
        _filing(_text_fields(usable, FILING_COLUMNS, ()), now)
    except _RowError as exc:
        return [str(exc)]
    return []


def vehicle_ids(conn: psycopg.Connection[Any], plates: Sequence[str]) -> list[int | None]:
    """The ids of the vehicles with these plates, in order (None: no such vehicle)."""
    found = dict(
        conn.execute("SELECT plate, id FROM vehicles WHERE plate = ANY(%s)", (list(plates),))
    )
    return [None if found.get(p) is None else int(found[p]) for p in plates]
