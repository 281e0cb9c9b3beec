"""The sans-I/O REGISTER client, driven with a fake clock and scripted registrar answers."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import pytest

from sbc.sip import registration as reg
from sbc.sip.digest import build_challenge, parse_authorization, verify_authorization
from sbc.sip.errors import ProtocolError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response, reason_phrase
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
    State,
    Unregistered,
    backoff_delay,
    backoff_upper_bound,
    refresh_delay,
)
from sbc.sip.uri import SipUri, parse_name_addr

T = TypeVar("T")
PASSWORD = "s3cret"
ENGINE_VIA = "SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bKengine;rport"
REALM = "3CXPhoneSystem"


def make_config(**overrides: Any) -> RegistrationConfig:
    values: dict[str, Any] = {
        "registrar": SipUri("sip", None, None, "pbx.example.com", 5062),
        "aor": SipUri("sip", "101", None, "pbx.example.com"),
        "contact": SipUri("sip", "101", None, "192.0.2.10", 5070),
        "username": "auth101",
        "password": PASSWORD,
        "expires": 300,
        "user_agent": "sbc-test",
    }
    values.update(overrides)
    return RegistrationConfig(**values)


class Harness:
    """A Registration plus the fake clock, tokens and jitter it runs on."""

    def __init__(self, fraction: float = 0.0, **overrides: object) -> None:
        self.now = 1000.0
        counter = itertools.count(1)
        self.fraction = fraction
        self.reg = Registration(
            make_config(**overrides),
            token=lambda: f"tok{next(counter)}",
            fraction=lambda: self.fraction,
        )
        self.events: list[Output] = []

    def outputs(self) -> tuple[list[Request], list[Output]]:
        requests: list[Request] = []
        events: list[Output] = []
        for item in self.reg.take_outputs():
            if isinstance(item, RequestReady):
                requests.append(item.request)
            else:
                events.append(item)
        self.events.extend(events)
        return requests, events

    def take(self, kind: type[T]) -> tuple[list[Request], T]:
        """The requests produced and the one event, which must be a ``kind``."""
        requests, events = self.outputs()
        return requests, one(events, kind)

    def start(self) -> Request:
        self.reg.start(self.now)
        (request,), _ = self.outputs()
        return request

    def answer(self, request: Request, status: int, *headers: tuple[str, str], **kw: str) -> bool:
        return self.reg.receive_response(respond(request, status, *headers, **kw), self.now)

    def advance_to(self, when: float) -> None:
        self.now = when
        self.reg.handle_timer(when)

    def register(self) -> Request:
        """Start, answer the 3CX-style 407, then 200: returns the authorised request."""
        first = self.start()
        self.answer(first, 407, ("Proxy-Authenticate", challenge_3cx("n1")))
        (second,), _ = self.outputs()
        self.answer(second, 200, ("Contact", f"<{self.reg.contact}>;expires=300"))
        self.outputs()
        return second


def hdr(message: Request | Response, name: str) -> str:
    value = message.headers.get(name)
    assert value is not None, f"no {name}"
    return value


def contact_of(message: Request | Response) -> SipUri:
    uri = parse_name_addr(hdr(message, "Contact")).uri
    assert isinstance(uri, SipUri)
    return uri


def due(when: float | None) -> float:
    assert when is not None
    return when


def one(events: list[Output], kind: type[T]) -> T:
    (event,) = events
    assert isinstance(event, kind), event
    return event


def respond(
    request: Request,
    status: int,
    *extra: tuple[str, str],
    via: str | None = None,
    call_id: str | None = None,
    cseq: str | None = None,
) -> Response:
    # The engine adds the Via (with rport) to what the registration produces.
    items: list[tuple[str, str]] = [
        ("Via", via if via is not None else ENGINE_VIA),
        ("From", hdr(request, "From")),
        ("To", hdr(request, "To") + ";tag=reg1"),
        ("Call-ID", call_id if call_id is not None else request.call_id),
        ("CSeq", cseq if cseq is not None else hdr(request, "CSeq")),
        *extra,
    ]
    return Response(status, reason_phrase(status), Headers(items))


def challenge_3cx(nonce: str) -> str:
    # A real 3CX v11 challenge: no qop, no opaque, no spaces (PEERS.md).
    return f'Digest nonce="{nonce}",algorithm=MD5,realm="{REALM}"'


def check_digest(request: Request, header: str) -> None:
    auth = parse_authorization(hdr(request, header))
    assert auth.username == "auth101"
    assert auth.uri == str(request.uri)
    assert verify_authorization(auth, method="REGISTER", password=PASSWORD, realm=REALM)


# -- the request ---------------------------------------------------------------------------------


def test_first_register_has_the_extension_as_aor_and_contact_user() -> None:
    h = Harness()
    request = h.start()
    assert request.method == "REGISTER"
    assert str(request.uri) == "sip:pbx.example.com:5062"
    assert request.from_.uri == SipUri("sip", "101", None, "pbx.example.com")
    assert request.from_tag == "tok2"
    assert request.to.uri == request.from_.uri and request.to_tag is None
    assert request.call_id == "tok1" == h.reg.call_id
    assert str(request.cseq) == "1 REGISTER"
    assert contact_of(request) == make_config().contact
    assert request.headers.get("Expires") == "300"
    assert request.headers.get("Max-Forwards") == "70"
    assert request.headers.get("User-Agent") == "sbc-test"
    assert "INVITE" in hdr(request, "Allow")
    assert "Via" not in request.headers  # the transport layer adds it
    assert "Authorization" not in request.headers
    assert h.reg.state is State.REGISTERING and not h.reg.registered
    assert h.reg.in_flight is request
    assert h.reg.next_deadline() == h.now + 32.0


def test_optional_headers_can_be_left_out() -> None:
    h = Harness(user_agent=None, allow="", display_name="Bridge")
    request = h.start()
    assert "User-Agent" not in request.headers and "Allow" not in request.headers
    assert request.from_.display == "Bridge"


# -- challenges ----------------------------------------------------------------------------------


def test_407_without_qop_is_answered_in_proxy_authorization_with_cseq_plus_one() -> None:
    h = Harness()
    first = h.start()
    assert h.answer(first, 407, ("Proxy-Authenticate", challenge_3cx("abc")))
    (second,), events = h.outputs()
    assert events == []
    assert str(second.cseq) == "2 REGISTER"
    assert second.call_id == first.call_id and second.from_tag == first.from_tag
    check_digest(second, "Proxy-Authorization")
    assert "qop" not in hdr(second, "Proxy-Authorization")
    assert h.reg.state is State.REGISTERING


def test_401_with_qop_auth_echoes_opaque() -> None:
    h = Harness()
    first = h.start()
    value = build_challenge(REALM, "n1", opaque="op4que", qop=("auth",))
    h.answer(first, 401, ("WWW-Authenticate", value))
    (second,), _ = h.outputs()
    auth = parse_authorization(hdr(second, "Authorization"))
    assert auth.opaque == "op4que" and auth.qop == "auth" and auth.nc == "00000001"
    check_digest(second, "Authorization")


def test_stale_nonce_is_rehashed_without_counting_a_failure() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 401, ("WWW-Authenticate", challenge_3cx("old")))
    (second,), _ = h.outputs()
    stale = f'Digest realm="{REALM}", nonce="new", algorithm=MD5, stale=true'
    h.answer(second, 401, ("WWW-Authenticate", stale))
    (third,), events = h.outputs()
    assert events == [] and h.reg.failures == 0
    assert parse_authorization(hdr(third, "Authorization")).nonce == "new"
    check_digest(third, "Authorization")
    h.answer(third, 200)
    _, events = h.outputs()
    assert isinstance(events[0], Registered)


def test_second_challenge_with_fresh_nonce_means_wrong_password_and_backs_off() -> None:
    h = Harness(fraction=0.0)
    first = h.start()
    h.answer(first, 401, ("WWW-Authenticate", challenge_3cx("n1")))
    (second,), _ = h.outputs()
    h.answer(second, 401, ("WWW-Authenticate", challenge_3cx("n2")))
    requests, events = h.outputs()
    assert requests == []
    (failure,) = events
    assert isinstance(failure, RegistrationFailed)
    assert failure.status == 401 and failure.failures == 1
    assert failure.reason == "401 Unauthorized: credentials refused"
    # RFC 5626 §4.5: first failure, upper bound 30 * 2 = 60, at least half of it.
    assert failure.retry_in == 30.0 and failure.retry_at == h.now + 30.0
    assert h.reg.state is State.BACKOFF and h.reg.retry_at == h.now + 30.0
    assert h.reg.next_deadline() == h.now + 30.0
    h.advance_to(h.now + 29.9)
    assert h.outputs() == ([], [])
    h.advance_to(h.now + 0.1)
    (retry,), _ = h.outputs()
    # The retry starts clean: the refused credentials are not sent again unasked.
    assert "Authorization" not in retry.headers
    assert str(retry.cseq) == "3 REGISTER" and retry.call_id == first.call_id


def test_endless_challenges_give_up_after_a_bound() -> None:
    h = Harness()
    request = h.start()
    for i in range(reg.MAX_CHALLENGES_PER_ATTEMPT):
        stale = f'Digest realm="{REALM}", nonce="n{i}", stale=true'
        h.answer(request, 401, ("WWW-Authenticate", stale))
        (request,), _ = h.outputs()
    h.answer(request, 401, ("WWW-Authenticate", f'Digest realm="{REALM}", nonce="x", stale=true'))
    requests, events = h.outputs()
    assert requests == [] and isinstance(events[0], RegistrationFailed)


def test_challenge_without_digest_is_a_failure() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 401, ("WWW-Authenticate", 'Basic realm="x"'))
    _, failure = h.take(RegistrationFailed)
    assert failure.status == 401 and h.reg.state is State.BACKOFF


# -- success and refresh ---------------------------------------------------------------------------


def test_grant_from_contact_expires_sets_refresh_at_the_margin() -> None:
    h = Harness()
    first = h.start()
    contact = f"<{h.reg.contact}>;expires=120, <sip:101@198.51.100.9>;expires=3600"
    h.answer(first, 200, ("Contact", contact), ("Expires", "999"))
    requests, event = h.take(Registered)
    assert requests == []
    assert event == Registered(str(h.reg.contact), 120, h.now + 120, h.now + 108, False)
    assert h.reg.registered and h.reg.state is State.REGISTERED
    assert h.reg.expires_at == h.now + 120 and h.reg.refresh_at == h.now + 108
    assert h.reg.next_deadline() == h.now + 108
    assert h.reg.in_flight is None and h.reg.retry_at is None


def test_grant_from_expires_header_then_from_request() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 200, ("Contact", "<sip:other@198.51.100.9>;expires=10"), ("Expires", "600"))
    _, event = h.take(Registered)
    assert event.expires == 600 and event.refresh_at == h.now + 540  # 10 % of 600 > 5 s

    h2 = Harness()
    first = h2.start()
    h2.answer(first, 200, ("Contact", f"<{h2.reg.contact}>;expires=bad"), ("Expires", "x"))
    _, event = h2.take(Registered)
    assert event.expires == 300


def test_unparseable_contact_in_200_falls_back() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 200, ("Contact", "<broken"), ("Expires", "60"))
    _, event = h.take(Registered)
    assert event.expires == 60


def test_zero_grant_is_a_failure() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 200, ("Expires", "0"))
    _, event = h.take(RegistrationFailed)
    assert isinstance(event, RegistrationFailed) and "expires=0" in event.reason
    assert not h.reg.registered


def test_refresh_keeps_call_id_and_counts_cseq_with_preemptive_credentials() -> None:
    h = Harness()
    second = h.register()
    assert h.reg.refresh_at == h.now + 270  # 300 - max(5, 30)
    h.advance_to(h.now + 100)
    assert h.outputs() == ([], [])
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    assert refresh.call_id == second.call_id
    assert str(refresh.cseq) == "3 REGISTER"
    check_digest(refresh, "Proxy-Authorization")
    assert h.reg.registered and h.reg.state is State.REGISTERING
    # Still registered while the refresh is in flight; the deadline is now its guard timer.
    assert h.reg.next_deadline() == h.now + 30.0  # binding ends before the 32 s guard
    h.answer(refresh, 200, ("Expires", "300"))
    _, event = h.take(Registered)
    assert isinstance(event, Registered) and event.refreshed


def test_binding_expires_when_refresh_goes_unanswered() -> None:
    h = Harness()
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    h.outputs()
    expires_at = due(h.reg.expires_at)
    h.advance_to(expires_at)
    _, events = h.outputs()
    assert events == [BindingExpired(expires_at)]
    assert not h.reg.registered and h.reg.state is State.REGISTERING
    h.advance_to(h.now + 2)  # the 32 s guard: 30 s until expiry + 2
    _, failure = h.take(RegistrationFailed)
    assert failure.status is None and failure.reason == "request timed out"


def test_short_grant_refreshes_at_half() -> None:
    assert refresh_delay(4) == 2.0
    assert refresh_delay(10) == 5.0
    assert refresh_delay(3600) == 3240.0


def test_provisional_changes_nothing() -> None:
    h = Harness()
    first = h.start()
    assert h.answer(first, 100)
    assert h.outputs() == ([], []) and h.reg.state is State.REGISTERING


def test_stray_responses_are_ignored() -> None:
    h = Harness()
    first = h.start()
    assert not h.answer(first, 200, call_id="other")
    assert not h.answer(first, 200, cseq="7 REGISTER")
    assert not h.answer(first, 200, cseq="1 OPTIONS")
    assert not h.answer(first, 200, cseq="garbage")
    assert h.reg.state is State.REGISTERING
    h.answer(first, 200)
    assert not h.answer(first, 200)  # a retransmitted 200: nothing in flight any more


# -- 423 ----------------------------------------------------------------------------------------


def test_423_retries_with_min_expires_and_keeps_credentials() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 401, ("WWW-Authenticate", build_challenge(REALM, "n", qop=("auth",))))
    (second,), _ = h.outputs()
    h.answer(second, 423, ("Min-Expires", "3600"))
    (third,), events = h.outputs()
    assert events == [ExpiresRaised(300, 3600)]
    assert third.headers.get("Expires") == "3600" and h.reg.expires == 3600
    assert str(third.cseq) == "3 REGISTER"
    assert parse_authorization(hdr(third, "Authorization")).nc == "00000002"
    check_digest(third, "Authorization")
    h.answer(third, 200)
    _, event = h.take(Registered)
    assert event.expires == 3600


@pytest.mark.parametrize("extra", [(), (("Min-Expires", "60"),), (("Min-Expires", "soon"),)])
def test_unusable_423_is_a_failure(extra: tuple[tuple[str, str], ...]) -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 423, *extra)
    requests, event = h.take(RegistrationFailed)
    assert requests == []
    assert isinstance(event, RegistrationFailed) and event.status == 423
    assert "Min-Expires" in event.reason


# -- failures and backoff -----------------------------------------------------------------------


def test_backoff_schedule_follows_rfc5626() -> None:
    assert [backoff_upper_bound(n, 30, 1800) for n in range(1, 8)] == [
        60,
        120,
        240,
        480,
        960,
        1800,
        1800,
    ]
    assert backoff_delay(3, 30, 1800, 0.0) == 120.0
    assert backoff_delay(3, 30, 1800, 0.5) == 180.0
    assert backoff_delay(3, 30, 1800, 0.999) == pytest.approx(239.88)
    assert backoff_delay(1, 30, 1800, 7.0) == 60.0  # jitter is clamped to the range
    assert backoff_delay(1, 30, 1800, -1.0) == 30.0
    assert backoff_upper_bound(10_000, 30, 1800) == 1800
    assert backoff_upper_bound(0, 30, 1800) == 30


def test_403_5xx_and_transport_loss_back_off_exponentially_then_success_resets() -> None:
    h = Harness(fraction=0.0, backoff_base=1.0, backoff_max=3.0)
    first = h.start()
    h.answer(first, 403, ("Warning", '399 pbx "IP blacklisted"'))
    _, failure = h.take(RegistrationFailed)
    assert failure.reason == '403 Forbidden (399 pbx "IP blacklisted")'
    assert failure.retry_in == 1.0
    h.advance_to(failure.retry_at)
    (second,), _ = h.outputs()
    h.answer(second, 503)
    _, failure = h.take(RegistrationFailed)
    # Upper bound min(3, 1 * 2**2) = 3, half of it with no jitter.
    assert failure.status == 503 and failure.failures == 2 and failure.retry_in == 1.5
    h.advance_to(failure.retry_at)
    h.outputs()
    h.reg.transport_failed(h.now, "connection refused")
    _, failure = h.take(RegistrationFailed)
    assert failure.status is None and failure.reason == "connection refused"
    assert failure.failures == 3 and failure.retry_in == 1.5  # still capped at 3
    assert h.reg.last_failure == failure
    h.advance_to(failure.retry_at)
    (fourth,), _ = h.outputs()
    h.answer(fourth, 200)
    assert h.reg.failures == 0 and h.reg.last_failure is None and h.reg.registered


def test_timeout_then_late_answer_is_ignored() -> None:
    h = Harness()
    first = h.start()
    h.advance_to(h.now + 31)
    assert h.outputs() == ([], [])
    h.advance_to(h.now + 1)
    _, failure = h.take(RegistrationFailed)
    assert failure.status is None
    assert not h.answer(first, 200)


def test_failed_refresh_keeps_binding_until_expiry() -> None:
    h = Harness(fraction=0.0)
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    h.answer(refresh, 500)
    _, failure = h.take(RegistrationFailed)
    assert h.reg.registered and h.reg.state is State.BACKOFF
    # Binding ends in 30 s, the retry is due in 30 s too: expiry fires first (same instant).
    expires_at = due(h.reg.expires_at)
    assert h.reg.next_deadline() == min(expires_at, failure.retry_at)
    h.advance_to(expires_at)
    requests, events = h.outputs()
    assert events == [BindingExpired(expires_at)]
    assert len(requests) == 1  # the retry was due at the same time


# -- NAT ------------------------------------------------------------------------------------------


def test_received_and_rport_rewrite_the_contact_once() -> None:
    h = Harness()
    first = h.start()
    via = ENGINE_VIA.replace(";rport", ";rport=40000;received=203.0.113.5")
    h.answer(first, 200, via=via)
    (second,), events = h.outputs()
    assert events == [ContactRewritten("sip:101@192.0.2.10:5070", "sip:101@203.0.113.5:40000")]
    assert h.reg.learned_address == ("203.0.113.5", 40000)
    assert contact_of(second).host == "203.0.113.5"
    assert second.call_id == first.call_id and str(second.cseq) == "2 REGISTER"
    assert h.reg.registered  # the first binding stands while the new one is asked for
    # Even if the next answer still disagrees, no second rewrite in a row.
    via2 = ENGINE_VIA.replace(";rport", ";rport=40001;received=203.0.113.5")
    h.answer(second, 200, via=via2)
    requests, event = h.take(Registered)
    assert requests == [] and isinstance(event, Registered)
    assert event.contact == "sip:101@203.0.113.5:40000"


def test_matching_address_or_advertised_address_means_no_rewrite() -> None:
    h = Harness()
    first = h.start()
    via = ENGINE_VIA.replace(";rport", ";rport=5070;received=192.0.2.10")
    h.answer(first, 200, via=via)
    requests, _ = h.outputs()
    assert requests == [] and h.reg.learned_address == ("192.0.2.10", 5070)

    h2 = Harness(rewrite_contact=False)
    first = h2.start()
    via = ENGINE_VIA.replace(";rport", ";rport=1;received=203.0.113.5")
    h2.answer(first, 200, via=via)
    requests, _ = h2.outputs()
    assert requests == [] and h2.reg.learned_address == ("203.0.113.5", 1)
    assert h2.reg.contact == make_config().contact


def test_tcp_learns_only_the_host() -> None:
    h = Harness(transport="tcp")
    first = h.start()
    via = ENGINE_VIA.replace(";rport", ";rport=51234;received=203.0.113.5")
    h.answer(first, 200, via=via)
    (second,), _ = h.outputs()
    contact = contact_of(second)
    assert (contact.host, contact.port) == ("203.0.113.5", 5070)


def test_unreadable_via_in_200_skips_learning() -> None:
    h = Harness()
    first = h.start()
    h.answer(first, 200, via="garbage")
    requests, event = h.take(Registered)
    assert requests == [] and isinstance(event, Registered) and h.reg.learned_address is None


# -- unregistering -------------------------------------------------------------------------------


def test_stop_when_registered_sends_expires_zero_then_terminates() -> None:
    h = Harness()
    second = h.register()
    h.reg.stop(h.now)
    ready = one(h.reg.take_outputs(), RequestReady)
    assert ready.unregister
    request = ready.request
    assert request.headers.get("Expires") == "0"
    assert request.call_id == second.call_id and str(request.cseq) == "3 REGISTER"
    assert contact_of(request) == h.reg.contact
    check_digest(request, "Proxy-Authorization")
    assert h.reg.state is State.UNREGISTERING
    h.reg.stop(h.now)  # a second stop changes nothing
    assert h.reg.take_outputs() == []
    h.answer(request, 100)
    h.answer(request, 200)
    _, event = h.take(Unregistered)
    assert event == Unregistered(200, "200 OK")
    assert h.reg.terminated and not h.reg.registered and h.reg.next_deadline() is None
    h.reg.stop(h.now)
    h.advance_to(h.now + 1000)
    assert h.reg.take_outputs() == []


def test_unregister_challenge_is_answered_and_refusal_ends_it() -> None:
    h = Harness()
    h.register()
    h.reg.stop(h.now)
    (request,), _ = h.outputs()
    h.answer(request, 407, ("Proxy-Authenticate", challenge_3cx("fresh")))
    (retry,), _ = h.outputs()
    assert retry.headers.get("Expires") == "0" and str(retry.cseq) == "4 REGISTER"
    h.answer(retry, 407, ("Proxy-Authenticate", challenge_3cx("fresher")))
    requests, event = h.take(Unregistered)
    assert requests == [] and event.status == 407 and h.reg.terminated


@pytest.mark.parametrize("status", [404, 423, 503])
def test_unregister_failure_still_terminates(status: int) -> None:
    h = Harness()
    h.register()
    h.reg.stop(h.now)
    (request,), _ = h.outputs()
    h.answer(request, status)
    _, event = h.take(Unregistered)
    assert event.status == status and h.reg.terminated


def test_unregister_timeout_and_transport_loss_terminate() -> None:
    h = Harness()
    h.register()
    h.reg.stop(h.now)
    h.outputs()
    h.advance_to(h.now + 32)
    _, event = h.take(Unregistered)
    assert event == Unregistered(None, "request timed out")

    h2 = Harness()
    h2.register()
    h2.reg.stop(h2.now)
    h2.outputs()
    h2.reg.transport_failed(h2.now, "reset")
    _, event = h2.take(Unregistered)
    assert event == Unregistered(None, "reset")


def test_stop_before_start_or_without_binding_sends_nothing() -> None:
    h = Harness()
    h.reg.stop(h.now)
    requests, event = h.take(Unregistered)
    assert requests == [] and event == Unregistered(None, "") and h.reg.terminated

    h2 = Harness()
    first = h2.start()
    h2.answer(first, 503)
    h2.outputs()
    h2.reg.stop(h2.now)
    requests, event = h2.take(Unregistered)
    assert requests == [] and event == Unregistered(None, "no binding to remove")


def test_stop_in_backoff_with_a_live_binding_unregisters() -> None:
    h = Harness()
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    h.answer(refresh, 503)
    h.outputs()
    h.reg.stop(h.now)
    (request,), _ = h.outputs()
    assert request.headers.get("Expires") == "0" and h.reg.state is State.UNREGISTERING


def test_stop_while_first_register_in_flight_unregisters_what_it_got() -> None:
    h = Harness()
    first = h.start()
    h.reg.stop(h.now)
    assert h.reg.state is State.DRAINING and h.outputs() == ([], [])
    h.reg.stop(h.now)
    h.answer(first, 100)
    assert h.reg.state is State.DRAINING
    h.answer(first, 200, ("Expires", "60"))
    (request,), _ = h.outputs()
    assert request.headers.get("Expires") == "0" and str(request.cseq) == "2 REGISTER"
    h.answer(request, 200)
    _, event = h.take(Unregistered)
    assert event.status == 200 and h.reg.terminated


def test_stop_while_first_register_in_flight_and_refused_just_ends() -> None:
    h = Harness()
    first = h.start()
    h.reg.stop(h.now)
    h.answer(first, 200, ("Expires", "0"))  # nothing granted
    requests, event = h.take(Unregistered)
    assert requests == [] and event == Unregistered(None, "no binding to remove")

    h2 = Harness()
    first = h2.start()
    h2.reg.stop(h2.now)
    h2.answer(first, 401, ("WWW-Authenticate", challenge_3cx("n")))  # no binding: no retry
    requests, _ = h2.outputs()
    assert requests == [] and h2.reg.terminated


def test_stop_while_refresh_is_challenged_answers_it_as_unregister() -> None:
    h = Harness()
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    h.reg.stop(h.now)
    h.answer(refresh, 407, ("Proxy-Authenticate", challenge_3cx("n9")))
    (request,), _ = h.outputs()
    assert request.headers.get("Expires") == "0"
    assert str(request.cseq) == "4 REGISTER"
    check_digest(request, "Proxy-Authorization")
    assert h.reg.state is State.UNREGISTERING


def test_stop_while_refresh_in_flight_times_out_then_unregisters() -> None:
    h = Harness()
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    h.reg.stop(h.now)
    h.answer(refresh, 503)
    (request,), _ = h.outputs()
    assert request.headers.get("Expires") == "0"


def test_refused_challenge_while_draining_refresh_falls_back_to_plain_unregister() -> None:
    h = Harness()
    h.register()
    h.advance_to(due(h.reg.refresh_at))
    (refresh,), _ = h.outputs()
    h.reg.stop(h.now)
    # A challenge without a Digest scheme cannot be answered: unregister with what we have.
    h.answer(refresh, 401, ("WWW-Authenticate", "Basic realm=x"))
    (request,), _ = h.outputs()
    assert request.headers.get("Expires") == "0" and h.reg.state is State.UNREGISTERING


# -- flow loss ------------------------------------------------------------------------------------


def test_lost_flow_while_registered_registers_again_at_once() -> None:
    h = Harness(transport="tcp")
    second = h.register()
    h.reg.flow_lost(h.now)
    (again,), _ = h.outputs()
    assert again.call_id == second.call_id and str(again.cseq) == "3 REGISTER"
    assert h.reg.state is State.REGISTERING
    h.reg.flow_lost(h.now)  # in flight: the request's own failure will be reported
    assert h.outputs() == ([], [])
    h.reg.transport_failed(h.now, "connection reset")
    _, failure = h.take(RegistrationFailed)
    assert failure.reason == "connection reset"
    assert h.reg.retry_at is not None  # backing off
    h.reg.flow_lost(h.now)
    assert h.outputs() == ([], [])


def test_keepalive_options_goes_to_the_registrar_from_the_contact() -> None:
    h = Harness()
    h.register()
    options = h.reg.keepalive_options()
    assert options.method == "OPTIONS" and options.uri == make_config().registrar
    assert str(options.cseq) == "1 OPTIONS" and options.call_id != h.reg.call_id
    assert options.from_tag is not None and options.to_tag is None
    assert contact_of(options) == h.reg.contact
    assert options.headers.get("User-Agent") == "sbc-test"
    assert "User-Agent" not in Harness(user_agent=None).reg.keepalive_options().headers


# -- the table ------------------------------------------------------------------------------------


def test_inputs_without_a_transition_are_protocol_errors() -> None:
    h = Harness()
    h.start()
    with pytest.raises(ProtocolError):
        h.reg.start(h.now)
    h2 = Harness()
    with pytest.raises(ProtocolError):
        h2.reg.transport_failed(h2.now, "x")
    h3 = Harness()
    h3.register()
    with pytest.raises(ProtocolError):
        h3.reg.transport_failed(h3.now, "x")


def test_timers_in_idle_and_early_timers_do_nothing() -> None:
    h = Harness()
    h.advance_to(h.now + 10)
    assert h.outputs() == ([], []) and h.reg.state is State.IDLE
    assert h.reg.next_deadline() is None


def test_every_step_in_the_table_is_reachable_from_a_state() -> None:
    states = {state for state, _ in reg.TRANSITIONS}
    assert states == set(State)
    assert set(reg.TRANSITIONS.values()) == set(reg.Step)


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires": 0},
        {"backoff_base": 0},
        {"backoff_base": 10, "backoff_max": 5},
        {"request_timeout": 0},
    ],
)
def test_config_is_checked(overrides: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_config(**overrides)


def test_password_is_not_in_the_config_repr() -> None:
    assert PASSWORD not in repr(make_config())


# -- the config the service builds from the settings ---------------------------------------------


def _settings(**pbx: object) -> Any:
    from sbc.ops.settings import PbxSettings, RetellSettings, Settings, SipSettings

    values: dict[str, Any] = {
        "host": "pbx.example.com",
        "extension": "101",
        "auth_id": "auth101",
        "password": PASSWORD,
    }
    values.update(pbx)
    return Settings(
        sip=SipSettings(bind="192.0.2.10", port=5070),
        pbx=PbxSettings(**values),
        retell=RetellSettings(number="+14155550100"),
    )


def test_service_maps_settings_to_the_registration_config() -> None:
    from sbc.ops import service

    settings = _settings(register_expires=120, register_backoff_base=10, register_backoff_max=60)
    cfg = service.registration_config(settings, service.advertised_host(settings))
    assert str(cfg.registrar) == "sip:pbx.example.com:5060"
    assert str(cfg.aor) == "sip:101@pbx.example.com"
    assert str(cfg.contact) == "sip:101@192.0.2.10:5070"
    assert (cfg.username, cfg.password, cfg.expires) == ("auth101", PASSWORD, 120)
    assert (cfg.backoff_base, cfg.backoff_max) == (10, 60)
    assert cfg.rewrite_contact and cfg.request_timeout == 34.0
    assert str(service.registrar_target(settings)) == "sip:pbx.example.com:5060"


def test_service_config_with_domain_tcp_and_advertised_address() -> None:
    from sbc.ops import service
    from sbc.ops.settings import Settings, SipSettings

    base = _settings(domain="tenant.3cx.example", transport="tcp", port=5062)
    settings = Settings(
        sip=SipSettings(bind="0.0.0.0", port=5070, advertised_address="203.0.113.7"),
        pbx=base.pbx,
        retell=base.retell,
    )
    assert service.advertised_host(settings) == "203.0.113.7"
    cfg = service.registration_config(settings, "203.0.113.7")
    # RFC 3261 §10.2: the Request-URI names the domain; the host is only where it goes.
    assert str(cfg.registrar) == "sip:tenant.3cx.example;transport=tcp"
    assert str(cfg.aor) == "sip:101@tenant.3cx.example"
    assert str(cfg.contact) == "sip:101@203.0.113.7:5070;transport=tcp"
    assert not cfg.rewrite_contact and cfg.transport == "tcp"
    assert str(service.registrar_target(settings)) == "sip:pbx.example.com:5062;transport=tcp"


def test_service_finds_the_local_address_toward_the_pbx_when_bound_to_a_wildcard() -> None:
    from sbc.ops import service
    from sbc.ops.settings import Settings, SipSettings

    base = _settings(host="127.0.0.31")
    settings = Settings(sip=SipSettings(bind="0.0.0.0"), pbx=base.pbx, retell=base.retell)
    assert service.advertised_host(settings) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="advertised_address"):
        service.local_address_toward("no-such-host.invalid", 5060)
