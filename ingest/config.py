"""The server's one typed configuration.

Sources, strongest first: command-line flags, ``JT808_*`` environment variables, a TOML file,
the defaults below.  The TOML file is named by ``--config FILE`` or ``JT808_CONFIG``; its keys
are the field names of :class:`ServerConfig` at the top level::

    port = 6808
    ack = "durable"
    heartbeat_interval_s = 30
    capture_dir = "/var/lib/jt808/capture"

An environment variable is ``JT808_`` + the field name in upper case (``JT808_HTTP_PORT=9900``;
an empty value means "unset" for the fields that may be None).  A key that is not a field, in
the file or in the environment, is a :class:`ConfigError`: a typo must not silently fall back to
a default.  The only other ``JT808_*`` names tolerated are listed in :data:`OTHER_ENV`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from ingest import limits
from ingest.limits import HttpLimits, limit_problems
from protocol.codec import MAX_BODY
from protocol.framing import MAX_ESCAPED_FRAME

ENV_PREFIX = "JT808_"
CONFIG_ENV = "JT808_CONFIG"
# JT808_* names that belong to other parts of the application, not to this config.
# (JT808_TOKEN: the bearer token of the commands that call the operator port.)
OTHER_ENV = frozenset(
    {CONFIG_ENV, "JT808_TEST_DSN", "JT808_LOG_LEVEL", "JT808_CACERT", "JT808_TOKEN"}
)

AckMode = Literal["durable", "immediate"]
RegistrationPolicy = Literal["open", "registry"]

# One receive reads at most 64 KiB (see ingest.server); the decoder's buffer must hold an
# unfinished frame plus one such read, so it may never be configured below this sum.
RECV_CHUNK_BYTES = 64 * 1024
# Positions storage of a new schema (storage.schema.BackendChoice).
STORAGE_BACKENDS = ("auto", "timescaledb", "partitioned")


class ConfigError(Exception):
    """The configuration is unusable; the message says which key and why."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything the ingestion server can be told.  Units are in the names."""

    # -- listening
    host: str = "0.0.0.0"  # noqa: S104 - terminals connect from anywhere by design
    port: int = 6808
    # The operator port (/metrics, /healthz, /terminals) lists terminals: loopback by default.
    http_host: str = "127.0.0.1"
    http_port: int = 9808
    # HTTPS on the operator port: a PEM certificate chain and its key (both or neither).
    # Without them an http_host beyond loopback is refused at start (ingest.tls.exposure)
    # unless allow_insecure_http is set, which is then logged as a warning at every start.
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    allow_insecure_http: bool = False
    # The operator port's caps; the reason for each default is in ingest.limits.
    http_max_head_bytes: int = limits.MAX_REQUEST_HEAD_BYTES
    http_max_headers: int = limits.MAX_REQUEST_HEADERS
    http_head_timeout_s: float = limits.HEAD_TIMEOUT_S
    http_body_timeout_s: float = limits.REQUEST_TIMEOUT_S
    http_max_body_bytes: int = limits.MAX_REQUEST_BODY_BYTES
    http_max_masterdata_body_bytes: int = limits.MAX_MASTERDATA_BODY_BYTES
    http_max_connections: int = limits.MAX_OPEN_CONNECTIONS
    http_max_connections_per_address: int = limits.MAX_CONNECTIONS_PER_ADDRESS
    http_max_streams: int = limits.MAX_STREAMS
    http_max_streams_per_user: int = limits.MAX_STREAMS_PER_USER
    workers: int = 1
    # Accepted connections beyond this are closed at once.  A terminal holds one connection;
    # 20 000 covers a large municipal fleet with room, and bounds sockets and tasks.
    max_connections: int = 20_000

    # -- protocol policy
    ack: AckMode = "durable"
    registration: RegistrationPolicy = "open"
    # Refused messages and failed authentications a connection may cause before it is closed.
    max_failures: int = 5
    # Authentication lock-outs (ingest.lockout), across the connections of a process.  A
    # phone's own terminal fails only when misconfigured: 10 wrong codes within the window lock
    # the phone's new logins out for auth_lockout_s (its live connection is untouched).  Many
    # terminals share one address behind a carrier's NAT, so an address is locked only after
    # ten times as many failures.  0 disables that lock.
    auth_failures_per_phone: int = 10
    auth_failures_per_address: int = 100
    auth_failure_window_s: float = 300.0
    auth_lockout_s: float = 300.0
    # Operator accounts on the operator port (ingest.access): every request but /healthz needs
    # a bearer token; /metrics too unless metrics_public (Prometheus scrapes without one).
    metrics_public: bool = True
    # Requests with a wrong token from one address within the window before the address is
    # answered 429 for http_login_lockout_s, unchecked.  An operator mistypes a few times; a
    # script with a stale token retries a few times a minute; 20 is past both, and 256-bit
    # tokens cannot be guessed anyway: the lock-out bounds the cost (a database lookup each).
    http_login_failures_per_address: int = 20
    http_login_failure_window_s: float = 300.0
    http_login_lockout_s: float = 300.0
    # The operator console's map: a tile URL template ({z}/{x}/{y}: the province's own tile
    # server, Tianditu, OpenStreetMap) and its attribution; None draws vehicles and fences on a
    # plain background (a control room without Internet access).
    console_tile_url: str | None = None
    console_tile_attribution: str | None = None
    # A vehicle is shown offline once its latest position was received this long ago: ten
    # times the usual 60 s reporting interval of a parked vehicle (JT/T 808-2019 table 20,
    # parameter 0x0027), so a few lost reports do not flip it.
    console_offline_after_s: float = 600.0

    # -- timeouts
    # JT/T 808-2019 table 20, parameter 0x0001; 60 s is the usual factory setting.
    heartbeat_interval_s: float = 60.0
    # None: three heartbeat intervals (a terminal that missed three is gone), capped below.
    idle_timeout_s: float | None = None
    idle_timeout_cap_s: float = 600.0
    # A connection must authenticate within this time (bounds connections that never do).
    auth_timeout_s: float = 60.0
    # A peer that does not take our replies within this time is closed.
    send_timeout_s: float = 30.0
    # Graceful shutdown: how long connections get to finish in-flight acknowledgements.
    shutdown_grace_s: float = 10.0

    # -- per-connection caps
    # Escaped bytes between two flags; the default is the largest legal frame (see
    # protocol.framing.MAX_ESCAPED_FRAME), anything longer is junk.
    max_frame_bytes: int = MAX_ESCAPED_FRAME
    # The decoder's buffer: one unfinished frame plus one 64 KiB read, four times over.
    max_buffered_bytes: int = 256 * 1024
    # Stored but not yet acknowledged messages per connection.  Terminals mostly wait for each
    # ack (stop-and-wait, clause 4.5.2 retransmission); back-fill bursts pipeline a few.  64
    # un-acked 0x0704 of at most 1023 bytes each keep a connection under ~64 KiB of positions;
    # when reached the connection stops reading until storage catches up.
    max_unacked: int = 64

    # -- retransmission dedup (shared by all connections)
    # The terminal retransmits after T*(n+1) for n up to its retry count (clause 4.5.2; the
    # factory defaults 10 s and 3 retries give 60 s); five minutes covers slow settings.
    dedup_window_s: float = 300.0
    # About 200 bytes an entry: 100 000 entries are ~20 MB, a 100 s window for 10 000
    # terminals each reporting every 10 s.
    dedup_max_entries: int = 100_000

    # -- sub-packaged uploads (JT/T 808-2019 4.4.3, 8.4)
    # Silence after the last new package of a series before the missing packages are asked for
    # again (0x8003, or 0x8800 for multimedia), and again after each request.  Terminals send
    # the packages of a message back to back; 30 s without one means they were lost.
    reassembly_timeout_s: float = 30.0
    # Requests before an incomplete series is given up: the terminal's own default retry
    # count (parameter 0x0003, commonly 3).
    reassembly_rounds: int = 3
    # Package bytes of unfinished series one worker holds, all terminals together; beyond it
    # new packages are refused (0x8001 result 1, sent again later) until series complete or
    # time out.  A worker serves up to ~18 000 connections at a measured ~13-18 KB each
    # (~250-320 MB), so 64 MiB is a fifth more at most, and still holds some 400 typical 0x0801
    # photos (50-300 KB) in flight at once, or 16 terminals each at its own cap below.  (256
    # MiB, the reassembler's own default, took a worker from 104 to 386 MB under a flood.)
    reassembly_max_bytes: int = 64 * 1024 * 1024
    # One terminal's share: past it its least recently fed series is evicted, and a series
    # larger than this alone is dropped.  4 MiB holds the largest photos and short recordings
    # a terminal sends (a typical JPEG is 50-300 KB) and 8192 packages of the 512-byte bodies
    # some devices cut to; a full series of 8192 x 1023 bytes (8 MiB) cannot complete.  A
    # sixteenth of the worker's budget, so one terminal's flood cannot take the rest.
    reassembly_max_bytes_per_terminal: int = 4 * 1024 * 1024

    # -- downlink commands (clause 4.5.2 retransmission: T(n+1) = T(n) x (n+1))
    # T1, the wait for the answer to the first sending; the terminal's own default TCP response
    # timeout (parameter 0x0002) is 10 s.
    command_timeout_s: float = 10.0
    # Resends after the first sending.  Two give waits of 10, 20 and 60 s (90 s in all), which
    # an operator's HTTP client still waits for; the standard's factory default of three would
    # add another 240 s.
    command_retries: int = 2
    # This server process in the ``sessions`` table and on the command channel; None means
    # "hostname:pid", unique per worker process.
    node_id: str | None = None

    # -- elsewhere in the application
    dsn: str | None = None
    capture_dir: Path | None = None
    # Capture stops for a connection once its file reaches this size.
    capture_max_bytes: int = 64 * 1024 * 1024
    spool_dir: Path | None = None
    # Multimedia files (0x0801); None means ``data_dir / "media"``.
    media_dir: Path | None = None
    # Where the embedded PostgreSQL (no dsn configured) and the default spool keep their files.
    data_dir: Path = Path("jt808-data")
    # Positions storage of a new schema: auto (TimescaleDB when the extension is installed, or
    # available and preloaded), timescaledb or partitioned.
    storage_backend: str = "auto"
    # Run a rule engine (it judges its share of the committed positions, shared with every
    # other engine on the database) and serve ``GET /alerts/stream``.
    rules: bool = True
    # TOML file with the rule settings (a table per rule name) and local sealing periods
    # (``[[sealing]]`` with start, end, name); None: the defaults, national calendar only.
    rules_file: Path | None = None

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @property
    def read_timeout_s(self) -> float:
        """Silence (no complete frame) after which a connection is closed."""
        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return min(3 * self.heartbeat_interval_s, self.idle_timeout_cap_s)

    @property
    def http_limits(self) -> HttpLimits:
        """The operator port's caps (the ``http_*`` limit fields)."""
        return HttpLimits(**_http_limit_values(self))


