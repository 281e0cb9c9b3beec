"""Time every garbage collection of a live ``sbc run`` (how long the collector stops the loop).

Used as the interpreter of ``bench/bench_calls.py`` or ``bench/load.py`` through the wrapper
``bench/gc_python.sh`` (their ``--python`` option), which runs ``-m sbc ...`` under this script
and anything else with plain ``python``:

    python bench/bench_calls.py --rate 300 --seconds 10 --warmup 100 --python bench/gc_python.sh
    python bench/gc_pauses.py report /tmp/sbc-gc.*.json

``run`` appends a ``gc.callbacks`` hook (start and stop of each collection, ``perf_counter``),
then runs ``sbc`` as ``python -m sbc`` would; at exit it writes ``$GC_PAUSES_OUT/sbc-gc.PID.json``
(``/tmp`` by default): one ``[generation, seconds, collected, wall clock]`` per collection.
``GC_PAUSES_THRESHOLD=a,b,c`` replaces ``sbc.ops.cli.GC_THRESHOLD`` before the service tunes the
collector, to compare settings (not an ``SBC_`` name: the harnesses pass none of those to the
sbc they start). ``report`` prints per generation the count, median, p90, p99 and
largest pause and the total time.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import signal
import statistics
import sys
import time
from pathlib import Path


def set_threshold(text: str) -> None:
    """Make ``sbc.ops.cli.tune_gc`` apply ``a,b,c`` instead of the service's own."""
    import sbc.ops.cli as cli

    a, b, c = (int(part) for part in text.split(","))
    cli.GC_THRESHOLD = (a, b, c)


def run(argv: list[str]) -> None:
    log: list[tuple[int, float, int, float]] = []
    started = [0.0]

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent = time.perf_counter() - started[0]
            log.append((info["generation"], spent, info["collected"], time.time()))

    def dump() -> None:
        out = Path(os.environ.get("GC_PAUSES_OUT", "/tmp")) / f"sbc-gc.{os.getpid()}.json"
        out.write_text(json.dumps(log))

    gc.callbacks.append(hook)
    atexit.register(dump)
    # sbc installs its own SIGTERM handler once running; until then, exit cleanly so the
    # file is written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threshold = os.environ.get("GC_PAUSES_THRESHOLD")
    if threshold:
        set_threshold(threshold)
    sys.argv = ["sbc", *argv]
    runpy.run_module("sbc", run_name="__main__")


def report(paths: list[str]) -> None:
    for path in paths:
        log = json.loads(Path(path).read_text())
        print(path)
        for generation in (0, 1, 2):
            ms = sorted(1000 * entry[1] for entry in log if entry[0] == generation)
            if not ms:
                continue
            print(
                f"  generation {generation}: {len(ms)} collections,"
                f" median {statistics.median(ms):.2f}"
                f" p90 {ms[int(0.9 * len(ms))]:.2f} p99 {ms[int(0.99 * len(ms))]:.2f}"
                f" max {ms[-1]:.2f} ms, total {sum(ms) / 1000:.3f} s"
            )


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        # "run -m sbc ARGS": what the wrapper passes on
        args = sys.argv[2:]
        if args[:2] == ["-m", "sbc"]:
            args = args[2:]
        run(args)
    elif len(sys.argv) >= 3 and sys.argv[1] == "report":
        report(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
