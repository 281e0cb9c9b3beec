"""Imports flow one way (docs/architecture.md, "Layers"): every ``sbc`` import of every module,
including those inside functions and ``TYPE_CHECKING`` blocks, must be allowed by the table."""

from __future__ import annotations

import ast
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
