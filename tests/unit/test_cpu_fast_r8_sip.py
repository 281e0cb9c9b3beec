"""Round 8 of issue 12 (sip): structural cuts in the core keep its behaviour.

* The parser's memo of whole header lines (``parser._LINES``): a head parsed with the memo
  warm gives what it gives with the memo empty (fields, lookup keys, Content-Length values,
  errors); repeated lines share their field; the memo stays bounded and never holds the
  fields that change with every message (Via, From, To, Call-ID).
* Validation reads the fields by lookup key (one dict built in C instead of a Python pass
  with a list per name) and fills the accessors' memo (top Via, From, To, CSeq) directly:
  the same errors and the same memo as the code before (kept here as the reference).
* A Via whose branch comes first takes the parameters after it from a memo by their text:
  what the general parser gives, for any branch value and tail.
* A request a dialog makes keeps the Via and CSeq it wrote as parsed; a response keeps what
  its request's accessors parsed of the fields it copies (not the To it tags): equal to what
  parsing the new message gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip import fields, parser
from sbc.sip.dialog import Dialog
from sbc.sip.errors import BadExtension, BadRequest, ParseError, SipError
from sbc.sip.fields import Via, parse_int_header, parse_via
from sbc.sip.headers import Headers, split_list
from sbc.sip.message import (
    Request,
    Response,
    _cseq,
    _from,
    _to,
    _top_via,
    parse_address_list,
)
from sbc.sip.parser import _Head, parse_message
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import is_wildcard_contact, parse_uri
from sbc.sip.validate import _DATE_RE, _check_common, _scan, validate_request

# -- parser: the memo of header lines ------------------------------------------------------

_LINES = st.sampled_from(
    [
        "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        "v:SIP/2.0/TCP h",
        "From: <sip:a@b>;tag=1",
        "t: <sip:c@d>",
        "i: abc",
        "Max-Forwards: 70",
        "max-forwards:70",
        "Content-Length: 0",
        "l: 12",
        "content-length :7",
        "CSeq: 1 INVITE",
        "X-Odd \t: a:b ",
        "Subject:",
        "Subject: x",
        "NoColon",
        "Bad Name: x",
        " continued",
        "\tmore: x",
        " ",
        "Allow: INVITE, ACK, BYE",
    ]
)


def _head_or_error(text: str) -> object:
    try:
        head = _Head(text)
    except ParseError as exc:
        return ("ParseError", str(exc))
    return (head.items, head.keys, head.content_lengths)


@given(st.lists(_LINES, max_size=7), st.lists(_LINES, max_size=7))
def test_a_head_parses_the_same_with_the_line_memo_warm(
    before: list[str], lines: list[str]
) -> None:
    text = "\r\n".join(["OPTIONS sip:a@b SIP/2.0", *lines])
    saved = parser._LINES
    try:
        parser._LINES = {}
        cold = _head_or_error(text)
        # Warm the memo with other heads' lines (and this one's), then parse again.
        _head_or_error("\r\n".join(["OPTIONS sip:a@b SIP/2.0", *before]))
        for line in lines:
            _head_or_error(f"OPTIONS sip:a@b SIP/2.0\r\n{line}")
        warm = _head_or_error(text)
        again = _head_or_error(text)
    finally:
        parser._LINES = saved
    assert warm == cold
    assert again == cold


def test_repeated_lines_share_their_field_and_changing_ones_are_not_kept() -> None:
    def invite(n: int) -> bytes:
        return (
            "INVITE sip:201@192.0.2.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK{n}\r\n"
            f"From: <sip:1@192.0.2.2>;tag={n}\r\n"
            "To: <sip:201@192.0.2.1>\r\n"
            f"Call-ID: {n}@192.0.2.2\r\n"
            "CSeq: 1 INVITE\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    first, second = parse_message(invite(1)), parse_message(invite(2))
    for a, b in zip(first.headers.items(), second.headers.items(), strict=True):
        if a[0] in ("CSeq", "Max-Forwards", "Content-Length"):
            assert a is b  # one field for both messages: the line was read once
        elif a[0] in ("Via", "From", "Call-ID"):
            assert a != b
    remembered = set(parser._LINES)
    assert "CSeq: 1 INVITE" in remembered and "Max-Forwards: 70" in remembered
    for line in remembered:
        assert not line.lower().startswith(("via:", "from:", "to:", "call-id:"))


def test_the_line_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parser, "_LINES", {})
    for n in range(parser._LINES_LIMIT * 3):
        parse_message(f"OPTIONS sip:a@b SIP/2.0\r\nX-Id: {n}\r\nCSeq: 1 OPTIONS\r\n\r\n".encode())
        assert len(parser._LINES) <= parser._LINES_LIMIT
    # Emptied when full, so a repeating line is back after the next message carrying it.
    assert "CSeq: 1 OPTIONS" in parser._LINES
    long_line = "X-Long: " + "a" * parser._LINE_MAX
    parse_message(f"OPTIONS sip:a@b SIP/2.0\r\n{long_line}\r\n\r\n".encode())
    assert long_line not in parser._LINES


# -- validation fills the accessors' memo directly ------------------------------------------


_READ = frozenset(
    {"To", "From", "Call-ID", "CSeq", "Via", "Max-Forwards", "Content-Length", "Content-Type"}
    | {"Route", "Record-Route", "Contact", "Date", "Expires", "Proxy-Require", "Require"}
)
_SINGLE_VALUE = ("From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length", "Content-Type")
_SINGLE_ELEMENT = frozenset({"From", "To", "Content-Type"})


def _reference_scan(headers: Headers) -> tuple[dict[str, list[str]], bool]:
    """Validation's scan before round 8: a Python pass over the fields, a list per name."""
    lines: dict[str, list[str]] = {}
    suspect = False
    for name, value in headers.items():
        if name in _READ:
            seen = lines.get(name)
            if seen is None:
                lines[name] = [value]
                if "," in value and name in _SINGLE_ELEMENT:
                    suspect = True
            else:
                seen.append(value)
                if name in _SINGLE_VALUE:
                    suspect = True
    return lines, suspect


