"""What the engine keeps of a transaction once its final response went or came (issue 12:
memory per completed call while its timers run): not the INVITE received, not the handle of
the INVITE sent (the request as sent and every response), only what a late message needs.
Over loopback UDP between two engines, the transactions still waiting for Timers L and M."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.transaction import build_cancel
from sbc.sip.uri import parse_uri

A_HOST = "127.0.0.1"
B_HOST = "127.0.0.2"


def invite(call_id: str) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:a@127.0.0.1>;tag=a1"),
            ("To", "<sip:b@127.0.0.2>"),
            ("Call-ID", call_id),
            ("CSeq", "1 INVITE"),
            ("Contact", "<sip:a@127.0.0.1>"),
        ]
    )
    return Request("INVITE", parse_uri("sip:b@127.0.0.2"), headers)


@pytest.fixture
async def engines(free_port_factory: Callable[..., int]) -> AsyncIterator[Callable[..., Any]]:
    started: list[SipEngine] = []

    async def factory(host: str) -> SipEngine:
        engine = SipEngine(TransportConfig(bind=host, port=free_port_factory(host)))
        await engine.start()
        started.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in started:
            await engine.stop()


async def test_answered_invite_leaves_neither_handle_nor_request_in_the_engines(
    engines: Any,
) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    received: list[IncomingRequest] = []
    cancels: list[Request] = []
    b.on_cancel = lambda incoming, cancel: cancels.append(cancel)

    def uas(incoming: IncomingRequest) -> None:
        received.append(incoming)
        incoming.respond(180)
        incoming.respond(200, headers=(("Contact", f"<sip:b@{B_HOST}:{b.config.port}>"),))

    b.on_request = uas
    late: list[tuple[Destination | None, Response]] = []
    copied = asyncio.Event()

    def on_late(destination: Destination | None, response: Response) -> None:
        late.append((destination, response))
        copied.set()

    a.on_late_response = on_late
    target = Destination("udp", B_HOST, b.config.port)
    handle = a.send_request(invite("kept"), target)
    async with asyncio.timeout(5):
        assert (await handle).status == 200
    assert [r.status for r in handle.responses] == [180, 200]

    # Both transactions wait for their timers (M at a, L at b: 64*T1) ...
    assert a.table_sizes().get("tx_client_INVITE_Accepted") == 1
    assert b.table_sizes().get("tx_server_INVITE_Accepted") == 1
    # ... while a keeps only where the INVITE went, and b nothing of the INVITE received.
    assert a.table_sizes()["engine_clients"] == 0
    assert a.table_sizes()["engine_finished"] == 1
    assert a.table_sizes()["engine_branch_keys"] == a.table_sizes()["engine_key_branches"] == 0
    assert b.table_sizes()["engine_incoming"] == 0
    sent = handle.request  # what a CANCEL copies, kept here (the TU's business)
    gone = weakref.ref(handle)
    del handle
    gc.collect()
    assert gone() is None, "the engine still holds the INVITE's handle"

    # A copy of the 2xx (the UAS repeats it until its ACK) still reaches a's TU, with where
    # the INVITE went: what the ACK is sent to again (RFC 3261 §13.2.2.4).
    incoming = received[0]
    incoming.send(incoming.response(200))
    async with asyncio.timeout(5):
        await copied.wait()
    assert [(dest, r.status) for dest, r in late] == [(target, 200)]

    # A CANCEL after the final response is answered 200 and changes nothing (RFC 3261 §9.2).
    cancel = a.send_request(build_cancel(sent), target)
    async with asyncio.timeout(5):
        assert (await cancel).status == 200
    assert cancels == []
    assert not incoming.cancelled
