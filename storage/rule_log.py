"""The positions table read as a log by the rule engines (blocking calls; see migration 7).

Every stored position carries ``commit_xid``, the id of the transaction that stored it.  All
transactions with an id below the oldest still running (:func:`horizon`) have finished, so
reading ``[lo, hi)`` with ``hi <= horizon`` returns every row those transactions stored, now
and forever: a consumer that advances its cursor only up to the horizon never skips a
position, whatever order concurrent writers (workers, nodes, a spool replay) commit in.  A
long transaction anywhere on the PostgreSQL server holds the horizon back (the engines' lag
then grows until it ends).

Vehicles are split into :data:`PARTS` fixed partitions by the last four digits of the terminal
phone (the same for the 12- and 20-digit forms of one terminal).  A partition is judged by one
engine at a time: the holder of its session advisory lock, which goes with the holder's
connection if it dies (the lock class is derived from the schema, so installations in
different schemas of one database do not contend).  ``rule_state`` keeps per partition how far
it was judged (``next_xid``: every transaction below it) and the engine's state for its
vehicles at that point, saved together, so a successor resumes exactly there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

PARTS = 16
# The advisory lock namespace of the rule partitions: one per schema.
_LOCK_CLASS = "hashtext('jt808 rules ' || current_schema())"
# An engine not seen for this long is gone: the others take its share.
ENGINE_GONE_S = 10.0

# What an engine judges by, in this order (see ``read``): times as POSIX seconds and the
# odometer in 1/10 km (-1 without one), as the engine takes them, so that no datetime or
# Decimal object is made per row.
LOG_COLUMNS = (
    "commit_xid",
    "phone",
    "device_time",
    "received_at",
    "lon",
    "lat",
    "speed_kmh",
    "status",
    "alarm",
    "mileage",
)
_SELECT = (
    "commit_xid, phone, extract(epoch FROM device_time)::bigint, "
    "extract(epoch FROM received_at)::bigint, lon, lat, speed_kmh, status, alarm, "
    "coalesce(round(mileage_km * 10)::bigint, -1)"
)
# Some devices put hex digits in the BCD phone: those terminals all fall in partition 0.
# (``%%``: the modulo sign escaped for psycopg's placeholders.)
_PART_OF = (
    f"(CASE WHEN right(phone, 4) ~ '^[0-9]+$' THEN right(phone, 4)::int %% {PARTS} ELSE 0 END)"
)


def part_of(phone: str) -> int:
    """The partition of a terminal phone: its last four digits decide (as ``_PART_OF``)."""
    last = phone[-4:]
    return int(last) % PARTS if last.isdigit() and last.isascii() else 0


def horizon(conn: psycopg.Connection[Any]) -> int:
    """The oldest transaction id still running: every transaction below it has finished."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def read(
    conn: psycopg.Connection[Any], lo: int, hi: int, parts: Sequence[int]
) -> list[tuple[Any, ...]]:
    """The positions stored by transactions ``lo <= id < hi`` for phones of ``parts``
    (columns :data:`LOG_COLUMNS`), in no particular order."""
    return conn.execute(
        f"SELECT {_SELECT} FROM positions "  # noqa: S608 - constants
        f"WHERE commit_xid >= %s AND commit_xid < %s AND {_PART_OF} = ANY(%s)",
        (lo, hi, list(parts)),
    ).fetchall()


def history(
    conn: psycopg.Connection[Any],
    phones: Iterable[str],
    since: datetime,
    before_xid: int,
    until: datetime | None = None,
) -> list[tuple[Any, ...]]:
    """Every position of ``phones`` with a device time from ``since`` on (and before
    ``until``), stored by transactions below ``before_xid`` or before the log began (columns
    :data:`LOG_COLUMNS`): what a vehicle's history is judged from again."""
    return conn.execute(
        f"SELECT {_SELECT} FROM positions "  # noqa: S608 - constants
        "WHERE phone = ANY(%s) AND device_time >= %s "
        "AND (%s::timestamptz IS NULL OR device_time < %s) "
        "AND (commit_xid IS NULL OR commit_xid < %s)",
        (list(phones), since, until, until, before_xid),
    ).fetchall()


def load_states(
    conn: psycopg.Connection[Any], parts: Sequence[int]
) -> dict[int, tuple[int, bytes | None]]:
    """``{part: (next_xid, state)}`` of the partitions that have been judged before."""
    rows = conn.execute(
        "SELECT part, next_xid, state FROM rule_state WHERE part = ANY(%s)", (list(parts),)
    ).fetchall()
    return {int(part): (int(next_xid), state) for part, next_xid, state in rows}


def save_states(
    conn: psycopg.Connection[Any], engine: str, states: Mapping[int, tuple[int, bytes | None]]
) -> None:
    """Record how far partitions were judged, with the state at that point (one commit)."""
    with conn.transaction():
        for part, (next_xid, state) in states.items():
            conn.execute(
                "INSERT INTO rule_state (part, next_xid, state, saved_at, engine) "
                "VALUES (%s, %s, %s, now(), %s) ON CONFLICT (part) DO UPDATE SET "
                "next_xid = excluded.next_xid, state = excluded.state, "
                "saved_at = excluded.saved_at, engine = excluded.engine",
                (part, next_xid, state, engine),
            )


def try_lock(conn: psycopg.Connection[Any], part: int) -> bool:
    """Take partition ``part`` for this session if no other session holds it."""
    row = conn.execute(
        f"SELECT pg_try_advisory_lock({_LOCK_CLASS}, %s)",
        (part,),
    ).fetchone()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection[Any], part: int) -> None:
    conn.execute(f"SELECT pg_advisory_unlock({_LOCK_CLASS}, %s)", (part,))


def heartbeat(
    conn: psycopg.Connection[Any], engine: str, parts: Sequence[int], *, host: str = ""
) -> int:
    """Say this engine (on ``host``) is alive and what it holds; return how many engines are
    alive."""
    conn.execute(
        "INSERT INTO rule_engines (engine, seen_at, parts, host) VALUES (%s, now(), %s, %s) "
        "ON CONFLICT (engine) DO UPDATE SET seen_at = now(), parts = excluded.parts",
        (engine, list(parts), host),
    )
    row = conn.execute(
        "SELECT count(*) FROM rule_engines WHERE seen_at > now() - make_interval(secs => %s)",
        (ENGINE_GONE_S,),
    ).fetchone()
    return max(1, int(row[0]) if row else 1)


def leave(conn: psycopg.Connection[Any], engine: str) -> None:
    """This engine stops: the others need not wait for its heartbeat to lapse."""
    conn.execute("DELETE FROM rule_engines WHERE engine = %s", (engine,))
