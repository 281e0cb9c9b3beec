"""Builders shared by the transaction tests (no tests here)."""

from __future__ import annotations

from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize
from sbc.sip.transaction import TransactionLayer, build_response
from sbc.sip.uri import parse_uri

UAC = ("192.0.2.1", 5060)
UAS = ("192.0.2.2", 5060)


def make_request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bKaaa",
    cseq: int = 1,
    cseq_method: str | None = None,
    to_tag: str | None = None,
    via_host: str = "192.0.2.1:5060",
    call_id: str = "call-1@192.0.2.1",
    uri: str = "sip:bob@biloxi.example.com",
    extra: tuple[tuple[str, str], ...] = (),
) -> Request:
    via = f"SIP/2.0/UDP {via_host}" + (f";branch={branch}" if branch is not None else "")
    to = "Bob <sip:bob@biloxi.example.com>" + (f";tag={to_tag}" if to_tag else "")
    return Request(
        method,
        parse_uri(uri),
        Headers(
            (
                ("Via", via),
                ("Max-Forwards", "70"),
                ("From", "Alice <sip:alice@atlanta.example.com>;tag=1928301774"),
                ("To", to),
                ("Call-ID", call_id),
                ("CSeq", f"{cseq} {cseq_method or method}"),
                *extra,
            )
        ),
    )


def reply(request: Request, status: int, to_tag: str | None = "tt1") -> Response:
    return build_response(request, status, to_tag=to_tag)


def wire(message: Request | Response) -> Request | Response:
    """Through bytes and back, as the shell would."""
    return parse_message(serialize(message))


def on_wire(
    out: list[tuple[object, Request | Response]],
) -> list[tuple[object, bytes]]:
    """What ``datagrams_to_send()`` gave, as (destination, bytes): a retired transaction
    resends what it sent from the bytes it kept, a message equal to the first on the wire."""
    return [(dest, serialize(message)) for dest, message in out]


def pump(src: TransactionLayer, dst: TransactionLayer, *, source: object, now: float) -> int:
    """Deliver everything ``src`` wants to send to ``dst``; returns how many messages."""
    out = src.datagrams_to_send()
    for _, message in out:
        dst.receive(wire(message), source=source, reliable=False, now=now)
    return len(out)


def run_until(layer: TransactionLayer, end: float) -> list[float]:
    """Fire timers up to ``end``; returns the times at which something was sent."""
    times: list[float] = []
    while True:
        deadline = layer.next_deadline()
        if deadline is None or deadline > end:
            return times
        layer.handle_timer(deadline)
        if layer.datagrams_to_send():
            times.append(deadline)
