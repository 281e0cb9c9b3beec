"""Call ladders: the bounded per-call list of SIP message summaries (sbc/b2bua/ladder.py), the
manager's tap that fills it and the engine's tap; credentials never kept."""

from __future__ import annotations

import asyncio
import dataclasses
import http
import ipaddress
import json

import pytest
import structlog

from sbc.b2bua.calls import CallManager, hung_up_by
from sbc.b2bua.ladder import (
    REDACTED,
    Ladder,
    LadderEntry,
    _head,
    gap_index,
    ladder_json,
    packed_ladder,
    summarize,
    unpacked_ladder,
)
from sbc.media.base import PassthroughBackend
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import parse_uri
from tests.unit.call_harness import LIMIT, PBX_SOURCE, FakeEngine, a_invite, config
from tests.unit.engine_sink import engine_without_sockets

SECRET_DIGEST = (
    'Digest username="6001auth", realm="3CXPhoneSystem", nonce="414d535c0d7a1",'
    ' uri="sip:101@10.0.0.5", response="f00dfacecafe1234deadbeef00112233", algorithm=MD5'
)
RETELL = Destination("tcp", "192.0.2.9", 5060)
LOCAL = "udp:10.0.0.5:5060"


def bye(*extra: tuple[str, str], seq: int = 2) -> Request:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbye"),
            ("From", "<sip:02071234567@10.0.0.1>;tag=pbxtag"),
            ("To", "<sip:101@10.0.0.5>;tag=ours"),
            ("Call-ID", "pbx-call@10.0.0.1"),
            ("CSeq", f"{seq} BYE"),
            *extra,
        ]
    )
    return Request("BYE", parse_uri("sip:101@10.0.0.5:5060"), headers)


def in_entry(message: Request | Response, at: float = 0.0) -> LadderEntry:
    return summarize("in", message, PBX_SOURCE, LOCAL, leg="caller", peer="pbx", at=at)


# -- summaries ------------------------------------------------------------------------------------


def test_a_summary_keeps_the_first_line_call_id_cseq_and_addresses() -> None:
    entry = in_entry(bye(), at=12.5)
    assert entry == LadderEntry(
        at=12.5,
        direction="in",
        leg="caller",
        peer="pbx",
        source="udp:10.0.0.1:5060",
        destination=LOCAL,
        first_line="BYE sip:101@10.0.0.5:5060",
        call_id="pbx-call@10.0.0.1",
        cseq="2 BYE",
    )
    assert entry.label == "BYE"
    out = summarize(
        "out", build_response(bye(), 200), PBX_SOURCE, LOCAL, leg="caller", peer="pbx", at=1
    )
    assert (out.source, out.destination, out.first_line, out.label) == (
        LOCAL,
        "udp:10.0.0.1:5060",
        "SIP/2.0 200 OK",
        "200 OK",
    )
    assert LadderEntry.from_dict(json.loads(json.dumps(entry.as_dict()))) == entry


def test_credentials_are_named_never_kept() -> None:
    message = bye(("Authorization", SECRET_DIGEST), ("Proxy-Authorization", SECRET_DIGEST))
    entry = in_entry(message)
    assert entry.credentials == "Authorization, Proxy-Authorization"
    stored = json.dumps(entry.as_dict())
    for secret in ("6001auth", "414d535c0d7a1", "f00dfacecafe", "3CXPhoneSystem"):
        assert secret not in stored


def test_a_password_in_the_request_uri_is_redacted() -> None:
    message = dataclasses.replace(bye(), uri=parse_uri("sip:101:hunter2@10.0.0.5"))
    entry = in_entry(message)
    assert entry.first_line == f"BYE sip:101:{REDACTED}@10.0.0.5"


# -- the bounded ladder ---------------------------------------------------------------------------


def test_the_ladder_keeps_the_first_and_the_last_messages() -> None:
    ladder = Ladder(12)  # tail: 3 (12 // 4), head: 9
    messages = [bye(seq=n) for n in range(1, 31)]
    for n, message in enumerate(messages, start=1):
        ladder.add(in_entry(message, at=n), message)
    kept = [entry.at for entry in ladder.entries()]
    assert kept == [*range(1, 10), 28, 29, 30]
    assert ladder.omitted == 18
    assert gap_index(len(kept), ladder.omitted) == 9
    assert gap_index(len(kept), 0) is None


