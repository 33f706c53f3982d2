"""The operator account the tests call the operator port with: an admin bound to no unit.

In-process ports get :func:`memory_access`; a port backed by the database (the ``serve``
wiring) gets the same token stored by :func:`store_token`.  Requests carry
:data:`AUTH_HEADER` (or :data:`AUTH_LINE` in a raw head).
"""

from __future__ import annotations

import psycopg

from ingest.access import ADMIN, Principal
from ingest.interfaces import InMemoryOperatorAccess
from storage import access

TEST_USER = "test-admin"
TEST_TOKEN = "jt808_test-admin-token-for-the-test-suite"
PRINCIPAL = Principal(name=TEST_USER, role=ADMIN)
AUTH_HEADER = ("authorization", f"Bearer {TEST_TOKEN}")
AUTH_LINE = f"Authorization: Bearer {TEST_TOKEN}\r\n"


def memory_access(**more: Principal) -> InMemoryOperatorAccess:
    """The test admin's token, and ``more`` tokens (token -> principal)."""
    return InMemoryOperatorAccess({TEST_TOKEN: PRINCIPAL, **more})


def store_token(
    dsn: str,
    token: str = TEST_TOKEN,
    user: str = TEST_USER,
    role: str = ADMIN,
    unit: str | None = None,
) -> None:
    """Store an account and its token in a migrated database (once: again is a no-op)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not any(u["name"] == user for u in access.users(conn)):
            access.add_user(conn, user, role, unit)
        if access.principal_for_token(conn, token) is None:
            access.create_token(conn, user, None, token=token)
