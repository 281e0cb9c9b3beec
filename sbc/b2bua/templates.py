"""Header templates for the Retell leg (the ``[headers]`` table of the settings).

A template is text with ``{variable}`` fields; ``{{`` and ``}}`` stand for literal braces. The
variables are the names in :data:`VARIABLES` plus ``{header[Name]}``, the value of any header of
the PBX's INVITE (several lines joined by ``", "``, empty when absent). Templates are compiled
once at start: an unknown variable, a bad header name or a control character in the literal
text is a :class:`TemplateError` then, never a surprise at call time.

Rendered values are checked per call (PEERS.md, Retell: values short, each header line under
1024 bytes): a value holding a control character (CR, LF, TAB, NUL...), a lone surrogate or a
line over :data:`MAX_LINE_BYTES` is not sent, and is reported in :attr:`Rendered.rejected` so
the shell can log it. An empty value is left out as well.

This module is the single source of the variable list: the settings loader validates the
``[headers]`` table with :func:`compile_template` / :func:`compile_headers`.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sbc.sip.headers import Headers, canonical_name
from sbc.sip.quickinit import quick_init

# The variables a template may use, besides ``header[NAME]``.
VARIABLES: tuple[str, ...] = (
    "caller_number",  # the caller's number, normalised to E.164 where possible
    "caller_name",  # the caller's display name ("" when none)
    "called",  # the dialled extension or DID (Request-URI user of the PBX INVITE)
    "pbx_call_id",  # Call-ID of the PBX leg
    "call_uuid",  # the bridge's own id for the call (logs, call records)
    "now",  # call start, ISO 8601 UTC ("2026-11-25T10:07:02Z")
)
HEADER_VARIABLE = "header[NAME]"

# RFC 3261 §25.1 token: header names are tokens.
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_HEADER_REF_RE = re.compile(r"header\[([^\]]*)\]")

MAX_LINE_BYTES = 1024  # "Name: value" without the CRLF

# Headers the bridge writes itself on the Retell leg, or that change how a request is routed,
# authenticated or negotiated: a template may not set them.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Max-Forwards",
        "Route",
        "Record-Route",
        "Content-Length",
        "Content-Type",
        "Content-Encoding",
        "Authorization",
        "Proxy-Authorization",
        "Allow",
        "Supported",
        "Require",
        "Proxy-Require",
        "Session-Expires",
        "Min-SE",
        "Expires",
        "User-Agent",
    )
)


class TemplateError(ValueError):
    """A configuration error in a header template (raised at start, never per call)."""


@dataclass(frozen=True, slots=True)
class Literal:
    text: str


@dataclass(frozen=True, slots=True)
class Variable:
    name: str


@dataclass(frozen=True, slots=True)
class HeaderRef:
    name: str  # canonical header name


Part = Literal | Variable | HeaderRef


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: the header it fills and its parts in order."""

    header: str
    source: str
    parts: tuple[Part, ...]

    @property
    def variables(self) -> tuple[str, ...]:
        """The variables used, ``header[Name]`` spelled out, in order of first use."""
        seen: list[str] = []
        for part in self.parts:
            if isinstance(part, Variable):
                name = part.name
            elif isinstance(part, HeaderRef):
                name = f"header[{part.name}]"
            else:
                continue
            if name not in seen:
                seen.append(name)
        return tuple(seen)


# Made once per call, by sbc/b2bua/messages.py's maker (call_facts), not by this __init__.
@dataclass(frozen=True, slots=True)
class CallFacts:
    """The per-call values the variables stand for."""

    caller_number: str
    caller_name: str
    called: str
    pbx_call_id: str
    call_uuid: str
    now: float  # wall-clock seconds since the epoch
    headers: Headers  # the PBX INVITE's headers, for header[NAME]

    def value(self, name: str) -> str:
        if name == "now":
            return format_now(self.now)
        value: str = getattr(self, name)
        return value


@dataclass(frozen=True, slots=True)
class Rejected:
    """A header that was not sent, and why."""

    header: str
    reason: str


@quick_init
@dataclass(frozen=True, slots=True)
class Rendered:
    headers: tuple[tuple[str, str], ...]
    rejected: tuple[Rejected, ...]


def format_now(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _control_reason(text: str) -> str | None:
    """Why ``text`` cannot go into a header line, or None when it can."""
    if text.isprintable():
        # No character of the categories "Other" (Cc, Cs among them) or "Separator" but the
        # space (U+2028, U+2029): nothing to report, without a lookup per character.
        return None
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc" or ch in "\u2028\u2029":
            return f"control character U+{ord(ch):04X}"
        if category == "Cs":
            return "invalid UTF-8"
    return None


def check_header_name(name: str) -> str:
    """Validate a configured header name; returns its canonical spelling.

    Any token but the headers the bridge builds itself (:data:`RESERVED_HEADERS`): a template
    can never replace From, To, Via or a header that changes how the call is set up.
    """
    if _TOKEN_RE.fullmatch(name) is None:
        raise TemplateError(f"header name {name!r} is not a SIP token")
    canonical = canonical_name(name)
    if canonical.lower() in RESERVED_HEADERS:
        raise TemplateError(f"header {name!r} is built by sbc itself and cannot be templated")
    return canonical


def compile_template(header: str, text: str) -> Template:
    """Compile ``text`` for header ``header``; raises :class:`TemplateError`."""
    header = check_header_name(header)
    parts: list[Part] = []
    buf: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "{":
            if text.startswith("{{", i):
                buf.append("{")
                i += 2
                continue
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"{header}: unclosed '{{' at offset {i} in {text!r}")
            field = text[i + 1 : end]
            if buf:
                parts.append(Literal("".join(buf)))
                buf = []
            parts.append(_compile_field(header, field))
            i = end + 1
        elif ch == "}":
            if text.startswith("}}", i):
                buf.append("}")
                i += 2
                continue
            raise TemplateError(f"{header}: single '}}' at offset {i} in {text!r}")
        else:
            buf.append(ch)
            i += 1
    if buf:
        parts.append(Literal("".join(buf)))
    for part in parts:
        if isinstance(part, Literal):
            reason = _control_reason(part.text)
            if reason is not None:
                raise TemplateError(f"{header}: {reason} in template {text!r}")
    if (
        len(f"{header}: ".encode())
        + sum(len(p.text.encode()) for p in parts if isinstance(p, Literal))
        > MAX_LINE_BYTES
    ):
        raise TemplateError(f"{header}: template longer than {MAX_LINE_BYTES} bytes")
    return Template(header, text, tuple(parts))


