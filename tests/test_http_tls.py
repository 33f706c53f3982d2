"""HTTPS on the operator port, the HTTPS clients (``jt808 alerts tail``, ``jt808 send``), and
the start-up refusal of an operator port beyond loopback without TLS."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from prometheus_client import CollectorRegistry

from ingest import ConfigError, InMemoryAlertFeed, OperatorHttp, ServerConfig, load_config
from ingest.limits import HttpLimits
from ingest.tls import TlsSetupError, exposure, is_loopback, server_context
from tests.operator_auth import TEST_TOKEN, memory_access
from tests.test_alerts_stream import alert, tail_args
from tests.test_http_hardening import parse_reply
from tools import send_cmd
from tools.alerts_tail_cmd import run_tail
from tools.cli import main
from tools.operator_client import ClientSetupError, tls_context

HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """The server's certificate chain and key, and the CA's certificate, as PEM files."""
    server = ca.issue_cert("localhost", "127.0.0.1")
    files = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem", "ca": tmp_path / "ca.pem"}
    server.private_key_pem.write_to_path(str(files["key"]))
    with files["cert"].open("wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


@asynccontextmanager
async def https_port(pem: dict[str, Path], **kwargs: Any) -> AsyncIterator[OperatorHttp]:
    http = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        access=memory_access(),
        tls=server_context(pem["cert"], pem["key"]),
        **kwargs,
    )
    async with trio.open_nursery() as nursery:
        (http.port,) = await nursery.start(http.run)
        yield http
        nursery.cancel_scope.cancel()


def client_context(pem: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pem["ca"])


async def https_request(port: int, data: bytes, context: ssl.SSLContext) -> bytes:
    """Send ``data`` over TLS and read until the server closes."""
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    try:
        await stream.send_all(data)
        return await read_all(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """What the server sends until it closes."""
    received = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:
        pass  # the server closes without close_notify (https_compatible): the answer is whole
    return bytes(received)


async def test_healthz_over_tls(pem: dict[str, Path]) -> None:
    with trio.fail_after(10):
        async with https_port(pem) as http:
            reply = parse_reply(await https_request(http.port, HEALTHZ, client_context(pem)))
            assert (reply.status, reply.json()) == (200, {"status": "ok"})


async def test_plain_http_and_stalled_handshakes_cost_only_their_own_connection(
    pem: dict[str, Path],
) -> None:
    limits = HttpLimits(head_timeout_s=1.0)
    with trio.fail_after(10):
        async with https_port(pem, limits=limits) as http:
            port = http.port
            # A TLS client that has connected but not yet asked: it is served after the rest.
            waiting = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                client_context(pem),
                server_hostname="localhost",
            )
            await waiting.do_handshake()
            stalled = await trio.open_tcp_stream("127.0.0.1", port)  # says nothing at all

            plain = await trio.open_tcp_stream("127.0.0.1", port)
            await plain.send_all(HEALTHZ)
            with trio.fail_after(2):
                answer = await read_all(plain)
            await plain.aclose()
            assert not answer.startswith(b"HTTP/")  # closed, at most a TLS alert: no answer

            reply = parse_reply(await https_request(port, HEALTHZ, client_context(pem)))
            assert reply.status == 200
            await waiting.send_all(HEALTHZ)
            assert parse_reply(await read_all(waiting)).status == 200
            await trio.aclose_forcefully(waiting)

            # The silent one is closed at the head's deadline.
            with trio.fail_after(limits.head_timeout_s + 1):
                assert await stalled.receive_some(10) == b""
            await stalled.aclose()
            with trio.fail_after(2):
                while http.open_connections:  # noqa: ASYNC110 - the server's state, from outside
                    await trio.sleep(0.01)


async def test_alerts_tail_and_send_over_https_with_the_ca_file(pem: dict[str, Path]) -> None:
    feed = InMemoryAlertFeed()
    feed.publish(alert(1))
    sent: list[tuple[str, object]] = []

    async def runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        sent.append((phone, msg_id))
        return {"phone": phone, "reply": None}

    with trio.fail_after(20):
        async with https_port(pem, alerts=feed, command=runner) as http:
            url = f"https://localhost:{http.port}"
            out = io.StringIO()
            ca_file = str(pem["ca"])
            args = tail_args(
                "--http", url, "--cacert", ca_file, "--after", "0", "--count", "1", "--json"
            )
            assert await trio.to_thread.run_sync(lambda: run_tail(args, out=out)) == 0
            assert json.loads(out.getvalue()) == alert(1)

            def send(*extra: str) -> tuple[int, str]:
                parser = argparse.ArgumentParser()
                send_cmd.add_arguments(parser)
                argv = ["13800138000", "0x8201", "--http", url, "--token", TEST_TOKEN, *extra]
                stdout = io.StringIO()
                with contextlib.redirect_stdout(stdout):
                    code = send_cmd.run(parser.parse_args(argv))
                return code, stdout.getvalue()

            code, printed = await trio.to_thread.run_sync(send, "--cacert", str(pem["ca"]))
            assert code == 0, printed
            assert sent == [("13800138000", "0x8201")]
            # Without the CA the node's certificate is not trusted: nothing is sent.
            code, printed = await trio.to_thread.run_sync(send)
            assert code == 1
            assert json.loads(printed)["error"] == "unreachable"
            assert "CERTIFICATE_VERIFY_FAILED" in printed
            assert len(sent) == 1


def test_the_ca_file_comes_from_the_flag_or_the_environment(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    assert tls_context(argparse.Namespace(cacert=None), {}) is None
    from_env = tls_context(argparse.Namespace(cacert=None), {"JT808_CACERT": str(pem["ca"])})
    assert from_env is not None
    assert from_env.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ClientSetupError, match=r"missing\.pem"):
        tls_context(argparse.Namespace(cacert=tmp_path / "missing.pem"), {})


# ---------------------------------------------------------------------------------------------
# Configuration and the start-up checks


def test_tls_settings_load_from_the_environment_and_go_in_pairs(pem: dict[str, Path]) -> None:
    config = load_config(
        None, {"JT808_HTTP_TLS_CERT": str(pem["cert"]), "JT808_HTTP_TLS_KEY": str(pem["key"])}
    )
    assert (config.http_tls_cert, config.http_tls_key) == (pem["cert"], pem["key"])
    with pytest.raises(ConfigError, match="http_tls_cert and http_tls_key go together"):
        ServerConfig(http_tls_cert=pem["cert"])


def test_a_certificate_that_cannot_be_used_is_a_clear_error(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(TlsSetupError, match="no such file"):
        server_context(tmp_path / "none.pem", pem["key"])
    with pytest.raises(TlsSetupError, match="cannot use certificate"):
        server_context(pem["ca"], pem["key"])  # the key is not the CA's


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.0.0.7", False),
        ("ops.example", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_exposed_operator_port_needs_tls_or_an_explicit_allowance(
    pem: dict[str, Path],
) -> None:
    exposed = {"http_host": "0.0.0.0", "registration": "registry"}
    refused = exposure(ServerConfig(**exposed))
    assert refused.refusal is not None
    assert "\n" not in refused.refusal
    assert "http_tls_cert" in refused.refusal
    assert "allow_insecure_http" in refused.refusal

    allowed = exposure(ServerConfig(**exposed, allow_insecure_http=True))
    assert allowed.refusal is None
    assert len(allowed.warnings) == 1
    assert "plain HTTP" in allowed.warnings[0]

    tls = exposure(ServerConfig(**exposed, http_tls_cert=pem["cert"], http_tls_key=pem["key"]))
    assert tls == exposure(ServerConfig(registration="registry"))
    assert tls.refusal is None
    assert tls.warnings == ()


def test_open_registration_beyond_loopback_is_warned_about() -> None:
    (warning,) = exposure(ServerConfig(host="0.0.0.0", registration="open")).warnings
    assert "registration = registry" in warning
    assert exposure(ServerConfig(host="127.0.0.1", registration="open")).warnings == ()
    assert exposure(ServerConfig(host="0.0.0.0", registration="registry")).warnings == ()


def test_serve_refuses_to_start_with_one_line_that_says_what_to_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "jt808.toml"
    config.write_text('http_host = "0.0.0.0"\n')
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--config", str(config), "--data-dir", str(tmp_path)]) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert "\n" not in message
    assert "http_tls_cert and http_tls_key" in message
    assert not (tmp_path / "pgdata").exists()  # refused before anything started
