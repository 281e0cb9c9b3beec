"""Errors that carry the SIP status to answer with (docs/architecture.md, "Errors").

The shell turns any :class:`SipError` into a response in one place; every other exception is a
bug. Subclasses only set ``status`` and ``reason``; ``headers`` holds extra header fields the
response must carry (``Unsupported`` for 420, ``Accept`` for 415, ``Retry-After`` for 503...).
"""

from __future__ import annotations


class SipError(Exception):
    """Base of every protocol error. ``status`` is what a request that caused it is answered."""

    status: int = 500
    reason: str = "Server Internal Error"

    def __init__(self, detail: str = "", *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        self.headers = headers


class ParseError(SipError):
    """Malformed bytes: the parser's own (and only) error type."""

    status = 400
    reason = "Bad Request"


class LimitExceeded(ParseError):
    """A message over one of the parser's limits (:class:`sbc.sip.parser.ParseLimits`): too many
    header fields or Via entries, a Request-URI too long. ``limit`` names which one (metrics)."""

    def __init__(self, detail: str = "", *, limit: str = "") -> None:
        super().__init__(detail)
        self.limit = limit


class BadRequest(SipError):
    """Well-formed bytes, semantically wrong request (missing or duplicated fields...)."""

    status = 400
    reason = "Bad Request"


class Forbidden(SipError):
    status = 403
    reason = "Forbidden"


class NotFound(SipError):
    status = 404
    reason = "Not Found"


class MethodNotAllowed(SipError):
    status = 405
    reason = "Method Not Allowed"


class NotAcceptable(SipError):
    status = 406
    reason = "Not Acceptable"


class ProxyAuthenticationRequired(SipError):
    """RFC 3261 §22.3: the request needs credentials; ``headers`` carry Proxy-Authenticate."""

    status = 407
    reason = "Proxy Authentication Required"


class UnsupportedMediaType(SipError):
    status = 415
    reason = "Unsupported Media Type"


class UnsupportedUriScheme(SipError):
    status = 416
    reason = "Unsupported URI Scheme"


class BadExtension(SipError):
    status = 420
    reason = "Bad Extension"


class CallDoesNotExist(SipError):
    status = 481
    reason = "Call/Transaction Does Not Exist"


class TooManyHops(SipError):
    status = 483
    reason = "Too Many Hops"


class NotAcceptableHere(SipError):
    status = 488
    reason = "Not Acceptable Here"


class RequestPending(SipError):
    status = 491
    reason = "Request Pending"


class ServiceUnavailable(SipError):
    status = 503
    reason = "Service Unavailable"


class NotImplementedMethod(SipError):
    """RFC 3261 §21.5.2: a method this UA implements for no peer at all."""

    status = 501
    reason = "Not Implemented"


class VersionNotSupported(SipError):
    status = 505
    reason = "Version Not Supported"


class MessageTooLarge(SipError):
    status = 513
    reason = "Message Too Large"


class ProtocolError(SipError):
    """A state machine was fed an input its transition table has no entry for.

    This is a bug in the caller or a peer misbehaving in a way that has no status of its own;
    the shell logs it and answers 500 when a request is pending.
    """

    status = 500
    reason = "Server Internal Error"


class RequestOutOfOrder(SipError):
    """RFC 3261 §12.2.2: an in-dialog request whose CSeq is lower than the last one seen."""

    status = 500
    reason = "Server Internal Error"
