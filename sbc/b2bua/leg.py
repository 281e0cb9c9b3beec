"""A call's legs: each one dialog of sbc with one peer, named by the role it plays in the call.

A call has any number of legs (see ``docs/architecture.md``, "A call's legs"):

* the **caller** leg: the PBX's INVITE to the registered extension; sbc is its UAS;
* the **agent** leg: sbc's INVITE to Retell; sbc is its UAC;
* the **human** leg: sbc's INVITE to a PBX queue or extension when the agent hands the caller
  back by a transfer in ``invite`` mode; sbc is its UAC.

A :class:`Bridge` joins two legs through one media session: side ``a`` of the media faces the
leg that called (the caller), side ``b`` the far leg (the agent, and after a transfer the human).

A :class:`Leg` holds what sbc knows of its dialog (the :class:`~sbc.sip.dialog.Dialog` once it
exists, the last SDP sbc sent on it, the final status of its INVITE, the PBX's session timer)
and sends requests inside it: :meth:`Leg.send_invite` and :meth:`Leg.request` answer a digest
challenge with the peer's credentials when the leg has them: the extension's toward the PBX
(3CX challenges what an extension sends inside dialogs too, see ``docs/peers.md``), the trunk's
toward Retell when configured.

What each peer may send inside a dialog is ``messages.HANDLED``, the one table that the
``Allow`` header fields sbc sends are built from; the call's dispatch (``sbc/b2bua/call.py``)
serves exactly those methods and answers any other one 405 with that ``Allow``.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from structlog.typing import FilteringBoundLogger

from sbc.b2bua.messages import LocalAddress, Peer, SessionTimer, allow_header
from sbc.media.base import SIDES, MediaSession, Side
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest, OutgoingRequest, SipEngine
from sbc.sip.dialog import Dialog, DialogState
from sbc.sip.digest import ClientAuth, Credentials
from sbc.sip.fields import parse_via
from sbc.sip.ids import BRANCH_COOKIE, new_branch, new_cnonce
from sbc.sip.message import Request, Response

__all__ = ["Bridge", "Leg", "LegState", "Role", "glare_wait", "hang_up_all"]

HeaderList = tuple[tuple[str, str], ...]


class Role(Enum):
    CALLER = "caller"  # the PBX's call to the extension
    AGENT = "agent"  # sbc's call to Retell
    HUMAN = "human"  # sbc's call to a PBX queue, a transfer by INVITE

    # Members are singletons compared by identity: hash them by identity too (C), not by
    # Enum.__hash__ (a Python call per dict lookup: per-call tables and state machines).
    __hash__ = object.__hash__

    peer: Peer  # set below: a plain attribute, read several times per call (no property call)


for _role in Role:
    _role.peer = Peer.RETELL if _role is Role.AGENT else Peer.PBX
del _role


# The name of the engine's UDP socket of each peer (TransportConfig.udp_sockets), by peer (a
# lookup: Enum.value is a Python call per leg).
_SOCKETS = {peer: peer.value for peer in Peer}


class LegState(Enum):
    OFFERING = "offering"  # INVITE under way (sent, or received and not answered)
    EARLY = "early"  # a provisional response with a tag went or came
    CONFIRMED = "confirmed"  # 2xx sent or received
    ENDED = "ended"  # BYE done, INVITE refused or cancelled


class Leg:
    """One dialog of a call with one peer (see the module docstring)."""

    # Slots: a leg lives as long as its call, and a dict per leg is about 1 KiB of each held
    # call (bench/bench_held.py).
    __slots__ = (
        "__weakref__", "_auth", "_destination", "_log", "_parent_log", "_random", "_user_agent",
        "ack", "call_id", "dialog", "engine", "incoming", "invites_in_progress", "local",
        "local_tag", "outgoing", "refreshed_at", "role", "sdp_sent", "socket", "state", "status",
        "timer",
    )  # fmt: skip

    def __init__(
        self,
        role: Role,
        *,
        local: LocalAddress,
        call_id: str,
        local_tag: str,
        engine: SipEngine,
        random_bytes: Callable[[int], bytes],
        user_agent: str,
        log: FilteringBoundLogger,
        auth: ClientAuth | Credentials | None = None,
    ) -> None:
        self.role = role
        self.local = local
        # The engine's UDP socket named after the peer (`[retell] local_udp_port`): the
        # requests sbc sends on this leg over UDP leave from it when it is open, and their
        # responses are read from it, apart from the other peer's traffic at the SIP port.
        self.socket = _SOCKETS[role.peer]
        self.call_id = call_id
        self.local_tag = local_tag
        self.engine = engine
        self.state = LegState.OFFERING
        self.dialog: Dialog | None = None
        self.sdp_sent = b""  # the last SDP sbc sent on this leg
        self.status: int | None = None  # final status of the leg's INVITE
        self.timer: SessionTimer | None = None  # RFC 4028, PBX legs only
        self.refreshed_at = 0.0  # loop time of the session's last refresh
        self.incoming: IncomingRequest | None = None  # UAS legs: the INVITE received
        self.outgoing: OutgoingRequest | None = None  # UAC legs: the INVITE sent
        self._destination: Destination | None = None  # where it went, once settled
        self.ack: Request | None = None  # UAC legs: our ACK of the 2xx, sent again on copies
        # INVITEs sbc sent in the dialog with no final response yet: a re-INVITE crossing one
        # is answered 491 (RFC 3261 §14.2, glare).
        self.invites_in_progress = 0
        # Bound on first use: a leg logs only when something happens to it (a challenge, its
        # BYE), and a bound logger is a context dict of its own, held for the whole call.
        self._parent_log = log
        self._log: FilteringBoundLogger | None = None
        self._random = random_bytes
        self._user_agent = user_agent
        # Credentials become a ClientAuth on the first challenge: most legs are never
        # challenged, and a ClientAuth (its realm table and answered list) is about 190 bytes
        # of every held call.
        self._auth = auth

    @property
    def log(self) -> FilteringBoundLogger:
        log = self._log
        if log is None:
            log = self._log = self._parent_log.bind(leg=self.role._value_)
        return log

    @log.setter
    def log(self, log: FilteringBoundLogger) -> None:
        self._log = log

    def info(self, event: str, **fields: Any) -> None:
        """``self.log.info(event, **fields)``, without binding the leg's logger for it when
        it is not bound yet: the call's logger given ``leg`` first writes the same line (the
        leg's context is the call's followed by ``leg``). For the lines every call writes
        (its BYEs): two bound loggers fewer a call, each a context dict and its JSON."""
        log = self._log
        if log is None:
            self._parent_log.info(event, leg=self.role._value_, **fields)
        else:
            log.info(event, **fields)

    def __repr__(self) -> str:
        return f"<Leg {self.role.value} {self.state.value} {self.call_id}>"

    def _client_auth(self) -> ClientAuth:
        """What answers a challenge on this leg (only when the leg has credentials)."""
        auth = self._auth
        if isinstance(auth, Credentials):
            auth = self._auth = ClientAuth(auth)
        assert auth is not None
        return auth

    def _authorized(self, challenge: Response, request: Request) -> Request | None:
        """``request`` sent again with the leg's credentials answering ``challenge`` (a 401
        or 407; RFC 3261 §22.2: CSeq + 1, a new branch), or None when they cannot answer it
        (the realm is unknown, or they were refused already). The one place every request of
        a leg (INVITEs, in-dialog requests) answers a challenge."""
        return self._client_auth().authorize(
            challenge, request, new_cnonce(self._random(8)), branch=new_branch(self._random(12))
        )

    @property
    def peer(self) -> Peer:
        return self.role.peer

    @property
    def key(self) -> tuple[str, str]:
        """The dialog id half sbc chose: how requests of this leg are routed to it."""
        return self.call_id, self.local_tag

    @property
    def up(self) -> bool:
        return self.dialog is not None and self.dialog.state is not DialogState.TERMINATED

    @property
    def allow(self) -> str:
        return allow_header(self.peer)

    # -- dialog set-up -------------------------------------------------------------------------
    def answered_as_uas(self, invite: Request, ok: Response) -> None:
        self.dialog = Dialog.from_uas(invite, ok)
        self.status = ok.status
        self.state = LegState.CONFIRMED

    async def send_invite(self, invite: Request, deliver: Callable[[Response], None]) -> None:
        """Send the leg's INVITE and hand every response to ``deliver``, except a 401/407 that
        the leg's credentials answer: RFC 3261 §22.2, the INVITE goes again with them, CSeq + 1
        and a new branch (the transaction layer ACKs the challenge). ``outgoing`` is always the
        INVITE transaction under way (what a CANCEL must name)."""
        request = invite
        for attempt in range(3):
            self.outgoing = outgoing = self.engine.send_request(request, None, self.socket)
            async for response in outgoing:
                if response.status < 200:
                    deliver(response)
            final = await outgoing
            if final.status in (401, 407) and self._auth is not None and attempt < 2:
                retry = self._authorized(final, request)
                if retry is not None:
                    self.log.info("invite_challenged", status=final.status)
                    request = retry
                    continue
                self.log.warning("credentials_refused", status=final.status)
            deliver(final)
            return

    def start_invite(self, invite: Request, deliver: Callable[[Response], None]) -> None:
        """:meth:`send_invite` without a task: the INVITE goes now and each response reaches
        ``deliver`` from the engine's delivery (``OutgoingRequest.subscribe``), a challenge
        answered the same way. For a call's leg b, whose flow reads the responses as facts:
        no task, async iterator and future per response for each call."""
        self.outgoing = outgoing = self.engine.send_request(invite, None, self.socket)
        outgoing.subscribe(functools.partial(self._invite_response, invite, deliver, 0))

    def _invite_response(
        self,
        request: Request,
        deliver: Callable[[Response], None],
        attempt: int,
        response: Response,
    ) -> None:
        """One response to :meth:`start_invite`'s INVITE (the same steps as send_invite)."""
        if response.status < 200:
            deliver(response)
            return
        if response.status in (401, 407) and self._auth is not None and attempt < 2:
            try:
                retry = self._authorized(response, request)
            except Exception:
                # Called by the engine as it delivers: never raise into it; the flow gets the
                # challenge as the INVITE's final response (refused) instead.
                self.log.exception("invite_challenge_failed", status=response.status)
                retry = None
            else:
                if retry is not None:
                    self.log.info("invite_challenged", status=response.status)
                    self.outgoing = outgoing = self.engine.send_request(retry, None, self.socket)
                    outgoing.subscribe(
                        functools.partial(self._invite_response, retry, deliver, attempt + 1)
                    )
                    return
                self.log.warning("credentials_refused", status=response.status)
        deliver(response)

    @property
    def destination(self) -> Destination | None:
        """Where the leg's INVITE went (UAC legs; None for a UAS leg or before it went)."""
        outgoing = self.outgoing
        return self._destination if outgoing is None else outgoing.destination

    def settle(self) -> None:
        """The leg's INVITE is answered and its call up: let go of the transaction's handle,
        which holds the INVITE as sent and every response to it (about 5 KB held for the
        whole call), keeping only where it went. A copy of the 2xx is ACKed from ``ack``."""
        outgoing = self.outgoing
        if outgoing is not None and outgoing.done:
            self._destination = outgoing.destination
            self.outgoing = None

    def confirmed_as_uac(self, response: Response) -> None:
        """A 2xx to the leg's INVITE: the dialog is confirmed (RFC 3261 §13.2.2.4)."""
        assert self.outgoing is not None
        self.dialog = Dialog.from_uac(self.outgoing.request, response)
        self.status = response.status
        self.state = LegState.CONFIRMED

    async def send_ack(self, response: Response, body: bytes = b"") -> None:
        """ACK the 2xx ``response``; ``body`` is the answer when the 2xx held the offer."""
        headers: HeaderList = (("Content-Type", "application/sdp"),) if body else ()
        ack = self.in_dialog("ACK", cseq=response.cseq.seq, headers=headers, body=body)
        self.ack = await self.engine.send_ack(ack, None, self.socket)

    async def answered_as_uac(self, response: Response) -> None:
        """A 2xx to the leg's INVITE: confirm the dialog and ACK it."""
        self.confirmed_as_uac(response)
        await self.send_ack(response)

    def refused(self, status: int) -> None:
        self.status = status
        self.ended()

    async def ack_again(self, response: Response) -> None:
        """RFC 3261 §13.2.2.4: a retransmitted 2xx is ACKed again with the same ACK."""
        if self.ack is not None and 200 <= response.status < 300:
            await self.engine.send_ack(self.ack, None, self.socket)

    # -- requests sbc sends in the dialog ------------------------------------------------------
    def in_dialog(
        self, method: str, *, cseq: int | None = None, headers: HeaderList = (), body: bytes = b""
    ) -> Request:
        assert self.dialog is not None
        # create_request gives the Via its branch: the engine writes the bare cookie (no random
        # draw), so the text is the same for every request on this transport and socket and is
        # parsed once (_parse_via_shape's cache).
        via = _parse_via_shape(
            self.engine.make_via(self.local.transport, self.socket, branch=BRANCH_COOKIE)
        )
        branch = new_branch(self._random(12))
        if self._user_agent:
            headers = (*headers, ("User-Agent", self._user_agent))
        return self.dialog.create_request(
            method, via=via, branch=branch, cseq=cseq, headers=headers, body=body
        )

    async def request(self, request: Request) -> Response:
        """Send ``request`` in the dialog and return the final response; a challenge is
        answered with the peer's credentials when the leg has them (at most twice)."""
        dialog = self.dialog
        assert dialog is not None
        invite = request.method == "INVITE"
        self.invites_in_progress += invite
        try:
            for _ in range(3):
                response = await self.engine.send_request(request, None, self.socket)
                if response.status not in (401, 407) or self._auth is None:
                    break
                retry = self._authorized(response, request)
                if retry is None:
                    self.log.warning("pbx_refused_credentials", method=request.method)
                    break
                dialog.advance_local_cseq(retry.cseq.seq)
                request = retry
        finally:
            self.invites_in_progress -= invite
        dialog.update_from_response(response)
        return response

    async def hang_up(self) -> None:
        """BYE, when the dialog is still up; the leg has ended afterwards whatever the answer."""
        if self.up:
            response = await self.request(self.in_dialog("BYE"))
            self.info("bye_sent", status=response.status)
        self.ended()

    def ended(self) -> None:
        if self.dialog is not None:
            self.dialog.terminate()
        self.state = LegState.ENDED


