"""Ordered, case-insensitive, multi-valued SIP header fields (RFC 3261 §7.3).

A :class:`Headers` is immutable: every change returns a new instance, so a message can be
shared between a transaction and a dialog without copies going stale. Names are normalised on
the way in: compact forms expand to their long names (RFC 3261 §7.3.3) and well-known names get
their canonical spelling, so ``v``, ``VIA`` and ``Via`` are one header. Values are kept as the
text that followed the colon, folded lines joined by one space and surrounding whitespace
stripped; interpreting them is the job of the accessors in :mod:`sbc.sip.message`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# RFC 3261 §7.3.3 and the IANA registry's compact forms.
COMPACT_FORMS: dict[str, str] = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}

_CANONICAL_NAMES = (
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Event",
    "Expires",
    "From",
    "In-Reply-To",
    "Max-Forwards",
    "Min-Expires",
    "Min-SE",
    "MIME-Version",
    "Organization",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Priority",
    "Privacy",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "RAck",
    "Reason",
    "Record-Route",
    "Refer-To",
    "Referred-By",
    "Remote-Party-ID",
    "Replaces",
    "Reply-To",
    "Require",
    "Retry-After",
    "Route",
    "RSeq",
    "Server",
    "Session-Expires",
    "Subject",
    "Subscription-State",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
)
_CANONICAL: dict[str, str] = {name.lower(): name for name in _CANONICAL_NAMES}
_CANONICAL.update({short: long for short, long in COMPACT_FORMS.items()})


# The canonical spellings themselves: most names given are already canonical, and this finds
# them without lower-casing first.
_EXACT: dict[str, str] = {name: name for name in _CANONICAL_NAMES}


# canonical_name() adds at most 256 names to _EXACT (bounded: names come from peers too).
_EXACT_MAX = len(_EXACT) + 256


def canonical_name(name: str) -> str:
    """The spelling a header is stored and written under (compact forms expanded)."""
    found = _EXACT.get(name)
    if found is not None:
        return found
    canonical = _CANONICAL.get(name.lower(), name)
    if canonical is name and len(_EXACT) < _EXACT_MAX:
        # A name that is its own spelling (an X- header sbc sends with every call): found
        # by the first lookup from now on, a call less per field of every message built.
        _EXACT[name] = name
    return canonical


# Lookup keys (lower-cased canonical names) of the names callers ask for; bounded.
_LOOKUP_KEYS: dict[str, str] = {}


def _lookup_key(name: str) -> str:
    key = _LOOKUP_KEYS.get(name)
    if key is None:
        key = canonical_name(name).lower()
        if len(_LOOKUP_KEYS) < 1024:
            _LOOKUP_KEYS[name] = key
    return key


def split_outside_quotes(text: str, sep: str, *, angles: bool = False) -> tuple[list[str], bool]:
    """Split ``text`` at ``sep`` outside double quotes (backslash escapes inside them) and, with
    ``angles``, outside ``<...>`` too.

    Returns the parts as they stand (not stripped) and whether a quoted string was left open.
    """
    parts: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = angles
        elif ch == ">":
            in_angle = False
        elif ch == sep and not in_angle:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts, in_quotes


def split_list(value: str) -> list[str]:
    """Split a list header value at top-level commas.

    Commas inside double quotes (with backslash escapes) or angle brackets do not split, so a
    display name such as ``"Doe, John" <sip:j@x>`` stays whole. Empty elements are dropped.
    """
    if "," not in value:
        stripped = value.strip()
        return [stripped] if stripped else []
    parts, _ = split_outside_quotes(value, ",", angles=True)
    return [stripped for part in parts if (stripped := part.strip())]


class Headers:
    """An immutable ordered list of ``(name, value)`` pairs with case-insensitive lookup.

    Lookups go through an index (lower-cased name to values) built on the first lookup, and
    :meth:`cached` memoises values computed from the fields (the parsed top Via, CSeq...), so a
    field read by several layers is parsed once per message. Both are derived from the
    immutable items only: they never change what a Headers means, and a changed copy (``add``,
    ``set``...) starts without them.
    """

    __slots__ = ("_cache", "_items", "_keys")

    _items: tuple[tuple[str, str], ...]
    _keys: tuple[str, ...] | None  # lower-cased names, computed on the first lookup
    _cache: dict[str, object] | None  # see cached()

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        # canonical_name's first step inline: the names given are nearly always canonical
        # already (a call less per field of every message sbc builds).
        exact = _EXACT.get
        self._items = tuple([(exact(name) or canonical_name(name), value) for name, value in items])
        self._keys = None
        self._cache = None

    @classmethod
    def _trusted(
        cls, items: tuple[tuple[str, str], ...], keys: tuple[str, ...] | None = None
    ) -> Headers:
        """Build from pairs whose names are already canonical (the parser's fast path);
        ``keys``, when given, are the lower-cased names."""
        obj = cls.__new__(cls)
        obj._items = items
        obj._keys = keys
        obj._cache = None
        return obj

    def _lower_keys(self) -> tuple[str, ...]:
        keys = self._keys
        if keys is None:
            # The names are canonical, so each key is the name's lookup key: taken from the
            # memo, one string per name for every message, not a copy per message (a message
            # kept for a whole call, such as the ACK of its INVITE, keeps its keys).
            lookup = _LOOKUP_KEYS.get
            keys = self._keys = tuple([lookup(n) or _lookup_key(n) for n, _ in self._items])
        return keys

    def cached(self, key: str, compute: Callable[[Headers], T]) -> T:
        """``compute(self)``, computed once per Headers and remembered under ``key``.

        ``compute`` must be a pure function of the fields (a parser of one of them) returning
        an immutable value; a call that raises is not remembered. Callers agree on what each
        key means (:mod:`sbc.sip.message` uses ``"top_via"``, ``"cseq"``, ``"from"``...).
        """
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        elif key in cache:
            # Not typing.cast: that is a function call, on the path of every accessor hit.
            return cache[key]  # type: ignore[return-value]
        value = compute(self)
        cache[key] = value
        return value

    def forget_cached(self) -> None:
        """Drop what :meth:`cached` remembered (it is computed again on demand).

        For messages kept long after their fields were read (a completed transaction holds
        its request for up to 32 s): parsed values held that long only burden the garbage
        collector.
        """
        self._cache = None

    # -- reading ---------------------------------------------------------------------------
    def items(self) -> tuple[tuple[str, str], ...]:
        return self._items

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return _lookup_key(name) in (self._keys or self._lower_keys())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the first field called ``name``, or ``default``."""
        keys = self._keys or self._lower_keys()
        # _lookup_key's memo read here: a call less on the path of every field read.
        key = _LOOKUP_KEYS.get(name) or _lookup_key(name)
        if key in keys:
            return self._items[keys.index(key)][1]
        return default

    def get_all(self, name: str) -> list[str]:
        """Every field line called ``name``, in order, each value as written (not split)."""
        keys = self._keys or self._lower_keys()
        key = _LOOKUP_KEYS.get(name) or _lookup_key(name)
        n = keys.count(key)
        if n == 0:
            return []
        items = self._items
        if n == 1:
            return [items[keys.index(key)][1]]
        return [items[i][1] for i, k in enumerate(keys) if k == key]

    def values(self, name: str) -> list[str]:
        """Every element of a list header, across all its lines, split at top-level commas."""
        lines = self.get_all(name)
        if len(lines) == 1:
            return split_list(lines[0])
        out: list[str] = []
        for v in lines:
            out.extend(split_list(v))
        return out

    def count(self, name: str) -> int:
        return (self._keys or self._lower_keys()).count(_lookup_key(name))

    # -- changing (each returns a new Headers) ---------------------------------------------
    def add(self, name: str, value: str) -> Headers:
        """Append a field at the end."""
        cname = canonical_name(name)
        keys = self._keys
        return Headers._trusted(
            (*self._items, (cname, value)), None if keys is None else (*keys, cname.lower())
        )

    def prepend(self, name: str, value: str) -> Headers:
        """Insert a field before the first field of the same name (or at the top).

        This is how a Via or Record-Route is pushed (RFC 3261 §16.6 step 8, §8.1.1.7).
        """
        cname = canonical_name(name)
        key = cname.lower()
        keys = self._keys or self._lower_keys()
        i = keys.index(key) if key in keys else 0
        items = self._items
        return Headers._trusted(
            (*items[:i], (cname, value), *items[i:]), (*keys[:i], key, *keys[i:])
        )

    def remove(self, name: str) -> Headers:
        """Drop every field called ``name``."""
        key = canonical_name(name).lower()
        return Headers._trusted(tuple((n, v) for n, v in self._items if n.lower() != key))

    def set(self, name: str, value: str) -> Headers:
        """Replace every field called ``name`` by one, where the first of them stood."""
        cname = canonical_name(name)
        key = cname.lower()
        items: list[tuple[str, str]] = []
        placed = False
        for n, v in self._items:
            if n.lower() == key:
                if not placed:
                    items.append((cname, value))
                    placed = True
            else:
                items.append((n, v))
        if not placed:
            items.append((cname, value))
        return Headers._trusted(tuple(items))

    def remove_first(self, name: str) -> Headers:
        """Drop the first element of a list header (the top Via, say).

        When the first line holds several comma-separated values only the first goes.
        """
        key = canonical_name(name).lower()
        keys = self._keys or self._lower_keys()
        if key not in keys:
            return Headers._trusted(self._items, keys)
        i = keys.index(key)
        items = self._items
        n, v = items[i]
        rest = split_list(v)[1:] if "," in v else []
        if rest:
            return Headers._trusted((*items[:i], (n, ", ".join(rest)), *items[i + 1 :]), keys)
        return Headers._trusted((*items[:i], *items[i + 1 :]), (*keys[:i], *keys[i + 1 :]))
