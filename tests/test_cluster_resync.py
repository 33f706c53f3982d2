"""Session rows after a database outage: a node whose writes failed (or whose queue overflowed)
rewrites its whole set of rows from its live sessions once the database answers again, and
changes made meanwhile are neither lost nor applied out of order."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from ingest import cluster
from ingest.cluster import RESYNC_FIRST_S, RESYNC_MAX_S, ClusterRouter
from ingest.interfaces import (
    InMemorySessionRecords,
    InMemoryTransport,
    SessionChange,
    SessionRecords,
    SessionRow,
)
from ingest.metrics import Metrics
from protocol.messages.base import Message
from storage import SessionTable, migrate
from tests.db_proxy import DatabaseProxy
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401

NODE = "node-a"
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def since(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


class FlakyRecords(InMemorySessionRecords):
    """The in-memory table, unreachable while ``down``; ``during_replace`` runs inside each
    successful rewrite, after its snapshot was taken and before it is applied."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.replace_attempts: list[float] = []
        self.during_replace: Callable[[], Awaitable[None]] | None = None

    async def clear_node(self, node: str) -> bool:
        if self.down:
            await trio.lowlevel.checkpoint()
            return False
        return await super().clear_node(node)

    async def record(self, node: str, changes: Sequence[SessionChange]) -> bool:
        if self.down:
            await trio.lowlevel.checkpoint()
            return False
        return await super().record(node, changes)

    async def replace(self, node: str, rows: Sequence[SessionRow]) -> bool:
        self.replace_attempts.append(trio.current_time())
        if self.down:
            await trio.lowlevel.checkpoint()
            return False
        if self.during_replace is not None:
            hook, self.during_replace = self.during_replace, None
            await hook()
        return await super().replace(node, rows)


class Live:
    """The node's authenticated sessions as the server knows them, driving the router the way
    the server does (the truth changes first, then the router is told)."""

    def __init__(self) -> None:
        self.sessions: dict[str, tuple[datetime, str]] = {}
        self.router: ClusterRouter | None = None

    def snapshot(self) -> list[SessionRow]:
        return [(phone, s, peer) for phone, (s, peer) in self.sessions.items()]

    def online(self, phone: str, minutes: int) -> None:
        assert self.router is not None
        peer = f"10.0.0.{len(phone)}:{minutes}"
        self.sessions[phone] = (since(minutes), peer)
        self.router.online(phone, since(minutes), peer)

    def offline(self, phone: str) -> None:
        assert self.router is not None
        started, _ = self.sessions.pop(phone)
        self.router.offline(phone, started)

    def expected(self, node: str = NODE) -> dict[str, tuple[str, datetime, str]]:
        return {phone: (node, s, peer) for phone, (s, peer) in self.sessions.items()}


async def _nobody(phone: str, message: Message) -> dict[str, Any] | None:
    await trio.lowlevel.checkpoint()
    return None


@asynccontextmanager
async def running(
    sessions: SessionRecords, *, live: Live | None = None, node: str = NODE
) -> AsyncIterator[ClusterRouter]:
    router = ClusterRouter(
        node=node,
        sessions=sessions,
        transport=InMemoryTransport(),
        execute_local=_nobody,
        relay_timeout_s=10.0,
        metrics=Metrics(),
        snapshot=None if live is None else live.snapshot,
    )
    if live is not None:
        live.router = router
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        yield router
        nursery.cancel_scope.cancel()


def out_of_step(router: ClusterRouter) -> bool:
    return router.out_of_step


def metric(router: ClusterRouter, name: str) -> float:
    value = router.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def settle(seconds: float = 1.0) -> None:
    await trio.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# In memory, on a mock clock


async def test_rows_converge_to_the_live_sessions_after_an_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    live = Live()
    async with running(table, live=live) as router:
        live.online("013800000001", 1)
        live.online("013800000002", 2)
        await settle()
        assert table.rows == live.expected()

        table.down = True
        live.offline("013800000001")  # this write fails: the rows are out of step
        await settle(0.1)
        assert out_of_step(router)
        assert metric(router, "jt808_session_rows_dropped_total") == 1
        live.offline("013800000002")
        live.online("013800000003", 3)
        live.online("013800000004", 4)
        live.offline("013800000004")
        live.online("013800000002", 5)  # reconnected: a new session
        await settle(100)
        # While down: the table still holds the rows of before, nothing was applied.
        assert set(table.rows) == {"013800000001", "013800000002"}
        assert metric(router, "jt808_session_rows_resyncs_total") == 0

        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert not out_of_step(router)
        assert table.rows == live.expected()
        assert metric(router, "jt808_session_rows_resyncs_total") == 1

        # Back in step: single changes are written again.
        live.offline("013800000003")
        await settle()
        assert table.rows == live.expected()
        assert metric(router, "jt808_session_rows_resyncs_total") == 1


