"""``jt808 decode``: JT/T 808 frames in, one JSON object per frame out.

Frames come as hex arguments, as hex lines on standard input, or as a binary capture
(``--raw FILE``).  A frame that cannot be decoded prints ``{"error": {...}, "hex": ...}`` and the
command goes on; the exit status is 1 if any frame failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from protocol import Packet, RemoteProtocolError, StreamDecoder
from protocol.messages.base import Fragment

# Binary captures are read in chunks the size of a large TCP read.
_RAW_CHUNK = 64 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", nargs="*", help="hex frames (default: one per line on stdin)")
    parser.add_argument("--raw", metavar="FILE", help="decode a binary capture of wire bytes")
    parser.add_argument("--pretty", action="store_true", help="indented JSON for people")


def packet_json(packet: Packet) -> dict[str, Any]:
    header = packet.header
    subpackage = (
        {"total": header.package_total, "index": header.package_index}
        if header.subpackage
        else None
    )
    out: dict[str, Any] = {
        "msg_id": f"0x{header.msg_id:04x}",
        "version": str(packet.edition.value),
        "phone": header.phone,
        "serial": header.serial,
        "encrypted": header.encryption != 0,
        "subpackage": subpackage,
        "body": packet.message.to_json(),
    }
    if header.protocol_version is not None:
        out["protocol_version"] = header.protocol_version
    if isinstance(packet.message, Fragment):
        out["fragment"] = True
    if packet.quirks:
        out["quirks"] = sorted(packet.quirks)
    return out


def error_json(error: RemoteProtocolError, data: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"kind": error.kind, "detail": error.detail}}
    if error.header is not None:
        out["error"]["msg_id"] = f"0x{error.header.msg_id:04x}"
        out["error"]["phone"] = error.header.phone
        out["error"]["serial"] = error.header.serial
    shown = data if data is not None else error.raw
    out["hex"] = shown.hex() if shown is not None else None
    return out


def _hex_inputs(args: argparse.Namespace, stdin: IO[str]) -> Iterable[str]:
    frames: list[str] = args.frames
    if frames:
        return frames
    return (line for line in stdin if line.strip())


def _decode_hex(text: str) -> Iterator[dict[str, Any]]:
    cleaned = "".join(text.split())
    try:
        data = bytes.fromhex(cleaned)
    except ValueError:
        yield {"error": {"kind": "hex", "detail": "not a hex string"}, "hex": cleaned}
        return
    if data[:1] != b"\x7e":
        data = b"\x7e" + data + b"\x7e"  # a frame given without its flags
    decoder = StreamDecoder()
    decoder.feed(data + b"\x7e")  # a frame missing its closing flag still ends here
    seen = False
    for event in decoder:
        seen = True
        if isinstance(event, RemoteProtocolError):
            yield error_json(event, data)
        else:
            yield packet_json(event)
    if not seen:
        yield {
            "error": {"kind": "no_frame", "detail": "no frame between 0x7e flags"},
            "hex": cleaned,
        }


def _decode_raw(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    decoder = StreamDecoder()
    while chunk := stream.read(_RAW_CHUNK):
        decoder.feed(chunk)
        for event in decoder:
            if isinstance(event, RemoteProtocolError):
                yield error_json(event, None)
            else:
                yield packet_json(event)


def run(
    args: argparse.Namespace, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> int:
    out = stdout or sys.stdout
    if args.raw:
        with open(args.raw, "rb") as stream:
            results: Iterable[dict[str, Any]] = list(_decode_raw(stream))
    else:
        source = _hex_inputs(args, stdin or sys.stdin)
        results = (result for text in source for result in _decode_hex(text))
    failed = False
    for result in results:
        failed = failed or "error" in result
        out.write(json.dumps(result, ensure_ascii=False, indent=2 if args.pretty else None) + "\n")
    return 1 if failed else 0
