"""Bencode, the dictionary encoding of rtpengine's NG control protocol.

Written by hand: PyPI has no well-kept, typed bencode library (the common ones are unmaintained
forks without type hints), and the format is four productions long:

    integer  i<decimal>e          no leading zeros, no "-0"
    string   <length>:<bytes>     length in decimal, no leading zeros
    list     l<value>*e
    dict     d(<string><value>)*e

The encoder writes dictionary keys sorted (as the format asks). The decoder accepts keys in any
order, because rtpengine's own replies do not sort them (its NG protocol documentation says so),
but it rejects duplicate keys, trailing bytes, and everything else malformed with a
`BencodeError` that names the offset.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

__all__ = [
    "MAX_DEPTH",
    "BencodeError",
    "Decoded",
    "Encodable",
    "Text",
    "decode",
    "encode",
    "to_text",
]

# Values the encoder takes: str is written as its UTF-8 bytes (surrogate escapes, as made by
# `to_text`, back to the raw bytes); bool is refused (it would
# silently become 0/1); tuples are written as lists.
Encodable = (
    int
    | str
    | bytes
    | Sequence["Encodable"]
    | Mapping[str, "Encodable"]
    | Mapping[bytes, "Encodable"]
    | Mapping[str | bytes, "Encodable"]
)
# Values the decoder gives back: every string as bytes, every list as list, every dict with
# bytes keys.
Decoded = int | bytes | list["Decoded"] | dict[bytes, "Decoded"]

# Nesting deeper than this is refused; NG messages nest three or four levels.
MAX_DEPTH = 64

_DIGITS = frozenset(b"0123456789")


class BencodeError(ValueError):
    """Malformed bencode input, or a value that cannot be bencoded."""


# --- encoding --------------------------------------------------------------------------------


def encode(value: Encodable) -> bytes:
    """Return the bencoding of `value`."""
    out: list[bytes] = []
    _encode_into(value, out, 0)
    return b"".join(out)


def _key_bytes(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8", "surrogateescape")
    raise BencodeError(f"dictionary key must be str or bytes, not {type(key).__name__}")


def _encode_into(value: object, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BencodeError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool):
        raise BencodeError("bool has no bencoding; use an int or a string")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, Mapping):
        items = sorted(((_key_bytes(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        for (a, _), (b, _) in itertools.pairwise(items):
            if a == b:
                raise BencodeError(f"duplicate dictionary key {a!r} (str and bytes spellings)")
        out.append(b"d")
        for key, item in items:
            out.append(b"%d:" % len(key))
            out.append(key)
            _encode_into(item, out, depth + 1)
        out.append(b"e")
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _encode_into(item, out, depth + 1)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode a value of type {type(value).__name__}")


# --- decoding --------------------------------------------------------------------------------


def decode(data: bytes) -> Decoded:
    """Decode exactly one bencoded value filling all of `data`."""
    data = bytes(data)
    if not data:
        raise BencodeError("empty input")
    value, end = _decode_at(data, 0, 0)
    if end != len(data):
        raise BencodeError(f"{len(data) - end} trailing bytes after the value at offset {end}")
    return value


def _decode_at(data: bytes, pos: int, depth: int) -> tuple[Decoded, int]:
    if depth > MAX_DEPTH:
        raise BencodeError(f"nesting deeper than {MAX_DEPTH} levels at offset {pos}")
    if pos >= len(data):
        raise BencodeError(f"input ends at offset {pos} where a value was expected")
    lead = data[pos]
    if lead == 0x69:  # b"i"
        return _decode_int(data, pos)
    if lead in _DIGITS:
        return _decode_string(data, pos)
    if lead == 0x6C:  # b"l"
        items: list[Decoded] = []
        pos += 1
        while True:
            if pos >= len(data):
                raise BencodeError("input ends inside a list")
            if data[pos] == 0x65:  # b"e"
                return items, pos + 1
            item, pos = _decode_at(data, pos, depth + 1)
            items.append(item)
    if lead == 0x64:  # b"d"
        result: dict[bytes, Decoded] = {}
        pos += 1
        while True:
            if pos >= len(data):
                raise BencodeError("input ends inside a dictionary")
            if data[pos] == 0x65:  # b"e"
                return result, pos + 1
            if data[pos] not in _DIGITS:
                raise BencodeError(f"dictionary key at offset {pos} is not a string")
            key, pos = _decode_string(data, pos)
            if key in result:
                raise BencodeError(f"duplicate dictionary key {key!r} before offset {pos}")
            result[key], pos = _decode_at(data, pos, depth + 1)
    raise BencodeError(f"unexpected byte {bytes([lead])!r} at offset {pos}")


def _decode_int(data: bytes, pos: int) -> tuple[int, int]:
    end = data.find(b"e", pos + 1)
    if end < 0:
        raise BencodeError(f"integer at offset {pos} has no terminating 'e'")
    text = data[pos + 1 : end]
    digits = text[1:] if text.startswith(b"-") else text
    if not digits or not all(c in _DIGITS for c in digits):
        raise BencodeError(f"integer at offset {pos} is not decimal: {text!r}")
    if digits.startswith(b"0") and (len(digits) > 1 or text.startswith(b"-")):
        raise BencodeError(f"integer at offset {pos} is not canonical: {text!r}")
    return int(text), end + 1


def _decode_string(data: bytes, pos: int) -> tuple[bytes, int]:
    colon = data.find(b":", pos)
    if colon < 0:
        raise BencodeError(f"string at offset {pos} has no ':' after its length")
    digits = data[pos:colon]
    if not digits or not all(c in _DIGITS for c in digits):
        raise BencodeError(f"string length at offset {pos} is not decimal: {digits!r}")
    if digits.startswith(b"0") and len(digits) > 1:
        raise BencodeError(f"string length at offset {pos} has leading zeros: {digits!r}")
    length = int(digits)
    start = colon + 1
    if start + length > len(data):
        raise BencodeError(
            f"string at offset {pos} claims {length} bytes, only {len(data) - start} remain"
        )
    return data[start : start + length], start + length


# --- helpers -------------------------------------------------------------------------------

Text = int | str | list["Text"] | dict[str, "Text"]


def to_text(value: Decoded) -> Text:
    """Turn every byte string of a decoded value into str (UTF-8; undecodable bytes kept as
    surrogate escapes so nothing is lost)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [to_text(item) for item in value]
    if isinstance(value, dict):
        return {k.decode("utf-8", "surrogateescape"): to_text(v) for k, v in value.items()}
    return value
