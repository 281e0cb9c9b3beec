"""Identifiers made from caller-supplied random bytes (RFC 3261 §8.1.1.7, §19.3).

The sans-I/O core never draws random numbers itself; the shell passes ``os.urandom(n)`` (or a
test passes fixed bytes) and these helpers turn them into branch, tag, Call-ID and cnonce text.
"""

from __future__ import annotations

__all__ = ["BRANCH_COOKIE", "make_branch", "new_branch", "new_call_id", "new_cnonce", "new_tag"]

# RFC 3261 §8.1.1.7: branches of RFC 3261 elements start with this magic cookie.
BRANCH_COOKIE = "z9hG4bK"

# RFC 3261 §19.3: tags and Call-IDs need at least 32 bits of randomness.
_MIN_RANDOM_BYTES = 4


def _check(random_bytes: bytes) -> str:
    if len(random_bytes) < _MIN_RANDOM_BYTES:
        raise ValueError(f"need at least {_MIN_RANDOM_BYTES} random bytes")
    return random_bytes.hex()


def make_branch(random_hex: str) -> str:
    """A Via branch: the magic cookie followed by ``random_hex`` (RFC 3261 §8.1.1.7)."""
    if not random_hex:
        raise ValueError("empty branch")
    return BRANCH_COOKIE + random_hex


def new_branch(random_bytes: bytes) -> str:
    return make_branch(_check(random_bytes))


def new_tag(random_bytes: bytes) -> str:
    """A From/To tag (RFC 3261 §19.3)."""
    return _check(random_bytes)


def new_call_id(random_bytes: bytes, host: str | None = None) -> str:
    """A Call-ID, ``<hex>@<host>`` when a host is given (RFC 3261 §8.1.1.4)."""
    local = _check(random_bytes)
    return f"{local}@{host}" if host else local


def new_cnonce(random_bytes: bytes) -> str:
    """A digest client nonce (RFC 7616 §3.4)."""
    return _check(random_bytes)
