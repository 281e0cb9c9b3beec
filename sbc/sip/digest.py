"""HTTP digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760, RFC 3261 §22).

Both halves live here. The client half answers ``401``/``407`` challenges (toward 3CX, which
challenges REGISTER and every request an extension sends, and blacklists addresses that repeat
wrong credentials); the server half checks the credentials Retell sends to the bridge: stateless
nonces (:func:`make_nonce`, :func:`nonce_issued`) and the verdict on a request's credentials
(:func:`check_credentials`).

Nothing here draws random numbers or reads a clock: client nonces (``cnonce``), the server's
nonce secret and salt, and the current time come in as arguments, and the nonce lifetime policy
belongs to the caller (``sbc/b2bua/trunk_auth.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from sbc.sip.errors import ParseError
from sbc.sip.fields import parse_via, quote_string
from sbc.sip.headers import Headers
from sbc.sip.ids import BRANCH_COOKIE
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri, uri_equal

__all__ = [
    "Authorization",
    "Challenge",
    "ClientAuth",
    "Credentials",
    "CredentialsCheck",
    "Verdict",
    "auth_header_name",
    "build_authorization",
    "build_challenge",
    "check_credentials",
    "compute_response",
    "make_nonce",
    "nonce_issued",
    "parse_authorization",
    "parse_challenge",
    "verify_authorization",
]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha512_256(data: bytes) -> str:
    return hashlib.new("sha512_256", data).hexdigest()


# RFC 7616 §3.2 / RFC 8760 §2: algorithm names (compared case-insensitively) to hash functions.
# The "-sess" variants hash the same way; only the A1 computation differs (RFC 7616 §3.4.2).
_HASHES: dict[str, Callable[[bytes], str]] = {
    "MD5": _md5,
    "MD5-SESS": _md5,
    "SHA-256": _sha256,
    "SHA-256-SESS": _sha256,
    "SHA-512-256": _sha512_256,
    "SHA-512-256-SESS": _sha512_256,
}
_CANONICAL_ALGORITHM = {
    "MD5": "MD5",
    "MD5-SESS": "MD5-sess",
    "SHA-256": "SHA-256",
    "SHA-256-SESS": "SHA-256-sess",
    "SHA-512-256": "SHA-512-256",
    "SHA-512-256-SESS": "SHA-512-256-sess",
}


def _canonical_algorithm(name: str) -> str:
    try:
        return _CANONICAL_ALGORITHM[name.upper()]
    except KeyError:
        raise ParseError(f"unsupported digest algorithm {name!r}") from None


# -- auth-param lists ----------------------------------------------------------------------


def _parse_params(text: str) -> dict[str, str]:
    """Parse ``name=value, name="quoted value", ...`` into lower-cased names.

    Tolerant on purpose (RFC 7616 §3.3 grammar plus what real devices send): whitespace
    around ``=`` and ``,``, unquoted values, missing commas between parameters, and
    backslash escapes inside quotes. The first occurrence of a name wins.
    """
    params: dict[str, str] = {}
    i = 0
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in "= \t\r\n,":
            i += 1
        name = text[start:i].lower()
        while i < n and text[i] in " \t\r\n":
            i += 1
        if not name or i >= n or text[i] != "=":
            raise ParseError(f"bad auth-param near {text[start:]!r}")
        i += 1
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                raise ParseError(f"unterminated quoted auth-param {name!r}")
            i += 1
            value = "".join(chars)
        else:
            start = i
            while i < n and text[i] not in " \t\r\n,":
                i += 1
            value = text[start:i]
        params.setdefault(name, value)
    return params


def _split_scheme(value: str) -> tuple[str, str]:
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if not scheme:
        raise ParseError("empty authentication header")
    return scheme, rest


# -- challenges (WWW-Authenticate / Proxy-Authenticate) ------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``Digest`` challenge; ``proxy`` is True when it came in Proxy-Authenticate (407)."""

    realm: str
    nonce: str
    opaque: str | None = None
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    stale: bool = False
    domain: str | None = None
    proxy: bool = False


