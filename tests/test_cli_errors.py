"""Failures a person meets on the command line are one line naming the cause, never a
traceback: ports in use, addresses not of this machine, a bad or unreachable database, a closed
target port, Ctrl-C.  The commands run as processes, as people run them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# No database answers here (port 1 of loopback refuses at once).
UNREACHABLE_DSN = "postgresql://jt808@127.0.0.1:1/jt808"
# A command that fails at start does so within this (imports included, on a busy machine).
START_TIMEOUT_S = 60.0


def _jt808(*argv: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", *argv]


def _run(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _jt808(*argv),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
        env=_env(tmp_path),
    )


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JT808_")}
    env["JT808_DATA_DIR"] = str(tmp_path / "data")
    return env


@contextlib.contextmanager
def _busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))  # where the server binds by default
        sock.listen()
        yield sock.getsockname()[1]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def _serve(*argv: str) -> list[str]:
    return [
        "serve",
        "--dsn",
        UNREACHABLE_DSN,
        "--port",
        "0",
        "--http-port",
        "0",
        "--no-rules",
        "--config",
        "/dev/null",
        *argv,
    ]


def test_serve_on_a_terminal_port_in_use_names_the_port(tmp_path: Path) -> None:
    with _busy_port() as port:
        done = _run(*_serve("--port", str(port)), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [e for e in _errors(done.stderr) if "cannot listen" in e]
    assert line.endswith(
        f"cannot listen for terminals on 0.0.0.0 port {port}: Address already in use"
    )


def test_serve_on_an_operator_port_in_use_names_the_port(tmp_path: Path) -> None:
    with _busy_port() as port:
        done = _run(*_serve("--http-port", str(port)), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [e for e in _errors(done.stderr) if "cannot listen" in e]
    assert f"cannot listen for the operator port on 127.0.0.1 port {port}" in line


def test_serve_on_an_address_not_of_this_machine(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    done = _run(*_serve("--host", "192.0.2.1"), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [e for e in _errors(done.stderr) if "cannot listen" in e]
    assert line.endswith(
        "cannot listen for terminals on 192.0.2.1 port 0: Cannot assign requested address"
    )


def test_serve_with_a_dsn_that_is_not_one(tmp_path: Path) -> None:
    done = _run(*_serve("--dsn", "db.example.com"), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = _errors(done.stderr)
    assert "--dsn / JT808_DSN is not a connection string" in line


def test_serve_with_an_unreachable_database_serves_and_says_why(tmp_path: Path) -> None:
    """The node serves (and spools) while its database is down; what it says about it is one
    line at a time, and it stops cleanly."""
    process = subprocess.Popen(
        _jt808(*_serve("--data-dir", str(tmp_path / "data"))),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert process.stderr is not None
        seen = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            seen.append(line)
            if "serving JT/T 808" in line or not line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=START_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = "".join(seen) + rest
    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert "database unreachable" in stderr
    assert "Connection refused" in stderr


def test_simulate_against_a_closed_port_says_why(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _run(
        "simulate",
        "--target",
        f"127.0.0.1:{port}",
        "--terminals",
        "2",
        "--duration-s",
        "1",
        "--drain-s",
        "0.5",
        "--progress-s",
        "0",
        tmp_path=tmp_path,
    )
    assert done.returncode == 1
    assert "failed to open (connection refused)" in done.stdout


def test_ctrl_c_on_simulate_prints_the_summary_and_exits_130(tmp_path: Path) -> None:
    process = subprocess.Popen(
        _jt808(
            "simulate",
            "--target",
            "127.0.0.1:1",
            "--terminals",
            "2",
            "--duration-s",
            "600",
            "--progress-s",
            "0.2",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the first progress line: it runs
        assert first.startswith("[")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=START_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    assert err.rstrip().endswith("jt808 simulate: interrupted")
    assert out.startswith("jt808 simulate: 2 terminals,")
    assert "failed to open (connection refused)" in out


@pytest.mark.parametrize("argv", [["decode", "--raw", "/nonexistent/capture.bin"]])
def test_decode_of_a_missing_file_as_a_process(argv: list[str], tmp_path: Path) -> None:
    done = _run(*argv, tmp_path=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "jt808 decode: cannot read /nonexistent/capture.bin: No such file or directory"
    )
