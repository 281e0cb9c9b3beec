"""Telephone numbers to E.164 (ITU-T E.164; RFC 3966 §5.1 for the visual separators).

Retell matches the number an INVITE is for only in E.164 (``+14155550100``; PEERS.md), and the
caller's number is more useful to an agent in the same form. 3CX hands numbers over as dialled
or as the carrier delivered them: ``00441234...``, ``01234...``, ``(0)12 34``, ``+44 (0)20...``.

:func:`to_e164` turns such a number into E.164 when the :class:`NumberPlan` says how, and
returns ``None`` when it cannot (an extension, ``anonymous``, a local number without area code);
:func:`normalise` falls back to the cleaned text in that case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

# RFC 3966 §5.1.1: visual separators; spaces, '/' and NBSP are common in PBX directories too.
_SEPARATORS = str.maketrans("", "", " -.()/\u00a0\t")
_DIGITS_RE = re.compile(r"[0-9]+")
# E.164 §6: at most 15 digits, country codes never start with 0.
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")
# "+44 (0)20 ..." writes the national trunk prefix in parentheses; it is not dialled.
_TRUNK_IN_PARENS_RE = re.compile(r"^(\+[0-9 ]+?)\s*\(0\)")


@dataclass(frozen=True, slots=True)
class NumberPlan:
    """How numbers are written where the PBX stands.

    ``country_code`` without ``+`` (``"44"``, ``"1"``); ``national_prefix`` is the trunk prefix
    (``"0"`` in most of Europe, ``"1"`` in NANP, ``""`` for none); ``international_prefix`` the
    exit code (``"00"``, ``"011"``). ``national_lengths`` lists digit counts of numbers that
    come without any prefix yet are national significant numbers (``(10,)`` for NANP); empty
    means such numbers are left alone.
    """

    country_code: str = ""
    national_prefix: str = "0"
    international_prefix: str = "00"
    national_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("country_code", "national_prefix", "international_prefix"):
            value = getattr(self, name)
            if value and _DIGITS_RE.fullmatch(value) is None:
                raise ValueError(f"{name} must be digits, got {value!r}")
        if self.country_code.startswith("0"):
            raise ValueError(f"country_code must not start with 0: {self.country_code!r}")


def is_e164(number: str) -> bool:
    return _E164_RE.fullmatch(number) is not None


# A number clean() leaves as it is (no escape, space, parameter, parenthesis or separator):
# what a PBX sends in From on most calls, cleaned once per call and once more to normalise.
_PLAIN_RE = re.compile(r"\+?[0-9]+")


def clean(number: str) -> str:
    """The number with %HH escapes decoded, URI parameters cut and visual separators removed."""
    if _PLAIN_RE.fullmatch(number) is not None:
        return number  # unquote's, the regex's and translate's work, none of it changing it
    text = unquote(number).strip()
    text = text.split(";", 1)[0]
    match = _TRUNK_IN_PARENS_RE.match(text)
    if match is not None:
        text = match.group(1) + text[match.end() :]
    return text.translate(_SEPARATORS)


def to_e164(number: str, plan: NumberPlan) -> str | None:
    """``number`` in E.164, or None when the plan gives no way to get there."""
    text = clean(number)
    if text.startswith("+"):
        return text if is_e164(text) else None
    if _DIGITS_RE.fullmatch(text) is None:
        return None
    # The international prefix is tried first: "00" starts with the national prefix "0".
    if plan.international_prefix and text.startswith(plan.international_prefix):
        candidate = "+" + text[len(plan.international_prefix) :]
        return candidate if is_e164(candidate) else None
    if not plan.country_code:
        return None
    if plan.national_prefix and text.startswith(plan.national_prefix):
        rest = text[len(plan.national_prefix) :]
        if plan.national_lengths and len(rest) not in plan.national_lengths:
            return None
        candidate = "+" + plan.country_code + rest
        return candidate if rest and is_e164(candidate) else None
    if len(text) in plan.national_lengths:
        candidate = "+" + plan.country_code + text
        return candidate if is_e164(candidate) else None
    return None


def normalise(number: str, plan: NumberPlan) -> str:
    """E.164 when possible, else the cleaned number (``anonymous`` and extensions stay)."""
    e164 = to_e164(number, plan)
    if e164 is not None:
        return e164
    return clean(number)
