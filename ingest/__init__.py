"""The JT/T 808 ingestion server: the only package that touches sockets.

* :mod:`ingest.config` -- :class:`ServerConfig` and its loader (flags > env > TOML > defaults).
* :mod:`ingest.session` -- the pure per-connection state machine.
* :mod:`ingest.interfaces` -- what the server needs from storage and the registry, with
  in-memory implementations.
* :mod:`ingest.server` -- the trio TCP server; :mod:`ingest.http` the operator HTTP port;
  :mod:`ingest.metrics` its Prometheus metrics; :mod:`ingest.capture` the byte recorder.
* :mod:`ingest.uploads` -- sub-packaged uploads of the process (the codec's reassembler).
* :mod:`ingest.commands` -- downlink commands: expected answers, retransmission schedule, JSON.
* :mod:`ingest.cluster` -- online sessions of all nodes and commands relayed between nodes.
"""

from __future__ import annotations

from ingest.commands import (
    BadCommandError,
    CommandBusyError,
    CommandError,
    CommandTimeoutError,
    NodeUnreachableError,
    TerminalOfflineError,
    message_from_json,
    retransmit_schedule,
)
from ingest.config import ConfigError, ServerConfig, add_arguments, load_config
from ingest.http import OperatorHttp
from ingest.interfaces import (
    AlertFeed,
    AlertFilter,
    AuthRequest,
    ClusterTransport,
    Completion,
    CompletionEvent,
    InMemoryAlertFeed,
    InMemoryMasterDataAdmin,
    InMemoryMediaSink,
    InMemoryPositionSink,
    InMemorySessionDirectory,
    InMemorySessionRecords,
    InMemoryTerminalRegistry,
    InMemoryTransport,
    MasterDataAdmin,
    MasterDataRejected,
    MediaRecord,
    MediaSink,
    PositionRecord,
    PositionSink,
    RegistrationOutcome,
    RegistrationRequest,
    SessionDirectory,
    SessionRecords,
    TerminalInfo,
    TerminalRegistry,
)
from ingest.metrics import Metrics
from ingest.server import Server
from ingest.session import Session, SessionPolicy, SessionState

__all__ = [
    "AlertFeed",
    "AlertFilter",
    "AuthRequest",
    "BadCommandError",
    "ClusterTransport",
    "CommandBusyError",
    "CommandError",
    "CommandTimeoutError",
    "Completion",
    "CompletionEvent",
    "ConfigError",
    "InMemoryAlertFeed",
    "InMemoryMasterDataAdmin",
    "InMemoryMediaSink",
    "InMemoryPositionSink",
    "InMemorySessionDirectory",
    "InMemorySessionRecords",
    "InMemoryTerminalRegistry",
    "InMemoryTransport",
    "MasterDataAdmin",
    "MasterDataRejected",
    "MediaRecord",
    "MediaSink",
    "Metrics",
    "NodeUnreachableError",
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
    "SessionRecords",
    "SessionState",
    "TerminalInfo",
    "TerminalOfflineError",
    "TerminalRegistry",
    "add_arguments",
    "load_config",
    "message_from_json",
    "retransmit_schedule",
]
