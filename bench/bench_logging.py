"""Cost of one log line at info, as the call layer writes them (docs/performance.md, "Call layer").

Run from the repository root (or with PYTHONPATH naming another checkout):

    python bench/bench_logging.py [--lines 20000]

Configures logging as ``sbc run`` does with ``format = "json"`` at ``info``, into memory, binds
a logger as a call does (uuid, route, both Call-IDs), then writes ``--lines`` ``call_ended``
lines, each followed by one ``debug`` line that the level filters out, and prints the time per
pair in microseconds.
"""

from __future__ import annotations

import argparse
import io
import time

import structlog

from sbc.ops.logging import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.b2bua.call").bind(
        call_uuid="6c0f3e0e-8a55-4a8f-9d6b-0e1f2a3b4c5d",
        route="default",
        pbx_call_id="abc@127.0.0.51",
        retell_call_id="def@127.0.0.52",
    )
    started = time.perf_counter()
    for _ in range(args.lines):
        log.info("call_ended", reason="bye", pbx_status=200, retell_status=200, talked=1.002)
        log.debug("dropped", x=1)
    elapsed = time.perf_counter() - started
    print(f"{elapsed / args.lines * 1e6:.1f} us per info line (plus one filtered debug line)")


if __name__ == "__main__":
    main()
