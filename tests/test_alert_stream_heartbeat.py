"""The heartbeat of ``GET /alerts/stream`` is paced by the time since its last write, whatever
feeds it; a ``rule`` or ``state`` no alert carries is answered 400; and ``jt808 alerts tail``
stays connected to a quiet platform without a warning."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

import tools.rules_db
from alerts import RULE_NAMES, AlertState
from ingest import AlertFeed, InMemoryAlertFeed, Metrics, OperatorHttp
from ingest.http import HEARTBEAT_S
from storage.alerts import AlertRepository
from tests.operator_auth import TEST_TOKEN, memory_access
from tests.serving import http
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import Stream, alert
from tools.alerts_tail_cmd import READ_TIMEOUT_S, add_tail_arguments, run_tail
from tools.rules_db import ALERT_VOCABULARY, FEED_POLL_S, DatabaseAlertFeed

# The old database feed's manner: look, and return after every poll even with nothing new.
POLL_S = 0.5
# Real-time tests (alerts tail runs in a thread, on the real clock): a short heartbeat, a read
# timeout of five of them (production has three: room here for a loaded test machine), and a
# quiet spell of three read timeouts, so a stream without heartbeats would time out thrice.
# Feeds poll well within the heartbeat, as in production (0.5 s against 15 s): a stream whose
# heartbeat waited for a quiet wait to last a whole interval would then never send one.
SHORT_HEARTBEAT_S = 0.2
SHORT_POLL_S = SHORT_HEARTBEAT_S / 4
SHORT_READ_TIMEOUT_S = 5 * SHORT_HEARTBEAT_S
QUIET_S = 3 * SHORT_READ_TIMEOUT_S


class PollingFeed(InMemoryAlertFeed):
    """An in-memory feed that returns from ``wait_for_new`` after each poll, news or not."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        super().__init__(vocabulary=ALERT_VOCABULARY)
        self.poll_s = poll_s
        self.waits = 0

    async def wait_for_new(self, after_seq: int) -> None:
        self.waits += 1
        await trio.sleep(self.poll_s)


@asynccontextmanager
async def operator_port(
    feed: AlertFeed, *, heartbeat_s: float = HEARTBEAT_S, metrics: Metrics | None = None
) -> AsyncIterator[int]:
    port = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry() if metrics is None else metrics.registry,
        terminals=list,
        alerts=feed,
        access=memory_access(),
        metrics=metrics,
        heartbeat_s=heartbeat_s,
    )
    async with trio.open_nursery() as nursery:
        (number,) = await nursery.start(port.run)
        yield number
        nursery.cancel_scope.cancel()


async def heartbeat_times(stream: Stream, n: int) -> list[float]:
    """When each of the next ``n`` heartbeats arrived; fails on anything else."""
    times = []
    for _ in range(n):
        assert await stream.blocks(1) == [": heartbeat"]
        times.append(trio.current_time())
    return times


def steady(times: list[float], start: float) -> bool:
    """Whether the heartbeats came one interval apart (give or take a poll of the feed)."""
    gaps = [b - a for a, b in zip([start, *times], times, strict=False)]
    return all(HEARTBEAT_S <= gap < HEARTBEAT_S + POLL_S for gap in gaps)


# ---------------------------------------------------------------------------------------------
# The heartbeat's pace (trio's MockClock: HEARTBEAT_S as in production, no real waiting)