def _reference_single_values(lines: dict[str, list[str]], error: type[SipError]) -> None:
    for name in _SINGLE_VALUE:
        values = lines.get(name)
        if values is None:
            continue
        if len(values) > 1:
            raise error(f"several {name} header fields")
        if name in _SINGLE_ELEMENT and "," in values[0] and len(split_list(values[0])) > 1:
            raise error(f"several values in {name}")


def _reference_common(message: Request | Response, error: type[SipError]) -> dict[str, list[str]]:
    """``_check_common`` as it was before round 8: the scan's lists, the memo filled through
    the accessors' helpers and ``Headers.cached`` (the general code the new one stands in
    for)."""
    lines, suspect = _reference_scan(message.headers)
    if not lines.keys() >= {"To", "From", "Call-ID", "CSeq", "Via"}:
        missing = [n for n in ("To", "From", "Call-ID", "CSeq", "Via") if n not in lines]
        raise error(f"missing {missing[0]}")
    if suspect:
        _reference_single_values(lines, error)
    cached = message.headers.cached
    via_lines = lines["Via"]
    if len(via_lines) == 1 and "," not in via_lines[0]:
        if not via_lines[0].strip():
            raise error("empty Via")
        cached("top_via", _top_via)
    else:
        vias = message.headers.values("Via")
        if not vias:
            raise error("empty Via")
        cached("top_via", _top_via)
        for value in vias[1:]:
            parse_via(value)
    cached("from", _from)
    cached("to", _to)
    call_id = lines["Call-ID"][0]
    if not call_id or len(call_id.split()) != 1:
        raise error("bad Call-ID")
    cached("cseq", _cseq)
    content_length = lines.get("Content-Length")
    if content_length is not None:
        parse_int_header(content_length[0], "Content-Length")
    for name in ("Route", "Record-Route"):
        for value in lines.get(name, ()):
            parse_address_list(value)
    return lines


