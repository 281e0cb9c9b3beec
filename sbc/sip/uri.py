"""SIP, SIPS and tel URIs and name-addr values (RFC 3261 §19.1, §20.10, §25.1; RFC 3966).

Parsing keeps every component as written (escapes included) so that a URI serialises back to
the same text; :func:`unescape` decodes ``%HH`` when a caller needs the value, and
:func:`uri_equal` implements the comparison rules of RFC 3261 §19.1.4. Unknown schemes are
kept verbatim as :class:`AbsoluteUri`; only ``sip``, ``sips`` and ``tel`` are checked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from sbc.sip.errors import ParseError
from sbc.sip.fields import (
    Params,
    drop_param,
    find_param,
    format_params,
    get_param,
    is_token,
    parse_host_port,
    parse_params,
    quote_string,
    set_param,
    unquote_string,
)
from sbc.sip.headers import split_list
from sbc.sip.quickinit import quick_init, quick_maker

# RFC 3261 §25.1 character classes, written as regex classes.
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_ESCAPED = r"%[0-9A-Fa-f]{2}"
_USER_RE = re.compile(rf"(?:[{_UNRESERVED}&=+$,;?/]|{_ESCAPED})+")
_PASSWORD_RE = re.compile(rf"(?:[{_UNRESERVED}&=+$,]|{_ESCAPED})*")
_PARAM_RE = re.compile(rf"(?:[{_UNRESERVED}\[\]/:&+$]|{_ESCAPED})+")
_HNAME_RE = re.compile(rf"(?:[{_UNRESERVED}\[\]/?:+$]|{_ESCAPED})+")
_HVALUE_RE = re.compile(rf"(?:[{_UNRESERVED}\[\]/?:+$]|{_ESCAPED})*")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# RFC 3966 §3: global numbers start with '+'; visual separators are '-', '.', '(' and ')'.
_GLOBAL_NUMBER_RE = re.compile(r"\+[0-9\-.()]*[0-9][0-9\-.()]*")
_LOCAL_NUMBER_RE = re.compile(r"[0-9A-Fa-f*#\-.()]*[0-9A-Fa-f*#][0-9A-Fa-f*#\-.()]*")
_VISUAL_SEPARATORS = str.maketrans("", "", "-.()")
_WHITESPACE = frozenset(" \t\r\n")

# RFC 3261 §19.1.4: these parameters must match when present in either URI.
_SIGNIFICANT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def unescape(text: str) -> str:
    """Decode RFC 3261 ``%HH`` escapes (UTF-8); invalid escapes are left as written."""
    if "%" not in text:
        return text
    return unquote(text, errors="surrogateescape")


@quick_init
@dataclass(frozen=True, slots=True)
class SipUri:
    """A ``sip:`` or ``sips:`` URI. Components are stored as written (escapes kept)."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None = None
    params: Params = ()
    headers: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        """Value of URI parameter ``name`` (case-insensitive); None if absent or valueless."""
        return get_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name) >= 0

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        """Set ``name`` (replacing an existing one in place, else appending)."""
        return dataclasses.replace(self, params=set_param(self.params, name, value))

    def with_params(self, **params: str | None) -> SipUri:
        out = self.params
        for name, value in params.items():
            out = set_param(out, name, value)
        return dataclasses.replace(self, params=out)

    def without_param(self, name: str) -> SipUri:
        return dataclasses.replace(self, params=drop_param(self.params, name))

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-cased (RFC 3261 §19.1.4: case-insensitive)."""
        value = self.param("transport")
        return value.lower() if value is not None else None

    @property
    def host_port(self) -> tuple[str, int | None]:
        return self.host, self.port

    @property
    def is_secure(self) -> bool:
        return self.scheme == "sips"

    def __str__(self) -> str:
        # Every request sbc writes has a Request-URI, From and To: the usual URI (no password,
        # no headers) in one or two f-strings rather than a list of parts joined.
        if self.password is None and not self.headers:
            user, port, params = self.user, self.port, self.params
            text = (
                f"{self.scheme}:{self.host}"
                if user is None
                else f"{self.scheme}:{user}@{self.host}"
            )
            if port is not None:
                text = f"{text}:{port}"
            # A loop, not a comprehension: in 3.11 that is a function call of its own.
            for name, value in params:
                text = f"{text};{name}" if value is None else f"{text};{name}={value}"
            return text
        return self._general_text()

    def _general_text(self) -> str:
        """:meth:`__str__` of any SIP URI (its tests' reference)."""
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(self.user)
            if self.password is not None:
                parts.append(":")
                parts.append(self.password)
            parts.append("@")
        parts.append(self.host)
        if self.port is not None:
            parts.append(f":{self.port}")
        for name, value in self.params:
            parts.append(f";{name}" if value is None else f";{name}={value}")
        if self.headers:
            parts.append("?")
            parts.append("&".join(f"{n}={v}" for n, v in self.headers))
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class TelUri:
    """A ``tel:`` URI (RFC 3966): the number as written plus its parameters."""

    number: str
    params: Params = ()

    @property
    def scheme(self) -> str:
        return "tel"

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name) >= 0

    def __str__(self) -> str:
        return "tel:" + self.number + format_params(self.params)


