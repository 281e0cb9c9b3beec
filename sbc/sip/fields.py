"""Header field values that are not addresses: Via, CSeq, parameters and scalars.

RFC 3261 §25.1 allows linear white space around the separators of these fields (``/`` in the
sent-protocol, ``;`` and ``=`` of parameters), which the torture tests of RFC 4475 §3.1.1.1
exercise; the parsers here accept it and the serialisers write the compact canonical form.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sbc.sip.errors import ParseError
from sbc.sip.headers import split_outside_quotes
from sbc.sip.quickinit import quick_init, quick_maker

Params = tuple[tuple[str, str | None], ...]

# RFC 3261 §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# RFC 3261 §25.1: a generic-param value is a token, a host or a quoted string. Unquoted values
# are accepted more loosely (any visible character but the separators ; , " < >) because peers
# put '@' or '/' in them and rejecting a whole request for that helps nobody.
_GEN_VALUE_RE = re.compile(r'[^\x00-\x20\x7f;,"<>]+')
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-.]*[A-Za-z0-9_.])?")
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._~\-]+)?\]")
_LWS = " \t"
# Fast paths for the usual spelling (no LWS, no quoted strings). Whatever they match, the
# general code below would accept with the same result; whatever they do not match goes to it.
_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_PARAMS_FAST_RE = re.compile(
    rf'{_TOKEN}(?:=[^\x00-\x20\x7f;,"<>]+)?(?:;{_TOKEN}(?:=[^\x00-\x20\x7f;,"<>]+)?)*'
)
_VIA_FAST_RE = re.compile(
    rf"SIP/2\.0/({_TOKEN})[ \t]+"
    r"([A-Za-z0-9_](?:[A-Za-z0-9_\-.]*[A-Za-z0-9_.])?)(?::([0-9]{1,5}))?[ \t]*(?:;(.*))?",
    re.DOTALL,
)

MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5: the sequence number MUST be less than 2**31.
MAX_INT_HEADER = 2**32 - 1  # RFC 3261 §20.19/§20.14/§20.22: delta-seconds, octet counts.


def is_token(text: str) -> bool:
    """True when ``text`` is a non-empty RFC 3261 token."""
    return _TOKEN_RE.fullmatch(text) is not None


def quote_string(text: str) -> str:
    """Wrap ``text`` in double quotes, escaping ``"`` and ``\\`` (RFC 3261 §25.1 quoted-pair)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_string(text: str) -> str:
    """Inverse of :func:`quote_string`; raises :class:`ParseError` when not one quoted string."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ParseError(f"not a quoted string: {text!r}")
    inner = text[1:-1]
    if "\\" not in inner:
        if '"' in inner:
            raise ParseError(f"unescaped quote inside {text!r}")
        return inner
    out: list[str] = []
    i = 0
    n = len(inner)
    while i < n:
        ch = inner[i]
        if ch == "\\":
            if i + 1 >= n:
                raise ParseError(f"dangling backslash in {text!r}")
            out.append(inner[i + 1])
            i += 2
            continue
        if ch == '"':
            raise ParseError(f"unescaped quote inside {text!r}")
        out.append(ch)
        i += 1
    return "".join(out)


def _split_semicolons(text: str) -> list[str]:
    """Split at ``;`` outside double quotes."""
    if '"' not in text:
        return text.split(";")
    parts, open_quote = split_outside_quotes(text, ";")
    if open_quote:
        raise ParseError(f"unterminated quoted string in parameters {text!r}")
    return parts


def parse_params(text: str) -> Params:
    """Parse ``;name=value;flag`` (a leading ``;`` optional; LWS around ``;`` and ``=``).

    Values are kept as written, quoted strings with their quotes; valueless parameters get
    ``None``. Empty parameters (``;;``), non-token names and malformed values raise ParseError.
    """
    text = text.strip(_LWS)
    if not text:
        return ()
    if text[0] == ";":
        text = text[1:]
    if _PARAMS_FAST_RE.fullmatch(text) is not None:
        fast: list[tuple[str, str | None]] = []
        for item in text.split(";"):
            name, eq, value = item.partition("=")
            fast.append((name, value if eq else None))
        return tuple(fast)
    out: list[tuple[str, str | None]] = []
    for item in _split_semicolons(text):
        name, eq, value = item.partition("=")
        name = name.strip(_LWS)
        if _TOKEN_RE.fullmatch(name) is None:
            raise ParseError(f"bad parameter name {name!r}")
        if not eq:
            out.append((name, None))
            continue
        value = value.strip(_LWS)
        if value.startswith('"'):
            unquote_string(value)  # validates
        elif _GEN_VALUE_RE.fullmatch(value) is None:
            raise ParseError(f"bad value for parameter {name!r}: {value!r}")
        out.append((name, value))
    return tuple(out)


def format_params(params: Params) -> str:
    """``;name=value;flag`` for ``params`` (empty string for none)."""
    # A list, not a generator: join() makes one of it anyway, at a higher cost.
    return "".join([f";{n}" if v is None else f";{n}={v}" for n, v in params])


def find_param(params: Params, name: str) -> int:
    """Index of parameter ``name`` (case-insensitive) in ``params``, or -1."""
    key = name.lower()
    for i, (n, _) in enumerate(params):
        # Names are nearly always written in lower case: the comparison spares lower().
        if n == key or n.lower() == key:
            return i
    return -1


def get_param(params: Params, name: str) -> str | None:
    """The value of parameter ``name`` (None when absent or valueless)."""
    # find_param, inlined: the branch, tag, rport... of every message are read through here.
    key = name.lower()
    for n, value in params:
        if n == key or n.lower() == key:
            return value
    return None


def set_param(params: Params, name: str, value: str | None) -> Params:
    """``params`` with ``name`` set: replaced in place (spelling kept), else appended."""
    i = find_param(params, name)
    if i < 0:
        return (*params, (name, value))
    return (*params[:i], (params[i][0], value), *params[i + 1 :])


def drop_param(params: Params, name: str) -> Params:
    """``params`` without any parameter called ``name``."""
    key = name.lower()
    return tuple(p for p in params if p[0].lower() != key)


# Texts of small numbers already read (Content-Length, Max-Forwards, rport... repeat from
# message to message), with their value. Bounded so that hostile input cannot grow it.
_SMALL_INTS: dict[str, int] = {}


def parse_int_header(value: str, name: str, maximum: int = MAX_INT_HEADER) -> int:
    """A non-negative decimal header value (Max-Forwards, Expires, Content-Length, Min-Expires).

    Raises ParseError for anything but ASCII digits or for a value above ``maximum``
    (RFC 4475 §3.1.2.4: overlarge scalars are malformed).
    """
    known = _SMALL_INTS.get(value)
    if known is not None and known <= maximum:
        return known
    text = value.strip(_LWS)
    if not (text.isascii() and text.isdigit()):
        raise ParseError(f"{name}: not a non-negative integer: {value!r}")
    if len(text) < 10:
        # Short enough for int() to be cheap and exact; only the bound to check.
        number = int(text)
        if number > maximum:
            raise ParseError(f"{name}: value too large: {value!r}")
        if len(_SMALL_INTS) < 1024 and len(value) == len(text):
            # Only texts without LWS: a key is then at most nine characters long.
            _SMALL_INTS[value] = number
        return number
    # Leading zeros are legal (RFC 4475 §3.1.1.1 has "0068"); bound the length before int().
    stripped = text.lstrip("0")
    if len(stripped) > len(str(maximum)) or int(text) > maximum:
        raise ParseError(f"{name}: value too large: {value!r}")
    return int(text)


def parse_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 references keep their brackets); validates both parts."""
    if text.startswith("["):
        end = text.find("]")
        host = text[: end + 1]
        if end < 0 or _IPV6_RE.fullmatch(host) is None:
            raise ParseError(f"bad IPv6 reference in {text!r}")
        rest = text[end + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise ParseError(f"junk after IPv6 reference in {text!r}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.partition(":")
        if _HOSTNAME_RE.fullmatch(host) is None:
            raise ParseError(f"bad host in {text!r}")
        if not colon:
            return host, None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ParseError(f"bad port in {text!r}")
    port = int(port_text)
    if port > 65535:
        raise ParseError(f"port out of range in {text!r}")
    return host, port


def format_host_port(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


# -- Via (RFC 3261 §20.42, §18.2.1) ----------------------------------------------------------


@quick_init
@dataclass(frozen=True, slots=True)
class Via:
    """One Via element: ``SIP/2.0/<transport> <host>[:<port>];params``."""

    transport: str
    host: str
    port: int | None = None
    params: Params = ()

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name) >= 0

    # Built directly rather than with dataclasses.replace, which costs several times more
    # (it walks the fields): a Via is changed for every request sent.
    def with_param(self, name: str, value: str | None = None) -> Via:
        """Set ``name`` (replacing an existing one in place, else appending)."""
        params = set_param(self.params, name, value)
        return make_via(self.transport, self.host, self.port, params)

    def without_param(self, name: str) -> Via:
        params = drop_param(self.params, name)
        return type(self)(self.transport, self.host, self.port, params)

    @property
    def branch(self) -> str | None:
        # get_param inlined: the transaction layer reads the branch of every message.
        for name, value in self.params:
            if name == "branch" or name.lower() == "branch":
                return value
        return None

    @property
    def received(self) -> str | None:
        return self.param("received")

    @property
    def maddr(self) -> str | None:
        return self.param("maddr")

    @property
    def has_rport(self) -> bool:
        """True when ``rport`` is present, with or without value (RFC 3581 §3)."""
        return self.has_param("rport")

    @property
    def rport(self) -> int | None:
        """The ``rport`` value (RFC 3581 §4); None when absent or valueless."""
        value = self.param("rport")
        return None if value is None else parse_int_header(value, "rport", 65535)

    @property
    def ttl(self) -> int | None:
        value = self.param("ttl")
        return None if value is None else parse_int_header(value, "ttl", 255)

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {format_host_port(self.host, self.port)}" + (
            format_params(self.params)
        )


def _check_via_params(params: Params) -> None:
    for name, value in params:
        key = name.lower()
        if value is None:
            continue
        if key == "rport":
            parse_int_header(value, "rport", 65535)
        elif key == "ttl":
            parse_int_header(value, "ttl", 255)


# Sent-protocol and sent-by texts (what precedes the first ';' of a Via element) that the
# fast path below parsed, with what they gave: a peer's Via differs from message to message by
# its branch only. Bounded so that hostile input cannot grow it forever.
_VIA_HEADS: dict[str, tuple[str, str, int | None]] = {}
_VIA_HEADS_LIMIT = 1024
_VIA_HEAD_MAX = 128  # characters of a remembered head: the memo stays small
# The parameters after a leading branch (";rport", ";rport=5060;received=192.0.2.1"...) as
# text, with what parsing and checking them gave; filled by the fast path below, bounded and
# limited in length like the heads.
_VIA_TAILS: dict[str, Params] = {}


def parse_via(text: str) -> Via:
    """Parse one Via element (split a Via line with ``Headers.values`` first).

    RFC 3261 §25.1 allows LWS around ``/`` (SLASH = SWS "/" SWS) and between the
    sent-protocol and sent-by; RFC 4475 §3.1.1.1 uses both.
    """
    head, semi, param_text = text.partition(";")
    sent = _VIA_HEADS.get(head)
    if sent is None:
        return _parse_via(text)
    if param_text[:7] == "branch=":
        # The branch first (as every peer of the bridge writes it): the parameters after it
        # are the same from message to message (";rport", ";rport=5060;received=..."), so
        # they are looked up by text, parsed and checked once; only the branch, different in
        # every message, is read here (a value the plain spelling allows, as the regular
        # expression below checks it).
        end = param_text.find(";", 7)
        rest = param_text[end:] if end > 0 else ""
        tail = _VIA_TAILS.get(rest)
        if tail is not None:
            branch = param_text[7:end] if end > 0 else param_text[7:]
            if _GEN_VALUE_RE.fullmatch(branch) is not None:
                return make_via(sent[0], sent[1], sent[2], (("branch", branch), *tail))
    if semi and _PARAMS_FAST_RE.fullmatch(param_text) is None:
        return _parse_via(text)
    # A known head and parameters in the plain spelling: what _parse_via gives (its fast
    # path, then parse_params' fast path and _check_via_params), in one loop.
    params: list[tuple[str, str | None]] = []
    if semi:
        for item in param_text.split(";"):
            name, eq, value = item.partition("=")
            if eq:
                params.append((name, value))
                key = name.lower()
                if key == "rport":
                    parse_int_header(value, "rport", 65535)
                elif key == "ttl":
                    parse_int_header(value, "ttl", 255)
            else:
                params.append((name, None))
    if params and params[0][0] == "branch" and len(_VIA_TAILS) < _VIA_HEADS_LIMIT:
        end = param_text.find(";")
        rest = param_text[end:] if end > 0 else ""
        if len(rest) <= _VIA_HEAD_MAX:
            _VIA_TAILS[rest] = tuple(params[1:])
    return make_via(sent[0], sent[1], sent[2], tuple(params))


def _parse_via(text: str) -> Via:
    """:func:`parse_via` without the memo of Via heads (it fills the memo)."""
    stripped = text.strip(_LWS)
    fast = _VIA_FAST_RE.fullmatch(stripped)
    if fast is not None:
        transport, host, port_text, param_text = fast.groups()
        port = None if port_text is None else int(port_text)
        if port is None or port <= 65535:
            params = () if param_text is None else parse_params(param_text)
            _check_via_params(params)
            transport = transport.upper()
            head = text.partition(";")[0]
            if (
                len(stripped) == len(text)
                and len(head) <= _VIA_HEAD_MAX
                and len(_VIA_HEADS) < _VIA_HEADS_LIMIT
            ):
                # The head of a Via that needed no stripping parses the same in any Via.
                _VIA_HEADS[head] = (transport, host, port)
            return make_via(transport, host, port, params)
    text = stripped
    if text.startswith("SIP/2.0/"):
        # The ordinary spelling with something unusual (an IPv6 reference, a bad port...).
        rest = text[8:]
    else:
        parts = text.split("/", 2)
        if len(parts) != 3:
            raise ParseError(f"bad Via sent-protocol in {text!r}")
        name = parts[0].strip(_LWS)
        version = parts[1].strip(_LWS)
        if name.upper() != "SIP" or version != "2.0":
            raise ParseError(f"unsupported Via protocol in {text!r}")
        rest = parts[2].lstrip(_LWS)
    cut = 0
    n = len(rest)
    while cut < n and rest[cut] not in " \t":
        cut += 1
    transport = rest[:cut]
    rest = rest[cut:]
    if _TOKEN_RE.fullmatch(transport) is None:
        raise ParseError(f"bad Via transport in {text!r}")
    if not rest or rest[0] not in " \t":
        raise ParseError(f"missing sent-by in Via {text!r}")
    rest = rest.lstrip(_LWS)
    sent_by, semi, param_text = rest.partition(";")
    host, port = parse_host_port(sent_by.rstrip(_LWS))
    params = parse_params(param_text) if semi else ()
    _check_via_params(params)
    return make_via(transport.upper(), host, port, params)


# Via(...) for the Vias parsed and changed on every message (see quick_maker).
make_via: Callable[[str, str, int | None, Params], Via] = quick_maker(Via)


# -- CSeq (RFC 3261 §20.16) -------------------------------------------------------------------


@quick_init
@dataclass(frozen=True, slots=True)
class CSeq:
    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


make_cseq: Callable[[int, str], CSeq] = quick_maker(CSeq)
# CSeq values in the usual spelling, by their text: a peer numbers its requests from the same
# few values call after call ("1 INVITE", "2 BYE"), and responses repeat them. Bounded: once
# full it stops adding (emptying it would let a burst's values keep replacing each other and
# leave objects made during the burst pinned), and the values not in it are parsed as before.
_CSEQS: dict[str, CSeq] = {}
_CSEQS_LIMIT = 512


# The methods nearly every message names (tokens): a name found here needs no token check.
COMMON_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "REFER", "NOTIFY", "SUBSCRIBE"}
    | {"INFO", "UPDATE", "PRACK", "MESSAGE", "PUBLISH"}
)


