"""Imports flow one way (docs/architecture.md, "Layers"): every ``sbc`` import of every module,
including those inside functions and ``TYPE_CHECKING`` blocks, must be allowed by the table."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sbc"

# package -> the sbc modules (and everything below them) it may import; its own always allowed.
ALLOWED: dict[str, tuple[str, ...]] = {
    "sip": (),
    "sdp": ("sbc.sip",),
    "net": ("sbc.sip",),
    "media": ("sbc.sdp", "sbc.sip.errors"),
    "b2bua": ("sbc.sip", "sbc.sdp", "sbc.net", "sbc.media"),
    "demo": ("sbc.sip", "sbc.sdp", "sbc.net", "sbc.media"),
    "ops": ("sbc.sip", "sbc.sdp", "sbc.net", "sbc.media", "sbc.b2bua", "sbc.demo"),
}


def _sbc_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sbc":  # from sbc import __version__ / from sbc import ops
                found += [(node.lineno, f"sbc.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.startswith("sbc.")]


def _allowed(package: str, module: str) -> bool:
    if module == "sbc.__version__":
        return True
    prefixes = (f"sbc.{package}", *ALLOWED[package])
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layer_table(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in files
        for line, name in _sbc_imports(path)
        if not _allowed(package, name)
    ]
    assert wrong == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sbc.ops.settings import Settings\n"
        "def f():\n    import sbc.ops.service\n"
        "from sbc import __version__\n"
    )
    names = sorted(name for _, name in _sbc_imports(module))
    assert names == ["sbc.__version__", "sbc.ops.service", "sbc.ops.settings"]
    assert [n for n in names if not _allowed("b2bua", n)] == ["sbc.ops.service", "sbc.ops.settings"]


# -- the sans-I/O core (docs/architecture.md, "Sans-I/O core") ------------------------------------
# sbc/sip and sbc/sdp import only the standard library (and sbc, checked by the table above), and
# none of it that does I/O, reads clocks or randomness, or logs. ``importlib`` and ``__import__``
# would import past this check, so they are refused too.

SANS_IO = ("sip", "sdp")
SANS_IO_FORBIDDEN = frozenset(
    {
        "asyncio", "socket", "ssl", "selectors", "time", "random", "secrets", "logging",
        "structlog", "pydantic", "aiohttp", "os", "threading", "subprocess", "importlib",
    }
)  # fmt: skip


def sans_io_violations(source: str, filename: str = "<source>") -> list[str]:
    """``line: module (why)`` for every import in ``source`` that the sans-I/O core may not
    have: every import node, including those inside functions and ``TYPE_CHECKING`` blocks."""
    wrong = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Name) and node.id == "__import__":
            wrong.append(f"{node.lineno}: __import__ (imports past this check)")
            continue
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue  # relative imports stay inside sbc
        for module in modules:
            top = module.partition(".")[0]
            if top == "sbc":
                continue
            if top in SANS_IO_FORBIDDEN:
                wrong.append(f"{node.lineno}: {module} (I/O, clocks, randomness or logging)")
            elif top not in sys.stdlib_module_names:
                wrong.append(f"{node.lineno}: {module} (not in the standard library)")
    return wrong


@pytest.mark.parametrize("package", SANS_IO)
def test_sans_io_core_imports_only_pure_stdlib(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{violation}"
        for path in files
        for violation in sans_io_violations(path.read_text(), str(path))
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio\n", ["1: asyncio (I/O, clocks, randomness or logging)"]),
        ("import os.path\n", ["1: os.path (I/O, clocks, randomness or logging)"]),
        ("from time import monotonic\n", ["1: time (I/O, clocks, randomness or logging)"]),
        ("import re, logging\n", ["1: logging (I/O, clocks, randomness or logging)"]),
        ("def f():\n    import random\n", ["2: random (I/O, clocks, randomness or logging)"]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import structlog\n",
            ["3: structlog (I/O, clocks, randomness or logging)"],
        ),
        ("import importlib.util\n", ["1: importlib.util (I/O, clocks, randomness or logging)"]),
        ("m = __import__('socket')\n", ["1: __import__ (imports past this check)"]),
        ("import attrs\n", ["1: attrs (not in the standard library)"]),
        ("from multidict import CIMultiDict\n", ["1: multidict (not in the standard library)"]),
        # allowed: pure stdlib, sbc itself, relative imports, names that only look alike
        ("import re\nimport dataclasses\nfrom collections.abc import Iterator\n", []),
        ("from __future__ import annotations\nimport urllib.parse, hashlib, hmac\n", []),
        ("import sbc.sip.message\nfrom sbc.sip import errors\nfrom . import fields\n", []),
        ("import timeit_not\n", ["1: timeit_not (not in the standard library)"]),
        ("import typing\nx = 'import socket'\n", []),
    ],
)
def test_the_sans_io_check_sees_a_forbidden_import(source: str, expected: list[str]) -> None:
    assert sans_io_violations(source) == expected
