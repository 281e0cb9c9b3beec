"""The edge guard: who may talk to sbc, and how fast (Kamailio's pike, reduced to what sbc needs).

Every datagram and every inbound connection is judged by its source address before anything is
parsed, so what hostile traffic costs is a dict lookup and a little arithmetic:

* **trusted** sources (``pbx.trusted``, ``retell.trusted``) and **peers** (addresses sbc itself
  sent a request to: a DNS-resolved next hop, the registrar, a dialog's remote target) get
  through. Their out-of-dialog requests are limited per source by a token bucket of their own
  (``trusted_rate_limit`` per ``rate_window``); above it such requests are dropped, in-dialog
  requests and responses never are, and a trusted source is never banned: a PBX burst cannot
  cut the calls it has in progress.
* every other source is **untrusted**: each datagram or connection from it takes a token from its
  bucket (``rate_limit`` per ``rate_window``); the one that finds the bucket empty bans the
  source for ``ban_time`` (logged once, counted). In ``drop`` mode nothing from it is ever
  answered; in ``reject`` mode its requests are answered 403 until it is banned, then dropped.
  Either way the answer does not depend on what was probed (method, user, extension).
* a global token bucket caps the rate of new calls (INVITEs outside a dialog, from anyone
  admitted); above it they are answered 503 with Retry-After by the engine.

Memory is bounded: at most ``max_sources`` sources are tracked; when the table is full, the
sources neither banned nor heard from within ``rate_window`` are forgotten (then, if needed, all
but the newest bans). The clock is
injected (``clock``), so the unit tests drive it by hand.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import structlog

log = structlog.get_logger(__name__)

__all__ = [
    "ADMIT",
    "DROP",
    "REJECT",
    "Guard",
    "GuardConfig",
    "GuardStats",
    "TokenBucket",
]

Network = IPv4Network | IPv6Network

# Verdicts of Guard.request_verdict.
ADMIT = 0
DROP = 1
REJECT = 2

# Per-source state: [tokens, last refill, banned until, flags], four C doubles in an array. Not
# a list of floats: each update made a new float kept by the list, and those of a trusted source
# (3CX: every new call) were made to the last moments of a burst of calls and alive after it, in
# the arenas the burst took, which Python's allocator then could not give back (docs/
# performance.md, Round 8: idle). An array keeps the numbers, no object.
_TOKENS, _LAST, _BANNED, _FLAGS = 0, 1, 2, 3
_TRUSTED = 1  # the source is trusted or a peer (never banned; own limit on new requests)
_LIMITED = 2  # a trusted source's limit was hit and logged; cleared when it is under again
_PEERS_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The guard's settings (``[security]`` plus the trusted networks, mapped by the service)."""

    trusted: tuple[Network, ...] = ()
    untrusted: str = "drop"  # "drop" | "reject" (403)
    rate_limit: int = 30  # requests per rate_window from one untrusted source
    trusted_rate_limit: int = 1000  # out-of-dialog requests per rate_window from a trusted one
    rate_window: float = 2.0
    ban_time: float = 60.0
    max_sources: int = 10_000
    new_call_rate: float = 250.0  # new calls per second, all sources together; 0: no cap
    new_call_burst: int = 500
    new_call_retry_after: int = 2


