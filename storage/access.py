"""Operator accounts, bearer tokens and the audit trail (migration 12), as plain rows.

* Accounts (``operator_users``): a name, a role (:data:`ROLES`) and optionally the one unit the
  account may see.  Created with ``jt808 users add``.
* Tokens (``operator_tokens``): :func:`create_token` makes a random token, stores its SHA-256
  and a short prefix, and returns the token itself: it is shown once and cannot be recovered.
  :func:`principal_for_token` finds the account of a token that is neither expired nor revoked.
* The audit trail (``audit_log``): append-only in the database.  :func:`append_audit` adds a
  row; master-data changes add theirs by trigger, named by :func:`set_actor`.

Every function takes a sync psycopg connection in autocommit mode; writes that belong
together run in one transaction here.  Refused requests (an unknown user, a name taken, an
ambiguous prefix) are :class:`AccessError`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from storage.errors import StorageError

# The roles, weakest first (the CHECK of operator_users.role).
ROLES = ("viewer", "dispatcher", "admin")
# A token is this prefix and 32 random bytes in URL-safe base64: 256 bits, so it cannot be
# guessed, and a fast hash (one SHA-256) is the right way to store it: a slow password hash
# protects low-entropy secrets, and would only make every request slower here.
TOKEN_PREFIX = "jt808_"  # noqa: S105 - a label, not a secret
TOKEN_BYTES = 32
# Characters of a token kept in clear to name it (its prefix and 8 random characters: 48 bits,
# so two tokens of one platform practically never share one).
SHOWN_CHARS = len(TOKEN_PREFIX) + 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Rows ``audit_rows`` returns at most: a year of a busy platform's changes is tens of
# thousands of rows; a query past this should narrow its time range.
MAX_AUDIT_ROWS = 100_000


class AccessError(StorageError):
    """An account or token request the data refuses; the message says why."""


def token_hash(token: str) -> bytes:
    """What is stored of a token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


# ---------------------------------------------------------------------------------------------
# Accounts


def add_user(conn: psycopg.Connection[Any], name: str, role: str, unit: str | None) -> None:
    """Create an account; :class:`AccessError` for a bad name or role, or a name taken."""
    if not _NAME.fullmatch(name):
        raise AccessError(
            f"user name {name[:80]!r}: 1-64 letters, digits and . _ @ -, starting with a "
            "letter or digit"
        )
    if role not in ROLES:
        raise AccessError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if unit is not None and not unit.strip():
        raise AccessError("unit must not be blank")
    with conn.transaction():
        found = conn.execute(
            "INSERT INTO operator_users (name, role, unit) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING name",
            (name, role, unit),
        ).fetchone()
        if found is None:
            raise AccessError(f"user {name!r} exists already")
        append_audit(
            conn,
            action="user.add",
            kind="user",
            key=name,
            unit=unit,
            after={"name": name, "role": role, "unit": unit},
        )


def users(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every account: ``name, role, unit, created_at, tokens`` (the usable ones), by name."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT u.name, u.role, u.unit, u.created_at, count(t.id) AS tokens "
            "FROM operator_users u LEFT JOIN operator_tokens t ON t.user_name = u.name "
            "AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) "
            "GROUP BY u.name ORDER BY u.name"
        ).fetchall()


# ---------------------------------------------------------------------------------------------
# Tokens


def create_token(
    conn: psycopg.Connection[Any],
    user: str,
    expires_at: datetime | None,
    *,
    token: str | None = None,
) -> tuple[int, str]:
    """A new token for ``user`` (id and the token itself, which is not stored); ``token``
    gives the token instead of a random one (tests)."""
    token = new_token() if token is None else token
    with conn.transaction():
        if conn.execute("SELECT 1 FROM operator_users WHERE name = %s", (user,)).fetchone() is None:
            raise AccessError(f"no user {user!r} (add it with: jt808 users add)")
        found = conn.execute(
            "INSERT INTO operator_tokens (user_name, prefix, sha256, expires_at) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (user, token[:SHOWN_CHARS], token_hash(token), expires_at),
        ).fetchone()
        assert found is not None  # RETURNING always yields the row
        token_id = int(found[0])
        append_audit(
            conn,
            action="token.create",
            kind="token",
            key=str(token_id),
            after={"user": user, "prefix": token[:SHOWN_CHARS], "expires_at": _iso(expires_at)},
        )
    return token_id, token


