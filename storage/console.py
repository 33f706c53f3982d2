"""The operator console's reads and its one write (alert notes, migration 14), as plain rows.

* :func:`latest_positions` -- every vehicle's latest position (by device time), in one query:
  a probe of the natural-key index (phone leads it) per vehicle.  On the partitioned backend
  a probe with no time bound visits every daily partition (the DEFAULT partition rules out an
  ordered scan), so each vehicle is first looked up among the recent partitions only
  (:data:`RECENT`, pruned when the query is planned) and only a vehicle silent for longer gets
  the probe of every partition.  Measured on PostgreSQL 15 with 10,000 vehicles and 129 daily
  partitions: 160 ms when all of them reported within :data:`RECENT`, 370 ms with a tenth
  silent, against 920 ms for the unbounded probe (``vehicle_latest_position``).  With
  ``received_since`` it reads only the positions received since then (the BRIN index on
  ``received_at``).
* :func:`track` -- a vehicle's positions in a window, evenly thinned to at most a cap, with
  its trips and alerts.
* :func:`alert_list`, :func:`alert_detail`, :func:`add_note` -- alerts with their notes; a note
  is appended together with its audit row, in one transaction.

Every function takes a sync psycopg connection in autocommit mode.  Times are returned as
``datetime`` (the adapter makes them JSON).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from storage.access import append_audit

# A vehicle is looked up among the partitions of this window first.  Most of a fleet reports
# every day; two days cover a weekend's parked cars without visiting older partitions.
RECENT = timedelta(days=2)
# The alerts a track answers with at most: a month of one vehicle's alerts is a few dozen; a
# thousand means a rule misfiring, and the first thousand show it.
MAX_TRACK_ALERTS = 1_000
# The events of one alert an alert's detail lists at most: an alert changes state a handful of
# times (opened, pending, resolved); the cap bounds a misbehaving one.
MAX_ALERT_EVENTS = 1_000
# The notes of one alert its detail lists at most: operators write a few per alert.
MAX_ALERT_NOTES = 1_000
# The longest note: a paragraph or two of an operator's remarks (also a CHECK in migration 14).
MAX_NOTE_CHARS = 2_000

_POSITION = "p.device_time, p.received_at, p.lat, p.lon, p.speed_kmh, p.direction"  # in every probe

_LATEST = f"""
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.phone,
       coalesce(r.device_time, f.device_time) AS device_time,
       coalesce(r.received_at, f.received_at) AS received_at,
       coalesce(r.lat, f.lat) AS lat, coalesce(r.lon, f.lon) AS lon,
       coalesce(r.speed_kmh, f.speed_kmh) AS speed_kmh,
       coalesce(r.direction, f.direction) AS direction
FROM vehicles v
LEFT JOIN LATERAL (
    SELECT {_POSITION} FROM positions p
    WHERE p.phone = v.phone AND p.device_time >= %(recent)s
    ORDER BY p.device_time DESC LIMIT 1
) r ON true
LEFT JOIN LATERAL (
    SELECT {_POSITION} FROM positions p
    WHERE r.device_time IS NULL AND p.phone = v.phone
    ORDER BY p.device_time DESC LIMIT 1
) f ON true
WHERE v.phone IS NOT NULL AND coalesce(r.device_time, f.device_time) IS NOT NULL
ORDER BY v.id
"""  # noqa: S608 - constants only

_RECEIVED_SINCE = f"""
SELECT v.id AS vehicle_id, v.plate, v.unit, v.category, v.phone, p.*
FROM (
    SELECT DISTINCT ON (p.phone) p.phone AS position_phone, {_POSITION}
    FROM positions p
    WHERE p.received_at >= %(since)s
    ORDER BY p.phone, p.device_time DESC
) p
JOIN vehicles v ON v.phone = p.position_phone
ORDER BY v.id
"""  # noqa: S608 - constants only


def latest_positions(
    conn: psycopg.Connection[Any], now: datetime, received_since: datetime | None = None
) -> list[dict[str, Any]]:
    """One row per vehicle with a terminal and a position (its latest by device time):
    ``vehicle_id, plate, unit, category, phone, device_time, received_at, lat, lon, speed_kmh,
    direction``, by vehicle id.  With ``received_since``: only the vehicles with positions
    received at or after it, each with the latest of those (the caller merges by device
    time)."""
    with conn.cursor(row_factory=dict_row) as cur:
        if received_since is None:
            rows = cur.execute(_LATEST, {"recent": now - RECENT}).fetchall()
        else:
            rows = cur.execute(_RECEIVED_SINCE, {"since": received_since}).fetchall()
    for row in rows:
        row.pop("position_phone", None)
    return rows


def alerting_vehicles(conn: psycopg.Connection[Any]) -> set[int]:
    """The vehicles with an alert in state open or pending_backfill (the partial index
    ``alerts_active`` holds exactly those)."""
    rows = conn.execute(
        "SELECT DISTINCT vehicle_id FROM alerts WHERE state IN ('open', 'pending_backfill')"
    ).fetchall()
    return {int(r[0]) for r in rows}


def vehicle(conn: psycopg.Connection[Any], vehicle_id: int) -> dict[str, Any] | None:
    """``id, plate, phone, unit, category, exempt, max_speed_kmh`` of a vehicle, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, plate, phone, unit, category, exempt, max_speed_kmh FROM vehicles "
            "WHERE id = %s",
            (vehicle_id,),
        ).fetchone()


