"""The message catalogue.  Importing this package registers every message decoder."""

from __future__ import annotations

from protocol.messages import (
    areas,
    control,
    location,
    multimedia,
    params,
    passthrough,
    recorder,
    terminal,
    text,
)
from protocol.messages.base import (
    REGISTRY,
    Fragment,
    Message,
    RawMessage,
    Record,
    is_downlink,
    message_class,
    register,
)

__all__ = [
    "REGISTRY",
    "Fragment",
    "Message",
    "RawMessage",
    "Record",
    "areas",
    "control",
    "is_downlink",
    "location",
    "message_class",
    "multimedia",
    "params",
    "passthrough",
    "recorder",
    "register",
    "terminal",
    "text",
]