@dataclass(slots=True)
class GuardStats:
    """Counters for the metrics endpoint."""

    dropped_untrusted: int = 0  # from an untrusted source that is not banned (drop mode)
    dropped_banned: int = 0  # from a banned source
    dropped_trusted_rate: int = 0  # a trusted source's out-of-dialog request above its limit
    rejected: int = 0  # untrusted requests answered 403 (reject mode)
    connections_refused: int = 0
    bans: int = 0
    new_calls_limited: int = 0  # INVITEs answered 503 for the global new-call cap
    evicted: int = 0  # sources forgotten because the table was full


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one if there is one."""

    __slots__ = ("burst", "rate", "state")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        # [tokens, last]: C doubles, no float object kept per take (as a source's state above).
        self.state = array("d", (burst, now))

    def take(self, now: float) -> bool:
        state = self.state
        tokens = state[0] + (now - state[1]) * self.rate
        state[1] = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            state[0] = tokens
            return False
        state[0] = tokens - 1.0
        return True


@dataclass(slots=True)
class _Classifier:
    """Source address -> trusted?, with the networks split by family (no ipaddress objects on
    the way: an IPv4 source is one int compared against (network, mask) pairs)."""

    v4: tuple[tuple[int, int], ...]
    v6: tuple[Network, ...]

    @classmethod
    def of(cls, networks: Iterable[Network]) -> _Classifier:
        v4 = []
        v6 = []
        for net in networks:
            if net.version == 4:
                v4.append((int(net.network_address), int(net.netmask)))
            else:
                v6.append(net)
        return cls(tuple(v4), tuple(v6))

    def trusted(self, host: str) -> bool:
        if ":" not in host:
            # The common case, about 4x cheaper than ipaddress (a spoofed-source flood pays
            # this once per new address).
            try:
                value = int.from_bytes(socket.inet_aton(host), "big")
            except OSError:
                return False
            for net, mask in self.v4:  # noqa: SIM110 (a loop: cheaper than any() over a genexpr)
                if value & mask == net:
                    return True
            return False
        try:
            address = ipaddress.ip_address(host.strip("[]").split("%")[0])
        except ValueError:
            return False
        if not isinstance(address, ipaddress.IPv6Address):
            return False  # not reached: text with a colon never parses as IPv4
        mapped = address.ipv4_mapped
        if mapped is not None:
            value = int(mapped)
            return any(value & mask == net for net, mask in self.v4)
        return any(address in net for net in self.v6)


class Guard:
    """Source-address admission, per-source rate limits and bans, the new-call cap."""

    def __init__(self, config: GuardConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.stats = GuardStats()
        self._clock = clock
        self._classifier = _Classifier.of(config.trusted)
        self.reject = config.untrusted == "reject"
        self._rate = config.rate_limit / config.rate_window
        self._burst = float(config.rate_limit)
        self._trusted_rate = config.trusted_rate_limit / config.rate_window
        self._trusted_burst = float(config.trusted_rate_limit)
        # host -> [tokens, last, banned_until, flags]; insertion order is age (eviction).
        self._sources: dict[str, array[float]] = {}
        # Addresses sbc sent a request to (host -> True), oldest first.
        self._peers: dict[str, bool] = {}
        self._calls = (
            TokenBucket(config.new_call_rate, float(config.new_call_burst), clock())
            if config.new_call_rate > 0
            else None
        )

    # -- the edge ----------------------------------------------------------------------------
    def admit_datagram(self, host: str) -> bool:
        """Before parsing: may a datagram from ``host`` be parsed at all? Trusted sources and
        peers always; an untrusted one in reject mode while not banned (its request is then
        answered 403); nothing else."""
        state = self._sources.get(host)
        if state is None:
            state = self._new_source(host)
        if state[_FLAGS]:
            return True
        return self._untrusted_event(host, state)

    def admit_connection(self, host: str) -> bool:
        """An inbound TCP/TLS connection from ``host``: refused (closed at once) when
        :meth:`admit_datagram` would drop a datagram from it."""
        if self.admit_datagram(host):
            return True
        self.stats.connections_refused += 1
        return False

    def request_verdict(self, host: str, *, counted: bool, new: bool) -> int:
        """After parsing a request from ``host``: :data:`ADMIT`, :data:`DROP` or :data:`REJECT`
        (403). ``counted``: :meth:`admit_datagram` already spent a token for it (UDP);
        ``new``: it is outside any dialog and not an ACK or CANCEL (what a trusted source's
        limit applies to)."""
        state = self._sources.get(host)
        if state is None:
            state = self._new_source(host)
        if state[_FLAGS]:
            if not new:
                return ADMIT
            return ADMIT if self._trusted_take(host, state) else DROP
        if not counted and not self._untrusted_event(host, state):
            return DROP
        if not self.reject:
            # Not reached through the transports (admit_datagram dropped such a datagram);
            # the verdict still must not rest on the caller's bookkeeping.
            return DROP
        self.stats.rejected += 1
        return REJECT

    def new_call_allowed(self) -> bool:
        """One token of the global new-call cap; False: answer 503 with Retry-After."""
        bucket = self._calls
        if bucket is None or bucket.take(self._clock()):
            return True
        self.stats.new_calls_limited += 1
        return False

    def note_peer(self, host: str) -> None:
        """sbc sent a request to ``host``: its answers (and its requests) are let in."""
        peers = self._peers
        if host in peers:
            return
        if len(peers) >= _PEERS_LIMIT:
            del peers[next(iter(peers))]
        peers[host] = True
        state = self._sources.get(host)
        if state is not None and not state[_FLAGS]:
            del self._sources[host]  # re-classified as a peer on its next message

    # -- introspection (metrics, tests) ----------------------------------------------------------
    def is_trusted(self, host: str) -> bool:
        return host in self._peers or self._classifier.trusted(host)

    def banned(self) -> int:
        """Sources banned right now (counted when scraped, not kept up to date)."""
        now = self._clock()
        return sum(1 for s in list(self._sources.values()) if s[_BANNED] > now)

    def is_banned(self, host: str) -> bool:
        state = self._sources.get(host)
        return state is not None and state[_BANNED] > self._clock()

    @property
    def tracked(self) -> int:
        return len(self._sources)

    # -- internals --------------------------------------------------------------------------
    def _new_source(self, host: str) -> array[float]:
        sources = self._sources
        if len(sources) >= self.config.max_sources:
            self._make_room()
        trusted = host in self._peers or self._classifier.trusted(host)
        burst = self._trusted_burst if trusted else self._burst
        state = array("d", (burst, self._clock(), 0.0, _TRUSTED if trusted else 0))
        sources[host] = state
        return state

    def _untrusted_event(self, host: str, state: array[float]) -> bool:
        """One datagram, connection or stream request from an untrusted source: a token from
        its bucket, the ban when there is none. True when it may be answered (reject mode)."""
        now = self._clock()
        if state[_BANNED]:
            if now < state[_BANNED]:
                self.stats.dropped_banned += 1
                return False
            state[_BANNED] = 0.0  # the ban expired: a full bucket again
            state[_TOKENS] = self._burst
            state[_LAST] = now
        tokens = state[_TOKENS] + (now - state[_LAST]) * self._rate
        state[_LAST] = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < 1.0:
            state[_TOKENS] = tokens
            state[_BANNED] = now + self.config.ban_time
            self.stats.bans += 1
            self.stats.dropped_banned += 1
            log.warning(
                "source_banned",
                source=host,
                seconds=self.config.ban_time,
                limit=self.config.rate_limit,
                window=self.config.rate_window,
            )
            return False
        state[_TOKENS] = tokens - 1.0
        if self.reject:
            return True
        self.stats.dropped_untrusted += 1
        return False

    def _trusted_take(self, host: str, state: array[float]) -> bool:
        now = self._clock()
        tokens = state[_TOKENS] + (now - state[_LAST]) * self._trusted_rate
        state[_LAST] = now
        if tokens > self._trusted_burst:
            tokens = self._trusted_burst
        if tokens < 1.0:
            state[_TOKENS] = tokens
            self.stats.dropped_trusted_rate += 1
            if not int(state[_FLAGS]) & _LIMITED:
                state[_FLAGS] = _TRUSTED | _LIMITED
                log.warning(
                    "trusted_source_rate_limited",
                    source=host,
                    limit=self.config.trusted_rate_limit,
                    window=self.config.rate_window,
                )
            return False
        state[_TOKENS] = tokens - 1.0
        if int(state[_FLAGS]) & _LIMITED:
            state[_FLAGS] = _TRUSTED
        return True

    def _make_room(self) -> None:
        """The table is full: keep the sources banned or heard from within the last
        rate_window; if that is still more than half the cap, only the banned ones (the newest
        half of the cap at most). The table is rebuilt at once, so that a spray of new addresses
        pays one pass over it per max_sources/2 new sources, not one each."""
        now = self._clock()
        window = self.config.rate_window
        sources = self._sources
        half = self.config.max_sources // 2
        kept = {h: s for h, s in sources.items() if s[_BANNED] > now or now - s[_LAST] < window}
        if len(kept) > half:
            kept = {h: s for h, s in kept.items() if s[_BANNED] > now}
            if len(kept) > half:
                kept = dict(list(kept.items())[-half:])
        self.stats.evicted += len(sources) - len(kept)
        self._sources = kept
