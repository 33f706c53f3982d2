"""A provisioned, registered terminal keeps its phone number: another device re-registering the
number -- while the terminal is offline, under either registration policy -- is answered
0x8100 result 3 (JT/T 808-2019 table 9: terminal already registered), gets no auth code and
changes nothing; the terminal then logs in with the code it had.  Only the same terminal
identity (manufacturer and terminal id as recorded) may register again, and only the platform
centre releases a number (``jt808 terminals reset``; see test_terminal_identity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from protocol.messages.terminal import (
    REGISTER_TERMINAL_TAKEN,
    TerminalAuth,
    TerminalRegisterResponse,
)
from tests.serving import serving
from tests.storage_fixtures import db_proxy, migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal, registration
from tests.test_terminal_identity import code_of, events
from tools.cli import main

pytestmark = pytest.mark.db

PHONE = "13900000202"


@pytest.mark.parametrize("policy", ["registry", "open"])
async def test_another_device_cannot_take_over_a_provisioned_terminal(
    db: str, tmp_path: Path, policy: str
) -> None:
    wire = PHONE.rjust(12, "0")
    assert main(["terminals", "provision", PHONE, "--dsn", db]) == 0
    opened: list[Terminal] = []
    try:
        with trio.fail_after(30):
            async with serving(db, tmp_path, registration=policy) as app:
                port = app.server.ports[0]
                owner = await Terminal.connect(port, PHONE)
                opened.append(owner)
                code = await owner.login()
                await owner.close()  # offline: nothing holds the number but the record

                impostors = [
                    registration(terminal_id="CLONE-9"),  # another device of the same make
                    registration(manufacturer="OTHER"),  # the same id on another make
                    registration(terminal_id=""),  # no identity at all
                ]
                for message in impostors:
                    impostor = await Terminal.connect(port, PHONE)
                    opened.append(impostor)
                    await impostor.send(message)
                    answer = (await impostor.receive()).message
                    assert isinstance(answer, TerminalRegisterResponse)
                    assert answer.result == REGISTER_TERMINAL_TAKEN
                    assert answer.auth_code is None
                    await impostor.close()
                assert code_of(db, wire) == code

                back = await Terminal.connect(port, PHONE)
                opened.append(back)
                await back.send(TerminalAuth(auth_code=code))
                assert getattr((await back.receive()).message, "result", None) == 0
                refused = ["registration_refused"] * len(impostors)
                assert events(db, wire) == ["registered", *refused]
    finally:
        for terminal in opened:
            await trio.aclose_forcefully(terminal.stream)
