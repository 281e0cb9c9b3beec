"""Round 8b of issue 12 (obj): the objects built per message cost less, and are the same.

* ``quick_maker``: the hot classes (Via, CSeq, NameAddr, Request, Response, the transaction
  layer's events, DialogId) are built by a function that fills a plain twin of the class and
  then gives it the class: the object is exactly what the constructor makes (class, fields,
  equality, hash, repr, frozen, ``replace``), and the parser, the accessors and the
  transaction layer no longer call the classes' ``__init__``.
* ``parse_cseq`` remembers the values in the usual spelling by their text: the same value
  (shared) as the general parser, bounded, and it stops adding when full.
* ``parse_address`` parses the usual tagged ``<URI>`` value inline: what ``parse_name_addr``
  gives, errors included.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sdp.model import MediaDescription, Origin, SessionDescription
from sbc.sdp.parser import parse_sdp
from sbc.sip import fields, message, quickinit
from sbc.sip.dialog import DialogId
from sbc.sip.errors import ParseError
from sbc.sip.fields import CSeq, Via, _parse_cseq, parse_cseq
from sbc.sip.message import Request, Response, parse_address
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.quickinit import MAKERS, quick_maker
from sbc.sip.server_transaction import build_response
from sbc.sip.transaction import (
    AckReceived,
    RequestReceived,
    ResponseReceived,
    TransactionLayer,
    TransactionTerminated,
)
from sbc.sip.uri import NameAddr, parse_name_addr

# -- quick_maker -----------------------------------------------------------------------------

_HOT = (
    Via,
    CSeq,
    NameAddr,
    Request,
    Response,
    RequestReceived,
    AckReceived,
    ResponseReceived,
    TransactionTerminated,
    DialogId,
    Origin,
    MediaDescription,
    SessionDescription,
)


def test_the_hot_classes_have_makers() -> None:
    assert set(_HOT) <= set(MAKERS)


# Hashable values of a few kinds: the makers store whatever they are given, as __init__ does.
_ANY = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3), st.tuples(st.integers()))


@pytest.mark.parametrize("cls", _HOT, ids=[c.__name__ for c in _HOT])
@given(data=st.data())
def test_a_maker_builds_what_the_constructor_builds(cls: type[Any], data: st.DataObject) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    args = [data.draw(_ANY) for _ in names]
    made = MAKERS[cls](*args)
    built = cls(*args)
    assert type(made) is cls
    assert [getattr(made, n) for n in names] == args
    assert made == built and built == made
    assert hash(made) == hash(built) and repr(made) == repr(built)
    assert dataclasses.replace(made) == built
    assert not hasattr(made, "__dict__")
    for name in names:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(made, name, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(made, name)


def test_quick_maker_refuses_what_it_cannot_copy() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    class Guarded:
        __slots__ = ()

        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(name)

    @dataclasses.dataclass(frozen=True, slots=True)
    class OnGuarded(Guarded):
        a: int

    for cls in (NoSlots, PostInit, OnGuarded):
        with pytest.raises(TypeError):
            quick_maker(cls)


_INVITE = (
    b"INVITE sip:1000@127.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:200@127.0.0.1>;tag=f1\r\n'
    b"To: <sip:1000@127.0.0.1>\r\n"
    b"Call-ID: c1@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:200@127.0.0.1:5060>\r\n"
    b"Content-Length: 0\r\n\r\n"
)
_OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-2\r\n"
    b"From: <sip:1000@127.0.0.1>;tag=a1\r\n"
    b"To: <sip:300@127.0.0.1>;tag=b1\r\n"
    b"Call-ID: c2@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@pytest.fixture
def no_inits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The hot classes' ``__init__`` refuses to run (so the code before this round fails)."""

    def refuse(self: object, *args: object) -> None:
        raise AssertionError(f"{type(self).__name__}.__init__ called on the hot path")

    for cls in _HOT:
        monkeypatch.setattr(cls, "__init__", refuse)
    fields._CSEQS.clear()
    yield
    fields._CSEQS.clear()


