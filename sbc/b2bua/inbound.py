"""Calls Retell sends to sbc: the number's termination URI, where Retell places its
``sip_invite`` transfers and its outbound calls (``docs/peers.md``).

A :class:`RetellCall` is the mirror of :class:`~sbc.b2bua.call.Call`: leg ``a`` is Retell's
INVITE (role *agent*, sbc is its UAS), leg ``b`` sbc's INVITE to the PBX (role *human*, sbc is
its UAC), placed as a call from the registered extension (3CX takes calls from an extension only
as that extension) to the PBX number the Request-URI names. The manager (``calls.py``) has
already checked the source (``retell.trusted``), the credentials (``trunk_auth.py``) and the
target (``[transfer]`` rules, :func:`~sbc.b2bua.transfer_rules.resolve_target`: a name such as
``sales`` or a number, which must match ``transfer.allow`` either way) before the call exists;
the call gets the resolved number.

Only the hooks of :class:`~sbc.b2bua.call.Call` differ: how leg b's INVITE is built
(:func:`~sbc.b2bua.messages.build_pbx_invite`: From the extension with Retell's caller as
display name and P-Asserted-Identity, nothing else of Retell's INVITE copied), what Retell is
told of the PBX's answers (:func:`retell_status_for_failure`, :func:`retell_provisional_for`)
and the headers of sbc's responses to Retell (:func:`retell_dialog_headers`: no session timer,
Retell runs none). The PBX's digest challenges are answered with the extension's credentials
by the leg itself. Ringing, CANCEL, BYE, holds and the rest are the bridge's, unchanged; a
REFER inside such a call is refused (403) by the call itself, as only the agent of a call from
the PBX hands a caller back.
"""

from __future__ import annotations

from typing import Any

from sbc.b2bua.call import Call, HeaderList
from sbc.b2bua.leg import Leg, Role
from sbc.b2bua.messages import (
    TIMEOUT_STATUS,
    LegIds,
    LocalAddress,
    Peer,
    allow_header,
    build_pbx_invite,
)
from sbc.net.engine import IncomingRequest
from sbc.sip.message import Request

__all__ = [
    "RetellCall",
    "retell_dialog_headers",
    "retell_provisional_for",
    "retell_status_for_failure",
]


def retell_status_for_failure(status: int) -> int:
    """What Retell is told when the PBX answers sbc's INVITE with ``status`` (>= 300).

    A 4xx-6xx goes through (busy, declined, not found...), except a 401/407 that the
    extension's credentials could not satisfy (sbc's problem, not the target's: 480) and any
    5xx (503: the PBX's internals are not Retell's business). Redirects are not followed: 480.
    """
    if status in (401, 407) or status < 400:
        return TIMEOUT_STATUS  # 480
    if 500 <= status < 600:
        return 503
    return status


def retell_provisional_for(status: int) -> int | None:
    """The provisional response Retell gets for the PBX's ``status`` (None: none is sent).

    100 is hop-by-hop (RFC 3261 §16.7) and Retell already had one; 181/182 become 180.
    """
    if status == 183:
        return 183
    if 180 <= status <= 182:
        return 180
    return None


def retell_dialog_headers(
    invite: Request, local: LocalAddress, *, user_agent: str = "", has_body: bool = False
) -> HeaderList:
    """Headers of a dialog-forming response to Retell (18x with tag, 2xx).

    RFC 3261 §12.1.1: every Record-Route of the request is copied, in order; Contact is sbc's
    own. No Supported: timer and no Session-Expires, Retell runs no session timer.
    """
    items = [("Record-Route", v) for v in invite.headers.get_all("Record-Route")]
    items.append(("Contact", local.contact))
    items.append(("Allow", allow_header(Peer.RETELL)))
    if user_agent:
        items.append(("Server", user_agent))
    if has_body:
        items.append(("Content-Type", "application/sdp"))
    return tuple(items)


class RetellCall(Call):
    """A call Retell sent to sbc, bridged to ``target`` (a PBX number) on the PBX.

    ``target`` is what :func:`~sbc.b2bua.transfer_rules.resolve_target` made of the
    Request-URI's user; the other arguments are :class:`~sbc.b2bua.call.Call`'s.
    """

    __slots__ = ("target",)

    roles = (Role.AGENT, Role.HUMAN)  # leg a: Retell's INVITE; leg b: sbc's INVITE to the PBX

    def __init__(self, incoming: IncomingRequest, *, target: str, **kwargs: Any) -> None:
        super().__init__(incoming, **kwargs)
        self.target = target
        self.called = target  # the record's "called": the PBX number dialled

    def _b_invite(self, b: Leg, sdp: bytes) -> Request:
        """The INVITE to the PBX: from the extension to ``target``, Retell's caller as the
        identity; no X- header (nothing of Retell's INVITE is copied)."""
        pbx = self.config.pbx
        assert pbx is not None  # the manager takes no call from Retell without a PBX target
        return build_pbx_invite(
            pbx,
            self.config.extension,
            b.local,
            LegIds(b.call_id, b.local_tag),
            self.target,
            self.caller,
            user_agent=self.config.user_agent,
            sdp=sdp,
        )

    def _a_status_for_failure(self, status: int) -> int:
        return retell_status_for_failure(status)

    def _a_provisional_for(self, status: int) -> int | None:
        return retell_provisional_for(status)

    def _a_headers(self, request: Request, *, has_body: bool, with_timer: bool) -> HeaderList:
        return retell_dialog_headers(
            request, self.origin.local, user_agent=self.config.user_agent, has_body=has_body
        )
