"""Frame delimiting, escaping and the XOR check code (JT/T 808-2019 clause 4.4 and 6.1).

On the wire a message is ``7E | escaped(header + body + check code) | 7E``.  Escaping replaces
0x7D with 0x7D 0x01 and 0x7E with 0x7D 0x02, so 0x7E never occurs inside a frame.

:class:`FrameSplitter` is sans-IO: it is fed arbitrary TCP chunks and hands back the unescaped
content of each frame, or a typed :class:`~protocol.errors.FrameError` for a frame that cannot be
unescaped or is too large.  Every 0x7E both ends a frame and may start the next one, so a stream
whose frames share one flag (``7E a 7E b 7E``) and a stream with one flag each
(``7E a 7E 7E b 7E``) both split correctly, and bytes between frames are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import xor

from protocol.errors import FrameTooLargeError, InvalidEscapeError, LocalProtocolError

FLAG = 0x7E
ESCAPE = 0x7D
_FLAG_BYTE = b"\x7e"
_ESCAPE_BYTE = b"\x7d"

# The largest legal frame: a 2019 header with sub-package fields (17 + 4 bytes, clause 4.4.3),
# the largest body the 10-bit length field can declare (1023 bytes) and the check code; every
# byte may be escaped into two.  Anything longer between two flags is not a JT/T 808 frame.
MAX_UNESCAPED_FRAME = 21 + 1023 + 1
MAX_ESCAPED_FRAME = 2 * MAX_UNESCAPED_FRAME

# A server reads at most 64 KiB per receive; the splitter holds at most one unfinished frame
# plus one such read, so four reads' worth is a generous ceiling that still bounds a connection.
DEFAULT_MAX_BUFFERED = 256 * 1024

QUIRK_RAW_7D = "raw_7d_before_flag"


def escape(data: bytes) -> bytes:
    """Escape frame content for the wire (clause 6.1): 7D -> 7D 01 first, then 7E -> 7D 02."""
    return data.replace(b"\x7d", b"\x7d\x01").replace(b"\x7e", b"\x7d\x02")


def unescape(data: bytes) -> tuple[bytes, bool]:
    """Undo :func:`escape`.

    Returns the content and whether a lone 0x7D was found as the very last byte.  Some devices
    send a check code of 0x7D unescaped; a 0x7D right before the closing flag cannot start an
    escape, so it is taken literally and reported rather than rejected.  Any other 0x7D not
    followed by 0x01 or 0x02 raises :class:`InvalidEscapeError`.
    """
    if _ESCAPE_BYTE not in data:
        return data, False
    parts = data.split(_ESCAPE_BYTE)
    out = [parts[0]]
    last = len(parts) - 1
    raw_tail = False
    for index in range(1, len(parts)):
        part = parts[index]
        code = part[:1]
        if code == b"\x01":
            out.append(_ESCAPE_BYTE)
            out.append(part[1:])
        elif code == b"\x02":
            out.append(_FLAG_BYTE)
            out.append(part[1:])
        elif index == last and not part:
            out.append(_ESCAPE_BYTE)
            raw_tail = True
        else:
            shown = part[:1].hex() or "end of frame"
            raise InvalidEscapeError(f"invalid escape sequence 7d {shown}", raw=data)
    return b"".join(out), raw_tail


def check_code(data: bytes) -> int:
    """XOR of every byte of header and body (clause 4.4.4)."""
    return reduce(xor, data, 0)


def frame(content: bytes) -> bytes:
    """Wrap header + body in a wire frame: append the check code, escape, add both flags."""
    return _FLAG_BYTE + escape(content + bytes((check_code(content),))) + _FLAG_BYTE


@dataclass(frozen=True, slots=True)
class RawFrame:
    """The unescaped content between two flags: header, body and check code.

    ``raw_7d_tail`` is true when the last byte arrived as a lone 0x7D (see :func:`unescape`).
    ``wire_size`` is the number of escaped bytes it took on the wire, flags excluded.
    """

    content: bytes
    raw_7d_tail: bool
    wire_size: int


class FrameSplitter:
    """Cut a byte stream into frames.  Sans-IO and bounded.

    ``feed`` appends received bytes; ``next_frame`` returns the next :class:`RawFrame`, a
    :class:`FrameError` for a frame that could not be unescaped or was too large (the splitter
    has already resynchronised), or ``None`` when more data is needed.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = MAX_ESCAPED_FRAME,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if max_frame_bytes < 1 or max_buffered_bytes < max_frame_bytes:
            raise LocalProtocolError("need 1 <= max_frame_bytes <= max_buffered_bytes")
        self.max_frame_bytes = max_frame_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self._buffer = bytearray()
        self._pos = 0  # start of unread data in _buffer; compacted lazily
        self._skipping = False  # inside an oversize frame: drop bytes until the next flag
        self.junk_bytes = 0  # bytes seen outside any frame, for metrics

    @property
    def buffered(self) -> int:
        """Bytes held and not yet handed out."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        if self.buffered + len(data) > self.max_buffered_bytes:
            raise LocalProtocolError(
                f"splitter holds {self.buffered} bytes; feeding {len(data)} more would pass "
                f"the cap of {self.max_buffered_bytes}: drain next_frame() first"
            )
        if self._pos and self._pos == len(self._buffer):
            self._buffer.clear()
            self._pos = 0
        self._buffer += data

    def next_frame(self) -> RawFrame | FrameTooLargeError | InvalidEscapeError | None:
        buf = self._buffer
        while True:
            start = buf.find(FLAG, self._pos)
            if start < 0:
                if not self._skipping:
                    self.junk_bytes += len(buf) - self._pos
                self._drop_all()
                return None
            if start > self._pos:
                if not self._skipping:
                    self.junk_bytes += start - self._pos
                self._pos = start
            self._skipping = False
            end = buf.find(FLAG, start + 1, start + 2 + self.max_frame_bytes)
            if end < 0:
                if len(buf) - start - 1 > self.max_frame_bytes:
                    error = FrameTooLargeError(
                        f"no closing flag within {self.max_frame_bytes} bytes"
                    )
                    closing = buf.find(FLAG, start + 1)
                    if closing >= 0:  # later frames already buffered survive
                        self._pos = closing
                    else:
                        self._drop_all()
                        self._skipping = True
                    return error
                self._compact()
                return None
            if end == start + 1:
                # 7E 7E: the first flag closed something already handled; the second opens.
                self._pos = end
                continue
            # The closing flag may open the next frame, so it stays in the buffer.
            escaped = bytes(buf[start + 1 : end])
            self._pos = end
            try:
                content, raw_tail = unescape(escaped)
            except InvalidEscapeError as exc:
                return exc
            return RawFrame(content=content, raw_7d_tail=raw_tail, wire_size=len(escaped))

    def _drop_all(self) -> None:
        self._buffer.clear()
        self._pos = 0

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
