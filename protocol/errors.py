"""The codec's error tree.

Three kinds of failure are kept apart (after h11's ``_util.py``):

* :class:`RemoteProtocolError` -- the peer sent something the standard does not allow.  It is
  about one frame only: the stream decoder has already resynchronised when it reports one, and
  the connection goes on.  ``result_code`` is the 0x8001 result to answer with (JT/T 808-2019
  table 5: 0 success, 1 failure, 2 message error, 3 not supported, 4 alarm confirmation).
* :class:`LocalProtocolError` -- our own misuse of the codec: building a message whose fields do
  not fit the wire format, feeding a decoder past its cap.
* anything else is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from protocol.header import Header

# JT/T 808-2019 8.1, table 5: results of the general response 0x8001.
RESULT_SUCCESS = 0
RESULT_FAILURE = 1
RESULT_MESSAGE_ERROR = 2
RESULT_NOT_SUPPORTED = 3
RESULT_ALARM_CONFIRMED = 4


class ProtocolError(Exception):
    """Root of the codec's errors."""


class LocalProtocolError(ProtocolError):
    """We asked the codec for something the wire format cannot express."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the standard does not allow.

    ``kind`` is a short stable name for metrics and logs; ``header`` is the frame's header when it
    could be read (so a reply can still be addressed to the terminal), ``raw`` the unescaped frame
    content when there was one.
    """

    kind: ClassVar[str] = "protocol"
    result_code: ClassVar[int] = RESULT_MESSAGE_ERROR

    def __init__(
        self, detail: str, *, header: Header | None = None, raw: bytes | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.header = header
        self.raw = raw


class FrameError(RemoteProtocolError):
    """The frame itself is broken: escaping, size, check code, header or length."""

    kind = "frame"


class InvalidEscapeError(FrameError):
    """0x7D followed by anything but 0x01 or 0x02 (JT/T 808-2019 6.1)."""

    kind = "invalid_escape"


class FrameTooLargeError(FrameError):
    """More bytes between two flags than the largest legal frame can hold."""

    kind = "frame_too_large"


class HeaderTooShortError(FrameError):
    """Fewer bytes than the header its properties word announces (JT/T 808-2019 4.4.3)."""

    kind = "header_too_short"


class ChecksumError(FrameError):
    """The XOR check code does not match header and body (JT/T 808-2019 4.4.4)."""

    kind = "checksum"


class LengthMismatchError(FrameError):
    """The declared body length (properties bits 0-9) differs from the body received."""

    kind = "length_mismatch"


class BodyDecodeError(RemoteProtocolError):
    """The frame is sound but its body does not fit the message's schema."""

    kind = "body"


class TextDecodeError(BodyDecodeError):
    """A GBK text field holds bytes that are not GBK/GB 18030."""

    kind = "text"


class TextControlError(TextDecodeError):
    """A text field holds a control character (C0 other than TAB, LF and CR, or DEL).

    STRING fields are GBK text (JT/T 808-2019 4.2, table 1): names, plates, codes.  The NUL
    padding on the right of a field (fixed-width fields, and the codes and names some devices
    pad) is stripped before the check; a NUL or other control character left in the text is not
    text, and no store of text takes it (PostgreSQL's ``text`` cannot hold NUL), so the frame
    is refused with result 2.
    """

    kind = "text_control"


class ReassemblyError(RemoteProtocolError):
    """A sub-package does not fit the series it claims to belong to."""

    kind = "reassembly"
