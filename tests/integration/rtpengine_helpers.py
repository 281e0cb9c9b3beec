"""A real rtpengine daemon for integration tests, started and stopped by the test itself.

:func:`running_rtpengine` starts Debian's ``rtpengine`` in userspace only (``--table=-1``, no
kernel module) in the foreground on one loopback address, without the system's configuration
file: its NG control socket on a free UDP port of that address (its only control socket), RTP
on a private port range of that address, calls deleted at once (``--delete-delay=0``); several
can run at once. It returns once the daemon answers an NG ``ping`` (bounded polling: a
receive timeout per try, no fixed sleep) and terminates it on exit. A missing binary fails the
test on CI (``CI=true``) and skips it elsewhere (``peers.require_binary``).

A test module uses it through a module-scoped fixture of its own, for instance::

    @pytest.fixture(scope="module")
    def rtpengine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rtpengine]:
        with running_rtpengine("127.0.0.71", tmp_path_factory.mktemp("rtpengine")) as daemon:
            yield daemon
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peers import free_port, require_binary

__all__ = ["Rtpengine", "ping_until_up", "port_range", "running_rtpengine"]

PING_TRIES = 100  # ~10 s at most: each try waits PING_WAIT for the pong
PING_WAIT = 0.1
# RTP port ranges come from below Linux's ephemeral range (32768-60999), so no socket the
# kernel numbers by itself can sit in them.
RANGE_FLOOR, RANGE_CEILING = 10000, 32000


@dataclass(frozen=True)
class Rtpengine:
    """A running daemon: ``ng`` is its NG control socket, RTP ports are port_min..port_max."""

    process: subprocess.Popen[bytes]
    host: str
    ng_port: int
    port_min: int
    port_max: int
    log_path: Path

    @property
    def ng(self) -> tuple[str, int]:
        return (self.host, self.ng_port)

    @property
    def listen(self) -> str:
        """``host:port`` as ``[media] rtpengine`` takes it."""
        return f"{self.host}:{self.ng_port}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _bindable(host: str, ports: range) -> bool:
    with contextlib.ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def port_range(host: str, size: int = 200) -> tuple[int, int]:
    """An even-based range of ``size`` UDP ports all free on ``host`` right now, outside the
    ephemeral range; where it starts depends on the host and the process, so modules and
    parallel runs rarely probe the same one."""
    slots = (RANGE_CEILING - RANGE_FLOOR) // size
    first = (int(host.rsplit(".", 1)[-1]) * 7 + os.getpid()) % slots
    for step in range(slots):
        low = RANGE_FLOOR + ((first + step) % slots) * size
        if _bindable(host, range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError(
        f"no {size} free UDP ports on {host} between {RANGE_FLOOR} and {RANGE_CEILING}"
    )


def ping_until_up(address: tuple[str, int], process: subprocess.Popen[bytes]) -> None:
    """Send NG ``ping`` until rtpengine answers ``pong`` (bounded: PING_TRIES tries, each
    waiting PING_WAIT seconds for the reply); RuntimeError if it exits or never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(PING_WAIT)
        for attempt in range(PING_TRIES):
            if process.poll() is not None:
                raise RuntimeError(f"rtpengine exited with {process.returncode}")
            cookie = b"up%d" % attempt
            try:
                sock.sendto(cookie + b" d7:command4:pinge", address)
                data, _ = sock.recvfrom(4096)
            except OSError:  # the timeout, or ICMP unreachable while it is not yet listening
                continue
            if data.startswith(cookie + b" ") and b"pong" in data:
                return
    raise RuntimeError(f"rtpengine did not answer ping within {PING_TRIES} tries")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def running_rtpengine(host: str, log_dir: Path, *, ports: int = 200) -> Iterator[Rtpengine]:
    """rtpengine on ``host`` (a 127.0.0.x address), up and answering ``ping`` inside the block,
    stopped after it. Its stdout/stderr go to ``log_dir/rtpengine.log``."""
    binary = require_binary("rtpengine")
    ng_port = free_port(host)
    low, high = port_range(host, ports)
    log_path = log_dir / "rtpengine.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                # Not /etc/rtpengine/rtpengine.conf: it opens CLI and HTTP ports on fixed
                # addresses (localhost:2224/2225), which two daemons cannot share.
                "--config-file=none",
                "--foreground",
                "--log-stderr",
                "--table=-1",  # userspace only: no kernel forwarding table
                f"--interface={host}",
                f"--listen-ng={host}:{ng_port}",
                f"--port-min={low}",
                f"--port-max={high}",
                "--delete-delay=0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                ping_until_up((host, ng_port), process)
            except RuntimeError as exc:
                log.flush()
                raise RuntimeError(
                    f"{exc}; its log:\n{log_path.read_text(errors='replace')}"
                ) from exc
            yield Rtpengine(process, host, ng_port, low, high, log_path)
        finally:
            _stop(process)


@dataclass(frozen=True)
class Media:
    """How sbc carries RTP in a test: its own relay (on ``relay_host``), or an rtpengine."""

    relay_host: str
    mode: Literal["relay", "rtpengine"] = "relay"
    rtpengine: Rtpengine | None = None

    @property
    def host(self) -> str:
        """The address the phones see in SDP and get RTP from."""
        return self.relay_host if self.rtpengine is None else self.rtpengine.host
