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

__all__ = ["quick_init"]

T = TypeVar("T")


class _Factory:
    """The default of a parameter whose field has a default factory (never a value)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()

# The dataclass's own __init__ of every class given a quick one: what the tests compare with.
ORIGINAL_INITS: dict[type, Any] = {}


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