def test_a_tiny_ladder_keeps_the_first_messages_only() -> None:
    ladder = Ladder(2)
    for n in range(1, 6):
        message = bye(seq=n)
        ladder.add(in_entry(message, at=n), message)
    assert [e.at for e in ladder.entries()] == [1, 2]
    assert ladder.omitted == 3
    assert gap_index(2, 3) == 2  # after the last one kept
    empty = Ladder(0)
    empty.add(in_entry(bye()), bye())
    assert (len(empty), empty.omitted) == (0, 1)


def test_the_same_message_again_is_a_retransmission() -> None:
    ladder = Ladder(10)
    first = bye()
    ladder.add(in_entry(first, at=1), first)
    ladder.add(in_entry(first, at=2), first)
    ok = build_response(first, 200)
    out = summarize("out", ok, PBX_SOURCE, LOCAL, leg="caller", peer="pbx", at=3)
    ladder.add(out, ok)
    ladder.add(dataclasses.replace(out, at=4), ok)
    another = bye(seq=3)  # a new transaction, not a copy
    ladder.add(in_entry(another, at=5), another)
    assert [e.retransmission for e in ladder.entries()] == [False, True, False, True, False]


def noted(messages: list[tuple[str, Request | Response]], limit: int) -> Ladder:
    ladder = Ladder(limit)
    for n, (direction, message) in enumerate(messages, start=1):
        ladder.note(direction, message, PBX_SOURCE, LOCAL, leg="caller", peer="pbx", at=n)
    return ladder


def eager(messages: list[tuple[str, Request | Response]], limit: int) -> Ladder:
    ladder = Ladder(limit)
    for n, (direction, message) in enumerate(messages, start=1):
        entry = summarize(direction, message, PBX_SOURCE, LOCAL, leg="caller", peer="pbx", at=n)
        ladder.add(entry, message)
    return ladder


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 8, 12, 200])
def test_noted_messages_summarised_later_are_the_entries_an_eager_ladder_keeps(
    limit: int,
) -> None:
    """The tap keeps each message as it is and summarises when the ladder is read: the same
    entries, marks and omitted count, whatever the bound (a long call's repeats included)."""
    messages: list[tuple[str, Request | Response]] = []
    for seq in range(1, 25):
        request = bye(seq=seq % 7)  # CSeq 0..6 again and again: retransmission marks
        messages += [("in", request), ("out", build_response(request, 200)), ("in", request)]
    lazy, reference = noted(messages, limit), eager(messages, limit)
    assert lazy.entries() == reference.entries()
    assert (len(lazy), lazy.omitted) == (len(reference), reference.omitted)
    assert any(e.retransmission for e in reference.entries()) or limit < 4


def test_snapshot_entries_are_summarised_when_first_read() -> None:
    ok_request = bye(("Proxy-Authorization", SECRET_DIGEST))
    messages: list[tuple[str, Request | Response]] = [
        ("in", ok_request),
        ("out", build_response(ok_request, 200)),
        ("in", ok_request),
    ]
    ladder = noted(messages, 10)
    deferred = ladder.snapshot()
    assert ladder._pending == 3  # nothing summarised yet
    assert [e.as_dict() for e in deferred] == [e.as_dict() for e in eager(messages, 10).entries()]
    assert ladder._pending == 0
    assert deferred == eager(messages, 10).entries()
    assert [e.retransmission for e in deferred] == [False, False, True]
    assert deferred[0].credentials == "Proxy-Authorization"
    assert SECRET_DIGEST not in repr(deferred)
    assert deferred[1].label == "200 OK"
    assert ladder.snapshot() == ladder.entries()  # once summarised, the same entries