_SDP = (
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
# What parsing _INVITE and _SDP give, built before any test refuses the constructors.
_EXPECTED_SDP = parse_sdp(_SDP)
_EXPECTED = (
    Via("UDP", "127.0.0.1", 5060, (("branch", "z9hG4bK-1"), ("rport", None))),
    CSeq(1, "INVITE"),
    parse_name_addr('"Alice" <sip:200@127.0.0.1>;tag=f1'),
    parse_name_addr("<sip:1000@127.0.0.1>"),
)


def test_parsing_and_reading_a_message_build_no_object_through_init(no_inits: None) -> None:
    request = parse_message(_INVITE)
    assert type(request) is Request
    assert (request.top_via, request.cseq, request.from_, request.to) == _EXPECTED
    [response] = StreamParser().feed(_OK)
    assert type(response) is Response
    assert response.from_tag == "a1" and response.to_tag == "b1"
    ok = build_response(request, 200, to_tag="t9")
    assert type(ok) is Response and ok.to_tag == "t9"


def test_parsing_sdp_builds_no_object_through_init(no_inits: None) -> None:
    body = parse_sdp(_SDP)
    assert body == _EXPECTED_SDP and type(body) is SessionDescription
    assert type(body.origin) is Origin and type(body.media[0]) is MediaDescription


def test_the_transaction_layer_makes_its_events_without_init(no_inits: None) -> None:
    layer = TransactionLayer()
    layer.receive(parse_message(_INVITE), source=("127.0.0.1", 5060), reliable=False, now=0.0)
    [event] = layer.events()
    assert type(event) is RequestReceived and event.source == ("127.0.0.1", 5060)
    layer.respond(event.key, build_response(event.request, 486, to_tag="t1"), now=0.0)
    assert [type(e) for e in layer.events()] == []


# -- parse_cseq's memo -------------------------------------------------------------------------

_METHODS = st.sampled_from([*sorted(fields.COMMON_METHODS), "FOO", "invite"])
_CSEQ_TEXTS = st.one_of(
    st.builds(lambda n, m: f"{n} {m}", st.integers(0, 2**32), _METHODS),
    st.builds(lambda n, m: f" {n}  {m}", st.integers(0, 99), _METHODS),
    st.text(alphabet="0123456789 INVTEAK-", max_size=12),
)


@given(_CSEQ_TEXTS, st.booleans())
def test_parse_cseq_gives_what_the_general_parser_gives(text: str, warm: bool) -> None:
    if warm:
        with contextlib.suppress(ParseError):
            parse_cseq(text)
    try:
        expected = _parse_cseq(text)
    except ParseError:
        with pytest.raises(ParseError):
            parse_cseq(text)
        assert text not in fields._CSEQS
        return
    assert parse_cseq(text) == expected
    assert type(parse_cseq(text)) is CSeq


def test_parse_cseq_shares_its_values_and_stops_adding_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fields, "_CSEQS", {})
    monkeypatch.setattr(fields, "_CSEQS_LIMIT", 4)
    first = parse_cseq("1 INVITE")
    assert parse_cseq("1 INVITE") is first
    for seq in range(2, 10):
        assert parse_cseq(f"{seq} BYE") == CSeq(seq, "BYE")
    # Full: what it holds stays (nothing cleared), the rest is parsed every time.
    assert list(fields._CSEQS) == ["1 INVITE", "2 BYE", "3 BYE", "4 BYE"]
    assert parse_cseq("1 INVITE") is first
    assert parse_cseq("9 BYE") == CSeq(9, "BYE") and parse_cseq("9 BYE") is not parse_cseq("9 BYE")
    # The general spelling is never remembered.
    monkeypatch.setattr(fields, "_CSEQS", {})
    parse_cseq("1  INVITE")
    assert fields._CSEQS == {}


# -- parse_address, the tagged <URI> inline ------------------------------------------------------

_USERS = st.text(alphabet="ab12+.", min_size=1, max_size=4)
_TAGS = st.one_of(
    st.text(alphabet="ab12", min_size=1, max_size=4), st.sampled_from(["a-b", "x.y!"])
)
_HEADS = st.one_of(
    st.builds(lambda u: f"<sip:{u}@127.0.0.1>", _USERS),
    st.builds(lambda u: f"<sip:{u}@127.0.0.1:5060;transport=tcp>;x=1", _USERS),
    st.builds(lambda u: f"Bob <sip:{u}@h>", _USERS),
    st.builds(lambda u: f'"A {u}" <sip:{u}@h>', _USERS),
    st.builds(lambda u: f"sip:{u}@h", _USERS),
    st.sampled_from(
        ["<sip:a@h", "<>", "<sip:a@h> junk", "bad name <sip:a@h>", '"x\\"y" <sip:a@h>']
    ),
)


@given(_HEADS, _TAGS)
def test_parse_address_of_a_tagged_value_is_parse_name_addr(head: str, tag: str) -> None:
    text = f"{head};tag={tag}"
    try:
        expected = parse_name_addr(text)
    except ParseError:
        with pytest.raises(ParseError):
            parse_address(text)
        return
    got = parse_address(text)
    assert got == expected and type(got) is NameAddr and got.tag == tag
    assert str(got) == str(expected)


def test_the_modules_use_the_makers() -> None:
    # What the hot paths call (a regression here silently costs ~1.4k instructions an object).
    assert message.make_request is MAKERS[Request] and message.make_response is MAKERS[Response]
    assert fields.make_via is MAKERS[Via] and fields.make_cseq is MAKERS[CSeq]
    assert quickinit.MAKERS is MAKERS
