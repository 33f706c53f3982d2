"""The terminals' auth codes as this node last knew them, kept in memory and on local disk.

While the database is unreachable a terminal that reconnects must still be able to
authenticate, or the spool (which keeps its positions safe through the outage) would have no
one to take positions from.  :class:`TerminalCodeCache` holds phone -> auth code for the
terminals this node has seen register or authenticate, plus the whole table as last read from
the database, and is saved to a file beside the spool, so a node that restarts during an
outage still knows them.  It is consulted only when the database cannot answer: the database
stays the authority (a phone released by the platform centre is refused as soon as the
database is reachable).

The file is JSON, written to a temporary name, fsynced and renamed (a crash leaves the old
file or the new one, never half of one), readable by its owner only (it holds auth codes).  A
damaged file is logged and ignored: the cache is an aid, never a reason not to start.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

# Phones remembered.  An entry is a phone and a 16-character code, about 150 bytes with the
# dict's own share: 200,000 terminals (several provinces' official fleets) are ~30 MB per
# process.  Past the cap the least recently written entries are forgotten first.
MAX_ENTRIES = 200_000
# A file larger than the cap could ever write is not ours to read.
MAX_FILE_BYTES = MAX_ENTRIES * 128
FILE_VERSION = 1


class TerminalCodeCache:
    """phone -> auth code, bounded, optionally persisted at ``path``."""

    def __init__(self, path: Path | None = None, *, max_entries: int = MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self._codes: OrderedDict[str, str] = OrderedDict()
        self.dirty = False
        # Puts made while a read of the table is under way (see begin_refresh): newer than
        # that read, so replace_all keeps them.  None when no read is under way.
        self._since_read: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self._codes)

    def get(self, phone: str) -> str | None:
        return self._codes.get(phone)

    def put(self, phone: str, code: str) -> None:
        if self._codes.get(phone) == code:
            return
        self._codes.pop(phone, None)
        self._codes[phone] = code
        while len(self._codes) > self.max_entries:
            self._codes.popitem(last=False)
        if self._since_read is not None and len(self._since_read) < self.max_entries:
            self._since_read[phone] = code
        self.dirty = True

    def forget(self, phone: str) -> None:
        if self._codes.pop(phone, None) is not None:
            self.dirty = True

    def begin_refresh(self) -> None:
        """A read of the whole table starts now (see :meth:`replace_all`)."""
        self._since_read = {}

    def replace_all(self, codes: Mapping[str, str]) -> None:
        """The database's whole table, read since :meth:`begin_refresh`: it replaces what was
        known (released phones go), except codes put meanwhile, which are newer."""
        newer = self._since_read or {}
        self._since_read = None
        fresh: OrderedDict[str, str] = OrderedDict()
        for phone, code in codes.items():
            if len(fresh) >= self.max_entries - len(newer):
                break
            fresh[phone] = code
        for phone, code in newer.items():
            fresh.pop(phone, None)
            fresh[phone] = code
        if fresh != self._codes:
            self._codes = fresh
            self.dirty = True

    # -- the file (blocking: call from a worker thread)

    def load(self) -> int:
        """Read the file, if any; the number of entries read (0 for a missing or bad file)."""
        if self.path is None:
            return 0
        try:
            size = self.path.stat().st_size
            if size > MAX_FILE_BYTES:
                logger.warning("terminal cache %s is %s bytes: ignored", self.path, size)
                return 0
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            logger.warning("terminal cache %s unreadable, ignored: %s", self.path, exc)
            return 0
        codes = document.get("codes") if isinstance(document, dict) else None
        if not isinstance(codes, dict) or document.get("version") != FILE_VERSION:
            logger.warning("terminal cache %s is not a version %s cache", self.path, FILE_VERSION)
            return 0
        for phone, code in codes.items():
            if isinstance(phone, str) and isinstance(code, str):
                self.put(phone, code)
        self.dirty = False
        return len(self._codes)

    def save(self) -> bool:
        """Write the file if anything changed since; True if written."""
        if self.path is None or not self.dirty:
            return False
        snapshot = dict(self._codes)
        self.dirty = False
        data = json.dumps({"version": FILE_VERSION, "codes": snapshot}, separators=(",", ":"))
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.path)
        except OSError as exc:
            self.dirty = True
            logger.warning("terminal cache %s not saved: %s", self.path, exc)
            return False
        return True
