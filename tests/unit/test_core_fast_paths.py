"""Fast paths of the SIP core (round 3 of issue 12), each compared with the general code it
stands in for: the Via head memo, CSeq, parameter lookups."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip import fields, validate
from sbc.sip.errors import BadRequest, LimitExceeded, ParseError, SipError
from sbc.sip.fields import (
    CSeq,
    Params,
    Via,
    _parse_cseq,
    _parse_via,
    find_param,
    get_param,
    is_token,
    parse_cseq,
    parse_int_header,
    parse_via,
)
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response, _top_via, _top_via_of_lines, parse_address
from sbc.sip.parser import ParseLimits, _Head
from sbc.sip.server_transaction import build_response
from sbc.sip.transaction import (
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    _is_rfc3261_branch,
    _sent_by,
    server_key,
)
from sbc.sip.uri import NameAddr, _needs_quotes, parse_name_addr, parse_uri
from sbc.sip.validate import _check_single_values, _media_type, _scan, _valid_media_type


def outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return parse(text)
    except SipError as exc:
        return (type(exc).__name__, str(exc))


_HEADS = st.sampled_from(
    [
        "SIP/2.0/UDP 192.0.2.1:5060",
        "SIP/2.0/tcp host.example.com",
        "SIP/2.0/UDP h:65536",
        "SIP/2.0/UDP h ",
        "SIP/2.0/UDP\th:5",
        " SIP/2.0/UDP h",
        "SIP / 2.0 / UDP h",
        "SIP/2.0/UDP [2001:db8::1]:5060",
        "SIP/2.0/UDP h-",
    ]
)
_PARAM_TEXTS = st.lists(
    st.sampled_from(
        [
            "branch=z9hG4bK1",
            "BRANCH=Z9",
            "rport",
            "rport=5060",
            "rport=70000",
            "RPORT=x",
            "ttl=1",
            "TTL=300",
            "received=192.0.2.9",
            "",
            " x",
            'x="a;b"',
        ]
    ),
    max_size=4,
)


@given(_HEADS, st.booleans(), _PARAM_TEXTS, st.sampled_from(["", " ", ";"]))
def test_via_head_memo_parses_like_the_general_code(
    head: str, semi: bool, params: list[str], junk: str
) -> None:
    fields._VIA_HEADS.clear()
    text = head + (";" + ";".join(params) if semi or params else "") + junk
    expected = outcome(_parse_via, text)
    fields._VIA_HEADS.clear()
    for prime in (head + ";branch=z9hG4bKprime", head):
        outcome(parse_via, prime)  # fills the memo when the head allows it
    assert outcome(parse_via, text) == expected


def test_via_head_memo_is_bounded_and_reused() -> None:
    fields._VIA_HEADS.clear()
    for i in range(fields._VIA_HEADS_LIMIT + 10):
        parse_via(f"SIP/2.0/UDP h{i};branch=z9hG4bK{i}")
    assert len(fields._VIA_HEADS) == fields._VIA_HEADS_LIMIT
    assert parse_via("SIP/2.0/UDP h1;branch=z9hG4bKx;rport").params == (
        ("branch", "z9hG4bKx"),
        ("rport", None),
    )
    fields._VIA_HEADS.clear()


@given(
    st.sampled_from(["1", "0009", "999999999", "1000000000", "2147483648", "", "x", "¹", "-1"]),
    st.sampled_from([" ", "  ", "\t", " \t"]),
    st.sampled_from(["INVITE", "BYE", "invite", "FOO", "IN VITE", "BYE ", "", "B@D"]),
    st.sampled_from(["", " ", "\t"]),
)
def test_cseq_fast_path_equals_general_path(seq: str, sep: str, method: str, lead: str) -> None:
    text = f"{lead}{seq}{sep}{method}"
    assert outcome(parse_cseq, text) == outcome(_parse_cseq, text)


def test_cseq_fast_path_values() -> None:
    assert parse_cseq("2 INVITE") == CSeq(2, "INVITE")
    assert parse_cseq("999999999 BYE") == CSeq(999999999, "BYE")
    with pytest.raises(ParseError):
        parse_cseq("2147483648 BYE")


def _reference_find(params: Params, name: str) -> int:
    key = name.lower()
    for i, (n, _) in enumerate(params):
        if n.lower() == key:
            return i
    return -1


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tag", "TAG", "Tag", "branch", "x", "lr"]),
            st.none() | st.text(max_size=3),
        ),
        max_size=5,
    ).map(tuple),
    st.sampled_from(["tag", "TAG", "branch", "lr", "y"]),
)
def test_param_lookups_equal_the_lower_case_scan(params: Params, name: str) -> None:
    i = _reference_find(params, name)
    assert find_param(params, name) == i
    assert get_param(params, name) == (None if i < 0 else params[i][1])


# -- parser ---------------------------------------------------------------------------------

_FIELD_LINES = st.sampled_from(
    [
        "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        "v:SIP/2.0/TCP h",
        "Content-Length: 0",
        "l: 12",
        "content-length :7",
        "X-Odd \t: a:b ",
        "To: <sip:a@b>",
        "Subject:",
        "NoColon",
        "Bad Name: x",
        " continued",
        "\tmore: x",
        " ",
    ]
)


@given(st.lists(_FIELD_LINES, max_size=6))
def test_header_loop_equals_the_folding_loop(lines: list[str]) -> None:
    text = "\r\n".join(["OPTIONS sip:a@b SIP/2.0", *lines])
    expected: object
    items: list[tuple[str, str]] = []
    keys: list[str] = []
    try:
        _Head._folded_fields(text.split("\r\n"), items, keys)
        expected = (tuple(items), tuple(keys))
        contents = [v for n, v in items if n == "Content-Length"]
    except ParseError as exc:
        expected = ("ParseError", str(exc))
    try:
        head = _Head(text)
    except ParseError as exc:
        assert expected == ("ParseError", str(exc))
        return
    assert (head.items, head.keys) == expected
    assert head.content_lengths == contents


@pytest.mark.parametrize(
    ("vias", "max_via", "raises"),
    [
        ([], 0, False),
        (["a"], 0, True),
        (["a"], 1, False),
        (["a, b"], 1, True),
        (["a", "b"], 1, True),
        (["a", "b, c"], 3, False),
        (['a;x="1,2"', "b"], 2, True),  # the quoted comma counts
    ],
)
def test_via_limit_counts_entries_only_when_needed(
    vias: list[str], max_via: int, raises: bool
) -> None:
    text = "\r\n".join(["OPTIONS sip:a@b SIP/2.0", *(f"Via: {v}" for v in vias), "To: x"])
    limits = ParseLimits(max_via=max_via)
    if raises:
        with pytest.raises(LimitExceeded):
            _Head(text, limits)
    else:
        assert _Head(text, limits).keys.count("via") == len(vias)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("OPTIONS sip:a@b SIP/2.0\r\nTo: x\nFrom: y", "bare CR or LF"),
        ("OPTIONS sip:a@b SIP/2.0\r\nTo: x\rFrom: y", "bare CR or LF"),
        ("OPTIONS sip:a@b SIP/2.0" + "\r\nX: y" * 3, "3 header lines"),
        ("OPTIONS sip:a@b SIP/2.0" + "\nX: y" * 3, "bare CR or LF"),
    ],
)
def test_line_checks_before_the_fields(text: str, error: str) -> None:
    with pytest.raises(ParseError, match=error):
        _Head(text, ParseLimits(max_headers=2))


def test_folded_lines_take_the_folding_loop() -> None:
    head = _Head("OPTIONS sip:a@b SIP/2.0\r\nSubject: a\r\n \tb\r\nTo: <sip:a@b>")
    assert head.items == (("Subject", "a b"), ("To", "<sip:a@b>"))
    with pytest.raises(ParseError, match="continuation line before"):
        _Head("OPTIONS sip:a@b SIP/2.0\r\n x: y")


# -- addresses, accessors, responses ---------------------------------------------------------


@pytest.mark.parametrize("tag", ["abc1", "x-y.z", "é", "a b", "", "a;b", "a>", "Z~'`"])
@pytest.mark.parametrize(
    "base", ['"Bob" <sip:a@b>', "<sip:a@b>;x=1", "sip:a@b", '"q\\"x" <sip:a@b>', '"o <', "<"]
)
def test_tagged_address_parses_like_the_whole_value(base: str, tag: str) -> None:
    text = f"{base};tag={tag}"
    assert outcome(parse_address, text) == outcome(parse_name_addr, text)


@given(
    st.lists(
        st.sampled_from(["SIP/2.0/UDP h;branch=z9hG4bK1", " ", "", "SIP/2.0/TCP a, SIP/2.0/UDP b"]),
        min_size=1,
        max_size=3,
    )
)
def test_top_via_fast_path_equals_the_line_by_line_path(lines: list[str]) -> None:
    headers = Headers([("Via", line) for line in lines] + [("To", "<sip:a@b>")])
    assert outcome(lambda _: _top_via(headers), "") == outcome(
        lambda _: _top_via_of_lines(headers), ""
    )


@given(st.text(alphabet="ab -\t\"\\é'~", max_size=8))
def test_display_name_quoting_equals_the_word_check(display: str) -> None:
    words = display.split(" ")
    assert _needs_quotes(display) == (not all(is_token(w) for w in words))


def _reference_response(request: Request, status: int, to_tag: str | None) -> list[object]:
    """build_response's copied fields as Headers.get and get_all find them."""
    src = request.headers
    items: list[tuple[str, str]] = [("Via", v) for v in src.get_all("Via")]
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = src.get(name)
        if value is None:
            continue
        if name == "To" and to_tag is not None and status != 100 and request.to.tag is None:
            value = str(parse_name_addr(value).with_tag(to_tag))
        items.append((name, value))
    return [status, items]