def track(
    conn: psycopg.Connection[Any],
    vehicle_id: int,
    start: datetime,
    end: datetime,
    *,
    max_points: int,
) -> dict[str, Any]:
    """The vehicle's positions with device time in [start, end) (through the terminals bound
    to it, positions resolved to it), oldest first, evenly thinned to ``max_points`` (the
    first of each of ``max_points`` equal runs); ``thinned`` tells whether any was left out.
    With its trips overlapping the window and the alerts opened in it (records, oldest first,
    at most :data:`MAX_TRACK_ALERTS`)."""
    phones = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT phone FROM terminal_bindings WHERE vehicle_id = %s", (vehicle_id,)
        )
    ]
    with conn.cursor(row_factory=dict_row) as cur:
        points = cur.execute(
            "SELECT device_time, lat, lon, speed_kmh, direction, total FROM ("
            "  SELECT DISTINCT ON (bucket) * FROM ("
            "    SELECT device_time, lat, lon, speed_kmh, direction, count(*) OVER () AS total,"
            "           ntile(%(max)s) OVER (ORDER BY device_time) AS bucket"
            "    FROM positions WHERE phone = ANY(%(phones)s) AND vehicle_id = %(vehicle)s"
            "    AND device_time >= %(start)s AND device_time < %(end)s"
            "  ) t ORDER BY bucket, device_time"
            ") b ORDER BY device_time",
            {
                "max": max_points,
                "phones": phones,
                "vehicle": vehicle_id,
                "start": start,
                "end": end,
            },
        ).fetchall()
        trips = cur.execute(
            "SELECT started_at, ended_at, distance_km, filing_id FROM trips "
            "WHERE vehicle_id = %s AND started_at < %s AND coalesce(ended_at, 'infinity') > %s "
            "ORDER BY started_at",
            (vehicle_id, end, start),
        ).fetchall()
    alerts = conn.execute(
        "SELECT record FROM alerts WHERE vehicle_id = %s AND opened_at >= %s AND opened_at < %s "
        "ORDER BY opened_at, id LIMIT %s",
        (vehicle_id, start, end, MAX_TRACK_ALERTS),
    ).fetchall()
    total = int(points[0]["total"]) if points else 0
    for point in points:
        del point["total"]
    return {
        "positions": points,
        "thinned": total > len(points),
        "trips": trips,
        "alerts": [dict(r[0]) for r in alerts],
    }


_NOTES = (
    "LEFT JOIN LATERAL (SELECT count(*) AS notes, coalesce(bool_or(acknowledged), false) AS ack "
    "FROM alert_notes n WHERE n.alert_id = a.id) n ON true"
)


