"""Versioned schema migrations, the positions storage backend and its partitions.

Migrations are numbered SQL scripts (``MIGRATIONS``) applied in order by :func:`migrate`, each in
its own transaction together with its row in ``jt808_schema_migrations``, under an advisory lock
so two processes starting at once do not race.  Re-running is a no-op.  New migrations are
appended with the next number; an applied migration is never edited.

Every object is created unqualified, in the first schema of the connection's ``search_path``
(tests use a scratch schema each).

Two backends store ``positions``, chosen once by the first :func:`migrate` and remembered in
``jt808_settings``:

* ``timescaledb`` when asked for, or with ``auto`` when the extension is installable and
  preloaded (:func:`timescale_usable`): a hypertable with a configurable chunk interval,
  compression segmented by terminal and a retention policy.  (Migration 3 made the daily
  aggregate continuous aggregates; migration 11 replaced them by the table the partitioned
  backend uses.)  Its SQL comes from small generators (:func:`timescale_positions_sql`,
  :func:`timescale_aggregate_sql`, :func:`timescale_daily_table_sql`) that the tests check, and
  was written for and run on TimescaleDB 2.28 (PostgreSQL 15).
* ``partitioned`` otherwise: native range partitions, one per China-time day of
  ``device_time``, created ahead by :func:`ensure_partitions`, plus a DEFAULT partition so no
  row is ever rejected; a BRIN index on time; the daily aggregate as a table refreshed a day at
  a time (a materialized view until migration 8).

Positions carry the vehicle their terminal was bound to at their device time (migrations 10
and 11, :mod:`storage.bindings`).

In both, the unique index ``positions_natural_key (phone, device_time, fix_key)`` is the dedup
key (see :func:`storage.rows.fix_key`); it includes ``device_time`` because a unique index on a
partitioned table (or hypertable) must include the partition key.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from storage.errors import StorageError

logger = logging.getLogger(__name__)

Backend = Literal["partitioned", "timescaledb"]
BackendChoice = Literal["auto", "partitioned", "timescaledb"]

# Day boundaries of partitions and daily reports: China Standard Time, the GMT+8 the standard's
# times are in (JT/T 808-2019 4.2, table 1).  China has had no daylight saving since 1991, so a
# fixed offset and the 'Asia/Shanghai' zone PostgreSQL uses agree.
CHINA = timezone(timedelta(hours=8), "CST")
REPORT_TZ = "Asia/Shanghai"

# Driving time counts the minutes with at least one fix at or above this speed: GNSS jitter
# gives a parked vehicle speeds of 1-3 km/h, walking pace is about 5.
MOVING_KMH = 5

# Partitions made ahead of today by default: a week covers a long holiday with the platform
# left alone; each empty partition costs a few catalog rows.
DEFAULT_DAYS_AHEAD = 7

_LOCK_CLASS = 808_2019  # advisory lock namespace for migrations (any constant of our own)
_PARTITION_RE = re.compile(r"^positions_p(\d{8})$")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TimescaleOptions:
    """TimescaleDB settings.

    ``chunk_interval``: one day keeps a day's chunk and its indexes in memory at 100k
    positions/s.  ``compress_after``: chunks older than a week are no longer back-filled by
    terminals in practice.  ``retain_for``: a year, so annual mileage can be recomputed from
    raw positions; None keeps everything.
    """

    chunk_interval: timedelta = timedelta(days=1)
    compress_after: timedelta = timedelta(days=7)
    retain_for: timedelta | None = timedelta(days=366)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SchemaContext:
    backend: Backend
    timescale: TimescaleOptions = TimescaleOptions()
    # The schema holding the TimescaleDB extension's functions (quoted), so that its calls do
    # not depend on the connection's search_path.
    timescale_schema: str = "public"


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str | Callable[[SchemaContext], str]

    def render(self, ctx: SchemaContext) -> str:
        return self.sql if isinstance(self.sql, str) else self.sql(ctx)


def _interval(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds <= 0 or value != timedelta(seconds=seconds):
        raise ValueError(f"interval must be a positive whole number of seconds, got {value}")
    return f"INTERVAL '{seconds} seconds'"


# ---------------------------------------------------------------------------------------------
# Migration 1: terminals, vehicles, sessions, multimedia

_CORE = """
CREATE TABLE terminals (
    phone text COLLATE "C" PRIMARY KEY,          -- header phone number, BCD digits as sent
    auth_code text,
    imei text,
    firmware text,
    provisioning_state text NOT NULL DEFAULT 'unprovisioned'
        CHECK (provisioning_state IN ('provisioned', 'unprovisioned')),
    registered_at timestamptz,
    -- as sent in 0x0100 registration (8.5, table 8)
    province_id integer,
    city_id integer,
    manufacturer text,
    model text,
    terminal_id text,
    plate_color smallint,
    plate text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vehicles (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    plate text NOT NULL UNIQUE,
    phone text COLLATE "C" UNIQUE,               -- the terminal fitted, at most one
    unit text NOT NULL,                          -- owning unit
    category text NOT NULL CHECK (category IN ('retained', 'platform', 'rental')),
    exempt boolean NOT NULL DEFAULT false,       -- special vehicles exempt from the rules
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vehicles_unit ON vehicles (unit, category);

CREATE TABLE sessions (
    phone text COLLATE "C" PRIMARY KEY,
    node text NOT NULL,                          -- the server process holding the connection
    connected_since timestamptz NOT NULL,
    peer text
);
CREATE INDEX sessions_node ON sessions (node);

CREATE TABLE multimedia (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    phone text COLLATE "C" NOT NULL,
    media_id bigint NOT NULL,                    -- DWORD from 0x0800/0x0801 (8.53, 8.54)
    media_type smallint NOT NULL,                -- 0 image, 1 audio, 2 video
    media_format smallint NOT NULL,              -- 0 JPEG, 1 TIF, 2 MP3, 3 WAV, 4 WMV
    event smallint NOT NULL,
    channel smallint NOT NULL,
    path text NOT NULL,
    size_bytes bigint NOT NULL,
    received_at timestamptz NOT NULL,
    vehicle_id bigint,
    -- the location basic information sent with 0x0801 (table 23)
    device_time timestamptz,
    alarm bigint,
    status bigint,
    lat double precision,
    lon double precision,
    altitude_m integer,
    speed_kmh double precision,
    direction integer
);
CREATE INDEX multimedia_phone ON multimedia (phone, media_id);
CREATE INDEX multimedia_received_at ON multimedia (received_at);
"""

# ---------------------------------------------------------------------------------------------
# Migration 2: positions

POSITIONS_COLUMNS_SQL = """
    device_time timestamptz NOT NULL,
    phone text COLLATE "C" NOT NULL,
    fix_key bigint NOT NULL,
    received_at timestamptz NOT NULL,
    msg_id integer NOT NULL,
    serial integer NOT NULL,
    batch_type smallint,
    alarm bigint NOT NULL,
    status bigint NOT NULL,
    lat double precision NOT NULL,
    lon double precision NOT NULL,
    altitude_m integer NOT NULL,
    speed_kmh double precision NOT NULL,
    direction integer NOT NULL,
    mileage_km double precision,
    fuel_l double precision,
    recorder_speed_kmh double precision,
    signal_strength smallint,
    gnss_satellites smallint,
    io_status integer,
    analog bigint,
    extended_signal bigint,
    extras jsonb,
    vehicle_id bigint
"""

_NATURAL_KEY_SQL = (
    "CREATE UNIQUE INDEX positions_natural_key ON positions (phone, device_time, fix_key);"
)


def partitioned_positions_sql() -> str:
    """``positions`` as a range-partitioned table with a DEFAULT partition and BRIN on time.

    No index on ``vehicle_id``: every index costs ingest throughput, and per-vehicle queries
    go through the terminal (``phone``, the natural key's leading column).
    """
    return f"""
CREATE TABLE positions ({POSITIONS_COLUMNS_SQL}) PARTITION BY RANGE (device_time);
CREATE TABLE positions_default PARTITION OF positions DEFAULT;
{_NATURAL_KEY_SQL}
-- 32 pages a range: rows arrive nearly in time order, so each range spans a few seconds.
CREATE INDEX positions_device_time_brin ON positions USING brin (device_time)
    WITH (pages_per_range = 32);
"""


def timescale_positions_sql(options: TimescaleOptions, ts: str = "public") -> list[str]:
    """The statements that make ``positions`` a compressed hypertable with retention (``ts``:
    the extension's schema, its functions are called qualified)."""
    statements = [
        f"CREATE TABLE positions ({POSITIONS_COLUMNS_SQL})",
        (
            f"SELECT {ts}.create_hypertable('positions', 'device_time', chunk_time_interval => "
            f"{_interval(options.chunk_interval)}, if_not_exists => TRUE)"
        ),
        _NATURAL_KEY_SQL.rstrip(";"),
        (
            "ALTER TABLE positions SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'phone', "
            "timescaledb.compress_orderby = 'device_time DESC, fix_key')"
        ),
        (
            f"SELECT {ts}.add_compression_policy('positions', compress_after => "
            f"{_interval(options.compress_after)}, if_not_exists => TRUE)"
        ),
    ]
    if options.retain_for is not None:
        statements.append(
            f"SELECT {ts}.add_retention_policy('positions', drop_after => "
            f"{_interval(options.retain_for)}, if_not_exists => TRUE)"
        )
    return statements


def _positions(ctx: SchemaContext) -> str:
    if ctx.backend == "timescaledb":
        return ";\n".join(timescale_positions_sql(ctx.timescale, ctx.timescale_schema)) + ";"
    return partitioned_positions_sql()


# ---------------------------------------------------------------------------------------------
# Migration 3: daily aggregate and reporting views
#
# The daily aggregate per vehicle and China-time day has the same columns in both backends:
# vehicle_id, day_start (timestamptz), positions, distance_km (odometer item 0x01, max - min;
# NULL without it), driving_time_s (60 s for each minute with a fix at >= MOVING_KMH).  Minutes
# rather than gaps between fixes because a continuous aggregate cannot look at the previous row,
# and because a terminal that goes quiet must not accrue driving time.


# The daily figures of every vehicle with positions (the incremental refresh of
# storage.reports recomputes some days with the same text, so the numbers cannot drift).
DAILY_FIGURES = f"""SELECT vehicle_id,
       date_trunc('day', device_time AT TIME ZONE '{REPORT_TZ}')
           AT TIME ZONE '{REPORT_TZ}' AS day_start,
       count(*) AS positions,
       max(mileage_km) - min(mileage_km) AS distance_km,
       (60 * count(DISTINCT date_trunc('minute', device_time AT TIME ZONE '{REPORT_TZ}'))
           FILTER (WHERE speed_kmh >= {MOVING_KMH}))::bigint AS driving_time_s
FROM positions
WHERE vehicle_id IS NOT NULL"""  # noqa: S608 - constants only


def partitioned_aggregate_sql() -> str:
    return f"""
CREATE MATERIALIZED VIEW daily_vehicle_stats_mv AS
{DAILY_FIGURES}
GROUP BY 1, 2;
-- REFRESH ... CONCURRENTLY needs a unique index
CREATE UNIQUE INDEX daily_vehicle_stats_mv_key ON daily_vehicle_stats_mv (vehicle_id, day_start);
"""


def timescale_aggregate_sql(ts: str = "public") -> list[str]:
    """Continuous aggregates: per-minute, then daily on top of it (hierarchical, TS >= 2.9);
    ``ts``: the extension's schema."""
    minute = (
        "CREATE MATERIALIZED VIEW positions_minute_mv WITH (timescaledb.continuous) AS "  # noqa: S608
        f"SELECT vehicle_id, {ts}.time_bucket(INTERVAL '1 minute', device_time) AS minute, "
        "count(*) AS positions, "
        f"max(CASE WHEN speed_kmh >= {MOVING_KMH} THEN 1 ELSE 0 END) AS moving, "
        "min(mileage_km) AS min_mileage_km, max(mileage_km) AS max_mileage_km "
        "FROM positions WHERE vehicle_id IS NOT NULL "
        "GROUP BY vehicle_id, minute WITH NO DATA"
    )
    daily = (
        "CREATE MATERIALIZED VIEW daily_vehicle_stats_mv WITH (timescaledb.continuous) AS "  # noqa: S608
        f"SELECT vehicle_id, {ts}.time_bucket(INTERVAL '1 day', minute, '{REPORT_TZ}') "
        "AS day_start, "
        "sum(positions)::bigint AS positions, "
        "max(max_mileage_km) - min(min_mileage_km) AS distance_km, "
        "(60 * sum(moving))::bigint AS driving_time_s "
        "FROM positions_minute_mv GROUP BY vehicle_id, day_start WITH NO DATA"
    )
    return [
        minute,
        daily,
        (
            f"SELECT {ts}.add_continuous_aggregate_policy('positions_minute_mv', "
            "start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute', "
            "schedule_interval => INTERVAL '5 minutes')"
        ),
        (
            f"SELECT {ts}.add_continuous_aggregate_policy('daily_vehicle_stats_mv', "
            "start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour', "
            "schedule_interval => INTERVAL '1 hour')"
        ),
    ]


_REPORT_VIEWS = f"""
CREATE VIEW vehicle_daily_stats AS
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.exempt,
       (s.day_start AT TIME ZONE '{REPORT_TZ}')::date AS day,
       s.positions, s.distance_km, s.driving_time_s
FROM daily_vehicle_stats_mv s
JOIN vehicles v ON v.id = s.vehicle_id;

CREATE VIEW unit_category_daily AS
SELECT unit, category, day,
       count(*) AS vehicles,
       sum(positions)::bigint AS positions,
       sum(distance_km) AS distance_km,
       sum(driving_time_s)::bigint AS driving_time_s
FROM vehicle_daily_stats
GROUP BY unit, category, day;

-- One index probe per vehicle through positions_natural_key (phone leads it).
CREATE VIEW vehicle_latest_position AS
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.phone,
       p.device_time, p.received_at, p.lat, p.lon, p.altitude_m, p.speed_kmh, p.direction,
       p.alarm, p.status, p.mileage_km
FROM vehicles v
CROSS JOIN LATERAL (
    SELECT * FROM positions p
    WHERE p.phone = v.phone
    ORDER BY p.device_time DESC
    LIMIT 1
) p;
"""  # noqa: S608 - constants only


def _aggregates(ctx: SchemaContext) -> str:
    if ctx.backend == "timescaledb":
        body = ";\n".join(timescale_aggregate_sql(ctx.timescale_schema)) + ";"
    else:
        body = partitioned_aggregate_sql()
    return body + _REPORT_VIEWS


# ---------------------------------------------------------------------------------------------
# Migration 4: the rule engine's tables (it refines them with migrations of its own)

_RULES = """
CREATE TABLE fences (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('circle', 'rectangle', 'polygon', 'route')),
    geometry jsonb NOT NULL,                     -- GeoJSON, WGS-84 degrees
    properties jsonb NOT NULL DEFAULT '{}',      -- radius_m, speed limits, schedule, ...
    unit text,                                   -- NULL: applies to every unit
    active boolean NOT NULL DEFAULT true,
    valid_from timestamptz,
    valid_to timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE filings (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    vehicle_id bigint NOT NULL REFERENCES vehicles (id),
    purpose text NOT NULL,
    destination text,
    fence_id bigint REFERENCES fences (id),
    starts_at timestamptz NOT NULL,
    ends_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'approved', 'rejected', 'cancelled')),
    approved_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX filings_vehicle ON filings (vehicle_id, starts_at);

CREATE TABLE alerts (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    vehicle_id bigint REFERENCES vehicles (id),
    phone text COLLATE "C",
    kind text NOT NULL,
    severity smallint NOT NULL DEFAULT 1,
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'acknowledged', 'closed')),
    opened_at timestamptz NOT NULL,
    closed_at timestamptz,
    position_time timestamptz,
    lat double precision,
    lon double precision,
    fence_id bigint REFERENCES fences (id),
    filing_id bigint REFERENCES filings (id),
    details jsonb NOT NULL DEFAULT '{}',
    acknowledged_by text,
    acknowledged_at timestamptz
);
CREATE INDEX alerts_state ON alerts (state, opened_at);
CREATE INDEX alerts_vehicle ON alerts (vehicle_id, opened_at);

CREATE TABLE trips (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    vehicle_id bigint NOT NULL REFERENCES vehicles (id),
    phone text COLLATE "C",
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    start_lat double precision,
    start_lon double precision,
    end_lat double precision,
    end_lon double precision,
    distance_km double precision,
    driving_time_s bigint,
    filing_id bigint REFERENCES filings (id),
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX trips_vehicle ON trips (vehicle_id, started_at);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "terminals, vehicles, sessions, multimedia", _CORE),
    Migration(2, "positions", _positions),
    Migration(3, "daily aggregate and reporting views", _aggregates),
    Migration(4, "rule engine tables", _RULES),
)

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS jt808_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS jt808_settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
"""


# ---------------------------------------------------------------------------------------------
# Applying


def timescale_available(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return row is not None


def timescale_usable(conn: psycopg.Connection[Any]) -> tuple[bool, str]:
    """Whether TimescaleDB can be used here, and why (or why not), without trying it: a
    ``CREATE EXTENSION timescaledb`` on a server that does not preload the library ends the
    session with a FATAL error instead of failing the statement."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return True, "the extension is installed in this database"
    if not timescale_available(conn):
        return False, "the extension is not installed on this PostgreSQL server"
    row = conn.execute("SELECT current_setting('shared_preload_libraries', true)").fetchone()
    libraries = str(row[0] or "") if row is not None else ""
    preloaded = any(lib.strip().strip('"') == "timescaledb" for lib in libraries.split(","))
    if not preloaded:
        return False, "the extension is available but not in shared_preload_libraries"
    return True, "the extension is available and preloaded"


def timescale_schema(conn: psycopg.Connection[Any]) -> str:
    """The extension's schema, quoted for use in statements."""
    row = conn.execute(
        "SELECT quote_ident(n.nspname) FROM pg_extension e "
        "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'timescaledb'"
    ).fetchone()
    if row is None:
        raise StorageError("timescaledb is not installed in this database")
    return str(row[0])


def current_backend(conn: psycopg.Connection[Any]) -> Backend | None:
    """The backend recorded by :func:`migrate`, or None before the first migration."""
    if conn.execute("SELECT to_regclass('jt808_settings')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT value FROM jt808_settings WHERE key = 'backend'").fetchone()
    if row is None:
        return None
    value = row[0]
    if value not in ("partitioned", "timescaledb"):
        raise StorageError(f"unknown storage backend {value!r} in jt808_settings")
    return value  # type: ignore[no-any-return]


def _choose_backend(conn: psycopg.Connection[Any], choice: BackendChoice) -> SchemaContext:
    """The backend of a new schema (or the recorded one) and, for TimescaleDB, the extension
    created and its schema.  ``auto`` takes TimescaleDB only when it is installed or available
    and preloaded; the choice and its reason are logged.  Nothing is recorded here: the first
    migration's transaction records the backend with it."""
    recorded = current_backend(conn)
    if recorded is not None:
        if choice not in ("auto", recorded):
            raise StorageError(f"schema was created for {recorded}, cannot switch to {choice}")
        backend: Backend = recorded
        reason = "recorded when the schema was created"
    else:
        usable, why = timescale_usable(conn)
        if choice == "timescaledb" and not usable:
            raise StorageError(f"timescaledb requested but not usable: {why}")
        backend = (
            "timescaledb"
            if choice == "timescaledb" or (choice == "auto" and usable)
            else ("partitioned")
        )
        reason = why if choice == "auto" else f"{choice} requested"
    ts = "public"
    if backend == "timescaledb":
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        ts = timescale_schema(conn)
    logger.info("positions storage backend: %s (%s)", backend, reason)
    return SchemaContext(backend=backend, timescale_schema=ts)


def migrate(
    conn: psycopg.Connection[Any],
    *,
    backend: BackendChoice = "auto",
    timescale: TimescaleOptions | None = None,
    now: datetime | None = None,
    days_ahead: int = DEFAULT_DAYS_AHEAD,
) -> list[int]:
    """Apply the migrations not yet applied; return their versions (empty when up to date).

    ``conn`` must be idle (not inside a transaction); it is used in autocommit mode and left
    as it was.  With the partitioned backend, partitions for ``now`` (default: the current
    time) and ``days_ahead`` days after are ensured as well.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise StorageError("migrate() needs a connection that is not inside a transaction")
    autocommit = conn.autocommit
    conn.autocommit = True
    applied_now: list[int] = []
    try:
        lock = (_LOCK_CLASS,)
        conn.execute("SELECT pg_advisory_lock(%s, hashtext(coalesce(current_schema(), '')))", lock)
        try:
            conn.execute(_BOOTSTRAP)
            recorded = current_backend(conn)
            if recorded is not None and backend not in ("auto", recorded):
                raise StorageError(f"schema was created for {recorded}, cannot switch to {backend}")
            applied = {v for (v,) in conn.execute("SELECT version FROM jt808_schema_migrations")}
            ctx: SchemaContext | None = None
            for migration in sorted(MIGRATIONS, key=lambda m: m.version):
                if migration.version in applied:
                    continue
                first = ctx is None
                if ctx is None:
                    ctx = dataclasses.replace(
                        _choose_backend(conn, backend), timescale=timescale or TimescaleOptions()
                    )
                with conn.transaction():
                    if first and current_backend(conn) is None:
                        # Recorded with the first migration, or not at all: a failed first
                        # migration leaves no backend behind that the next attempt would trust.
                        conn.execute(
                            "INSERT INTO jt808_settings (key, value) VALUES ('backend', %s)",
                            (ctx.backend,),
                        )
                    conn.execute(migration.render(ctx))
                    conn.execute(
                        "INSERT INTO jt808_schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                logger.info("applied migration %d: %s", migration.version, migration.name)
                applied_now.append(migration.version)
        finally:
            conn.execute(
                "SELECT pg_advisory_unlock(%s, hashtext(coalesce(current_schema(), '')))", lock
            )
        ensure_partitions(conn, now or datetime.now(UTC), days_ahead=days_ahead)
    finally:
        conn.autocommit = autocommit
    return applied_now


# ---------------------------------------------------------------------------------------------
# Partitions (partitioned backend)


def partition_name(day: date) -> str:
    return f"positions_p{day:%Y%m%d}"


def partition_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of the partition holding China-time ``day``."""
    start = datetime.combine(day, time(), CHINA)
    return start, start + timedelta(days=1)


def existing_partitions(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'positions'::regclass"
    ).fetchall()
    return {name for (name,) in rows}


def ensure_partitions(
    conn: psycopg.Connection[Any],
    now: datetime,
    *,
    days_ahead: int = DEFAULT_DAYS_AHEAD,
    days_behind: int = 1,
) -> list[str]:
    """Create the daily partitions from ``days_behind`` before ``now`` to ``days_ahead`` after.

    Returns the names created.  Rows that had landed in the DEFAULT partition for a day being
    created are moved into it in the same transaction (PostgreSQL would refuse to create the
    partition otherwise).  A no-op with TimescaleDB, which makes its chunks itself.  Device
    times outside the window (a terminal's clock years off, old back-fill) stay in the
    DEFAULT partition.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if current_backend(conn) != "partitioned":
        return []
    today = now.astimezone(CHINA).date()
    existing = existing_partitions(conn)
    created: list[str] = []
    for offset in range(-days_behind, days_ahead + 1):
        day = today + timedelta(days=offset)
        name = partition_name(day)
        if name in existing:
            continue
        start, end = partition_bounds(day)
        bounds = sql.SQL("FROM ({}) TO ({})").format(sql.Literal(start), sql.Literal(end))
        ident = sql.Identifier(name)
        with conn.transaction():
            # Writers take ROW EXCLUSIVE on the parent first, so locking the parent (not
            # DEFAULT, which would invert the writers' lock order) keeps rows of this day
            # from landing in DEFAULT between the count and the create.
            conn.execute("LOCK TABLE ONLY positions IN SHARE ROW EXCLUSIVE MODE")
            # The lock conflicts with itself, so processes creating partitions at once (the
            # workers of a node starting together, each migrating and keeping partitions
            # ahead) take turns; whoever comes second finds the partition made.
            if name in existing_partitions(conn):
                continue
            stray = conn.execute(
                "SELECT count(*) FROM positions_default "
                "WHERE device_time >= %s AND device_time < %s",
                (start, end),
            ).fetchone()
            if stray is not None and stray[0]:
                conn.execute(
                    sql.SQL("CREATE TABLE {} (LIKE positions INCLUDING DEFAULTS)").format(ident)
                )
                conn.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM positions_default "
                        "WHERE device_time >= %s AND device_time < %s RETURNING *) "
                        "INSERT INTO {} SELECT * FROM moved"
                    ).format(ident),
                    (start, end),
                )
                conn.execute(
                    sql.SQL("ALTER TABLE positions ATTACH PARTITION {} FOR VALUES {}").format(
                        ident, bounds
                    )
                )
                logger.info("partition %s created with %d rows from DEFAULT", name, stray[0])
            else:
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF positions FOR VALUES {}").format(
                        ident, bounds
                    )
                )
        created.append(name)
    if created:
        logger.info("created partitions %s", ", ".join(created))
    return created


def drop_partitions_before(conn: psycopg.Connection[Any], cutoff: date) -> list[str]:
    """Drop the daily partitions of days before ``cutoff`` (retention without TimescaleDB)."""
    if current_backend(conn) != "partitioned":
        return []
    dropped: list[str] = []
    for name in sorted(existing_partitions(conn)):
        match = _PARTITION_RE.match(name)
        if match is None:
            continue
        day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=CHINA).date()
        if day < cutoff:
            with conn.transaction():
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            dropped.append(name)
    if dropped:
        logger.info("dropped partitions %s", ", ".join(dropped))
    return dropped


# ---------------------------------------------------------------------------------------------
# Migration 5: the rule engine's tables as the engine uses them (alerts.model, alerts.lifecycle,
# alerts.engine.TripRecord).  Migration 4's fences, filings, alerts and trips were never written
# to, so they are dropped and made again; ``vehicles`` keeps its rows (migration 3's views read
# it) and gains the engine's default speed limit.
#
# ``masterdata_state.version`` counts changes to vehicles, fences and filings: a statement-level
# trigger bumps it and NOTIFYs ``jt808_masterdata``, so a running engine polls one row (or
# listens) to pick up imports without a restart.  Bumping one row serialises the writers of
# master data, which are rare (imports, dispatch orders), and makes the counter follow commit
# order, so a reader that saw version N has seen every change numbered N or less.

_ENGINE = """
DROP TABLE alerts, trips, filings, fences;

ALTER TABLE vehicles
    ADD COLUMN max_speed_kmh double precision CHECK (max_speed_kmh > 0),  -- NULL: rules' default
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

CREATE TABLE fences (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,                   -- filings name their destination by it
    kind text NOT NULL CHECK (kind IN ('permitted', 'forbidden', 'parking', 'destination')),
    shape text NOT NULL CHECK (shape IN ('circle', 'rectangle', 'polygon')),
    geometry jsonb NOT NULL,                     -- GeoJSON (Point for a circle), WGS-84 degrees
    radius_m double precision CHECK (radius_m > 0),
    unit text,                                   -- NULL: applies to every unit
    -- the time window: daily (China time; end <= start crosses midnight) or one period
    daily_start time,
    daily_end time,
    period_start timestamptz,
    period_end timestamptz,
    max_speed_kmh double precision CHECK (max_speed_kmh > 0),
    overspeed_duration_s integer CHECK (overspeed_duration_s >= 0),
    night_max_speed_kmh double precision CHECK (night_max_speed_kmh > 0),
    area_id bigint,                              -- the JT/T 808 area (0x8600-0x8604) mirrored
    active boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((shape = 'circle') = (radius_m IS NOT NULL)),
    CHECK ((daily_start IS NULL) = (daily_end IS NULL)),
    CHECK ((period_start IS NULL) = (period_end IS NULL)),
    CHECK (daily_start IS NULL OR period_start IS NULL),
    CHECK (period_end > period_start)
);

CREATE TABLE filings (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    vehicle_id bigint NOT NULL REFERENCES vehicles (id),
    starts_at timestamptz NOT NULL,
    ends_at timestamptz NOT NULL,
    destination_fence bigint REFERENCES fences (id),   -- NULL: no particular area
    purpose text NOT NULL DEFAULT '',
    passengers text NOT NULL DEFAULT '',
    approver text NOT NULL DEFAULT '',
    filed_at timestamptz NOT NULL DEFAULT now(),  -- after starts_at: a back-filing (article 21)
    state text NOT NULL DEFAULT 'approved'
        CHECK (state IN ('pending', 'approved', 'rejected', 'cancelled')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    UNIQUE (vehicle_id, starts_at, ends_at)       -- one filing per vehicle and window
);
CREATE INDEX filings_updated ON filings (updated_at);

CREATE TABLE alerts (
    id text COLLATE "C" PRIMARY KEY,             -- the engine's deterministic episode id
    rule text NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'pending_backfill', 'resolved', 'violation')),
    phone text COLLATE "C" NOT NULL,
    vehicle_id bigint NOT NULL,                  -- no foreign key: alerts outlive registry edits
    plate text NOT NULL,
    unit text NOT NULL,
    severity text NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    opened_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    deadline timestamptz,
    closed_at timestamptz,
    detail jsonb NOT NULL DEFAULT '{}',
    record jsonb NOT NULL                        -- the alert exactly as the engine wrote it
);
CREATE INDEX alerts_active ON alerts (state, deadline)
    WHERE state IN ('open', 'pending_backfill');
CREATE INDEX alerts_vehicle ON alerts (vehicle_id, opened_at);
CREATE INDEX alerts_opened ON alerts (opened_at);

CREATE TABLE alert_events (
    seq bigserial PRIMARY KEY,
    alert_id text COLLATE "C" NOT NULL REFERENCES alerts (id),
    at timestamptz NOT NULL DEFAULT now(),
    alert jsonb NOT NULL                         -- the alert after the change
);
CREATE INDEX alert_events_alert ON alert_events (alert_id, seq);

CREATE TABLE trips (
    vehicle_id bigint NOT NULL,
    started_at timestamptz NOT NULL,             -- device time: a replay finds the same trip
    seq bigint NOT NULL,                         -- the detector's per-vehicle counter
    phone text COLLATE "C" NOT NULL,
    start_lon double precision NOT NULL,
    start_lat double precision NOT NULL,
    ended_at timestamptz,                        -- NULL while the trip runs
    end_lon double precision,
    end_lat double precision,
    distance_km double precision,
    distance_source text CHECK (distance_source IN ('mileage', 'track')),
    filing_id bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, started_at)
);
CREATE INDEX trips_started ON trips (started_at);

CREATE TABLE masterdata_state (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO masterdata_state (version) VALUES (1);

CREATE FUNCTION masterdata_bump() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE masterdata_state SET version = version + 1 RETURNING version INTO v;
    PERFORM pg_notify('jt808_masterdata', v::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER vehicles_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON vehicles
    FOR EACH STATEMENT EXECUTE FUNCTION masterdata_bump();
CREATE TRIGGER fences_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON fences
    FOR EACH STATEMENT EXECUTE FUNCTION masterdata_bump();
CREATE TRIGGER filings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON filings
    FOR EACH STATEMENT EXECUTE FUNCTION masterdata_bump();
"""

MIGRATIONS = (*MIGRATIONS, Migration(5, "rule engine tables as the engine uses them", _ENGINE))

# ---------------------------------------------------------------------------------------------
# Migration 6: terminal identity events (article 18: installation, change, removal and recovery
# of terminals go through the platform centre, so each change of a terminal's registration is
# kept: who registered a phone, who was refused it, who released it).

_TERMINAL_EVENTS = """
CREATE TABLE terminal_events (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    phone text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    event text NOT NULL
        CHECK (event IN ('registered', 'reregistered', 'registration_refused', 'reset')),
    actor text,                                   -- the terminal's peer address, or the operator
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX terminal_events_phone ON terminal_events (phone, at);
"""

MIGRATIONS = (*MIGRATIONS, Migration(6, "terminal identity events", _TERMINAL_EVENTS))

# ---------------------------------------------------------------------------------------------
# Migration 7: the positions table as the rule engines' log (storage.rule_log).
#
# Every position remembers the transaction that stored it (``commit_xid``, the 64-bit
# transaction id).  A transaction older than the oldest one still running has finished, so the
# rows whose ``commit_xid`` is below that horizon are all there is and will ever be for those
# transactions: a consumer that reads up to the horizon never skips a row, whatever order
# concurrent writers commit in.  Rows stored before this migration have none (NULL: not read
# as new).  The column is added without a default first (no table rewrite), then given one
# for new rows.  A B-tree rather than a block range index: the engines read the newest
# rows every half second, and a block range index leaves the pages written since the last
# vacuum unsummarized, so every read scanned all of them (PostgreSQL's CPU tripled at 15,000
# positions/s); ids that only grow are appended at the index's right edge, which is cheap.
#
# ``rule_state``: per partition of the vehicles (:data:`storage.rule_log.PARTS`), how far its
# engine has judged (every transaction below ``next_xid``) and the engine's state for those
# vehicles at that point, saved together.  ``rule_engines``: the running engines (heartbeat),
# so that each takes its share of the partitions.

_RULE_LOG = """
ALTER TABLE positions ADD COLUMN commit_xid bigint;
ALTER TABLE positions ALTER COLUMN commit_xid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX positions_commit_xid ON positions (commit_xid);
CREATE TABLE rule_state (
    part smallint PRIMARY KEY,
    next_xid bigint NOT NULL,
    state bytea,
    saved_at timestamptz NOT NULL DEFAULT now(),
    engine text
);
CREATE TABLE rule_engines (
    engine text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now(),
    parts smallint[] NOT NULL DEFAULT '{}',
    host text
);
"""

MIGRATIONS = (*MIGRATIONS, Migration(7, "positions as the rule engines' log", _RULE_LOG))

# ---------------------------------------------------------------------------------------------
# Migration 8: the daily aggregate kept incrementally (storage.reports.refresh_daily_stats).
#
# Without TimescaleDB, migration 3's materialized view could only be refreshed whole, every day
# ever stored at each refresh.  It becomes a table of the same name and columns that the refresh
# updates one China-time day at a time: the days of the positions received since the previous
# refresh (``daily_stats_refresh.received_to``, the watermark any process reads), plus the
# current day.  The name stays, so ``vehicle_daily_stats`` reads the same relation name in both
# backends; the view is replaced in place (same columns), so ``unit_category_daily`` and
# whatever else reads it are untouched.  The view's rows are copied over, so readers see what
# they saw; the watermark starts NULL, so the first refresh recomputes every day once.
#
# With TimescaleDB the continuous aggregates stay; the refresh uses the watermark to choose the
# window it asks them to refresh.  Both backends get a BRIN index on ``received_at``: positions
# are appended in arrival order (within each partition or chunk), so block ranges find the
# rows received since a time at almost no cost to inserts.  Building it reads ``positions``
# once, during which writes wait (the writer spools meanwhile).

_DAILY_STATS_STATE = """
CREATE TABLE daily_stats_refresh (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    received_to timestamptz,                     -- NULL: recompute every day at the next refresh
    refreshed_at timestamptz
);
INSERT INTO daily_stats_refresh DEFAULT VALUES;
-- 32 pages a range, as positions_device_time_brin: a range spans a few seconds of arrivals.
CREATE INDEX positions_received_at_brin ON positions USING brin (received_at)
    WITH (pages_per_range = 32);
"""


def incremental_aggregate_sql() -> str:
    """Migration 3's materialized view as a table of the same columns (partitioned backend)."""
    return f"""
ALTER MATERIALIZED VIEW daily_vehicle_stats_mv RENAME TO daily_vehicle_stats_mv_old;
-- fillfactor: the current day's rows are rewritten at every refresh; room on their page keeps
-- those updates HOT (no index entry, no page elsewhere).
CREATE TABLE daily_vehicle_stats_mv (
    vehicle_id bigint NOT NULL,
    day_start timestamptz NOT NULL,              -- China-time midnight
    positions bigint NOT NULL,
    distance_km double precision,                -- NULL without the odometer item 0x01
    driving_time_s bigint NOT NULL,
    PRIMARY KEY (vehicle_id, day_start)
) WITH (fillfactor = 80);
INSERT INTO daily_vehicle_stats_mv (vehicle_id, day_start, positions, distance_km, driving_time_s)
SELECT vehicle_id, day_start, positions, distance_km, driving_time_s
FROM daily_vehicle_stats_mv_old;
CREATE OR REPLACE VIEW vehicle_daily_stats AS
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.exempt,
       (s.day_start AT TIME ZONE '{REPORT_TZ}')::date AS day,
       s.positions, s.distance_km, s.driving_time_s
FROM daily_vehicle_stats_mv s
JOIN vehicles v ON v.id = s.vehicle_id;
DROP MATERIALIZED VIEW daily_vehicle_stats_mv_old;
"""  # noqa: S608 - constants only


def _incremental_stats(ctx: SchemaContext) -> str:
    if ctx.backend == "timescaledb":
        return _DAILY_STATS_STATE
    return incremental_aggregate_sql() + _DAILY_STATS_STATE


MIGRATIONS = (*MIGRATIONS, Migration(8, "daily aggregate kept incrementally", _incremental_stats))

# ---------------------------------------------------------------------------------------------
# Migration 9: one phone identity (protocol.phone.canonical_phone: the number without its
# zero padding, padded again to 12 digits when it fits BCD[6], else to 20), for the vehicles
# and for the positions stored before it, and every position whose phone has a vehicle linked
# to it.  A 2019 terminal's positions (20-digit header phone) were stored under a phone no
# vehicle matched.  The function is the same rule in SQL, for the queries of operators.

_PHONE_IDENTITY = """
CREATE FUNCTION jt808_canonical_phone(phone text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT AS $$
    SELECT CASE WHEN length(ltrim(lower(phone), '0')) <= 12
                THEN lpad(ltrim(lower(phone), '0'), 12, '0')
                ELSE lpad(ltrim(lower(phone), '0'), 20, '0') END
$$;
-- Only when a phone changes: the statement bumps the master-data version (migration 5).
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM vehicles WHERE phone <> jt808_canonical_phone(phone)) THEN
        UPDATE vehicles SET phone = jt808_canonical_phone(phone)
        WHERE phone <> jt808_canonical_phone(phone);
    END IF;
END $$;
-- The same fix stored under both forms (a terminal that changed edition and sent it again):
-- the long form goes, the other stays.
DELETE FROM positions a USING positions b
WHERE a.phone <> jt808_canonical_phone(a.phone)
  AND b.phone = jt808_canonical_phone(a.phone)
  AND b.device_time = a.device_time AND b.fix_key = a.fix_key;
UPDATE positions SET phone = jt808_canonical_phone(phone)
WHERE phone <> jt808_canonical_phone(phone);
UPDATE positions p SET vehicle_id = v.id FROM vehicles v
WHERE p.vehicle_id IS NULL AND v.phone = p.phone;
"""

MIGRATIONS = (*MIGRATIONS, Migration(9, "one phone identity", _PHONE_IDENTITY))

# ---------------------------------------------------------------------------------------------
# Migration 10: terminal bindings over time (article 18: installation, change, removal and
# recovery of terminals go through the platform centre).  Which vehicle a terminal was fitted
# to, from when to when; written by the vehicle imports (storage.masterdata.upsert_vehicles).
# The bindings of today's vehicles start at -infinity: their past is theirs.

_BINDINGS = """
CREATE TABLE terminal_bindings (
    phone text COLLATE "C" NOT NULL,
    vehicle_id bigint NOT NULL REFERENCES vehicles (id),
    valid_from timestamptz NOT NULL,
    valid_to timestamptz,
    PRIMARY KEY (phone, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE UNIQUE INDEX terminal_bindings_open ON terminal_bindings (phone) WHERE valid_to IS NULL;
CREATE INDEX terminal_bindings_vehicle ON terminal_bindings (vehicle_id, valid_from);
INSERT INTO terminal_bindings (phone, vehicle_id, valid_from)
SELECT phone, id, '-infinity' FROM vehicles WHERE phone IS NOT NULL;
"""

MIGRATIONS = (*MIGRATIONS, Migration(10, "terminal bindings over time", _BINDINGS))

# ---------------------------------------------------------------------------------------------
# Migration 11: positions resolved to their vehicle by device time, whoever changes a binding;
# one daily aggregate on both backends.
#
# Bindings: a trigger on ``vehicles`` keeps ``terminal_bindings`` (migration 10) whatever
# changes a vehicle's phone (the imports, ``POST /vehicles``, an operator's SQL): the old
# binding closes now, the new one opens now, or at -infinity for a phone never bound before
# (what it sent before its vehicle was imported is that vehicle's).  A binding made and undone
# in one transaction leaves nothing.  When the transaction commits, a deferred trigger on
# ``terminal_bindings`` takes the link lock (storage.masterdata.LINK_LOCK) exclusively and gives
# the stored positions of each changed phone the vehicle of their device time
# (``jt808_vehicle_at``), noting their China-time days for the daily refresh.  The position
# writer holds the same lock shared while it stores a batch (storage.pgstore): a batch stamped
# from the bindings before the change has committed by then and is re-resolved; one after it
# reads the new bindings.  Taking the lock only at commit keeps a long import from stalling
# the writer.
#
# Daily aggregate: TimescaleDB's continuous aggregates go (the daily one was built on the
# minute one with Asia/Shanghai buckets, and the refresh of a window ending on China midnight
# dropped the new day; its policy never materialised the current day).  Both backends now keep
# ``daily_vehicle_stats_mv`` as the table of migration 8, recomputed from ``positions`` a
# China-time day at a time by storage.reports.refresh_daily_stats, whose rows outlive the raw
# rows dropped by retention.  The watermark is cleared so that the first refresh recomputes
# every day that still has raw rows.

_VEHICLE_AT = f"""
CREATE FUNCTION jt808_vehicle_at(terminal text, at timestamptz) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE SET search_path FROM CURRENT AS $$
    SELECT vehicle_id FROM terminal_bindings
    WHERE phone = terminal AND valid_from <= at AND (valid_to IS NULL OR at < valid_to)
    ORDER BY valid_from DESC LIMIT 1
$$;

CREATE TABLE daily_stats_pending (
    day_start timestamptz PRIMARY KEY            -- a China-time day to recompute
);

CREATE FUNCTION jt808_relink(terminal text, since timestamptz) RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    WITH moved AS (
        UPDATE positions SET vehicle_id = jt808_vehicle_at(phone, device_time)
        WHERE phone = terminal AND device_time >= since
          AND vehicle_id IS DISTINCT FROM jt808_vehicle_at(phone, device_time)
        RETURNING device_time
    )
    INSERT INTO daily_stats_pending (day_start)
    SELECT DISTINCT date_trunc('day', device_time AT TIME ZONE '{REPORT_TZ}')
        AT TIME ZONE '{REPORT_TZ}'
    FROM moved
    ON CONFLICT DO NOTHING
$$;

CREATE FUNCTION jt808_vehicle_rebind() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    old_phone text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        old_phone := OLD.phone;
    END IF;
    IF old_phone IS NOT DISTINCT FROM NEW.phone THEN
        RETURN NULL;
    END IF;
    IF old_phone IS NOT NULL THEN
        PERFORM jt808_unbind(old_phone, NEW.id);
    END IF;
    IF NEW.phone IS NOT NULL THEN
        PERFORM jt808_unbind(NEW.phone, NULL);
        INSERT INTO terminal_bindings (phone, vehicle_id, valid_from)
        SELECT NEW.phone, NEW.id,
               CASE WHEN EXISTS (SELECT FROM terminal_bindings WHERE phone = NEW.phone)
                    THEN now() ELSE '-infinity' END;
    END IF;
    RETURN NULL;
END
$$;

-- Close the open binding of ``terminal`` (to ``vehicle`` only, when given); one opened in this
-- same transaction is removed instead (no zero-length bindings; nobody else saw it).
CREATE FUNCTION jt808_unbind(terminal text, vehicle bigint) RETURNS void LANGUAGE sql
SET search_path FROM CURRENT AS $$
    DELETE FROM terminal_bindings
    WHERE phone = terminal AND valid_to IS NULL AND valid_from = now()
      AND (vehicle IS NULL OR vehicle_id = vehicle);
    UPDATE terminal_bindings SET valid_to = now()
    WHERE phone = terminal AND valid_to IS NULL AND (vehicle IS NULL OR vehicle_id = vehicle);
$$;

CREATE TRIGGER vehicles_rebind AFTER INSERT OR UPDATE OF phone ON vehicles
    FOR EACH ROW EXECUTE FUNCTION jt808_vehicle_rebind();

-- From where the binding's change can move positions: its start when it is new, else the
-- earliest of the bounds that changed.
CREATE FUNCTION jt808_binding_relink() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    since timestamptz := NEW.valid_from;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        since := 'infinity';
        IF NEW.valid_from IS DISTINCT FROM OLD.valid_from THEN
            since := least(NEW.valid_from, OLD.valid_from);
        END IF;
        IF NEW.valid_to IS DISTINCT FROM OLD.valid_to THEN
            since := least(since, coalesce(NEW.valid_to, OLD.valid_to));
        END IF;
        IF since = 'infinity' THEN
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(80808, hashtext('jt808 link ' || current_schema()));
    PERFORM jt808_relink(NEW.phone, since);
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER terminal_bindings_relink AFTER INSERT OR UPDATE ON terminal_bindings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jt808_binding_relink();
"""  # noqa: S608 - constants only


def timescale_daily_table_sql(ts: str = "public") -> str:
    """Migration 11 on TimescaleDB: the continuous aggregates become migration 8's table (their
    rows copied, so days whose raw rows retention dropped keep their figures)."""
    return f"""
SELECT {ts}.remove_continuous_aggregate_policy('daily_vehicle_stats_mv', if_exists => true);
SELECT {ts}.remove_continuous_aggregate_policy('positions_minute_mv', if_exists => true);
CREATE TABLE daily_vehicle_stats_new (
    vehicle_id bigint NOT NULL,
    day_start timestamptz NOT NULL,              -- China-time midnight
    positions bigint NOT NULL,
    distance_km double precision,                -- NULL without the odometer item 0x01
    driving_time_s bigint NOT NULL,
    PRIMARY KEY (vehicle_id, day_start)
) WITH (fillfactor = 80);
INSERT INTO daily_vehicle_stats_new (vehicle_id, day_start, positions, distance_km, driving_time_s)
SELECT vehicle_id, day_start, positions, distance_km, driving_time_s
FROM daily_vehicle_stats_mv WHERE vehicle_id IS NOT NULL;
CREATE OR REPLACE VIEW vehicle_daily_stats AS
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.exempt,
       (s.day_start AT TIME ZONE '{REPORT_TZ}')::date AS day,
       s.positions, s.distance_km, s.driving_time_s
FROM daily_vehicle_stats_new s
JOIN vehicles v ON v.id = s.vehicle_id;
DROP MATERIALIZED VIEW daily_vehicle_stats_mv;
DROP MATERIALIZED VIEW positions_minute_mv;
ALTER TABLE daily_vehicle_stats_new RENAME TO daily_vehicle_stats_mv;
ALTER TABLE daily_vehicle_stats_mv RENAME CONSTRAINT daily_vehicle_stats_new_pkey
    TO daily_vehicle_stats_mv_pkey;
UPDATE daily_stats_refresh SET received_to = NULL;
"""  # noqa: S608 - constants only


def _resolved_positions(ctx: SchemaContext) -> str:
    if ctx.backend == "timescaledb":
        return _VEHICLE_AT + timescale_daily_table_sql(ctx.timescale_schema)
    return _VEHICLE_AT


MIGRATIONS = (
    *MIGRATIONS,
    Migration(11, "positions resolved by device time; one daily aggregate", _resolved_positions),
)

# ---------------------------------------------------------------------------------------------
# Migration 12: operator accounts, bearer tokens and the audit trail (storage.access).
#
# Tokens are stored as the SHA-256 of the token (never the token), with a short prefix to name
# them by.  ``audit_log`` is append-only: a trigger refuses UPDATE, DELETE and TRUNCATE (a
# superuser can still drop the trigger; that is a schema change, not a write through the
# platform).  Its time is the database's.  Changes of vehicles, fences and filings append a
# row each by trigger, whoever made them: the writer names itself with the settings
# ``jt808.actor`` and ``jt808.source`` (``storage.access.set_actor``); an unnamed write is
# logged as the database role that made it.  Rewrites that change nothing (a re-import) are
# not logged.

_ACCESS = """
CREATE TABLE operator_users (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    role text NOT NULL CHECK (role IN ('viewer', 'dispatcher', 'admin')),
    unit text CHECK (unit <> ''),                -- NULL: every unit
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE operator_tokens (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name text NOT NULL REFERENCES operator_users (name),
    prefix text NOT NULL,                        -- the token's first characters, to name it
    sha256 bytea NOT NULL UNIQUE,                -- of the whole token
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,                      -- NULL: never
    revoked_at timestamptz
);
CREATE INDEX operator_tokens_prefix ON operator_tokens (prefix);

CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,                         -- operator account, or the OS user of the CLI
    source text NOT NULL,                        -- client address, 'cli' or 'database'
    action text NOT NULL,                        -- e.g. vehicle.exempt, filing.insert
    object_kind text NOT NULL,
    object_key text,
    unit text,                                   -- the unit the object belongs to, if any
    before jsonb,
    after jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, at);

CREATE FUNCTION jt808_audit_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.at := now();                             -- the database's time, never a client's
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_stamp BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION jt808_audit_stamp();

CREATE FUNCTION jt808_audit_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION jt808_audit_frozen();

CREATE FUNCTION jt808_audit_actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('jt808.actor', true), ''), 'db:' || session_user)
$$;
CREATE FUNCTION jt808_audit_source() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('jt808.source', true), ''), 'database')
$$;

CREATE FUNCTION jt808_audit_masterdata() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    v_row jsonb := coalesce(new_row, old_row);
    v_kind text := CASE TG_TABLE_NAME WHEN 'vehicles' THEN 'vehicle' WHEN 'fences' THEN 'fence'
                 ELSE 'filing' END;
    v_action text := v_kind || '.' || lower(TG_OP);
    v_key text;
    v_unit text;
BEGIN
    IF TG_OP = 'UPDATE' AND (old_row - 'updated_at') = (new_row - 'updated_at') THEN
        RETURN NULL;                             -- rewritten unchanged
    END IF;
    IF v_kind = 'vehicle' THEN
        v_key := v_row->>'plate';
        v_unit := v_row->>'unit';
        IF TG_OP = 'UPDATE' AND old_row->'exempt' IS DISTINCT FROM new_row->'exempt' THEN
            v_action := 'vehicle.exempt';
        END IF;
    ELSIF v_kind = 'fence' THEN
        v_key := v_row->>'name';
        v_unit := v_row->>'unit';
    ELSE
        v_key := v_row->>'id';
        SELECT v.unit INTO v_unit FROM vehicles v WHERE v.id = (v_row->>'vehicle_id')::bigint;
    END IF;
    INSERT INTO audit_log (actor, source, action, object_kind, object_key, unit, before, after)
    VALUES (jt808_audit_actor(), jt808_audit_source(), v_action, v_kind, v_key, v_unit,
            old_row, new_row);
    RETURN NULL;
END
$$;
CREATE FUNCTION jt808_audit_truncate() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO audit_log (actor, source, action, object_kind)
    VALUES (jt808_audit_actor(), jt808_audit_source(), TG_TABLE_NAME || '.truncate',
            TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER vehicles_audit AFTER INSERT OR UPDATE OR DELETE ON vehicles
    FOR EACH ROW EXECUTE FUNCTION jt808_audit_masterdata();
CREATE TRIGGER fences_audit AFTER INSERT OR UPDATE OR DELETE ON fences
    FOR EACH ROW EXECUTE FUNCTION jt808_audit_masterdata();
CREATE TRIGGER filings_audit AFTER INSERT OR UPDATE OR DELETE ON filings
    FOR EACH ROW EXECUTE FUNCTION jt808_audit_masterdata();
CREATE TRIGGER vehicles_audit_truncate AFTER TRUNCATE ON vehicles
    FOR EACH STATEMENT EXECUTE FUNCTION jt808_audit_truncate();
CREATE TRIGGER fences_audit_truncate AFTER TRUNCATE ON fences
    FOR EACH STATEMENT EXECUTE FUNCTION jt808_audit_truncate();
CREATE TRIGGER filings_audit_truncate AFTER TRUNCATE ON filings
    FOR EACH STATEMENT EXECUTE FUNCTION jt808_audit_truncate();
"""

MIGRATIONS = (*MIGRATIONS, Migration(12, "operator accounts, tokens and the audit trail", _ACCESS))


# ---------------------------------------------------------------------------------------------
# Migration 13: filings the platform stamps (article 21: an emergency trip is back-filed within
# 3 working days; late or false back-filing is reported), and their versions.
#
# ``received_at`` is when a filing first reached the platform, by the database's clock; no
# client sets it.  ``filed_at`` is what the rules count a filing from: the receipt, except for
# an explicit historical import (``jt808 filings import --historical``, which sets the
# transaction-local setting ``jt808.historical``) that keeps the file's time.  What a client
# claimed as its filing time is kept in ``claimed_filed_at``.  Every change of a filing's
# content is a new row of ``filing_versions`` (append-only), with its own receipt time: the
# rules judge each moment by the version in force then, and a filing corrected after its trip
# shows as such.  Rows from before this migration become version 1, received when they said.

_FILING_RECEIPTS = """
ALTER TABLE filings ADD COLUMN received_at timestamptz;
-- Filled in with the table's own triggers off: it is not a change of any filing (no new
-- master-data version, no audit row).
ALTER TABLE filings DISABLE TRIGGER USER;
UPDATE filings SET received_at = filed_at;
ALTER TABLE filings ENABLE TRIGGER USER;
ALTER TABLE filings ALTER COLUMN received_at SET NOT NULL,
    ALTER COLUMN received_at SET DEFAULT now(),
    ADD COLUMN claimed_filed_at timestamptz,
    ADD COLUMN historical boolean NOT NULL DEFAULT false,
    ADD COLUMN version integer NOT NULL DEFAULT 1;

CREATE TABLE filing_versions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    filing_id bigint NOT NULL REFERENCES filings (id),
    version integer NOT NULL,
    received_at timestamptz NOT NULL,            -- this version's arrival (database time)
    filed_at timestamptz NOT NULL,               -- what the rules count it from
    claimed_filed_at timestamptz,                -- what the client said, if anything
    historical boolean NOT NULL,
    vehicle_id bigint NOT NULL,
    starts_at timestamptz NOT NULL,
    ends_at timestamptz NOT NULL,
    destination_fence bigint,
    purpose text NOT NULL,
    passengers text NOT NULL,
    approver text NOT NULL,
    state text NOT NULL,
    UNIQUE (filing_id, version)
);
CREATE INDEX filing_versions_received ON filing_versions (received_at);
INSERT INTO filing_versions (filing_id, version, received_at, filed_at, historical,
    vehicle_id, starts_at, ends_at, destination_fence, purpose, passengers, approver, state)
SELECT id, 1, received_at, filed_at, false, vehicle_id, starts_at, ends_at,
       destination_fence, purpose, passengers, approver, state
FROM filings;

CREATE FUNCTION jt808_filing_stamp() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    historical boolean := coalesce(current_setting('jt808.historical', true), '') = 'on';
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.version := 1;
        NEW.received_at := now();
        NEW.historical := historical;
        IF NOT historical THEN
            NEW.filed_at := now();
        END IF;
        RETURN NEW;
    END IF;
    NEW.received_at := OLD.received_at;
    NEW.filed_at := OLD.filed_at;                -- the first version's
    IF (NEW.vehicle_id, NEW.starts_at, NEW.ends_at, NEW.destination_fence, NEW.purpose,
        NEW.passengers, NEW.approver, NEW.state)
       IS NOT DISTINCT FROM
       (OLD.vehicle_id, OLD.starts_at, OLD.ends_at, OLD.destination_fence, OLD.purpose,
        OLD.passengers, OLD.approver, OLD.state) THEN
        NEW.version := OLD.version;              -- the same content again: no new version
        NEW.claimed_filed_at := OLD.claimed_filed_at;
        NEW.historical := OLD.historical;
    ELSE
        NEW.version := OLD.version + 1;
        NEW.historical := historical;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER filings_stamp BEFORE INSERT OR UPDATE ON filings
    FOR EACH ROW EXECUTE FUNCTION jt808_filing_stamp();

CREATE FUNCTION jt808_filing_version() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.version = OLD.version THEN
        RETURN NULL;
    END IF;
    INSERT INTO filing_versions (filing_id, version, received_at, filed_at, claimed_filed_at,
        historical, vehicle_id, starts_at, ends_at, destination_fence, purpose, passengers,
        approver, state)
    VALUES (NEW.id, NEW.version, now(),
        CASE WHEN NEW.historical THEN coalesce(NEW.claimed_filed_at, NEW.filed_at) ELSE now() END,
        NEW.claimed_filed_at, NEW.historical, NEW.vehicle_id, NEW.starts_at, NEW.ends_at,
        NEW.destination_fence, NEW.purpose, NEW.passengers, NEW.approver, NEW.state);
    RETURN NULL;
END
$$;
CREATE TRIGGER filings_versioned AFTER INSERT OR UPDATE ON filings
    FOR EACH ROW EXECUTE FUNCTION jt808_filing_version();

CREATE FUNCTION jt808_filing_versions_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$$;
-- (TRUNCATE stays possible: it takes the filings with it, through the foreign key.)
CREATE TRIGGER filing_versions_append_only BEFORE UPDATE OR DELETE
    ON filing_versions FOR EACH STATEMENT EXECUTE FUNCTION jt808_filing_versions_frozen();
"""

MIGRATIONS = (
    *MIGRATIONS,
    Migration(13, "filings the platform stamps, and their versions", _FILING_RECEIPTS),
)

# ---------------------------------------------------------------------------------------------
# Migration 14: the operator console's notes on alerts, and the reason for an exempt change.
#
# ``alert_notes``: an operator's comments on an alert, each optionally acknowledging it,
# append-only like the audit trail (its time is the database's).  No foreign key to alerts:
# the notes are the operators' record, and the engine's table of alerts must not depend on
# them.  ``audit_log.reason``: why a change was made, given by the writer
# with the transaction-local setting ``jt808.reason`` (the operator port asks for one when a
# vehicle's exempt flag changes); the master-data trigger records it.

_CONSOLE = """
CREATE TABLE alert_notes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    source text NOT NULL,
    text text NOT NULL CHECK (length(text) BETWEEN 1 AND 2000),
    acknowledged boolean NOT NULL DEFAULT false
);
CREATE INDEX alert_notes_alert ON alert_notes (alert_id, id);
CREATE TRIGGER alert_notes_stamp BEFORE INSERT ON alert_notes
    FOR EACH ROW EXECUTE FUNCTION jt808_audit_stamp();
CREATE TRIGGER alert_notes_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON alert_notes
    FOR EACH STATEMENT EXECUTE FUNCTION jt808_filing_versions_frozen();

ALTER TABLE audit_log ADD COLUMN reason text;

CREATE OR REPLACE FUNCTION jt808_audit_masterdata() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    v_row jsonb := coalesce(new_row, old_row);
    v_kind text := CASE TG_TABLE_NAME WHEN 'vehicles' THEN 'vehicle' WHEN 'fences' THEN 'fence'
                 ELSE 'filing' END;
    v_action text := v_kind || '.' || lower(TG_OP);
    v_key text;
    v_unit text;
BEGIN
    IF TG_OP = 'UPDATE' AND (old_row - 'updated_at') = (new_row - 'updated_at') THEN
        RETURN NULL;                             -- rewritten unchanged
    END IF;
    IF v_kind = 'vehicle' THEN
        v_key := v_row->>'plate';
        v_unit := v_row->>'unit';
        IF TG_OP = 'UPDATE' AND old_row->'exempt' IS DISTINCT FROM new_row->'exempt' THEN
            v_action := 'vehicle.exempt';
        END IF;
    ELSIF v_kind = 'fence' THEN
        v_key := v_row->>'name';
        v_unit := v_row->>'unit';
    ELSE
        v_key := v_row->>'id';
        SELECT v.unit INTO v_unit FROM vehicles v WHERE v.id = (v_row->>'vehicle_id')::bigint;
    END IF;
    INSERT INTO audit_log (actor, source, action, object_kind, object_key, unit, before, after,
                           reason)
    VALUES (jt808_audit_actor(), jt808_audit_source(), v_action, v_kind, v_key, v_unit,
            old_row, new_row, nullif(current_setting('jt808.reason', true), ''));
    RETURN NULL;
END
$$;
"""

MIGRATIONS = (*MIGRATIONS, Migration(14, "alert notes; the reason of an audited change", _CONSOLE))
