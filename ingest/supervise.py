"""Fault isolation for long-running services: a failure restarts the service, not the process.

The server's rule is that a failure is contained where it happened: an error while handling one
connection closes that connection (:meth:`ingest.server.Server._handle`), an error in one HTTP
request answers 500 (:mod:`ingest.http`), and an error in a background service -- the position
writer, the rule engine, the cluster listener, the upload deadlines -- restarts that service
after a back-off.  Only a deliberate shutdown ends the process.

:func:`supervise` runs a service of the house shape, ``async def run(self, *, task_status)``:

* an exception raised *before* the service reported itself started is a failure to start and
  propagates to whoever started it (a port that cannot be bound is a configuration error, and
  the operator must hear of it at once, not from a restart loop);
* an exception raised *after* it started is logged with its traceback, counted
  (``jt808_contained_errors{where="service"}`` and ``jt808_service_restarts{service}``) and the
  service is run again after a back-off that doubles from ``min_backoff_s`` to ``max_backoff_s``
  and starts over once a run lasted ``stable_after_s``;
* the service returning normally is a deliberate end: :func:`supervise` returns too;
* cancellation is never caught (trio's ``Cancelled`` is a ``BaseException``; only
  ``Exception`` and groups of them are contained).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ingest.metrics import Metrics

logger = logging.getLogger(__name__)

# A failing service is retried soon (most failures are a dependency blinking), then less and
# less often, so that a service failing at once on every start costs one log line a minute.
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
# A run that lasted this long was healthy: its failure starts the back-off over.
STABLE_AFTER_S = 60.0

ServiceRun = Callable[..., Awaitable[Any]]


class _StartProbe:
    """Passes ``started`` on to the real task status the first time only; remembers it."""

    __slots__ = ("_status", "started_once")

    def __init__(self, status: trio.TaskStatus[Any]) -> None:
        self._status = status
        self.started_once = False

    def started(self, value: Any = None) -> None:
        if self.started_once:
            return
        self.started_once = True
        self._status.started(value)


async def supervise(
    name: str,
    run: ServiceRun,
    *,
    metrics: Metrics | None = None,
    min_backoff_s: float = MIN_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    stable_after_s: float = STABLE_AFTER_S,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run(task_status=...)`` and restart it after failures; see the module docstring.

    Start with ``await nursery.start(supervise, name, service.run, ...)`` (or ``functools.partial``
    for the keywords): the value the service reports when it first starts is reported on.
    """
    probe = _StartProbe(task_status)
    backoff = min_backoff_s
    up = metrics.service_up.labels(name) if metrics is not None else None
    while True:
        began = trio.current_time()
        failure: BaseException | None = None
        if up is not None:
            up.set(1)
        try:
            await run(task_status=probe)
        except* Exception as group:
            if not probe.started_once:
                raise  # failed to start: the caller decides
            failure = group
        finally:
            if up is not None:
                up.set(0)
        if failure is None:
            logger.info("service %s stopped", name)
            return
        ran_s = trio.current_time() - began
        if ran_s >= stable_after_s:
            backoff = min_backoff_s
        if metrics is not None:
            metrics.contained_errors.labels("service").inc()
            metrics.service_restarts.labels(name).inc()
        logger.error(
            "service %s failed after %.1f s; restarting in %.1f s",
            name,
            ran_s,
            backoff,
            exc_info=failure,
        )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
