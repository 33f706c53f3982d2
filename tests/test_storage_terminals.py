"""TerminalStore: registrations and authentications of a storm are written in batches, and
each caller still gets its own answer."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import psycopg
import pytest
import trio

from storage import TerminalStore, migrate
from storage.errors import DataRejectedError
from storage.terminals import POLICY_OPEN, POLICY_REGISTRY, REGISTER_OK, Registration
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401

AT = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


def registration(phone: str, code: str, policy: str = POLICY_OPEN) -> Registration:
    return Registration(
        phone=phone,
        province=53,
        city=100,
        manufacturer="M1",
        model="MODEL",
        terminal_id="T1",
        plate_color=1,
        plate="云A00001",
        auth_code=code,
        policy=policy,
        at=AT,
    )


async def test_a_storm_is_written_in_batches_with_every_answer_its_own(db: str) -> None:
    store = TerminalStore(db)
    batches: list[int] = []
    run_batch = store._run_batch  # observe the batching

    def counting(writes: list[object]) -> None:
        batches.append(len(writes))
        run_batch(writes)  # type: ignore[arg-type]

    store._run_batch = counting  # type: ignore[method-assign]
    phones = [f"0139000{n:05d}" for n in range(300)]
    registered: dict[str, int] = {}
    authenticated: dict[str, bool] = {}

    async def terminal(phone: str, index: int) -> None:
        registered[phone] = await store.register(registration(phone, f"code-{phone}"))
        # every seventh terminal presents a wrong code
        code = f"code-{phone}" if index % 7 else "wrong"
        authenticated[phone] = await store.authenticate(
            phone=phone, auth_code=code, imei=None, firmware=None, at=AT
        )

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index, phone in enumerate(phones):
                    nursery.start_soon(terminal, phone, index)
    finally:
        store.close()
    assert set(registered.values()) == {REGISTER_OK}
    assert authenticated == {phone: bool(i % 7) for i, phone in enumerate(phones)}
    assert sum(batches) == 2 * len(phones)
    assert len(batches) < len(phones)  # written together, not one commit each
    with psycopg.connect(db) as conn:
        codes = dict(conn.execute("SELECT phone, auth_code FROM terminals").fetchall())
    assert codes == {phone: f"code-{phone}" for phone in phones}


async def test_a_failing_statement_fails_alone(db: str) -> None:
    store = TerminalStore(db)
    bad = dataclasses.replace(registration("013900000001", "c"), plate_color=70_000)  # smallint
    good = registration("013900000002", "code")
    results: dict[str, object] = {}

    async def register(item: Registration) -> None:
        try:
            results[item.phone] = await store.register(item)
        except DataRejectedError as exc:
            results[item.phone] = exc

    try:
        async with trio.open_nursery() as nursery:
            for item in (good, bad, good):
                nursery.start_soon(register, item)
    finally:
        store.close()
    assert results[good.phone] == REGISTER_OK
    assert isinstance(results[bad.phone], DataRejectedError)


async def test_registry_policy_answers_unknown_terminals(db: str) -> None:
    store = TerminalStore(db)
    try:
        store.provision_sync("013900000009")
        known = await store.register(registration("013900000009", "c", POLICY_REGISTRY))
        unknown = await store.register(registration("013900000010", "c", POLICY_REGISTRY))
    finally:
        store.close()
    assert known == REGISTER_OK
    assert unknown != REGISTER_OK
