"""Sub-package reassembly: real series from the vector file, edge cases, and a stateful model."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import protocol
from protocol.codec import Packet, decode_frame, encode_raw, encode_split, parse_frame
from protocol.errors import (
    RESULT_FAILURE,
    BodyDecodeError,
    LocalProtocolError,
    ReassemblyError,
)
from protocol.framing import unescape
from protocol.header import ENCRYPTION_RSA, Edition, Header
from protocol.messages.base import REGISTRY, RawMessage
from protocol.reassembly import (
    MAX_RETRANSMIT_IDS_2013,
    MAX_RETRANSMIT_IDS_2019,
    BadPackageError,
    Dropped,
    Duplicate,
    FeedResult,
    Reassembled,
    Reassembler,
    ReassemblyLimits,
    ReassemblyOverloadError,
    Refused,
    RetransmitRequest,
    SeriesConflictError,
    SeriesDiscardedError,
    SeriesEvictedError,
    SeriesKey,
    SeriesTimedOutError,
    SeriesTooLargeError,
    Stored,
    Undecodable,
    max_retransmit_ids,
)

VECTORS = Path("/work/shared/testdata/jt808_vectors.json")
SERIES_PREFIXES = ("cld-1205-2019-pkg", "smallchi-1205-pkg", "yzh-0104-pkg")
PHONE = "013800138000"


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]
    return cases


def _vector_series(prefix: str) -> list[Packet]:
    packets = [
        protocol.decode(bytes.fromhex(c["hex"])) for c in _cases() if c["id"].startswith(prefix)
    ]
    packets.sort(key=lambda p: p.header.package_index or 0)
    return packets


def _data(packet: Packet) -> bytes:
    return packet.message.encode(packet.edition)


def _orders(packets: list[Packet]) -> dict[str, list[Packet]]:
    shuffled = list(packets)
    random.Random(808).shuffle(shuffled)
    with_duplicates = [p for pair in zip(shuffled, reversed(packets), strict=True) for p in pair]
    return {
        "in-order": list(packets),
        "reversed": list(reversed(packets)),
        "shuffled": shuffled,
        "duplicates": with_duplicates,
    }


def _header(
    *,
    serial: int,
    total: int,
    index: int,
    size: int,
    msg_id: int = 0x1205,
    phone: str = PHONE,
    layout: Edition = Edition.V2013,
    encryption: int = 0,
) -> Header:
    return Header(
        msg_id=msg_id,
        body_length=size,
        phone=phone,
        serial=serial,
        layout=layout,
        version_flag=layout is Edition.V2019,
        protocol_version=1 if layout is Edition.V2019 else None,
        encryption=encryption,
        subpackage=True,
        package_total=total,
        package_index=index,
    )


def _add(
    r: Reassembler,
    *,
    first_serial: int,
    total: int,
    index: int,
    data: bytes,
    now: float = 0.0,
    msg_id: int = 0x1205,
    phone: str = PHONE,
) -> FeedResult:
    serial = (first_serial + index - 1) & 0xFFFF
    header = _header(
        serial=serial, total=total, index=index, size=len(data), msg_id=msg_id, phone=phone
    )
    return r.add(header, data, now=now)


# ------------------------------------------------------------------------------ real series


@pytest.mark.parametrize("prefix", SERIES_PREFIXES)
@pytest.mark.parametrize("order", ["in-order", "reversed", "shuffled", "duplicates"])
def test_vector_series_reassemble(prefix: str, order: str) -> None:
    packets = _vector_series(prefix)
    assert len(packets) >= 2
    assert all(p.header.package_total == len(packets) for p in packets)
    r = Reassembler()
    feed = _orders(packets)[order]
    results = [r.feed(p, now=float(i)) for i, p in enumerate(feed)]

    outcomes = [x.outcome for x in results]
    assert all(x.dropped == () for x in results)
    done = [i for i, o in enumerate(outcomes) if isinstance(o, Reassembled)]
    assert len(done) == 1
    final = outcomes[done[0]]
    assert isinstance(final, Reassembled)
    # Before completion: each package stored once, the rest duplicates; after: late duplicates.
    before, after = outcomes[: done[0]], outcomes[done[0] + 1 :]
    assert sum(isinstance(o, Stored) for o in before) == len(packets) - 1
    assert all(
        isinstance(o, Stored) or (isinstance(o, Duplicate) and not o.after_completion)
        for o in before
    )
    assert all(isinstance(o, Duplicate) and o.after_completion for o in after)
    assert r.bytes_in_flight == 0
    assert r.series_in_flight == 0
    assert r.packages_in_flight == 0

    first = packets[0]
    assert final.packet.header == first.header
    assert final.serials == tuple(p.serial for p in packets)
    assert final.key.first_serial == first.serial
    assert final.key.total == len(packets)
    assert final.packet.msg_id == first.msg_id
    body = b"".join(_data(p) for p in packets)
    if first.msg_id == 0x1205:
        assert isinstance(final.packet.message, RawMessage)
        assert final.packet.message.msg_id == 0x1205
        assert final.packet.message.body == body
    else:
        # 0x0104 may be decoded by a typed class; it must have decoded without error.
        assert final.packet.message.msg_id == 0x0104

    # A late retransmission of any package is recognised as a duplicate of the finished series.
    late = r.feed(packets[-1], now=float(len(feed)))
    assert isinstance(late.outcome, Duplicate)
    assert late.outcome.after_completion
    assert r.series_in_flight == 0


def test_split_location_report_round_trips() -> None:
    case = next(c for c in _cases() if c["id"] == "yzh-0200-2019-subiao-adas")
    original = protocol.decode(bytes.fromhex(case["hex"]))
    frames = encode_split(
        original.message,
        phone=original.phone,
        first_serial=0xFFFD,  # wraps past 0xFFFF
        edition=original.edition,
        max_body=50,
    )
    r = Reassembler()
    outcomes = [r.feed(protocol.decode(f), now=0.0).outcome for f in reversed(frames)]
    final = outcomes[-1]
    assert isinstance(final, Reassembled)
    assert final.packet.message == original.message
    assert final.packet.edition is original.edition
    assert final.serials[:4] == (0xFFFD, 0xFFFE, 0xFFFF, 0x0000)


def test_whole_body_decode_failure_is_a_result() -> None:
    r = Reassembler()
    # 0x0200 needs 28 bytes of basic information; 2 x 3 bytes do not decode.
    _add(r, first_serial=7, total=2, index=2, data=b"\x00\x01\x02", msg_id=0x0200)
    result = _add(r, first_serial=7, total=2, index=1, data=b"\x03\x04\x05", msg_id=0x0200)
    outcome = result.outcome
    assert isinstance(outcome, Undecodable)
    assert isinstance(outcome.error, BodyDecodeError)
    assert outcome.error.header == outcome.header
    assert outcome.header.package_index == 1
    assert outcome.body == b"\x03\x04\x05\x00\x01\x02"
    assert outcome.serials == (7, 8)
    assert r.series_in_flight == 0


def test_encrypted_series_stays_raw() -> None:
    r = Reassembler()
    for index, data in ((1, b"\x01" * 10), (2, b"\x02" * 10)):
        header = _header(
            serial=index, total=2, index=index, size=10, msg_id=0x0200, encryption=ENCRYPTION_RSA
        )
        result = r.add(header, data, now=0.0)
    assert isinstance(result.outcome, Reassembled)
    assert result.outcome.packet.message == RawMessage.of(0x0200, b"\x01" * 10 + b"\x02" * 10)


def test_single_package_series_completes_at_once() -> None:
    r = Reassembler()
    result = _add(r, first_serial=3, total=1, index=1, data=b"")
    assert isinstance(result.outcome, Reassembled)
    assert result.outcome.packet.message == RawMessage.of(0x1205, b"")
    assert r.series_in_flight == 0


# ------------------------------------------------------------------------------ faults


@pytest.mark.parametrize(("total", "index"), [(0, 0), (0, 1), (3, 0), (3, 4), (1, 2)])
def test_impossible_package_fields_are_refused(total: int, index: int) -> None:
    r = Reassembler()
    header = _header(serial=5, total=total, index=index, size=1)
    result = r.add(header, b"x", now=0.0)
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, BadPackageError)
    assert isinstance(result.outcome.error, ReassemblyError)
    assert result.outcome.error.header == header
    assert r.series_in_flight == 0


def test_oversized_body_is_refused() -> None:
    result = Reassembler().add(_header(serial=1, total=2, index=1, size=1024), bytes(1024), now=0)
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, BadPackageError)


def test_absurd_total_is_refused() -> None:
    r = Reassembler(ReassemblyLimits(max_packages_per_series=100))
    result = _add(r, first_serial=0, total=101, index=1, data=b"x")
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, SeriesTooLargeError)
    assert _add(r, first_serial=0, total=100, index=1, data=b"x").outcome.__class__ is Stored


def test_non_subpackage_input_is_our_misuse() -> None:
    r = Reassembler()
    packet = protocol.decode(protocol.encode(RawMessage.of(0x1205, b"ab"), phone=PHONE, serial=1))
    with pytest.raises(LocalProtocolError):
        r.feed(packet, now=0.0)
    with pytest.raises(LocalProtocolError):
        r.add(packet.header, b"ab", now=0.0)


def test_total_change_replaces_the_series() -> None:
    r = Reassembler()
    _add(r, first_serial=10, total=3, index=1, data=b"old")
    result = _add(r, first_serial=10, total=2, index=1, data=b"new")
    assert isinstance(result.outcome, Stored)
    assert result.outcome.key == SeriesKey(PHONE, 0x1205, 10, 2)
    (dropped,) = result.dropped
    assert isinstance(dropped.error, SeriesConflictError)
    assert dropped.key.total == 3
    assert dropped.missing == (2, 3)
    assert r.series_in_flight == 1
    assert r.bytes_in_flight == 3


def test_conflicting_bytes_replace_the_series() -> None:
    r = Reassembler()
    _add(r, first_serial=10, total=3, index=1, data=b"aa")
    _add(r, first_serial=10, total=3, index=2, data=b"bb")
    result = _add(r, first_serial=10, total=3, index=2, data=b"BB")
    assert isinstance(result.outcome, Stored)
    assert result.outcome.received == 1
    (dropped,) = result.dropped
    assert dropped.reason == "series_conflict"
    assert dropped.missing == (3,)
    assert r.bytes_in_flight == 2
    # The replacement completes with its own bytes only.
    _add(r, first_serial=10, total=3, index=1, data=b"AA")
    final = _add(r, first_serial=10, total=3, index=3, data=b"CC").outcome
    assert isinstance(final, Reassembled)
    assert final.packet.message == RawMessage.of(0x1205, b"AABBCC")


def test_duplicate_is_idempotent_and_keeps_the_deadline() -> None:
    r = Reassembler(ReassemblyLimits(package_timeout_s=10))
    _add(r, first_serial=1, total=2, index=1, data=b"a", now=0.0)
    again = _add(r, first_serial=1, total=2, index=1, data=b"a", now=9.0)
    assert again == FeedResult(outcome=again.outcome)
    assert isinstance(again.outcome, Duplicate)
    assert not again.outcome.after_completion
    assert r.bytes_in_flight == 1
    assert r.next_deadline() == 10.0


def test_new_message_reusing_completed_serials_starts_a_series() -> None:
    r = Reassembler()
    _add(r, first_serial=0, total=2, index=1, data=b"a")
    _add(r, first_serial=0, total=2, index=2, data=b"b")
    result = _add(r, first_serial=0, total=2, index=1, data=b"c", now=1.0)
    assert isinstance(result.outcome, Stored)
    # ... and the completed one is forgotten, so its old package is new again.
    result = _add(r, first_serial=0, total=2, index=2, data=b"b", now=1.0)
    assert isinstance(result.outcome, Reassembled)
    assert result.outcome.packet.message == RawMessage.of(0x1205, b"cb")


def test_completed_memory_expires() -> None:
    r = Reassembler(ReassemblyLimits(completed_memory_s=5))
    _add(r, first_serial=0, total=1, index=1, data=b"a")
    assert isinstance(
        _add(r, first_serial=0, total=1, index=1, data=b"a", now=4).outcome, Duplicate
    )
    assert isinstance(
        _add(r, first_serial=0, total=1, index=1, data=b"a", now=9).outcome, Reassembled
    )


# ------------------------------------------------------------------------------ deadlines


def test_expiry_requests_missing_packages_then_gives_up() -> None:
    limits = ReassemblyLimits(package_timeout_s=10, retransmit_timeout_s=4, max_retransmit_rounds=2)
    r = Reassembler(limits)
    for index in (1, 3):
        _add(r, first_serial=0xFFFE, total=4, index=index, data=bytes([index]), now=0.0)
    assert r.expire(9.9) == []
    (request,) = r.expire(10.0)
    assert isinstance(request, RetransmitRequest)
    assert request.round == 1
    assert request.key.first_serial == 0xFFFE
    assert request.missing == (2, 4)
    assert request.missing_serials == (0xFFFF, 0x0001)
    assert request.header.package_index == 1
    assert r.next_deadline() == 14.0

    # A retransmitted package moves the deadline on but does not give a round back.
    _add(r, first_serial=0xFFFE, total=4, index=2, data=b"\x02", now=12.0)
    assert r.expire(21.9) == []
    (request,) = r.expire(22.0)
    assert isinstance(request, RetransmitRequest)
    assert (request.round, request.missing, request.missing_serials) == (2, (4,), (1,))
    (dropped,) = r.expire(26.0)
    assert isinstance(dropped, Dropped)
    assert isinstance(dropped.error, SeriesTimedOutError)
    assert dropped.missing == (4,)
    assert r.series_in_flight == 0
    assert r.bytes_in_flight == 0
    assert r.next_deadline() is None


def test_zero_rounds_drops_at_the_first_deadline() -> None:
    r = Reassembler(ReassemblyLimits(package_timeout_s=1, max_retransmit_rounds=0))
    _add(r, first_serial=0, total=2, index=2, data=b"x")
    (dropped,) = r.expire(1.0)
    assert isinstance(dropped, Dropped)
    assert dropped.missing == (1,)
    assert dropped.header.package_index == 2  # package 1 never came


def test_retransmit_batches() -> None:
    key = SeriesKey(PHONE, 0x0801, 0, 600)
    header = _header(serial=0, total=600, index=1, size=0)
    request = RetransmitRequest(key=key, header=header, round=1, missing=tuple(range(1, 601)))
    batches = request.batches(max_retransmit_ids(Edition.V2013))
    assert [len(b) for b in batches] == [255, 255, 90]
    assert sum(batches, ()) == request.missing
    assert max_retransmit_ids(Edition.V2013) == MAX_RETRANSMIT_IDS_2013 == 255
    assert max_retransmit_ids(Edition.V2019) == MAX_RETRANSMIT_IDS_2019 == 509
    with pytest.raises(LocalProtocolError):
        request.batches(0)


def test_discard_terminal() -> None:
    r = Reassembler()
    _add(r, first_serial=0, total=2, index=1, data=b"a")
    _add(r, first_serial=5, total=2, index=1, data=b"b", msg_id=0x0801)
    _add(r, first_serial=0, total=2, index=1, data=b"c", phone="013900000000")
    dropped = r.discard_terminal(PHONE)
    assert {d.key.msg_id for d in dropped} == {0x1205, 0x0801}
    assert all(isinstance(d.error, SeriesDiscardedError) for d in dropped)
    assert (r.series_in_flight, r.bytes_in_flight) == (1, 1)
    assert r.discard_terminal(PHONE) == []


def test_empty_packages_of_several_series_leave_cleanly() -> None:
    # Found by tests/fuzz (regressions/reassembly-empty-packages.bin): two series of one
    # terminal holding only 0-byte packages; dropping the second raised KeyError because the
    # terminal's byte count went away with the first.
    r = Reassembler()
    _add(r, first_serial=0, total=2, index=1, data=b"")
    _add(r, first_serial=5, total=3, index=2, data=b"", msg_id=0x0801)
    assert (r.terminal_series(PHONE), r.terminal_bytes(PHONE)) == (2, 0)
    dropped = r.discard_terminal(PHONE)
    assert len(dropped) == 2
    assert (r.series_in_flight, r.packages_in_flight, r.bytes_in_flight) == (0, 0, 0)
    assert (r.terminal_series(PHONE), r.terminal_bytes(PHONE)) == (0, 0)
    # The same through the deadlines, with a non-empty series beside the empty one.
    _add(r, first_serial=0, total=2, index=1, data=b"")
    _add(r, first_serial=5, total=2, index=1, data=b"ab", msg_id=0x0801, now=1.0)
    expired = [e for now in (31.0, 62.0, 93.0, 124.0, 200.0) for e in r.expire(now)]
    assert sum(isinstance(e, Dropped) for e in expired) == 2
    assert (r.series_in_flight, r.terminal_bytes(PHONE)) == (0, 0)


# ------------------------------------------------------------------------------ caps


def test_terminal_series_cap_evicts_least_recently_fed() -> None:
    r = Reassembler(ReassemblyLimits(max_series_per_terminal=2))
    _add(r, first_serial=0, total=2, index=1, data=b"a", now=0)
    _add(r, first_serial=10, total=2, index=1, data=b"b", now=1)
    _add(r, first_serial=0, total=3, index=1, data=b"a", now=2, msg_id=0x0801)
    assert r.terminal_series(PHONE) == 2
    result = _add(r, first_serial=20, total=2, index=1, data=b"c", now=3)
    assert isinstance(result.outcome, Stored)
    (dropped,) = result.dropped
    assert isinstance(dropped.error, SeriesEvictedError)
    assert dropped.key.first_serial == 10
    assert r.terminal_series(PHONE) == 2


def test_terminal_byte_cap_evicts_and_drops_a_series_that_cannot_fit() -> None:
    r = Reassembler(ReassemblyLimits(max_bytes_per_terminal=10))
    _add(r, first_serial=0, total=3, index=1, data=b"aaaa")
    result = _add(r, first_serial=10, total=3, index=1, data=b"bbbbbbb")
    assert isinstance(result.outcome, Stored)
    assert [d.key.first_serial for d in result.dropped] == [0]
    assert r.terminal_bytes(PHONE) == 7
    result = _add(r, first_serial=10, total=3, index=2, data=b"cccc")
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, SeriesTooLargeError)
    (dropped,) = result.dropped
    assert isinstance(dropped.error, SeriesTooLargeError)
    assert r.bytes_in_flight == 0


def test_process_caps_refuse_instead_of_evicting_other_terminals() -> None:
    r = Reassembler(ReassemblyLimits(max_bytes_total=10, max_packages_total=3))
    _add(r, first_serial=0, total=2, index=1, data=b"aaaaaaaa", phone="1")
    result = _add(r, first_serial=0, total=2, index=1, data=b"bbb", phone="2")
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, ReassemblyOverloadError)
    assert result.outcome.error.result_code == RESULT_FAILURE
    assert result.dropped == ()
    _add(r, first_serial=5, total=2, index=1, data=b"", phone="2")
    _add(r, first_serial=6, total=2, index=1, data=b"", phone="2")
    result = _add(r, first_serial=7, total=2, index=1, data=b"", phone="2")
    assert isinstance(result.outcome, Refused)
    assert isinstance(result.outcome.error, ReassemblyOverloadError)
    # Completing a series needs no room.
    result = _add(r, first_serial=0, total=2, index=2, data=b"zz", phone="1")
    assert isinstance(result.outcome, Reassembled)
    assert (r.bytes_in_flight, r.packages_in_flight) == (0, 2)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_packages_per_series"):
        ReassemblyLimits(max_packages_per_series=0x10000)
    with pytest.raises(ValueError, match="package_timeout_s"):
        ReassemblyLimits(package_timeout_s=-1)
    with pytest.raises(ValueError, match="max_bytes_total"):
        ReassemblyLimits(max_bytes_total=0)
    with pytest.raises(ValueError, match="max_retransmit_rounds"):
        ReassemblyLimits(max_retransmit_rounds=-1)


def test_default_caps_fit_one_maximal_series() -> None:
    limits = ReassemblyLimits()
    assert limits.max_packages_per_series * 1023 <= limits.max_bytes_per_terminal
    assert limits.max_bytes_per_terminal <= limits.max_bytes_total


def test_frames_through_parse_frame() -> None:
    # Callers holding a Frame use add(header, body).
    wire = encode_raw(0x1205, b"xy", phone=PHONE, serial=9, package=(1, 1))
    content, _ = unescape(wire[1:-1])
    frame = parse_frame(content)
    assert decode_frame(frame).message.msg_id == 0x1205
    result = Reassembler().add(frame.header, frame.body, now=0.0)
    assert isinstance(result.outcome, Reassembled)
    assert result.outcome.packet.message == RawMessage.of(0x1205, b"xy")


# ------------------------------------------------------------------------------ stateful model

MODEL_LIMITS = ReassemblyLimits(
    package_timeout_s=10,
    retransmit_timeout_s=5,
    max_retransmit_rounds=2,
    max_packages_per_series=5,
    max_series_per_terminal=2,
    max_bytes_per_terminal=20,
    max_bytes_total=30,
    max_packages_total=7,
    completed_memory_s=15,
    max_remembered_packages=8,
)
# Ids no colleague decodes, so a completed body comes back as a RawMessage we can compare.
MODEL_MSG_IDS = (0x1205, 0x0FF0)
MODEL_PHONES = ("013800000001", "013800000002", "013800000003")


@dataclass
class _Msg:
    phone: str
    msg_id: int
    first_serial: int
    parts: tuple[bytes, ...]

    @property
    def total(self) -> int:
        return len(self.parts)

    @property
    def ident(self) -> tuple[str, int, int]:
        return (self.phone, self.msg_id, self.first_serial)


@dataclass
class _ModelSeries:
    total: int
    parts: dict[int, bytes]
    deadline: float
    tick: int
    rounds: int = 0

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(1, self.total + 1) if i not in self.parts)


@dataclass
class _Completed:
    total: int
    parts: dict[int, bytes]
    at: float


@dataclass
class _Model:
    live: dict[tuple[str, int, int], _ModelSeries] = field(default_factory=dict)
    completed: dict[tuple[str, int, int], _Completed] = field(default_factory=dict)

    def terminal(self, phone: str) -> list[tuple[tuple[str, int, int], _ModelSeries]]:
        return sorted(
            ((k, s) for k, s in self.live.items() if k[0] == phone), key=lambda kv: kv[1].tick
        )

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.live.values())

    def total_packages(self) -> int:
        return sum(len(s.parts) for s in self.live.values())


def _dropped_map(dropped: tuple[Dropped, ...]) -> dict[tuple[str, int, int], Dropped]:
    out = {(d.key.phone, d.key.msg_id, d.key.first_serial): d for d in dropped}
    assert len(out) == len(dropped)
    return out


class ReassemblyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.r = Reassembler(MODEL_LIMITS)
        self.model = _Model()
        self.messages: list[_Msg] = []
        self.now = 0.0
        self.tick = 0

    @precondition(lambda self: len(self.messages) < 40)
    @rule(
        phone=st.sampled_from(MODEL_PHONES),
        msg_id=st.sampled_from(MODEL_MSG_IDS),
        first_serial=st.sampled_from((0, 0xFFFE, 0xFFFF, 0x1234)),
        sizes=st.lists(st.integers(0, 8), min_size=1, max_size=6),
        data=st.data(),
    )
    def new_message(
        self, phone: str, msg_id: int, first_serial: int, sizes: list[int], data: st.DataObject
    ) -> None:
        # Every part starts with the message's number: two messages under one key differ at
        # every index, so the model knows which bytes the reassembler must hold.
        tag = bytes([len(self.messages)])
        parts = tuple(tag + data.draw(st.binary(min_size=n, max_size=n)) for n in sizes)
        self.messages.append(_Msg(phone, msg_id, first_serial, parts))

    @precondition(lambda self: self.messages)
    @rule(data=st.data())
    def feed(self, data: st.DataObject) -> None:
        msg = data.draw(st.sampled_from(self.messages))
        index = data.draw(st.integers(1, msg.total))
        part = msg.parts[index - 1]
        header = _header(
            serial=(msg.first_serial + index - 1) & 0xFFFF,
            total=msg.total,
            index=index,
            size=len(part),
            msg_id=msg.msg_id,
            phone=msg.phone,
        )
        result = self.r.add(header, part, now=self.now)
        outcome = result.outcome
        detail = outcome.error.kind if isinstance(outcome, Refused) else ""
        if isinstance(outcome, Duplicate) and outcome.after_completion:
            detail = "after completion"
        event(f"feed: {type(outcome).__name__} {detail}")
        for dropped in result.dropped:
            event(f"feed dropped: {dropped.reason}")
        self._check_feed(msg, index, part, result)

    def _check_feed(self, msg: _Msg, index: int, part: bytes, result: FeedResult) -> None:
        limits, model, ident = MODEL_LIMITS, self.model, msg.ident
        outcome, dropped = result.outcome, _dropped_map(result.dropped)
        if msg.total > limits.max_packages_per_series:
            assert isinstance(outcome, Refused)
            assert isinstance(outcome.error, SeriesTooLargeError)
            assert not dropped
            return

        expected_drops: dict[tuple[str, int, int], tuple[type[ReassemblyError], tuple[int, ...]]]
        expected_drops = {}
        cur = model.live.get(ident)
        if cur is not None:
            if cur.parts.get(index) == part and cur.total == msg.total:
                assert isinstance(outcome, Duplicate)
                assert not outcome.after_completion
                assert not dropped
                return
            if cur.total != msg.total or index in cur.parts:
                expected_drops[ident] = (SeriesConflictError, cur.missing())
                del model.live[ident]
                cur = None

        if cur is None:
            done = model.completed.pop(ident, None)
            if isinstance(outcome, Duplicate):
                # Only a package identical to one of a series completed moments ago.
                assert outcome.after_completion
                assert done is not None
                assert done.total == msg.total
                assert done.parts[index] == part
                assert self.now < done.at + limits.completed_memory_s
                model.completed[ident] = done
                self._check_drops(dropped, expected_drops)
                return

        if cur is None and msg.total == 1:
            self._check_completion(outcome, msg, {1: part})
        elif cur is not None and len(cur.parts) == cur.total - 1:
            del model.live[ident]
            self._check_completion(outcome, msg, {**cur.parts, index: part})
        else:
            self._check_store(msg, index, part, cur, outcome, expected_drops)
        self._check_drops(dropped, expected_drops)

    def _check_completion(self, outcome: object, msg: _Msg, parts: dict[int, bytes]) -> None:
        # Never completes with a package missing, and the body is the index-order join.
        assert sorted(parts) == list(range(1, msg.total + 1))
        assert isinstance(outcome, Reassembled)
        body = b"".join(parts[i] for i in range(1, msg.total + 1))
        assert outcome.packet.message == RawMessage.of(msg.msg_id, body)
        assert outcome.packet.header.package_index == 1
        assert outcome.packet.header.serial == msg.first_serial
        assert outcome.serials == tuple((msg.first_serial + i) & 0xFFFF for i in range(msg.total))
        self.model.completed[msg.ident] = _Completed(msg.total, parts, self.now)

    def _check_store(
        self,
        msg: _Msg,
        index: int,
        part: bytes,
        cur: _ModelSeries | None,
        outcome: object,
        expected_drops: dict[tuple[str, int, int], tuple[type[ReassemblyError], tuple[int, ...]]],
    ) -> None:
        limits, model, ident = MODEL_LIMITS, self.model, msg.ident
        own = (cur.nbytes if cur is not None else 0) + len(part)
        if own > limits.max_bytes_per_terminal:
            assert isinstance(outcome, Refused)
            assert isinstance(outcome.error, SeriesTooLargeError)
            if cur is not None:
                expected_drops[ident] = (SeriesTooLargeError, cur.missing())
                del model.live[ident]
            return
        terminal = model.terminal(msg.phone)
        t_bytes = sum(s.nbytes for _, s in terminal) + len(part)
        t_series = len(terminal) + (1 if cur is None else 0)
        victims = []
        for key, series in terminal:
            if t_bytes <= limits.max_bytes_per_terminal and (
                t_series <= limits.max_series_per_terminal
            ):
                break
            if key == ident:
                continue
            victims.append(key)
            t_bytes -= series.nbytes
            t_series -= 1
        freed_bytes = sum(model.live[k].nbytes for k in victims)
        freed_packages = sum(len(model.live[k].parts) for k in victims)
        if (
            model.total_bytes() - freed_bytes + len(part) > limits.max_bytes_total
            or model.total_packages() - freed_packages + 1 > limits.max_packages_total
        ):
            assert isinstance(outcome, Refused)
            assert isinstance(outcome.error, ReassemblyOverloadError)
            return
        for key in victims:
            expected_drops[key] = (SeriesEvictedError, model.live.pop(key).missing())
        self.tick += 1
        if cur is None:
            cur = model.live[ident] = _ModelSeries(
                total=msg.total, parts={}, deadline=0.0, tick=self.tick
            )
        cur.parts[index] = part
        cur.tick = self.tick
        cur.deadline = self.now + limits.package_timeout_s
        assert isinstance(outcome, Stored)
        assert outcome.index == index
        assert outcome.received == len(cur.parts)

    @staticmethod
    def _check_drops(
        dropped: dict[tuple[str, int, int], Dropped],
        expected: dict[tuple[str, int, int], tuple[type[ReassemblyError], tuple[int, ...]]],
    ) -> None:
        assert set(dropped) == set(expected)
        for key, (kind, missing) in expected.items():
            assert isinstance(dropped[key].error, kind)
            assert dropped[key].missing == missing

    @rule(dt=st.sampled_from((0.0, 0.5, 4.0, 5.0, 10.0, 16.0)))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        results = self.r.expire(self.now)
        for result in results:
            event(f"expire: {type(result).__name__}")
        got = {(x.key.phone, x.key.msg_id, x.key.first_serial): x for x in results}
        assert len(got) == len(results)
        due = {k: s for k, s in self.model.live.items() if s.deadline <= self.now}
        assert set(got) == set(due)
        for key, series in due.items():
            result = got[key]
            # Expiry reports exactly the missing indexes (and their serials).
            assert result.missing == series.missing()
            if series.rounds < MODEL_LIMITS.max_retransmit_rounds:
                assert isinstance(result, RetransmitRequest)
                series.rounds += 1
                series.deadline = self.now + MODEL_LIMITS.retransmit_timeout_s
                assert result.round == series.rounds
                assert result.missing_serials == tuple(
                    (key[2] + i - 1) & 0xFFFF for i in series.missing()
                )
            else:
                assert isinstance(result, Dropped)
                assert isinstance(result.error, SeriesTimedOutError)
                del self.model.live[key]

    @rule(phone=st.sampled_from(MODEL_PHONES))
    def discard(self, phone: str) -> None:
        dropped = _dropped_map(tuple(self.r.discard_terminal(phone)))
        expected = {k: s for k, s in self.model.live.items() if k[0] == phone}
        assert set(dropped) == set(expected)
        for key, series in expected.items():
            assert dropped[key].missing == series.missing()
            del self.model.live[key]

    @invariant()
    def accounting(self) -> None:
        model, r, limits = self.model, self.r, MODEL_LIMITS
        # What the reassembler actually holds (peeking at its storage on purpose).
        stored = sum(len(p) for s in r._series.values() for p in s.parts.values())
        assert r.bytes_in_flight == stored == model.total_bytes()
        assert r.packages_in_flight == model.total_packages()
        assert r.series_in_flight == len(model.live)
        assert r.bytes_in_flight <= limits.max_bytes_total
        assert r.packages_in_flight <= limits.max_packages_total
        for phone in MODEL_PHONES:
            terminal = model.terminal(phone)
            assert r.terminal_bytes(phone) == sum(s.nbytes for _, s in terminal)
            assert r.terminal_bytes(phone) <= limits.max_bytes_per_terminal
            assert r.terminal_series(phone) == len(terminal) <= limits.max_series_per_terminal
        deadlines = [s.deadline for s in model.live.values()]
        assert r.next_deadline() == (min(deadlines) if deadlines else None)


def test_model_ids_are_not_decoded() -> None:
    assert not any(i in REGISTRY for i in MODEL_MSG_IDS)


TestReassemblyMachine = ReassemblyMachine.TestCase
TestReassemblyMachine.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
