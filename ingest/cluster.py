"""Several nodes, one server: online sessions in a shared table, commands relayed between nodes.

Every server process is a *node* with an id (``ServerConfig.node_id``, default
``hostname:pid``).  The :class:`ClusterRouter` of a node

* records the node's online sessions through :class:`~ingest.interfaces.SessionRecords` (the
  ``sessions`` table): a row when a terminal authenticates, removed when its connection closes;
  the node's stale rows (from a crash) are cleared when it starts and all its rows when it
  stops.  Writes go through one bounded queue, in order, off the connection tasks: a slow
  database never holds up a terminal (the rows are advisory; a terminal on this node is always
  found locally first).
* keeps those rows in step: when a change cannot be written (the database is down, or the
  queue is full) the node's rows are *out of step*.  From then on no single change is written;
  instead the node rewrites its whole set of rows in one transaction
  (:meth:`~ingest.interfaces.SessionRecords.replace`) from a snapshot of its live sessions
  taken just before the write, retrying with back-off (:data:`RESYNC_FIRST_S` doubling up to
  :data:`RESYNC_MAX_S`) until the database takes it.  Changes queued before the snapshot are
  in it and are discarded; changes made while the rewrite is in flight stay queued and are
  written after it, so nothing is lost or applied out of order.
* executes commands (:meth:`ClusterRouter.command`): locally when this node holds the terminal;
  otherwise it looks the terminal up in the table and sends the command to the node holding it
  over :class:`~ingest.interfaces.ClusterTransport` (PostgreSQL LISTEN/NOTIFY), which runs it
  locally and sends the answer back the same way.

Messages on the transport are JSON objects::

    {"type": "command", "id": "<hex>", "from": "<node>", "phone": "...", "msg_id": "0x8201",
     "body": {...}}
    {"type": "accepted", "id": "<hex>"}
    {"type": "reply", "id": "<hex>", "ok": true, "result": {...the HTTP answer...}}
    {"type": "reply", "id": "<hex>", "ok": false, "error": "timeout", "detail": "..."}

The receiving node answers "accepted" at once; a node that does not within
:data:`ACCEPT_TIMEOUT_S` is taken for gone (a crashed node leaves its rows until it starts
again), and the command fails with :class:`~ingest.commands.NodeUnreachableError`.  After that
the relaying node waits for the reply for the whole retransmission schedule plus
:data:`RELAY_MARGIN_S`; the nodes of a cluster are expected to share the command settings.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import trio

from ingest.commands import (
    BadCommandError,
    CommandBusyError,
    CommandError,
    NodeUnreachableError,
    TerminalOfflineError,
    error_from_json,
    message_from_json,
    parse_msg_id,
)
from ingest.interfaces import ClusterTransport, SessionChange, SessionRecords, SessionRow
from ingest.metrics import Metrics
from protocol.messages.base import Message

logger = logging.getLogger(__name__)

# Phones are BCD[6] (12 digits) up to 2013 and BCD[10] (20 digits) in 2019 (table 2).
PHONE_DIGITS = (12, 20)

# A relayed command's reply takes two NOTIFY hops and a thread hand-over on each node; a few
# seconds cover a loaded database.
RELAY_MARGIN_S = 5.0
# The same round trip for the "accepted" answer: a live node sends it at once.
ACCEPT_TIMEOUT_S = 5.0
# Messages received and not yet dispatched.  The dispatcher only starts tasks and resolves
# waiters, so it keeps up; when full the listener thread waits and PostgreSQL keeps the
# notifications queued (its queue holds 8 GB by default), so nothing is lost.
INBOX_MESSAGES = 64
# Commands relayed to this node and running at once.  The operator ports of all nodes run 16
# commands each (ingest.http.MAX_COMMANDS); 64 leaves room for four busy peers.  More are
# answered "busy" at once.
MAX_RELAYED_COMMANDS = 64
# Commands this node relayed and still waits for; bounded by its own HTTP port (16), with room.
MAX_WAITING_REPLIES = 64
# Session rows waiting to be written.  A mass reconnect after a restart brings one row per
# terminal within seconds; 2 x the default connection cap (an online and an offline row each)
# keeps them all.  A row beyond puts the node's rows out of step (rewritten whole later).
SESSION_QUEUE_ROWS = 40_000
# Session rows written in one transaction.
SESSION_BATCH_ROWS = 1_000
# At start and stop the node's rows are cleared; a database that does not answer within this
# time is left alone (rows of a dead node only make commands to its terminals fail "offline").
CLEAR_TIMEOUT_S = 10.0
# Rewriting the rows after they fell out of step: first retry after 1 s (a restarting
# PostgreSQL or a dropped connection is usually back within seconds), doubling up to 30 s, so
# that a long outage costs one failed connection attempt per node every 30 s.
RESYNC_FIRST_S = 1.0
RESYNC_MAX_S = 30.0

LocalExecutor = Callable[[str, Message], Awaitable[dict[str, Any] | None]]
Snapshot = Callable[[], list[SessionRow]]
_Row = SessionChange


def phone_candidates(phone: str) -> list[str]:
    """The header phone strings an operator's ``phone`` may stand for (with or without the
    leading zeros of the 12- and 20-digit BCD forms)."""
    if not phone.isdigit() or len(phone) > max(PHONE_DIGITS):
        raise BadCommandError(f"{phone!r} is not a terminal phone number")
    core = phone.lstrip("0") or "0"
    candidates = [phone]
    for digits in PHONE_DIGITS:
        if len(core) <= digits:
            padded = core.rjust(digits, "0")
            if padded not in candidates:
                candidates.append(padded)
    return candidates


class _Waiter:
    __slots__ = ("accepted", "event", "reply")

    def __init__(self) -> None:
        self.accepted = trio.Event()
        self.event = trio.Event()
        self.reply: dict[str, Any] = {}


class ClusterRouter:
    """Session rows and command relaying of one node; start :meth:`run` with ``nursery.start``.

    ``execute_local(phone, message)`` runs a command on this node's own connection to the
    terminal and returns the JSON answer, or None when this node does not hold the terminal.

    ``snapshot()`` lists this node's authenticated sessions as (phone, connected_since, peer),
    the truth the rows are rewritten from when they fell out of step; it must agree with the
    :meth:`online`/:meth:`offline` calls made so far (a session is in it from its
    :meth:`online` call until its :meth:`offline` call).  None: the sessions as those calls
    left them, which the router keeps itself.
    """

    def __init__(
        self,
        *,
        node: str,
        sessions: SessionRecords,
        transport: ClusterTransport,
        execute_local: LocalExecutor,
        relay_timeout_s: float,
        metrics: Metrics,
        snapshot: Snapshot | None = None,
    ) -> None:
        self.node = node
        self.sessions = sessions
        self.transport = transport
        self.execute_local = execute_local
        self.relay_timeout_s = relay_timeout_s
        self.metrics = metrics
        self._rows_in, self._rows_out = trio.open_memory_channel[_Row](SESSION_QUEUE_ROWS)
        # The sessions as online/offline left them (phone -> (connected_since, peer)), kept only
        # when no snapshot is given; bounded like the connections, one entry per session.
        self._mirror: dict[str, tuple[datetime, str]] | None = {} if snapshot is None else None
        self._snapshot = snapshot if snapshot is not None else self._mirrored
        # True from a lost change until a rewrite of all the rows succeeded.
        self.out_of_step = False
        self._losses = 0  # changes lost so far (a rewrite must start after the last one)
        self._rewriting = False  # a rewrite's snapshot is taken and its write in flight
        self._started = False  # run() was entered before (a restart keeps the live rows)
        self._inbox_in, self._inbox_out = trio.open_memory_channel[dict[str, Any]](INBOX_MESSAGES)
        self._waiting: dict[str, _Waiter] = {}
        self._relayed = trio.CapacityLimiter(MAX_RELAYED_COMMANDS)
        self.listening = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Clear this node's stale rows, listen for relayed commands, write session rows.

        Starts even when the database does not answer: the stale rows are then removed by the
        first rewrite once it does."""
        if self._started:
            # Run again after a failure (it is supervised): this node's sessions are live, so
            # its rows are rewritten from them rather than cleared.
            self._step_out("restarted")
        else:
            self._started = True
            cleared = False
            with trio.move_on_after(CLEAR_TIMEOUT_S):
                cleared = await self.sessions.clear_node(self.node)
            if not cleared:
                self._step_out("clearing the rows of an earlier life failed")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.listen, self.node, self._inbox_in)
                self.listening = True
                nursery.start_soon(self._write_rows)
                nursery.start_soon(self._dispatch, nursery)
                task_status.started()
        finally:
            self.listening = False
            with trio.CancelScope(shield=True), trio.move_on_after(CLEAR_TIMEOUT_S):
                await self.sessions.clear_node(self.node)

    # -- session rows

    def online(self, phone: str, connected_since: datetime, peer: str) -> None:
        """``phone`` authenticated on this node (queues its row; never blocks)."""
        if self._mirror is not None:
            self._mirror[phone] = (connected_since, peer)
        self._queue(("online", phone, connected_since, peer))

    def offline(self, phone: str, connected_since: datetime) -> None:
        """The session of ``phone`` that began at ``connected_since`` ended (queues it)."""
        if self._mirror is not None:
            held = self._mirror.get(phone)
            if held is not None and held[0] == connected_since:
                del self._mirror[phone]
        self._queue(("offline", phone, connected_since, ""))

    def _mirrored(self) -> list[SessionRow]:
        assert self._mirror is not None
        return [(phone, since, peer) for phone, (since, peer) in self._mirror.items()]

    def _queue(self, row: _Row) -> None:
        if self.out_of_step and not self._rewriting:
            # The next rewrite's snapshot is taken after this call and so covers the change.
            return
        try:
            self._rows_in.send_nowait(row)
        except trio.WouldBlock:
            self.metrics.session_rows_dropped.inc()
            self._step_out(f"phone={row[1]} session row ({row[0]}) dropped: queue full")

    def _step_out(self, why: str) -> None:
        if not self.out_of_step:
            logger.warning("node %s session rows out of step (%s); rewriting them", self.node, why)
        self.out_of_step = True
        self._losses += 1

    async def _write_rows(self) -> None:
        """Write queued changes in order, in batches; rewrite all rows when out of step.

        Only a full queue or this task marks the rows out of step once it runs, and the queue
        cannot fill while this task waits on it, so the wait never delays a rewrite.  (Changes
        written just before a rewrite are harmless: the rewrite supersedes them.)"""
        while True:
            if self.out_of_step:
                await self._resync()
                continue
            rows = [await self._rows_out.receive()]
            # What queued while the last rows were written goes in one write (in order).
            while len(rows) < SESSION_BATCH_ROWS:
                try:
                    rows.append(self._rows_out.receive_nowait())
                except trio.WouldBlock:
                    break
            if not await self.sessions.record(self.node, rows):
                self.metrics.session_rows_dropped.inc(len(rows))
                self._step_out(f"writing {len(rows)} change(s) failed")

    async def _resync(self) -> None:
        """Rewrite this node's rows from a snapshot until the database takes it.

        Each attempt discards the queued changes (the snapshot taken right after covers them).
        Changes made while the write is in flight are queued and written after it, in order;
        a change lost meanwhile (the queue filled up again) calls for another rewrite at once.
        """
        delay = RESYNC_FIRST_S
        while True:
            while True:
                try:
                    self._rows_out.receive_nowait()
                except trio.WouldBlock:
                    break
            losses = self._losses
            rows = self._snapshot()
            self._rewriting = True
            try:
                written = await self.sessions.replace(self.node, rows)
            finally:
                self._rewriting = False
            if written:
                self.metrics.session_rows_resyncs.inc()
                logger.info("node %s rewrote its %s session row(s)", self.node, len(rows))
                if self._losses == losses:
                    self.out_of_step = False
                    return
                continue
            logger.info("node %s session rows: rewrite failed, next in %s s", self.node, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESYNC_MAX_S)

    # -- commands

    async def command(self, phone: str, msg_id: object, body: object) -> dict[str, Any]:
        """Run a command given as JSON on whichever node holds ``phone``; the JSON answer.

        Raises a :class:`~ingest.commands.CommandError` subclass.
        """
        message = message_from_json(msg_id, body)
        candidates = phone_candidates(phone)
        for candidate in candidates:
            result = await self.execute_local(candidate, message)
            if result is not None:
                return result
        found = await self.sessions.locate(candidates)
        if found is None or found[1] == self.node:
            raise TerminalOfflineError(f"terminal {phone} is not online")
        held_as, node = found
        return await self._relay(node, held_as, msg_id, body)

    async def _relay(self, node: str, phone: str, msg_id: object, body: object) -> dict[str, Any]:
        if len(self._waiting) >= MAX_WAITING_REPLIES:
            raise CommandBusyError("too many relayed commands waiting for answers")
        request_id = uuid.uuid4().hex
        waiter = _Waiter()
        self._waiting[request_id] = waiter
        request = {
            "type": "command",
            "id": request_id,
            "from": self.node,
            "phone": phone,
            "msg_id": f"0x{parse_msg_id(msg_id):04x}",
            "body": body if body is not None else {},
        }
        try:
            logger.info("phone=%s relaying 0x%04x to node %s", phone, parse_msg_id(msg_id), node)
            if not await self.transport.publish(node, request):
                raise NodeUnreachableError(f"cannot reach node {node}")
            with trio.move_on_after(ACCEPT_TIMEOUT_S):
                await waiter.accepted.wait()
            if not waiter.accepted.is_set():
                raise NodeUnreachableError(
                    f"node {node} did not take the command within {ACCEPT_TIMEOUT_S:g} s"
                )
            with trio.move_on_after(self.relay_timeout_s):
                await waiter.event.wait()
            if not waiter.event.is_set():
                raise NodeUnreachableError(
                    f"node {node} did not answer within {self.relay_timeout_s:g} s"
                )
        finally:
            del self._waiting[request_id]
        reply = waiter.reply
        if reply.get("ok") is True and isinstance(reply.get("result"), Mapping):
            return dict(reply["result"])
        raise error_from_json(reply)

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        async for message in self._inbox_out:
            kind = message.get("type")
            request_id = message.get("id")
            if not isinstance(request_id, str):
                logger.warning("cluster message without an id ignored: %.200r", message)
            elif kind in ("accepted", "reply"):
                waiter = self._waiting.get(request_id)
                if waiter is None:
                    logger.info("late %s %s ignored", kind, request_id)
                elif kind == "accepted":
                    waiter.accepted.set()
                elif not waiter.event.is_set():
                    waiter.reply = message
                    waiter.accepted.set()
                    waiter.event.set()
            elif kind == "command" and isinstance(message.get("from"), str):
                slot = object()  # the limiter's borrower: ids come from peers, may repeat
                try:
                    self._relayed.acquire_on_behalf_of_nowait(slot)
                except trio.WouldBlock:
                    error = CommandBusyError(f"node {self.node} runs too many relayed commands")
                    nursery.start_soon(self._answer, message, None, error)
                else:
                    nursery.start_soon(self._serve, message, slot)
            else:
                logger.warning("unknown cluster message ignored: %.200r", message)

    async def _serve(self, request: dict[str, Any], slot: object) -> None:
        """Run a command relayed to this node and send the answer back."""
        self.metrics.commands_relayed.inc()
        try:
            accepted = {"type": "accepted", "id": request["id"]}
            if not await self.transport.publish(request["from"], accepted):
                return  # the database is gone: the relaying node gives up on its own
            phone = request.get("phone")
            if not isinstance(phone, str):
                raise BadCommandError("relayed command without a phone")
            message = message_from_json(request.get("msg_id"), request.get("body"))
            result = await self.execute_local(phone, message)
            if result is None:
                raise TerminalOfflineError(f"terminal {phone} is not online on {self.node}")
        except CommandError as error:
            await self._answer(request, None, error)
        else:
            await self._answer(request, result, None)
        finally:
            self._relayed.release_on_behalf_of(slot)

    async def _answer(
        self, request: dict[str, Any], result: dict[str, Any] | None, error: CommandError | None
    ) -> None:
        reply: dict[str, Any] = {"type": "reply", "id": request["id"]}
        if error is None:
            reply.update(ok=True, result=result)
        else:
            reply.update(ok=False, **error.to_json())
        if not await self.transport.publish(request["from"], reply):
            logger.warning(
                "could not send the answer to %s back to %s", request["id"], request["from"]
            )
