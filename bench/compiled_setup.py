"""Build of sbc's call path compiled with mypyc, for measurement only (docs/performance.md,
"Round 7: compiled call path"; not shipped: it did not pay end to end).

Run by ``scripts/compiled build DIR`` inside a copy of the checkout, never in the source tree
(a ``.so`` beside a ``.py`` shadows it: tests and coverage would silently run compiled code)::

    SBC_COMPILE=1 python bench/compiled_setup.py build_ext --inplace

Needs gcc, the Python headers and mypy (the test extra; mypyc ships with it).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# mypyc compiles every module of these packages except those in INTERPRETED ...
COMPILED_PACKAGES = ("sbc/sip", "sbc/sdp")

# ... and these modules of the call path (the call layer, the engine, the media seam, metrics).
CALL_PATH = (
    "sbc/b2bua/absorber.py",
    "sbc/b2bua/call.py",
    "sbc/b2bua/calls.py",
    "sbc/b2bua/callstate.py",
    "sbc/b2bua/events.py",
    "sbc/b2bua/inbound.py",
    "sbc/b2bua/ladder.py",
    "sbc/b2bua/leg.py",
    "sbc/b2bua/messages.py",
    "sbc/b2bua/numbers.py",
    "sbc/b2bua/templates.py",
    "sbc/net/addresses.py",
    "sbc/net/engine.py",
    "sbc/net/guard.py",
    "sbc/net/transport.py",
    "sbc/media/base.py",
    "sbc/ops/metrics.py",
)

# Left interpreted, with the reason. errors.py: a compiled exception class loses the
# class-level status/reason a subclass sets, and interpreted layers subclass SipError.
# handles.py: mypyc rejects its async generator (OutgoingRequest._iterate). logging.py: mypyc
# rejects several names bound in one class-body assignment (_LineWriter's level methods).
# The packages' __init__ hold only a docstring.
INTERPRETED = frozenset(
    {
        "sbc/sip/errors.py",
        "sbc/sip/__init__.py",
        "sbc/sdp/__init__.py",
        "sbc/net/handles.py",
        "sbc/ops/logging.py",
    }
)


def compiled_modules() -> list[str]:
    """The source files mypyc compiles, relative to the project root, sorted."""
    files = [
        path.relative_to(ROOT).as_posix()
        for package in COMPILED_PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
    ]
    files.extend(CALL_PATH)
    return sorted(path for path in files if path not in INTERPRETED)


def main() -> None:
    if os.environ.get("SBC_COMPILE", "").strip() in ("", "0"):
        raise SystemExit("set SBC_COMPILE=1 (and run it in a copy: scripts/compiled build DIR)")
    if (ROOT / ".git").exists():
        # A work tree (a copy made by scripts/compiled has no .git): refuse to drop .so files.
        raise SystemExit("not in the source tree: run scripts/compiled build DIR")
    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(ROOT)  # mypycify takes paths relative to the project root
    # Type-checked with [tool.mypy] of pyproject.toml; all modules in one shared library
    # (calls between compiled modules are then direct C calls).
    modules = mypycify(compiled_modules(), opt_level="3", group_name="sbc_compiled")
    setup(ext_modules=modules)


if __name__ == "__main__":
    main()
