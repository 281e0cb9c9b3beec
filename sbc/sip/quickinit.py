"""A cheaper ``__init__`` for the frozen, slotted dataclasses made on every message.

The ``__init__`` that ``dataclass(frozen=True)`` writes stores each field with
``object.__setattr__(self, name, value)`` (the class's own ``__setattr__`` refuses): a call
through ``object``'s slot wrapper, which looks the name up on the type again, about 670
instructions a field. Each slot's member descriptor stores the value directly for about 3.5
times less: :func:`quick_init` gives the class an ``__init__`` that does that, with the same
parameters, defaults and default factories. Everything else (frozen ``__setattr__``, ``__eq__``,
``__hash__``, ``__repr__``, ``__match_args__``, ``dataclasses.fields`` and ``replace``) stays
the dataclass's. A bridged call makes about eighty such objects (Vias, requests, responses,
addresses, SDP parts, its record).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["quick_init", "quick_maker"]

T = TypeVar("T")


class _Factory:
    """The default of a parameter whose field has a default factory (never a value)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()

# The dataclass's own __init__ of every class given a quick one: what the tests compare with.
ORIGINAL_INITS: dict[type, Any] = {}
# The maker of every class given one by quick_maker (what the tests compare with the class).
MAKERS: dict[type, Any] = {}


def quick_init(cls: type[T]) -> type[T]:
    """Give ``cls`` (a ``dataclass(frozen=True, slots=True)`` with neither ``__post_init__``
    nor keyword-only or init-less fields) an ``__init__`` that sets each slot through its
    member descriptor."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if hasattr(cls, "__post_init__") or not hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: quick_init is for slotted classes without __post_init__")
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY}
    params: list[str] = []
    body: list[str] = []
    for f in fields:
        name = f.name
        if not f.init or f.kw_only or not name.isidentifier():
            raise TypeError(f"{cls.__name__}.{name}: quick_init takes positional init fields")
        # The descriptor's bound __set__, looked up once: calling it is the whole store.
        namespace[f"_set_{name}"] = getattr(cls, name).__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = f.default
            params.append(f"{name}=_default_{name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = f.default_factory
            params.append(f"{name}=_FACTORY")
            body.append(f"    if {name} is _FACTORY:\n        {name} = _factory_{name}()\n")
        else:
            params.append(name)
        body.append(f"    _set_{name}(self, {name})\n")
    lines = "".join(body) or "    pass\n"
    source = f"def __init__(self, {', '.join(params)}):\n{lines}"
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    ORIGINAL_INITS[cls] = cls.__init__
    type.__setattr__(cls, "__init__", init)
    return cls


def quick_maker(cls: type[T]) -> Any:
    """A function ``make(*fields)`` giving what ``cls(*fields)`` gives (every field positional,
    no defaults), for the few places that build one of these on every message.

    Even :func:`quick_init`'s ``__init__`` costs about 3.9k instructions an object (the type
    call, the ``__init__`` frame, a descriptor call a field: callgrind, CPython 3.11). The
    maker fills an instance of a plain twin class with the same slots (stores a specialised
    interpreter writes directly) and then gives it ``cls`` as its class, which CPython allows
    between heap types of the same slot layout: about 2.5k. The object is then exactly what
    the constructor makes (same class, so the same frozen ``__setattr__``, equality, hash and
    repr); the twin is never seen outside the maker. ``cls`` must be slotted, with neither
    ``__post_init__`` nor a base that has instance fields or a ``__setattr__`` of its own.
    """
    slots = tuple(cls.__dict__.get("__slots__", ()))
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if sorted(slots) != sorted(names) or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: quick_maker is for slotted dataclasses")
    if any("__setattr__" in vars(base) for base in cls.__mro__[1:-1]):
        # The twin's stores would go through it (and the class's own is the frozen one).
        raise TypeError(f"{cls.__name__}: quick_maker needs bases without __setattr__")
    # The same bases (a base's empty __slots__, as Request's _Common, is part of the layout).
    namespace_twin = {"__slots__": slots, "__module__": cls.__module__}
    twin = type(f"_{cls.__name__}Twin", cls.__bases__, namespace_twin)
    params = ", ".join(names)
    stores = "".join(f"    o.{name} = {name}\n" for name in names)
    source = f"def make({params}):\n    o = _twin()\n{stores}    o.__class__ = _cls\n    return o\n"
    namespace: dict[str, Any] = {"_twin": twin, "_cls": cls}
    exec(source, namespace)
    make = namespace["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    make.__module__ = cls.__module__
    # The class swap is refused (TypeError) unless the layouts match, as for a class compiled
    # by mypyc (bench/compiled_setup.py): then the maker is the class itself, which takes the
    # same positional fields. Checked once here.
    try:
        probe = make(*([None] * len(names)))
    except TypeError:
        return cls
    if type(probe) is not cls:  # pragma: no cover - the swap either works or raises
        return cls
    MAKERS[cls] = make
    return make
