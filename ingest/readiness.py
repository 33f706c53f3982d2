"""One waiting place per worker for the connections that wait for data.

A terminal on the road writes one frame and waits for its acknowledgement, so a connection
spends nearly all its life waiting for the next read.  Waiting in its own task costs, per read,
a trip through trio's scheduler and its epoll registration, and a fresh chain of suspended
coroutines that the cyclic garbage collector then scans: with thousands of connections those
chains were most of a young collection (tens of milliseconds, an ack-latency spike each time).

Instead, a connection whose next frame is most likely a plain report *parks* here: its
descriptor goes into one level-triggered epoll set of the worker, its task sleeps once, and
:meth:`Readiness.run` (one task) waits on that set and calls the connection's
``readable()`` for each descriptor that has data.  That handles what it can at once (plain
reports and heartbeats of an authenticated terminal) and otherwise wakes the connection's
task (:meth:`Parked.wake`) with what it read, to go on in the ordinary way.  Parking and
waking are the only epoll changes; a connection handled at once stays parked.

The set is bounded by the connections of the worker (each parks at most once); ``run`` handles
at most :data:`MAX_EVENTS` descriptors per wake-up before it yields to the other tasks.
"""

from __future__ import annotations

import contextlib
import logging
import select
from typing import Any, Protocol

import trio

logger = logging.getLogger(__name__)

MAX_EVENTS = 256  # descriptors handled per wake-up: a bound on the time between yields


class Parked(Protocol):
    """What a parked connection offers the loop."""

    def readable(self) -> None:
        """Data or the end of stream waits: handle it, or :meth:`wake` the task.  Must not
        raise (a connection contains its own errors)."""
        ...

    def wake(self) -> None:
        """Resume the connection's task (it is no longer parked when this is called)."""
        ...


class Readiness:
    """The epoll set of one worker's parked connections; start :meth:`run` in a nursery."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._parked: dict[int, Parked] = {}
        self.running = False
        self.handovers = 0  # connections woken to go on in their own task (tests, debugging)

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, fd: int, connection: Parked) -> None:
        """Watch ``fd`` for ``connection`` (only while :attr:`running`)."""
        if self._epoll is None:
            raise RuntimeError("the readiness loop is not running")
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = connection

    def unpark(self, fd: int) -> None:
        """Stop watching ``fd`` (no-op if it is not watched)."""
        if self._parked.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):  # already closed: epoll forgot it by itself
                self._epoll.unregister(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand readable parked connections their data until cancelled.  Whatever ends the
        loop, every connection still parked is woken to read for itself."""
        epoll = self._epoll = select.epoll()
        self.running = True
        try:
            task_status.started()
            parked = self._parked
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, MAX_EVENTS):
                    connection = parked.get(fd)
                    if connection is not None:
                        connection.readable()
        finally:
            self.running = False
            waiting: list[tuple[int, Any]] = list(self._parked.items())
            self._parked.clear()
            self._epoll = None
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()
            for _, connection in waiting:
                connection.wake()
