"""The storage package's errors."""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage errors: misuse, or a database in a state we cannot work with."""


class WriterClosedError(StorageError):
    """Rows were submitted to a writer that is not running."""