def _compile_field(header: str, field: str) -> Part:
    if field in VARIABLES:
        return Variable(field)
    match = _HEADER_REF_RE.fullmatch(field)
    if match is not None:
        name = match.group(1)
        if _TOKEN_RE.fullmatch(name) is None:
            raise TemplateError(f"{header}: bad header name in {{{field}}}")
        return HeaderRef(canonical_name(name))
    known = ", ".join((*VARIABLES, HEADER_VARIABLE))
    raise TemplateError(f"{header}: unknown variable {{{field}}} (known: {known})")


def render_template(template: Template, facts: CallFacts) -> str:
    """The template's text with every variable replaced (no checks: see :func:`check_value`)."""
    parts = template.parts
    if len(parts) == 1 and type(parts[0]) is Variable:
        return facts.value(parts[0].name)  # the usual template: one variable, nothing around
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, Literal):
            out.append(part.text)
        elif isinstance(part, Variable):
            out.append(facts.value(part.name))
        else:
            out.append(", ".join(facts.headers.get_all(part.name)))
    return "".join(out)


def check_value(header: str, value: str) -> str | None:
    """Why ``header: value`` may not be sent, or None when it may."""
    if not value:
        return "empty value"
    reason = _control_reason(value)
    if reason is not None:
        return reason
    size = len(f"{header}: {value}".encode())
    if size > MAX_LINE_BYTES:
        return f"line of {size} bytes is over {MAX_LINE_BYTES}"
    return None


@dataclass(frozen=True, slots=True)
class HeaderTemplates:
    """The compiled ``[headers]`` table plus the allow-list of PBX X- headers passed through.

    ``passthrough`` holds header names or shell-style patterns (``X-Customer-*``), compared
    case-insensitively; only headers whose names start with ``X-`` are ever passed through.
    """

    templates: tuple[Template, ...] = ()
    passthrough: tuple[str, ...] = ()
    # What render() needs of each template, worked out once when the table is loaded rather
    # than on every call: (header, the CallFacts attribute of a template that is one variable
    # of the call and nothing else or None, the template, the room for an ASCII value on the
    # header's line: -1 for a header that is not ASCII); and the headers' lower-case names.
    _plan: tuple[tuple[str, str | None, Template, int], ...] = field(
        init=False, repr=False, compare=False
    )
    _taken: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = []
        for template in self.templates:
            header, parts = template.header, template.parts
            plain = len(parts) == 1 and type(parts[0]) is Variable and parts[0].name != "now"
            room = MAX_LINE_BYTES - len(header) - 2 if header.isascii() else -1
            plan.append((header, parts[0].name if plain else None, template, room))  # type: ignore[union-attr]
        object.__setattr__(self, "_plan", tuple(plan))
        object.__setattr__(self, "_taken", frozenset(t.header.lower() for t in self.templates))

    def render(self, facts: CallFacts) -> Rendered:
        headers: list[tuple[str, str]] = []
        rejected: list[Rejected] = []
        for header, name, template, room in self._plan:
            # The usual template (one variable of the call, nothing around it): its value read
            # directly, render_template's and facts.value()'s calls less.
            value: str = (
                getattr(facts, name) if name is not None else render_template(template, facts)
            )
            if value and value.isascii() and value.isprintable() and len(value) <= room:
                # What check_value() finds for it, without its calls: not empty, no control
                # character, short enough (ASCII: one byte per character).
                headers.append((header, value))
                continue
            reason = check_value(header, value)
            if reason is None:
                headers.append((header, value))
            else:
                rejected.append(Rejected(header, reason))
        if self.passthrough:
            for name, value in facts.headers:
                key = name.lower()
                if key in self._taken or not key.startswith("x-") or not self._passes(key):
                    continue
                reason = check_value(name, value)
                if reason is None:
                    headers.append((name, value))
                else:
                    rejected.append(Rejected(name, reason))
        return Rendered(tuple(headers), tuple(rejected))

    def _passes(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern.lower()) for pattern in self.passthrough)


def compile_headers(table: Mapping[str, str], passthrough: Iterable[str] = ()) -> HeaderTemplates:
    """Compile a whole ``[headers]`` table (header name -> template); raises TemplateError."""
    templates: list[Template] = []
    seen: set[str] = set()
    for header, text in table.items():
        template = compile_template(header, text)
        key = template.header.lower()
        if key in seen:
            raise TemplateError(f"header {template.header!r} configured twice")
        seen.add(key)
        templates.append(template)
    patterns = tuple(passthrough)
    for pattern in patterns:
        if not pattern.lower().startswith("x-"):
            raise TemplateError(f"pass-through pattern {pattern!r} must start with 'X-'")
    return HeaderTemplates(tuple(templates), patterns)
