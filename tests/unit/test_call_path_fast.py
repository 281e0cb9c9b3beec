"""Fast paths of the call path (round 5 of issue 12), each compared with the general code it
stands in for."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua.events import CallRecord
from sbc.b2bua.ladder import _fields, _fields_by_scan
from sbc.b2bua.messages import LocalAddress
from sbc.net.addresses import Destination
from sbc.sdp.model import SessionDescription
from sbc.sip.headers import Headers, canonical_name
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.quickinit import ORIGINAL_INITS, quick_init
from sbc.sip.serializer import serialize
from sbc.sip.uri import SipUri, parse_uri

_NAMES = st.sampled_from(
    [
        "Call-ID",
        "i",
        "CSeq",
        "Via",
        "v",
        "To",
        "t",
        "From",
        "Authorization",
        "Proxy-Authorization",
        "Contact",
        "X-Other",
    ]
)
_VALUES = st.sampled_from(["a", "b@h", "1 INVITE", "SIP/2.0/UDP h;branch=z9hG4bKx", "", "x, y"])


@given(
    st.lists(st.tuples(_NAMES, _VALUES), max_size=12),
    st.booleans(),
    st.booleans(),
)
def test_ladder_fields_by_key_equal_the_scan(
    pairs: list[tuple[str, str]], response: bool, parsed: bool
) -> None:
    headers = Headers(pairs)
    message: Request | Response
    if response:
        message = Response(200, "OK", headers)
    else:
        message = Request("BYE", parse_uri("sip:u@h"), headers)
    if parsed:
        # The parser's Headers come with their lookup keys (no value may be empty on the wire:
        # what it reads back is compared, whatever it is).
        message = parse_message(serialize(message))
    assert _fields(message) == _fields_by_scan(message)


# Importing these modules decorates their classes.

_ANY = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3), st.tuples(st.integers()))


def _slots(obj: object) -> list[object]:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]  # type: ignore[arg-type]


def test_the_hot_classes_have_quick_inits() -> None:
    assert {CallRecord, Destination, SessionDescription, Request, Response, LocalAddress} <= set(
        ORIGINAL_INITS
    )
    names = {cls.__name__ for cls in ORIGINAL_INITS}
    assert {"Via", "CSeq", "NameAddr", "SipUri", "Request", "Response", "Destination"} <= names
    assert {"SessionDescription", "MediaDescription", "Origin", "CallRecord"} <= names
    assert "LocalAddress" in names


def _parameters(function: object) -> list[tuple[str, object]]:
    """Parameter names and defaults; a default factory's marker is named, not compared."""
    return [
        (p.name, "factory" if repr(p.default) == "<factory>" else p.default)
        for p in inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    ]


_QUICK = sorted(ORIGINAL_INITS, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", _QUICK, ids=[c.__qualname__ for c in _QUICK])
@given(data=st.data())
def test_a_quick_init_stores_what_the_dataclass_init_stores(
    cls: type[Any], data: st.DataObject
) -> None:
    original = ORIGINAL_INITS[cls]
    assert _parameters(cls.__init__) == _parameters(original)
    fields = dataclasses.fields(cls)
    required = [
        f
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    given_args = [data.draw(_ANY) for _ in required]
    optional = data.draw(st.integers(0, len(fields) - len(required)))
    given_args += [data.draw(_ANY) for _ in range(optional)]
    quick = cls(*given_args)
    reference: Any = object.__new__(cls)
    original(reference, *given_args)
    assert _slots(quick) == _slots(reference)
    assert quick == reference and repr(quick) == repr(reference)
    # replace() goes through the same parameters.
    assert dataclasses.replace(quick) == quick
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(quick, fields[0].name, None)


def test_quick_init_refuses_what_it_cannot_copy() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class KwOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (NoSlots, KwOnly, PostInit):
        with pytest.raises(TypeError):
            quick_init(cls)

    @quick_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Empty:
        pass

    assert Empty() == Empty()


@given(st.lists(st.tuples(st.sampled_from(["Via", "v", "call-id", "X-A", "", "cSeQ"]), _VALUES)))
def test_headers_store_the_canonical_names(pairs: list[tuple[str, str]]) -> None:
    assert Headers(pairs).items() == tuple((canonical_name(n), v) for n, v in pairs)


_PARTS = st.text(alphabet="ab1.-%", min_size=1, max_size=4)


@given(
    st.sampled_from(["sip", "sips"]),
    st.none() | _PARTS,
    st.none() | _PARTS,
    _PARTS,
    st.none() | st.integers(0, 65535),
    st.lists(st.tuples(_PARTS, st.none() | _PARTS), max_size=3),
    st.lists(st.tuples(_PARTS, _PARTS), max_size=2),
)
def test_a_sip_uri_writes_as_the_general_code_writes_it(
    scheme: str,
    user: str | None,
    password: str | None,
    host: str,
    port: int | None,
    params: list[tuple[str, str | None]],
    headers: list[tuple[str, str]],
) -> None:
    uri = SipUri(scheme, user, password, host, port, tuple(params), tuple(headers))
    assert str(uri) == uri._general_text()