def test_the_ladder_keeps_no_message_only_its_summary_fields() -> None:
    """A held call's ladder must not keep its messages alive (RSS per held call)."""
    request = bye(("Authorization", SECRET_DIGEST), ("Proxy-Authorization", SECRET_DIGEST))
    ladder = noted([("in", request), ("out", build_response(request, 200))], 10)
    # Noted messages wait in the ladder's columns until it is read.
    kept = [*(ladder._fields or ()), *(value for item in ladder._head for value in item)]  # type: ignore[union-attr]
    assert len(kept) == 12 and len(ladder) == 2
    assert not any(isinstance(value, Request | Response | Headers) for value in kept)
    assert SECRET_DIGEST not in repr(kept)
    assert ladder.entries()[0].credentials == "Authorization, Proxy-Authorization"


def test_the_first_field_of_a_name_is_the_one_summarised() -> None:
    request = bye(("Via", "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKsecond"))
    again = bye(("Via", "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKother"))
    ladder = noted([("in", request), ("in", again)], 10)
    # the top Via (the same in both) makes them one message seen twice
    assert [e.retransmission for e in ladder.entries()] == [False, True]


@pytest.mark.parametrize(
    "entries",
    [
        (),
        (
            LadderEntry(1, "in", "caller", "pbx", "udp:a", "udp:b", "INVITE sip:x", "c", "1 X"),
            LadderEntry(
                1765000000.123456,
                "out",
                "agent",
                "retell",
                "tcp:[::1]:5060",
                "udp:b",
                'SIP/2.0 200 O\\K "quoted" \u00e9\u4e2d\ud800\t\x01',
                "id@h",
                "2 BYE",
                retransmission=True,
                credentials="Authorization",
            ),
            LadderEntry(float("nan"), "in", "x", "y", "", "", "", "", ""),
            LadderEntry(float("inf"), "in", "x", "y", "", "", "", "", ""),
        ),
        (LadderEntry(2.5, "in", None, "y", "", "", "", "", ""),),  # type: ignore[arg-type]
    ],
)
def test_ladder_json_is_what_json_dumps_writes(entries: tuple[LadderEntry, ...]) -> None:
    reference = json.dumps(
        [e.as_dict() for e in entries], separators=(",", ":"), ensure_ascii=False, default=str
    )
    assert ladder_json(entries) == reference
    assert ladder_json(list(entries)) == reference


def test_a_snapshots_json_is_that_of_its_entries_read_or_not() -> None:
    request = bye(("Proxy-Authorization", SECRET_DIGEST))
    messages: list[tuple[str, Request | Response]] = [
        ("in", request),
        ("out", build_response(request, 200)),
        ("in", request),
    ]
    unread = noted(messages, 10).snapshot()
    text = ladder_json(unread)
    read = noted(messages, 10).snapshot()
    entries = tuple(read)
    assert text == ladder_json(read) == ladder_json(entries)
    assert [LadderEntry.from_dict(d) for d in json.loads(text)] == list(entries)
    assert SECRET_DIGEST not in text


def a_call_of_messages() -> list[tuple[str, Request | Response]]:
    """Requests and responses both ways, a retransmission, credentials, a password in the
    Request-URI, a reason that is not ASCII, a response without reason."""
    invite = Request(
        "INVITE",
        parse_uri("sip:101:secret@10.0.0.5:5060;transport=udp"),
        Headers(
            [
                ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinv"),
                ("From", "<sip:02071234567@10.0.0.1>;tag=pbxtag"),
                ("To", "<sip:101@10.0.0.5>"),
                ("Call-ID", "pbx-call@10.0.0.1"),
                ("CSeq", "1 INVITE"),
                ("Proxy-Authorization", SECRET_DIGEST),
            ]
        ),
    )
    ringing = build_response(invite, 180)
    odd = build_response(invite, 499, reason='Zoë\'s "odd" reason ☎')
    empty = dataclasses.replace(build_response(invite, 200), reason="")
    request = bye(("Authorization", SECRET_DIGEST))
    return [
        ("in", invite),
        ("out", ringing),
        ("out", odd),
        ("out", empty),
        ("in", invite),  # a retransmission
        ("in", request),
        ("out", build_response(request, 200)),
        ("in", request),
    ]