def _http_limit_values(config: ServerConfig) -> dict[str, Any]:
    return {name: getattr(config, f"http_{name}") for name in _HTTP_LIMIT_FIELDS}


_HTTP_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(HttpLimits))


def _validate(config: ServerConfig) -> list[str]:
    problems = []
    if config.storage_backend not in STORAGE_BACKENDS:
        problems.append(
            f"storage_backend must be one of {', '.join(STORAGE_BACKENDS)}, "
            f"got {config.storage_backend!r}"
        )
    for name in ("port", "http_port"):
        value = getattr(config, name)
        if not 0 <= value <= 0xFFFF:
            problems.append(f"{name}={value} is not a TCP port")
    problems.extend(
        f"{name} must be at least 1"
        for name in ("workers", "max_connections", "max_failures", "max_unacked", "max_frame_bytes")
        if getattr(config, name) < 1
    )
    problems.extend(
        f"{name} must not be negative"
        for name in (
            "reassembly_rounds",
            "command_retries",
            "auth_failures_per_phone",
            "auth_failures_per_address",
            "http_login_failures_per_address",
        )
        if getattr(config, name) < 0
    )
    problems.extend(_reassembly_problems(config))
    problems.extend(_http_problems(config))
    if config.node_id is not None and not config.node_id.strip():
        problems.append("node_id must not be blank")
    for name in (
        "heartbeat_interval_s",
        "idle_timeout_cap_s",
        "auth_timeout_s",
        "send_timeout_s",
        "dedup_window_s",
        "reassembly_timeout_s",
        "command_timeout_s",
        "auth_failure_window_s",
        "auth_lockout_s",
        "http_login_failure_window_s",
        "http_login_lockout_s",
        "console_offline_after_s",
    ):
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"{name} must be a positive number of seconds")
    if config.idle_timeout_s is not None and not config.idle_timeout_s > 0:
        problems.append("idle_timeout_s must be positive")
    if not config.shutdown_grace_s >= 0:
        problems.append("shutdown_grace_s must not be negative")
    if config.dedup_max_entries < 0 or config.capture_max_bytes < 0:
        problems.append("dedup_max_entries and capture_max_bytes must not be negative")
    if config.max_buffered_bytes < config.max_frame_bytes + RECV_CHUNK_BYTES:
        problems.append(
            f"max_buffered_bytes must hold max_frame_bytes plus one {RECV_CHUNK_BYTES}-byte read"
        )
    if config.ack not in typing.get_args(AckMode):
        problems.append(f"ack must be one of {typing.get_args(AckMode)}")
    if config.registration not in typing.get_args(RegistrationPolicy):
        problems.append(f"registration must be one of {typing.get_args(RegistrationPolicy)}")
    return problems


