"""The storage package's errors, and the line between a database that cannot answer and one
that refuses a request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg


class StorageError(Exception):
    """Root of the storage errors: misuse, or a database in a state we cannot work with."""


class WriterClosedError(StorageError):
    """Rows were submitted to a writer that is not running."""


class DatabaseUnavailableError(StorageError):
    """The database cannot answer now: connecting failed, the connection broke off, the server
    is shutting down or out of resources, or a statement was cancelled or lost a lock or
    serialisation race.  The same request may succeed later.  A write cut off while it
    committed may or may not have been stored.

    (:mod:`storage.writer` has an error of the same name for its own batches; this one is what
    the request-scoped storage functions raise.)
    """


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing to answer rather than refusing the request.

    psycopg's ``OperationalError`` covers both: connection failures, shutdowns (class 57),
    insufficient resources (53), lock and serialisation failures (40, 55) are the database's
    state; "program limit exceeded" (class 54: an index entry or a statement too large) is
    the request's own fault and will fail again.
    """
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.ProgramLimitExceeded
    )


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Raise :class:`DatabaseUnavailableError` (from the original) for the psycopg errors that
    mean the database cannot answer now (:func:`is_unavailable`); everything else passes."""
    try:
        yield
    except psycopg.Error as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailableError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
        raise


def _first_line(exc: BaseException) -> str:
    """The message without psycopg's DETAIL/CONTEXT lines (which may quote the values sent)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DataRejectedError(StorageError):
    """The database refused the values themselves (a data or integrity error): the same
    request will fail again."""
