"""Fast paths of the SIP core (round 3 of issue 12), each compared with the general code it
stands in for: the Via head memo, CSeq, parameter lookups."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip import fields
from sbc.sip.errors import ParseError
from sbc.sip.fields import (
    CSeq,
    Params,
    _parse_cseq,
    _parse_via,
    find_param,
    get_param,
    parse_cseq,
    parse_via,
)


def outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return parse(text)
    except ParseError as exc:
        return ("ParseError", str(exc))


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
