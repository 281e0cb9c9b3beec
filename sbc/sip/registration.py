"""The REGISTER client: register to 3CX as an extension and stay registered (RFC 3261 §10.2).

Sans-I/O: time comes in as ``now``; randomness (Call-ID, tags, cnonces, the backoff jitter)
comes from callables given to the constructor; requests to send (without Via: the transport
layer adds it) and events come out of :meth:`Registration.take_outputs`, and
:meth:`Registration.next_deadline` says when :meth:`Registration.handle_timer` is due. One
registration = one Call-ID, CSeq rising by one per request (RFC 3261 §10.2.4), at most one
request in flight (§10.2: a new REGISTER waits for the final response to the previous one).

``registered`` is true while a binding the registrar granted is still within its expiry: a
failed refresh does not end it early, its expiry does.

Failures (403, credentials refused, 5xx, timeout, transport loss, anything else final) are
retried after the RFC 5626 §4.5 backoff: the upper bound is ``min(max, base * 2**failures)``
and the wait a random value between 50% and 100% of it, so never faster than ``base``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from sbc.sip.digest import ClientAuth, Credentials
from sbc.sip.errors import ParseError, ProtocolError
from sbc.sip.fields import parse_int_header
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import NameAddr, SipUri, parse_name_addr_list, uri_equal


class State(enum.Enum):
    IDLE = "idle"  # not started
    REGISTERING = "registering"  # a REGISTER is in flight (first one, refresh or retry)
    REGISTERED = "registered"  # binding granted, waiting for the refresh time
    BACKOFF = "backoff"  # the last attempt failed, waiting to retry
    DRAINING = "draining"  # stop asked while a REGISTER was in flight: wait for its answer
    UNREGISTERING = "unregistering"  # REGISTER with Expires: 0 in flight
    TERMINATED = "terminated"


class Input(enum.Enum):
    START = "start"
    STOP = "stop"
    TIMER = "timer"  # the state's own deadline passed (refresh, retry or request guard)
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    CHALLENGE = "401/407"
    TOO_BRIEF = "423"
    FAILURE = "other final"
    TRANSPORT_ERROR = "transport error"
    FLOW_LOST = "flow lost"  # the connection to the registrar closed while nothing was in flight


class Step(enum.Enum):
    """What :class:`Registration` does for a (state, input) pair."""

    SEND_REGISTER = "send a REGISTER (first attempt, refresh or retry)"
    NOTHING = "nothing"
    ACCEPT = "binding granted"
    ANSWER_CHALLENGE = "answer the challenge"
    RAISE_EXPIRES = "retry with the registrar's Min-Expires"
    FAIL = "count a failure and back off"
    UNREGISTER = "remove the binding"
    DRAIN = "wait for the request in flight, then unregister"
    AFTER_DRAIN = "unregister if a binding may exist, else stop"
    FINISH = "stop"


_IN_FLIGHT_FINALS = (
    Input.SUCCESS,
    Input.CHALLENGE,
    Input.TOO_BRIEF,
    Input.FAILURE,
    Input.TIMER,
    Input.TRANSPORT_ERROR,
)

# The state machine. A (state, input) pair missing here is a protocol error.
TRANSITIONS: dict[tuple[State, Input], Step] = {
    (State.IDLE, Input.START): Step.SEND_REGISTER,
    (State.IDLE, Input.STOP): Step.FINISH,
    (State.REGISTERING, Input.PROVISIONAL): Step.NOTHING,
    (State.REGISTERING, Input.SUCCESS): Step.ACCEPT,
    (State.REGISTERING, Input.CHALLENGE): Step.ANSWER_CHALLENGE,
    (State.REGISTERING, Input.TOO_BRIEF): Step.RAISE_EXPIRES,
    (State.REGISTERING, Input.FAILURE): Step.FAIL,
    (State.REGISTERING, Input.TIMER): Step.FAIL,
    (State.REGISTERING, Input.TRANSPORT_ERROR): Step.FAIL,
    (State.REGISTERING, Input.STOP): Step.DRAIN,
    (State.REGISTERED, Input.TIMER): Step.SEND_REGISTER,
    (State.REGISTERED, Input.STOP): Step.UNREGISTER,
    # RFC 5626 §4.4.1: when the flow a registration uses fails, register again at once.
    (State.REGISTERED, Input.FLOW_LOST): Step.SEND_REGISTER,
    # In flight, the transport reports the failure of the request itself; in backoff a retry
    # is already planned; winding down, nothing is to be kept.
    (State.REGISTERING, Input.FLOW_LOST): Step.NOTHING,
    (State.BACKOFF, Input.FLOW_LOST): Step.NOTHING,
    (State.DRAINING, Input.FLOW_LOST): Step.NOTHING,
    (State.UNREGISTERING, Input.FLOW_LOST): Step.NOTHING,
    (State.TERMINATED, Input.FLOW_LOST): Step.NOTHING,
    (State.BACKOFF, Input.TIMER): Step.SEND_REGISTER,
    (State.BACKOFF, Input.STOP): Step.UNREGISTER,
    (State.DRAINING, Input.PROVISIONAL): Step.NOTHING,
    (State.DRAINING, Input.STOP): Step.NOTHING,
    **{(State.DRAINING, i): Step.AFTER_DRAIN for i in _IN_FLIGHT_FINALS},
    (State.UNREGISTERING, Input.PROVISIONAL): Step.NOTHING,
    (State.UNREGISTERING, Input.STOP): Step.NOTHING,
    (State.UNREGISTERING, Input.CHALLENGE): Step.ANSWER_CHALLENGE,
    (State.UNREGISTERING, Input.SUCCESS): Step.FINISH,
    (State.UNREGISTERING, Input.TOO_BRIEF): Step.FINISH,
    (State.UNREGISTERING, Input.FAILURE): Step.FINISH,
    (State.UNREGISTERING, Input.TIMER): Step.FINISH,
    (State.UNREGISTERING, Input.TRANSPORT_ERROR): Step.FINISH,
    (State.TERMINATED, Input.STOP): Step.NOTHING,
}

_IN_FLIGHT = frozenset({State.REGISTERING, State.DRAINING, State.UNREGISTERING})

# A registrar answering every answer with a new challenge (stale=true forever, say) must not
# make us send REGISTERs back to back: past this many challenges an attempt counts as failed.
MAX_CHALLENGES_PER_ATTEMPT = 4
# RFC 5626 §4.5 defaults.
DEFAULT_BACKOFF_BASE = 30.0
DEFAULT_BACKOFF_MAX = 1800.0
# Refresh at the latest at expires - max(5 s, 10 %).
MIN_REFRESH_MARGIN = 5.0
REFRESH_MARGIN_FRACTION = 0.1


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """What the REGISTER client needs, already resolved from the settings.

    ``registrar`` is the Request-URI (``sip:pbx[:port][;transport=tcp]``), ``aor`` the
    address-of-record written in From and To (``sip:EXTENSION@domain``), ``contact`` where 3CX
    sends calls (``sip:EXTENSION@our-address:port``), ``username`` the digest user (3CX's
    Authentication ID). ``rewrite_contact`` lets the registrar's ``received``/``rport`` replace
    the Contact address (set it when no address is advertised explicitly).
    """

    registrar: SipUri
    aor: SipUri
    contact: SipUri
    username: str
    password: str = field(repr=False)
    transport: str = "udp"
    expires: int = 300
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX
    rewrite_contact: bool = True
    # RFC 3261 §17.1.2.2: Timer F = 64*T1; a request unanswered this long has failed.
    request_timeout: float = 32.0
    user_agent: str | None = None
    allow: str = "INVITE, ACK, CANCEL, BYE, OPTIONS, REFER, NOTIFY, INFO, UPDATE"
    display_name: str | None = None

    def __post_init__(self) -> None:
        if self.expires <= 0:
            raise ValueError("expires must be positive")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")


# -- outputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReady:
    """A REGISTER to send now. Its answer goes to :meth:`Registration.receive_response`."""

    request: Request
    unregister: bool = False


@dataclass(frozen=True, slots=True)
class Registered:
    """The registrar granted the binding; ``refreshed`` when it was already live."""

    contact: str
    expires: int
    expires_at: float
    refresh_at: float
    refreshed: bool


@dataclass(frozen=True, slots=True)
class RegistrationFailed:
    """An attempt failed; the next one starts at ``retry_at``.

    ``status`` is None for a timeout or a transport failure; ``reason`` is what the registrar
    said (reason phrase and Warning, when it sent one) or what went wrong locally.
    """

    status: int | None
    reason: str
    failures: int
    retry_in: float
    retry_at: float


@dataclass(frozen=True, slots=True)
class BindingExpired:
    """The last granted binding ran out before a refresh succeeded: no longer registered."""

    expired_at: float


@dataclass(frozen=True, slots=True)
class ContactRewritten:
    """The registrar saw us at another address (NAT); registering that address instead."""

    old: str
    new: str


@dataclass(frozen=True, slots=True)
class ExpiresRaised:
    """RFC 3261 §10.2.8: the registrar answered 423 and asked for at least ``min_expires``."""

    requested: int
    min_expires: int


@dataclass(frozen=True, slots=True)
class Unregistered:
    """The registration is over. ``status`` is the answer to the Expires: 0 REGISTER (None when
    none was sent or it got no answer)."""

    status: int | None
    reason: str


Output = (RequestReady | Registered | RegistrationFailed | BindingExpired | ContactRewritten) | (
    ExpiresRaised | Unregistered
)


# -- backoff (RFC 5626 §4.5) -------------------------------------------------------------------


def backoff_upper_bound(failures: int, base: float, maximum: float) -> float:
    """``min(max-time, base-time * 2**consecutive-failures)``."""
    # Past 2**30 the product exceeds any sane cap; bounding the exponent keeps it a float.
    return min(maximum, base * 2.0 ** min(max(failures, 0), 30))


def backoff_delay(failures: int, base: float, maximum: float, fraction: float) -> float:
    """The wait before the next attempt: 50% to 100% of the upper bound, ``fraction`` in [0, 1)
    picking where."""
    upper = backoff_upper_bound(failures, base, maximum)
    return upper * (0.5 + 0.5 * min(max(fraction, 0.0), 1.0))


def refresh_delay(expires: float) -> float:
    """Seconds after a grant of ``expires`` seconds at which to refresh: at the latest
    ``expires - max(5 s, 10 %)``; half of it for grants too short for that margin."""
    margin = max(MIN_REFRESH_MARGIN, REFRESH_MARGIN_FRACTION * expires)
    if margin >= expires:
        return expires / 2.0
    return expires - margin


# -- the client --------------------------------------------------------------------------------


class Registration:
    """One registration of the extension's Contact with 3CX.

    ``token()`` returns a fresh random token (letters and digits) for Call-ID, tags and
    cnonces; ``fraction()`` a uniform random number in [0, 1) for the backoff jitter.
    """

    def __init__(
        self,
        config: RegistrationConfig,
        *,
        token: Callable[[], str],
        fraction: Callable[[], float],
    ) -> None:
        self._config = config
        self._token = token
        self._fraction = fraction
        self._state = State.IDLE
        self._call_id = token()
        self._from_tag = token()
        self._cseq = 0
        self._contact = config.contact
        self._expires = config.expires
        self._auth = self._new_auth()
        self._outputs: list[Output] = []
        self._pending: Request | None = None
        self._pending_deadline: float | None = None
        self._challenges = 0
        self._failures = 0
        self._retry_at: float | None = None
        self._refresh_at: float | None = None
        self._expires_at: float | None = None
        self._learned: tuple[str, int] | None = None
        self._just_rewrote = False
        self._last_failure: RegistrationFailed | None = None

    # -- read-only view ------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def registered(self) -> bool:
        """True while a granted binding has not expired."""
        return self._expires_at is not None

    @property
    def expires_at(self) -> float | None:
        return self._expires_at

    @property
    def refresh_at(self) -> float | None:
        return self._refresh_at if self._state is State.REGISTERED else None

    @property
    def retry_at(self) -> float | None:
        return self._retry_at if self._state is State.BACKOFF else None

    @property
    def failures(self) -> int:
        """Consecutive failed attempts (0 after a success)."""
        return self._failures

    @property
    def last_failure(self) -> RegistrationFailed | None:
        return self._last_failure

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def contact(self) -> SipUri:
        """The Contact being registered (rewritten when the registrar saw another address)."""
        return self._contact

    @property
    def expires(self) -> int:
        """The expiry asked for (raised by a 423)."""
        return self._expires

    @property
    def learned_address(self) -> tuple[str, int] | None:
        """Where the registrar saw our requests come from (Via ``received``/``rport``)."""
        return self._learned

    @property
    def in_flight(self) -> Request | None:
        return self._pending

    @property
    def terminated(self) -> bool:
        return self._state is State.TERMINATED

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: only on input)."""
        candidates = []
        own = self._state_deadline()
        if own is not None:
            candidates.append(own)
        if self._expires_at is not None:
            candidates.append(self._expires_at)
        return min(candidates) if candidates else None

    def take_outputs(self) -> list[Output]:
        """Requests to send and events, in the order they happened; the list is emptied."""
        out, self._outputs = self._outputs, []
        return out

    def keepalive_options(self) -> Request:
        """An OPTIONS to the registrar, sent now and then over UDP to hold the NAT binding open
        (its own Call-ID; the answer only proves the path works)."""
        cfg = self._config
        items = [
            ("Max-Forwards", "70"),
            ("From", str(NameAddr(cfg.aor, cfg.display_name).with_tag(self._token()))),
            ("To", str(NameAddr(cfg.registrar))),
            ("Call-ID", self._token()),
            ("CSeq", "1 OPTIONS"),
            ("Contact", str(NameAddr(self._contact))),
            ("Accept", "application/sdp"),
        ]
        if cfg.user_agent:
            items.append(("User-Agent", cfg.user_agent))
        return Request("OPTIONS", cfg.registrar, Headers(items))

    # -- inputs ---------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        self._dispatch(Input.START, now, None, "")

    def stop(self, now: float) -> None:
        """Unregister (Expires: 0) if a binding may exist, then terminate."""
        self._dispatch(Input.STOP, now, None, "")

    def handle_timer(self, now: float) -> None:
        """Call at (or after) :meth:`next_deadline`; early calls change nothing."""
        if self._expires_at is not None and now >= self._expires_at:
            expired_at = self._expires_at
            self._drop_binding()
            self._emit(BindingExpired(expired_at))
        own = self._state_deadline()
        if own is not None and now >= own:
            self._dispatch(Input.TIMER, now, None, "request timed out")

    def receive_response(self, response: Response, now: float) -> bool:
        """Feed a response; False when it does not answer the request in flight (a stray or
        late response, say to a request already given up on), which is then ignored."""
        if not self._answers_pending(response):
            return False
        self._dispatch(_classify(response.status), now, response, "")
        return True

    def flow_lost(self, now: float) -> None:
        """The stream connection to the registrar is gone (TCP/TLS): re-register now."""
        self._dispatch(Input.FLOW_LOST, now, None, "")

    def transport_failed(self, now: float, reason: str) -> None:
        """The request in flight could not be sent or its connection was lost."""
        self._dispatch(Input.TRANSPORT_ERROR, now, None, reason)

    # -- the machine ----------------------------------------------------------------------------
    def _dispatch(self, inp: Input, now: float, response: Response | None, detail: str) -> None:
        step = TRANSITIONS.get((self._state, inp))
        if step is None:
            raise ProtocolError(f"registration: no transition for {inp.value!r} in {self._state}")
        if step is Step.SEND_REGISTER:
            self._send_register(now)
        elif step is Step.ACCEPT:
            assert response is not None
            self._accept(response, now)
        elif step is Step.ANSWER_CHALLENGE:
            assert response is not None
            self._answer_challenge(response, now)
        elif step is Step.RAISE_EXPIRES:
            assert response is not None
            self._raise_expires(response, now)
        elif step is Step.FAIL:
            self._fail(now, response, detail)
        elif step is Step.UNREGISTER:
            self._unregister(now)
        elif step is Step.DRAIN:
            self._state = State.DRAINING
        elif step is Step.AFTER_DRAIN:
            self._after_drain(inp, response, now)
        elif step is Step.FINISH:
            self._finish(response, detail)
        # Step.NOTHING: provisional responses and repeated stops change nothing.

    def _state_deadline(self) -> float | None:
        if self._state in _IN_FLIGHT:
            return self._pending_deadline
        if self._state is State.REGISTERED:
            return self._refresh_at
        if self._state is State.BACKOFF:
            return self._retry_at
        return None

    def _answers_pending(self, response: Response) -> bool:
        pending = self._pending
        if pending is None:
            return False
        try:
            cseq = response.cseq
            call_id = response.call_id
        except (ParseError, ValueError):
            return False
        sent = pending.cseq
        return call_id == self._call_id and cseq.seq == sent.seq and cseq.method == sent.method

    # -- steps ------------------------------------------------------------------------------------
    def _send_register(self, now: float) -> None:
        self._challenges = 0
        request = self._auth.apply(self._build(self._expires), self._token())
        self._send(request, now, State.REGISTERING)

    def _accept(self, response: Response, now: float) -> None:
        granted = self._granted_expires(response)
        if granted <= 0:
            self._fail(now, response, "registrar granted no time (expires=0)")
            return
        was_live = self._expires_at is not None
        self._expires_at = now + granted
        self._failures = 0
        self._last_failure = None
        self._pending = None
        if self._maybe_rewrite_contact(response, now):
            return
        self._refresh_at = now + refresh_delay(granted)
        self._state = State.REGISTERED
        self._emit(
            Registered(str(self._contact), granted, self._expires_at, self._refresh_at, was_live)
        )

    def _answer_challenge(self, response: Response, now: float) -> None:
        assert self._pending is not None
        self._challenges += 1
        retry = None
        if self._challenges <= MAX_CHALLENGES_PER_ATTEMPT:
            retry = self._auth.authorize(response, self._pending, self._token())
        if retry is None:
            # Credentials refused (a new challenge to our answer without stale=true) or no
            # usable challenge: never repeat them at once, 3CX blacklists addresses that do.
            if self._state is State.UNREGISTERING:
                self._finish(response, "")
            else:
                self._fail(now, response, "credentials refused")
            return
        self._cseq = retry.cseq.seq
        self._send(retry, now, self._state)

    def _raise_expires(self, response: Response, now: float) -> None:
        value = response.headers.get("Min-Expires")
        minimum: int | None = None
        if value is not None:
            try:
                minimum = parse_int_header(value, "Min-Expires")
            except ParseError:
                minimum = None
        # RFC 3261 §10.2.8: retry with an expiry of at least Min-Expires. A 423 without a usable
        # Min-Expires, or one not above what we asked, would loop: count it as a failure.
        if minimum is None or minimum <= self._expires:
            self._fail(now, response, "423 without a usable Min-Expires")
            return
        self._emit(ExpiresRaised(self._expires, minimum))
        self._expires = minimum
        self._send_register(now)

    def _fail(self, now: float, response: Response | None, detail: str) -> None:
        self._failures += 1
        delay = backoff_delay(
            self._failures, self._config.backoff_base, self._config.backoff_max, self._fraction()
        )
        self._pending = None
        self._retry_at = now + delay
        self._state = State.BACKOFF
        # A fresh attempt starts without remembered challenges: credentials refused once are
        # not sent again before the registrar asks for them.
        self._auth = self._new_auth()
        status = response.status if response is not None else None
        reason = _describe(response, detail)
        failure = RegistrationFailed(status, reason, self._failures, delay, self._retry_at)
        self._last_failure = failure
        self._emit(failure)

    def _unregister(self, now: float) -> None:
        if self._expires_at is None:
            self._finish(None, "no binding to remove")
            return
        self._challenges = 0
        request = self._auth.apply(self._build(0), self._token())
        self._send(request, now, State.UNREGISTERING)

    def _after_drain(self, inp: Input, response: Response | None, now: float) -> None:
        if inp is Input.SUCCESS:
            assert response is not None
            granted = self._granted_expires(response)
            if granted > 0:
                self._expires_at = now + granted
        elif inp is Input.CHALLENGE and self._expires_at is not None:
            # The refresh in flight was challenged: answer it as the unregistration.
            assert response is not None and self._pending is not None
            retry = self._auth.authorize(response, self._pending, self._token())
            if retry is not None:
                self._cseq = retry.cseq.seq
                self._send(_as_unregister(retry), now, State.UNREGISTERING)
                return
        self._pending = None
        self._unregister(now)

    def _finish(self, response: Response | None, detail: str) -> None:
        self._pending = None
        # Whatever the registrar answered, nobody refreshes the binding any more: from here on
        # this client does not count as registered.
        self._drop_binding()
        self._state = State.TERMINATED
        status = response.status if response is not None else None
        self._emit(Unregistered(status, _describe(response, detail)))

    # -- helpers ----------------------------------------------------------------------------------
    def _send(self, request: Request, now: float, state: State) -> None:
        self._pending = request
        self._pending_deadline = now + self._config.request_timeout
        self._state = state
        self._emit(RequestReady(request, unregister=request.headers.get("Expires") == "0"))

    def _emit(self, output: Output) -> None:
        self._outputs.append(output)

    def _drop_binding(self) -> None:
        self._expires_at = None
        self._refresh_at = None

    def _new_auth(self) -> ClientAuth:
        return ClientAuth(Credentials(self._config.username, self._config.password))

    def _build(self, expires: int) -> Request:
        cfg = self._config
        self._cseq += 1
        aor = NameAddr(cfg.aor, cfg.display_name)
        # No Via: the transport layer adds it (with rport, RFC 3581 §3) when it picks the
        # destination, and gives each attempt its own branch.
        items = [
            ("Max-Forwards", "70"),
            ("From", str(aor.with_tag(self._from_tag))),
            ("To", str(aor)),
            ("Call-ID", self._call_id),
            ("CSeq", f"{self._cseq} REGISTER"),
            ("Contact", str(NameAddr(self._contact))),
            # RFC 3261 §10.2.1.1 (Expires header) / §10.2.2 (Expires: 0 removes the binding).
            ("Expires", str(expires)),
        ]
        if cfg.allow:
            items.append(("Allow", cfg.allow))
        if cfg.user_agent:
            items.append(("User-Agent", cfg.user_agent))
        return Request("REGISTER", cfg.registrar, Headers(items))

    def _granted_expires(self, response: Response) -> int:
        """RFC 3261 §10.2.4: the expiry of our Contact in the 200, else its Expires header, else
        what we asked for."""
        for value in response.headers.get_all("Contact"):
            try:
                contacts = parse_name_addr_list(value)
            except ParseError:
                continue
            for contact in contacts:
                param = contact.param("expires")
                if param is None or not uri_equal(contact.uri, self._contact):
                    continue
                try:
                    return parse_int_header(param, "expires")
                except ParseError:
                    break
        header = response.headers.get("Expires")
        if header is not None:
            try:
                return parse_int_header(header, "Expires")
            except ParseError:
                pass
        return self._expires

    def _maybe_rewrite_contact(self, response: Response, now: float) -> bool:
        """Learn our public address from the top Via; re-register it when it differs.

        This is what PJSIP's contact rewrite does behind NAT: the registrar's ``received`` and
        ``rport`` (RFC 3581 §4) say where our requests came from, and 3CX sends calls to the
        Contact, which must therefore be that address. On TCP/TLS the source port is an
        ephemeral one nobody can connect to, so only the host is taken from the registrar.
        """
        try:
            via = response.top_via
            rport = via.rport
        except (ParseError, ValueError):
            return False
        host = via.received or via.host
        port = rport or via.port or self._contact.port or 5060
        self._learned = (host, port)
        if not self._config.rewrite_contact or self._just_rewrote:
            self._just_rewrote = False
            return False
        if self._config.transport != "udp":
            port = self._contact.port or port
        current = (self._contact.host, self._contact.port or 5060)
        if (host.lower(), port) == (current[0].lower(), current[1]):
            return False
        old = self._contact
        self._contact = dataclasses.replace(old, host=host, port=port)
        # At most one rewrite in a row: if the next answer still disagrees the NAT is changing
        # our address per request, and re-registering again would only loop.
        self._just_rewrote = True
        self._emit(ContactRewritten(str(old), str(self._contact)))
        self._send_register(now)
        return True


def _classify(status: int) -> Input:
    if status < 200:
        return Input.PROVISIONAL
    if status < 300:
        return Input.SUCCESS
    if status in (401, 407):
        return Input.CHALLENGE
    if status == 423:
        return Input.TOO_BRIEF
    return Input.FAILURE


def _describe(response: Response | None, detail: str) -> str:
    if response is None:
        return detail
    text = f"{response.status} {response.reason}".strip()
    warning = response.headers.get("Warning")
    if warning:
        text += f" ({warning})"
    if detail:
        text += f": {detail}"
    return text


def _as_unregister(request: Request) -> Request:
    return dataclasses.replace(request, headers=request.headers.set("Expires", "0"))