@given(
    st.lists(
        st.sampled_from(
            [
                ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
                ("v", "SIP/2.0/UDP g;branch=z9hG4bK2"),
                ("From", "<sip:a@b>;tag=1"),
                ("To", "<sip:c@d>"),
                ("t", "<sip:c@d>;tag=9"),
                ("To", "<sip:c@d>;tag"),
                ("Call-ID", "x@y"),
                ("CSeq", "1 INVITE"),
                ("Contact", "<sip:a@b>"),
            ]
        ),
        max_size=8,
    ),
    st.sampled_from([100, 180, 200, 486]),
    st.none() | st.just("s1"),
)
def test_build_response_copies_what_get_finds(
    fields_: list[tuple[str, str]], status: int, to_tag: str | None
) -> None:
    request = Request("INVITE", parse_uri("sip:a@b"), Headers(fields_))
    expected = outcome(lambda _: _reference_response(request, status, to_tag), "")
    got = outcome(
        lambda _: [status, list(build_response(request, status, to_tag=to_tag).headers)], ""
    )
    assert got == expected


# -- validation -------------------------------------------------------------------------------

_VALIDATED_FIELDS = st.sampled_from(
    [
        ("From", "<sip:a@b>;tag=1"),
        ("From", '"Doe, J" <sip:a@b>;tag=1'),
        ("To", "<sip:c@d>, <sip:e@f>"),
        ("To", "<sip:c@d>"),
        ("Call-ID", "x@y"),
        ("CSeq", "1 INVITE"),
        ("Max-Forwards", "70"),
        ("Content-Length", "0"),
        ("Content-Type", "application/sdp"),
        ("Content-Type", "a/b, c/d"),
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1, SIP/2.0/UDP g"),
        ("Contact", "<sip:a@b>, <sip:c@d>"),
        ("Route", "<sip:p;lr>"),
    ]
)


