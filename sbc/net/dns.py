"""Locating SIP servers (RFC 3263) with dnspython's asynchronous resolver.

``resolve`` turns a :class:`~sbc.net.addresses.Target` into an ordered list of
:class:`~sbc.net.addresses.Destination`; the engine tries them in turn (RFC 3263 §4.3). NAPTR is
not consulted: the transport always comes from the URI or the configuration (RFC 3263 §4.1 lets a
client that knows its transport skip it). Answers are cached for their TTL, concurrent lookups of
one name share one query, and a whole resolution is bounded by ``timeout`` so that a dead resolver
fails one call quickly and never holds up another.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

from sbc.net.addresses import DEFAULT_PORTS, Destination, Target, ip_literal, make_destination

log = structlog.get_logger(__name__)

# RFC 3263 §4.2: the SRV service label for each transport.
SRV_PREFIX = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}


class ResolutionFailed(Exception):
    """No address for a target: the name does not exist, has no records, or the lookup timed out."""


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(slots=True)
class _Entry:
    expires: float
    records: tuple[Any, ...]


class Resolver:
    """RFC 3263 server location with a TTL cache.

    ``resolver`` is a ``dns.asyncresolver.Resolver`` (or anything with its ``resolve``); by
    default one configured from ``/etc/resolv.conf``. ``address_types`` limits the families
    asked for (an IPv4-only socket has no use for AAAA records).
    """

    def __init__(
        self,
        *,
        resolver: Any | None = None,
        timeout: float = 3.0,
        negative_ttl: float = 30.0,
        max_ttl: float = 3600.0,
        address_types: Sequence[str] = ("A", "AAAA"),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver if resolver is not None else dns.asyncresolver.Resolver()
        self.timeout = timeout
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl
        self._address_types = tuple(address_types)
        self._clock = clock
        self._rng = rng or random.Random()
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[tuple[Any, ...]]] = {}
        self.queries = 0

    async def resolve(self, target: Target) -> list[Destination]:
        """Every destination for ``target``, in the order to try them.

        A literal IP needs no lookup; an explicit port means A/AAAA only (RFC 3263 §4.2);
        otherwise SRV records of the transport's service, ordered by priority and weight
        (RFC 2782), each target's addresses in turn, falling back to the host's own A/AAAA
        records on the transport's default port when there are no SRV records.
        Raises :class:`ResolutionFailed` when nothing resolves within ``timeout`` seconds.
        """
        literal = ip_literal(target.host)
        if literal is not None:
            port = target.port or DEFAULT_PORTS[target.transport]
            return [Destination(target.transport, literal, port)]
        name = target.host.rstrip(".") or target.host
        try:
            async with asyncio.timeout(self.timeout):
                return await self._resolve_name(target, name)
        except TimeoutError as exc:
            raise ResolutionFailed(f"DNS lookup of {target.host} timed out") from exc

    def resolve_cached(self, target: Target) -> list[Destination] | None:
        """What :meth:`resolve` returns when it needs no lookup (an IP literal, or every record
        it reads fresh in the cache), without a coroutine; None when a record must be fetched.

        The engine sends most requests through here: at call rates the records are always
        cached, and the coroutine path costs two tasks (the A and AAAA lookups are gathered)
        and a timeout per request. Raises :class:`ResolutionFailed` as :meth:`resolve` would.
        """
        literal = ip_literal(target.host)
        if literal is not None:
            port = target.port or DEFAULT_PORTS[target.transport]
            return [make_destination(target.transport, literal, port, None, None, None)]
        name = target.host.rstrip(".") or target.host
        out: list[Destination] = []
        if target.port is None:
            srv = self._fresh(f"{SRV_PREFIX[target.transport]}.{name}", "SRV")
            if srv is None:
                return None
            for record in self._order_srv(srv):
                addresses = self._fresh_addresses(record.target)
                if addresses is None:
                    return None
                for address in addresses:
                    out.append(Destination(target.transport, address, record.port, None, name))
            if srv:
                if not out:
                    raise ResolutionFailed(f"no address for the SRV targets of {name}")
                return out
        port = target.port or DEFAULT_PORTS[target.transport]
        addresses = self._fresh_addresses(name)
        if addresses is None:
            return None
        for address in addresses:
            out.append(Destination(target.transport, address, port, None, name))
        if not out:
            raise ResolutionFailed(f"no address for {name}")
        return out

    def _fresh(self, name: str, rdtype: str) -> tuple[Any, ...] | None:
        entry = self._cache.get((name.lower(), rdtype))
        if entry is not None and entry.expires > self._clock():
            return entry.records
        return None

    def _fresh_addresses(self, name: str) -> list[str] | None:
        out: list[str] = []
        for rdtype in self._address_types:
            records = self._fresh(name, rdtype)
            if records is None:
                return None
            out.extend(str(address) for address in records)
        return out

    async def _resolve_name(self, target: Target, name: str) -> list[Destination]:
        out: list[Destination] = []
        if target.port is None:
            srv = await self._lookup(f"{SRV_PREFIX[target.transport]}.{name}", "SRV")
            for record in self._order_srv(srv):
                for address in await self._addresses(record.target):
                    out.append(Destination(target.transport, address, record.port, None, name))
            if srv:
                if not out:
                    raise ResolutionFailed(f"no address for the SRV targets of {name}")
                return out
        port = target.port or DEFAULT_PORTS[target.transport]
        for address in await self._addresses(name):
            out.append(Destination(target.transport, address, port, None, name))
        if not out:
            raise ResolutionFailed(f"no address for {name}")
        return out

    async def _addresses(self, name: str) -> list[str]:
        results = await asyncio.gather(*(self._lookup(name, t) for t in self._address_types))
        return [str(address) for records in results for address in records]

    def _order_srv(self, records: tuple[Any, ...]) -> list[SrvRecord]:
        """RFC 2782: lowest priority first; within a priority, a weighted random order."""
        # RFC 2782: a target of "." means the service is decidedly not available.
        usable = [r for r in records if isinstance(r, SrvRecord) and r.target not in ("", ".")]
        out: list[SrvRecord] = []
        for priority in sorted({r.priority for r in usable}):
            group = [r for r in usable if r.priority == priority]
            # Zero-weight records first so that they get a small chance (RFC 2782).
            group.sort(key=lambda r: r.weight != 0)
            while group:
                total = sum(r.weight for r in group)
                pick = self._rng.randint(0, total)
                running = 0
                for i, r in enumerate(group):
                    running += r.weight
                    if running >= pick:
                        out.append(group.pop(i))
                        break
        return out

    async def _lookup(self, name: str, rdtype: str) -> tuple[Any, ...]:
        """Records of one type (strings for A/AAAA, SrvRecord for SRV), from cache when fresh."""
        key = (name.lower(), rdtype)
        entry = self._cache.get(key)
        if entry is not None and entry.expires > self._clock():
            return entry.records
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: one caller giving up must not cancel the query the others wait for.
        return await asyncio.shield(task)

    async def _query(self, name: str, rdtype: str) -> tuple[Any, ...]:
        self.queries += 1
        key = (name.lower(), rdtype)
        try:
            answer = await self._resolver.resolve(
                name, rdtype, lifetime=self.timeout, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self._cache[key] = _Entry(self._clock() + self._negative_ttl, ())
            return ()
        except dns.exception.Timeout as exc:
            raise ResolutionFailed(f"DNS {rdtype} lookup of {name} timed out") from exc
        except dns.exception.DNSException as exc:
            # No nameserver answered usefully (SERVFAIL, refused...): not cached.
            log.debug("dns_failed", name=name, rdtype=rdtype, error=str(exc))
            return ()
        rrset = answer.rrset
        if rrset is None:
            self._cache[key] = _Entry(self._clock() + self._negative_ttl, ())
            return ()
        records: tuple[Any, ...]
        if rdtype == "SRV":
            records = tuple(
                SrvRecord(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
                for r in rrset
            )
        else:
            records = tuple(r.address for r in rrset)
        ttl = min(float(rrset.ttl), self._max_ttl)
        self._cache[key] = _Entry(self._clock() + ttl, records)
        return records

    def clear(self) -> None:
        self._cache.clear()

    async def aclose(self) -> None:
        """Cancel lookups still in flight (the engine's ``stop``): no task outlives it."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()


def make_resolver(nameservers: Sequence[str], port: int = 53) -> Any:
    """A dnspython resolver that asks only ``nameservers`` on ``port`` (tests, fixed setups)."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = list(nameservers)
    resolver.port = port
    return resolver


__all__ = [
    "SRV_PREFIX",
    "ResolutionFailed",
    "Resolver",
    "SrvRecord",
    "make_resolver",
]