def test_a_packed_ladder_reads_back_as_the_json_of_its_entries() -> None:
    """What the records store for most calls (Ladder.packed, summarised when read) gives the
    same entries as the JSON of the summaries made when written (the format before)."""
    messages = a_call_of_messages()
    packed = noted(messages, 200).packed()
    assert packed is not None
    reference = json.loads(ladder_json(eager(messages, 200).entries()))
    assert unpacked_ladder(packed) == reference
    assert [e["retransmission"] for e in reference] == [False] * 4 + [True, False, False, True]
    assert reference[0]["first_line"] == f"INVITE sip:101:{REDACTED}@10.0.0.5:5060;transport=udp"
    assert reference[3]["first_line"] == "SIP/2.0 200"
    assert "secret" not in packed and SECRET_DIGEST not in packed
    assert noted([], 10).packed() is None  # nothing noted: "[]" as before


def test_only_a_ladder_nothing_was_summarised_of_is_packed() -> None:
    messages = a_call_of_messages()
    snapshot = noted(messages, 200).snapshot()
    assert packed_ladder(snapshot) is not None
    list(snapshot)  # read: its summaries are made, the columns let go
    assert packed_ladder(snapshot) is None
    assert packed_ladder(eager(messages, 200).entries()) is None  # plain entries
    assert noted(messages, 4).packed() is None  # a long call: a tail and omitted messages
    assert eager(messages, 200).packed() is None  # entries added whole
    unreadable = [
        bye(("Call-ID", "x")),  # a plain Call-ID
        Request("BYE", parse_uri("sip:101@10.0.0.5"), Headers([("Call-ID", "a\x1fb")])),
        Request("BYE", parse_uri("sip:101@10.0.0.5"), Headers([("CSeq", "1 \udcff")])),
    ]
    for message in unreadable[1:]:  # a separator, a lone surrogate: the JSON instead
        assert noted([("in", message)], 10).packed() is None
    assert noted([("in", unreadable[0])], 10).packed() is not None
    # a status that is no plain number (repr() would not read back): the JSON instead
    enum_status = dataclasses.replace(build_response(bye(), 200), status=http.HTTPStatus.OK)
    assert noted([("out", enum_status)], 10).packed() is None


@pytest.mark.parametrize(
    "text",
    ["", "1\x1f\x1f", "2\x1f00\x1f", "2\x1fzz\x1f", "2\x1f" + "00" * 8 + "\x1f", "[]"],
)
def test_what_is_no_packed_ladder_is_refused(text: str) -> None:
    assert [_head(repr(v)) for v in (200, "INVITE", "IT'S", "a\\b", "é")] == [
        200,
        "INVITE",
        "IT'S",
        "a\\b",
        "é",
    ]
    with pytest.raises(ValueError):
        unpacked_ladder(text)
    good = noted(a_call_of_messages()[:1], 10).packed()
    assert good is not None
    parts = good.split("\x1f")
    for bad in (
        [*parts[:4], "__import__('os')", *parts[5:]],  # status or method: literals only
        [*parts[:4], "2.5", *parts[5:]],
        [*parts[:3], "in\x1ex", *parts[4:]],  # where: five texts
    ):
        with pytest.raises(ValueError):
            unpacked_ladder("\x1f".join(bad))


# -- the manager's tap ----------------------------------------------------------------------------


