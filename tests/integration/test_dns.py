"""RFC 3263 server location against a fake DNS server on loopback (``fake_dns`` fixture:
peers.FakeDns)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sbc.net.addresses import Destination, Target
from sbc.net.dns import ResolutionFailed, Resolver, make_resolver


def _resolver(fake: Any, timeout: float = 1.0, **kwargs: object) -> Resolver:
    return Resolver(
        resolver=make_resolver([fake.address[0]], fake.address[1]),
        timeout=timeout,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_literal_ip_needs_no_lookup(fake_dns: Any) -> None:
    resolver = _resolver(fake_dns)
    assert await resolver.resolve(Target("127.0.0.7", None, "tcp")) == [
        Destination("tcp", "127.0.0.7", 5060)
    ]
    assert await resolver.resolve(Target("[::1]", 5070, "udp")) == [Destination("udp", "::1", 5070)]
    assert await resolver.resolve(Target("127.0.0.7", None, "tls")) == [
        Destination("tls", "127.0.0.7", 5061)
    ]
    assert fake_dns.queries == []


async def test_srv_then_addresses_in_priority_order(fake_dns: Any) -> None:
    fake_dns.add("_sip._tcp.pbx.test", "SRV", "20 0 5080 b.pbx.test.", "10 0 5070 a.pbx.test.")
    fake_dns.add("a.pbx.test", "A", "127.0.0.21")
    fake_dns.add("b.pbx.test", "A", "127.0.0.22", "127.0.0.23")
    resolver = _resolver(fake_dns, address_types=("A",))
    result = await resolver.resolve(Target("pbx.test", None, "tcp"))
    assert result[0] == Destination("tcp", "127.0.0.21", 5070, None, "pbx.test")
    assert {d.host for d in result[1:]} == {"127.0.0.22", "127.0.0.23"}
    assert all(d.port == 5080 for d in result[1:])


async def test_srv_weights_spread_picks(fake_dns: Any) -> None:
    fake_dns.add("_sip._udp.w.test", "SRV", "10 90 5070 a.w.test.", "10 10 5071 b.w.test.")
    fake_dns.add("a.w.test", "A", "127.0.0.31")
    fake_dns.add("b.w.test", "A", "127.0.0.32")
    resolver = _resolver(fake_dns, address_types=("A",), rng=random.Random(7))
    firsts = []
    for _ in range(200):
        firsts.append((await resolver.resolve(Target("w.test", None, "udp")))[0].host)
    heavy = firsts.count("127.0.0.31")
    assert 140 < heavy < 200  # about 90 %
    assert "127.0.0.32" in firsts


async def test_tls_uses_sips_service(fake_dns: Any) -> None:
    fake_dns.add("_sips._tcp.secure.test", "SRV", "0 0 5061 s.secure.test.")
    fake_dns.add("s.secure.test", "A", "127.0.0.41")
    result = await _resolver(fake_dns, address_types=("A",)).resolve(
        Target("secure.test", None, "tls")
    )
    assert result == [Destination("tls", "127.0.0.41", 5061, None, "secure.test")]


async def test_no_srv_falls_back_to_address_on_default_port(fake_dns: Any) -> None:
    fake_dns.add("plain.test", "A", "127.0.0.51")
    fake_dns.add("plain.test", "AAAA", "::1")
    result = await _resolver(fake_dns).resolve(Target("plain.test", None, "udp"))
    assert result == [
        Destination("udp", "127.0.0.51", 5060, None, "plain.test"),
        Destination("udp", "::1", 5060, None, "plain.test"),
    ]
    assert ("_sip._udp.plain.test", "SRV") in fake_dns.queries


async def test_explicit_port_skips_srv(fake_dns: Any) -> None:
    fake_dns.add("_sip._tcp.port.test", "SRV", "0 0 9999 other.test.")
    fake_dns.add("port.test", "A", "127.0.0.61")
    result = await _resolver(fake_dns, address_types=("A",)).resolve(
        Target("port.test", 5070, "tcp")
    )
    assert result == [Destination("tcp", "127.0.0.61", 5070, None, "port.test")]
    assert all(rdtype != "SRV" for _, rdtype in fake_dns.queries)


async def test_answers_cached_for_their_ttl(fake_dns: Any) -> None:
    now = [1000.0]
    fake_dns.add("cache.test", "A", "127.0.0.71", ttl=60)
    resolver = _resolver(fake_dns, address_types=("A",), clock=lambda: now[0])
    target = Target("cache.test", 5060, "udp")
    await resolver.resolve(target)
    await resolver.resolve(target)
    assert fake_dns.queries.count(("cache.test", "A")) == 1
    now[0] += 61
    await resolver.resolve(target)
    assert fake_dns.queries.count(("cache.test", "A")) == 2


async def test_concurrent_lookups_share_one_query(fake_dns: Any) -> None:
    fake_dns.add("shared.test", "A", "127.0.0.81")
    resolver = _resolver(fake_dns, address_types=("A",))
    target = Target("shared.test", 5060, "udp")
    results = await asyncio.gather(*(resolver.resolve(target) for _ in range(5)))
    assert all(r == results[0] for r in results)
    assert fake_dns.queries.count(("shared.test", "A")) == 1


async def test_nonexistent_name_fails_fast_and_is_cached(fake_dns: Any) -> None:
    resolver = _resolver(fake_dns, address_types=("A",))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ResolutionFailed):
        await resolver.resolve(Target("nowhere.test", None, "tcp"))
    assert loop.time() - started < 0.5
    asked = len(fake_dns.queries)
    with pytest.raises(ResolutionFailed):
        await resolver.resolve(Target("nowhere.test", None, "tcp"))
    assert len(fake_dns.queries) == asked


async def test_dead_resolver_fails_within_timeout(fake_dns: Any) -> None:
    fake_dns.silent.add("_sip._tcp.slow.test")
    resolver = _resolver(fake_dns, timeout=0.5, address_types=("A",))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ResolutionFailed):
        await resolver.resolve(Target("slow.test", None, "tcp"))
    elapsed = loop.time() - started
    assert 0.4 <= elapsed < 1.5, elapsed


async def test_srv_target_without_address_fails(fake_dns: Any) -> None:
    fake_dns.add("_sip._udp.broken.test", "SRV", "0 0 5060 gone.broken.test.")
    with pytest.raises(ResolutionFailed):
        await _resolver(fake_dns, address_types=("A",)).resolve(Target("broken.test", None, "udp"))


async def test_srv_dot_target_means_no_service(fake_dns: Any) -> None:
    fake_dns.add("_sip._udp.none.test", "SRV", "0 0 0 .")
    with pytest.raises(ResolutionFailed):
        await _resolver(fake_dns, address_types=("A",)).resolve(Target("none.test", None, "udp"))


async def test_cached_answers_are_served_without_a_coroutine(fake_dns: Any) -> None:
    """resolve_cached (the engine's path for every request) gives what resolve() gives once the
    records are cached and fresh, None while one must be fetched, and asks no server."""
    fake_dns.add("_sip._tcp.pbx.test", "SRV", "10 0 5070 a.pbx.test.")
    fake_dns.add("a.pbx.test", "A", "127.0.0.21")
    fake_dns.add("plain.test", "A", "127.0.0.22")
    now = [0.0]
    resolver = _resolver(fake_dns, address_types=("A",), clock=lambda: now[0])
    srv_target, port_target = Target("pbx.test", None, "tcp"), Target("plain.test", 5080, "udp")
    assert resolver.resolve_cached(Target("127.0.0.7", None, "tls")) == [
        Destination("tls", "127.0.0.7", 5061)
    ]
    assert resolver.resolve_cached(srv_target) is None
    assert resolver.resolve_cached(port_target) is None
    assert fake_dns.queries == []
    via_srv = await resolver.resolve(srv_target)
    direct = await resolver.resolve(port_target)
    asked = len(fake_dns.queries)
    assert resolver.resolve_cached(srv_target) == via_srv
    assert (
        resolver.resolve_cached(port_target)
        == direct
        == [Destination("udp", "127.0.0.22", 5080, None, "plain.test")]
    )
    assert len(fake_dns.queries) == asked
    now[0] += 4000.0  # past every TTL (max_ttl is 3600 s)
    assert resolver.resolve_cached(srv_target) is None
    assert resolver.resolve_cached(port_target) is None