@given(st.lists(_VALIDATED_FIELDS, max_size=10))
def test_single_value_check_is_skipped_only_when_it_cannot_fail(
    fields_: list[tuple[str, str]],
) -> None:
    scanned = _scan(Headers(fields_))
    first, _, _, repeated = scanned
    # _check_common runs the check only when a name repeats or a From, To or Content-Type
    # holds a comma (round 8: the condition read from the scan's fields by lookup key).
    suspect = repeated or any(
        "," in first[key][1] for key in ("from", "to", "content-type") if key in first
    )
    if not suspect:
        _check_single_values(scanned, BadRequest)  # must not raise


@pytest.mark.parametrize(
    "content_type",
    ["application/sdp", "Application/SDP ; x=1", "a/b/c", "nosl", "a/", "é/x", " text/plain"],
)
def test_media_type_memo_gives_the_checked_type(content_type: str) -> None:
    def uncached(text: str) -> object:
        media = _media_type(text)
        if "/" not in media or not all(is_token(p) for p in media.split("/")):
            raise BadRequest(f"bad Content-Type {text!r}")
        return media

    expected = outcome(uncached, content_type)
    validate._MEDIA_TYPES.clear()
    assert outcome(_valid_media_type, content_type) == expected
    assert outcome(_valid_media_type, content_type) == expected  # from the memo


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tag", "TAG", "branch", "Branch", "x"]),
            st.none() | st.sampled_from(["1", "z9hG4bK2"]),
        ),
        max_size=4,
    ).map(tuple)
)
def test_branch_and_tag_read_what_get_param_reads(params: Params) -> None:
    assert Via("UDP", "h", None, params).branch == get_param(params, "branch")
    assert NameAddr(parse_uri("sip:a@b"), None, params).tag == get_param(params, "tag")


