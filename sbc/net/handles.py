"""What the engine hands to the layers above: incoming requests to answer and sent requests
to await.

:class:`IncomingRequest` wraps a server transaction (answer it with ``respond``);
:class:`OutgoingRequest` is the handle of a request sent with ``SipEngine.send_request``:
``async for response in handle`` yields its responses up to the final one, ``await handle``
returns the final one; or ``handle.subscribe(callback)`` has each response handed over as
the engine delivers it, with no task or future (a call's INVITE, ``Leg.start_invite``).

This module does not import the engine: an :class:`IncomingRequest` answers through any
:class:`Responder`, and the engine feeds an :class:`OutgoingRequest` through its public
engine-side methods (``deliver``, ``mark_sent``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol

from sbc.net.addresses import Destination
from sbc.net.randomness import random_bytes
from sbc.sip import ids
from sbc.sip.errors import SipError
from sbc.sip.message import Request, Response
from sbc.sip.transaction import build_response
from sbc.sip.uri import SipUri

RequestTarget = str | SipUri | Destination | None


def error_response(request: Request, error: SipError, *, to_tag: str | None = None) -> Response:
    """The one place a :class:`SipError` becomes a response (docs/architecture.md, Errors)."""
    return build_response(
        request, error.status, error.reason, to_tag=to_tag, headers=tuple(error.headers)
    )


def new_tag() -> str:
    return ids.new_tag(random_bytes(8))


class Responder(Protocol):
    """What sends a response through a server transaction (the engine)."""

    def respond(self, key: str, response: Response) -> None: ...


class IncomingRequest:
    """A request that opened a server transaction; answer it with :meth:`respond`."""

    __slots__ = ("_responder", "cancelled", "final_sent", "key", "local_tag", "request", "source")

    def __init__(
        self,
        responder: Responder,
        key: str,
        request: Request,
        source: Destination,
        to_tag: str | None,
    ) -> None:
        self._responder = responder
        self.key = key
        self.request = request
        self.source = source
        self.final_sent = False
        self.cancelled = False
        # RFC 3261 §8.2.6.2: a response to a request without To tag carries one, the same in
        # every response of the transaction (one dialog per UAS).
        self.local_tag: str | None = new_tag() if to_tag is None else None

    @property
    def method(self) -> str:
        return self.request.method

    def response(
        self,
        status: int,
        reason: str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """Build (without sending) a response carrying this transaction's To tag."""
        to_tag = self.local_tag if status > 100 else None
        return build_response(
            self.request, status, reason, to_tag=to_tag, headers=tuple(headers), body=body
        )

    def respond(
        self,
        status: int,
        reason: str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """Build and send a response; returns it."""
        response = self.response(status, reason, headers=headers, body=body)
        self.send(response)
        return response

    def send(self, response: Response) -> None:
        """Send a response built elsewhere (it must belong to this request)."""
        if response.status >= 200:
            self.final_sent = True
        self._responder.respond(self.key, response)

    def reject(self, error: SipError) -> Response:
        response = error_response(self.request, error, to_tag=self.local_tag)
        self.send(response)
        return response


class OutgoingRequest:
    """One request sent by the engine and the responses to it (possibly over several attempts).

    ``async for response in handle`` yields every response up to and including the final one;
    ``await handle`` returns the final response. ``request`` is the request as last sent (its
    top Via is the one a CANCEL must copy); ``destination`` where it went.

    The engine fills in ``request``, ``destination``, ``key`` and ``attempts`` for each attempt
    and reports through :meth:`mark_sent` and :meth:`deliver`; ``owns_via`` says whether the
    engine writes the top Via (and so may fail over to another destination with a new branch).

    ``local_failure`` is None while the peer answered; when the engine answered itself (the
    synthetic 408 of a timeout, the 503 of a transport failure or of no route, RFC 3261
    §8.1.3.1) it says what went wrong locally ("connect failed: [Errno 111] ...", "timeout"),
    so that a caller never reports such a status as the peer's.
    """

    def __init__(self, request: Request, target: RequestTarget, owns_via: bool) -> None:
        self.request = request
        self.target = target
        self.key: str | None = None
        self.destination: Destination | None = None
        self.responses: list[Response] = []
        self.final: Response | None = None
        self.attempts = 0
        self.owns_via = owns_via
        # The named UDP socket to send from (SipEngine.send_request's ``local``).
        self.local: str | None = None
        self.local_failure: str | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # wait_sent's future, made by its first waiter (nobody on a call's path waits: a
        # future made and resolved for each request sent, and kept by each leg's INVITE for
        # the whole call, was made for nothing); _was_sent says it went out.
        self._sent: asyncio.Future[None] | None = None
        self._was_sent = False
        self._subscriber: Callable[[Response], None] | None = None

    # -- consumer side -------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Response]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Response]:
        index = 0
        while True:
            while index < len(self.responses):
                response = self.responses[index]
                index += 1
                yield response
                if response.status >= 200:
                    return
            await self._changed()

    def __await__(self) -> Generator[Any, None, Response]:
        return self.wait_final().__await__()

    async def wait_final(self) -> Response:
        while self.final is None:
            await self._changed()
        return self.final

    async def wait_sent(self) -> Request:
        """The request as first handed to the transport (Via and branch filled in)."""
        if not self._was_sent:
            if self._sent is None:
                self._sent = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._sent)
        return self.request

    @property
    def done(self) -> bool:
        return self.final is not None

    def subscribe(self, callback: Callable[[Response], None]) -> None:
        """Hand every response to ``callback``: those already delivered at once, the others
        as :meth:`deliver` receives them, in the engine's call (a callback must not raise).
        What ``async for`` does without a task to run it and a future per response: a
        call's INVITE is awaited by nobody but the call's own flow, fed by facts. One
        subscriber; it is let go after the final response (no reference cycle is kept)."""
        self._subscriber = callback
        for response in list(self.responses):
            if response.status >= 200:
                self._subscriber = None
            callback(response)

    # -- engine side ---------------------------------------------------------------------------
    def mark_sent(self) -> None:
        """The request went to the transport: wake :meth:`wait_sent` (idempotent)."""
        self._was_sent = True
        sent = self._sent
        if sent is not None and not sent.done():
            sent.set_result(None)

    def deliver(self, response: Response) -> None:
        """Add a response; a final one ends the request (later ones are ignored)."""
        if self.final is not None:
            return
        self.responses.append(response)
        subscriber = self._subscriber
        if response.status >= 200:
            self.final = response
            self.mark_sent()
            self._subscriber = None
        self._wake()
        if subscriber is not None:
            subscriber(response)

    # -- internals -----------------------------------------------------------------------------
    def _changed(self) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