def parse_challenge(value: str, *, proxy: bool = False) -> Challenge:
    """Parse a WWW-Authenticate or Proxy-Authenticate value.

    Raises :class:`ParseError` for another scheme (``Basic``...), a missing realm or nonce, or
    an algorithm this module cannot compute. 3CX's ``Digest nonce="...",algorithm=MD5,
    realm="3CXPhoneSystem"`` (no qop, no opaque, no space after commas) parses.
    """
    scheme, rest = _split_scheme(value)
    if scheme.lower() != "digest":
        raise ParseError(f"not a Digest challenge: {scheme!r}")
    params = _parse_params(rest)
    if "realm" not in params or "nonce" not in params:
        raise ParseError("Digest challenge without realm or nonce")
    algorithm = _canonical_algorithm(params.get("algorithm", "MD5"))
    qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
    return Challenge(
        realm=params["realm"],
        nonce=params["nonce"],
        opaque=params.get("opaque"),
        algorithm=algorithm,
        qop=qop,
        # RFC 7616 §3.3: stale is "true" or "false", case-insensitive.
        stale=params.get("stale", "").lower() == "true",
        domain=params.get("domain"),
        proxy=proxy,
    )


def build_challenge(
    realm: str,
    nonce: str,
    *,
    opaque: str | None = None,
    algorithm: str = "MD5",
    qop: tuple[str, ...] = ("auth",),
    stale: bool = False,
) -> str:
    """The value of a WWW-Authenticate/Proxy-Authenticate header the bridge sends."""
    parts = [f"realm={quote_string(realm)}", f"nonce={quote_string(nonce)}"]
    if opaque is not None:
        parts.append(f"opaque={quote_string(opaque)}")
    parts.append(f"algorithm={_canonical_algorithm(algorithm)}")
    if qop:
        parts.append(f"qop={quote_string(','.join(qop))}")
    if stale:
        parts.append("stale=true")
    return "Digest " + ", ".join(parts)


def auth_header_name(challenge: Challenge) -> str:
    """RFC 3261 §22.2/§22.3: 407 challenges are answered in Proxy-Authorization."""
    return "Proxy-Authorization" if challenge.proxy else "Authorization"


# -- the computation (RFC 7616 §3.4.1-§3.4.3) ----------------------------------------------


def compute_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value, hex; ``qop`` None means RFC 2069 compatibility mode."""
    key = algorithm.upper()
    if key not in _HASHES:
        raise ParseError(f"unsupported digest algorithm {algorithm!r}")
    h = _HASHES[key]
    ha1 = h(f"{username}:{realm}:{password}".encode())
    if key.endswith("-SESS"):
        # RFC 7616 §3.4.2: session variants fold the server and client nonces into A1.
        ha1 = h(f"{ha1}:{nonce}:{cnonce or ''}".encode())
    if qop == "auth-int":
        # RFC 7616 §3.4.3: auth-int covers the message body as well.
        ha2 = h(f"{method}:{uri}:".encode() + h(body).encode())
    else:
        ha2 = h(f"{method}:{uri}".encode())
    if qop is None:
        # RFC 2617 §3.2.2.1: without qop the response is KD(H(A1), nonce ":" H(A2)).
        return h(f"{ha1}:{nonce}:{ha2}".encode())
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode())


def _choose_qop(offered: tuple[str, ...]) -> str | None:
    if not offered:
        return None
    if "auth" in offered:
        return "auth"
    if "auth-int" in offered:
        return "auth-int"
    raise ParseError(f"no supported qop among {offered!r}")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)


def build_authorization(
    challenge: Challenge,
    credentials: Credentials,
    *,
    method: str,
    uri: str,
    cnonce: str,
    nc: int,
    body: bytes = b"",
) -> str:
    """The value of an Authorization/Proxy-Authorization header answering ``challenge``.

    qop=auth is preferred when offered, auth-int used only when it is the sole option, and no
    qop (nor cnonce/nc) is sent when the challenge offered none (RFC 2617 §3.2.2, RFC 2069).
    """
    qop = _choose_qop(challenge.qop)
    nc_text = f"{nc:08x}"
    sess = challenge.algorithm.upper().endswith("-SESS")
    response = compute_response(
        algorithm=challenge.algorithm,
        username=credentials.username,
        realm=challenge.realm,
        password=credentials.password,
        nonce=challenge.nonce,
        method=method,
        uri=uri,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
        body=body,
    )
    parts = [
        f"username={quote_string(credentials.username)}",
        f"realm={quote_string(challenge.realm)}",
        f"nonce={quote_string(challenge.nonce)}",
        f"uri={quote_string(uri)}",
        f"response={quote_string(response)}",
        f"algorithm={challenge.algorithm}",
    ]
    if qop is not None:
        parts += [f"cnonce={quote_string(cnonce)}", f"qop={qop}", f"nc={nc_text}"]
    elif sess:
        # The -sess A1 needs the cnonce even without qop, so the server must see it.
        parts.append(f"cnonce={quote_string(cnonce)}")
    if challenge.opaque is not None:
        # RFC 2617 §3.2.2: opaque is echoed unchanged.
        parts.append(f"opaque={quote_string(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


# -- the server half ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authorization:
    """The fields of a received ``Digest`` Authorization/Proxy-Authorization value."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    cnonce: str | None = None
    qop: str | None = None
    nc: str | None = None
    opaque: str | None = None


