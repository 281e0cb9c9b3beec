"""The SIP message trace: every message sbc sends or receives, logged at debug level.

On when ``[log] sip_trace = true`` (whatever the level: the trace's own logger,
``sbc.sip_trace``, is then set to debug) or, with ``sip_trace`` unset, when ``[log] level`` is
debug. It is a tap on the engine (``SipEngine.on_message``), beside the call ladders; off, it
costs nothing. Each line (event ``sip_message``) has ``direction`` (``in``: received, ``out``:
sent), ``peer`` (where it came from or went to), ``call_id`` and ``message``: the whole message
with the values of ``Authorization`` and ``Proxy-Authorization`` replaced by ``<redacted>``
(and a password in the Request-URI), so that a trace can be shared without the credentials.
"""

from __future__ import annotations

import logging

import structlog

from sbc.b2bua.ladder import CREDENTIAL_HEADERS, REDACTED, first_line
from sbc.net.addresses import Destination
from sbc.net.engine import MessageTap, SipEngine
from sbc.sip.message import Request, Response

__all__ = ["LOGGER", "SipTrace", "install", "redacted", "tee"]

LOGGER = "sbc.sip_trace"
MAX_BODY = 4096  # characters of a body kept in a trace line

_SECRET = frozenset(name.lower() for name in CREDENTIAL_HEADERS)


def redacted(message: Request | Response) -> str:
    """``message`` as text (CRLF line ends), credentials replaced by ``<redacted>``."""
    start = first_line(message)
    if isinstance(message, Request):
        start += f" {message.version}"
    lines = [start]
    for name, value in message.headers.items():
        lines.append(f"{name}: {REDACTED if name.lower() in _SECRET else value}")
    body = message.body.decode("utf-8", errors="replace")
    if len(body) > MAX_BODY:
        body = body[:MAX_BODY] + f"... ({len(message.body)} bytes)"
    return "\r\n".join(lines) + "\r\n\r\n" + body


class SipTrace:
    """The tap that logs each message (module docstring)."""

    def __init__(self) -> None:
        self.log = structlog.get_logger(LOGGER)

    def __call__(self, direction: str, message: Request | Response, peer: Destination) -> None:
        self.log.debug(
            "sip_message",
            direction=direction,
            peer=str(peer),
            call_id=message.headers.get("Call-ID"),
            message=redacted(message),
        )


def tee(*taps: MessageTap) -> MessageTap:
    """One tap calling each of ``taps`` in order."""

    def both(direction: str, message: Request | Response, peer: Destination) -> None:
        for tap in taps:
            tap(direction, message, peer)

    return both


def install(engine: SipEngine, *, force: bool) -> SipTrace:
    """Add the trace to ``engine``'s tap (beside whatever is there); ``force``: log it even
    when the root level is above debug."""
    if force:
        logging.getLogger(LOGGER).setLevel(logging.DEBUG)
    trace = SipTrace()
    engine.on_message = trace if engine.on_message is None else tee(engine.on_message, trace)
    return trace
