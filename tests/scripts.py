"""Scripts that are not in a package (``bench/*.py``, ``examples/...``), imported by path.

Each is registered in ``sys.modules`` under ``name`` (dataclasses look their module up there)
and runs with its own folder first on ``sys.path`` while it is imported, as when run as a
script (``bench/load.py`` imports ``bench_calls`` as a sibling module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def load_script(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as the module ``name`` (a fresh module each call)."""
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


def bench_script(filename: str, name: str | None = None) -> ModuleType:
    """``bench/<filename>``, as the module ``name`` (the file's stem unless given)."""
    path = BENCH / filename
    return load_script(path, name or path.stem)
