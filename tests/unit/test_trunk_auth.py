"""The server half of digest authentication: stateless nonces and the verdict on credentials
(``sbc.sip.digest``), and the check of Retell's INVITEs built on them (``sbc.b2bua.trunk_auth``).
"""

from __future__ import annotations

import pytest

from sbc.b2bua.trunk_auth import NONCE_LIFETIME, TrunkAuth
from sbc.sip.digest import (
    ClientAuth,
    Credentials,
    CredentialsCheck,
    Verdict,
    build_authorization,
    check_credentials,
    make_nonce,
    nonce_issued,
    parse_challenge,
)
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri

SECRET = b"s" * 32
RETELL = Credentials("retell-trunk", "pa55word")
REALM = "203.0.113.5"
URI = "sip:sales@203.0.113.5:5060;transport=tcp"

# RFC 2617 §3.5: the one published example with qop=auth.
RFC2617_VALUE = (
    'Digest username="Mufasa", realm="testrealm@host.com", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, '
    'nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", '
    'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)
MUFASA = Credentials("Mufasa", "Circle Of Life")


def answer(
    nonce: str,
    *,
    credentials: Credentials = RETELL,
    realm: str = REALM,
    uri: str = URI,
    method: str = "INVITE",
    qop: tuple[str, ...] = ("auth",),
    nc: int = 1,
    cnonce: str = "0a4f113b",
) -> str:
    challenge = parse_challenge(
        f'Digest realm="{realm}", nonce="{nonce}", algorithm=MD5'
        + (f', qop="{",".join(qop)}"' if qop else ""),
        proxy=True,
    )
    return build_authorization(challenge, credentials, method=method, uri=uri, cnonce=cnonce, nc=nc)


def check(
    values: list[str], *, now: float = 1000.0, uri: str = URI, method: str = "INVITE"
) -> CredentialsCheck:
    return check_credentials(
        values,
        credentials=RETELL,
        realm=REALM,
        method=method,
        uris=(uri,),
        secret=SECRET,
        now=now,
        lifetime=300.0,
    )


# -- nonces ----------------------------------------------------------------------------------------


def nonce_at(issued: int, salt: bytes = b"\x01" * 8, secret: bytes = SECRET) -> str:
    return make_nonce(secret, issued, salt)


def test_a_nonce_names_its_time_and_only_its_secret_recognises_it() -> None:
    made = nonce_at(1000)
    assert made.startswith("3e8.0101010101010101.") and len(made) == 4 + 17 + 32
    assert nonce_issued(made, SECRET) == 1000
    assert nonce_issued(made, b"t" * 32) is None  # another process's secret
    assert nonce_at(1001) != made
    assert nonce_at(1000, b"\x02" * 8) != made  # the salt tells two challenges of one second apart
    assert nonce_issued(nonce_at(1000, b""), SECRET) == 1000


@pytest.mark.parametrize(
    "forged",
    [
        "",
        "3e8",
        "3e8.",
        ".abc",
        "3e8..",
        "3e9" + nonce_at(1000)[3:],  # time changed, MAC kept
        "03e8" + nonce_at(1000)[3:],  # another spelling of the same time
        "3E8" + nonce_at(1000)[3:],
        nonce_at(1000).replace(".01", ".02", 1),  # salt changed, MAC kept
        nonce_at(1000).replace(".0101010101010101.", "."),  # salt dropped
        "xyz.." + "0" * 32,
        "1" * 17 + ".." + "0" * 32,
        "3e8.." + "é" + "0" * 31,
        "3e8." + "0" * 34 + "." + "0" * 32,
        "3e8.zz." + "0" * 32,
    ],
)
def test_forged_or_malformed_nonces_are_not_ours(forged: str) -> None:
    assert nonce_issued(forged, SECRET) is None


def test_negative_nonce_time_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        nonce_at(-1)
    with pytest.raises(ValueError, match="16 bytes"):
        nonce_at(1, b"x" * 17)


# -- the verdict -----------------------------------------------------------------------------------


def test_right_credentials_on_a_fresh_nonce_are_accepted() -> None:
    nonce = nonce_at(1000)
    result = check([answer(nonce)], now=1000.5)
    assert result.verdict is Verdict.ACCEPTED
    assert result.authorization is not None and result.authorization.username == "retell-trunk"
    # The last second of the nonce's life still counts; the next one does not.
    assert check([answer(nonce)], now=1300.0).verdict is Verdict.ACCEPTED
    assert check([answer(nonce)], now=1300.5).verdict is Verdict.STALE


def test_rfc2617_vector_is_verified_but_its_nonce_is_not_ours() -> None:
    result = check_credentials(
        [RFC2617_VALUE],
        credentials=MUFASA,
        realm="testrealm@host.com",
        method="GET",
        uris=["/dir/index.html"],
        secret=SECRET,
        now=0.0,
        lifetime=300.0,
    )
    # The response is right (RFC 2617 §3.5): only the nonce is unknown here, so stale=true.
    assert (result.verdict, result.reason) == (Verdict.STALE, "nonce not issued here")
    wrong = check_credentials(
        [RFC2617_VALUE],
        credentials=Credentials("Mufasa", "Circle of Life"),  # one letter off
        realm="testrealm@host.com",
        method="GET",
        uris=["/dir/index.html"],
        secret=SECRET,
        now=0.0,
        lifetime=300.0,
    )
    assert wrong.verdict is Verdict.REFUSED


def test_no_credentials_or_none_for_this_realm_or_unreadable_ones_are_missing() -> None:
    nonce = nonce_at(1000)
    assert check([]).verdict is Verdict.MISSING
    assert check([answer(nonce, realm="3CXPhoneSystem")]).verdict is Verdict.MISSING
    assert check(["Basic cmV0ZWxsOnB3", "Digest garbage"]).verdict is Verdict.MISSING
    # Unreadable values are skipped: the readable credentials for the realm are judged.
    assert check(["Digest garbage", answer(nonce)], now=1000).verdict is Verdict.ACCEPTED


def test_wrong_password_and_wrong_user_are_refused() -> None:
    nonce = nonce_at(1000)
    wrong_password = answer(nonce, credentials=Credentials("retell-trunk", "guess"))
    result = check([wrong_password])
    assert result.verdict is Verdict.REFUSED and "wrong response" in result.reason
    wrong_user = answer(nonce, credentials=Credentials("admin", "pa55word"))
    result = check([wrong_user])
    assert result.verdict is Verdict.REFUSED and "unknown username" in result.reason


def test_a_response_for_another_nonce_is_refused() -> None:
    # Credentials computed for one nonce and presented with another (a replay onto a fresh
    # challenge): the response does not match the nonce it names.
    old = answer(nonce_at(900))
    fresh = nonce_at(1000)
    replayed = old.replace(nonce_at(900), fresh)
    assert fresh in replayed
    assert check([replayed]).verdict is Verdict.REFUSED


def test_right_password_on_an_expired_or_foreign_nonce_is_stale() -> None:
    expired = nonce_at(600)
    assert check([answer(expired)], now=1000).verdict is Verdict.STALE
    foreign = nonce_at(1000, secret=b"previous process")
    result = check([answer(foreign)], now=1000)
    assert (result.verdict, result.reason) == (Verdict.STALE, "nonce not issued here")
    future = nonce_at(2000)
    assert check([answer(future)], now=1000).verdict is Verdict.STALE


def test_digest_uri_must_be_the_request_uri() -> None:
    nonce = nonce_at(1000)
    other = answer(nonce, uri="sip:+19005550100@203.0.113.5:5060;transport=tcp")
    result = check([other])
    assert result.verdict is Verdict.REFUSED and "digest-uri" in result.reason
    # Equal as URIs (RFC 3261 §19.1.4: host and parameter names compare case-insensitively).
    same = answer(nonce, uri="sip:sales@203.0.113.5:5060;TRANSPORT=tcp")
    assert check([same]).verdict is Verdict.ACCEPTED
    assert check([answer(nonce, uri="not a uri")]).verdict is Verdict.REFUSED


def test_method_is_part_of_the_response() -> None:
    nonce = nonce_at(1000)
    assert check([answer(nonce, method="BYE")]).verdict is Verdict.REFUSED


def test_rfc2069_answer_without_qop_is_verified() -> None:
    nonce = nonce_at(1000)
    assert check([answer(nonce, qop=())]).verdict is Verdict.ACCEPTED


# -- TrunkAuth: the shell (clock, secret, replays) -------------------------------------------------


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def invite(*headers: tuple[str, str], cseq: int = 1) -> Request:
    return Request(
        "INVITE",
        parse_uri(URI),
        Headers(
            (
                ("Via", "SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bKrt1"),
                ("From", "<sip:+14155550100@sip.retellai.com>;tag=rt1"),
                ("To", "<sip:sales@203.0.113.5>"),
                ("Call-ID", "retell-call-1"),
                ("CSeq", f"{cseq} INVITE"),
                *headers,
            )
        ),
        b"",
    )


def challenged(auth: TrunkAuth, stale: bool = False) -> Response:
    return Response(407, "", Headers((("Proxy-Authenticate", auth.challenge(stale=stale)),)))


def test_challenge_is_md5_qop_auth_in_the_realm() -> None:
    auth = TrunkAuth(RETELL, REALM, clock=Clock(), secret=SECRET)
    value = auth.challenge()
    assert value.startswith(f'Digest realm="{REALM}", nonce="')
    assert value.endswith('algorithm=MD5, qop="auth"')
    challenge = parse_challenge(value, proxy=True)
    assert nonce_issued(challenge.nonce, SECRET) == 5000 and not challenge.stale
    assert parse_challenge(auth.challenge(stale=True)).stale
    assert auth.lifetime == NONCE_LIFETIME == 300.0


def test_client_answer_is_accepted_once_and_its_replay_is_challenged() -> None:
    clock = Clock()
    auth = TrunkAuth(RETELL, REALM, clock=clock)  # a random secret of its own
    first = invite()
    assert auth.check(first).verdict is Verdict.MISSING
    retry = ClientAuth(RETELL).authorize(challenged(auth), first, "cn1")
    assert retry is not None
    clock.now += 2
    assert auth.check(retry).verdict is Verdict.ACCEPTED
    # The very same credentials again (a captured INVITE sent again): not accepted twice.
    replay = auth.check(retry)
    assert (replay.verdict, replay.reason) == (Verdict.MISSING, "credentials replayed")
    # The same nonce with the next nc (a client reusing its challenge) is no replay.
    client = ClientAuth(RETELL)
    answered = client.authorize(challenged(auth), first, "cn2")
    assert answered is not None and auth.check(answered).verdict is Verdict.ACCEPTED
    again = client.apply(invite(cseq=5), "cn2")
    assert "nc=00000002" in (again.headers.get("Proxy-Authorization") or "")
    assert auth.check(again).verdict is Verdict.ACCEPTED


def test_expired_nonce_is_stale_and_the_client_retries_without_failing() -> None:
    clock = Clock()
    auth = TrunkAuth(RETELL, REALM, clock=clock, lifetime=60.0)
    first = invite()
    client = ClientAuth(RETELL)
    retry = client.authorize(challenged(auth), first, "cn")
    assert retry is not None
    clock.now += 61
    assert auth.check(retry).verdict is Verdict.STALE
    # stale=true: sbc's own client policy (and Retell's) answers again rather than give up.
    again = client.authorize(challenged(auth, stale=True), retry, "cn")
    assert again is not None and auth.check(again).verdict is Verdict.ACCEPTED


def test_a_restart_makes_old_nonces_stale() -> None:
    clock = Clock()
    before = TrunkAuth(RETELL, REALM, clock=clock)
    after = TrunkAuth(RETELL, REALM, clock=clock)
    retry = ClientAuth(RETELL).authorize(challenged(before), invite(), "cn")
    assert retry is not None
    assert after.check(retry).verdict is Verdict.STALE


def test_the_to_uri_is_accepted_as_digest_uri_as_livekit_sends_it() -> None:
    # LiveKit (Retell's SIP stack) hashes the To URI of the challenge, not the Request-URI.
    auth = TrunkAuth(RETELL, REALM, clock=Clock(), secret=SECRET)
    nonce = parse_challenge(auth.challenge()).nonce
    to_uri = answer(nonce, uri="sip:sales@203.0.113.5")
    assert auth.check(invite(("Proxy-Authorization", to_uri))).verdict is Verdict.ACCEPTED
    elsewhere = answer(nonce, uri="sip:sales@198.51.100.1", cnonce="c2")
    assert auth.check(invite(("Proxy-Authorization", elsewhere))).verdict is Verdict.REFUSED


def test_wrong_credentials_are_refused_and_authorization_header_is_read_too() -> None:
    auth = TrunkAuth(RETELL, REALM, clock=Clock(), secret=SECRET)
    nonce = parse_challenge(auth.challenge()).nonce
    bad = answer(nonce, credentials=Credentials("retell-trunk", "wrong"))
    assert auth.check(invite(("Proxy-Authorization", bad))).verdict is Verdict.REFUSED
    good = answer(nonce)
    assert auth.check(invite(("Authorization", good))).verdict is Verdict.ACCEPTED


def test_replay_memory_forgets_what_has_expired_anyway() -> None:
    clock = Clock()
    auth = TrunkAuth(RETELL, REALM, clock=clock, secret=SECRET, lifetime=10.0)
    for i in range(5):
        nonce = parse_challenge(auth.challenge()).nonce
        request = invite(("Proxy-Authorization", answer(nonce, cnonce=f"c{i}")))
        assert auth.check(request).verdict is Verdict.ACCEPTED
        clock.now += 4
    assert len(auth._accepted) == 3  # those accepted within the last 10 s
    assert auth.check(invite()).verdict is Verdict.MISSING
