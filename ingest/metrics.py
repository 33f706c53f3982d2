"""Prometheus metrics of the ingestion server.

Metrics live in a :class:`prometheus_client.CollectorRegistry` given to :class:`Metrics`, never
in the global default registry, so each server (and each test) has its own.  Label values are
bounded: message ids are 16-bit and written ``0x%04x``, error kinds come from the codec's fixed
error classes, reasons from a fixed set in the server.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Ack latency from receipt of a report to its 0x8001: sub-millisecond when acking at once, a
# few to a few hundred milliseconds through a database commit, seconds when storage stalls.
ACK_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def msg_label(msg_id: int) -> str:
    return f"0x{msg_id:04x}"


class Metrics:
    """All metrics of one server, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter("jt808_connections", "Terminal connections accepted", registry=r)
        self.connections_refused = Counter(
            "jt808_connections_refused",
            "Connections closed at once because max_connections was reached",
            registry=r,
        )
        self.connections_open = Gauge(
            "jt808_connections_open", "Terminal connections open now", registry=r
        )
        self.connections_closed = Counter(
            "jt808_connections_closed", "Connections closed, by reason", ["reason"], registry=r
        )
        self.sessions = Gauge(
            "jt808_sessions_authenticated", "Authenticated terminal sessions now", registry=r
        )
        self.frames = Counter(
            "jt808_frames", "Frames decoded, by message id", ["msg_id"], registry=r
        )
        self._frame_counters: dict[int, Counter] = {}
        self.decode_errors = Counter(
            "jt808_decode_errors", "Frames that did not decode, by kind", ["kind"], registry=r
        )
        self.auth_failures = Counter(
            "jt808_auth_failures", "Failed 0x0102 authentications", registry=r
        )
        self.registrations = Counter(
            "jt808_registrations",
            "0x0100 registrations answered, by result",
            ["result"],
            registry=r,
        )
        self.refused = Counter(
            "jt808_refused_messages",
            "Messages answered with failure before authentication",
            registry=r,
        )
        self.positions = Counter(
            "jt808_positions_submitted", "Positions handed to storage", registry=r
        )
        self.duplicates = Counter(
            "jt808_retransmissions",
            "Reports acknowledged again but not stored again",
            registry=r,
        )
        self.not_durable = Counter(
            "jt808_batches_not_durable", "Batches storage reported lost", registry=r
        )
        self.takeovers = Counter(
            "jt808_takeovers",
            "Connections closed because their terminal reconnected",
            registry=r,
        )
        self.ack_latency = Histogram(
            "jt808_ack_latency_seconds",
            "Receipt of a report to its acknowledgement",
            buckets=ACK_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.unacked = Gauge(
            "jt808_unacked_reports", "Reports waiting for storage, all connections", registry=r
        )
        self.backpressured = Gauge(
            "jt808_connections_backpressured",
            "Connections not reading because their un-acked cap is reached",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "jt808_decoder_buffered_bytes", "Bytes held by frame decoders", registry=r
        )
        self.capture_bytes = Counter(
            "jt808_capture_bytes", "Bytes written to capture files", registry=r
        )
        # -- sub-packaged uploads
        self.reassembly_series = Gauge(
            "jt808_reassembly_series_in_flight", "Unfinished sub-packaged messages", registry=r
        )
        self.reassembly_bytes = Gauge(
            "jt808_reassembly_bytes_in_flight", "Package bytes held for reassembly", registry=r
        )
        self.reassembly_completed = Counter(
            "jt808_reassembly_completed", "Sub-packaged messages put back together", registry=r
        )
        self.reassembly_requests = Counter(
            "jt808_reassembly_retransmit_requests",
            "Requests for missing packages sent (0x8003 or 0x8800 rounds)",
            registry=r,
        )
        self.reassembly_dropped = Counter(
            "jt808_reassembly_dropped",
            "Sub-packaged messages given up, by reason",
            ["reason"],
            registry=r,
        )
        self.media_stored = Counter(
            "jt808_media_stored", "Multimedia uploads stored and answered 0x8800", registry=r
        )
        self.media_failed = Counter(
            "jt808_media_failed", "Multimedia uploads that could not be stored", registry=r
        )
        # -- commands and cluster
        self.commands = Counter(
            "jt808_commands",
            "Commands requested on this node, by outcome (answered or the error kind)",
            ["outcome"],
            registry=r,
        )
        self.commands_relayed = Counter(
            "jt808_commands_relayed", "Commands other nodes relayed to this node", registry=r
        )
        self.command_resends = Counter(
            "jt808_command_resends", "Commands sent again for want of an answer", registry=r
        )
        self.session_rows_dropped = Counter(
            "jt808_session_rows_dropped",
            "Online-session rows not written (queue full or database error)",
            registry=r,
        )
        self.session_rows_resyncs = Counter(
            "jt808_session_rows_resyncs",
            "Times this node rewrote its online-session rows after they fell out of step",
            registry=r,
        )
        # -- fault isolation and hostile input
        self.contained_errors = Counter(
            "jt808_contained_errors",
            "Unexpected errors contained where they happened (connection closed, request "
            "answered 500, service restarted), by where",
            ["where"],  # connection | http | service
            registry=r,
        )
        self.service_restarts = Counter(
            "jt808_service_restarts",
            "Background services restarted after an error, by service",
            ["service"],
            registry=r,
        )
        self.service_up = Gauge(
            "jt808_service_up",
            "1 while a background service runs, by service",
            ["service"],
            registry=r,
        )
        self.http_requests = Counter(
            "jt808_http_requests",
            "Operator HTTP requests answered, by status code",
            ["status"],
            registry=r,
        )
        self.http_login_failures = Counter(
            "jt808_http_login_failures",
            "Operator HTTP requests refused 401, by reason",
            ["reason"],  # missing | invalid (unknown, expired or revoked token)
            registry=r,
        )
        self.http_login_refused = Counter(
            "jt808_http_login_refused",
            "Operator HTTP requests answered 429 unchecked: their address failed too often",
            registry=r,
        )
        self.auth_locked = Counter(
            "jt808_auth_locked",
            "Authentication attempts refused unchecked during a lock-out, by what was locked",
            ["scope"],  # phone | address
            registry=r,
        )
        self.auth_lockouts = Counter(
            "jt808_auth_lockouts",
            "Lock-outs begun after repeated authentication failures, by what was locked",
            ["scope"],
            registry=r,
        )
        self.identity_refused = Counter(
            "jt808_identity_refused",
            "0x0100 refused with result 3: the phone is registered to another terminal",
            registry=r,
        )
        self.logins_unanswered = Counter(
            "jt808_logins_unanswered",
            "Registrations and authentications left unanswered because the terminal store "
            "could not decide (the terminal retries), by message",
            ["msg"],  # register | authenticate
            registry=r,
        )
        self.logins_from_cache = Counter(
            "jt808_logins_from_cache",
            "Authentications decided from the cached terminal table while the database was "
            "unreachable",
            registry=r,
        )
        self.log_suppressed = Counter(
            "jt808_log_lines_suppressed",
            "Log lines held back by the per-kind rate limit, by kind",
            ["kind"],
            registry=r,
        )

    def count_frame(self, msg_id: int) -> None:
        """Count one decoded frame (per frame: the labelled child is looked up once per id;
        ids are WORDs, so the cache holds at most 65,536 entries, as the metric itself)."""
        counter = self._frame_counters.get(msg_id)
        if counter is None:
            counter = self._frame_counters[msg_id] = self.frames.labels(msg_label(msg_id))
        counter.inc()
