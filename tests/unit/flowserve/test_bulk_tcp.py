"""The bulk TCP channel on real sockets: the payload arrives whole and in order, a connection
without the token gets nothing, bad offers are refused naming the field."""

from __future__ import annotations

import asyncio
import socket

import pytest

from deepserve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from deepserve.flowserve.transfer.bulk_tcp import BulkOffer, BulkSender, receive


def payload() -> list[bytes]:
    return [bytes(range(256)) * 40, b"x" * 3, bytes(reversed(range(256))) * 4096]


async def test_the_payload_arrives_whole_and_in_order() -> None:
    parts = payload()
    sender = BulkSender("127.0.0.1", [memoryview(p) for p in parts])
    rooms = [bytearray(len(p)) for p in parts]
    sent, got = await asyncio.gather(
        sender.serve(30), receive(sender.offer, [memoryview(r) for r in rooms], 30)
    )
    assert sent == got == sum(map(len, parts))
    assert [bytes(r) for r in rooms] == parts


async def test_a_connection_without_the_token_gets_nothing() -> None:
    parts = payload()
    sender = BulkSender("127.0.0.1", [memoryview(p) for p in parts])
    serving = asyncio.create_task(sender.serve(30))
    host, port = sender.offer.address.rsplit(":", 1)

    def intruder() -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"0" * 16)
            return conn.recv(1024)  # closed without a byte of the payload

    assert await asyncio.to_thread(intruder) == b""
    # The rightful target still gets everything afterwards.
    rooms = [bytearray(len(p)) for p in parts]
    await receive(sender.offer, [memoryview(r) for r in rooms], 30)
    assert await serving == sum(map(len, parts))
    assert [bytes(r) for r in rooms] == parts


async def test_an_offer_that_does_not_fit_is_refused() -> None:
    offer = BulkOffer("127.0.0.1:9", b"t" * 16, 10)
    with pytest.raises(InvalidArgument) as err:
        await receive(offer, [memoryview(bytearray(4))], 5)
    assert err.value.field == "bulk_offer"


async def test_a_source_that_stops_early_is_unavailable() -> None:
    sender = BulkSender("127.0.0.1", [memoryview(b"abc")])
    short = BulkOffer(sender.offer.address, sender.offer.token, 6)
    serving = asyncio.create_task(sender.serve(30))
    with pytest.raises(Unavailable, match="closed after 3 of 6 bytes"):
        await receive(short, [memoryview(bytearray(6))], 30)
    await serving


async def test_nobody_fetching_times_out() -> None:
    sender = BulkSender("127.0.0.1", [memoryview(b"abc")])
    with pytest.raises(DeadlineExceeded):
        await sender.serve(0.3)
