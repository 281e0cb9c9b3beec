"""Round 8 (call layer, engine, records): each cut gives what the code before it gave.

* An ACK with an RFC 3261 branch reaches the transaction layer and the call as it came (no
  stamped copy of it); every other request is stamped as before, an RFC 2543 ACK included
  (its INVITE's transaction is found by the whole stamped Via).
* A packed ladder's Request-URI and address texts come from remembered texts: the same text
  ``str()`` gives, for any URI and address, also once the memo was emptied.
* A None value of a record's row is written NULL through the adapter registered for it.
* A request sent makes no future for :meth:`OutgoingRequest.wait_sent` until one waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua import ladder as ladder_module
from sbc.b2bua.events import CallRecord
from sbc.b2bua.ladder import Ladder, _pack_columns
from sbc.net.addresses import Destination
from sbc.net.handles import IncomingRequest, OutgoingRequest
from sbc.ops.records import COLUMNS, RecordWriter, _counters, row_of
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import SipUri, parse_uri
from tests.unit.call_harness import a_invite
from tests.unit.engine_sink import engine_without_sockets

# -- ACKs as they came -------------------------------------------------------------------------


PEER = ("192.0.2.7", 40000)  # the source port differs from the Via's: rport is filled

INVITE = (
    "INVITE sip:101@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.7:5060;branch={branch};rport\r\n"
    "From: <sip:pbx@192.0.2.7>;tag=f1\r\n"
    "To: <sip:101@127.0.0.1>{to_tag}\r\n"
    "Call-ID: c1@192.0.2.7\r\n"
    "CSeq: 1 {method}\r\n"
    "Contact: <sip:pbx@192.0.2.7:5060>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)


def datagram(method: str, branch: str, to_tag: str = "") -> bytes:
    tag = f";tag={to_tag}" if to_tag else ""
    text = INVITE.format(method=method, branch=branch, to_tag=tag)
    if method == "ACK":
        text = text.replace("INVITE sip:", "ACK sip:", 1)
    return text.encode()


async def test_a_2xx_ack_reaches_the_call_as_it_came_an_invite_stamped() -> None:
    engine, sink = engine_without_sockets()
    incoming: list[IncomingRequest] = []
    acks: list[Request] = []
    engine.on_request = incoming.append
    engine.on_ack = lambda request, source: acks.append(request)
    engine.transports._datagram_received(datagram("INVITE", "z9hG4bKinv"), PEER)
    assert len(incoming) == 1
    # The INVITE is stamped (where its answers go), as before.
    via = incoming[0].request.headers.get("Via")
    assert via == "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKinv;rport=40000;received=192.0.2.7"
    incoming[0].respond(200, headers=(("Contact", "<sip:101@127.0.0.1:5060>"),))
    to_tag = incoming[0].local_tag
    assert to_tag is not None and sink.sent[-1].startswith(b"SIP/2.0 200 OK")
    assert b";rport=40000;received=192.0.2.7" in sink.sent[-1]
    ack = datagram("ACK", "z9hG4bKack", to_tag)
    engine.transports._datagram_received(ack, PEER)
    assert len(acks) == 1
    # Not stamped: the same Via text and the same parsed Via as the ACK that came.
    assert acks[0].headers.get("Via") == "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKack;rport"
    assert acks[0].top_via.branch == "z9hG4bKack" and acks[0].top_via.received is None
    assert engine.stats.requests_received == 2 and engine.stats.requests_rejected == 0


async def test_an_ack_of_a_failure_ends_its_transaction_3261_and_2543_alike() -> None:
    """The ACK of a non-2xx belongs to the INVITE's transaction: an RFC 3261 one is found by
    branch and sent-by (not stamped), an RFC 2543 one by the whole Via as stamped (stamped,
    as before): either way the 486 is not sent again and no ACK reaches the call."""
    for branch in ("z9hG4bKfail", "old2543"):
        engine, sink = engine_without_sockets()
        incoming: list[IncomingRequest] = []
        acks: list[Request] = []
        engine.on_request = incoming.append
        engine.on_ack = lambda request, source, acks=acks: acks.append(request)
        engine.transports._datagram_received(datagram("INVITE", branch), PEER)
        incoming[0].respond(486)
        to_tag = incoming[0].local_tag
        assert to_tag is not None and sink.sent[-1].startswith(b"SIP/2.0 486")
        key = incoming[0].key
        assert engine.layer.server_state(key) is not None
        engine.transports._datagram_received(datagram("ACK", branch, to_tag), PEER)
        assert acks == [], branch  # absorbed by the INVITE's transaction
        # Confirmed (Timer I) or, over UDP with the ACK matched, no longer Completed: the
        # INVITE arriving again is not answered 486 again once the ACK came.
        sent = len(sink.sent)
        engine.transports._datagram_received(datagram("ACK", branch, to_tag), PEER)
        assert len(sink.sent) == sent and acks == [], branch
        assert str(engine.layer.server_state(key)) != "ServerState.COMPLETED", branch


async def test_an_ack_without_a_readable_via_is_dropped_as_before() -> None:
    engine, _ = engine_without_sockets()
    acks: list[Request] = []
    engine.on_ack = lambda request, source: acks.append(request)
    broken = datagram("ACK", "z9hG4bKx", "t1").replace(
        b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKx;rport\r\n", b"Via: ,\r\n"
    )
    engine.transports._datagram_received(broken, PEER)
    assert acks == [] and engine.stats.requests_rejected == 1


# -- packed ladders' texts ---------------------------------------------------------------------

_hosts = st.sampled_from(["127.0.0.1", "10.0.0.5", "2001:db8::1", "sip.example.com"])
_ports = st.one_of(st.none(), st.integers(min_value=1, max_value=65535))
_users = st.one_of(st.none(), st.sampled_from(["101", "+14155550100", "a%20b"]))
_params = st.lists(
    st.tuples(st.sampled_from(["transport", "lr", "x"]), st.sampled_from([None, "udp", "1"])),
    max_size=2,
).map(tuple)
_uris = st.builds(
    SipUri,
    scheme=st.sampled_from(["sip", "sips"]),
    user=_users,
    password=st.none(),
    host=_hosts,
    port=_ports,
    params=_params,
)
_addresses = st.builds(
    Destination,
    transport=st.sampled_from(["udp", "tcp", "tls"]),
    host=_hosts,
    port=st.integers(min_value=1, max_value=65535),
    connection_id=st.one_of(st.none(), st.integers(min_value=1, max_value=9)),
    local=st.one_of(st.none(), st.just("retell")),
)


def _columns(tails: list[object], addresses: list[object]) -> list[object]:
    fields: list[object] = []
    for n, (tail, address) in enumerate(zip(tails, addresses, strict=True)):
        head: object = "INVITE" if type(tail) is SipUri else 200
        where = ("in", "udp:127.0.0.1:5060", "caller", "pbx", "")
        fields += (where, head, tail, f"c{n}", "1 INVITE", address)
    return fields


def _reference(fields: list[object], times: array[float], idents: array[int]) -> str | None:
    """_pack_columns as it was: str() of every Request-URI and address."""
    n = len(times)
    out = list(fields)
    for i in range(n):
        out[6 * i + 2] = str(out[6 * i + 2])
        out[6 * i + 5] = str(out[6 * i + 5])
    # The strings are then what the memo gives: the text must be the same.
    return _pack_columns(out, times, idents)


@given(st.lists(st.tuples(st.one_of(_uris, st.just("OK")), _addresses), max_size=12))
def test_remembered_texts_are_what_str_gives(messages: list[tuple[object, object]]) -> None:
    tails = [tail for tail, _ in messages]
    addresses = [address for _, address in messages]
    fields = _columns(tails, addresses)
    times = array("d", [float(i) for i in range(len(messages))])
    idents = array("q", range(len(messages)))
    expected = _reference(fields, times, idents)
    if not messages:
        return
    assert _pack_columns(fields, times, idents) == expected
    assert _pack_columns(fields, times, idents) == expected  # from the memo this time


def test_the_memo_is_bounded_and_holds_its_uris() -> None:
    limit = ladder_module._TEXTS_LIMIT
    uris = [parse_uri(f"sip:{n}@10.0.0.5") for n in range(limit + 3)]
    addresses = [Destination("udp", "10.0.0.5", 1000 + n) for n in range(limit + 3)]
    for uri, address in zip(uris, addresses, strict=True):
        fields = _columns([uri], [address])
        text = _pack_columns(fields, array("d", [1.0]), array("q", [1]))
        assert text is not None and str(uri) in text and str(address) in text
    assert 0 < len(ladder_module._URI_TEXTS) <= limit
    assert 0 < len(ladder_module._ADDRESS_TEXTS) <= limit
    # Each remembered text is kept with its URI: its id cannot name another URI meanwhile.
    for key, (kept, text) in ladder_module._URI_TEXTS.items():
        assert id(kept) == key and str(kept) == text


def test_a_ladder_packs_the_texts_str_gives_for_an_address_not_a_destination() -> None:
    ladder = Ladder(10)
    invite = Request("INVITE", parse_uri("sip:101@10.0.0.5"), _headers())
    address: Destination = "udp:1.2.3.4:5"  # type: ignore[assignment]
    ladder.note("in", invite, address, "udp:10.0.0.5:5060", leg="caller", peer="pbx", at=1)
    packed = ladder.packed()
    assert packed is not None and packed.endswith("\x1fudp:1.2.3.4:5")


def _headers() -> Headers:
    return Headers([("Call-ID", "c1"), ("CSeq", "1 INVITE"), ("Via", "SIP/2.0/UDP h;branch=b")])


# -- NULLs through the adapter -----------------------------------------------------------------


async def test_none_values_are_written_null(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "calls.sqlite3")
    await writer.start()
    bare = CallRecord("u-1", "p", "", "", "101", 1.0, None, 2.0, 487, None, "pbx_cancel")
    assert await writer.write(dataclasses.replace(bare, human_call_id=""))
    await writer.close()
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    row = db.execute(
        "SELECT typeof(answered), typeof(human_call_id), typeof(retell_status),"
        " typeof(a_packets), typeof(media), answered IS NULL FROM calls"
    ).fetchone()
    db.close()
    assert row == ("null", "null", "null", "null", "null", 1)
    # The adapter is the one registered for None, and gives None (NULL) for it.
    adapter = sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)]
    assert adapter(None) is None


# -- no future nobody awaits -------------------------------------------------------------------


async def test_a_request_sent_makes_no_future_until_one_waits_for_it() -> None:
    request = a_invite()
    handle = OutgoingRequest(request, None, True)
    assert handle._sent is None
    handle.mark_sent()
    assert handle._sent is None  # nobody waited: none made
    assert await asyncio.wait_for(handle.wait_sent(), 1) is request  # sent already: at once
    later = OutgoingRequest(request, None, True)
    waiting = asyncio.ensure_future(later.wait_sent())
    await asyncio.sleep(0)
    assert not waiting.done() and later._sent is not None
    later.deliver(build_response(request, 200, to_tag="t"))  # a final marks it sent too
    assert await asyncio.wait_for(waiting, 1) is request
    later.mark_sent()  # idempotent


@pytest.mark.parametrize(
    "media",
    [
        {"backend": "passthrough", "call_id": "c", "sides": {}},
        {"backend": "x"},
        {"backend": "x", "sides": None},
        {"sides": {"a": {"rtp": {"packets": 3, "bytes": 9}}, "b": {}}},
        {"sides": {"a": {"rtp": {"packets": True, "bytes": 1.5}}, "b": {"rtp": {"bytes": 7}}}},
    ],
)
def test_a_rows_packet_counters_are_read_as_before(media: dict[str, Any]) -> None:
    bare = CallRecord("u-1", "p", "", "", "101", 1.0, None, 2.0, 487, None, "pbx_cancel")
    row = row_of(dataclasses.replace(bare, media=media))
    at = COLUMNS.index("a_packets")
    assert row[at : at + 4] == _counters(media)