def revoke_token(conn: psycopg.Connection[Any], id_or_prefix: str) -> int:
    """Revoke the token with this id or prefix (at least :data:`SHOWN_CHARS` characters, or
    the whole token); returns its id.  :class:`AccessError` when none or several match."""
    text = id_or_prefix.strip()
    with conn.transaction():
        if text.isdigit():
            rows = conn.execute(
                "SELECT id, user_name, revoked_at FROM operator_tokens WHERE id = %s", (int(text),)
            ).fetchall()
        elif len(text) >= SHOWN_CHARS:
            rows = conn.execute(
                "SELECT id, user_name, revoked_at FROM operator_tokens "
                "WHERE prefix = %s AND (length(%s) = %s OR sha256 = %s)",
                (text[:SHOWN_CHARS], text, SHOWN_CHARS, token_hash(text)),
            ).fetchall()
        else:
            raise AccessError(f"give a token id or its first {SHOWN_CHARS} characters")
        if not rows:
            raise AccessError(f"no token {text[:SHOWN_CHARS]!r}")
        if len(rows) > 1:
            ids = ", ".join(str(r[0]) for r in rows)
            raise AccessError(f"{text!r} names several tokens ({ids}): give the id")
        token_id, user, revoked_at = rows[0]
        if revoked_at is None:
            conn.execute("UPDATE operator_tokens SET revoked_at = now() WHERE id = %s", (token_id,))
            append_audit(
                conn,
                action="token.revoke",
                kind="token",
                key=str(token_id),
                before={"user": user, "revoked": False},
                after={"user": user, "revoked": True},
            )
    return int(token_id)


def tokens(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every token: ``id, user, prefix, created_at, expires_at, revoked_at``, by id."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            'SELECT id, user_name AS "user", prefix, created_at, expires_at, revoked_at '
            "FROM operator_tokens ORDER BY id"
        ).fetchall()


def principal_for_token(conn: psycopg.Connection[Any], token: str) -> dict[str, Any] | None:
    """``name, role, unit, token_id`` of the account holding ``token``; None when no token
    matches or it expired or was revoked."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT u.name, u.role, u.unit, t.id AS token_id FROM operator_tokens t "
            "JOIN operator_users u ON u.name = t.user_name WHERE t.sha256 = %s "
            "AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())",
            (token_hash(token),),
        ).fetchone()


# ---------------------------------------------------------------------------------------------
# The audit trail


def set_actor(conn: psycopg.Connection[Any], actor: str, source: str) -> None:
    """Name who writes on this connection (its session): the master-data triggers and
    :func:`append_audit` record ``actor`` and ``source`` (a client address, or ``cli``)."""
    conn.execute(
        "SELECT set_config('jt808.actor', %s, false), set_config('jt808.source', %s, false)",
        (actor, source),
    )


def append_audit(
    conn: psycopg.Connection[Any],
    *,
    action: str,
    kind: str,
    key: str | None,
    unit: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Append one row, by the actor :func:`set_actor` named (else the database role)."""
    conn.execute(
        "INSERT INTO audit_log (actor, source, action, object_kind, object_key, unit, before, "
        "after) VALUES (jt808_audit_actor(), jt808_audit_source(), %s, %s, %s, %s, %s, %s)",
        (
            action,
            kind,
            key,
            unit,
            None if before is None else Jsonb(dict(before)),
            None if after is None else Jsonb(dict(after)),
        ),
    )


def audit_rows(
    conn: psycopg.Connection[Any],
    *,
    since: datetime | None = None,
    user: str | None = None,
    unit: str | None = None,
    limit: int = MAX_AUDIT_ROWS,
) -> list[dict[str, Any]]:
    """Audit rows at or after ``since``, of ``user`` and about ``unit`` (None: any), oldest
    first, at most ``limit`` (capped at :data:`MAX_AUDIT_ROWS`): ``id, at, actor, source,
    action, object_kind, object_key, unit, before, after, reason`` (why, when the writer
    gave a reason: an exempt change through the operator port)."""
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, at, actor, source, action, object_kind, object_key, unit, before, after, "
            "reason FROM audit_log WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s) "
            "AND (%(user)s::text IS NULL OR actor = %(user)s) "
            "AND (%(unit)s::text IS NULL OR unit = %(unit)s) ORDER BY id LIMIT %(limit)s",
            {"since": since, "user": user, "unit": unit, "limit": min(limit, MAX_AUDIT_ROWS)},
        ).fetchall()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
