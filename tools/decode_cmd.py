"""``jt808 decode``: JT/T 808 frames in, one JSON object per frame out.

Frames come as hex arguments, as hex lines on standard input, or from a binary file
(``--raw FILE``): bare wire bytes, or a capture file of ``jt808 serve --capture`` or ``jt808
simulate --capture`` (recognised by its ``JT808CAP`` magic, :mod:`protocol.capture`), decoded
record by record, each frame with its record's time offset and the connection's peer.  A frame
that cannot be decoded prints ``{"error": {...}, "hex": ...}`` and the command goes on; the exit
status is 1 if any frame failed (or the file cannot be read), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from protocol import Packet, RemoteProtocolError, StreamDecoder
from protocol.capture import MAGIC, CaptureError, CaptureReader
from protocol.messages.base import Fragment, hex_msg_ids

# Binary captures are read in chunks the size of a large TCP read.
_RAW_CHUNK = 64 * 1024


EXAMPLES = """\
examples:
  jt808 decode 7e0002000001380013800000057e
  jt808 decode < frames.txt                   one hex frame per line
  jt808 decode --raw captures/20261003T003000.000000Z-4242-1.jt808cap
  jt808 decode --raw dump.bin --pretty        bare wire bytes (a tcpdump payload, say)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", nargs="*", help="hex frames (default: one per line on stdin)")
    parser.add_argument(
        "--raw",
        metavar="FILE",
        help="decode a binary file: a JT808CAP capture (serve/simulate --capture) or bare "
        "wire bytes",
    )
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
        "body": hex_msg_ids(packet.message.to_json()),  # reply_msg_id in hex, as msg_id
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
        yield from _events(decoder, chunk)


def _events(decoder: StreamDecoder, chunk: bytes) -> Iterator[dict[str, Any]]:
    decoder.feed(chunk)
    for event in decoder:
        if isinstance(event, RemoteProtocolError):
            yield error_json(event, None)
        else:
            yield packet_json(event)


def _decode_capture(reader: CaptureReader) -> Iterator[dict[str, Any]]:
    """The frames of a capture file.  The records' data is one connection's byte stream, so
    one decoder reads it all (a frame split over two socket reads is still one frame); each
    frame carries the offset of the record its last byte came in and the connection's peer."""
    peer = reader.header.peer
    decoder = StreamDecoder()
    for record in reader:
        for result in _events(decoder, record.data):
            result["capture"] = {"offset_s": round(record.offset_ns / 1e9, 6), "peer": peer}
            yield result


def _decode_file(path: str, err: IO[str]) -> list[dict[str, Any]]:
    """Every result of ``--raw FILE``: a capture when it starts with the magic, else wire
    bytes.  Raises OSError and CaptureError."""
    with open(path, "rb") as stream:
        if stream.read(len(MAGIC)) != MAGIC:
            stream.seek(0)
            return list(_decode_raw(stream))
        stream.seek(0)
        reader = CaptureReader(stream)
        results = list(_decode_capture(reader))
        if reader.truncated:  # the writer died mid-record: not an error (protocol.capture)
            err.write(f"jt808 decode: {path}: the capture ends inside a record; shown up to it\n")
        return results


def run(
    args: argparse.Namespace, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> int:
    out = stdout or sys.stdout
    if args.raw:
        try:
            results: Iterable[dict[str, Any]] = _decode_file(args.raw, sys.stderr)
        except OSError as exc:
            print(f"jt808 decode: cannot read {args.raw}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except CaptureError as exc:
            print(f"jt808 decode: {args.raw}: {exc}", file=sys.stderr)
            return 1
    else:
        source = _hex_inputs(args, stdin or sys.stdin)
        results = (result for text in source for result in _decode_hex(text))
    failed = False
    for result in results:
        failed = failed or "error" in result
        out.write(json.dumps(result, ensure_ascii=False, indent=2 if args.pretty else None) + "\n")
    return 1 if failed else 0
