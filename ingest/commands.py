"""Downlink commands: which answer each command expects, the retransmission schedule, the
typed errors, and commands built from JSON.

A command is any downlink (0x8xxx) message of the codec except the platform's own answers and
protocol machinery (:data:`NOT_COMMANDS`).  The terminal answers it with the message of
:data:`SPECIFIC_REPLIES` (0x0104 for 0x8104, ...), or with 0x0001 general response for every
other command (JT/T 808-2019 8.2).  Answers carry the command's serial ("reply serial"), except
the few in :data:`UNNUMBERED_REPLIES`, which go to the oldest command waiting for them.

Settling (:meth:`PendingCommand.offer`)
    * the specific answer with the command's serial settles the command;
    * a 0x0001 naming the command (id and serial) settles it when the command expects 0x0001,
      or when its result is not success (failure, message error, not supported);
    * a 0x0001 success for a command that expects a specific answer (some terminals confirm
      receipt first) stops the retransmissions; the command still waits for its answer until
      the schedule runs out, and then settles with that 0x0001.

Retransmission (clause 4.5.2)
    The command is sent, and sent again with the same serial each time the answer does not come
    within the current timeout; the timeouts grow as T(n+1) = T(n) x (n+1) from T1 =
    ``command_timeout_s``: see :func:`retransmit_schedule`.  After the last one the command
    fails with :class:`CommandTimeoutError`.

Sub-packaged commands
    A command whose body exceeds one frame (1023 bytes) is sent as packages with consecutive
    serials (:func:`protocol.encode_split`); every resend repeats all packages, a 0x0005 from the
    terminal resends the packages it names, and the answer to the last package (or a specific
    answer naming any of them) settles the command.

JSON (:func:`message_from_json`)
    ``{"msg_id": "0x8201", "body": {...}}``: ``msg_id`` is a hex string (``"0x8201"`` or
    ``"8201"``) or an integer; ``body`` maps the message's field names (its dataclass fields,
    as in ``jt808 decode`` output) to values: integers (also as ``"0x..."`` strings), strings,
    bytes as hex strings (or ``{"hex": "..."}``, which is how bytes are given where a field
    takes text or bytes), times as ISO 8601 strings with a UTC offset, lists for repeated
    fields and objects for nested records.  Fields with a default may be left out; unknown or
    missing fields are a :class:`BadCommandError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Union

import trio

from protocol.codec import Packet
from protocol.errors import RESULT_SUCCESS
from protocol.messages.base import REGISTRY, Message, Record, hex_msg_ids, is_downlink
from protocol.messages.control import TerminalRetransmitRequest
from protocol.messages.terminal import TerminalGeneralResponse

GENERAL_RESPONSE = TerminalGeneralResponse.MSG_ID

# Command -> its specific answer (JT/T 808-2019); every other command is answered with 0x0001.
SPECIFIC_REPLIES: Mapping[int, int] = {
    0x8104: 0x0104,  # query all parameters -> parameters (8.10, 8.12)
    0x8106: 0x0104,  # query given parameters -> parameters (8.11, 8.12)
    0x8107: 0x0107,  # query properties -> properties (8.14, 8.15)
    0x8201: 0x0201,  # location query -> location query response (8.19, 8.20)
    0x8302: 0x0302,  # question -> answer (8.28, 8.29)
    0x8500: 0x0500,  # vehicle control -> vehicle control response (8.34, 8.35)
    0x8608: 0x0608,  # query areas or routes -> query response (2019 8.46, 8.47)
    0x8700: 0x0700,  # recorder data collection -> recorder data upload (8.44, 8.45)
    0x8702: 0x0702,  # driver identity request -> driver identity report (8.47, 8.48)
    0x8801: 0x0805,  # camera shoot -> camera shoot response (8.53, 8.54; 2013+)
    0x8802: 0x0802,  # stored media search -> search response (8.55, 8.56)
}
# Answers without a reply serial: 0x0107, 0x0608 and 0x0702 bodies do not name the command.
UNNUMBERED_REPLIES = frozenset({0x0107, 0x0608, 0x0702})
# Every message id that answers a command (the session hands these to the server).
ANSWER_MSG_IDS = frozenset(
    {GENERAL_RESPONSE, TerminalRetransmitRequest.MSG_ID, *SPECIFIC_REPLIES.values()}
)
# Downlinks that are the platform's answers or protocol machinery, not commands: general
# response, retransmit request, time answer, registration answer, multimedia upload answer.
NOT_COMMANDS = frozenset({0x8001, 0x8003, 0x8004, 0x8100, 0x8800})


def retransmit_schedule(first_timeout_s: float, retries: int) -> tuple[float, ...]:
    """The waits after the first sending and each resend: T1, T2 = T1 x 2, T3 = T2 x 3, ...

    ``retries`` resends give ``retries + 1`` waits (clause 4.5.2: T(n+1) = T(n) x (n+1)).
    """
    waits = [first_timeout_s]
    for n in range(1, retries + 1):
        waits.append(waits[-1] * (n + 1))
    return tuple(waits)


# ---------------------------------------------------------------------------------------------
# Errors


class CommandError(Exception):
    """A command that did not get an answer.  ``kind`` and ``status`` are its JSON error name
    and HTTP status."""

    kind: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        return {"error": self.kind, "detail": self.detail}


class BadCommandError(CommandError):
    """The request does not describe a command we can build and send."""

    kind = "bad_request"
    status = 400


class TerminalOfflineError(CommandError):
    """No node holds an authenticated session of the terminal (or it went away meanwhile)."""

    kind = "offline"
    status = 404


class CommandBusyError(CommandError):
    """Too many commands are already waiting for this terminal or node."""

    kind = "busy"
    status = 503


class NodeUnreachableError(CommandError):
    """The node holding the terminal did not take the command or did not answer in time."""

    kind = "node_unreachable"
    status = 502


class CommandTimeoutError(CommandError):
    """The terminal did not answer, through every resend."""

    kind = "timeout"
    status = 504


_ERRORS: dict[str, type[CommandError]] = {
    cls.kind: cls
    for cls in (
        BadCommandError,
        TerminalOfflineError,
        CommandBusyError,
        NodeUnreachableError,
        CommandTimeoutError,
    )
}


def error_from_json(data: Mapping[str, Any]) -> CommandError:
    """The error a remote node reported (see :meth:`CommandError.to_json`)."""
    cls = _ERRORS.get(str(data.get("error")), CommandError)
    return cls(str(data.get("detail", "")))


# ---------------------------------------------------------------------------------------------
# Pending commands


class PendingCommand:
    """A command sent to a terminal and not yet answered (lives on the connection)."""

    def __init__(
        self, *, message: Message, serials: tuple[int, ...], wires: tuple[bytes, ...]
    ) -> None:
        self.message = message
        self.msg_id = message.msg_id
        self.serials = serials
        self.wires = wires
        self.expects = SPECIFIC_REPLIES.get(self.msg_id, GENERAL_RESPONSE)
        self.reply: Packet | None = None
        self.acknowledged: Packet | None = None
        self.error: CommandError | None = None
        self.attempts = 0
        self.done = trio.Event()

    @property
    def serial(self) -> int:
        return self.serials[0]

    @property
    def final_serial(self) -> int:
        return self.serials[-1]

    def offer(self, packet: Packet) -> bool:
        """Take ``packet`` if it answers this command (see the module docstring)."""
        if self.done.is_set():
            return False
        message = packet.message
        if isinstance(message, TerminalGeneralResponse):
            if message.reply_msg_id != self.msg_id or message.reply_serial not in self.serials:
                return False
            final = message.reply_serial == self.final_serial
            if message.result != RESULT_SUCCESS or (final and self.expects == GENERAL_RESPONSE):
                self._settle(packet)
            elif final:
                self.acknowledged = packet
            return True
        if packet.msg_id != self.expects:
            return False
        serial = getattr(message, "reply_serial", None)
        if packet.msg_id not in UNNUMBERED_REPLIES and serial not in self.serials:
            return False
        self._settle(packet)
        return True

    def packages(self, indexes: tuple[int, ...]) -> list[bytes]:
        """The wires of the packages ``indexes`` (from 1) asked for again by a 0x0005."""
        return [self.wires[i - 1] for i in indexes if 1 <= i <= len(self.wires)]

    def fail(self, error: CommandError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def _settle(self, packet: Packet) -> None:
        self.reply = packet
        self.done.set()


def reply_json(*, phone: str, node: str, command: PendingCommand, reply: Packet) -> dict[str, Any]:
    """The JSON answer to a command request (the HTTP response body)."""
    return {
        "phone": phone,
        "node": node,
        "command": {
            "msg_id": f"0x{command.msg_id:04x}",
            "serial": command.serial,
            "attempts": command.attempts,
        },
        "reply": {
            "msg_id": f"0x{reply.msg_id:04x}",
            "serial": reply.serial,
            "body": hex_msg_ids(reply.message.to_json()),  # reply_msg_id in hex, as msg_id
        },
    }


# ---------------------------------------------------------------------------------------------
# Commands from JSON


def parse_msg_id(value: object) -> int:
    """A message id from JSON: ``"0x8201"``, ``"8201"`` (hex) or an integer."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0x")
        try:
            msg_id = int(text, 16)
        except ValueError:
            raise BadCommandError(f"msg_id {value!r} is not a hex message id") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        msg_id = value
    else:
        raise BadCommandError('msg_id must be a hex string such as "0x8201"')
    if not 0 <= msg_id <= 0xFFFF:
        raise BadCommandError(f"msg_id {value!r} is not a WORD")
    return msg_id


