"""The fuzz harness over its seed corpus and every regression it found (no atheris needed).

``tests/fuzz/fuzz_codec.py`` explores new inputs with atheris; here its one-input function
runs over the files kept in the repository, so a fixed finding stays fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocol import StreamDecoder, encode_raw
from protocol.framing import frame
from protocol.messages.base import Fragment
from protocol.messages.multimedia import MultimediaData
from protocol.messages.terminal import Heartbeat
from protocol.reassembly import Reassembled, Reassembler
from tests.fuzz import make_corpus
from tests.fuzz.fuzz_codec import check_one, repair

FUZZ = Path(__file__).resolve().parent / "fuzz"
CORPUS = FUZZ / "corpus"
REGRESSIONS = FUZZ / "regressions"
FILES = sorted(CORPUS.iterdir()) + sorted(REGRESSIONS.glob("*.bin"))

# A seed corpus of a few hundred KB at most: it is checked in and read on every run.
MAX_CORPUS_BYTES = 300 * 1024


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_harness_accepts_the_outcome_of(path: Path) -> None:
    check_one(path.read_bytes())


def test_corpus_is_small_and_has_vectors_and_streams() -> None:
    seeds = sorted(CORPUS.iterdir())
    assert sum(p.stat().st_size for p in seeds) <= MAX_CORPUS_BYTES
    names = [p.name for p in seeds]
    assert sum(n.startswith("vector-") for n in names) >= 141  # every shared vector frame
    assert sum(n.startswith("stream-") for n in names) >= 5


def test_stream_seeds_are_up_to_date() -> None:
    streams = {n: d for n, d in make_corpus.build().items() if n.startswith("stream-")}
    for name, data in streams.items():
        assert (CORPUS / name).read_bytes() == data, "run: python -m tests.fuzz.make_corpus"


def test_media_seed_reassembles() -> None:
    decoder = StreamDecoder()
    decoder.feed((CORPUS / "stream-media-shuffled-duplicate.bin").read_bytes())
    reassembler = Reassembler()
    outcomes = []
    for now, event in enumerate(decoder):
        assert not isinstance(event, Exception), event
        assert isinstance(event.message, Fragment)
        outcomes.append(reassembler.feed(event, now=float(now)).outcome)
    (done,) = [o for o in outcomes if isinstance(o, Reassembled)]
    assert isinstance(done.packet.message, MultimediaData)
    assert done.packet.message.data.startswith(b"\xff\xd8\xff\xe0")


def test_repair_sets_length_and_check_code() -> None:
    sound = (CORPUS / "stream-auth-then-reports.bin").read_bytes()
    assert repair(sound) == sound  # sound frames are left alone
    # 0x0002 whose header declares a 5-byte body and whose check code is wrong, then a piece
    # holding a lone 0x7D (too short for a header: only re-escaped).
    broken = bytes.fromhex("7e 0002 0005 013912345678 0009 00 7e 7d 7e")
    header = bytes.fromhex("0002 0000 013912345678 0009")
    assert repair(broken) == frame(header) + bytes.fromhex("7e 7d01 7e")


def test_harness_reports_an_unexpected_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cls: type[Heartbeat], body: bytes, edition: object) -> Heartbeat:
        raise IndexError(body)

    heartbeat = encode_raw(Heartbeat.MSG_ID, b"", phone="013912345678", serial=9)
    check_one(heartbeat)
    monkeypatch.setattr(Heartbeat, "decode", classmethod(broken))
    with pytest.raises(IndexError):
        check_one(heartbeat)


def test_harness_imports_without_atheris() -> None:
    code = "import sys, tests.fuzz.fuzz_codec; assert 'atheris' not in sys.modules"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