@dataclass(frozen=True, slots=True)
class AbsoluteUri:
    """A URI of any other scheme, kept verbatim (``text`` includes the scheme)."""

    scheme: str
    text: str

    def __str__(self) -> str:
        return self.text


Uri = SipUri | TelUri | AbsoluteUri


def _parse_uri_params(text: str, whole: str) -> Params:
    out: list[tuple[str, str | None]] = []
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        if _PARAM_RE.fullmatch(name) is None:
            raise ParseError(f"bad URI parameter {item!r} in {whole!r}")
        if eq:
            if _PARAM_RE.fullmatch(value) is None:
                raise ParseError(f"bad URI parameter value {item!r} in {whole!r}")
            out.append((name, value))
        else:
            out.append((name, None))
    return tuple(out)


def _parse_uri_headers(text: str, whole: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for item in text.split("&"):
        name, eq, value = item.partition("=")
        if not eq or _HNAME_RE.fullmatch(name) is None or _HVALUE_RE.fullmatch(value) is None:
            raise ParseError(f"bad URI header {item!r} in {whole!r}")
        out.append((name, value))
    return tuple(out)


def _parse_sip(scheme: str, rest: str, whole: str) -> SipUri:
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        # RFC 3261 §25.1: the user part may hold ';' and '?', the password may not hold ':'.
        user, colon, pw = userinfo.partition(":")
        if _USER_RE.fullmatch(user) is None:
            raise ParseError(f"bad user part in URI {whole!r}")
        if colon:
            if _PASSWORD_RE.fullmatch(pw) is None:
                raise ParseError(f"bad password in URI {whole!r}")
            password = pw
    rest, qmark, header_text = rest.partition("?")
    hostport, semi, param_text = rest.partition(";")
    host, port = parse_host_port(hostport)
    params = _parse_uri_params(param_text, whole) if semi else ()
    headers = _parse_uri_headers(header_text, whole) if qmark else ()
    return SipUri(scheme, user, password, host, port, params, headers)


def _parse_tel(rest: str, whole: str) -> TelUri:
    number, semi, param_text = rest.partition(";")
    if number.startswith("+"):
        ok = _GLOBAL_NUMBER_RE.fullmatch(number) is not None
    else:
        ok = _LOCAL_NUMBER_RE.fullmatch(number) is not None
    if not ok:
        raise ParseError(f"bad telephone number in {whole!r}")
    params = _parse_uri_params(param_text, whole) if semi else ()
    return TelUri(number, params)


def parse_uri(text: str) -> Uri:
    """Parse a URI with no surrounding whitespace (RFC 3261 §19.1.1 for sip/sips).

    Raises :class:`ParseError` for malformed sip/sips/tel URIs and for text that has no
    scheme; other schemes are returned as :class:`AbsoluteUri` without further checks.
    """
    colon = text.find(":")
    if colon <= 0 or _SCHEME_RE.fullmatch(text, 0, colon) is None:
        raise ParseError(f"URI without a valid scheme: {text!r}")
    if not _WHITESPACE.isdisjoint(text):
        raise ParseError(f"whitespace inside URI {text!r}")
    scheme = text[:colon].lower()
    rest = text[colon + 1 :]
    if scheme == "sip" or scheme == "sips":
        return _parse_sip(scheme, rest, text)
    if scheme == "tel":
        return _parse_tel(rest, text)
    if not rest:
        raise ParseError(f"empty URI {text!r}")
    return AbsoluteUri(scheme, text)


def _params_equal(a: Params, b: Params) -> bool:
    da = {n.lower(): (unescape(v).lower() if v is not None else None) for n, v in a}
    db = {n.lower(): (unescape(v).lower() if v is not None else None) for n, v in b}
    for name in _SIGNIFICANT_PARAMS:
        if (name in da or name in db) and da.get(name) != db.get(name):
            return False
    return all(da[name] == db[name] for name in da.keys() & db.keys())


def uri_equal(a: Uri, b: Uri) -> bool:
    """URI equivalence per RFC 3261 §19.1.4 (sip/sips) and RFC 3966 §4 (tel)."""
    if isinstance(a, SipUri) and isinstance(b, SipUri):
        if a.scheme != b.scheme or a.port != b.port or a.host.lower() != b.host.lower():
            return False
        # User and password compare case-sensitively once escapes are decoded.
        if (a.user is None) != (b.user is None) or (a.password is None) != (b.password is None):
            return False
        if unescape(a.user or "") != unescape(b.user or ""):
            return False
        if unescape(a.password or "") != unescape(b.password or ""):
            return False
        if not _params_equal(a.params, b.params):
            return False
        # Header components are never ignored; names case-insensitive, order irrelevant.
        ha = sorted((n.lower(), unescape(v)) for n, v in a.headers)
        hb = sorted((n.lower(), unescape(v)) for n, v in b.headers)
        return ha == hb
    if isinstance(a, TelUri) and isinstance(b, TelUri):
        if (
            a.number.translate(_VISUAL_SEPARATORS).lower()
            != b.number.translate(_VISUAL_SEPARATORS).lower()
        ):
            return False
        da = {n.lower(): (v.lower() if v is not None else None) for n, v in a.params}
        db = {n.lower(): (v.lower() if v is not None else None) for n, v in b.params}
        return da == db
    if isinstance(a, AbsoluteUri) and isinstance(b, AbsoluteUri):
        return a.scheme == b.scheme and a.text[len(a.scheme) :] == b.text[len(b.scheme) :]
    return False


# -- name-addr / addr-spec (RFC 3261 §20.10, §25.1) -------------------------------------------


# Tokens separated by single spaces: a display name written without quotes.
_TOKEN_WORDS_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+(?: [A-Za-z0-9\-.!%*_+`'~]+)*")


def _needs_quotes(display: str) -> bool:
    # One regex for what splitting at spaces and checking each word for a token decides.
    return _TOKEN_WORDS_RE.fullmatch(display) is None


@quick_init
@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From/To/Contact/Route value: URI, optional display name and header parameters."""

    uri: Uri
    display: str | None = None
    params: Params = ()

    @property
    def tag(self) -> str | None:
        # get_param inlined: the To and From tags of every message are read through here.
        for name, value in self.params:
            if name == "tag" or name.lower() == "tag":
                return value
        return None

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name) >= 0

    def with_tag(self, tag: str) -> NameAddr:
        return self.with_param("tag", tag)

    def tagged_text(self, tag: str) -> str:
        """``str(self.with_tag(tag))``: a tag parameter that is absent is appended, so its
        text is this address's text plus ``;tag=...``, without the tagged copy."""
        if self.has_param("tag"):
            return str(self.with_tag(tag))
        return f"{self};tag={tag}"

    # Built directly rather than with dataclasses.replace, which costs several times more
    # (it walks the fields): From and To are retagged for every request and response.
    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        return type(self)(self.uri, self.display, set_param(self.params, name, value))

    def without_param(self, name: str) -> NameAddr:
        return make_name_addr(self.uri, self.display, drop_param(self.params, name))

    def with_uri(self, uri: Uri) -> NameAddr:
        return type(self)(uri, self.display, self.params)

    def __str__(self) -> str:
        head = ""
        if self.display is not None:
            if self.display and not _needs_quotes(self.display):
                head = self.display + " "
            else:
                head = quote_string(self.display) + " "
        params = self.params
        if not params:
            return f"{head}<{self.uri}>"
        return f"{head}<{self.uri}>{format_params(params)}"


# NameAddr(...) for the From, To and Contact values parsed on every message (see quick_maker).
make_name_addr: Callable[[Uri, str | None, Params], NameAddr] = quick_maker(NameAddr)


def _display_and_rest(text: str) -> tuple[str | None, str]:
    """Split a stripped name-addr into display name and the text from '<' on."""
    if text.startswith('"'):
        # Find the closing quote, honouring backslash escapes (RFC 3261 §25.1 quoted-pair).
        i = 1
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                break
            i += 1
        else:
            raise ParseError(f"unterminated quoted display name in {text!r}")
        display = unquote_string(text[: i + 1])
        rest = text[i + 1 :].lstrip(" \t")
        if not rest.startswith("<"):
            raise ParseError(f"quoted display name without <URI> in {text!r}")
        return display, rest
    lt = text.find("<")
    semi = text.find(";")
    if lt < 0 or 0 <= semi < lt:
        # No '<', or a ';' before it: an addr-spec whose parameters may quote a '<'
        # (a display name cannot hold ';').
        return None, text
    raw = text[:lt].strip(" \t")
    if not raw:
        return None, text[lt:]
    words = raw.split()
    # RFC 3261 §25.1: an unquoted display name is a sequence of tokens separated by LWS.
    if not all(is_token(w) for w in words):
        raise ParseError(f"display name {raw!r} must be quoted")
    return " ".join(words), text[lt:]


def parse_name_addr(text: str) -> NameAddr:
    """Parse ``"Name" <uri>;params`` or ``uri;params`` (RFC 3261 §20.10).

    In the addr-spec form everything after the first ``;`` is a header parameter, and a URI
    holding ``?``, ``,`` or ``;`` must be enclosed in angle brackets.
    """
    text = text.strip(" \t")
    if not text:
        raise ParseError("empty address")
    display, rest = _display_and_rest(text)
    if rest.startswith("<"):
        gt = rest.find(">")
        if gt < 0:
            raise ParseError(f"missing '>' in {text!r}")
        uri = parse_uri(rest[1:gt])
        tail = rest[gt + 1 :].lstrip(" \t")
        if tail and tail[0] != ";":
            raise ParseError(f"junk after '>' in {text!r}")
        params = parse_params(tail)
        return make_name_addr(uri, display, params)
    uri_text, semi, param_text = rest.partition(";")
    uri_text = uri_text.rstrip(" \t")
    if "?" in uri_text or "," in uri_text:
        # RFC 3261 §20.10: such a URI must be enclosed in <> (RFC 4475 §3.1.2.13).
        raise ParseError(f"URI with '?' or ',' must be enclosed in <>: {text!r}")
    uri = parse_uri(uri_text)
    params = parse_params(param_text) if semi else ()
    return make_name_addr(uri, None, params)


def is_wildcard_contact(value: str) -> bool:
    """True for the ``Contact: *`` of a REGISTER that removes all bindings (RFC 3261 §10.2.2)."""
    return value.strip(" \t") == "*"


def parse_name_addr_list(text: str) -> list[NameAddr]:
    """Parse a comma-separated list (Contact, Route, Record-Route...). ``*`` is rejected:
    check :func:`is_wildcard_contact` first where it is allowed."""
    items = split_list(text)
    if not items:
        raise ParseError("empty address list")
    return [parse_name_addr(item) for item in items]
