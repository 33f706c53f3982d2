"""Text for people: the encodings of files as Chinese offices save them, and display widths.

Excel on a Chinese Windows saves CSV in the ANSI code page, GBK (code page 936); other tools
write UTF-8 with or without a byte-order mark.  :func:`read_text` takes UTF-8 (BOM or not) when
the bytes are valid UTF-8, else GB 18030, the national standard that contains GBK and GB 2312
(Python's ``gb18030`` codec), and says which it used.  A file that is neither, or not in the
encoding given, is refused naming the line and the byte.

:func:`display_width` counts the terminal columns a string takes: East Asian wide and
full-width characters (``unicodedata.east_asian_width`` W and F: Chinese characters, full-width
punctuation and digits) take two, combining marks none, everything else one.
"""

from __future__ import annotations

import codecs
import sys
import unicodedata
from pathlib import Path
from typing import IO

# What people call the encodings we detect, as printed in the result lines.
UTF8_BOM = "UTF-8 (with BOM)"
UTF8 = "UTF-8"
GB18030 = "GB 18030"


class TextFileError(Exception):
    """A file that cannot be read as text; the message names the file, line and byte."""


def decode_text(data: bytes, encoding: str | None = None) -> tuple[str, str]:
    """``data`` as text and the name of the encoding used: ``encoding`` when given (a Python
    codec name), else detected (see the module docstring).  Raises :class:`ValueError` naming
    the line and the byte when the bytes are not in that encoding."""
    if encoding is not None:
        try:
            codec = codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}") from None
        if codec.name == "utf-8" and data.startswith(codecs.BOM_UTF8):
            codec = codecs.lookup("utf-8-sig")  # a BOM is never part of the text
        return _decode(data, codec.name, encoding), encoding
    if data.startswith(codecs.BOM_UTF8):
        return _decode(data, "utf-8-sig", UTF8_BOM), UTF8_BOM
    try:
        return data.decode("utf-8"), UTF8
    except UnicodeDecodeError:
        pass
    return _decode(data, "gb18030", f"UTF-8 nor {GB18030}", hint=True), GB18030


def _decode(data: bytes, codec: str, name: str, *, hint: bool = False) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        what = f"neither {name}" if hint else f"not {name}"
        advice = " (give its encoding with --encoding)" if hint else ""
        raise ValueError(
            f"{what}: line {line}, byte {column} (0x{data[exc.start]:02x}){advice}"
        ) from None


def read_text(path: Path, encoding: str | None = None) -> tuple[str, str]:
    """The text of the file at ``path`` and the encoding used (see :func:`decode_text`);
    raises :class:`TextFileError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TextFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode_text(data, encoding)
    except ValueError as exc:
        raise TextFileError(f"{path}: {exc}") from None


def display_width(text: str) -> int:
    """The terminal columns ``text`` takes (see the module docstring)."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def pad(text: str, width: int) -> str:
    """``text`` padded with spaces to ``width`` display columns (never cut)."""
    return text + " " * max(0, width - display_width(text))


def table(rows: list[list[str]], *, gap: str = "  ") -> list[str]:
    """Rows of cells as lines whose columns line up on a terminal, each column as wide as
    its widest cell (the last column is not padded)."""
    if not rows:
        return []
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        gap.join([*(pad(cell, w) for cell, w in zip(row[:-1], widths, strict=False)), row[-1]])
        for row in rows
    ]


def progress(stream: IO[str] | None = None) -> bool:
    """Whether progress lines are wanted on ``stream`` (standard error): only on a terminal,
    so logs and pipes get the final count alone."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


__all__ = [
    "GB18030",
    "UTF8",
    "UTF8_BOM",
    "TextFileError",
    "decode_text",
    "display_width",
    "pad",
    "progress",
    "read_text",
    "table",
]
