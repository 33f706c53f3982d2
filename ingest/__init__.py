"""The JT/T 808 ingestion server: the only package that touches sockets.

* :mod:`ingest.config` -- :class:`ServerConfig` and its loader (flags > env > TOML > defaults).
* :mod:`ingest.session` -- the pure per-connection state machine.
* :mod:`ingest.interfaces` -- what the server needs from storage and the registry, with
  in-memory implementations.
* :mod:`ingest.server` -- the trio TCP server; :mod:`ingest.http` the operator HTTP port;
  :mod:`ingest.metrics` its Prometheus metrics; :mod:`ingest.capture` the byte recorder.
"""

from __future__ import annotations

from ingest.config import ConfigError, ServerConfig, add_arguments, load_config
from ingest.http import OperatorHttp
from ingest.interfaces import (
    AuthRequest,
    Completion,
    CompletionEvent,
    InMemoryPositionSink,
    InMemorySessionDirectory,
    InMemoryTerminalRegistry,
    PositionRecord,
    PositionSink,
    RegistrationOutcome,
    RegistrationRequest,
    SessionDirectory,
    TerminalInfo,
    TerminalRegistry,
)
from ingest.metrics import Metrics
from ingest.server import Server
from ingest.session import Session, SessionPolicy, SessionState

__all__ = [
    "AuthRequest",
    "Completion",
    "CompletionEvent",
    "ConfigError",
    "InMemoryPositionSink",
    "InMemorySessionDirectory",
    "InMemoryTerminalRegistry",
    "Metrics",
    "OperatorHttp",
    "PositionRecord",
    "PositionSink",
    "RegistrationOutcome",
    "RegistrationRequest",
    "Server",
    "ServerConfig",
    "Session",
    "SessionDirectory",
    "SessionPolicy",
    "SessionState",
    "TerminalInfo",
    "TerminalRegistry",
    "add_arguments",
    "load_config",
]