def command_class(msg_id: int) -> type[Message]:
    """The message class of a command id; :class:`BadCommandError` if it is not one."""
    cls = REGISTRY.get(msg_id)
    if cls is None or not is_downlink(msg_id):
        raise BadCommandError(f"0x{msg_id:04x} is not a downlink message of the codec")
    if msg_id in NOT_COMMANDS:
        raise BadCommandError(f"0x{msg_id:04x} is a platform answer, not a command")
    return cls


def message_from_json(msg_id: object, body: object) -> Message:
    """Build a command from its JSON form (see the module docstring).

    Recursion follows the message's declared field types, never the input's nesting: the
    codec's records nest a few levels at most, and a value nested deeper than its field's
    type is refused (:class:`BadCommandError`) at the first level that expects a scalar.
    """
    cls = command_class(parse_msg_id(msg_id))
    if body is None:
        body = {}
    return _record(cls, body, "body")


R = typing.TypeVar("R", bound=Record)


def _record(cls: type[R], data: object, path: str) -> R:
    if not isinstance(data, Mapping):
        raise BadCommandError(f"{path}: expected an object of {cls.__name__} fields")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        known = ", ".join(names) or "none"
        raise BadCommandError(f"{path}: unknown field(s) {', '.join(unknown)} (known: {known})")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields:
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadCommandError(f"{path}: field {f.name} is required")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise BadCommandError(f"{path}: {exc}") from exc


def _value(hint: Any, value: object, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _value(option, value, path)
            except BadCommandError as exc:
                errors.append(exc.detail)
        raise BadCommandError("; ".join(errors))
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise BadCommandError(f"{path}: expected a list")
        return tuple(_value(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, Record):
        return _record(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise BadCommandError(f"{path}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower().startswith("0x"):
            try:
                return int(value, 16)
            except ValueError:
                pass
        raise BadCommandError(f"{path}: expected an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise BadCommandError(f"{path}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise BadCommandError(f"{path}: expected a string")
    if hint is bytes:
        return _bytes(value, path)
    if hint is datetime:
        return _datetime(value, path)
    raise BadCommandError(f"{path}: fields of type {hint} cannot be given in JSON")


def _bytes(value: object, path: str) -> bytes:
    text = value.get("hex") if isinstance(value, Mapping) and set(value) == {"hex"} else value
    if isinstance(text, str):
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    raise BadCommandError(f'{path}: expected bytes as a hex string or {{"hex": "..."}}')


def _datetime(value: object, path: str) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                raise BadCommandError(f"{path}: the time needs a UTC offset (+08:00)")
            return parsed
    raise BadCommandError(f"{path}: expected an ISO 8601 time")
