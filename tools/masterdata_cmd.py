"""Shared wiring of the master-data commands (``jt808 vehicles|fences|filings import``) and the
conversions between stored rows and the engine's objects.

Application wiring: imports ``storage``, ``geofence`` and ``alerts``.  The rule service uses
:func:`registry_from_rows`, :func:`fences_from_rows` and :func:`filings_from_rows` to build the
engine's inputs from :mod:`storage.masterdata`'s loads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, time
from pathlib import Path
from typing import Any

import psycopg

from alerts.model import Filing, Registry, Vehicle
from geofence.geojson import fences_from_geojson, fences_to_geojson
from geofence.model import DailyWindow, Fence, PeriodWindow
from storage import StorageError, database_dsn, migrate
from storage.access import set_actor
from tools.access_db import cli_user
from tools.db_cmd import add_database_arguments, resolve
from tools.text import TextFileError, progress, read_text

logger = logging.getLogger(__name__)

EXIT_FAILED = 1


def add_import_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("action", choices=["import"], help=f"import: load {what} from FILE")
    parser.add_argument("file", type=Path, metavar="FILE")
    add_encoding_argument(parser)
    add_database_arguments(parser)


def add_encoding_argument(parser: argparse.ArgumentParser) -> None:
    """``--encoding`` of an import (default: detected, see :mod:`tools.text`)."""
    parser.add_argument(
        "--encoding",
        metavar="NAME",
        help="the file's encoding, e.g. gbk (default: detected: UTF-8 with or without BOM, "
        "else GB 18030, which covers GBK)",
    )


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the configured (or embedded) database, schema migrated; its writes
    are named in the audit trail by the user running the command (source ``cli``)."""
    configured, data_dir = resolve(args)
    with (
        database_dsn(configured, data_dir / "pgdata") as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        migrate(conn)
        set_actor(conn, cli_user(), "cli")
        yield conn


def run_import(
    args: argparse.Namespace, load: Callable[[str, psycopg.Connection[Any]], int], what: str
) -> int:
    """Read FILE (``--encoding``, else detected: :func:`tools.text.read_text`) and ``load``
    it; the result line goes to standard output, errors to the log and give exit status 1."""
    try:
        text, encoding = read_text(args.file, getattr(args, "encoding", None))
    except TextFileError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - reported
        return EXIT_FAILED
    if progress():
        lines = text.count("\n")
        print(f"{args.file}: read as {encoding}, {lines} line(s); storing ...", file=sys.stderr)
    try:
        with connect(args) as conn:
            count = load(text, conn)
    except ValueError as exc:  # geofence.GeoJSONError and friends
        _report(args.file, exc)
        return EXIT_FAILED
    except (StorageError, psycopg.Error) as exc:
        _report(args.file, exc)
        return EXIT_FAILED
    print(f"imported {count} {what} from {args.file} (read as {encoding})", flush=True)
    return 0


def _report(path: Path, exc: Exception) -> None:
    problems = getattr(exc, "problems", None)
    if problems:
        logger.error("%s: %d problem(s), nothing imported", path, len(problems))
        for problem in problems:
            logger.error("%s: %s", path, problem)
    else:
        logger.error("%s: %s", path, exc)


# ---------------------------------------------------------------------------------------------
# rows <-> engine objects


def registry_from_rows(rows: Sequence[Mapping[str, Any]]) -> Registry:
    """The engine's registry from ``load_registry_rows`` (vehicles without a terminal left out)."""
    return Registry(
        [
            Vehicle(
                id=int(r["id"]),
                phone=str(r["phone"]),
                plate=str(r["plate"]),
                unit=str(r["unit"]),
                category=str(r["category"]),
                exempt=bool(r["exempt"]),
                max_speed_kmh=r["max_speed_kmh"],
            )
            for r in rows
            if r["phone"] is not None
        ]
    )


def fence_row(fence: Fence) -> dict[str, Any]:
    """A fence as a row for ``storage.masterdata.upsert_fences`` (id kept)."""
    feature = fences_to_geojson([fence])["features"][0]
    window = fence.window
    return {
        "id": fence.id,
        "name": fence.name,
        "kind": fence.kind.value,
        "shape": type(fence.shape).__name__.lower(),
        "geometry": feature["geometry"],
        "radius_m": feature["properties"].get("radius_m"),
        "unit": fence.unit,
        "daily_start": window.start if isinstance(window, DailyWindow) else None,
        "daily_end": window.end if isinstance(window, DailyWindow) else None,
        "period_start": window.start if isinstance(window, PeriodWindow) else None,
        "period_end": window.end if isinstance(window, PeriodWindow) else None,
        "max_speed_kmh": fence.max_speed_kmh,
        "overspeed_duration_s": fence.overspeed_duration_s,
        "night_max_speed_kmh": fence.night_max_speed_kmh,
        "area_id": fence.area_id,
    }


def _iso(value: time | datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def fences_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[Fence]:
    """Fences from ``load_fence_rows``, through the GeoJSON parser (one set of checks)."""
    features = []
    for r in rows:
        props: dict[str, Any] = {"name": r["name"], "kind": r["kind"], "shape": r["shape"]}
        for key in ("radius_m", "unit", "max_speed_kmh", "overspeed_duration_s"):
            if r[key] is not None:
                props[key] = r[key]
        for key in ("night_max_speed_kmh", "area_id"):
            if r[key] is not None:
                props[key] = r[key]
        start = _iso(r["daily_start"]) or _iso(r["period_start"])
        end = _iso(r["daily_end"]) or _iso(r["period_end"])
        if start is not None:
            props["start_time"], props["end_time"] = start, end
        features.append(
            {"type": "Feature", "id": int(r["id"]), "geometry": r["geometry"], "properties": props}
        )
    return fences_from_geojson({"type": "FeatureCollection", "features": features})


def filings_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[Filing]:
    """The engine's filings from ``load_filing_versions`` (or ``load_filing_rows``: one version
    each)."""
    return [
        Filing(
            id=int(r["id"]),
            vehicle=int(r["vehicle_id"]),
            start=r["start"],
            end=r["end"],
            filed_at=r["filed_at"],
            destination_fence=r["destination_fence"],
            purpose=r["purpose"],
            passengers=r["passengers"],
            approver=r["approver"],
            version=int(r.get("version") or 1),
            superseded_at=r.get("superseded_at"),
            claimed_at=r.get("claimed_filed_at"),
        )
        for r in rows
    ]
