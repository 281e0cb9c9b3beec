"""The registration driver: runs :class:`sbc.sip.registration.Registration` on the engine.

One task owns the sans-I/O core. It hands every REGISTER the core produces to the engine, feeds
the responses (and the engine's synthetic 408/503) back in, sleeps until the core's next
deadline, and turns the core's events into log lines and metrics: each attempt at info (target,
transport, expires), each challenge at debug, each failure at warning with its ``cause``:
``status`` when the registrar answered (its status and reason), ``timeout`` when nothing came
back, ``transport_error`` (the OS error) when the REGISTER could not be sent; the engine's
synthetic 408/503 are never reported as the registrar's status. A second task sends the
keep-alives that hold NAT bindings open: CRLFCRLF on the TCP/TLS connection to 3CX (RFC 5626
§4.4.1), and on UDP an OPTIONS (or, with ``keepalive = "crlf"``, a CRLF datagram where the
transports can send one).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from typing import Protocol

import structlog

from sbc.net.addresses import Destination
from sbc.net.engine import RequestTarget, SipEngine
from sbc.sip.message import Request
from sbc.sip.registration import (
    BindingExpired,
    ContactRewritten,
    ExpiresRaised,
    Output,
    Registered,
    Registration,
    RegistrationConfig,
    RegistrationFailed,
    RequestReady,
    Unregistered,
)

__all__ = ["RegistrationDriver", "RegistrationObserver"]

log = structlog.get_logger(__name__)

KEEPALIVE_MODES = ("options", "crlf", "off")
# Stopping while not registered, with a REGISTER in flight: its answer is awaited this long (a
# 200 would leave a binding to remove); silence means nothing was registered, and nothing is
# sent. Short, so that stopping against a silent PBX takes well under a second.
UNREGISTERED_STOP_WAIT = 0.5
CRLF_PING = b"\r\n\r\n"  # RFC 5626 §4.4.1: the client's keep-alive ping
_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


class RegistrationObserver(Protocol):
    """What the driver reports to (``sbc.ops.metrics.Metrics`` implements it)."""

    def set_registered(self, value: bool) -> None: ...

    def register_attempted(self) -> None: ...

    def register_failed(self, status: int | None, reason: str) -> None: ...


def _token() -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(20))


class RegistrationDriver:
    """Keeps the extension registered with 3CX until :meth:`stop`.

    ``target`` is where REGISTERs go (a SIP URI with the PBX's host, port and transport), or
    None for the registrar URI itself. ``rng`` draws the backoff jitter (seed it in tests).
    """

    def __init__(
        self,
        engine: SipEngine,
        config: RegistrationConfig,
        *,
        target: RequestTarget = None,
        keepalive: str = "options",
        keepalive_interval: float = 25.0,
        observer: RegistrationObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if keepalive not in KEEPALIVE_MODES:
            raise ValueError(f"keepalive must be one of {KEEPALIVE_MODES}, got {keepalive!r}")
        if keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive")
        self.engine = engine
        self.config = config
        self.target = target
        self.keepalive = keepalive
        self.keepalive_interval = keepalive_interval
        self.observer = observer
        self._rng = rng or random.Random()
        self.core = Registration(config, token=_token, fraction=self._rng.random)
        self._wake = asyncio.Event()
        self._registered_event = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        # Where the last REGISTER went: keep-alives follow it.
        self._destination: Destination | None = None
        self._challenged = False  # the next REGISTER answers a challenge (logged at debug)
        self._unregister_sent = False
        self._local_failure: str | None = None  # why the engine failed the last REGISTER
        self._settled = asyncio.Event()  # the first attempt succeeded or failed
        self.log = log.bind(call_id=self.core.call_id, aor=str(config.aor))

    # -- public ------------------------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self.core.registered

    @property
    def destination(self) -> Destination | None:
        return self._destination

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.core.start(loop.time())
        self._task = asyncio.create_task(self._run(), name="registration")
        if self.keepalive != "off":
            self._keepalive_task = asyncio.create_task(self._keepalives(), name="keepalive")

    async def wait_registered(self) -> None:
        """Return once registered (for tests and start-up ordering)."""
        await self._registered_event.wait()

    async def wait_settled(self) -> None:
        """Return once the first attempt ended: registered, or failed and retrying."""
        await self._settled.wait()

    async def stop(self, unregister_wait: float = 2.0) -> None:
        """Unregister (Expires: 0) and wait up to ``unregister_wait`` seconds for the answer.

        Nothing is sent when nothing is registered: a REGISTER still in flight then gets
        :data:`UNREGISTERED_STOP_WAIT` to be answered (a 200 is removed again), no more."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive_task
            self._keepalive_task = None
        if self._task is None:
            return
        registered = self.core.registered
        if not self.core.terminated:
            self.core.stop(asyncio.get_running_loop().time())
            self._wake.set()
        wait = unregister_wait if registered else min(unregister_wait, UNREGISTERED_STOP_WAIT)
        try:
            await asyncio.wait_for(self._done.wait(), wait)
        except TimeoutError:
            if registered or self.core.in_flight is None or self._unregister_sent:
                self.log.warning("unregister_unanswered", waited=wait)
            else:
                self.log.info("register_abandoned", detail="stopped before the registrar answered")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for task in list(self._sends):
            task.cancel()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self.observer is not None:
            self.observer.set_registered(False)

    # -- the core's loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                if await self._step():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug (a ProtocolError from the core, say). Silently losing the registration
                # is the failure this driver exists to prevent: log it and keep going.
                self.log.exception("registration_loop_failed")
                await asyncio.sleep(1.0)

    async def _step(self) -> bool:
        """Handle the core's output, then wait for input or its deadline; True when done."""
        loop = asyncio.get_running_loop()
        self._flush()
        if self.core.terminated:
            self._done.set()
            return True
        deadline = self.core.next_deadline()
        self._wake.clear()
        if deadline is None:
            await self._wake.wait()
        else:
            delay = deadline - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        now = loop.time()
        if deadline is not None and now >= deadline:
            self.core.handle_timer(now)
        return False

    def _flush(self) -> None:
        for output in self.core.take_outputs():
            self._handle(output)
        self._challenged = False  # a challenge not answered (too many) leaves no mark
        if self.observer is not None:
            self.observer.set_registered(self.core.registered)
        if self.core.registered:
            self._registered_event.set()
        else:
            self._registered_event.clear()

    def _handle(self, output: Output) -> None:
        if isinstance(output, RequestReady):
            if self.observer is not None and not output.unregister:
                self.observer.register_attempted()
            self._log_sending(output)
            task = asyncio.create_task(self._send(output.request))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        elif isinstance(output, Registered):
            self._settled.set()
            self.log.info(
                "registration_refreshed" if output.refreshed else "registered",
                contact=output.contact,
                expires=output.expires,
                refresh_in=round(output.refresh_at - output.expires_at + output.expires, 1),
            )
        elif isinstance(output, RegistrationFailed):
            # Logged once per failure, with what the registrar said or, when it said nothing,
            # what went wrong here (docs/architecture.md, "Logging").
            self._settled.set()
            self.log.warning(
                "registration_failed",
                **self._cause(output),
                failures=output.failures,
                retry_in=round(output.retry_in, 1),
            )
            if self.observer is not None:
                self.observer.register_failed(output.status, output.reason)
        elif isinstance(output, BindingExpired):
            self.log.warning("registration_expired")
        elif isinstance(output, ContactRewritten):
            self.log.info("contact_rewritten", old=output.old, new=output.new)
        elif isinstance(output, ExpiresRaised):
            self.log.info(
                "register_interval_too_brief",
                requested=output.requested,
                min_expires=output.min_expires,
            )
        elif isinstance(output, Unregistered):
            self.log.info("unregistered", status=output.status, reason=output.reason)

    def _log_sending(self, output: RequestReady) -> None:
        request = output.request
        fields = {
            "target": str(self.target or request.uri),
            "transport": self.config.transport,
            "expires": request.headers.get("Expires"),
            "cseq": request.cseq.seq,
        }
        if output.unregister:
            self._unregister_sent = True
            self.log.info("unregistering", **fields)
        elif self._challenged:
            self.log.debug("register_answering_challenge", **fields)
        else:
            self.log.info("register_attempt", attempt=self.core.failures + 1, **fields)
        self._challenged = False

    def _cause(self, failure: RegistrationFailed) -> dict[str, object]:
        """Log fields saying why an attempt failed: the registrar's status only when it sent
        one; the local failure otherwise."""
        local, self._local_failure = self._local_failure, None
        if failure.status is not None:
            return {"cause": "status", "status": failure.status, "reason": failure.reason}
        if local is None and "timed out" in failure.reason:
            return {"cause": "timeout", "reason": failure.reason}
        if local == "timeout":
            return {"cause": "timeout", "reason": "no answer from the registrar"}
        return {"cause": "transport_error", "transport_error": local or failure.reason}

    async def _send(self, request: Request) -> None:
        loop = asyncio.get_running_loop()
        try:
            handle = self.engine.send_request(request, self.target)
            async for response in handle:
                if handle.destination is not None:
                    self._destination = handle.destination
                failure = handle.local_failure if response.status >= 200 else None
                if failure is not None:
                    # The engine's own 408/503 (RFC 3261 §8.1.3.1): the registrar said nothing.
                    if self.core.in_flight is request:
                        self._local_failure = failure
                        reason = "request timed out" if failure == "timeout" else failure
                        self.core.transport_failed(loop.time(), reason)
                else:
                    if response.status in (401, 407):
                        self._challenged = True
                        self.log.debug(
                            "register_challenged",
                            status=response.status,
                            cseq=response.cseq.seq,
                        )
                    self.core.receive_response(response, loop.time())
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The engine reports transport trouble as a synthetic 503; anything raised here
            # is unexpected, but must still count as a failed attempt, not kill the loop.
            self.log.exception("register_send_failed")
            if self.core.in_flight is request:
                self.core.transport_failed(loop.time(), f"send failed: {exc}")
                self._wake.set()

    # -- keep-alives -------------------------------------------------------------------------------
    async def _keepalives(self) -> None:
        while not self.core.terminated:
            await asyncio.sleep(self.keepalive_interval)
            dest = self._destination
            if dest is None or not self.core.registered:
                continue
            try:
                if dest.transport != "udp":
                    self._stream_ping(dest)
                elif self.keepalive == "crlf":
                    self._datagram_ping(dest)
                else:
                    await self._options_ping()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("keepalive_failed", dest=str(dest))

    def _stream_ping(self, dest: Destination) -> None:
        conn = self.engine.transports.connection_to(dest.transport, dest.host, dest.port)
        if conn is None or not conn.write(CRLF_PING):
            # RFC 5626 §4.4.1: the flow is gone; register again over a new one.
            self.log.info("registrar_connection_lost", dest=str(dest))
            self.core.flow_lost(asyncio.get_running_loop().time())
            self._wake.set()

    def _datagram_ping(self, dest: Destination) -> None:
        # RFC 5626 §4.4.2 defines STUN for UDP flows; a bare CRLFCRLF datagram is what
        # SIP phones send to hold a NAT binding open, and every SIP parser skips it.
        self.engine.transports.send_raw(dest, CRLF_PING)

    async def _options_ping(self) -> None:
        handle = self.engine.send_request(self.core.keepalive_options(), self.target)
        response = await handle
        if response.status >= 300 and response.status not in (405, 501):
            # Any answer proves the path; only silence or a local failure is worth a line.
            self.log.debug("keepalive_options_answer", status=response.status)
