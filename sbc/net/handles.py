"""What the engine hands to the layers above: incoming requests to answer and client
transactions to await.

:class:`IncomingRequest` wraps a server transaction (answer it with ``respond``);
:class:`ClientTransaction` is the handle of a request sent with ``SipEngine.send_request``:
``async for response in handle`` yields its responses up to the final one, ``await handle``
returns the final one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

from sbc.net.addresses import Destination
from sbc.sip import ids
from sbc.sip.errors import SipError
from sbc.sip.message import Request, Response
from sbc.sip.transaction import build_response
from sbc.sip.uri import SipUri

if TYPE_CHECKING:
    from sbc.net.engine import SipEngine

RequestTarget = str | SipUri | Destination | None


def error_response(request: Request, error: SipError, *, to_tag: str | None = None) -> Response:
    """The one place a :class:`SipError` becomes a response (DESIGN.md rule 5)."""
    return build_response(
        request, error.status, error.reason, to_tag=to_tag, headers=tuple(error.headers)
    )


def new_tag() -> str:
    return ids.new_tag(secrets.token_bytes(8))


class IncomingRequest:
    """A request that opened a server transaction; answer it with :meth:`respond`."""

    __slots__ = ("_engine", "cancelled", "final_sent", "key", "local_tag", "request", "source")

    def __init__(
        self,
        engine: SipEngine,
        key: str,
        request: Request,
        source: Destination,
        to_tag: str | None,
    ) -> None:
        self._engine = engine
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
        self._engine.respond(self.key, response)

    def reject(self, error: SipError) -> Response:
        response = error_response(self.request, error, to_tag=self.local_tag)
        self.send(response)
        return response


class ClientTransaction:
    """One request sent by the engine and the responses to it (possibly over several attempts).

    ``async for response in handle`` yields every response up to and including the final one;
    ``await handle`` returns the final response. ``request`` is the request as last sent (its
    top Via is the one a CANCEL must copy); ``destination`` where it went.
    """

    def __init__(self, request: Request, target: RequestTarget, owns_via: bool) -> None:
        self.request = request
        self.target = target
        self.key: str | None = None
        self.destination: Destination | None = None
        self.responses: list[Response] = []
        self.final: Response | None = None
        self.attempts = 0
        self._owns_via = owns_via
        self._destinations: list[Destination] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._sent = asyncio.get_running_loop().create_future()

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
        await asyncio.shield(self._sent)
        return self.request

    @property
    def done(self) -> bool:
        return self.final is not None

    # -- engine side ---------------------------------------------------------------------------
    def _changed(self) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _deliver(self, response: Response) -> None:
        if self.final is not None:
            return
        self.responses.append(response)
        if response.status >= 200:
            self.final = response
            if not self._sent.done():
                self._sent.set_result(None)
        self._wake()
