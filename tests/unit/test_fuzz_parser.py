"""Fuzzing the parser in CI (a short run; bench/fuzz.py runs for minutes): the RFC 4475 files
and well-formed messages mutated byte- and line-wise (tests/fuzz_harness.py), every input fed
to parse_message, to a StreamParser whole and in pieces, to every field accessor, validation
and a round trip. Only the parser's own errors (SipError) may come out."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_harness import WELL_FORMED, check_parser, mutate, seeds

SEEDS = seeds()


def test_every_seed_goes_through() -> None:
    rng = random.Random(0)
    assert len(SEEDS) >= 49 + 10
    # The well-formed seeds parse: mutations start from messages that reach the accessors.
    assert all(check_parser(seed, rng) == 3 for seed in SEEDS[-WELL_FORMED:])


@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.randoms(use_true_random=False), st.sampled_from(SEEDS))
def test_mutated_torture_messages_only_raise_sip_errors(
    seed: bytes, rng: random.Random, other: bytes
) -> None:
    data = mutate(seed, rng, [other])
    check_parser(data, rng)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_stacked_mutations_only_raise_sip_errors(rng: random.Random) -> None:
    data = rng.choice(SEEDS)
    for _ in range(rng.randint(2, 10)):
        data = mutate(data, rng, SEEDS)
    check_parser(data, rng)
