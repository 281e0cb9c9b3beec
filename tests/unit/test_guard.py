"""The edge guard's pure logic (sbc/net/guard.py) on a hand-driven clock."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from sbc.net.guard import ADMIT, DROP, REJECT, Guard, GuardConfig, TokenBucket

PBX = "10.0.0.5"
RETELL = "143.223.88.7"
STRANGER = "198.51.100.9"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **overrides: object) -> Guard:
    values: dict[str, object] = {
        "trusted": (ip_network("10.0.0.0/24"), ip_network("143.223.88.0/21")),
    }
    values.update(overrides)
    return Guard(GuardConfig(**values), clock=clock)  # type: ignore[arg-type]


def test_trusted_sources_pass_untrusted_are_dropped_in_drop_mode() -> None:
    guard = make(Clock())
    assert guard.admit_datagram(PBX)
    assert guard.admit_datagram(RETELL)
    assert not guard.admit_datagram(STRANGER)
    assert not guard.admit_connection(STRANGER)
    assert guard.admit_connection(PBX)
    assert guard.stats.dropped_untrusted == 2
    assert guard.stats.connections_refused == 1
    assert guard.request_verdict(PBX, counted=True, new=True) == ADMIT


def test_ipv6_and_v4_mapped_sources_are_classified() -> None:
    guard = make(Clock(), trusted=(ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")))
    assert guard.is_trusted("2001:db8::1")
    assert guard.is_trusted("[2001:db8::1]")
    assert guard.is_trusted("::ffff:10.1.2.3")
    assert not guard.is_trusted("2001:db9::1")
    assert not guard.is_trusted("not-an-address")


def test_reject_mode_lets_untrusted_requests_through_to_a_403() -> None:
    guard = make(Clock(), untrusted="reject")
    assert guard.admit_datagram(STRANGER)  # parsed, then refused
    assert guard.request_verdict(STRANGER, counted=True, new=True) == REJECT
    assert guard.stats.rejected == 1
    # Over a stream the request itself spends the token.
    assert guard.request_verdict("198.51.100.10", counted=False, new=False) == REJECT


def test_untrusted_source_is_banned_above_its_rate_and_the_ban_expires() -> None:
    clock = Clock()
    guard = make(clock, untrusted="reject", rate_limit=30, rate_window=2.0, ban_time=60.0)
    results = [guard.admit_datagram(STRANGER) for _ in range(31)]
    assert results == [True] * 30 + [False]
    assert guard.stats.bans == 1
    assert guard.is_banned(STRANGER) and guard.banned() == 1
    # Banned: dropped, counted, no second ban (logged once).
    clock.now += 59.0
    assert not guard.admit_datagram(STRANGER)
    assert guard.stats.bans == 1
    assert guard.stats.dropped_banned == 2
    # Expired: a full bucket again.
    clock.now += 1.5
    assert not guard.is_banned(STRANGER)
    assert [guard.admit_datagram(STRANGER) for _ in range(30)] == [True] * 30
    assert guard.banned() == 0


def test_a_steady_rate_under_the_limit_is_never_banned() -> None:
    clock = Clock()
    guard = make(clock, untrusted="reject", rate_limit=30, rate_window=2.0)
    for _ in range(600):  # 14 per second for 43 s: under 15 per second
        clock.now += 1 / 14
        assert guard.admit_datagram(STRANGER)
    assert guard.stats.bans == 0


def test_drop_mode_still_bans_and_counts() -> None:
    guard = make(Clock(), rate_limit=5)
    for _ in range(10):
        assert not guard.admit_datagram(STRANGER)
    assert guard.stats.dropped_untrusted == 5
    assert guard.stats.bans == 1
    assert guard.stats.dropped_banned == 5


def test_trusted_burst_limits_new_requests_only_and_never_bans() -> None:
    clock = Clock()
    guard = make(clock, trusted_rate_limit=100, rate_window=2.0)
    verdicts = [guard.request_verdict(PBX, counted=True, new=True) for _ in range(150)]
    assert verdicts.count(ADMIT) == 100 and verdicts.count(DROP) == 50
    # In-dialog requests (and the datagrams carrying them) pass all the while.
    assert guard.request_verdict(PBX, counted=True, new=False) == ADMIT
    assert guard.admit_datagram(PBX)
    assert guard.stats.bans == 0 and not guard.is_banned(PBX)
    assert guard.stats.dropped_trusted_rate == 50
    # Refilled at 50 per second.
    clock.now += 1.0
    verdicts = [guard.request_verdict(PBX, counted=True, new=True) for _ in range(60)]
    assert verdicts.count(ADMIT) == 50


def test_a_peer_sbc_sent_to_is_let_in_even_after_it_was_seen_as_untrusted() -> None:
    guard = make(Clock())
    assert not guard.admit_datagram("192.0.2.50")
    guard.note_peer("192.0.2.50")
    assert guard.admit_datagram("192.0.2.50")
    assert guard.request_verdict("192.0.2.50", counted=True, new=False) == ADMIT


def test_the_source_table_stays_bounded() -> None:
    clock = Clock()
    guard = make(clock, max_sources=64, rate_limit=2, ban_time=1000.0)
    for i in range(10_000):
        guard.admit_datagram(f"198.51.{i // 256 % 256}.{i % 256}")
        assert guard.tracked <= 64
    # Banned sources in the table survive the sweeps of idle ones.
    banned = "203.0.113.1"
    for _ in range(3):
        guard.admit_datagram(banned)
    assert guard.is_banned(banned)
    for i in range(40):
        clock.now += 10.0  # the others' buckets refill: they are idle
        guard.admit_datagram(f"198.18.0.{i}")
    assert guard.is_banned(banned)


def test_new_call_cap_is_a_global_token_bucket() -> None:
    clock = Clock()
    guard = make(clock, new_call_rate=10.0, new_call_burst=20)
    assert [guard.new_call_allowed() for _ in range(25)].count(True) == 20
    assert guard.stats.new_calls_limited == 5
    clock.now += 0.5
    assert [guard.new_call_allowed() for _ in range(10)].count(True) == 5
    assert make(clock, new_call_rate=0.0).new_call_allowed()  # no cap


@pytest.mark.parametrize(("elapsed", "expected"), [(0.0, False), (0.1, True)])
def test_token_bucket_refills_with_time(elapsed: float, expected: bool) -> None:
    bucket = TokenBucket(10.0, 1.0, now=0.0)
    assert bucket.take(0.0)
    assert bucket.take(elapsed) is expected


def test_drop_mode_never_rejects_even_when_asked_after_parsing() -> None:
    guard = make(Clock())
    assert guard.request_verdict(STRANGER, counted=True, new=True) == DROP
    assert guard.request_verdict(STRANGER, counted=False, new=True) == DROP
    assert guard.stats.rejected == 0