async def test_the_manager_files_every_message_under_its_call_and_leg() -> None:
    engine = FakeEngine()
    engine.accept = frozenset()  # type: ignore[attr-defined]
    manager = CallManager(
        engine,  # type: ignore[arg-type]
        config(trusted=(ipaddress.ip_network("10.0.0.0/24"),)),
        PassthroughBackend(),
        new_uuid=lambda: "uuid-1",
        ladder_messages=50,
    )
    manager.attach()
    assert engine.on_message == manager.handle_message  # type: ignore[attr-defined]
    invite = a_invite(("Proxy-Authorization", SECRET_DIGEST))
    manager.handle_message("in", invite, PBX_SOURCE)  # tapped before the call exists
    manager.handle_message("in", bye(), PBX_SOURCE)  # no call has that dialog: not kept
    manager.handle_request(IncomingRequest(engine, "pbx-invite", invite, PBX_SOURCE, None))
    manager.handle_message("out", build_response(invite, 100), PBX_SOURCE)
    await engine.wait(lambda: engine.requests("INVITE"))
    (b_invite,) = engine.requests("INVITE")
    manager.handle_message("out", b_invite.request, RETELL)
    refused = build_response(b_invite.request, 486, to_tag="rt")
    manager.handle_message("in", refused, RETELL)
    manager.handle_message("in", refused, RETELL)  # a copy
    b_invite.deliver(486, to_tag="rt")
    await asyncio.wait_for(manager.wait_idle(), LIMIT)
    manager.handle_message("in", refused, RETELL)  # after the call: nowhere to go
    (record,) = manager.records
    rows = [(e.direction, e.leg, e.peer, e.label, e.retransmission) for e in record.ladder]
    assert rows == [
        ("in", "caller", "pbx", "INVITE", False),
        ("out", "caller", "pbx", "100 Trying", False),
        ("out", "agent", "retell", "INVITE", False),
        ("in", "agent", "retell", "486 Busy Here", False),
        ("in", "agent", "retell", "486 Busy Here", True),
    ]
    assert record.ladder[0].credentials == "Proxy-Authorization"
    assert record.ladder[2].destination == "tcp:192.0.2.9:5060"
    assert record.ladder[2].source == "tcp:10.0.0.5:5060"
    assert (record.hung_up_by, record.end_reason) == ("retell", "retell:486")
    assert record.caller_name == "Alice" and record.retell_number == "+14155550100"
    assert dict(record.x_headers)["X-Caller-Number"] == "+442071234567"
    assert record.media == {"backend": "passthrough", "call_id": "uuid-1", "sides": {}}
    assert manager._ladder_legs == {} and manager._ladders == {}
    await manager.stop()


def test_without_ladders_the_manager_leaves_the_tap_unset() -> None:
    engine = FakeEngine()
    engine.accept = frozenset()  # type: ignore[attr-defined]
    manager = CallManager(engine, config(), PassthroughBackend())  # type: ignore[arg-type]
    manager.attach()
    assert getattr(engine, "on_message", None) is None


@pytest.mark.parametrize(
    ("reason", "side"),
    [
        ("pbx_bye", "pbx"),
        ("retell_bye", "retell"),
        ("pbx_cancel", "pbx"),
        ("retell:486", "retell"),
        ("pbx:603", "pbx"),
        ("max_duration", "sbc"),
        ("answer_timeout", "sbc"),
        ("refused:488", "sbc"),
        ("transferred", "sbc"),
        ("pbx_lost", "sbc"),
        ("shutdown", "sbc"),
    ],
)
def test_who_hung_up(reason: str, side: str) -> None:
    assert hung_up_by(reason) == side


# -- the engine's tap -----------------------------------------------------------------------------

OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n"
    b"From: <sip:sipp@127.0.0.1:5070>;tag=1\r\n"
    b"To: <sip:127.0.0.1:5060>\r\n"
    b"Call-ID: tap-1@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Authorization: " + SECRET_DIGEST.encode() + b"\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)


async def test_the_engine_taps_what_it_receives_and_transmits() -> None:
    engine, sink = engine_without_sockets()
    seen: list[tuple[str, str, Destination]] = []
    engine.on_message = lambda d, m, p: seen.append((d, m.headers.get("CSeq") or "", p))
    engine.transports._datagram_received(OPTIONS, ("127.0.0.1", 5070))
    peer = Destination("udp", "127.0.0.1", 5070)
    assert [(d, c) for d, c, _ in seen] == [("in", "1 OPTIONS"), ("out", "1 OPTIONS")]
    assert all(p == peer for _, _, p in seen)
    assert len(sink.sent) == 1 and sink.sent[0].startswith(b"SIP/2.0 200 ")


async def test_a_failing_tap_stops_no_message() -> None:
    engine, sink = engine_without_sockets()

    def broken(direction: str, message: object, peer: object) -> None:
        raise RuntimeError("bug in a tap")

    engine.on_message = broken
    with structlog.testing.capture_logs() as logs:
        engine.transports._datagram_received(OPTIONS, ("127.0.0.1", 5070))
    assert len(sink.sent) == 1
    assert [e["event"] for e in logs].count("message_tap_failed") == 2
