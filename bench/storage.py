"""Position writer throughput next to a raw binary COPY of the same rows.

    .venv/bin/python bench/storage.py [--dsn DSN] [--quick]

Both sides get the same rows in the same batch size into the same ``positions`` table (two
scratch schemas migrated identically: daily partitions plus DEFAULT, the unique natural key and
the BRIN index).  The raw side is one connection doing ``COPY ... FROM STDIN (FORMAT BINARY)``
with ``set_types`` and ``write_row`` per batch, no dedup.  The writer side is the real
:class:`storage.PositionWriter` (trio, worker threads, one submit per 0x0200-sized message,
completion per submit, exactly-once dedup) timed from the first submit until every completion
has resolved.  Each figure is the median of several runs, each on freshly truncated tables.

Also printed: the writer with ``dedup="staging"`` (every batch through the staging table), a
pass where every row is a repeat, and the cost of building rows with ``position_row``.  The
last line is one JSON object with writer_rows_per_s, raw_copy_rows_per_s and their ratio.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script, this file's folder is first on sys.path and its name would shadow the
# storage package: put the repository root there instead (as pytest does for the tests).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import psycopg  # noqa: E402
import trio  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from protocol.fields import GMT8  # noqa: E402
from protocol.header import Header  # noqa: E402
from protocol.messages.location import (  # noqa: E402
    GnssSatellites,
    IoStatus,
    Location,
    Mileage,
    RawItem,
    SignalStrength,
)
from storage import (  # noqa: E402
    Completion,
    Durability,
    PositionRow,
    PositionWriter,
    WriterConfig,
    migrate,
    position_row,
)
from storage.embedded import database_dsn  # noqa: E402
from storage.pgstore import COPY_DIRECT, JsonTextDumper  # noqa: E402
from storage.rows import COLUMN_TYPES  # noqa: E402

BATCH_ROWS = 5_000
TERMINALS = 2_000
START = datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
RECEIVED = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)


def make_rows(count: int) -> list[PositionRow]:
    """A fleet of TERMINALS terminals reporting every 10 s; typical items, some vendor ones."""
    rows = []
    for i in range(count):
        terminal = i % TERMINALS
        header = Header(msg_id=0x0200, body_length=0, phone=f"0138{terminal:08d}", serial=i)
        items: tuple[Any, ...] = (
            Mileage(value=100_000 + i // TERMINALS),
            SignalStrength(value=25),  # type: ignore[call-arg]
            GnssSatellites(value=12),  # type: ignore[call-arg]
            IoStatus(value=0),  # type: ignore[call-arg]
        )
        if i % 10 == 0:
            items = (*items, RawItem(item_id=0xE1, data=b"\x00\x01\x02\x03"))
        location = Location(
            alarm=0,
            status=0b11,
            latitude=22_500_000 + terminal * 37 + i // TERMINALS,
            longitude=113_900_000 + terminal * 53,
            altitude_m=20,
            speed=400 + i % 200,
            direction=i % 360,
            time=START + timedelta(seconds=10 * (i // TERMINALS)),
            items=items,
        )
        rows.append(position_row(header, location, RECEIVED))
    return rows


def median_rate(rates: Sequence[float]) -> float:
    return statistics.median(rates)


class Bench:
    def __init__(self, dsn: str, rows: list[PositionRow]) -> None:
        self.dsn = dsn
        self.rows = rows
        tag = uuid.uuid4().hex[:8]
        self.schemas = {"writer": f"bench_w_{tag}", "raw": f"bench_r_{tag}"}
        self.dsns = {
            k: make_conninfo(dsn, options=f"-c search_path={s}") for k, s in self.schemas.items()
        }

    @contextlib.contextmanager
    def schemas_ready(self) -> Iterator[None]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for schema in self.schemas.values():
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            for dsn in self.dsns.values():
                with psycopg.connect(dsn) as conn:
                    migrate(conn, now=RECEIVED, days_ahead=2)
            yield
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for schema in self.schemas.values():
                    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    def truncate(self) -> None:
        for dsn in self.dsns.values():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("TRUNCATE positions")
                with contextlib.suppress(psycopg.Error):  # needs superuser; only evens runs out
                    conn.execute("CHECKPOINT")

    def raw_copy(self) -> float:
        with psycopg.connect(self.dsns["raw"], autocommit=True) as conn:
            conn.adapters.register_dumper(None, JsonTextDumper)
            started = time.perf_counter()
            for start in range(0, len(self.rows), BATCH_ROWS):
                with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_DIRECT) as copy:
                    copy.set_types(COLUMN_TYPES)
                    for row in self.rows[start : start + BATCH_ROWS]:
                        copy.write_row(row)
            return len(self.rows) / (time.perf_counter() - started)

    def writer(self, config: WriterConfig, rows: Sequence[PositionRow] | None = None) -> float:
        rows = self.rows if rows is None else rows

        async def main() -> float:
            writer = PositionWriter(self.dsns["writer"], config=config)
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                # open the writer's connections outside the timing
                async with trio.open_nursery() as warm:
                    for _ in range(config.connections):
                        warm.start_soon(writer._db_call, "ping")
                # Like the server, hold each completion until its outcome is known (when it
                # would send the acknowledgement), then drop it.
                pending: collections.deque[Completion] = collections.deque()
                outcomes: set[Durability | None] = set()
                started = time.perf_counter()
                for i in range(len(rows)):
                    pending.append(await writer.submit(rows[i : i + 1]))
                    while pending and pending[0].result is not None:
                        outcomes.add(pending.popleft().result)
                await writer.drain()
                elapsed = time.perf_counter() - started
                outcomes.update(c.result for c in pending)
                if outcomes != {Durability.DATABASE}:
                    raise RuntimeError(f"writer reported {outcomes}")
                nursery.cancel_scope.cancel()
            return len(rows) / elapsed

        return trio.run(main)


def run_series(name: str, runs: int, fn: Callable[[], float], before: Callable[[], None]) -> float:
    rates = []
    for _ in range(runs):
        before()
        rates.append(fn())
    median = median_rate(rates)
    print(
        f"{name:<38} median {median:>10,.0f} rows/s   runs: "
        + ", ".join(f"{r:,.0f}" for r in rates)
    )
    return median


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $JT808_TEST_DSN, else embedded)")
    parser.add_argument("--quick", action="store_true", help="fewer rows and runs (< 1 min)")
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the input rows to the cyclic collector (as a server's live set is not)",
    )
    args = parser.parse_args(argv)
    count, runs = (50_000, 3) if args.quick else (200_000, 5)
    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"jt808-bench-pg-{os.getpid()}"
    dsn_arg = args.dsn or os.environ.get("JT808_TEST_DSN")

    started = time.perf_counter()
    rows = make_rows(count)
    build_us = (time.perf_counter() - started) / count * 1e6
    # The input rows live for the whole run, which a server's never do (it holds at most the
    # writer's window): keep them out of the cyclic collector's scans, so that both sides pay
    # only for the garbage they make themselves.
    if not args.no_gc_freeze:
        gc.collect()
        gc.freeze()
    print(
        f"{count:,} rows, batches of {BATCH_ROWS:,}, {runs} runs each; "
        f"position_row: {build_us:.1f} us/row (server side, not in the figures below)"
    )

    default = WriterConfig(batch_rows=BATCH_ROWS)
    with database_dsn(dsn_arg, data_dir) as dsn:
        bench = Bench(dsn, rows)
        with bench.schemas_ready():
            bench.truncate()
            bench.raw_copy()  # warm-up: caches, partitions' first pages
            bench.writer(default)
            raw = run_series("raw binary COPY (1 connection)", runs, bench.raw_copy, bench.truncate)
            writer = run_series(
                f"writer, adaptive ({default.connections} connections)",
                runs,
                lambda: bench.writer(default),
                bench.truncate,
            )
            one = dataclasses.replace(default, connections=1)
            run_series(
                "writer, adaptive (1 connection)", runs, lambda: bench.writer(one), bench.truncate
            )
            staging = dataclasses.replace(default, dedup="staging")
            run_series(
                "writer, staging always (2 conn.)",
                runs,
                lambda: bench.writer(staging),
                bench.truncate,
            )

            def fill() -> None:
                bench.truncate()
                bench.writer(default)

            run_series("writer, every row a repeat", runs, lambda: bench.writer(default), fill)
    ratio = writer / raw
    print(
        json.dumps(
            {
                "writer_rows_per_s": round(writer),
                "raw_copy_rows_per_s": round(raw),
                "ratio": round(ratio, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
