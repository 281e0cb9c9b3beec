"""Request / Response to bytes (RFC 3261 §7).

Headers are written in order under their canonical names (``Headers`` stores them so) as
``Name: value``. ``Content-Length`` is always recomputed from the body: it replaces the first
given Content-Length where it stood (others are dropped), or is appended after the last header.
Values are never folded. A CR or LF inside a start line, name or value raises ``ValueError``:
that is a bug in whoever built the message (header injection), not a protocol error.
"""

from __future__ import annotations

from sbc.sip.message import Request, Response

Message = Request | Response


def serialize(msg: Message) -> bytes:
    if isinstance(msg, Request):
        lines = [f"{msg.method} {msg.uri} {msg.version}"]
    else:
        lines = [f"{msg.version} {msg.status:03d} {msg.reason}"]
    body = msg.body
    length_line = f"Content-Length: {len(body)}"
    placed = False
    append = lines.append
    # The fields' tuple itself (Headers.items() returns it): a method call less a message.
    for name, value in msg.headers._items:
        if name == "Content-Length":
            if not placed:
                append(length_line)
                placed = True
            continue
        append(f"{name}: {value}")
    if not placed:
        append(length_line)
    append("")
    append("")
    # A CR or LF inside a line, looked for in the lines joined without separators: the join
    # is a memcpy and "in" a memchr, several times cheaper than counting the line breaks of
    # the joined message with str.count (a character at a time).
    joined = "".join(lines)
    if "\n" in joined or "\r" in joined:
        raise ValueError("CR or LF inside a start line, header name or header value")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body


def serialized_size(msg: Message) -> int:
    """``len(serialize(msg))`` without writing the message out: what RFC 3261 §18.1.1's size
    rule needs to know of a request before its Via, and so its bytes, are final."""
    if isinstance(msg, Request):
        start = f"{msg.method} {msg.uri} {msg.version}"
    else:
        start = f"{msg.version} {msg.status:03d} {msg.reason}"
    body = msg.body
    # start line, Content-Length line and the empty line, each with its CRLF, and the body
    size = _encoded_len(start) + len(f"Content-Length: {len(body)}") + 6 + len(body)
    # each field as "name: value" and CRLF; a given Content-Length is replaced (counted above)
    fields = [name + value for name, value in msg.headers.items() if name != "Content-Length"]
    return size + _encoded_len("".join(fields)) + 4 * len(fields)


def _encoded_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogateescape"))