# The engine's Via of a leg's in-dialog requests, parsed once per distinct text.
_parse_via_shape = functools.lru_cache(maxsize=64)(parse_via)


_glare_random = random.Random()


def glare_wait(leg: Leg, rng: random.Random = _glare_random) -> float:
    """Seconds to wait before sending again a re-INVITE (or UPDATE, RFC 3311 §5.2) that
    ``leg``'s peer answered 491: RFC 3261 §14.1, in units of 10 ms, 2.1 to 4 s when sbc owns
    the dialog's Call-ID (it sent the INVITE that made it), else 0 to 2 s, so that the two
    ends of a glare do not retry together."""
    owner = leg.incoming is None
    return (rng.randint(210, 400) if owner else rng.randint(0, 200)) / 100


@dataclass(slots=True)
class Bridge:
    """Two legs joined through one media session: side ``a`` faces ``a`` (the caller), side
    ``b`` faces ``b`` (the agent; after a transfer by INVITE, the human)."""

    a: Leg
    b: Leg
    media: MediaSession | None = None

    def side_of(self, leg: Leg) -> Side | None:
        if leg is self.a:
            return "a"
        if leg is self.b:
            return "b"
        return None

    def other(self, leg: Leg) -> Leg:
        return self.b if leg is self.a else self.a

    def silent_at(self, timeout: float | None) -> float:
        """When the call counts as dead for want of media: ``timeout`` after the last RTP from
        either side (never when the media layer cannot see packets: pass-through)."""
        media = self.media
        if timeout is None or media is None:
            return float("inf")
        seen = [t for t in (media.last_activity(side) for side in SIDES) if t is not None]
        return max(seen) + timeout if seen else float("inf")


async def hang_up_all(legs: list[Leg], limit: float) -> None:
    """BYE on every leg that is up, all at once, bounded by ``limit`` seconds."""
    # Usually one leg is still up (its peer's BYE ended the other): awaited directly, since
    # gather() would make a task of every coroutine, legs with nothing to send included.
    up = [leg for leg in legs if leg.up]
    if up:
        try:  # (not contextlib.suppress: its three Python calls, every call)
            async with asyncio.timeout(limit):
                if len(up) == 1:
                    await up[0].hang_up()
                else:
                    await asyncio.gather(*(leg.hang_up() for leg in up))
        except TimeoutError:
            pass
    for leg in legs:
        if leg.state is not LegState.ENDED:  # (most are: their BYE went or came)
            leg.ended()