def parse_authorization(value: str) -> Authorization:
    """Parse credentials; :class:`ParseError` when not Digest or a required field is missing."""
    scheme, rest = _split_scheme(value)
    if scheme.lower() != "digest":
        raise ParseError(f"not Digest credentials: {scheme!r}")
    params = _parse_params(rest)
    missing = [k for k in ("username", "realm", "nonce", "uri", "response") if k not in params]
    if missing:
        raise ParseError(f"Digest credentials without {', '.join(missing)}")
    qop = params.get("qop")
    if qop is not None and ("cnonce" not in params or "nc" not in params):
        # RFC 7616 §3.4: with qop, cnonce and nc MUST be present.
        raise ParseError("Digest credentials with qop but without cnonce/nc")
    return Authorization(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=params["response"],
        algorithm=_canonical_algorithm(params.get("algorithm", "MD5")),
        cnonce=params.get("cnonce"),
        qop=qop.lower() if qop is not None else None,
        nc=params.get("nc"),
        opaque=params.get("opaque"),
    )


def verify_authorization(
    auth: Authorization,
    *,
    method: str,
    password: str,
    realm: str,
    body: bytes = b"",
    uri: str | None = None,
) -> bool:
    """True when ``auth`` carries the right response for ``password`` in ``realm``.

    The caller checks that ``auth.nonce`` is one it issued and still fresh, and looks the
    password up by ``auth.username``; the comparison is constant-time. When ``uri`` (the
    Request-URI as text) is given, the digest-uri must equal it (RFC 7616 §3.4.6).
    """
    if auth.realm != realm:
        return False
    if uri is not None and auth.uri != uri:
        return False
    if auth.qop not in (None, "auth", "auth-int"):
        return False
    expected = compute_response(
        algorithm=auth.algorithm,
        username=auth.username,
        realm=realm,
        password=password,
        nonce=auth.nonce,
        method=method,
        uri=auth.uri,
        qop=auth.qop,
        nc=auth.nc,
        cnonce=auth.cnonce,
        body=body,
    )
    return hmac.compare_digest(expected.encode(), auth.response.lower().encode())


# -- the server's stateless nonces and its verdict (RFC 7616 §3.3, §3.5, §5.4-§5.5) --------

_NONCE_MAC_CHARS = 32  # hex characters of the HMAC-SHA256 kept in a nonce: 128 bits
_HEX = frozenset("0123456789abcdef")


def _nonce_mac(secret: bytes, issued: int, salt: str) -> str:
    mac = hmac.new(secret, f"sbc-nonce:{issued:x}:{salt}".encode(), hashlib.sha256)
    return mac.hexdigest()[:_NONCE_MAC_CHARS]


def make_nonce(secret: bytes, issued: int, salt: bytes) -> str:
    """A stateless server nonce: ``issued`` (whole seconds of the caller's clock, hex), a
    ``salt`` that makes each nonce unique (random bytes drawn by the caller, at most 16) and an
    HMAC-SHA256 of both under ``secret``, so that :func:`nonce_issued` recognises it later
    without any table (RFC 7616 §3.3 suggests a time stamp and a private key)."""
    if issued < 0:
        raise ValueError(f"negative nonce time: {issued!r}")
    if len(salt) > 16:
        raise ValueError("a nonce salt has at most 16 bytes")
    text = salt.hex()
    return f"{issued:x}.{text}.{_nonce_mac(secret, issued, text)}"


def nonce_issued(nonce: str, secret: bytes) -> int | None:
    """When :func:`make_nonce` made ``nonce`` with ``secret``; None when it did not (another
    secret, such as a previous process's, a forged or a malformed nonce)."""
    stamp, _, rest = nonce.partition(".")
    salt, dot, mac = rest.partition(".")
    if not dot or not 0 < len(stamp) <= 16 or not _HEX.issuperset(stamp):
        return None
    if len(salt) > 32 or not _HEX.issuperset(salt):
        return None
    issued = int(stamp, 16)
    if stamp != f"{issued:x}":
        return None  # one spelling per time stamp
    if not hmac.compare_digest(mac.encode(), _nonce_mac(secret, issued, salt).encode()):
        return None
    return issued


