"""bench/load.py --allocator: the environment the sbc process is started with (what
deploy/sbc.service's commented opt-in sets), and a missing library refused before any run."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import bench_script


@pytest.fixture(scope="module")
def load() -> ModuleType:
    return bench_script("load.py", "bench_load_allocator")


def sbc_env(
    load: ModuleType, allocator: str, inherited: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment the harness starts sbc with, from its own environment ``inherited``."""
    for name in list(load.os.environ):
        monkeypatch.delenv(name)
    for name, value in inherited.items():
        monkeypatch.setenv(name, value)
    options = load.Options(
        python="python", repo=Path("/repo"), sippy=None, sbc_in="u1", sbc_out="tcp",
        log_level="info", warmup=0, allocator=allocator,
    )  # fmt: skip
    env: dict[str, str] = load.sbc_process_environment(options)
    return env


def test_the_default_is_pymalloc_and_drops_an_inherited_allocator(
    load: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = load.build_parser().parse_args([])
    assert args.allocator == "pymalloc"
    inherited = {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/elsewhere",
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "MALLOC_CONF": "dirty_decay_ms:0",
    }
    # A pymalloc run compared with a jemalloc one must not run jemalloc because the shell had it.
    env = sbc_env(load, "pymalloc", inherited, monkeypatch)
    assert env == {"PATH": "/usr/bin", "PYTHONPATH": "/repo"}


def test_jemalloc_hands_every_allocation_to_the_preloaded_library(
    load: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = load.build_parser().parse_args(["--allocator", "jemalloc"])
    env = sbc_env(load, args.allocator, {"LD_PRELOAD": "/other.so"}, monkeypatch)
    assert env["PYTHONPATH"] == "/repo"
    assert env["PYTHONMALLOC"] == "malloc"  # else pymalloc still serves the small objects
    assert env["LD_PRELOAD"] == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    conf = dict(part.split(":") for part in env["MALLOC_CONF"].split(","))
    # Pages given back by a thread of jemalloc's own, not only when sbc next allocates, and
    # straight away once decayed (muzzy pages, MADV_FREE, would still count in RSS).
    assert conf == {"background_thread": "true", "dirty_decay_ms": "2000", "muzzy_decay_ms": "0"}


def test_mimalloc_runs_with_its_own_defaults(
    load: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = sbc_env(load, "mimalloc", {"MALLOC_CONF": "x:1"}, monkeypatch)
    assert env == {
        "PYTHONPATH": "/repo",
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    }


def test_an_unknown_allocator_is_refused(load: ModuleType) -> None:
    with pytest.raises(SystemExit):
        load.build_parser().parse_args(["--allocator", "tcmalloc"])


def test_a_missing_library_stops_the_run_before_anything_starts(
    load: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # ld.so only warns about a missing LD_PRELOAD and runs on: the run would be glibc's malloc.
    absent = tmp_path / "libjemalloc.so.2"
    monkeypatch.setitem(load.ALLOCATORS, "jemalloc", {"LD_PRELOAD": str(absent)})
    assert load.missing_allocator("jemalloc") == str(absent)
    assert load.missing_allocator("pymalloc") is None

    def no_sipp() -> None:
        raise AssertionError("the run went on to look for SIPp")

    monkeypatch.setattr(load, "sipp_binary", no_sipp)
    with pytest.raises(SystemExit, match="libjemalloc2"):
        load.main(["--allocator", "jemalloc", "--systems", "sbc", "--quick"])
    absent.write_bytes(b"")
    assert load.missing_allocator("jemalloc") is None