def test_media_type_memo_is_bounded() -> None:
    validate._MEDIA_TYPES.clear()
    for i in range(300):
        assert _valid_media_type(f"application/x-{i}") == f"application/x-{i}"
    assert len(validate._MEDIA_TYPES) == 256
    validate._MEDIA_TYPES.clear()


@pytest.mark.parametrize("missing", ["To", "From", "Call-ID", "CSeq", "Via"])
def test_the_first_missing_mandatory_field_is_named(missing: str) -> None:
    fields_ = [
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("To", "<sip:a@b>"),
        ("From", "<sip:a@b>;tag=1"),
        ("Call-ID", "c"),
        ("CSeq", "1 OPTIONS"),
    ]
    request = Request(
        "OPTIONS", parse_uri("sip:a@b"), Headers([f for f in fields_ if f[0] != missing])
    )
    with pytest.raises(BadRequest, match=f"missing {missing}"):
        validate.validate_request(request)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["0", "70", " 70", "0070", "256", "65536", "x", "", "1" * 12, "²"]),
            st.sampled_from([255, 65535, 2**32 - 1]),
        ),
        max_size=6,
    )
)
def test_small_int_memo_reads_what_parsing_reads(reads: list[tuple[str, int]]) -> None:
    fields._SMALL_INTS.clear()
    for value, maximum in reads:

        def read(v: str, maximum: int = maximum) -> int:
            return parse_int_header(v, "X", maximum)

        got = outcome(read, value)
        saved = dict(fields._SMALL_INTS)
        fields._SMALL_INTS.clear()
        assert got == outcome(read, value)
        fields._SMALL_INTS.update(saved)


def test_small_int_memo_is_bounded() -> None:
    fields._SMALL_INTS.clear()
    for i in range(1100):
        assert parse_int_header(str(i), "X") == i
    assert len(fields._SMALL_INTS) == 1024
    fields._SMALL_INTS.clear()


# -- transaction layer ------------------------------------------------------------------------


