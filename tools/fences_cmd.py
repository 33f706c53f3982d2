"""``jt808 fences import FILE.geojson``: permitted areas, forbidden zones, overnight parking and
destinations from a GeoJSON FeatureCollection (format: :mod:`geofence.geojson`).

Fences are matched by their id when the feature gives one, else by name.  ``--replace``
deactivates the fences the file does not contain.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import psycopg

from geofence.geojson import fences_from_geojson
from storage import upsert_fences
from tools.masterdata_cmd import add_import_arguments, fence_row, run_import

EXAMPLES = """\
GeoJSON: a FeatureCollection, one Feature per fence (see geofence/geojson.py):
  geometry        Polygon or MultiPolygon; Point with properties.radius_m (a circle)
  name            required, unique
  kind            permitted, forbidden, parking or destination
  shape           optional: rectangle (an axis-aligned Polygon)
  unit            optional: the fence applies to that unit's vehicles only
  max_speed_kmh, overspeed_duration_s, night_max_speed_kmh, area_id   optional
  start_time, end_time   optional: "HH:MM" daily window, or ISO 8601 period (China time)

examples:
  jt808 fences import fences.geojson
  jt808 fences import fences.geojson --replace --dsn postgresql://jt808@db/jt808

  {"type": "FeatureCollection", "features": [{"type": "Feature",
    "geometry": {"type": "Point", "coordinates": [102.71, 25.04]},
    "properties": {"name": "Bureau car park", "kind": "parking", "radius_m": 150}}]}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_import_arguments(parser, "fences (GeoJSON)")
    parser.add_argument("--replace", action="store_true", help="deactivate the fences not in FILE")


def explicit_id(feature: Any) -> bool:
    if not isinstance(feature, Mapping):
        return False
    props = feature.get("properties")
    return feature.get("id") is not None or (
        isinstance(props, Mapping) and props.get("id") is not None
    )


def _loader(*, replace: bool) -> Any:
    def load(text: str, conn: psycopg.Connection[Any]) -> int:
        try:
            document = json.loads(text)
        except ValueError:
            document = text  # the parser reports it as a GeoJSONError
        fences = fences_from_geojson(document)
        # Every feature became a fence (the parser raises otherwise), in document order.
        features = document["features"]
        rows = []
        for fence, feature in zip(fences, features, strict=True):
            row = fence_row(fence)
            if not explicit_id(feature):
                row["id"] = None  # matched by name, or a new id
            rows.append(row)
        return len(upsert_fences(conn, rows, replace=replace))

    return load


def run(args: argparse.Namespace) -> int:
    return run_import(args, _loader(replace=args.replace), "fences")