class Verdict(Enum):
    """What a server makes of the credentials in a request (see :func:`check_credentials`)."""

    ACCEPTED = "accepted"
    MISSING = "missing"  # none for the realm, or unreadable: challenge
    STALE = "stale"  # right password on a nonce not (or no longer) good: challenge, stale=true
    REFUSED = "refused"  # wrong username, password or digest-uri


@dataclass(frozen=True, slots=True)
class CredentialsCheck:
    """The verdict, the credentials it is about (None when MISSING) and why, for a log line."""

    verdict: Verdict
    authorization: Authorization | None = None
    reason: str = ""


def check_credentials(
    values: Iterable[str],
    *,
    credentials: Credentials,
    realm: str,
    method: str,
    uris: Iterable[str],
    secret: bytes,
    now: float,
    lifetime: float,
    body: bytes = b"",
) -> CredentialsCheck:
    """Judge the ``Authorization``/``Proxy-Authorization`` ``values`` of a request.

    The first readable Digest credentials of ``realm`` are judged; none is MISSING. Then: a
    username other than ``credentials.username``, a digest-uri that is none of ``uris`` (RFC
    7616 §3.4.6 wants the Request-URI; the caller may add what a peer is known to hash instead,
    such as the To URI; compared as URIs, RFC 3261 §19.1.4) or a wrong response is REFUSED; a
    right response on a nonce :func:`nonce_issued` does not recognise under ``secret``, or one
    issued more than ``lifetime`` seconds before ``now``, is STALE (RFC 7616 §3.3: the client
    knows the password and may simply retry); else ACCEPTED. Responses with ``qop=auth``,
    ``auth-int`` (``body``) and none (RFC 2069) are verified. Replays of accepted credentials
    are the caller's to detect (by nonce, ``nc`` and ``cnonce``).
    """
    auth = _credentials_for(values, realm)
    if auth is None:
        return CredentialsCheck(Verdict.MISSING, None, f"no credentials for realm {realm!r}")
    if auth.username != credentials.username:
        return CredentialsCheck(Verdict.REFUSED, auth, f"unknown username {auth.username!r}")
    allowed = tuple(uris)
    if not any(_same_uri(auth.uri, uri) for uri in allowed):
        reason = f"digest-uri {auth.uri!r} is none of {allowed!r}"
        return CredentialsCheck(Verdict.REFUSED, auth, reason)
    good = verify_authorization(
        auth, method=method, password=credentials.password, realm=realm, body=body
    )
    if not good:
        return CredentialsCheck(Verdict.REFUSED, auth, "wrong response (password or nonce)")
    issued = nonce_issued(auth.nonce, secret)
    if issued is None:
        return CredentialsCheck(Verdict.STALE, auth, "nonce not issued here")
    if not 0 <= now - issued <= lifetime:
        return CredentialsCheck(Verdict.STALE, auth, "nonce expired")
    return CredentialsCheck(Verdict.ACCEPTED, auth)


def _credentials_for(values: Iterable[str], realm: str) -> Authorization | None:
    for value in values:
        try:
            auth = parse_authorization(value)
        except ParseError:
            continue
        if auth.realm == realm:
            return auth
    return None


def _same_uri(digest_uri: str, uri: str) -> bool:
    if digest_uri == uri:
        return True
    try:
        return uri_equal(parse_uri(digest_uri), parse_uri(uri))
    except ParseError:
        return False


# -- the client policy ---------------------------------------------------------------------

_MAX_REMEMBERED_RETRIES = 64


@dataclass(slots=True)
class _RealmState:
    challenge: Challenge
    nc: int = 0


