"""bench/compiled_setup.py, the measurement build of the call path compiled with mypyc
(scripts/compiled; docs/performance.md "Round 7: compiled call path"): what it lists still
exists, it never builds into the source tree, and this suite runs the pure Python."""

from __future__ import annotations

import importlib
import runpy
from pathlib import Path
from typing import Any

import pytest

import sbc

ROOT = Path(__file__).resolve().parents[2]


def compiled_setup() -> dict[str, Any]:
    # run_name other than __main__: the helpers without a build.
    return runpy.run_path(str(ROOT / "bench" / "compiled_setup.py"), run_name="compiled_setup")


def test_every_listed_module_exists_and_the_core_is_compiled_or_left_out_by_name() -> None:
    ns = compiled_setup()
    compiled = ns["compiled_modules"]()
    interpreted = ns["INTERPRETED"]
    for path in [*ns["CALL_PATH"], *interpreted]:
        assert (ROOT / path).is_file(), path
    core = sorted(
        path.relative_to(ROOT).as_posix()
        for package in ns["COMPILED_PACKAGES"]
        for path in (ROOT / package).glob("*.py")
    )
    assert set(core) <= set(compiled) | set(interpreted)
    assert not set(compiled) & set(interpreted)
    for path in ("sbc/sip/parser.py", "sbc/b2bua/call.py", "sbc/net/engine.py"):
        assert path in compiled


def test_it_refuses_to_build_without_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SBC_COMPILE", raising=False)
    with pytest.raises(SystemExit, match="SBC_COMPILE=1"):
        compiled_setup()["main"]()


def test_it_refuses_to_build_in_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A .so beside a .py shadows it: the tests and coverage would run compiled code."""
    monkeypatch.setenv("SBC_COMPILE", "1")
    with pytest.raises(SystemExit, match="not in the source tree"):
        compiled_setup()["main"]()


def test_this_suite_runs_the_pure_python() -> None:
    assert Path(sbc.__file__).resolve().parent == ROOT / "sbc"
    assert sorted((ROOT / "sbc").rglob("*.so")) == []
    for name in ("sbc.sip.parser", "sbc.b2bua.call", "sbc.net.engine"):
        assert importlib.import_module(name).__file__.endswith(".py")  # type: ignore[union-attr]