def _http_problems(config: ServerConfig) -> list[str]:
    problems = []
    if (config.http_tls_cert is None) != (config.http_tls_key is None):
        problems.append("http_tls_cert and http_tls_key go together: set both or neither")
    problems.extend(limit_problems(_http_limit_values(config), prefix="http_"))
    return problems


def _reassembly_problems(config: ServerConfig) -> list[str]:
    per_terminal, total = config.reassembly_max_bytes_per_terminal, config.reassembly_max_bytes
    if per_terminal < MAX_BODY:
        return [f"reassembly_max_bytes_per_terminal must hold one package ({MAX_BODY} bytes)"]
    if total < per_terminal:
        return ["reassembly_max_bytes must be at least reassembly_max_bytes_per_terminal"]
    return []


# ---------------------------------------------------------------------------------------------
# Loading

_HINTS: dict[str, Any] = typing.get_type_hints(ServerConfig)
FIELDS = tuple(f.name for f in dataclasses.fields(ServerConfig))

# argparse destination -> config field, for the flags of add_arguments.
_FLAG_FIELDS = {
    "dsn": "dsn",
    "host": "host",
    "port": "port",
    "http_port": "http_port",
    "http_tls_cert": "http_tls_cert",
    "http_tls_key": "http_tls_key",
    "allow_insecure_http": "allow_insecure_http",
    "ack": "ack",
    "registration": "registration",
    "workers": "workers",
    "capture_dir": "capture_dir",
    "media_dir": "media_dir",
    "node_id": "node_id",
    "rules": "rules",
    "rules_file": "rules_file",
    "storage_backend": "storage_backend",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's flags.  Unset flags stay None so weaker sources can fill them."""
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $JT808_DSN; none: an embedded database "
        "in --data-dir)",
    )
    parser.add_argument(
        "--storage-backend",
        dest="storage_backend",
        choices=STORAGE_BACKENDS,
        help="positions storage of a new schema (default auto: TimescaleDB when installed, or "
        "available and preloaded; else partitions)",
    )
    parser.add_argument(
        "--host", help="address to listen on for terminals (default 0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, help="TCP port for terminals (default 6808)")
    parser.add_argument("--http-port", type=int, help="operator HTTP port (default 9808)")
    parser.add_argument(
        "--http-tls-cert",
        dest="http_tls_cert",
        type=Path,
        metavar="FILE",
        help="serve the operator port over HTTPS with this PEM certificate chain",
    )
    parser.add_argument(
        "--http-tls-key",
        dest="http_tls_key",
        type=Path,
        metavar="FILE",
        help="the PEM private key of --http-tls-cert",
    )
    parser.add_argument(
        "--allow-insecure-http",
        dest="allow_insecure_http",
        action="store_true",
        default=None,
        help="allow plain HTTP on an operator port beyond loopback (a warning every start)",
    )
    parser.add_argument(
        "--ack",
        choices=typing.get_args(AckMode),
        help="acknowledge after storage or at once (default durable)",
    )
    parser.add_argument(
        "--registration",
        choices=typing.get_args(RegistrationPolicy),
        help="open: any terminal may register; registry: provisioned terminals only (default open)",
    )
    parser.add_argument("--workers", type=int, metavar="N", help="server processes (default 1)")
    parser.add_argument(
        "--capture", dest="capture_dir", type=Path, metavar="DIR", help="record inbound bytes"
    )
    parser.add_argument(
        "--media-dir", dest="media_dir", type=Path, metavar="DIR", help="multimedia files"
    )
    parser.add_argument(
        "--node-id", dest="node_id", metavar="ID", help="this node's id (default hostname:pid)"
    )
    parser.add_argument(
        "--rules",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a rule engine and serve /alerts/stream (default on; --no-rules: off)",
    )
    parser.add_argument(
        "--rules-file",
        dest="rules_file",
        type=Path,
        metavar="FILE",
        help="TOML: rule settings and local sealing periods",
    )


def load_config(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Merge flags > environment > TOML file > defaults into a :class:`ServerConfig`."""
    environ = {} if environ is None else environ
    values: dict[str, Any] = {}
    config_file: Path | None = getattr(args, "config", None) if args is not None else None
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
    if config_file is not None:
        values.update(_from_toml(config_file))
    values.update(_from_env(environ))
    if args is not None:
        for dest, name in _FLAG_FIELDS.items():
            value = getattr(args, dest, None)
            if value is not None:
                values[name] = value
    try:
        return ServerConfig(**values)
    except TypeError as exc:  # pragma: no cover - keys are checked above
        raise ConfigError(str(exc)) from exc


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {_known()}")
    return {key: _from_toml_value(key, value, path) for key, value in document.items()}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX) or key in OTHER_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in FIELDS:
            raise ConfigError(f"unknown environment variable {key}; known: {_known()}")
        values[name] = _from_text(name, text, f"environment variable {key}")
    return values


def _known() -> str:
    return ", ".join(FIELDS)


def _base_type(name: str) -> tuple[Any, bool]:
    """The field's type without ``| None``, and whether None is allowed."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) != len(typing.get_args(hint))
    return hint, False


def _from_text(name: str, text: str, where: str) -> Any:
    base, optional = _base_type(name)
    if optional and text == "":
        return None
    if base is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"{where}: {text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} is not {_article(base)}") from exc
    if base is Path:
        return Path(text)
    return _check_choice(name, base, text, where)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _from_toml_value(name: str, value: Any, path: Path) -> Any:
    base, _ = _base_type(name)
    where = f"{path}: {name}"
    if base is bool and isinstance(value, bool):
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is Path and isinstance(value, str):
        return Path(value)
    if (base is str or typing.get_origin(base) is Literal) and isinstance(value, str):
        return _check_choice(name, base, value, where)
    raise ConfigError(f"{where}: {value!r} is not {_article(base)}")


def _check_choice(name: str, base: Any, text: str, where: str) -> str:
    if typing.get_origin(base) is Literal and text not in typing.get_args(base):
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(typing.get_args(base))}")
    return text


def _article(base: Any) -> str:
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(typing.get_args(base))
    return {
        int: "an integer",
        float: "a number",
        Path: "a path",
        str: "a string",
        bool: "a boolean",
    }.get(base, str(base))