async def test_heartbeats_keep_their_interval_when_the_feed_returns_without_news(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = PollingFeed()
    with trio.fail_after(10 * HEARTBEAT_S):
        async with operator_port(feed) as port:
            stream = await Stream.open(port, "/alerts/stream")
            assert await stream.blocks(1) == [": alert stream"]
            start = trio.current_time()
            times = await heartbeat_times(stream, 4)
            assert steady(times, start), times
            # The wait returned after every poll, and that did not hold the heartbeat back.
            assert feed.waits >= 3 * HEARTBEAT_S / POLL_S
            await stream.aclose()


async def test_heartbeats_go_on_while_events_the_filter_passes_over_wake_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The in-memory feed returns at every publish: a busy fleet seen through a filter that
    matches nothing wakes the stream every second, and must not silence it."""
    feed = InMemoryAlertFeed(vocabulary=ALERT_VOCABULARY)

    async def busy_fleet() -> None:
        for n in range(10_000):
            feed.publish(alert(n, unit="gov"))
            await trio.sleep(1.0)

    with trio.fail_after(10 * HEARTBEAT_S):
        async with operator_port(feed) as port, trio.open_nursery() as nursery:
            stream = await Stream.open(port, "/alerts/stream?unit=police")
            assert await stream.blocks(1) == [": alert stream"]
            nursery.start_soon(busy_fleet)
            start = trio.current_time()
            assert steady(await heartbeat_times(stream, 3), start)
            nursery.cancel_scope.cancel()
            await stream.aclose()


async def test_the_heartbeat_counts_from_the_last_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = InMemoryAlertFeed()
    with trio.fail_after(10 * HEARTBEAT_S):
        async with operator_port(feed) as port:
            stream = await Stream.open(port, "/alerts/stream")
            assert await stream.blocks(1) == [": alert stream"]
            await trio.sleep(HEARTBEAT_S / 2)
            feed.publish(alert(1))
            assert [seq for seq, _ in await stream.events(1)] == [1]
            sent = trio.current_time()
            (beat,) = await heartbeat_times(stream, 1)
            assert HEARTBEAT_S <= beat - sent < HEARTBEAT_S + 1
            await stream.aclose()


def test_the_heartbeat_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="heartbeat_s"):
        OperatorHttp(
            host="127.0.0.1", port=0, registry=CollectorRegistry(), terminals=list, heartbeat_s=0
        )


def test_alerts_tail_waits_for_several_heartbeats() -> None:
    assert READ_TIMEOUT_S >= 3 * HEARTBEAT_S


# ---------------------------------------------------------------------------------------------
# Unknown rules and states


async def test_an_unknown_rule_or_state_is_answered_400_with_the_valid_ones() -> None:
    states = [s.value for s in AlertState]
    with trio.fail_after(10):
        async with operator_port(InMemoryAlertFeed(vocabulary=ALERT_VOCABULARY)) as port:
            status, body = await http(port, "GET", "/alerts/stream?rule=speeding")
            assert status == 400
            assert body["error"] == "bad_request"
            assert (body["parameter"], body["value"]) == ("rule", "speeding")
            assert body["valid"] == list(RULE_NAMES)
            assert "'speeding'" in body["detail"]
            assert "overspeed" in body["detail"]

            status, body = await http(port, "GET", "/alerts/stream?rule=overspeed&state=closed")
            assert status == 400
            assert (body["parameter"], body["value"], body["valid"]) == ("state", "closed", states)

            stream = await Stream.open(port, "/alerts/stream?rule=overspeed&state=open")
            assert stream.status == 200
            await stream.aclose()


async def test_a_feed_that_does_not_know_the_rules_takes_any() -> None:
    with trio.fail_after(10):
        async with operator_port(InMemoryAlertFeed()) as port:
            stream = await Stream.open(port, "/alerts/stream?rule=speeding&state=closed")
            assert stream.status == 200
            await stream.aclose()


def test_the_database_feed_knows_the_engines_rules_and_states() -> None:
    feed = DatabaseAlertFeed("postgresql://nobody@127.0.0.1:1/none")  # connects on first use
    assert feed.vocabulary.rules == RULE_NAMES
    assert feed.vocabulary.states == tuple(s.value for s in AlertState)


def tail_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tail_arguments(parser)
    return parser.parse_args([*argv, "--token", TEST_TOKEN])


async def test_alerts_tail_shows_the_400_and_exits(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10):
        async with operator_port(InMemoryAlertFeed(vocabulary=ALERT_VOCABULARY)) as port:
            args = tail_args("--http", f"http://127.0.0.1:{port}", "--rule", "speeding")
            code = await trio.to_thread.run_sync(lambda: run_tail(args, out=io.StringIO()))
    assert code == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "speeding" in record.getMessage()
    assert "holiday_sealing" in record.getMessage()


# ---------------------------------------------------------------------------------------------
# alerts tail on a quiet platform (real clock, short heartbeat)


async def tail_through_a_quiet_spell(
    feed: AlertFeed, publish: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Run ``alerts tail --count 1`` through :data:`QUIET_S` of silence, then one alert:
    the tail shows it, from its first connection, and logs no warning."""
    metrics = Metrics(CollectorRegistry())
    out = io.StringIO()
    with trio.fail_after(QUIET_S + 30):
        async with (
            operator_port(feed, heartbeat_s=SHORT_HEARTBEAT_S, metrics=metrics) as port,
            trio.open_nursery() as nursery,
        ):
            args = tail_args("--http", f"http://127.0.0.1:{port}", "--count", "1", "--json")
            codes: list[int] = []

            def never_reconnect(delay_s: float) -> None:
                # Fails the test at once rather than retrying in a thread trio cannot cancel.
                raise AssertionError(f"alerts tail reconnects (after {delay_s} s)")

            def run() -> int:
                return run_tail(
                    args, out=out, sleep=never_reconnect, read_timeout_s=SHORT_READ_TIMEOUT_S
                )

            async def tail() -> None:
                codes.append(await trio.to_thread.run_sync(run))

            nursery.start_soon(tail)
            await trio.sleep(QUIET_S)
            await publish()
    assert codes == [0]
    assert json.loads(out.getvalue())["detail"] == {"n": 1}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    requests = metrics.registry.get_sample_value("jt808_http_requests_total", {"status": "200"})
    assert requests == 1  # one stream, never reconnected


async def test_alerts_tail_stays_connected_to_a_quiet_polling_feed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed = PollingFeed(SHORT_POLL_S)

    async def publish() -> None:
        feed.publish(alert(1))
        await trio.lowlevel.checkpoint()

    await tail_through_a_quiet_spell(feed, publish, caplog)


@pytest.mark.db
async def test_alerts_tail_stays_connected_to_a_quiet_database(
    db: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools.rules_db, "FEED_POLL_S", SHORT_POLL_S)
    feed = DatabaseAlertFeed(db)
    repository = AlertRepository(db)
    try:

        async def publish() -> None:
            await trio.to_thread.run_sync(repository.put, alert(1))

        await tail_through_a_quiet_spell(feed, publish, caplog)
    finally:
        feed.close()
        repository.close()


@pytest.mark.db
async def test_the_database_feed_waits_until_there_is_news(db: str) -> None:
    feed = DatabaseAlertFeed(db)
    repository = AlertRepository(db)
    try:
        with trio.fail_after(30):
            with trio.move_on_after(4 * FEED_POLL_S) as quiet:
                await feed.wait_for_new(0)
            assert quiet.cancelled_caught  # it polled several times and did not return
            await trio.to_thread.run_sync(repository.put, alert(1))
            with trio.move_on_after(4 * FEED_POLL_S) as news:
                await feed.wait_for_new(0)
            assert not news.cancelled_caught
    finally:
        feed.close()
        repository.close()
