"""Dialogs (RFC 3261 §12): the state two user agents share between INVITE and BYE.

A :class:`Dialog` holds what §12.1 says a dialog holds (id, local and remote sequence numbers,
URIs, remote target, route set, secure flag) and does the bookkeeping of §12.2: building
in-dialog requests (Request-URI, Route, CSeq), checking the CSeq order of requests received,
refreshing the remote target. It is a plain mutable object owned by one call leg; it does no
I/O and knows nothing of transactions (the TU adds the top Via with the branch it chose).

Its states are Early, Confirmed and Terminated; :data:`DIALOG_TABLE` below is the state
machine for responses and for the TU ending the dialog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from sbc.sip.errors import CallDoesNotExist, ProtocolError, RequestOutOfOrder
from sbc.sip.fields import (
    COMMON_METHODS,
    Params,
    Via,
    find_param,
    format_host_port,
    format_params,
    make_cseq,
    make_via,
    parse_via,
)
from sbc.sip.headers import Headers, canonical_name
from sbc.sip.message import SIP_VERSION, Request, Response, make_request, parse_address
from sbc.sip.quickinit import quick_maker
from sbc.sip.uri import NameAddr, SipUri, Uri

__all__ = [
    "DIALOG_TABLE",
    "TARGET_REFRESH_METHODS",
    "Dialog",
    "DialogId",
    "DialogInput",
    "DialogState",
]


class DialogState(Enum):
    EARLY = "Early"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"

    # Members are singletons compared by identity: hashed by identity too (in C), not by
    # Enum.__hash__, a Python call per DIALOG_TABLE lookup (ten per bridged call).
    __hash__ = object.__hash__


class DialogInput(Enum):
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    FAILURE = "non-2xx final to the dialog-creating INVITE"
    ENDING = "481 or 408 to an in-dialog request"
    OTHER_FAILURE = "other non-2xx final to an in-dialog request"
    TERMINATE = "TU ends the dialog"

    __hash__ = object.__hash__  # as DialogState's


D = DialogState
In = DialogInput

# (state, input) -> next state.
DIALOG_TABLE: dict[tuple[DialogState, DialogInput], DialogState] = {
    (D.EARLY, In.PROVISIONAL): D.EARLY,
    (D.EARLY, In.SUCCESS): D.CONFIRMED,  # §13.2.2.4
    (D.EARLY, In.FAILURE): D.TERMINATED,  # §12.3: a non-2xx final ends the early dialog
    (D.EARLY, In.ENDING): D.TERMINATED,  # §12.2.1.2
    (D.EARLY, In.OTHER_FAILURE): D.EARLY,
    (D.EARLY, In.TERMINATE): D.TERMINATED,
    (D.CONFIRMED, In.PROVISIONAL): D.CONFIRMED,
    (D.CONFIRMED, In.SUCCESS): D.CONFIRMED,
    # A non-2xx from another fork after the 2xx (§13.2.2.4) changes nothing.
    (D.CONFIRMED, In.FAILURE): D.CONFIRMED,
    (D.CONFIRMED, In.ENDING): D.TERMINATED,  # §12.2.1.2: 481 / 408 end the dialog
    (D.CONFIRMED, In.OTHER_FAILURE): D.CONFIRMED,  # 491 to a re-INVITE and the like
    (D.CONFIRMED, In.TERMINATE): D.TERMINATED,
    # Late responses (the 200 to our BYE) change nothing.
    (D.TERMINATED, In.PROVISIONAL): D.TERMINATED,
    (D.TERMINATED, In.SUCCESS): D.TERMINATED,
    (D.TERMINATED, In.FAILURE): D.TERMINATED,
    (D.TERMINATED, In.ENDING): D.TERMINATED,
    (D.TERMINATED, In.OTHER_FAILURE): D.TERMINATED,
    (D.TERMINATED, In.TERMINATE): D.TERMINATED,
}

# RFC 3261 §12.2 and RFC 3311 §5.1: requests that may change the remote target.
TARGET_REFRESH_METHODS = frozenset({"INVITE", "UPDATE"})


@dataclass(frozen=True, slots=True)
class DialogId:
    """RFC 3261 §12: Call-ID, local tag and remote tag (None for an RFC 2543 peer)."""

    call_id: str
    local_tag: str
    remote_tag: str | None


# DialogId(...) for the two dialogs of every call (see quick_maker).
_dialog_id: Callable[[str, str, str | None], DialogId] = quick_maker(DialogId)


# A peer's Contact and Record-Route texts repeat from call to call: the memoised parser
# (same values as parse_name_addr) parses each text once.
def _contact_uri(message: Request | Response) -> Uri | None:
    values = message.headers.values("Contact")
    if not values:
        return None
    return parse_address(values[0]).uri


def _record_route(message: Request | Response) -> tuple[NameAddr, ...]:
    values = message.headers.values("Record-Route")
    if not values:  # no generator to make for the usual case (a peer that adds none)
        return ()
    return tuple(parse_address(v) for v in values)


class Dialog:
    """One dialog, seen from this user agent (mutable; owned by one call leg)."""

    __slots__ = (
        "_from_to",
        "_invite_seq",
        "id",
        "is_uac",
        "local_cseq",
        "local_uri",
        "remote_cseq",
        "remote_target",
        "remote_uri",
        "route_set",
        "secure",
        "state",
    )

    def __init__(
        self,
        *,
        id: DialogId,
        local_uri: NameAddr,
        remote_uri: NameAddr,
        remote_target: Uri,
        route_set: tuple[NameAddr, ...] = (),
        local_cseq: int | None = None,
        remote_cseq: int | None = None,
        secure: bool = False,
        state: DialogState = DialogState.EARLY,
        is_uac: bool = True,
        invite_seq: int | None = None,
    ) -> None:
        self.id = id
        # The URIs carry no tag: the tags live in ``id`` and are added to each request.
        self.local_uri = local_uri.without_param("tag")
        self.remote_uri = remote_uri.without_param("tag")
        self.remote_target = remote_target
        self.route_set = route_set
        self.local_cseq = local_cseq
        self.remote_cseq = remote_cseq
        self.secure = secure
        self.state = state
        self.is_uac = is_uac
        self._invite_seq = invite_seq
        # The From and To texts of this dialog's requests, written at the first one: the id
        # and the URIs never change (§12.1), and writing a tagged address is eight Python calls
        # (its parameters searched, its URI and display name written). None until a request
        # is made; afterwards the two strings are those of the requests (the ACK a leg keeps
        # holds them too), so the memo costs a tuple.
        self._from_to: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Dialog {self.id.call_id} {self.state.value}>"

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def from_uac(cls, request: Request, response: Response, *, secure: bool = False) -> Dialog:
        """The dialog a 1xx (with To tag) or 2xx to ``request`` creates at the UAC (§12.1.2).

        Route set: the response's Record-Route in reverse order; remote target: its Contact
        (the Request-URI when a provisional response has none).
        """
        state = _creating_state(response)
        remote_tag = response.to_tag
        local_tag = request.from_tag
        if remote_tag is None or local_tag is None:
            raise ProtocolError(
                "a dialog needs both tags (From of the request, To of the response)"
            )
        return cls(
            id=_dialog_id(request.call_id, local_tag, remote_tag),
            local_uri=request.from_,
            remote_uri=response.to,
            remote_target=_contact_uri(response) or request.uri,
            route_set=tuple(reversed(_record_route(response))),
            local_cseq=request.cseq.seq,
            secure=secure,
            state=state,
            is_uac=True,
            invite_seq=request.cseq.seq if request.method == "INVITE" else None,
        )

    @classmethod
    def from_uas(cls, request: Request, response: Response, *, secure: bool = False) -> Dialog:
        """The dialog this UA's 1xx/2xx ``response`` to ``request`` creates (§12.1.1).

        Route set: the request's Record-Route in order; remote target: its Contact. The
        response must carry the local tag in its To. ``secure`` is for the caller to set
        (request over TLS with a SIPS Request-URI).
        """
        state = _creating_state(response)
        local_tag = response.to_tag
        if local_tag is None:
            raise ProtocolError("the response creating a dialog must carry a To tag")
        remote_target = _contact_uri(request)
        if remote_target is None:
            raise ProtocolError("a dialog-creating request must carry a Contact")
        return cls(
            id=_dialog_id(request.call_id, local_tag, request.from_tag),
            local_uri=response.to,
            remote_uri=request.from_,
            remote_target=remote_target,
            route_set=_record_route(request),
            remote_cseq=request.cseq.seq,
            secure=secure,
            state=state,
            is_uac=False,
        )

    # -- sending (§12.2.1.1) --------------------------------------------------------------
    def create_request(
        self,
        method: str,
        *,
        via: Via | str,
        branch: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        cseq: int | None = None,
        max_forwards: int = 70,
    ) -> Request:
        """A request within this dialog (RFC 3261 §12.2.1.1).

        To, From and Call-ID come from the dialog; the CSeq is the local sequence number plus
        one, except for ACK and CANCEL, which must pass ``cseq`` (the INVITE's number, §13.2.2.4
        and §9.1) and do not advance it. ``via`` is the TU's top Via, given ``branch``. Contact
        (needed in target refresh requests) and Content-Type go in ``headers``.
        """
        if self.state is D.TERMINATED:
            raise ProtocolError(f"dialog {self.id.call_id} is terminated")
        if method in ("ACK", "CANCEL"):
            if cseq is None:
                raise ProtocolError(f"{method} needs the CSeq number of its INVITE")
            seq = cseq
        else:
            seq = cseq if cseq is not None else (self.local_cseq or 0) + 1
            self.local_cseq = seq
        uri, routes = self._target_and_routes()
        stamped, via_text = _stamp(parse_via(via) if isinstance(via, str) else via, branch)
        items: list[tuple[str, str]] = [
            ("Via", via_text),
            ("Max-Forwards", str(max_forwards)),
        ]
        if routes:  # no generator for the usual empty route set
            items.extend(("Route", str(route)) for route in routes)
        dialog_id = self.id
        from_to = self._from_to
        if from_to is None:
            remote = self.remote_uri
            remote_tag = dialog_id.remote_tag
            to = str(remote) if remote_tag is None else remote.tagged_text(remote_tag)
            from_to = self._from_to = (self.local_uri.tagged_text(dialog_id.local_tag), to)
        items.append(("From", from_to[0]))
        items.append(("To", from_to[1]))
        items.append(("Call-ID", dialog_id.call_id))
        items.append(("CSeq", f"{seq} {method}"))
        # The names above are canonical already; only the caller's need normalising (a loop:
        # a generator is a call of its own, every request).
        for name, value in headers:
            items.append((canonical_name(name), value))
        out = Headers._trusted(tuple(items))
        if method != "ACK" and method in COMMON_METHODS and stamped.transport.isupper():
            # The Via and CSeq just written, as parsing their text gives them (a Via that
            # parse_via gave, given a branch, writes text that parses back to it, tested; a
            # Via made by hand with a lower-case transport would not): the transaction layer
            # reads both of every request sent, and need not parse them. Not the ACK: it goes
            # out of any transaction, nobody reads them, and a leg keeps it for the whole call
            # (to ACK a repeated 2xx): a memo there is 360 bytes more per held call.
            out._cache = {"top_via": stamped, "cseq": make_cseq(seq, method)}
        return make_request(method, uri, out, body, SIP_VERSION)

    def _target_and_routes(self) -> tuple[Uri, tuple[NameAddr, ...]]:
        routes = self.route_set
        if not routes:
            return self.remote_target, ()
        first = routes[0]
        if _is_loose(first):
            return self.remote_target, routes
        # §12.2.1.1: a strict router: it becomes the Request-URI, and the remote target goes
        # to the end of the Route set.
        return first.uri, (*routes[1:], NameAddr(self.remote_target))

    def advance_local_cseq(self, seq: int) -> None:
        """Note a CSeq this dialog's requests used outside :meth:`create_request`.

        A request retried with credentials (:class:`sbc.sip.digest.ClientAuth`) uses CSeq + 1;
        the next in-dialog request must go above it.
        """
        if self.local_cseq is None or seq > self.local_cseq:
            self.local_cseq = seq

    # -- receiving (§12.2.2) --------------------------------------------------------------
    def receive_request(self, request: Request) -> None:
        """Check and account for a request received within this dialog (§12.2.2).

        Raises :class:`CallDoesNotExist` (481) when it is not this dialog's or the dialog has
        ended, :class:`RequestOutOfOrder` (500) when its CSeq is below the remote sequence
        number. A target refresh (re-INVITE, UPDATE) with a Contact replaces the remote target.
        """
        if (
            self.state is D.TERMINATED
            or request.call_id != self.id.call_id
            or request.to_tag != self.id.local_tag
            or request.from_tag != self.id.remote_tag
        ):
            raise CallDoesNotExist(f"no dialog for {request.method} in {request.call_id}")
        seq = request.cseq.seq
        if request.method in ("ACK", "CANCEL"):
            # The ACK of a 2xx carries the INVITE's number; CANCEL is not in the dialog.
            return
        if self.remote_cseq is not None and seq < self.remote_cseq:
            raise RequestOutOfOrder(f"CSeq {seq} below {self.remote_cseq}")
        self.remote_cseq = seq
        if request.method in TARGET_REFRESH_METHODS:
            target = _contact_uri(request)
            if target is not None:
                self.remote_target = target

    def update_from_response(self, response: Response) -> None:
        """Account for a response to a request this UA sent in (or to create) the dialog.

        A 2xx moves an early dialog to Confirmed (and, at the UAC, recomputes the route set
        from it, §13.2.2.4); a 1xx/2xx to a target refresh with a Contact replaces the remote
        target (§12.2.1.2); a non-2xx final to the creating INVITE ends an early dialog
        (§12.3); a 481 or 408 ends the dialog (§12.2.1.2).
        """
        status = response.status
        cseq = response.cseq
        creating = (
            self._invite_seq is not None
            and cseq.method == "INVITE"
            and (cseq.seq == self._invite_seq)
        )
        if status < 200:
            kind = In.PROVISIONAL
        elif status < 300:
            kind = In.SUCCESS
        elif creating:
            kind = In.FAILURE
        elif status in (408, 481):
            kind = In.ENDING
        else:
            kind = In.OTHER_FAILURE
        was_early = self.state is D.EARLY
        # The table is total (every state and input, tested): the lookup cannot miss.
        self.state = DIALOG_TABLE[(self.state, kind)]
        if self.state is D.TERMINATED or status >= 300:
            return
        if kind is In.SUCCESS and was_early and creating and self.is_uac:
            self.route_set = tuple(reversed(_record_route(response)))
        if cseq.method in TARGET_REFRESH_METHODS and (kind is In.SUCCESS or was_early):
            target = _contact_uri(response)
            if target is not None:
                self.remote_target = target

    def terminate(self) -> None:
        """The TU ends the dialog (BYE sent or received, §15)."""
        # Every state ends in Terminated (DIALOG_TABLE's TERMINATE column); a leg ends its
        # dialog up to twice a call (the BYE, the leg's end).
        self.state = D.TERMINATED


# A leg's requests carry the same Via but for the branch (the engine's Via for its transport
# and socket): what stamping a branch leaves unchanged (the parameters around the branch, the
# text before and after its value) is kept by the Via's fields (hashed in C, unlike the Via:
# its dataclass __hash__ is a Python call). Bounded: once full, further Vias are stamped the
# general way.
_STAMPS: dict[tuple[str, str, int | None, Params], tuple[Params, str, Params, str, str]] = {}
_STAMPS_LIMIT = 64


def _stamp(top: Via, branch: str) -> tuple[Via, str]:
    """``top.with_param("branch", branch)`` and its text, as ``str()`` writes it."""
    transport, host, port, params = key = (top.transport, top.host, top.port, top.params)
    entry = _STAMPS.get(key)
    if entry is None:
        if len(_STAMPS) >= _STAMPS_LIMIT:
            stamped = top.with_param("branch", branch)
            return stamped, str(stamped)
        tail: Params
        i = find_param(params, "branch")
        if i < 0:  # with_param appends a parameter that is absent
            head, name, tail = params, "branch", ()
        else:  # and replaces one that is there, keeping its spelling
            head, name, tail = params[:i], params[i][0], params[i + 1 :]
        sent = f"SIP/2.0/{transport} {format_host_port(host, port)}"
        entry = (head, name, tail, f"{sent}{format_params(head)};{name}=", format_params(tail))
        _STAMPS[key] = entry
    head, name, tail, before, after = entry
    stamped = make_via(transport, host, port, (*head, (name, branch), *tail))
    return stamped, before + branch + after


def _creating_state(response: Response) -> DialogState:
    # §12.1: dialogs are created by 2xx and by 1xx with a To tag.
    if 101 <= response.status < 200:
        return D.EARLY
    if 200 <= response.status < 300:
        return D.CONFIRMED
    raise ProtocolError(f"a {response.status} response does not create a dialog")


def _is_loose(route: NameAddr) -> bool:
    # RFC 3261 §16.12.1.1 / §19.1.1: loose routers mark their URI with ``lr``.
    uri = route.uri
    return not isinstance(uri, SipUri) or uri.has_param("lr")