def _reference_request_fields(req: Request, check_proxy_require: bool) -> None:
    """The fields ``validate_request`` read through the scan's lists before round 8 (the
    checks after them read no field: the same code either way)."""
    try:
        lines = _reference_common(req, BadRequest)
        max_forwards = lines.get("Max-Forwards")
        if max_forwards is None:
            raise BadRequest("missing Max-Forwards")
        parse_int_header(max_forwards[0], "Max-Forwards", 255)
        expires = lines.get("Expires")
        if expires is not None:
            parse_int_header(expires[0], "Expires")
        if "Date" in lines:
            date = lines["Date"][0]
            if _DATE_RE.fullmatch(date) is None:
                raise BadRequest(f"bad Date {date!r}")
        contacts = lines.get("Contact", ())
        for value in contacts:
            if is_wildcard_contact(value):
                if req.method != "REGISTER" or len(contacts) != 1:
                    raise BadRequest("Contact: * outside a REGISTER")
                continue
            for contact in parse_address_list(value):
                contact_expires = contact.param("expires")
                if contact_expires is not None:
                    parse_int_header(contact_expires, "Contact expires")
    except ParseError as exc:
        raise BadRequest(exc.detail) from exc
    names = ("Require", "Proxy-Require") if check_proxy_require else ("Require",)
    wanted = [tag for name in names for line in lines.get(name, ()) for tag in split_list(line)]
    unsupported = [tag for tag in wanted if tag.lower() not in {"replaces", "timer"}]
    if unsupported:
        raise BadExtension("unsupported extensions: " + ", ".join(unsupported))


_VIA = st.sampled_from(
    [
        "SIP/2.0/UDP h;branch=z9hG4bK1",
        "SIP/2.0/UDP h, SIP/2.0/TCP g",
        " ",
        "bad",
        "SIP/2.0/TCP [::1]:5",
    ]
)
_ADDR = st.sampled_from(
    ['"A" <sip:a@b>;tag=1', "<sip:a@b>", "sip:a@b;tag=x", "<bad", "<sip:a@b>, <sip:c@d>", ""]
)
_CSEQS = st.sampled_from(["1 INVITE", "2 BYE", "x INVITE", "1  INVITE", "99999999999 INVITE"])


def _mostly(valid: list[str], any_value: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    """Valid values three times in five (so that most messages get past the first checks),
    then any value, or the field left out."""
    good = st.sampled_from(valid)
    return st.one_of(good, good, good, any_value, st.none())


@given(
    _mostly(["SIP/2.0/UDP h;branch=z9hG4bK1", "SIP/2.0/TCP [::1]:5"], _VIA),
    _mostly(['"A" <sip:a@b>;tag=1', "sip:a@b;tag=x"], _ADDR),
    _mostly(["<sip:c@d>", "<sip:e@f>;tag=2"], _ADDR),
    _mostly(["1 INVITE", "2 BYE"], _CSEQS),
    _mostly(["a@b"], st.sampled_from(["a b", ""])),
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["Via", "From", "To", "CSeq"]), _VIA | _ADDR | _CSEQS),
            st.tuples(st.just("Record-Route"), st.sampled_from(["<sip:p;lr>", "<bad"])),
            st.tuples(st.just("Content-Length"), st.sampled_from(["0", "x"])),
        ),
        max_size=2,
    ),
    st.booleans(),
    st.booleans(),
)
def test_validation_fills_the_memo_as_the_accessors_do(
    via: str | None,
    from_: str | None,
    to: str | None,
    cseq: str | None,
    call_id: str | None,
    extra: list[tuple[str, str]],
    request: bool,
    pre_read_via: bool,
) -> None:
    named = (("Via", via), ("From", from_), ("To", to), ("CSeq", cseq), ("Call-ID", call_id))
    fields = [(name, value) for name, value in named if value is not None] + extra

    def make() -> Request | Response:
        headers = Headers(fields)
        if request:
            return Request("INVITE", parse_uri("sip:a@b"), headers)
        return Response(200, "OK", headers)

    new, old = make(), make()
    if pre_read_via:  # the engine stamped (and so parsed) the top Via before validation
        for message in (new, old):
            with contextlib.suppress(SipError):
                assert message.top_via is not None
    outcome: list[object] = []
    for message, check in ((new, _check_common), (old, None)):
        try:
            if check is None:
                _reference_common(message, BadRequest)
            else:
                check(message, _scan(message.headers), BadRequest)
            outcome.append(None)
        except SipError as exc:
            outcome.append((type(exc), str(exc)))
    assert outcome[0] == outcome[1]
    assert (new.headers._cache or {}) == (old.headers._cache or {})


