"""Supervised services: a failure after start restarts the service; nothing ends the process
but a deliberate stop."""

from __future__ import annotations

import functools
import itertools

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingest.metrics import Metrics
from ingest.supervise import supervise


class Flaky:
    """A service that fails ``failures`` times after starting, then runs until cancelled."""

    def __init__(self, failures: int, *, before_start: bool = False) -> None:
        self.failures = failures
        self.before_start = before_start
        self.runs = 0
        self.started_at: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        if self.before_start and self.runs == 1:
            raise OSError("address already in use")
        task_status.started(f"run {self.runs}")
        self.started_at.append(trio.current_time())
        if self.runs <= self.failures:
            async with trio.open_nursery() as nursery:  # failures arrive as groups too
                nursery.start_soon(trio.sleep, 1)
                raise RuntimeError(f"failure {self.runs}")
        await trio.sleep_forever()


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_failing_service_is_restarted_with_a_growing_back_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics(CollectorRegistry())
    service = Flaky(failures=3)
    async with trio.open_nursery() as nursery:
        value = await nursery.start(
            functools.partial(supervise, "flaky", service.run, metrics=metrics)
        )
        assert value == "run 1"  # the first start's value is reported on, once
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert service.runs == 4
    gaps = [b - a for a, b in itertools.pairwise(service.started_at)]
    assert gaps == pytest.approx([1, 2, 4])
    labels = {"service": "flaky"}
    assert sample(metrics, "jt808_service_restarts_total", labels) == 3
    assert sample(metrics, "jt808_contained_errors_total", {"where": "service"}) == 3
    assert sample(metrics, "jt808_service_up", labels) == 0  # cancelled at the end


async def test_a_failure_to_start_reaches_the_caller() -> None:
    service = Flaky(failures=0, before_start=True)
    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(supervise, "port", service.run))
    assert caught.group_contains(OSError)
    assert service.runs == 1


async def test_a_service_that_returns_is_not_restarted() -> None:
    runs = 0

    async def once(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(supervise, "once", once))
    assert runs == 1


async def test_cancellation_is_never_contained(autojump_clock: trio.testing.MockClock) -> None:
    service = Flaky(failures=0)
    with trio.move_on_after(10) as scope:
        await supervise("forever", service.run)
    assert scope.cancelled_caught
    assert service.runs == 1


async def test_a_long_healthy_run_starts_the_back_off_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started: list[float] = []

    async def sometimes(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        started.append(trio.current_time())
        # runs 1-3 fail at once, run 4 after a long healthy hour, run 5 at once
        await trio.sleep(3600 if len(started) == 4 else 0)
        if len(started) < 6:
            raise RuntimeError("boom")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(supervise, "s", sometimes))
        await trio.sleep(5000)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps == pytest.approx([1, 2, 4, 3600 + 1, 2])
