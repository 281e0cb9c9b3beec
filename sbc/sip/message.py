"""SIP requests and responses (RFC 3261 §7) as frozen values.

Header values stay text until asked for: the accessors below (``vias``, ``cseq``, ``from_``...)
parse on each call. A B2BUA reads a handful of fields of each message, so parsing all of them up
front would cost more than it saves; building a changed message is ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sbc.sip.errors import BadRequest
from sbc.sip.fields import CSeq, Via, parse_cseq, parse_via
from sbc.sip.headers import Headers
from sbc.sip.uri import NameAddr, Uri, parse_name_addr

SIP_VERSION = "SIP/2.0"

# RFC 3261 §21: default reason phrases for the status codes this project sends or logs.
REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def reason_phrase(status: int) -> str:
    """The default reason phrase for ``status`` (class default when the code is unknown)."""
    if status in REASONS:
        return REASONS[status]
    return REASONS.get((status // 100) * 100, "Unknown")


class _Common:
    """Accessors shared by requests and responses; subclasses provide ``headers``."""

    __slots__ = ()
    headers: Headers

    @property
    def call_id(self) -> str:
        value = self.headers.get("Call-ID")
        if value is None:
            raise BadRequest("missing Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        value = self.headers.get("CSeq")
        if value is None:
            raise BadRequest("missing CSeq")
        return parse_cseq(value)

    @property
    def vias(self) -> list[Via]:
        return [parse_via(v) for v in self.headers.values("Via")]

    @property
    def top_via(self) -> Via:
        values = self.headers.values("Via")
        if not values:
            raise BadRequest("missing Via")
        return parse_via(values[0])

    @property
    def from_(self) -> NameAddr:
        value = self.headers.get("From")
        if value is None:
            raise BadRequest("missing From")
        return parse_name_addr(value)

    @property
    def to(self) -> NameAddr:
        value = self.headers.get("To")
        if value is None:
            raise BadRequest("missing To")
        return parse_name_addr(value)

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag


@dataclass(frozen=True, slots=True)
class Request(_Common):
    method: str
    uri: Uri
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION


@dataclass(frozen=True, slots=True)
class Response(_Common):
    status: int
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def is_provisional(self) -> bool:
        return self.status < 200

    @property
    def is_final(self) -> bool:
        return self.status >= 200


Message = Request | Response
