"""Bencode encoder and strict decoder (sbc.media.bencode)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.media.bencode import MAX_DEPTH, BencodeError, Decoded, decode, encode, to_text

# Values as the decoder returns them: bytes strings, lists, dicts keyed by bytes.
decoded_values = st.recursive(
    st.integers() | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.binary(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@given(decoded_values)
def test_round_trip_decode_of_encode_is_identity(value: Decoded) -> None:
    assert decode(encode(value)) == value


@given(decoded_values)
def test_encoding_is_canonical(value: Decoded) -> None:
    # A decoded canonical encoding re-encodes to the very same bytes.
    data = encode(value)
    assert encode(decode(data)) == data


@given(st.binary(max_size=60))
def test_decoder_never_fails_other_than_with_bencode_error(data: bytes) -> None:
    try:
        value = decode(data)
    except BencodeError:
        return
    # Whatever was accepted is canonical except maybe for dictionary key order.
    assert decode(encode(value)) == value


def test_known_encodings() -> None:
    assert encode(0) == b"i0e"
    assert encode(-42) == b"i-42e"
    assert encode("") == b"0:"
    assert encode("ping") == b"4:ping"
    assert encode("é") == b"2:\xc3\xa9"
    assert encode([1, "a", []]) == b"li1e1:alee"
    assert encode(("x",)) == b"l1:xe"
    assert encode({"command": "ping"}) == b"d7:command4:pinge"
    # Keys are written sorted by their bytes.
    assert encode({"b": 1, "a": 2, b"c": 3}) == b"d1:ai2e1:bi1e1:ci3ee"


def test_ng_offer_shape() -> None:
    msg = {"command": "offer", "call-id": "abc", "flags": ["trust-address"], "sdp": "v=0\r\n"}
    wire = encode(msg)
    assert wire == (b"d7:call-id3:abc7:command5:offer5:flagsl13:trust-addresse3:sdp5:v=0\r\ne")
    assert to_text(decode(wire)) == msg


def test_decoder_accepts_unsorted_keys_as_rtpengine_sends_them() -> None:
    assert decode(b"d6:result2:ok3:sdp3:v=0e") == {b"result": b"ok", b"sdp": b"v=0"}
    assert decode(b"d3:sdp3:v=06:result2:oke") == {b"result": b"ok", b"sdp": b"v=0"}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty input"),
        (b"i01e", "not canonical"),
        (b"i-0e", "not canonical"),
        (b"ie", "not decimal"),
        (b"i-e", "not decimal"),
        (b"i1x2e", "not decimal"),
        (b"i12", "no terminating"),
        (b"04:abcd", "leading zeros"),
        (b"5:abc", "claims 5 bytes"),
        (b"3abc", "no ':'"),
        (b"1x:a", "not decimal"),
        (b"l1:a", "ends inside a list"),
        (b"d1:a", "ends at offset"),
        (b"d1:ai1e", "ends inside a dictionary"),
        (b"di1ei2ee", "not a string"),
        (b"d1:ai1e1:ai2ee", "duplicate dictionary key"),
        (b"i1ei2e", "trailing bytes"),
        (b"x", "unexpected byte"),
        (b"le ", "trailing bytes"),
    ],
)
def test_malformed_input_is_rejected_with_a_clear_error(data: bytes, fragment: str) -> None:
    with pytest.raises(BencodeError, match=fragment):
        decode(data)


def test_nesting_limit() -> None:
    allowed: list[Any] = []
    for _ in range(MAX_DEPTH - 1):
        allowed = [allowed]
    assert decode(b"l" * MAX_DEPTH + b"e" * MAX_DEPTH) == allowed
    assert encode(allowed) == b"l" * MAX_DEPTH + b"e" * MAX_DEPTH
    with pytest.raises(BencodeError, match="nesting deeper"):
        decode(b"l" * (MAX_DEPTH + 2) + b"e" * (MAX_DEPTH + 2))
    deep: list[Any] = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(BencodeError, match="nested deeper"):
        encode(deep)


@pytest.mark.parametrize("bad", [True, 1.5, None, {1: 2}, {"a": object()}])
def test_unencodable_values_are_refused(bad: Any) -> None:
    with pytest.raises(BencodeError):
        encode(bad)


def test_same_key_as_str_and_bytes_is_refused() -> None:
    with pytest.raises(BencodeError, match="duplicate"):
        encode({"a": 1, b"a": 2})


def test_to_text_keeps_undecodable_bytes() -> None:
    wire = b"d1:kl2:\xff\xfei3eee"
    value = to_text(decode(wire))
    assert value == {"k": ["\udcff\udcfe", 3]}
    assert encode(value) == wire