async def test_the_node_with_no_sessions_left_has_no_rows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    live = Live()
    async with running(table, live=live) as router:
        live.online("013800000001", 1)
        live.online("013800000002", 2)
        await settle()
        table.down = True
        live.offline("013800000001")
        live.offline("013800000002")
        await settle(5)
        assert len(table.rows) == 2
        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert table.rows == {}
        assert not out_of_step(router)


async def test_rewrites_back_off_from_1_s_doubling_up_to_30_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    live = Live()
    async with running(table, live=live):
        live.online("013800000001", 1)
        await settle()
        table.down = True
        live.offline("013800000001")
        await settle(200)
        attempts = table.replace_attempts
        gaps = [round(b - a, 6) for a, b in itertools.pairwise(attempts)]
        assert gaps[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        assert RESYNC_FIRST_S == 1.0
        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert table.rows == {}
        tried = len(table.replace_attempts)
        await settle(100)
        assert len(table.replace_attempts) == tried  # no rewrites once in step


async def test_changes_during_the_rewrite_are_written_after_it_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    live = Live()
    async with running(table, live=live) as router:
        live.online("013800000001", 1)
        live.online("013800000002", 2)
        await settle()
        table.down = True
        live.offline("013800000002")
        await settle(0.1)
        assert out_of_step(router)

        async def meanwhile() -> None:
            # The snapshot is taken: these changes are not in it and must follow the rewrite.
            live.offline("013800000001")
            live.online("013800000003", 3)
            live.online("013800000001", 4)
            await trio.sleep(0.5)

        table.during_replace = meanwhile
        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert table.rows == live.expected()
        assert table.rows["013800000001"][1] == since(4)
        assert metric(router, "jt808_session_rows_resyncs_total") == 1


async def test_a_full_queue_puts_the_rows_out_of_step(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "SESSION_QUEUE_ROWS", 4)
    table = FlakyRecords()
    live = Live()
    async with running(table, live=live) as router:
        # A burst with no checkpoint in between: the writer cannot drain the queue.
        for n in range(10):
            live.online(f"0138000000{n:02d}", n)
        live.offline("013800000003")
        assert out_of_step(router)
        # The first row went straight to the waiting writer, four filled the queue: the sixth
        # was lost, and the rest were not even queued (the rewrite covers them).
        assert metric(router, "jt808_session_rows_dropped_total") == 1
        await settle()
        assert table.rows == live.expected()
        assert len(table.rows) == 9
        assert metric(router, "jt808_session_rows_resyncs_total") == 1
        assert not out_of_step(router)


async def test_stale_rows_stay_until_the_database_answers_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    await table.online("013800000099", NODE, since(-600), "1.2.3.4:5")  # an earlier life
    table.down = True
    live = Live()
    async with running(table, live=live) as router:
        assert out_of_step(router)
        live.online("013800000001", 1)
        await settle(3)
        assert set(table.rows) == {"013800000099"}
        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert table.rows == live.expected()


async def test_without_a_snapshot_the_router_rewrites_what_it_was_told(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyRecords()
    async with running(table) as router:
        router.online("013800000001", since(1), "p1")
        router.online("013800000002", since(2), "p2")
        await settle()
        table.down = True
        router.offline("013800000001", since(1))
        router.offline("013800000002", since(0))  # not the session recorded: no effect
        router.online("013800000003", since(3), "p3")
        await settle(3)
        table.down = False
        await settle(RESYNC_MAX_S + 1)
        assert table.rows == {
            "013800000002": (NODE, since(2), "p2"),
            "013800000003": (NODE, since(3), "p3"),
        }


async def test_replace_leaves_a_newer_row_of_another_node_alone() -> None:
    table = InMemorySessionRecords()
    await table.online("013800000001", "node-b", since(10), "b")  # took the terminal over
    await table.online("013800000002", "node-b", since(1), "b")  # older than ours
    await table.online("013800000003", NODE, since(1), "a")  # gone from this node
    await table.online("013800000004", "node-b", since(1), "b")  # not ours at all
    assert await table.replace(
        NODE, [("013800000001", since(5), "a"), ("013800000002", since(5), "a")]
    )
    assert table.rows == {
        "013800000001": ("node-b", since(10), "b"),
        "013800000002": (NODE, since(5), "a"),
        "013800000004": ("node-b", since(1), "b"),
    }


# ---------------------------------------------------------------------------------------------
# PostgreSQL behind a proxy that cuts the connections


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


def table_rows(table: SessionTable, node: str) -> dict[str, tuple[str, datetime, str | None]]:
    return {phone: (n, s, peer) for phone, n, s, peer in table.rows() if n == node}


async def wait_for_rows(
    table: SessionTable, node: str, expected: dict[str, tuple[str, datetime, str]]
) -> None:
    async def rows() -> dict[str, tuple[str, datetime, str | None]]:
        return await trio.to_thread.run_sync(table_rows, table, node)

    while await rows() != expected:  # noqa: ASYNC110 - polls the database: no event to wait on
        await trio.sleep(0.05)


async def wait_for_resyncs(router: ClusterRouter, count: int) -> None:
    """The counter goes up once the rewrite's thread returned, just after its commit."""
    name = "jt808_session_rows_resyncs_total"
    while metric(router, name) < count:  # noqa: ASYNC110 - a metric: no event to wait on
        await trio.sleep(0.01)
    assert metric(router, name) == count


@pytest.mark.db
async def test_the_sessions_table_converges_after_the_database_comes_back(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quicker retries than in production, so the test takes seconds; the schedule itself is
    # checked on the mock clock above.
    monkeypatch.setattr(cluster, "RESYNC_FIRST_S", 0.1)
    monkeypatch.setattr(cluster, "RESYNC_MAX_S", 0.4)
    node = f"a-{uuid.uuid4().hex[:8]}"
    direct = SessionTable(db)
    with DatabaseProxy.for_dsn(db) as proxy:
        proxied = SessionTable(proxy.dsn)
        live = Live()
        try:
            # Rows already there: one of this node's earlier life, one of another node.
            await direct.online("013800000099", node, since(-600), "old")
            await direct.online("013800000006", "node-b", since(1), "b")
            with trio.fail_after(30):
                async with running(proxied, live=live, node=node) as router:
                    for n in range(1, 6):
                        live.online(f"01380000000{n}", n)
                    await wait_for_rows(direct, node, live.expected(node))

                    proxy.cut()
                    live.offline("013800000001")
                    await trio.sleep(0.3)
                    assert out_of_step(router)
                    live.offline("013800000002")
                    live.online("013800000007", 7)
                    live.online("013800000002", 8)
                    live.online("013800000008", 9)
                    live.offline("013800000008")
                    # Meanwhile node B takes 013800000005 over (this node's connection to it is
                    # half open and goes at its idle timeout): B's newer row must stay.
                    await direct.online("013800000005", "node-b", since(50), "b")
                    await trio.sleep(1.0)
                    assert out_of_step(router)
                    assert "013800000001" in table_rows(direct, node)  # nothing written
                    assert metric(router, "jt808_session_rows_resyncs_total") == 0

                    ours = live.expected(node)
                    del ours["013800000005"]
                    proxy.restore()
                    await wait_for_rows(direct, node, ours)
                    await wait_for_resyncs(router, 1)
                    assert not out_of_step(router)
                    assert proxy.refused > 0  # the retries did knock while it was cut
                    others = table_rows(direct, "node-b")
                    assert others["013800000005"][1] == since(50)
                    assert others["013800000006"][0] == "node-b"

                    # In step again: single changes are written as before.
                    live.offline("013800000003")
                    live.offline("013800000004")
                    live.offline("013800000005")  # not this node's row: nothing to remove
                    await wait_for_rows(direct, node, live.expected(node))
                    assert set(table_rows(direct, "node-b")) == {"013800000005", "013800000006"}

                    # Every session gone during a cut: the node is left with no rows at all.
                    proxy.cut()
                    for phone in list(live.sessions):
                        live.offline(phone)
                    await trio.sleep(0.5)
                    proxy.restore()
                    await wait_for_rows(direct, node, {})
                    await wait_for_resyncs(router, 2)
        finally:
            proxied.close()
            direct.close()
