"""Digest authentication: RFC test vectors, tolerant parsing, the client retry policy."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from sbc.sip.digest import (
    Authorization,
    Challenge,
    ClientAuth,
    Credentials,
    auth_header_name,
    build_authorization,
    build_challenge,
    compute_response,
    parse_authorization,
    parse_challenge,
    verify_authorization,
)
from sbc.sip.errors import ParseError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
Pairs = tuple[tuple[str, str], ...]
MUFASA = Credentials("Mufasa", "Circle of Life")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def params_of(value: str) -> dict[str, str]:
    """Independent re-parse of a header we built, for assertions."""
    assert value.startswith("Digest ")
    out: dict[str, str] = {}
    for part in value[len("Digest ") :].split(", "):
        name, _, v = part.partition("=")
        out[name] = v[1:-1] if v.startswith('"') else v
    return out


# -- RFC vectors ---------------------------------------------------------------------------


def test_rfc2617_section_3_5_vector() -> None:
    challenge = parse_challenge(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    value = build_authorization(
        challenge,
        Credentials("Mufasa", "Circle Of Life"),
        method="GET",
        uri="/dir/index.html",
        cnonce="0a4f113b",
        nc=1,
    )
    p = params_of(value)
    assert p["response"] == "6629fae49393a05397450978507c4ef1"
    assert p["qop"] == "auth"
    assert p["nc"] == "00000001"
    assert p["cnonce"] == "0a4f113b"
    assert p["opaque"] == "5ccc069c403ebaf9f0171e9517f40e41"
    assert p["algorithm"] == "MD5"
    assert p["uri"] == "/dir/index.html"
    assert p["username"] == "Mufasa"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_vectors(algorithm: str, expected: str) -> None:
    challenge = parse_challenge(
        f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={algorithm}, '
        f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
    )
    assert challenge.qop == ("auth", "auth-int")
    value = build_authorization(
        challenge, MUFASA, method="GET", uri="/dir/index.html", cnonce=RFC7616_CNONCE, nc=1
    )
    p = params_of(value)
    assert p["response"] == expected
    assert p["algorithm"] == algorithm
    # The server half accepts what the client half produced.
    auth = parse_authorization(value)
    assert verify_authorization(
        auth, method="GET", password="Circle of Life", realm="http-auth@example.org"
    )
    assert not verify_authorization(
        auth, method="GET", password="circle of life", realm="http-auth@example.org"
    )


def test_md5_sess_matches_independent_computation() -> None:
    challenge = Challenge(realm="r", nonce="n1", algorithm="MD5-sess", qop=("auth",))
    value = build_authorization(
        challenge, Credentials("u", "p"), method="INVITE", uri="sip:b@x", cnonce="cn", nc=2
    )
    ha1 = md5(f"{md5('u:r:p')}:n1:cn")
    ha2 = md5("INVITE:sip:b@x")
    assert params_of(value)["response"] == md5(f"{ha1}:n1:00000002:cn:auth:{ha2}")
    assert params_of(value)["algorithm"] == "MD5-sess"
    auth = parse_authorization(value)
    assert verify_authorization(auth, method="INVITE", password="p", realm="r")


def test_sess_without_qop_still_sends_cnonce() -> None:
    challenge = Challenge(realm="r", nonce="n1", algorithm="SHA-256-sess")
    value = build_authorization(
        challenge, Credentials("u", "p"), method="BYE", uri="sip:b@x", cnonce="cn", nc=1
    )
    p = params_of(value)
    assert p["cnonce"] == "cn"
    assert "qop" not in p
    assert "nc" not in p
    assert verify_authorization(parse_authorization(value), method="BYE", password="p", realm="r")


def test_3cx_challenge_without_qop_rfc2069_mode() -> None:
    challenge = parse_challenge(
        'Digest nonce="414d535c00b5b9a012",algorithm=MD5,realm="3CXPhoneSystem"', proxy=True
    )
    assert challenge == Challenge(
        realm="3CXPhoneSystem", nonce="414d535c00b5b9a012", algorithm="MD5", proxy=True
    )
    assert auth_header_name(challenge) == "Proxy-Authorization"
    value = build_authorization(
        challenge,
        Credentials("1001auth", "s3cret"),
        method="REGISTER",
        uri="sip:pbx.example.com",
        cnonce="ignored",
        nc=1,
    )
    ha1 = md5("1001auth:3CXPhoneSystem:s3cret")
    ha2 = md5("REGISTER:sip:pbx.example.com")
    p = params_of(value)
    assert p["response"] == md5(f"{ha1}:414d535c00b5b9a012:{ha2}")
    assert set(p) == {"username", "realm", "nonce", "uri", "response", "algorithm"}


def test_auth_int_when_only_option_covers_body() -> None:
    challenge = Challenge(realm="r", nonce="n", qop=("auth-int",))
    body = b"v=0\r\n"
    value = build_authorization(
        challenge, Credentials("u", "p"), method="INVITE", uri="sip:x", cnonce="c", nc=1, body=body
    )
    p = params_of(value)
    assert p["qop"] == "auth-int"
    ha2 = md5(f"INVITE:sip:x:{hashlib.md5(body).hexdigest()}")
    assert p["response"] == md5(f"{md5('u:r:p')}:n:00000001:c:auth-int:{ha2}")
    auth = parse_authorization(value)
    assert verify_authorization(auth, method="INVITE", password="p", realm="r", body=body)
    assert not verify_authorization(auth, method="INVITE", password="p", realm="r", body=b"x")


def test_unknown_qop_only_is_refused() -> None:
    with pytest.raises(ParseError):
        build_authorization(
            Challenge(realm="r", nonce="n", qop=("auth-conf",)),
            MUFASA,
            method="GET",
            uri="/",
            cnonce="c",
            nc=1,
        )


def test_sha512_256_round_trip() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", algorithm=sha-512-256, qop=auth')
    assert challenge.algorithm == "SHA-512-256"
    value = build_authorization(challenge, MUFASA, method="OPTIONS", uri="sip:a", cnonce="c", nc=7)

    def h(text: str) -> str:  # computed apart: a round trip alone cannot catch a wrong hash
        return hashlib.new("sha512_256", text.encode()).hexdigest()

    ha1 = h("Mufasa:r:Circle of Life")
    ha2 = h("OPTIONS:sip:a")
    assert params_of(value)["response"] == h(f"{ha1}:n:00000007:c:auth:{ha2}")
    auth = parse_authorization(value)
    assert auth.nc == "00000007"
    assert verify_authorization(auth, method="OPTIONS", password="Circle of Life", realm="r")


# -- parsing -------------------------------------------------------------------------------


def test_parse_challenge_tolerates_odd_spacing_case_and_escapes() -> None:
    c = parse_challenge(
        'digest  REALM = "a \\"b\\" c" ,NONCE=abc123 ,  Stale = TRUE, opaque="",'
        ' domain="sip:x sip:y" qop=auth, '
    )
    assert c.realm == 'a "b" c'
    assert c.nonce == "abc123"
    assert c.stale is True
    assert c.opaque == ""
    assert c.domain == "sip:x sip:y"
    assert c.qop == ("auth",)
    assert c.algorithm == "MD5"
    assert c.proxy is False


@pytest.mark.parametrize(
    "value",
    [
        'Basic realm="x"',
        'Digest realm="x"',
        'Digest nonce="x"',
        "",
        'Digest realm="x", nonce="unterminated',
        'Digest realm="x", nonce',
        'Digest realm="x", =y',
        'Digest realm="x", nonce="y", algorithm=SHA-1',
    ],
)
def test_parse_challenge_rejects(value: str) -> None:
    with pytest.raises(ParseError):
        parse_challenge(value)


def test_build_challenge_round_trips() -> None:
    value = build_challenge("sbc", "nonce1", opaque="op", algorithm="sha-256", stale=True)
    assert value == (
        'Digest realm="sbc", nonce="nonce1", opaque="op", algorithm=SHA-256, qop="auth", stale=true'
    )
    assert parse_challenge(value) == Challenge(
        realm="sbc", nonce="nonce1", opaque="op", algorithm="SHA-256", qop=("auth",), stale=True
    )
    assert build_challenge("sbc", "n", qop=()) == 'Digest realm="sbc", nonce="n", algorithm=MD5'


def test_parse_authorization_fields_and_errors() -> None:
    auth = parse_authorization(
        'Digest username="retell", realm="sbc", nonce="n", uri="sip:+1@sbc", '
        'response="ABCDEF", qop=AUTH, nc=00000001, cnonce="c", opaque="o"'
    )
    assert auth == Authorization(
        username="retell",
        realm="sbc",
        nonce="n",
        uri="sip:+1@sbc",
        response="ABCDEF",
        algorithm="MD5",
        cnonce="c",
        qop="auth",
        nc="00000001",
        opaque="o",
    )
    with pytest.raises(ParseError):
        parse_authorization('Bearer token="x"')
    with pytest.raises(ParseError):
        parse_authorization('Digest username="u", realm="r", nonce="n", uri="x"')
    with pytest.raises(ParseError):
        parse_authorization(
            'Digest username="u", realm="r", nonce="n", uri="x", response="y", qop=auth'
        )


def test_verify_rejects_wrong_realm_qop_and_uppercase_hex_is_accepted() -> None:
    challenge = Challenge(realm="sbc", nonce="n", qop=("auth",))
    value = build_authorization(
        challenge, Credentials("retell", "pw"), method="INVITE", uri="sip:a", cnonce="c", nc=1
    )
    auth = parse_authorization(value)
    assert verify_authorization(auth, method="INVITE", password="pw", realm="sbc")
    upper = dataclasses.replace(auth, response=auth.response.upper())
    assert verify_authorization(upper, method="INVITE", password="pw", realm="sbc")
    assert not verify_authorization(auth, method="INVITE", password="pw", realm="other")
    assert verify_authorization(auth, method="INVITE", password="pw", realm="sbc", uri="sip:a")
    assert not verify_authorization(auth, method="INVITE", password="pw", realm="sbc", uri="sip:b")
    assert not verify_authorization(auth, method="BYE", password="pw", realm="sbc")
    odd = dataclasses.replace(auth, qop="auth-conf")
    assert not verify_authorization(odd, method="INVITE", password="pw", realm="sbc")


def test_compute_response_rejects_unknown_algorithm() -> None:
    with pytest.raises(ParseError):
        compute_response(
            algorithm="SHA-1", username="u", realm="r", password="p", nonce="n", method="M", uri="u"
        )


# -- ClientAuth ----------------------------------------------------------------------------


def make_request(method: str = "INVITE", cseq: int = 1, headers: Pairs = ()) -> Request:
    return Request(
        method,
        parse_uri("sip:+14155550100@pbx.example.com"),
        Headers(
            (
                ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc;rport"),
                ("From", "<sip:1001@pbx.example.com>;tag=f1"),
                ("To", "<sip:+14155550100@pbx.example.com>"),
                ("Call-ID", "call-1"),
                ("CSeq", f"{cseq} {method}"),
                *headers,
            )
        ),
        b"body" if method == "INVITE" else b"",
    )


def challenge_response(
    status: int = 407,
    *,
    nonce: str = "n1",
    stale: bool = False,
    extra: Pairs = (),
) -> Response:
    name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    value = f'Digest nonce="{nonce}",algorithm=MD5,realm="3CXPhoneSystem"'
    if stale:
        value += ",stale=TRUE"
    return Response(status, "", Headers(((name, value), *extra)))


def test_client_auth_answers_first_challenge() -> None:
    auth = ClientAuth(Credentials("1001auth", "pw"))
    request = make_request()
    retry = auth.authorize(challenge_response(), request, "cn1")
    assert retry is not None
    assert retry.headers.get("CSeq") == "2 INVITE"
    assert retry.top_via.branch == "z9hG4bKabc.2"
    assert retry.top_via.has_rport
    assert retry.body == request.body
    value = retry.headers.get("Proxy-Authorization")
    assert value is not None
    p = params_of(value)
    ha1 = md5("1001auth:3CXPhoneSystem:pw")
    assert p["response"] == md5(f"{ha1}:n1:{md5('INVITE:sip:+14155550100@pbx.example.com')}")
    assert p["uri"] == "sip:+14155550100@pbx.example.com"
    assert auth.challenges()[0].nonce == "n1"
    assert auth.credentials.username == "1001auth"


def test_client_auth_gives_up_when_credentials_refused() -> None:
    auth = ClientAuth(Credentials("1001auth", "wrong"))
    retry = auth.authorize(challenge_response(nonce="n1"), make_request(), "cn")
    assert retry is not None
    # The answer was challenged again, with a fresh nonce and no stale flag: refused.
    assert auth.authorize(challenge_response(nonce="n2"), retry, "cn") is None
    # Same nonce again: refused as well.
    assert auth.authorize(challenge_response(nonce="n1"), retry, "cn") is None


def test_client_auth_stale_rehashes_without_counting_a_failure() -> None:
    auth = ClientAuth(Credentials("1001auth", "pw"))
    retry = auth.authorize(challenge_response(401, nonce="n1"), make_request("REGISTER"), "c")
    assert retry is not None
    again = auth.authorize(challenge_response(401, nonce="n2", stale=True), retry, "c", branch="b")
    assert again is not None
    assert again.headers.get("CSeq") == "3 REGISTER"
    assert again.top_via.branch == "b"
    values = again.headers.get_all("Authorization")
    assert len(values) == 1  # the stale credentials were replaced, not added to
    assert params_of(values[0])["nonce"] == "n2"
    # The answer to the stale challenge is refused in turn: give up.
    assert auth.authorize(challenge_response(401, nonce="n3"), again, "c") is None


def test_client_auth_no_digest_challenge_means_no_retry() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    basic = Response(401, "", Headers((("WWW-Authenticate", 'Basic realm="x"'),)))
    assert auth.authorize(basic, make_request(), "c") is None
    assert auth.authorize(Response(401), make_request(), "c") is None


def test_client_auth_answers_several_challenges_at_once() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    both = Response(
        407,
        "",
        Headers(
            (
                ("Proxy-Authenticate", 'Digest realm="proxy", nonce="a", qop="auth"'),
                ("Proxy-Authenticate", 'Basic realm="skip"'),
                ("WWW-Authenticate", 'Digest realm="ua", nonce="b", opaque="o"'),
            )
        ),
    )
    retry = auth.authorize(both, make_request("BYE"), "cn")
    assert retry is not None
    proxy = params_of(retry.headers.get("Proxy-Authorization") or "")
    ua = params_of(retry.headers.get("Authorization") or "")
    assert (proxy["realm"], proxy["qop"], proxy["nc"]) == ("proxy", "auth", "00000001")
    assert (ua["realm"], ua["opaque"]) == ("ua", "o")
    assert "qop" not in ua


def test_client_auth_apply_reuses_last_challenge_with_counting_nc() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    assert auth.apply(make_request("BYE"), "c") == make_request("BYE")
    qop_challenge = Response(
        401, "", Headers((("WWW-Authenticate", 'Digest realm="r", nonce="n", qop=auth'),))
    )
    retry = auth.authorize(qop_challenge, make_request("INVITE"), "c1")
    assert retry is not None
    assert params_of(retry.headers.get("Authorization") or "")["nc"] == "00000001"
    bye = auth.apply(make_request("BYE", cseq=3), "c2")
    p = params_of(bye.headers.get("Authorization") or "")
    assert (p["nc"], p["cnonce"], p["nonce"]) == ("00000002", "c2", "n")
    ha2 = md5("BYE:sip:+14155550100@pbx.example.com")
    assert p["response"] == md5(f"{md5('u:r:p')}:n:00000002:c2:auth:{ha2}")
    # A challenge to a preemptively authorised request is answered once (expired nonce).
    fresh = Response(
        401, "", Headers((("WWW-Authenticate", 'Digest realm="r", nonce="n9", qop=auth'),))
    )
    retry_bye = auth.authorize(fresh, bye, "c3")
    assert retry_bye is not None
    assert params_of(retry_bye.headers.get("Authorization") or "")["nc"] == "00000001"
    assert auth.authorize(fresh, retry_bye, "c4") is None


def test_client_auth_replaces_unreadable_credentials_and_keeps_other_realms() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    request = make_request(
        headers=(
            ("Authorization", "garbage"),
            (
                "Authorization",
                'Digest username="u", realm="other", nonce="x", uri="y", response="z"',
            ),
        )
    )
    retry = auth.authorize(challenge_response(401), request, "c")
    assert retry is not None
    values = retry.headers.get_all("Authorization")
    assert [parse_authorization(v).realm for v in values] == ["other", "3CXPhoneSystem"]


def test_client_auth_request_without_via_and_bounded_memory() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    request = Request(
        "OPTIONS",
        parse_uri("sip:x"),
        Headers((("Call-ID", "c"), ("CSeq", "1 OPTIONS"))),
    )
    retry = auth.authorize(challenge_response(401), request, "c")
    assert retry is not None
    assert "Via" not in retry.headers
    for i in range(100):
        r = Request(
            "OPTIONS", parse_uri("sip:x"), Headers((("Call-ID", f"c{i}"), ("CSeq", "1 OPTIONS")))
        )
        assert auth.authorize(challenge_response(401, nonce=f"n{i}"), r, "c") is not None
    # The oldest answers were forgotten: a challenge to them counts as a first one again.
    assert auth.authorize(challenge_response(401), retry, "c") is not None


def test_client_auth_answers_first_usable_challenge_per_realm() -> None:
    auth = ClientAuth(Credentials("u", "p"))
    offered = Response(
        401,
        "",
        Headers(
            (
                ("WWW-Authenticate", 'Digest realm="r", nonce="a", algorithm=SHA-1'),
                ("WWW-Authenticate", 'Digest realm="r", nonce="b", qop="auth-conf"'),
                ("WWW-Authenticate", 'Digest realm="r", nonce="c", algorithm=SHA-256, qop=auth'),
                ("WWW-Authenticate", 'Digest realm="r", nonce="d", algorithm=MD5, qop=auth'),
            )
        ),
    )
    retry = auth.authorize(offered, make_request("OPTIONS"), "cn")
    assert retry is not None
    [value] = retry.headers.get_all("Authorization")
    p = params_of(value)
    assert (p["nonce"], p["algorithm"]) == ("c", "SHA-256")
    only_unusable = Response(
        401, "", Headers((("WWW-Authenticate", 'Digest realm="r", nonce="b", qop="auth-conf"'),))
    )
    assert ClientAuth(Credentials("u", "p")).authorize(only_unusable, make_request(), "c") is None
