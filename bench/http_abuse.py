"""The operator port under abuse: a 100 MB body, 1-byte-per-second requests and 1,000 alert
stream attempts, against a server on loopback, with the server's resident memory.

    .venv/bin/python bench/http_abuse.py [--quick] [--streams 1000] [--body-mb 100]
    .venv/bin/python bench/http_abuse.py --port 9808 --pid PID --token TOKEN   # a running node

By default it starts the operator port alone in a child process (``ingest.http.OperatorHttp``
with the default caps of :mod:`ingest.limits`, an in-memory alert feed, a command runner that
answers at once and four dispatchers' accounts), so the figures are the port's own.  Every phase
runs after the other and each is bounded by time, so the run ends by itself (about 20 s):

* ``body``: a command POST declaring 100 MB and sending it as fast as the socket takes it, and
  the same without a declared length (chunked): what the server answered, and how much it read
  before it did;
* ``trickle``: a request head sent one byte per second, and a command whose head arrives whole
  and whose body trickles one byte per second: when and how the server ended them;
* ``streams``: ``--streams`` clients opening ``GET /alerts/stream`` at once, from ten loopback
  addresses with four accounts' tokens, each holding its connection until all have answered:
  the answers by status and error; meanwhile a ``/healthz`` probe from another address.

The server's RSS (``/proc/PID/status``) is read before, at its peak (sampled every 50 ms) and
after.  The last line is one JSON object with every figure.  Linux only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import h11  # noqa: E402
import trio  # noqa: E402

MB = 1000 * 1000
USERS = ("ops-1", "ops-2", "ops-3", "ops-4")
ADDRESSES = tuple(f"127.0.0.{n}" for n in range(1, 11))
# The body and trickle clients connect from addresses of their own, so the streams' flood of
# connections (whose address's slowest heads make room for the next) leaves them alone.
BODY_ADDRESS = "127.0.1.1"
TRICKLE_ADDRESS = "127.0.1.2"
PHONE = "13800138000"
# Bounds of each phase: every client gives up by then, so the run cannot hang.
BODY_PHASE_S = 20.0
TRICKLE_PHASE_S = 20.0
STREAM_ANSWER_S = 10.0


def token(user: str) -> str:
    return f"bench-token-{user}"


# ---------------------------------------------------------------------------------------------
# The server (child process)


def serve() -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from ingest import InMemoryAlertFeed, OperatorHttp  # noqa: PLC0415
    from ingest.access import DISPATCHER, Principal  # noqa: PLC0415
    from ingest.interfaces import InMemoryOperatorAccess  # noqa: PLC0415

    async def command(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        return {"phone": phone, "reply": None}

    async def main() -> None:
        access = InMemoryOperatorAccess(
            {token(user): Principal(name=user, role=DISPATCHER) for user in USERS}
        )
        http = OperatorHttp(
            host="127.0.0.1",
            port=0,
            registry=CollectorRegistry(),
            terminals=list,
            alerts=InMemoryAlertFeed(),
            command=command,
            access=access,
        )
        async with trio.open_nursery() as nursery:
            (port,) = await nursery.start(http.run)
            print(port, flush=True)
            await trio.sleep_forever()

    trio.run(main)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------------------------------------
# The clients


def head(method: str, target: str, user: str, extra: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token(user)}\r\n"
        f"{extra}\r\n"
    ).encode()


def status_of(data: bytes) -> str:
    """The status and the error kind of what the server sent ("closed": nothing)."""
    if not data.startswith(b"HTTP/1.1 "):
        return "closed"
    status = data[9:12].decode()
    _, _, body = data.partition(b"\r\n\r\n")
    try:
        kind = json.loads(body).get("error")
    except ValueError:
        kind = None
    return f"{status} {kind}" if kind else status


async def big_body(port: int, size: int, *, chunked: bool) -> dict[str, Any]:
    """POST a command body of ``size`` bytes as fast as it is taken; the answer and how much
    went out before it came."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=BODY_ADDRESS)
    target = f"/terminals/{PHONE}/commands"
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
    received = bytearray()
    sent = 0
    start = time.monotonic()
    took = None

    async def send() -> None:
        nonlocal sent
        block = b"x" * 65536
        frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        try:
            await stream.send_all(head("POST", target, USERS[0], framing + "\r\n"))
            while sent < size:
                await stream.send_all(frame)
                sent += len(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def receive() -> None:
        nonlocal took
        try:
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
                took = took or time.monotonic() - start
        except trio.BrokenResourceError:
            pass
        nursery.cancel_scope.cancel()

    with trio.move_on_after(BODY_PHASE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    await trio.aclose_forcefully(stream)
    return {
        "declared_bytes": None if chunked else size,
        "answer": status_of(bytes(received)),
        "answered_after_s": None if took is None else round(took, 3),
        "client_sent_bytes": sent,
    }


async def trickle(port: int, data: bytes, whole: int) -> dict[str, Any]:
    """Send ``data``'s first ``whole`` bytes at once, then one byte per second."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=TRICKLE_ADDRESS)
    received = bytearray()
    sent = 0
    start = time.monotonic()
    ended = None

    async def send() -> None:
        nonlocal sent
        try:
            await stream.send_all(data[:whole])
            sent = whole
            for byte in data[whole:]:
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def receive() -> None:
        nonlocal ended
        try:
            while chunk := await stream.receive_some(4096):
                received.extend(chunk)
        except trio.BrokenResourceError:
            pass
        ended = time.monotonic() - start
        nursery.cancel_scope.cancel()

    with trio.move_on_after(TRICKLE_PHASE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    await trio.aclose_forcefully(stream)
    answer = status_of(bytes(received))
    return {
        "answer": "timed out (closed)" if answer == "closed" and ended is not None else answer,
        "closed_after_s": None if ended is None else round(ended, 1),
        "bytes_sent": sent,
        "request_bytes": len(data),
    }


async def stream_attempts(port: int, count: int) -> dict[str, Any]:
    """``count`` stream requests at once; each holds its connection until all have answered."""
    outcomes: collections.Counter[str] = collections.Counter()
    answered = 0
    all_answered = trio.Event()
    streams: list[trio.SocketStream] = []

    async def attempt(n: int) -> None:
        nonlocal answered
        outcome = "no answer"
        try:
            with trio.move_on_after(STREAM_ANSWER_S):
                address = ADDRESSES[n % len(ADDRESSES)]
                stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
                streams.append(stream)
                user = USERS[n % len(USERS)]
                await stream.send_all(head("GET", "/alerts/stream", user))
                outcome = await _response_head(stream)
        except OSError as exc:  # trio.BrokenResourceError is not one: see below
            outcome = f"connect failed: {exc.strerror}"
        except trio.BrokenResourceError:
            outcome = "closed"
        outcomes[outcome] += 1
        answered += 1
        if answered == count:
            all_answered.set()

    start = time.monotonic()
    with trio.move_on_after(STREAM_ANSWER_S + 5):
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(attempt, n)
            await all_answered.wait()
            took = time.monotonic() - start
            nursery.cancel_scope.cancel()
    for stream in streams:
        await trio.aclose_forcefully(stream)
    return {"attempts": count, "answers": dict(outcomes.most_common()), "all_in_s": round(took, 2)}


async def healthz_during(port: int, after_s: float) -> dict[str, Any]:
    """A health probe ``after_s`` into the stream flood: its answer and how long it took."""
    await trio.sleep(after_s)
    start = time.monotonic()
    received = b""
    with trio.move_on_after(STREAM_ANSWER_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=TRICKLE_ADDRESS)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n")
            while chunk := await stream.receive_some(4096):
                received += chunk
    return {"answer": status_of(received), "took_s": round(time.monotonic() - start, 3)}


async def _response_head(stream: trio.SocketStream) -> str:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "bench")]))
    conn.send(h11.EndOfMessage())
    response = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and response is None:
                return "closed"
        elif isinstance(event, h11.Response):
            response = event.status_code
            if response == 200:
                return "200 streaming"
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            break
    try:
        kind = json.loads(body).get("error")
    except ValueError:
        kind = None
    return f"{response} {kind}" if kind else str(response)


# ---------------------------------------------------------------------------------------------


async def run(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    rss = {"before": rss_bytes(pid), "peak": 0}
    done = trio.Event()

    async def sample() -> None:
        while not done.is_set():
            rss["peak"] = max(rss["peak"], rss_bytes(pid))
            await trio.sleep(0.05)

    results: dict[str, Any] = {}
    size = args.body_mb * MB
    slow_head = head("GET", "/healthz", USERS[0])
    body = b'{"msg_id": "0x8201", "body": {}}'
    command = head(
        "POST", f"/terminals/{PHONE}/commands", USERS[1], f"content-length: {len(body)}\r\n"
    )

    async def phase(name: str, coroutine: Any) -> None:
        results[name] = await coroutine

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        # One phase after another, so each one's figures are its own (under a flood of
        # connections the port makes room by closing the slowest heads, whoever sent them).
        async with trio.open_nursery() as phases:
            phases.start_soon(phase, "body_declared", big_body(port, size, chunked=False))
            phases.start_soon(phase, "body_chunked", big_body(port, size, chunked=True))
        async with trio.open_nursery() as phases:
            phases.start_soon(phase, "trickle_head", trickle(port, slow_head, 0))
            phases.start_soon(phase, "trickle_body", trickle(port, command + body, len(command)))
        async with trio.open_nursery() as phases:
            phases.start_soon(phase, "streams", stream_attempts(port, args.streams))
            phases.start_soon(phase, "healthz_in_the_flood", healthz_during(port, 0.2))
        await trio.sleep(1.0)  # the server closes what the clients left
        done.set()
    rss["after"] = rss_bytes(pid)
    results["rss_mb"] = {key: round(value / 2**20, 1) for key, value in rss.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="200 streams, a 10 MB body")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--body-mb", type=int, default=100)
    parser.add_argument("--port", type=int, help="a running node's operator port (loopback)")
    parser.add_argument("--pid", type=int, help="that node's process id (for its RSS)")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.quick:
        args.streams, args.body_mb = min(args.streams, 200), min(args.body_mb, 10)
    child = None
    if args.port is None:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        args.port, args.pid = int(child.stdout.readline()), child.pid
    elif args.pid is None:
        parser.error("--port needs --pid")
    try:
        time.sleep(0.5)  # the child settles (imports done, listening)
        results = trio.run(run, args.port, args.pid, args)
    finally:
        if child is not None:
            child.terminate()
            child.wait(10)
    for name, figures in results.items():
        print(f"{name:>14}: {json.dumps(figures)}")
    print(json.dumps({"benchmark": "http_abuse", **results}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
