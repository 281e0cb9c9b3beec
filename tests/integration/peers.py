"""Plain helpers shared by the integration tests: free loopback ports, required binaries and a
fake DNS server. Imported by bare name (``from peers import free_port``), as pytest puts this
folder on ``sys.path``; the fixtures that wrap them live in ``conftest.py``.

External peers (SIPp, rtpengine...) come from Debian packages. When one is missing the tests
that need it are skipped, except on CI (``CI=true``), where a missing binary fails them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
from typing import cast

import pytest

__all__ = ["FakeDns", "free_port", "require_binary"]


def require_binary(name: str) -> str:
    """Path of ``name``; fails the test on CI when missing, skips it elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is required on CI but not installed")
        pytest.skip(f"{name} not installed")
    return path


def require_pjsua2() -> None:
    """pjsua2 from PyPI (pjsua2-python); its absence fails on CI, skips elsewhere."""
    if importlib.util.find_spec("pjsua2") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("pjsua2 (pip install pjsua2-python) is required on CI but not installed")
        pytest.skip("pjsua2 not installed")


_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1", *, udp: bool = True) -> int:
    """A TCP port on ``host``, also free for UDP unless ``udp`` is False (never handed out
    twice in one run)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
            if (host, port) in _handed_out:
                continue
            try:
                if udp:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                        other.bind((host, port))
            except OSError:
                continue
        _handed_out.add((host, port))
        return port
    raise RuntimeError("no free port")


class FakeDns(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback for tests (conftest's ``fake_dns`` fixture).

    ``records[(name, type)] = (ttl, [rdata text...])``; names in ``silent`` get no answer at all
    (a dead resolver), names in ``servfail`` SERVFAIL; anything else is NXDOMAIN. ``queries``
    lists what was asked.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.silent: set[str] = set()
        self.servfail: set[str] = set()  # names answered SERVFAIL (a broken upstream)
        self.queries: list[tuple[str, str]] = []
        self.queried = asyncio.Event()  # set on every query
        self.transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("", 0)

    def add(self, name: str, rdtype: str, *rdata: str, ttl: int = 300) -> None:
        self.records[(name.lower().rstrip("."), rdtype)] = (ttl, list(rdata))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        self.queried.set()
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        found = self.records.get((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif found is not None:
            ttl, rdata = found
            response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *rdata))
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)