def alert_list(
    conn: psycopg.Connection[Any],
    *,
    since: datetime | None,
    until: datetime | None,
    unit: str | None,
    rule: str | None,
    state: str | None,
    severity: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Alert records opened in [since, until) (None: unbounded) matching the filters, newest
    first, at most ``limit``; each with ``acknowledged`` (a note acknowledged it) and
    ``notes`` (how many it has)."""
    if any(v is not None and "\x00" in v for v in (unit, rule, state, severity)):
        return []  # text PostgreSQL cannot hold matches nothing
    rows = conn.execute(
        f"SELECT a.record, n.notes, n.ack FROM alerts a {_NOTES} "  # noqa: S608 - constants
        "WHERE (%(since)s::timestamptz IS NULL OR a.opened_at >= %(since)s::timestamptz) "
        "AND (%(until)s::timestamptz IS NULL OR a.opened_at < %(until)s::timestamptz) "
        "AND (%(unit)s::text IS NULL OR a.unit = %(unit)s::text) "
        "AND (%(rule)s::text IS NULL OR a.rule = %(rule)s::text) "
        "AND (%(state)s::text IS NULL OR a.state = %(state)s::text) "
        "AND (%(severity)s::text IS NULL OR a.severity = %(severity)s::text) "
        "ORDER BY a.opened_at DESC, a.id DESC LIMIT %(limit)s",
        {
            "since": since,
            "until": until,
            "unit": unit,
            "rule": rule,
            "state": state,
            "severity": severity,
            "limit": limit,
        },
    ).fetchall()
    return [{**dict(r[0]), "acknowledged": bool(r[2]), "notes": int(r[1])} for r in rows]


def alert_detail(conn: psycopg.Connection[Any], alert_id: str) -> dict[str, Any] | None:
    """The alert's record with ``events`` (``seq, at, alert``, oldest first) and ``notes``
    (``at, user, text, acknowledged``, oldest first); None when there is no such alert."""
    if "\x00" in alert_id:
        return None
    found = conn.execute("SELECT record FROM alerts WHERE id = %s", (alert_id,)).fetchone()
    if found is None:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        events = cur.execute(
            "SELECT seq, at, alert FROM alert_events WHERE alert_id = %s ORDER BY seq LIMIT %s",
            (alert_id, MAX_ALERT_EVENTS),
        ).fetchall()
        notes = cur.execute(
            'SELECT at, actor AS "user", text, acknowledged FROM alert_notes '
            "WHERE alert_id = %s ORDER BY id LIMIT %s",
            (alert_id, MAX_ALERT_NOTES),
        ).fetchall()
    return {**dict(found[0]), "events": events, "notes": notes}


def alert_unit(conn: psycopg.Connection[Any], alert_id: str) -> str | None:
    """The unit of the alert (None: no such alert)."""
    if "\x00" in alert_id:
        return None
    found = conn.execute("SELECT unit FROM alerts WHERE id = %s", (alert_id,)).fetchone()
    return None if found is None else str(found[0])


def add_note(
    conn: psycopg.Connection[Any],
    alert_id: str,
    *,
    text: str,
    acknowledge: bool,
    actor: str,
    source: str,
) -> dict[str, Any] | None:
    """Append a note (``at, user, text, acknowledged``) to the alert, and its audit row
    (``alert.acknowledge`` or ``alert.note``), in one transaction; None when there is no such
    alert.  ValueError for a text that is empty or longer than :data:`MAX_NOTE_CHARS`."""
    if not 1 <= len(text) <= MAX_NOTE_CHARS:
        raise ValueError(f"text must be 1 to {MAX_NOTE_CHARS} characters")
    with conn.transaction():
        conn.execute(
            "SELECT set_config('jt808.actor', %s, true), set_config('jt808.source', %s, true)",
            (actor, source),
        )
        unit = alert_unit(conn, alert_id)
        if unit is None:
            return None
        with conn.cursor(row_factory=dict_row) as cur:
            note = cur.execute(
                "INSERT INTO alert_notes (alert_id, actor, source, text, acknowledged) "
                "VALUES (%s, %s, %s, %s, %s) "
                'RETURNING at, actor AS "user", text, acknowledged',
                (alert_id, actor, source, text, acknowledge),
            ).fetchone()
        assert note is not None  # RETURNING always yields the row
        append_audit(
            conn,
            action="alert.acknowledge" if acknowledge else "alert.note",
            kind="alert",
            key=alert_id,
            unit=unit,
            after={"text": text, "acknowledged": acknowledge},
        )
    return note
