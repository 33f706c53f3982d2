"""Online sessions of all nodes and the command channel between them (JT/T 808 commands
relayed to the node that holds the terminal).

* :class:`SessionTable` -- the ``sessions`` table (phone, node, connected_since, peer): one row
  per authenticated terminal, written by the node holding its connection.
* :class:`NotifyBus` -- JSON messages to a node over PostgreSQL LISTEN/NOTIFY.

Both match the server's ``ingest.interfaces.SessionRecords`` and ``ClusterTransport`` protocols
(plain values in and out), and both report database trouble by their return value after logging
it, never by raising: the server goes on serving the terminals it holds.

psycopg's async API runs on asyncio only, so everything here uses sync connections in worker
threads.  The LISTEN connection lives in one long-running thread that waits on
``Connection.notifies(timeout=...)`` and hands each message to trio through a memory channel
(``trio.from_thread.run``); when the channel is full the thread waits, and PostgreSQL keeps the
notifications queued meanwhile.

NOTIFY payloads must stay under 8000 bytes, so a message is sent as JSON text cut into chunks of
:data:`CHUNK_CHARS`, all in one transaction (they are delivered together, in order, or not at
all), each ``"<message id>:<index>:<count>:<text>"``; the listener joins them.  A node's channel
is ``jt808_`` and a hash of the schema and the node id: node ids are free text, channel names are
identifiers of at most 63 bytes, and deployments in two schemas of one database stay apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Connecting to a database that does not answer must not hold a node for long.
CONNECT_TIMEOUT_S = 5
# NOTIFY payloads are limited to 8000 bytes; JSON is sent ASCII-only (one byte a character),
# and the chunk header takes under 60.
CHUNK_CHARS = 7900
# The largest message: a reassembled answer may hold the reassembler's 8 MiB per series, twice
# that as hex, plus the JSON around it.
MAX_MESSAGE_CHARS = 20 * 1024 * 1024
# Messages whose chunks are arriving.  Chunks of one transaction arrive together, so this only
# holds the odd interleaving; the oldest partial messages go first.
MAX_PARTIAL_MESSAGES = 16
# The listener wakes this often to see whether it should stop.
POLL_S = 0.5
# Reconnection back-off of the listener after a database error, doubling up to the cap.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


class ThreadConnection:
    """One sync connection used by one thread at a time, reconnected after errors.

    :meth:`run_async` runs work in a worker thread under :attr:`limiter` (one at a time).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self.limiter = trio.CapacityLimiter(1)

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                )
            try:
                return work(self._conn)
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None  # reconnect on the next call
                raise

    async def run_async(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await trio.to_thread.run_sync(self.run, work, limiter=self.limiter)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def channel_name(schema: str, node: str) -> str:
    """The LISTEN channel of ``node`` in ``schema`` (a 38-character identifier)."""
    digest = hashlib.sha256(f"{schema}\0{node}".encode()).hexdigest()[:32]
    return f"jt808_{digest}"


def _schema(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT coalesce(current_schema(), '')").fetchone()
    return str(row[0]) if row else ""


# ---------------------------------------------------------------------------------------------
# Sessions

_ONLINE = """
INSERT INTO sessions (phone, node, connected_since, peer) VALUES (%s, %s, %s, %s)
ON CONFLICT (phone) DO UPDATE SET
    node = excluded.node, connected_since = excluded.connected_since, peer = excluded.peer
"""
_OFFLINE = "DELETE FROM sessions WHERE phone = %s AND node = %s AND connected_since = %s"
_CLEAR = "DELETE FROM sessions WHERE node = %s"
# The resync: the node's rows that are not current go, the current ones are upserted, except
# over another node's newer row (see SessionTable.replace).
_REPLACE_DELETE = "DELETE FROM sessions WHERE node = %s AND NOT (phone = ANY(%s))"
_REPLACE_UPSERT = """
INSERT INTO sessions (phone, node, connected_since, peer)
SELECT phone, %s, since, peer FROM unnest(%s::text[], %s::timestamptz[], %s::text[])
    AS current (phone, since, peer)
ON CONFLICT (phone) DO UPDATE SET
    node = excluded.node, connected_since = excluded.connected_since, peer = excluded.peer
WHERE sessions.node = excluded.node OR sessions.connected_since <= excluded.connected_since
"""
_LOCATE = "SELECT phone, node FROM sessions WHERE phone = ANY(%s)"


class SessionTable:
    """The ``sessions`` table; statements run in order on one connection in a worker thread."""

    def __init__(self, dsn: str) -> None:
        self._link = ThreadConnection(dsn)

    async def _execute(self, what: str, query: str, params: Sequence[Any]) -> bool:
        try:
            await self._link.run_async(lambda conn: conn.execute(query, params))
        except psycopg.Error as exc:
            logger.warning("sessions table: %s failed: %s", what, exc)
            return False
        return True

    async def clear_node(self, node: str) -> bool:
        return await self._execute(f"clearing node {node}", _CLEAR, (node,))

    async def online(self, phone: str, node: str, connected_since: datetime, peer: str) -> bool:
        return await self._execute(
            f"phone={phone} online", _ONLINE, (phone, node, connected_since, peer)
        )

    async def offline(self, phone: str, node: str, connected_since: datetime) -> bool:
        return await self._execute(
            f"phone={phone} offline", _OFFLINE, (phone, node, connected_since)
        )

    async def record(self, node: str, changes: Sequence[tuple[str, str, datetime, str]]) -> bool:
        """Each ("online" | "offline", phone, connected_since, peer) change in order, in one
        transaction: a reconnect storm brings one row per terminal, and one commit each
        would keep the rows minutes behind the connections."""

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                for kind, phone, since, peer in changes:
                    if kind == "online":
                        conn.execute(_ONLINE, (phone, node, since, peer))
                    else:
                        conn.execute(_OFFLINE, (phone, node, since))

        try:
            await self._link.run_async(write)
        except psycopg.Error as exc:
            logger.warning("sessions table: %s changes failed: %s", len(changes), exc)
            return False
        return True

    async def replace(self, node: str, rows: Sequence[tuple[str, datetime, str]]) -> bool:
        """Make ``rows`` (phone, connected_since, peer) the whole set of ``node``'s rows, in one
        transaction of two statements (so 20 000 rows are one round trip each, not 20 000).
        A phone listed twice keeps its last row.  Another node's row for one of these phones
        with a later ``connected_since`` is left alone: that node took the terminal over, and
        this node's connection to it is the stale one (it goes at its idle timeout)."""
        current = {phone: (since, peer) for phone, since, peer in rows}
        phones = list(current)
        since = [row[0] for row in current.values()]
        peers = [row[1] for row in current.values()]

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(_REPLACE_DELETE, (node, phones))
                conn.execute(_REPLACE_UPSERT, (node, phones, since, peers))

        try:
            await self._link.run_async(write)
        except psycopg.Error as exc:
            logger.warning(
                "sessions table: rewriting %s row(s) of node %s failed: %s", len(phones), node, exc
            )
            return False
        return True

    async def locate(self, phones: Sequence[str]) -> tuple[str, str] | None:
        """(phone, node) of the first of ``phones`` with a row."""
        try:
            rows = await self._link.run_async(
                lambda conn: conn.execute(_LOCATE, (list(phones),)).fetchall()
            )
        except psycopg.Error as exc:
            logger.warning("sessions table: lookup of %s failed: %s", phones, exc)
            return None
        nodes = {str(phone): str(node) for phone, node in rows}
        for phone in phones:
            if phone in nodes:
                return phone, nodes[phone]
        return None

    def rows(self) -> list[tuple[str, str, datetime, str | None]]:
        """Every row (for tests and operators)."""
        query = "SELECT phone, node, connected_since, peer FROM sessions ORDER BY phone"
        return self._link.run(lambda conn: [tuple(r) for r in conn.execute(query).fetchall()])

    def close(self) -> None:
        self._link.close()


# ---------------------------------------------------------------------------------------------
# Messages between nodes


def encode_chunks(message: Mapping[str, Any]) -> list[str]:
    """``message`` as NOTIFY payloads (see the module docstring)."""
    text = json.dumps(message, ensure_ascii=True, separators=(",", ":"))
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(f"message of {len(text)} characters is over {MAX_MESSAGE_CHARS}")
    pieces = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    tag = uuid.uuid4().hex
    return [f"{tag}:{i}:{len(pieces)}:{piece}" for i, piece in enumerate(pieces)]


class ChunkJoiner:
    """Joins chunked payloads back into messages; bounded by :data:`MAX_PARTIAL_MESSAGES`."""

    def __init__(self) -> None:
        self._partial: OrderedDict[str, list[str | None]] = OrderedDict()

    def feed(self, payload: str) -> dict[str, Any] | None:
        """The message completed by ``payload``, or None (incomplete or malformed)."""
        try:
            tag, index_text, count_text, piece = payload.split(":", 3)
            index, count = int(index_text), int(count_text)
        except ValueError:
            logger.warning("malformed cluster notification ignored: %.80r", payload)
            return None
        if not 0 <= index < count or count * CHUNK_CHARS > MAX_MESSAGE_CHARS + CHUNK_CHARS:
            logger.warning("cluster notification with bad chunk numbers ignored: %.80r", payload)
            return None
        if count == 1:
            return self._decode(piece)
        parts = self._partial.get(tag)
        if parts is None:
            parts = self._partial[tag] = [None] * count
            while len(self._partial) > MAX_PARTIAL_MESSAGES:
                dropped, _ = self._partial.popitem(last=False)
                logger.warning("incomplete cluster message %s dropped", dropped)
        if len(parts) != count:
            return None
        parts[index] = piece
        if any(part is None for part in parts):
            return None
        del self._partial[tag]
        return self._decode("".join(part or "" for part in parts))

    @staticmethod
    def _decode(text: str) -> dict[str, Any] | None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("cluster message is not JSON: %.80r", text)
            return None
        if not isinstance(message, dict):
            logger.warning("cluster message is not an object: %.80r", text)
            return None
        return message


class NotifyBus:
    """Messages to nodes over LISTEN/NOTIFY; see the module docstring."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._link = ThreadConnection(dsn)
        # The listener thread runs as long as the node: it gets its own limiter, so it never
        # takes a token of trio's default thread pool.
        self._listen_limiter = trio.CapacityLimiter(1)

    async def publish(self, node: str, message: Mapping[str, Any]) -> bool:
        try:
            chunks = encode_chunks(message)
        except ValueError as exc:
            logger.warning("message to node %s not sent: %s", node, exc)
            return False

        def notify(conn: psycopg.Connection[Any]) -> None:
            channel = channel_name(_schema(conn), node)
            with conn.transaction():
                for chunk in chunks:
                    conn.execute("SELECT pg_notify(%s, %s)", (channel, chunk))

        try:
            await self._link.run_async(notify)
        except psycopg.Error as exc:
            logger.warning("message to node %s not sent: %s", node, exc)
            return False
        return True

    async def listen(
        self,
        node: str,
        inbox: trio.MemorySendChannel[dict[str, Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the messages to ``node`` into ``inbox`` until cancelled.

        Readiness is reported after the first attempt to LISTEN, whether it worked or not (a
        node must start while the database is down; the thread keeps reconnecting).
        """
        stop = threading.Event()
        attempted = trio.Event()

        async def stopper() -> None:
            try:
                await trio.sleep_forever()
            finally:
                stop.set()  # the thread sees it within POLL_S; the nursery waits for it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            nursery.start_soon(
                lambda: trio.to_thread.run_sync(
                    self._listen_thread, node, inbox, attempted, stop, limiter=self._listen_limiter
                )
            )
            await attempted.wait()
            task_status.started()

    def _listen_thread(
        self,
        node: str,
        inbox: trio.MemorySendChannel[dict[str, Any]],
        attempted: trio.Event,
        stop: threading.Event,
    ) -> None:
        retry_s = RETRY_FIRST_S
        joiner = ChunkJoiner()
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                ) as conn:
                    channel = channel_name(_schema(conn), node)
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    logger.info("node %s listens on %s", node, channel)
                    trio.from_thread.run_sync(attempted.set)
                    retry_s = RETRY_FIRST_S
                    while not stop.is_set():
                        for notification in conn.notifies(timeout=POLL_S):
                            message = joiner.feed(notification.payload)
                            if message is not None:
                                trio.from_thread.run(inbox.send, message)
                            if stop.is_set():
                                break
            except psycopg.Error as exc:
                logger.warning("node %s listener: %s; retrying in %s s", node, exc, retry_s)
                try:
                    trio.from_thread.run_sync(attempted.set)
                except (trio.RunFinishedError, trio.Cancelled):
                    return
                stop.wait(retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
            except (trio.RunFinishedError, trio.Cancelled, trio.BrokenResourceError):
                return  # trio is shutting the listener down
            except trio.ClosedResourceError:
                return

    def close(self) -> None:
        self._link.close()
