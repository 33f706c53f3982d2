"""What an operator needs to know about the database at a glance (``jt808 db status``).

:func:`database_status` reads, without changing anything: the backend and schema version; the
positions storage (day partitions, or TimescaleDB chunks with their compression), its size and
the rows that fell into the default partition (a day without its partition); the retention and
compression settings and background jobs with their last result (TimescaleDB); the positions
of the last :data:`RECENT_DAYS` days without a vehicle; the rule engines and how far they
judged; the daily statistics' watermark.  Every query is cheap: counts are limited to recent
partitions, and what the backend does not have is left out.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from storage.schema import current_backend, timescale_schema

RECENT_DAYS = 7  # positions without a vehicle are counted over this many days


def database_status(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The status as a JSON-ready dict (see the module docstring)."""
    backend = current_backend(conn)
    out: dict[str, Any] = {"backend": backend, "schema_version": _schema_version(conn)}
    if backend is None:
        return out
    out["positions"] = (
        _timescale_positions(conn) if backend == "timescaledb" else _partitioned_positions(conn)
    )
    out["unlinked_positions_recent"] = _one(
        conn,
        "SELECT count(*) FROM positions WHERE vehicle_id IS NULL AND device_time >= now() - %s",
        (timedelta(days=RECENT_DAYS),),
    )
    out["unlinked_recent_days"] = RECENT_DAYS
    if _has(conn, "terminal_bindings"):
        bindings = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE valid_to IS NULL) FROM terminal_bindings"
        ).fetchone()
        out["terminal_bindings"] = {
            "open": bindings[1] if bindings else 0,
            "closed": bindings[0] - bindings[1] if bindings else 0,
        }
    out["rules"] = _rules(conn)
    out["daily_stats_refreshed_to"] = _iso(
        _one(conn, "SELECT received_to FROM daily_stats_refresh")
        if _has(conn, "daily_stats_refresh")
        else None
    )
    if _has(conn, "daily_stats_pending"):
        # days whose positions changed vehicle, recomputed at the next refresh
        out["daily_stats_days_pending"] = _one(conn, "SELECT count(*) FROM daily_stats_pending")
    return out


def format_status(status: dict[str, Any]) -> str:
    """One screen of ``name: value`` lines."""
    lines = [
        f"backend: {status.get('backend') or 'none (not migrated)'}",
        f"schema version: {status.get('schema_version')}",
    ]
    positions = status.get("positions") or {}
    for key, value in positions.items():
        if isinstance(value, list):
            lines.append(f"positions {key.replace('_', ' ')}:")
            lines.extend(f"  {_line(item)}" for item in value)
        else:
            lines.append(f"positions {key.replace('_', ' ')}: {value}")
    if "unlinked_positions_recent" in status:
        lines.append(
            f"positions without a vehicle (last {status['unlinked_recent_days']} days): "
            f"{status['unlinked_positions_recent']}"
        )
    bindings = status.get("terminal_bindings")
    if bindings:
        lines.append(
            f"terminal bindings: {bindings['open']} open, {bindings['closed']} closed (history)"
        )
    rules = status.get("rules") or {}
    if rules:
        lines.append(
            f"rule engines alive: {rules['engines_alive']}; partitions judged: "
            f"{rules['partitions_saved']} of {rules['partitions']}; oldest state saved "
            f"{rules['oldest_state_saved_at']}"
        )
    if "daily_stats_refreshed_to" in status:
        lines.append(f"daily statistics refreshed to: {status['daily_stats_refreshed_to']}")
    if "daily_stats_days_pending" in status:
        lines.append(f"daily statistics days to recompute: {status['daily_stats_days_pending']}")
    return "\n".join(lines)


def _line(item: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in item.items())


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    if not _has(conn, "jt808_schema_migrations"):
        return None
    value = _one(conn, "SELECT max(version) FROM jt808_schema_migrations")
    return None if value is None else int(value)


def _partitioned_positions(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    rows = conn.execute(
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'positions'::regclass "
        "ORDER BY c.relname"
    ).fetchall()
    days = [name for name, _ in rows if name != "positions_default"]
    return {
        "partitions": len(days),
        "first_partition": days[0] if days else None,
        "last_partition": days[-1] if days else None,
        "size_mb": round(sum(size for _, size in rows) / 2**20, 1),
        # Rows here had no day partition when stored: ensure_partitions moves them out.
        "rows_in_default_partition": _one(conn, "SELECT count(*) FROM positions_default"),
    }


def _timescale_positions(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Chunks, compression, and the background jobs (written for TimescaleDB 2.x)."""
    ts = sql.SQL(timescale_schema(conn))
    info = sql.SQL("timescaledb_information")
    chunks = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE is_compressed) FROM {}.chunks "
            "WHERE hypertable_name = 'positions'"
        ).format(info)
    ).fetchone()
    size = _one(conn, sql.SQL("SELECT {}.hypertable_size('positions')").format(ts))
    ratio = conn.execute(
        sql.SQL(
            "SELECT before_compression_total_bytes, after_compression_total_bytes "
            "FROM {}.hypertable_compression_stats('positions')"
        ).format(ts)
    ).fetchone()
    jobs = conn.execute(
        sql.SQL(
            "SELECT j.job_id, j.proc_name, j.hypertable_name, j.schedule_interval::text, "
            "j.config::text, s.last_run_status, "
            # -infinity until a job first succeeds (seen on TimescaleDB 2.28.3)
            "CASE WHEN isfinite(s.last_successful_finish) THEN s.last_successful_finish END, "
            "s.total_failures "
            "FROM {info}.jobs j LEFT JOIN {info}.job_stats s USING (job_id) ORDER BY j.job_id"
        ).format(info=info)
    ).fetchall()
    return {
        "chunks": chunks[0] if chunks else 0,
        "compressed_chunks": chunks[1] if chunks else 0,
        "size_mb": round((size or 0) / 2**20, 1),
        "compression_ratio": (
            round(ratio[0] / ratio[1], 1) if ratio and ratio[0] and ratio[1] else None
        ),
        "jobs": [
            {
                "id": job_id,
                "job": name,
                "on": table,
                "every": every,
                "settings": config,  # drop_after, compress_after: retention, compression
                "last": status,
                "last_success": _iso(finished),
                "failures": failures,
            }
            for job_id, name, table, every, config, status, finished, failures in jobs
        ],
    }


def _rules(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    if not _has(conn, "rule_state"):
        return {}
    from storage.rule_log import ENGINE_GONE_S, PARTS  # noqa: PLC0415

    alive = _one(
        conn,
        "SELECT count(*) FROM rule_engines WHERE seen_at > now() - make_interval(secs => %s)",
        (ENGINE_GONE_S,),
    )
    saved = conn.execute("SELECT count(*), min(saved_at) FROM rule_state").fetchone()
    return {
        "partitions": PARTS,
        "engines_alive": alive,
        "partitions_saved": saved[0] if saved else 0,
        "oldest_state_saved_at": _iso(saved[1] if saved else None),
    }


def _has(conn: psycopg.Connection[Any], table: str) -> bool:
    return _one(conn, "SELECT to_regclass(%s) IS NOT NULL", (table,)) is True


def _one(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
