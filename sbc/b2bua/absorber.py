"""What a bridged call answers itself inside its dialogs, instead of forwarding.

Neither peer sees the other's in-dialog requests (docs/peers.md): a re-INVITE or UPDATE on any
leg (hold, resume, session refresh) is answered here through the media layer, the PBX's session
timer (RFC 4028) is renegotiated by its refreshes, and SIP INFO DTMF from the caller goes to
the far side as RFC 4733 events. Every 2xx sbc sends to an INVITE, the first one included, is
repeated until its ACK (RFC 3261 §13.3.1.4).

What those answers need between requests lives on the :class:`~sbc.b2bua.leg.Leg` (the last SDP
sbc sent on it, its session timer and when it was refreshed); the :class:`Absorber` only keeps
the ACKs awaited and which legs have a re-INVITE pending. The call (``sbc/b2bua/call.py``) owns
one and hands it each absorbed request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from structlog.typing import FilteringBoundLogger

from sbc.b2bua.leg import Bridge, Leg, glare_wait
from sbc.b2bua.messages import (
    BridgeConfig,
    Peer,
    SessionTimer,
    negotiate_session_timer,
    parse_dtmf_info,
    pbx_dialog_headers,
)
from sbc.net.engine import IncomingRequest
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.errors import SipError
from sbc.sip.message import Request, Response

HeaderList = tuple[tuple[str, str], ...]

__all__ = ["Absorber"]


# No re-INVITE pending: one empty frozenset for every call (each frozenset() is a new one,
# 216 bytes held by every held call).
_NONE_PENDING: frozenset[Leg] = frozenset()


def _no_bridge() -> Bridge | None:
    return None


def _no_spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
    coro.close()
    raise RuntimeError("the call has ended")


class Absorber:
    """The in-dialog answers of one call; ``bridge`` gives the call's bridge (legs and media
    session) once it exists, ``spawn`` runs a coroutine as one of the call's tasks."""

    __slots__ = ("_acks", "_bridge", "_reinvite_pending", "_spawn", "config", "log")

    def __init__(
        self,
        *,
        config: BridgeConfig,
        bridge: Callable[[], Bridge | None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self._bridge = bridge
        self._spawn = spawn
        self.log = log
        self._acks: dict[tuple[Leg, int], asyncio.Future[Request | None]] = {}
        # A frozenset, replaced on change: the empty one is shared (an empty set is 216 bytes
        # of every held call), and re-INVITEs are rare.
        self._reinvite_pending: frozenset[Leg] = _NONE_PENDING

    def dispose(self) -> None:
        """The call ended: let go of its bridge and task runner (closures over the call)."""
        self._bridge = _no_bridge
        self._spawn = _no_spawn
        self._acks.clear()
        self._reinvite_pending = _NONE_PENDING

    def ack_arrived(self, leg: Leg, request: Request) -> None:
        """The ACK of a 2xx sbc sent on ``leg`` (copies of it are ignored)."""
        waiter = self._acks.get((leg, request.cseq.seq))
        if waiter is not None and not waiter.done():
            waiter.set_result(request)

    async def send_2xx(
        self, leg: Leg, incoming: IncomingRequest, response: Response
    ) -> Request | None:
        """Send a 2xx to an INVITE and repeat it until its ACK (RFC 3261 §13.3.1.4); returns
        the ACK (it carries the answer when the 2xx held an offer), None when none came."""
        seq = response.cseq.seq
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[Request | None] = loop.create_future()
        self._acks[(leg, seq)] = acked
        resend: _Resend | None = None
        try:
            incoming.send(response)
            resend = _Resend(loop, acked, incoming, response, self.config.t1, self.config.t2)
            return await acked
        finally:
            if resend is not None:
                resend.stop()
            self._forget((leg, seq), acked)

    def send_2xx_then(
        self,
        leg: Leg,
        incoming: IncomingRequest,
        response: Response,
        settled: Callable[[Request | None], None],
    ) -> None:
        """:meth:`send_2xx` without a task to await it (the 200 that answers a call):
        ``settled`` gets the ACK, or None when none came; never once :meth:`cancel_waits`
        (the call ending) cancelled the wait."""
        seq = response.cseq.seq
        key = (leg, seq)
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[Request | None] = loop.create_future()
        self._acks[key] = acked
        try:
            incoming.send(response)
        except BaseException:
            del self._acks[key]
            raise
        resend = _Resend(loop, acked, incoming, response, self.config.t1, self.config.t2)

        def done(future: asyncio.Future[Request | None]) -> None:
            resend.stop()
            self._forget(key, future)
            if not future.cancelled():
                settled(future.result())

        acked.add_done_callback(done)

    def _forget(self, key: tuple[Leg, int], acked: asyncio.Future[Request | None]) -> None:
        """The wait for ``key``'s ACK is over: drop it (unless a newer wait took the key)."""
        if self._acks.get(key) is acked:
            del self._acks[key]
        if not self._acks:
            # A dict that held an entry keeps its table (160 bytes more, for the whole held
            # call); a new empty one has none.
            self._acks = {}

    def cancel_waits(self) -> None:
        """The call ends: stop every 2xx still repeated for want of its ACK."""
        for acked in list(self._acks.values()):
            acked.cancel()

    async def reinvite(self, leg: Leg, incoming: IncomingRequest) -> None:
        """Answer a re-INVITE here (hold, resume, refresh); never forwarded (docs/peers.md)."""
        if leg in self._reinvite_pending or leg.invites_in_progress:
            # RFC 3261 §14.2: one INVITE transaction at a time each way, and 491 to a
            # re-INVITE crossing one sbc sent (glare; the peer retries after §14.1's wait).
            incoming.respond(491)
            return
        request = incoming.request
        timer = self._renegotiate(leg, request)
        body = await self._reoffer(leg, request)
        headers = self._refresh_headers(leg, request, timer, has_body=bool(body))
        response = incoming.response(200, headers=headers, body=body)
        self._reinvite_pending |= {leg}
        leg.log.info("reinvite_absorbed", cseq=request.cseq.seq, sdp=bool(request.body))

        async def answer() -> None:
            try:
                if await self.send_2xx(leg, incoming, response) is None:
                    leg.log.warning("reinvite_ack_missing")
            finally:
                self._reinvite_pending = (self._reinvite_pending - {leg}) or _NONE_PENDING

        self._spawn(answer())

    async def update(self, leg: Leg, incoming: IncomingRequest) -> None:
        """RFC 3311: an UPDATE with SDP is a re-offer, without it a session refresh."""
        request = incoming.request
        if request.body and leg.invites_in_progress:
            incoming.respond(491)  # RFC 3311 §5.2: an offer crossing sbc's re-INVITE offer
            return
        timer = self._renegotiate(leg, request)
        body = await self._reoffer(leg, request) if request.body else b""
        headers = self._refresh_headers(leg, request, timer, has_body=bool(body))
        incoming.respond(200, headers=headers, body=body)
        leg.log.info("update_absorbed", sdp=bool(request.body))

    async def dtmf_info(self, leg: Leg, incoming: IncomingRequest) -> None:
        """SIP INFO DTMF from the caller: Retell answers INFO 405 (docs/peers.md), so the digit
        goes to the far side as RFC 4733 events when the media layer can inject them; the INFO
        is answered 200 either way, and a digit that could not be relayed is logged."""
        incoming.respond(200)
        dtmf = parse_dtmf_info(incoming.request.body)
        bridge = self._bridge()
        media = None if bridge is None else bridge.media
        if dtmf is None or bridge is None or media is None or bridge.side_of(leg) != "a":
            leg.log.info("dtmf_info_ignored", body=len(incoming.request.body))
            return
        digit, duration = dtmf
        try:
            relayed = await media.send_dtmf("b", digit, duration)
        except SipError as exc:  # a media server that failed the request (rtpengine)
            self.log.warning("dtmf_info_not_relayed", digit=digit, error=exc.detail)
            return
        event = "dtmf_info_relayed" if relayed else "dtmf_info_not_relayed"
        self.log.info(event, digit=digit, duration=duration, backend=media.stats()["backend"])

    async def refresh(self, leg: Leg, *, allows_update: bool) -> int:
        """RFC 4028 §7.4: sbc refreshes the PBX's session on ``leg``: UPDATE without SDP when
        the PBX allows it (RFC 3311), else a re-INVITE offering the SDP it already has.
        Returns the final status (408 or 481: the dialog is gone)."""
        timer = leg.timer
        assert timer is not None
        for attempt in range(2):
            headers = [("Contact", leg.local.contact), *timer.refresh_headers]
            if allows_update:
                request = leg.in_dialog("UPDATE", headers=tuple(headers))
            else:
                headers.append(("Content-Type", "application/sdp"))
                request = leg.in_dialog("INVITE", headers=tuple(headers), body=leg.sdp_sent)
            response = await leg.request(request)
            leg.log.info("session_refreshed", method=request.method, status=response.status)
            if request.method == "INVITE" and 200 <= response.status < 300:
                await leg.send_ack(response)
            if response.status != 491 or attempt or not leg.up:
                break
            # Glare (RFC 3261 §14.1): the peer's own re-INVITE crossed this one; once more
            # after the wait, a new transaction with a new CSeq.
            await asyncio.sleep(glare_wait(leg))
        return response.status

    async def _reoffer(self, leg: Leg, request: Request) -> bytes:
        """The SDP answer for a re-offer on ``leg`` (or, with none, our last SDP as an offer)."""
        bridge = self._bridge()
        side = None if bridge is None else bridge.side_of(leg)
        if not request.body or bridge is None or bridge.media is None or side is None:
            return leg.sdp_sent
        answer = serialize_sdp(await bridge.media.reoffer(side, parse_sdp(request.body)))
        leg.sdp_sent = answer
        return answer

    def _renegotiate(self, leg: Leg, request: Request) -> SessionTimer | None:
        """RFC 4028 §9: every refresh request renegotiates the PBX's timer (422 when too
        short); none is ever run toward Retell."""
        if leg.peer is not Peer.PBX:
            return None
        timer = negotiate_session_timer(request, self.config.min_session_expires)
        leg.timer = timer
        leg.refreshed_at = _loop_time()
        return timer

    def _refresh_headers(
        self, leg: Leg, request: Request, timer: SessionTimer | None, *, has_body: bool
    ) -> HeaderList:
        if leg.peer is Peer.PBX:
            return pbx_dialog_headers(
                request,
                leg.local,
                user_agent=self.config.user_agent,
                timer=timer,
                has_body=has_body,
            )
        items = [("Contact", leg.local.contact), ("Allow", leg.allow)]
        if has_body:
            items.append(("Content-Type", "application/sdp"))
        return tuple(items)


class _Resend:
    """The copies of a 2xx until its ACK (RFC 3261 §13.3.1.4): one timer handle re-armed at
    T1, 2*T1... capped at T2, that gives up (``acked`` gets None) after 64*T1 or once the
    transaction is gone. Callbacks, not a loop of ``wait_for(shield(...))``, which cost two
    futures and a timer per wait for every call answered."""

    __slots__ = (
        "_acked", "_deadline", "_incoming", "_interval", "_loop", "_response", "_t2", "_timer",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        acked: asyncio.Future[Request | None],
        incoming: IncomingRequest,
        response: Response,
        t1: float,
        t2: float,
    ) -> None:
        self._loop = loop
        self._acked = acked
        self._incoming = incoming
        self._response = response
        self._interval = t1
        self._t2 = t2
        self._deadline = loop.time() + 64 * t1
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        wait = min(self._interval, self._deadline - self._loop.time())
        if wait <= 0:
            self._give_up()
        else:
            self._timer = self._loop.call_later(wait, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._acked.done():
            return
        if self._loop.time() >= self._deadline:
            self._give_up()  # no copy at the very moment of giving up
            return
        try:
            self._incoming.send(self._response)
        except SipError:
            self._give_up()  # the transaction is gone (Timer L)
            return
        self._interval = min(2 * self._interval, self._t2)
        self._arm()

    def _give_up(self) -> None:
        if not self._acked.done():
            self._acked.set_result(None)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
