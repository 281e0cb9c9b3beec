"""Fuzz the SIP parser and a running sbc for a while (the long local run; CI runs a short one:
tests/unit/test_fuzz_parser.py and tests/integration/test_fuzz_engine.py).

Run from the repository root:

    nice -n 10 python bench/fuzz.py [--seconds 600] [--seed N] [--target both|parser]
    python bench/fuzz.py --atheris [--seconds 600]     # coverage-guided, parser only

Inputs: the RFC 4475 torture messages and a few well-formed messages, mutated by
``tests/fuzz_harness.mutate``; inputs that still parse join the pool (bounded), so mutations
build on what gets past the parser. Every input goes to the parser (whole, and cut into
random pieces); with ``--target both`` (the default) also to a running sbc (a whole
``Service`` on loopback) as a UDP datagram from the trusted PBX address, and one input in 20
over a new TCP connection. Every 500 inputs an OPTIONS over UDP and one over TCP must be
answered 200. A finding is an exception other than SipError out of the parser, an error-level
log line or an exception reaching the event loop in sbc, or an OPTIONS left unanswered; each
is written to ``--out`` (default ``fuzz-findings/``) with the input that caused it.

Printed at the end: inputs to the parser, datagrams and TCP connections to sbc, OPTIONS
probes answered, findings. Exit status 1 when there was a finding.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--atheris" not in sys.argv:
    # Under atheris the parser must be imported inside its instrumentation (fuzz_atheris).
    from tests.fuzz_harness import (  # the repository root is first on sys.path (above)
        WELL_FORMED,
        check_parser,
        mutate,
        running_engine_target,
        seeds,
    )

POOL_LIMIT = 2000
PROBE_EVERY = 500
TCP_EVERY = 20


class Run:
    def __init__(self, out: Path, seed: int) -> None:
        self.out = out
        self.rng = random.Random(seed)
        self.base = seeds()
        self.pool = list(self.base)
        self.parsed = 0
        self.findings = 0
        self.probes = 0

    def next_input(self) -> bytes:
        roll = self.rng.random()
        # Well-formed messages half the time: mutations of those get past the parser to the
        # transaction layer and the calls; the rest from the torture files and the pool.
        if roll < 0.5:
            source = self.rng.choice(self.base[-WELL_FORMED:])
        else:
            source = self.rng.choice(self.pool if roll < 0.8 else self.base)
        return mutate(source, self.rng, self.pool)

    def record(self, kind: str, detail: str, data: bytes | None) -> None:
        self.findings += 1
        self.out.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(data or detail.encode()).hexdigest()[:12]
        (self.out / f"{kind}-{digest}.txt").write_text(detail)
        if data is not None:
            (self.out / f"{kind}-{digest}.bin").write_bytes(data)
        print(f"FINDING {kind}: {detail[:300]}", file=sys.stderr)

    def parser(self, data: bytes) -> None:
        self.parsed += 1
        try:
            if check_parser(data, self.rng) and len(self.pool) < POOL_LIMIT:
                self.pool.append(data)
        except Exception:
            self.record("parser", traceback.format_exc(), data)


async def fuzz_both(run: Run, seconds: float) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as workdir:
        async with running_engine_target(Path(workdir)) as target:
            assert await target.options_answered(), "OPTIONS not answered before fuzzing"
            deadline = time.monotonic() + seconds
            reported = 0
            n = 0
            while time.monotonic() < deadline:
                n += 1
                data = run.next_input()
                run.parser(data)
                if n % TCP_EVERY == 0:
                    await target.feed_tcp(data, run.rng)
                else:
                    target.feed_udp(data, source_port=run.rng.choice([5060, 5062, 40000]))
                    await asyncio.sleep(0)  # let call tasks and timers run between inputs
                if n % PROBE_EVERY == 0:
                    run.probes += 1
                    if not await target.options_answered():
                        run.record("probe", f"OPTIONS unanswered after input {n}", data)
                for finding in target.findings[reported:]:
                    run.record(finding.kind, finding.detail, finding.data)
                reported = len(target.findings)
            if not await target.options_answered():
                run.record("probe", "OPTIONS unanswered at the end", None)
            if not await target.quiet(60):
                run.record("calls", f"{target.service.bridge.active} calls left", None)
            for finding in target.findings[reported:]:
                run.record(finding.kind, finding.detail, finding.data)
            return {"udp": target.udp_inputs, "tcp": target.tcp_inputs}


def fuzz_parser(run: Run, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            run.parser(run.next_input())


def fuzz_atheris(seconds: float, out: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["sbc"]):
        from tests.fuzz_harness import check_parser as check
        from tests.fuzz_harness import seeds as seed_inputs

    rng = random.Random(0)
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    for i, seed in enumerate(seed_inputs()):
        (corpus / f"seed-{i}").write_bytes(seed)

    def one(data: bytes) -> None:
        check(data, rng)

    out.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            "-max_len=20000",
            f"-artifact_prefix={out}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        one,
    )
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--target", choices=("both", "parser"), default="both")
    parser.add_argument("--atheris", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    args = parser.parse_args()
    if args.atheris:
        fuzz_atheris(args.seconds, args.out)
        return
    run = Run(args.out, args.seed)
    started = time.monotonic()
    sent = {"udp": 0, "tcp": 0}
    if args.target == "both":
        sent = asyncio.run(fuzz_both(run, args.seconds))
    else:
        fuzz_parser(run, args.seconds)
    elapsed = time.monotonic() - started
    print(
        f"seed {args.seed}: {elapsed:.0f} s, {run.parsed} inputs to the parser "
        f"({run.parsed / elapsed:.0f}/s), {sent['udp']} datagrams and {sent['tcp']} TCP "
        f"connections to sbc, {run.probes} OPTIONS probes, pool {len(run.pool)}, "
        f"findings {run.findings}"
    )
    sys.exit(1 if run.findings else 0)


if __name__ == "__main__":
    main()