class ClientAuth:
    """Answers challenges for one target (a registration, a dialog, a peer).

    Remembers the last challenge of each realm and counts ``nc`` for it. A first challenge is
    answered. When the request that drew a challenge was itself our answer to a challenge of
    the same realm, the credentials were refused unless the new challenge says ``stale=true``
    (RFC 7616 §3.3: the nonce expired, the credentials were good): :meth:`authorize` then
    returns None and the caller gives up, so that wrong credentials are never repeated at 3CX,
    which blacklists addresses that do.
    """

    __slots__ = ("_answered", "_credentials", "_realms")

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._realms: dict[tuple[bool, str], _RealmState] = {}
        # (Call-ID, CSeq) of the requests sent in answer to a challenge, oldest first.
        self._answered: OrderedDict[tuple[str, int], None] = OrderedDict()

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    def challenges(self) -> list[Challenge]:
        """The last challenge remembered for each realm."""
        return [state.challenge for state in self._realms.values()]

    def authorize(
        self, response: Response, request: Request, cnonce: str, *, branch: str | None = None
    ) -> Request | None:
        """The request to send again with credentials, or None when it must not be retried.

        ``request`` is the one ``response`` (a 401 or 407) answers. The retry has CSeq + 1,
        the answered realms' old credentials replaced, and a new top Via branch: ``branch``
        when given, else one derived from the old branch and the new CSeq (unique as long as
        the old one was). Several challenges in one response are all answered (RFC 3261
        §22.3). None is returned when the response holds no usable Digest challenge or the
        credentials were refused.
        """
        found = _usable_challenges(response)
        if not found:
            return None
        cseq = request.cseq
        was_answer = (request.call_id, cseq.seq) in self._answered
        for challenge in found:
            key = (challenge.proxy, challenge.realm)
            if was_answer and key in self._realms and not challenge.stale:
                return None  # our credentials for this realm were refused
        for challenge in found:
            self._realms[(challenge.proxy, challenge.realm)] = _RealmState(challenge)
        new_seq = cseq.seq + 1
        headers = request.headers.set("CSeq", f"{new_seq} {cseq.method}")
        headers = _set_top_branch(headers, branch, new_seq)
        retry = dataclasses.replace(request, headers=headers)
        retry = self._with_credentials(retry, found, cnonce)
        self._answered[(request.call_id, new_seq)] = None
        while len(self._answered) > _MAX_REMEMBERED_RETRIES:
            self._answered.popitem(last=False)
        return retry

    def apply(self, request: Request, cnonce: str) -> Request:
        """Add credentials from the remembered challenges to a new request (preemptively).

        ``nc`` counts on for each reused nonce. A challenge to such a request is answered like
        a first challenge (the nonce may have expired without the server saying ``stale``).
        """
        if not self._realms:
            return request
        return self._with_credentials(request, [s.challenge for s in self._realms.values()], cnonce)

    def _with_credentials(
        self, request: Request, challenges: list[Challenge], cnonce: str
    ) -> Request:
        headers = request.headers
        uri = str(request.uri)
        for challenge in challenges:
            state = self._realms[(challenge.proxy, challenge.realm)]
            state.nc += 1
            name = auth_header_name(challenge)
            headers = _drop_credentials(headers, name, challenge.realm)
            value = build_authorization(
                challenge,
                self._credentials,
                method=request.method,
                uri=uri,
                cnonce=cnonce,
                nc=state.nc,
                body=request.body,
            )
            headers = headers.add(name, value)
        return dataclasses.replace(request, headers=headers)


def _usable_challenges(response: Response) -> list[Challenge]:
    """The Digest challenges of ``response`` this module can answer, one per realm.

    RFC 8760 §2.4 / RFC 7616 §3.7: a server may offer one challenge per algorithm, in its
    order of preference; the first usable one of each realm is answered.
    """
    found: dict[tuple[bool, str], Challenge] = {}
    for name, proxy in (("WWW-Authenticate", False), ("Proxy-Authenticate", True)):
        for value in response.headers.get_all(name):
            try:
                challenge = parse_challenge(value, proxy=proxy)
                _choose_qop(challenge.qop)
            except ParseError:
                continue  # another scheme, algorithm or qop we cannot use: try the next
            found.setdefault((proxy, challenge.realm), challenge)
    return list(found.values())


def _drop_credentials(headers: Headers, name: str, realm: str) -> Headers:
    """Remove ``name`` fields whose realm is ``realm`` (or which cannot be read)."""
    kept: list[tuple[str, str]] = []
    for n, v in headers.items():
        if n == name:
            try:
                if parse_authorization(v).realm == realm:
                    continue
            except ParseError:
                continue
        kept.append((n, v))
    return Headers(kept)


def _set_top_branch(headers: Headers, branch: str | None, seq: int) -> Headers:
    """Give the top Via a new branch: a retried request is a new transaction (§8.1.3.5)."""
    values = headers.values("Via")
    if not values:
        return headers
    top = parse_via(values[0])
    if branch is None:
        base = (top.branch or BRANCH_COOKIE).split(".", 1)[0]
        branch = f"{base}.{seq}"
    return headers.remove_first("Via").prepend("Via", str(top.with_param("branch", branch)))
