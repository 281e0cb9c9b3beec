"""``sbc config show``: the effective settings as TOML, each value's source beside it.

What an operator pastes when asking for help: every key with the value in force (file,
environment, credential file or default, see :func:`sbc.ops.settings.load_with_sources`) and a
comment naming where it came from. Secrets are never printed: ``"<set>"`` or ``"<unset>"``
stands in for them, ``***`` for the password of a URL (``records.url``). A key whose value is
unset (``sip.tls_port``, say) is printed as a comment, TOML having no null; everything else
parses back with :mod:`tomllib`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from sbc.ops.settings import Loaded, redact_url

__all__ = ["render"]


def render(loaded: Loaded, path: Path | None = None) -> str:
    """The settings of ``loaded`` as TOML text, one ``# source`` comment per value."""
    settings, sources = loaded.settings, loaded.sources
    lines = [
        "# sbc effective settings"
        + (f" (file {path})" if path is not None else " (no file: environment and defaults)"),
        "# precedence: credential file > environment > file > default; secrets never shown",
    ]
    for section in type(settings).model_fields:
        value = getattr(settings, section)
        lines.append("")
        if isinstance(value, BaseModel):
            lines.extend(_section(section, value, sources))
        elif isinstance(value, dict):
            lines.append(f"[{section}]")
            lines.extend(_table(section, value, sources))
        elif isinstance(value, tuple) and all(isinstance(item, BaseModel) for item in value):
            lines.extend(_array(section, value, sources))
        else:  # not in this version's settings; kept generic
            lines.append(_line(section, value, sources.get(section, "default")))
    return "\n".join(lines) + "\n"


def _section(name: str, model: BaseModel, sources: Mapping[str, str]) -> Iterator[str]:
    yield f"[{name}]"
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        dotted = f"{name}.{key}"
        if isinstance(value, dict):
            tables.append((dotted, value))
            continue
        secret = "SecretStr" in repr(field.annotation)
        yield _line(key, value, sources.get(dotted, "default"), secret=secret)
    for dotted, table in tables:
        yield ""
        yield f"[{dotted}]"
        yield from _table(dotted, table, sources)


def _array(name: str, models: tuple[BaseModel, ...], sources: Mapping[str, str]) -> Iterator[str]:
    """An array of tables (``[[routes]]``); a key's source is looked up by the entry's name
    (``routes.sales.password``), else the array's own."""
    if not models:
        yield f"# [[{name}]]: none  # default"
    for index, model in enumerate(models):
        if index:
            yield ""
        yield f"[[{name}]]"
        entry = getattr(model, "name", str(index))
        for key, field in type(model).model_fields.items():
            value = getattr(model, key)
            source = sources.get(f"{name}.{entry}.{key}", sources.get(name, "default"))
            if value is None:
                source = "default: the top-level setting"  # headers, targets, limit
            secret = "SecretStr" in repr(field.annotation)
            yield _line(key, value, source, secret=secret)


def _table(dotted: str, table: dict[str, Any], sources: Mapping[str, str]) -> Iterator[str]:
    if not table:
        yield f"# (empty)  # {sources.get(dotted, 'default')}"
    for key, value in table.items():
        yield _line(_key(key), value, sources.get(f"{dotted}.{key}", "default"))


def _line(key: str, value: Any, source: str, *, secret: bool = False) -> str:
    if secret or isinstance(value, SecretStr):
        shown = "<unset>" if value is None or not str(_reveal(value)) else "<set>"
        return f'{key} = "{shown}"  # {source}'
    if value is None:
        return f"# {key} is unset  # {source}"
    if isinstance(value, str):
        value = redact_url(value)  # records.url may carry the database user's password
    return f"{key} = {_value(value)}  # {source}"


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, re.Pattern):
        return _value(value.pattern)
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return _value(str(value))
    if isinstance(value, str):
        # JSON's string escapes (quote, backslash, \n, \uXXXX) are TOML basic-string escapes too.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table ([[routes]] headers)
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")