_REQUEST_FIELDS = st.sampled_from(
    [
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("Via", "SIP/2.0/UDP g;branch=z9hG4bK2"),
        ("Via", "SIP/2.0/UDP h, SIP/2.0/TCP g"),
        ("Max-Forwards", "70"),
        ("Max-Forwards", "300"),
        ("Expires", "60"),
        ("Expires", "x"),
        ("Date", "Sat, 13 Nov 2010 23:29:00 GMT"),
        ("Date", "Sat, 13 Nov 2010 23:29:00 PST"),
        ("Contact", "<sip:a@b>;expires=5"),
        ("Contact", "<sip:a@b>, <sip:c@d>;expires=x"),
        ("Contact", "*"),
        ("Require", "timer"),
        ("Require", "100rel, timer"),
        ("Proxy-Require", "foo"),
        ("Record-Route", "<sip:p;lr>"),
        ("Route", "<bad"),
        ("Route", "<sip:q;lr>"),
        ("Contact", "*"),
        ("Content-Type", "application/sdp"),
        ("Content-Type", "a/b, c/d"),
        ("Content-Length", "0"),
        ("Content-Length", "1"),
        ("To", "<sip:x@y>"),
        ("From", "<sip:a@b>;tag=9"),
        ("Call-ID", "b@c"),
        ("CSeq", "2 INVITE"),
    ]
)


@given(
    st.sampled_from(["INVITE", "REGISTER"]),
    st.lists(_REQUEST_FIELDS, max_size=5),
    st.booleans(),
)
def test_request_fields_are_checked_as_before(
    method: str, extra: list[tuple[str, str]], check_proxy_require: bool
) -> None:
    base = [
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("From", "<sip:a@b>;tag=1"),
        ("To", "<sip:c@d>"),
        ("Call-ID", "a@b"),
        ("CSeq", f"1 {method}"),
        ("Max-Forwards", "70"),
    ]
    fields = [*base, *extra]
    outcome: list[tuple[object, ...] | None] = []
    for reference in (False, True):
        request = Request(method, parse_uri("sip:a@b"), Headers(fields))
        try:
            if reference:
                _reference_request_fields(request, check_proxy_require)
            else:
                # The checks after the fields read none (version, CSeq method, scheme,
                # Max-Forwards 0, Content-Type): only the fields' outcome is compared.
                validate_request(
                    request,
                    check_proxy_require=check_proxy_require,
                    allow_zero_max_forwards=True,
                    accept=frozenset({"application/sdp", "a/b"}),
                )
            outcome.append(None)
        except BadRequest as exc:
            outcome.append((BadRequest, exc.detail))
        except BadExtension as exc:
            outcome.append((BadExtension, str(exc).split(": ", 1)[-1]))
        except SipError as exc:
            outcome.append((type(exc).__name__,))
    first = outcome[0]
    if first is not None and first[0] not in (BadRequest, BadExtension):
        return  # a check after the fields (CSeq method, Content-Type...): not compared
    assert outcome[0] == outcome[1]


# -- Via: the parameters after a leading branch, by text -------------------------------------

_VIA_HEADS = st.sampled_from(
    ["SIP/2.0/UDP 192.0.2.1:5060", "SIP/2.0/TCP h", "SIP/2.0/UDP h ", "SIP/2.0/UDP [::1]:5"]
)
_BRANCHES = st.sampled_from(
    ["z9hG4bK1", "z9hG4bK-52-1---4f", "", "a b", 'x"y', "a,b", "a<b", "é", "a\x7f", "a=b"]
)
_TAILS = st.lists(
    st.sampled_from(
        [
            "rport",
            "rport=5060",
            "rport=70000",
            "received=192.0.2.9",
            "ttl=300",
            "branch=again",
            "",
            " x",
            'x="a;b"',
        ]
    ),
    max_size=3,
)


@given(
    _VIA_HEADS, _BRANCHES, _TAILS, _BRANCHES, st.sampled_from(["branch=", "BRANCH=", "x;branch="])
)
def test_via_tail_memo_parses_like_the_general_code(
    head: str, branch: str, tail: list[str], prime_branch: str, prefix: str
) -> None:
    saved = fields._VIA_TAILS.copy()
    try:
        fields._VIA_TAILS.clear()
        rest = "".join(f";{p}" for p in tail)
        text = f"{head};{prefix}{branch}{rest}"
        expected = _outcome(fields._parse_via, text)
        # Warm both memos with a message of the same shape and another branch.
        for _ in range(3):
            _outcome(parse_via, f"{head};branch={prime_branch}{rest}")
        assert _outcome(parse_via, text) == expected
        assert _outcome(parse_via, text) == expected
    finally:
        fields._VIA_TAILS.clear()
        fields._VIA_TAILS.update(saved)


def _outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return parse(text)
    except SipError as exc:
        return (type(exc).__name__, str(exc))


