"""NgClient request/reply logic against an in-memory transport (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest

from sbc.media.bencode import decode, encode, to_text
from sbc.media.rtpengine import (
    DEFAULT_OFFER_OPTIONS,
    NgClient,
    RtpengineError,
    RtpengineTimeout,
    _side_counters,
    rtp_totals,
)

Responder = Callable[[bytes, bytes, int], "bytes | list[bytes] | None"]


class FakeTransport:
    """Records datagrams; a responder decides what comes back (cookie, body, attempt)."""

    def __init__(self, client: NgClient, responder: Responder) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.responder = responder
        self.protocol = client.attach(cast(asyncio.DatagramTransport, self))

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)
        cookie, _, body = data.partition(b" ")
        replies = self.responder(cookie, body, len(self.sent))
        if replies is None:
            return
        for reply in replies if isinstance(replies, list) else [replies]:
            asyncio.get_running_loop().call_soon(
                self.protocol.datagram_received, reply, ("127.0.0.1", 1)
            )

    def close(self) -> None:
        self.closed = True


def reply(cookie: bytes, **fields: Any) -> bytes:
    return cookie + b" " + encode(fields)


def make(responder: Responder, **kwargs: Any) -> tuple[NgClient, FakeTransport]:
    client = NgClient(("127.0.0.1", 2223), token="tok", **kwargs)
    return client, FakeTransport(client, responder)


async def test_request_wire_format_and_cookie_per_request() -> None:
    client, transport = make(lambda c, b, n: reply(c, result="pong"))
    await client.ping()
    await client.ping()
    assert transport.sent == [b"tok_1 d7:command4:pinge", b"tok_2 d7:command4:pinge"]
    assert client.requests_sent == 2
    assert client.retransmissions == 0


async def test_offer_sends_call_identity_sdp_and_flags() -> None:
    client, transport = make(lambda c, b, n: reply(c, result="ok", sdp="v=0\r\nrewritten"))
    sdp = await client.offer("cid", "a", "v=0\r\n", to_tag="b")
    assert sdp == "v=0\r\nrewritten"
    sent = cast(dict[str, Any], to_text(decode(transport.sent[0].partition(b" ")[2])))
    assert sent == {
        **DEFAULT_OFFER_OPTIONS,
        "command": "offer",
        "call-id": "cid",
        "from-tag": "a",
        "to-tag": "b",
        "sdp": "v=0\r\n",
    }
    assert sent["replace"] == ["origin", "session-connection"]
    assert sent["ICE"] == "remove"


async def test_answer_and_delete_and_query_messages() -> None:
    def respond(cookie: bytes, body: bytes, n: int) -> bytes:
        command = cast(dict[str, Any], to_text(decode(body)))["command"]
        if command == "answer":
            return reply(cookie, result="ok", sdp="v=0 answer")
        return reply(cookie, result="ok", totals={"RTP": {"packets": 7, "bytes": 70}})

    client, transport = make(respond)
    assert await client.answer("cid", "a", "b", "v=0") == "v=0 answer"
    deleted = await client.delete("cid", "a")
    assert rtp_totals(deleted).packets == 7
    assert rtp_totals(deleted).errors == 0
    await client.query("cid")
    bodies = [cast(dict[str, Any], to_text(decode(d.partition(b" ")[2]))) for d in transport.sent]
    assert bodies[0]["to-tag"] == "b"
    assert bodies[1] == {
        "command": "delete",
        "call-id": "cid",
        "from-tag": "a",
        "delete-delay": 0,
    }
    assert bodies[2] == {"command": "query", "call-id": "cid"}


async def test_retransmits_the_same_bytes_until_answered() -> None:
    client, transport = make(
        lambda c, b, n: reply(c, result="pong") if n == 3 else None, timeout=0.01, tries=3
    )
    await client.ping()
    assert len(transport.sent) == 3
    assert len(set(transport.sent)) == 1  # same cookie: rtpengine sees a retransmission
    assert client.retransmissions == 2


async def test_times_out_after_all_tries_naming_the_socket_error() -> None:
    client, transport = make(lambda c, b, n: None, timeout=0.01, tries=2)
    client._protocol.error_received(ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(RtpengineTimeout, match=r"after 2 tries .*Connection refused") as info:
        await client.ping()
    assert info.value.command == "ping"
    assert info.value.status == 503
    assert len(transport.sent) == 2
    assert client._pending == {}


async def test_late_duplicate_and_unknown_replies_are_counted_as_stray() -> None:
    def respond(cookie: bytes, body: bytes, n: int) -> list[bytes]:
        ok = reply(cookie, result="pong")
        return [ok, ok, reply(b"other", result="pong"), b"no-space-at-all"]

    client, _ = make(respond)
    await client.ping()
    for _ in range(3):
        await asyncio.sleep(0)  # let the queued callbacks of this same iteration run
    assert client.stray_replies == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (encode({"result": "error", "error-reason": "Unknown call-id"}), "Unknown call-id"),
        (encode({"result": "error"}), "no error-reason given"),
        (encode({"result": "load limit"}), "unexpected result 'load limit'"),
        (encode({"sdp": "x"}), "unexpected result None"),
        (encode(["not", "a", "dict"]), "not a dictionary"),
        (b"d6:result", "malformed reply"),
    ],
)
async def test_bad_replies_raise_a_clear_error(body: bytes, message: str) -> None:
    client, _ = make(lambda c, b, n: c + b" " + body)
    with pytest.raises(RtpengineError, match=message):
        await client.query("cid")


async def test_offer_reply_without_sdp_and_ping_without_pong_are_errors() -> None:
    client, _ = make(lambda c, b, n: reply(c, result="ok"))
    with pytest.raises(RtpengineError, match="no sdp"):
        await client.offer("cid", "a", "v=0")
    with pytest.raises(RtpengineError, match="instead of 'pong'"):
        await client.ping()


async def test_close_cancels_waiters_and_refuses_new_requests() -> None:
    client, transport = make(lambda c, b, n: None, timeout=5)
    task = asyncio.create_task(client.ping())
    await asyncio.sleep(0)
    assert len(client._pending) == 1
    client.close()
    assert transport.closed
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(RuntimeError, match="not started"):
        await client.ping()


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="tries"):
        NgClient(("127.0.0.1", 1), tries=0)
    with pytest.raises(ValueError, match="timeout"):
        NgClient(("127.0.0.1", 1), timeout=0)


def test_random_token_differs_between_clients() -> None:
    a = NgClient(("127.0.0.1", 1))._next_cookie()
    b = NgClient(("127.0.0.1", 1))._next_cookie()
    assert a != b
    assert a.endswith(b"_1")


def test_side_counters_read_query_replies_and_tolerate_missing_parts() -> None:
    query = {
        "tags": {
            "a": {
                "medias": [
                    {
                        "streams": [
                            {
                                "local port": 30000,
                                "flags": ["RTP", "filled"],
                                "last packet": 100,
                                "stats": {"packets": 5, "bytes": 860, "errors": 0},
                            },
                            {"local port": 30001, "flags": ["RTCP"], "last packet": 90},
                            {"local port": 30002, "flags": ["RTP"], "stats": {"packets": 9}},
                            "junk",
                        ]
                    },
                    "junk",
                ]
            },
            "b": "junk",
        }
    }
    side_a = _side_counters(query, "a")
    assert side_a == {
        "local_port": 30000,
        "rtp": {"packets": 5, "bytes": 860, "errors": 0},
        "rtcp": {"packets": 0, "bytes": 0, "errors": 0},
        "last_packet": 100,
    }
    empty: dict[str, Any] = {"local_port": None, "rtp": {}, "rtcp": {}, "last_packet": None}
    assert _side_counters(query, "b") == empty
    assert _side_counters({}, "a") == empty
    assert rtp_totals({"totals": "junk"}).packets == 0
    assert rtp_totals({"totals": {"RTP": {"packets": "x"}}}).packets == 0
