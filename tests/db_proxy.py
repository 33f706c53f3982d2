"""A TCP proxy in front of PostgreSQL that tests can cut and restore: a real database outage.

The server under test is given :meth:`DatabaseProxy.dsn` instead of the database's own DSN.
:meth:`DatabaseProxy.cut` closes every proxied connection at once (the server sees its
connections break mid-statement, as when PostgreSQL restarts or the network drops) and refuses
new ones until :meth:`DatabaseProxy.restore`.  Plain sockets and threads, so it serves sync and
trio tests alike and whatever thread or process connects through it.

    with DatabaseProxy.for_dsn(pg_dsn) as proxy:
        server_dsn = proxy.dsn
        proxy.cut()      # outage
        proxy.restore()  # back
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Bytes moved per read: PostgreSQL's own messages are small; 64 KiB keeps COPY fast.
CHUNK = 64 * 1024
# Accepted-but-unserved connections the kernel may queue.
BACKLOG = 128


class DatabaseProxy:
    """See the module docstring.  ``target`` is the database's (host, port)."""

    def __init__(self, target: tuple[str, int], *, dsn: str) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
        self.port: int = self._listener.getsockname()[1]
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=str(self.port))
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._up = True
        self._stopping = False
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept, name="db-proxy", daemon=True)

    @classmethod
    def for_dsn(cls, dsn: str) -> DatabaseProxy:
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        if host.startswith("/"):  # a socket directory: the TCP server on the same machine
            host = "127.0.0.1"
        port = int(params.get("port") or 5432)
        return cls((host, port), dsn=dsn)

    # -- control

    @property
    def up(self) -> bool:
        return self._up

    def cut(self) -> None:
        """Break every proxied connection now and refuse new ones."""
        with self._lock:
            self._up = False
            pairs = list(self._pairs)
            self._pairs.clear()
        for client, upstream in pairs:
            _close(client)
            _close(upstream)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    # -- lifecycle

    def __enter__(self) -> DatabaseProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stopping = True
        self.cut()
        _close(self._listener)
        self._thread.join(timeout=5)

    # -- threads

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if not self._up:
                    _close(client)
                    _close(upstream)
                    continue
                self._pairs.add((client, upstream))
                self.accepted += 1
            threading.Thread(
                target=self._pump, args=(client, upstream), name="db-proxy-pump", daemon=True
            ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            try:
                selector.register(client, selectors.EVENT_READ)
                selector.register(upstream, selectors.EVENT_READ)
            except (OSError, ValueError):
                return
            while True:
                try:
                    ready = selector.select(timeout=0.5)
                except (OSError, ValueError):
                    break
                if (client, upstream) not in self._pairs:
                    break
                done = False
                for key, _ in ready:
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(CHUNK)
                        if data:
                            peers[source].sendall(data)
                        else:
                            done = True
                    except OSError:
                        done = True
                if done:
                    break
        with self._lock:
            self._pairs.discard((client, upstream))
        _close(client)
        _close(upstream)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
