"""ServerConfig: defaults, sources in order, and refusal of unknown or bad keys."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ingest.config import ConfigError, ServerConfig, add_arguments, load_config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    config = load_config(parse(), {})
    assert config == ServerConfig()
    assert (config.port, config.http_port, config.ack, config.registration) == (
        6808,
        9808,
        "durable",
        "open",
    )
    assert config.dsn is None
    assert config.capture_dir is None
    # idle timeout: three heartbeat intervals, capped
    assert config.read_timeout_s == 180
    assert ServerConfig(heartbeat_interval_s=300).read_timeout_s == 600
    assert ServerConfig(heartbeat_interval_s=300, idle_timeout_s=42).read_timeout_s == 42


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "jt808.toml"
    path.write_text(
        'port = 7000\nhttp_port = 7001\nack = "immediate"\nheartbeat_interval_s = 20\n'
        'capture_dir = "/tmp/cap"\nworkers = 3\n',
        encoding="utf-8",
    )
    environ = {"JT808_HTTP_PORT": "8001", "JT808_WORKERS": "2", "JT808_TEST_DSN": "ignored"}
    config = load_config(parse("--config", str(path), "--workers", "4"), environ)
    assert config.port == 7000  # file
    assert config.http_port == 8001  # environment over file
    assert config.workers == 4  # flag over both
    assert config.ack == "immediate"
    assert config.heartbeat_interval_s == 20.0
    assert config.capture_dir == Path("/tmp/cap")


def test_every_flag() -> None:
    args = parse(
        "--dsn",
        "postgresql://x",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
        "--http-port",
        "2",
        "--ack",
        "immediate",
        "--registration",
        "registry",
        "--workers",
        "2",
        "--capture",
        "/tmp/c",
    )
    config = load_config(args, {})
    assert (config.dsn, config.host, config.port, config.http_port) == (
        "postgresql://x",
        "127.0.0.1",
        1,
        2,
    )
    assert (config.ack, config.registration, config.workers) == ("immediate", "registry", 2)
    assert config.capture_dir == Path("/tmp/c")


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_unacked = 8\n", encoding="utf-8")
    assert load_config(None, {"JT808_CONFIG": str(path)}).max_unacked == 8


def test_environment_types_and_empty_values() -> None:
    config = load_config(
        None,
        {
            "JT808_IDLE_TIMEOUT_S": "12.5",
            "JT808_DSN": "",
            "JT808_SPOOL_DIR": "/var/spool/jt808",
            "JT808_REGISTRATION": "registry",
        },
    )
    assert config.idle_timeout_s == 12.5
    assert config.dsn is None
    assert config.spool_dir == Path("/var/spool/jt808")
    assert config.registration == "registry"


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("prot = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key.*prot"):
        load_config(None, {"JT808_CONFIG": str(path)})
    with pytest.raises(ConfigError, match="unknown environment variable JT808_PROT"):
        load_config(None, {"JT808_PROT": "1"})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('port = "x"', "not an integer"),
        ("port = true", "not an integer"),
        ("port = 70000", "not a TCP port"),
        ('ack = "later"', "not one of durable, immediate"),
        ("max_unacked = 0", "at least 1"),
        ("heartbeat_interval_s = -1", "positive"),
        ("max_buffered_bytes = 100", "max_buffered_bytes"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_values_in_the_file(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"JT808_CONFIG": str(path)})


def test_bad_environment_values() -> None:
    with pytest.raises(ConfigError, match=r"JT808_PORT.*not an integer"):
        load_config(None, {"JT808_PORT": "many"})
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, {"JT808_ACK": "sometimes"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(parse("--config", str(tmp_path / "absent.toml")), {})


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--ack", "maybe")
    assert exc.value.code == 2


def test_upload_command_and_cluster_settings(tmp_path: Path) -> None:
    config = load_config(
        parse("--node-id", "edge-1", "--media-dir", str(tmp_path)),
        {"JT808_COMMAND_TIMEOUT_S": "5", "JT808_COMMAND_RETRIES": "3"},
    )
    assert (config.node_id, config.media_dir) == ("edge-1", tmp_path)
    assert (config.command_timeout_s, config.command_retries) == (5.0, 3)
    defaults = ServerConfig()
    assert (defaults.node_id, defaults.media_dir) == (None, None)
    assert (defaults.reassembly_timeout_s, defaults.reassembly_rounds) == (30.0, 3)
    for bad in (
        {"command_retries": -1},
        {"command_timeout_s": 0.0},
        {"reassembly_timeout_s": float("inf")},
        {"node_id": " "},
    ):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)  # type: ignore[arg-type]


def test_reassembly_budget(tmp_path: Path) -> None:
    defaults = ServerConfig()
    assert defaults.reassembly_max_bytes == 64 * 1024 * 1024
    assert defaults.reassembly_max_bytes_per_terminal == 4 * 1024 * 1024
    path = tmp_path / "c.toml"
    path.write_text(
        "reassembly_max_bytes = 33554432\nreassembly_max_bytes_per_terminal = 1048576\n",
        encoding="utf-8",
    )
    config = load_config(None, {"JT808_CONFIG": str(path)})
    assert (config.reassembly_max_bytes, config.reassembly_max_bytes_per_terminal) == (
        32 * 1024 * 1024,
        1024 * 1024,
    )
    config = load_config(
        None, {"JT808_CONFIG": str(path), "JT808_REASSEMBLY_MAX_BYTES_PER_TERMINAL": "2097152"}
    )
    assert config.reassembly_max_bytes_per_terminal == 2 * 1024 * 1024
    assert config.reassembly_max_bytes == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"reassembly_max_bytes_per_terminal": "1000"}, "must hold one package"),
        ({"reassembly_max_bytes_per_terminal": "0"}, "must hold one package"),
        (
            {"reassembly_max_bytes": "1048576", "reassembly_max_bytes_per_terminal": "2097152"},
            "at least reassembly_max_bytes_per_terminal",
        ),
        ({"reassembly_max_bytes": "lots"}, "not an integer"),
    ],
)
def test_bad_reassembly_budget(values: dict[str, str], message: str) -> None:
    environ = {f"JT808_{name.upper()}": text for name, text in values.items()}
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ)
