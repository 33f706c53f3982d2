"""A minimal JT/T 808 terminal for server tests, built from our own codec (blocking sockets in
a worker thread would hide trio bugs, so it speaks trio)."""

from __future__ import annotations

from datetime import datetime

import trio

from protocol import Packet, RemoteProtocolError, StreamDecoder, encode
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.base import Message
from protocol.messages.location import LocationReport, Mileage
from protocol.messages.terminal import TerminalAuth, TerminalRegister


def location(serial: int, *, lat_e6: int = 25_040_000) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=0b11,
        latitude=lat_e6,
        longitude=102_710_000,
        altitude_m=1890,
        speed=600,
        direction=90,
        time=datetime(2026, 11, 2, 9, 0, serial % 60, tzinfo=GMT8),
        items=(Mileage(value=1000 + serial),),
    )


def registration(
    *, terminal_id: str = "T1", plate: str = "云A12345", manufacturer: str = "ACME"
) -> TerminalRegister:
    """A 0x0100 of a terminal of ours; another ``terminal_id`` makes it another device."""
    return TerminalRegister(
        province=53,
        city=100,
        manufacturer=manufacturer,
        model="M1",
        terminal_id=terminal_id,
        plate_color=1,
        plate=plate,
    )


class Terminal:
    def __init__(self, stream: trio.SocketStream, phone: str, edition: Edition) -> None:
        self.stream = stream
        self.phone = phone
        self.edition = edition
        self.decoder = StreamDecoder()
        self.serial = 0

    @classmethod
    async def connect(cls, port: int, phone: str, edition: Edition = Edition.V2013) -> Terminal:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), phone, edition)

    @property
    def wire_phone(self) -> str:
        """The phone as the server sees it: BCD[6] (12 digits) or, in 2019, BCD[10] (20)."""
        return self.phone.rjust(20 if self.edition is Edition.V2019 else 12, "0")

    async def send(self, message: Message, *, serial: int | None = None) -> int:
        if serial is None:
            self.serial += 1
            serial = self.serial
        await self.stream.send_all(
            encode(message, phone=self.phone, serial=serial, edition=self.edition)
        )
        return serial

    async def receive(self) -> Packet:
        while True:
            event = self.decoder.next_event()
            if isinstance(event, Packet):
                return event
            if isinstance(event, RemoteProtocolError):
                raise event
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.feed(data)

    async def login(self) -> str:
        await self.send(registration())
        reply = await self.receive()
        code = getattr(reply.message, "auth_code", None)
        assert isinstance(code, str)
        await self.send(
            TerminalAuth(
                auth_code=code,
                imei="860000000000001" if self.edition is Edition.V2019 else None,
                software_version="1.0" if self.edition is Edition.V2019 else None,
            )
        )
        ok = await self.receive()
        assert getattr(ok.message, "result", None) == 0
        return code

    async def close(self) -> None:
        await self.stream.aclose()
