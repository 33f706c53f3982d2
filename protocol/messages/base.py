"""Message base classes and the message-id registry.

Every message is a frozen, slotted, keyword-only dataclass whose field names are the names in
its construct schema, so the generic conversions below move values between the two without any
per-message code.  Nested records (lists of parameters, area vertices, ...) are dataclasses too,
named in ``NESTED``.  Nothing outside ``protocol`` sees a construct ``Container``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, Self, TypeVar

from construct import Construct, ConstructError, Container, ListContainer

from protocol.errors import BodyDecodeError, LocalProtocolError, RemoteProtocolError
from protocol.header import Edition


def jsonable(value: Any) -> Any:
    """A JSON-ready rendering of a field value: bytes as hex, times as ISO 8601."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def hex_msg_ids(value: Any) -> Any:
    """A message's JSON (:meth:`Message.to_json`) for people: every message id field
    (``reply_msg_id``, ...) as ``"0x8001"``, as the header's ``msg_id`` is shown, not as a
    decimal number.  Other values are unchanged."""
    if isinstance(value, Mapping):
        return {
            key: f"0x{item:04x}"
            if str(key).endswith("msg_id") and isinstance(item, int) and not isinstance(item, bool)
            else hex_msg_ids(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [hex_msg_ids(item) for item in value]
    return value


def _plain(value: Any, nested: type[Record] | None) -> Any:
    if nested is not None:
        if isinstance(value, ListContainer | list):
            return tuple(nested.from_parsed(v) for v in value)
        if value is None:
            return None
        return nested.from_parsed(value)
    if isinstance(value, ListContainer):
        return tuple(_plain(v, None) for v in value)
    if isinstance(value, Container):  # pragma: no cover - a schema/dataclass mismatch
        raise TypeError("nested construct value needs a NESTED record type")
    return value


class Record:
    """A dataclass mirrored by a construct Struct with the same field names."""

    __slots__ = ()
    NESTED: ClassVar[Mapping[str, type[Record]]] = {}

    @classmethod
    def from_parsed(cls, parsed: Container) -> Self:
        values = {
            f.name: _plain(parsed[f.name], cls.NESTED.get(f.name))
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }
        return cls(**values)

    def to_build(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Record):
                value = value.to_build()
            elif isinstance(value, tuple) and value and isinstance(value[0], Record):
                value = [v.to_build() for v in value]
            out[f.name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


class Message(Record):
    """A message body.  Subclasses set ``MSG_ID`` and ``SCHEMA`` (or override ``schema``)."""

    __slots__ = ()
    MSG_ID: ClassVar[int]
    SCHEMA: ClassVar[Construct]

    @property
    def msg_id(self) -> int:
        return self.MSG_ID

    @classmethod
    def schema(cls, edition: Edition) -> Construct:
        """The body schema for ``edition``; most messages have one for all editions."""
        return cls.SCHEMA

    @classmethod
    def refine_edition(cls, body: bytes, edition: Edition) -> Edition:
        """Narrow the header's edition by the body (2011 vs 2013 share one header)."""
        return edition

    @classmethod
    def decode(cls, body: bytes, edition: Edition) -> Self:
        """Decode a body; raises :class:`BodyDecodeError` (or another remote error)."""
        try:
            parsed = cls.schema(edition).parse(body, edition=int(edition))
        except ConstructError as exc:
            raise BodyDecodeError(f"0x{cls.MSG_ID:04x} body: {exc}") from exc
        try:
            return cls.from_parsed(parsed)
        except RemoteProtocolError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise BodyDecodeError(f"0x{cls.MSG_ID:04x} body: {exc}") from exc

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        """Encode the body; raises :class:`LocalProtocolError` if a field does not fit."""
        try:
            return bytes(self.schema(edition).build(self.to_build(), edition=int(edition)))
        except (ConstructError, AttributeError, TypeError, ValueError) as exc:
            # construct reports a field of the wrong type (None for a text, say) as whatever
            # the field's own code raised; all of it is a message that does not fit its schema.
            raise LocalProtocolError(f"0x{self.MSG_ID:04x}: {exc!r}") from exc


REGISTRY: dict[int, type[Message]] = {}

M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` the decoder for its ``MSG_ID``."""
    existing = REGISTRY.get(cls.MSG_ID)
    if existing is not None and existing is not cls:
        raise LocalProtocolError(f"0x{cls.MSG_ID:04x} registered twice: {existing} and {cls}")
    REGISTRY[cls.MSG_ID] = cls
    return cls


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RawMessage(Message):
    """A body we do not decode: an unknown id, or an encrypted body.  Kept byte for byte."""

    raw_msg_id: int
    body: bytes

    @property
    def msg_id(self) -> int:
        return self.raw_msg_id

    @classmethod
    def of(cls, msg_id: int, body: bytes) -> RawMessage:
        return cls(raw_msg_id=msg_id, body=body)

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        return self.body

    def to_json(self) -> dict[str, Any]:
        return {"raw": self.body.hex()}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Fragment(Message):
    """One package of a sub-packaged message (header bit 13); see ``protocol.reassembly``."""

    fragment_of: int
    data: bytes

    @property
    def msg_id(self) -> int:
        return self.fragment_of

    def encode(self, edition: Edition = Edition.V2013) -> bytes:
        return self.data

    def to_json(self) -> dict[str, Any]:
        return {"fragment": self.data.hex()}


def message_class(msg_id: int) -> type[Message] | None:
    return REGISTRY.get(msg_id)


def is_downlink(msg_id: int) -> bool:
    """Platform-to-terminal ids have the high bit set (0x8xxx, and 0x9xxx for JT/T 1078)."""
    return bool(msg_id & 0x8000)