@given(
    st.sampled_from(["z9hG4bK1", "z9hG4bK", "abc", None, "Z9HG4BKx"]),
    st.sampled_from(["Host.Example", "192.0.2.1", "[::1]"]),
    st.none() | st.sampled_from([5060, 0]),
    st.sampled_from(["INVITE", "ACK", "BYE"]),
)
def test_server_key_is_the_rfc3261_key_or_the_2543_one(
    branch: str | None, host: str, port: int | None, method: str
) -> None:
    params: Params = () if branch is None else (("branch", branch),)
    via = Via("UDP", host, port, params)
    headers = Headers(
        [("Via", str(via)), ("From", "<sip:a@b>;tag=1"), ("Call-ID", "c"), ("CSeq", f"1 {method}")]
    )
    request = Request(method, parse_uri("sip:a@b"), headers)
    key = server_key(request)
    if _is_rfc3261_branch(request.top_via.branch):
        expected = (
            f"s|{request.top_via.branch}|{_sent_by(request.top_via)}|"
            f"{'INVITE' if method == 'ACK' else method}"
        )
        assert key == expected
    else:
        assert key.startswith("s2543|")


@pytest.mark.parametrize(
    ("vias", "matched"),
    [
        (["SIP/2.0/UDP h;branch=z9hG4bKc1"], True),
        (["SIP/2.0/UDP h;branch=z9hG4bKc1, SIP/2.0/UDP g"], False),
        (["SIP/2.0/UDP h;branch=z9hG4bKc1", "SIP/2.0/UDP g"], False),
        (["SIP/2.0/UDP h;branch=z9hG4bKc1,"], True),  # one element after all
    ],
)
def test_responses_match_only_with_one_via(vias: list[str], matched: bool) -> None:
    layer = TransactionLayer()
    invite = Request(
        "INVITE",
        parse_uri("sip:a@b"),
        Headers(
            [
                ("Via", "SIP/2.0/UDP h;branch=z9hG4bKc1"),
                ("From", "<sip:a@b>;tag=1"),
                ("To", "<sip:c@d>"),
                ("Call-ID", "c"),
                ("CSeq", "1 INVITE"),
            ]
        ),
    )
    layer.send_request(invite, dest="d", reliable=True, now=0.0)
    fields_ = [("Via", v) for v in vias]
    fields_ += [("From", "<sip:a@b>;tag=1"), ("To", "<sip:c@d>"), ("Call-ID", "c")]
    response = Response(180, "Ringing", Headers([*fields_, ("CSeq", "1 INVITE")]))
    layer.receive(response, source="d", reliable=True, now=0.0)
    [event] = layer.events()
    assert isinstance(event, ResponseReceived) is matched
    assert isinstance(event, StrayResponse) is not matched


@given(
    st.sampled_from(['"Bob" <sip:a@b>', "<sip:a@b;lr>", "sip:a@b", '"" <tel:+1>', "Al B <sip:x>"]),
    st.lists(st.sampled_from([";x=1", ";tag", ";TAG=o", ";tag=old", ";y"]), max_size=3),
    st.sampled_from(["new", "a-b.c"]),
)
def test_tagged_text_is_the_tagged_copy_written(base: str, params: list[str], tag: str) -> None:
    address = parse_name_addr(base + "".join(params))
    assert address.tagged_text(tag) == str(address.with_tag(tag))


def test_memos_keep_only_short_texts() -> None:
    fields._SMALL_INTS.clear()
    fields._VIA_HEADS.clear()
    validate._MEDIA_TYPES.clear()
    assert parse_int_header(" " * 50 + "7", "X") == 7
    assert parse_via("SIP/2.0/UDP " + "h" * 200 + ";branch=z9hG4bK1").host == "h" * 200
    assert _valid_media_type("application/" + "x" * 200) == "application/" + "x" * 200
    assert parse_int_header("7", "X") == 7
    assert not fields._VIA_HEADS and not validate._MEDIA_TYPES
    assert list(fields._SMALL_INTS) == ["7"]
    fields._SMALL_INTS.clear()