def test_via_tail_memo_is_used_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fields, "_VIA_TAILS", {})
    for i in range(fields._VIA_HEADS_LIMIT + 10):
        parse_via(f"SIP/2.0/UDP h;branch=z9hG4bK{i};received=192.0.2.{i}")
    assert len(fields._VIA_TAILS) == fields._VIA_HEADS_LIMIT
    assert fields._VIA_TAILS[";received=192.0.2.1"] == (("received", "192.0.2.1"),)
    via = parse_via("SIP/2.0/UDP h;branch=z9hG4bKnew;received=192.0.2.1")
    assert via.params == (("branch", "z9hG4bKnew"), ("received", "192.0.2.1"))
    assert via.params[1] is fields._VIA_TAILS[";received=192.0.2.1"][0]  # from the memo
    for n in range(3):
        via = parse_via(f"SIP/2.0/UDP h;branch=z9hG4bK{n};rport=5060;received=192.0.2.7;x")
        assert via == fields._parse_via(
            f"SIP/2.0/UDP h;branch=z9hG4bK{n};rport=5060;received=192.0.2.7;x"
        )


# -- messages built from parsed ones keep what was parsed ----------------------------------


_DIALOG_VIAS = st.sampled_from(
    [
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx;rport",
        "SIP/2.0/tcp h.example.com;branch=z9hG4bKx",
        'SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK1;x="a;b";rport=5',
        "SIP / 2.0 / UDP h ;branch=z9hG4bKx ; received=192.0.2.9",
        "SIP/2.0/UDP h",
    ]
)


@given(
    _DIALOG_VIAS,
    st.sampled_from(["z9hG4bKabc", "z9hG4bK-1---2", "z9hG4bK.~!%*_+`'"]),
    st.sampled_from(["BYE", "ACK", "INFO", "FOO"]),
    st.booleans(),
)
def test_a_dialog_request_remembers_its_via_and_cseq_as_parsed(
    via_text: str, branch: str, method: str, as_text: bool
) -> None:
    invite = parse_message(
        b"INVITE sip:b@192.0.2.2 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK9\r\n"
        b"From: <sip:a@192.0.2.1>;tag=1\r\nTo: <sip:b@192.0.2.2>\r\nCall-ID: c@d\r\n"
        b"CSeq: 1 INVITE\r\nContact: <sip:a@192.0.2.1>\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(invite, Request)
    dialog = Dialog.from_uas(invite, build_response(invite, 200, to_tag="2"))
    via: str | Via = via_text if as_text else parse_via(via_text)
    request = dialog.create_request(method, via=via, branch=branch, cseq=1)
    memo = request.headers._cache or {}
    fresh = Request(request.method, request.uri, Headers._trusted(request.headers.items()))
    if "top_via" in memo:
        assert memo["top_via"] == fresh.top_via
    if "cseq" in memo:
        assert memo["cseq"] == fresh.cseq
    assert ("top_via" in memo) == (method not in ("FOO", "ACK"))


_RESPONSE_TOS = st.sampled_from(["<sip:b@h>", '"B" <sip:b@h>;tag=x', "sip:b@h;tag=y;tag=z"])


@given(
    _RESPONSE_TOS,
    st.sampled_from([100, 180, 200, 486]),
    st.none() | st.just("t1"),
    st.sets(st.sampled_from(["top_via", "from", "to", "cseq"])),
)
def test_a_response_shares_what_its_request_parsed_of_the_copied_fields(
    to: str, status: int, to_tag: str | None, read: set[str]
) -> None:
    request = parse_message(
        b"BYE sip:b@192.0.2.2 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK9\r\n"
        b"Via: SIP/2.0/TCP p;branch=z9hG4bK8\r\nFrom: <sip:a@192.0.2.1>;tag=1\r\n"
        + f"To: {to}\r\n".encode()
        + b"Call-ID: c@d\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(request, Request)
    for key in read:  # what earlier layers read of the request
        getattr(request, {"top_via": "top_via", "from": "from_", "to": "to", "cseq": "cseq"}[key])
    response = build_response(request, status, to_tag=to_tag)
    memo = response.headers._cache or {}
    fresh = Response(response.status, response.reason, Headers._trusted(response.headers.items()))
    for key, name in (("top_via", "top_via"), ("from", "from_"), ("to", "to"), ("cseq", "cseq")):
        if key in memo:
            assert memo[key] == getattr(fresh, name)
    assert memo.keys() >= read - {"to"}