def parse_cseq(text: str) -> CSeq:
    """Parse ``<seq> <method>``; seq must be below 2**31 (RFC 3261 §8.1.1.5)."""
    cseq = _CSEQS.get(text)
    if cseq is not None:
        return cseq
    seq_text, space, method = text.partition(" ")
    if (
        space
        and method in COMMON_METHODS
        and seq_text.isascii()
        and seq_text.isdigit()
        and len(seq_text) < 10
    ):
        # The usual spelling ("1 INVITE": one space, no LWS, a known method, a short number):
        # what the general code below gives, without its split and regex; nine digits at
        # most are below MAX_CSEQ.
        cseq = make_cseq(int(seq_text), method)
        if len(_CSEQS) < _CSEQS_LIMIT:
            _CSEQS[text] = cseq
        return cseq
    return _parse_cseq(text)


def _parse_cseq(text: str) -> CSeq:
    """:func:`parse_cseq` without its fast path."""
    parts = text.split()
    if len(parts) != 2:
        raise ParseError(f"bad CSeq {text!r}")
    seq = parse_int_header(parts[0], "CSeq", MAX_CSEQ)
    if _TOKEN_RE.fullmatch(parts[1]) is None:
        raise ParseError(f"bad CSeq method {text!r}")
    return make_cseq(seq, parts[1])
