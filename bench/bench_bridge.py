"""One bridged call after another through a real sbc, in one process: deterministic call cost.

Run from the repository root (``PYTHONPATH`` naming the checkout to measure):

    python bench/bench_bridge.py [--calls 500] [--warmup 50] [--repeat 3] [--log-level info]
    python bench/bench_bridge.py --calls 300 --profile          # function calls per call
    python bench/bench_bridge.py --calls 300 --profile --profile-out /tmp/p   # pstats file
    for n in 200 400; do                                       # instructions per call
      PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \\
        python bench/bench_bridge.py --calls $n --repeat 1 2>&1 | grep Collected
    done                                                       # (cg.400 - cg.200) / 200

What runs, all on one event loop (uvloop when installed, as ``sbc run``): the whole sbc service
(``Service``: engine, edge guard, call manager, pass-through media, call records in a temporary
SQLite file, logging at ``--log-level`` as JSON lines to /dev/null, the metrics), configured as
``bench_calls.py`` configures it, on real loopback sockets; and two peers that write SIP by
hand from templates, so that they cost little and share no code with sbc: the 3CX side (UDP,
127.0.0.71: answers sbc's REGISTER 200, then places the calls of ``pbx_caller.xml``: INVITE
with SDP, ACK of the 200, BYE at once) and Retell (TCP, 127.0.0.73: answers each INVITE 200
with SDP, takes the ACK, answers the BYE 200, as ``retell_uas.xml``). Calls go one at a time:
each message is handled alone, so a run is repeatable to a few instructions per call and a
change to any layer of the call path shows in the A/B figures without the noise of SIPp and
of a machine shared with other work.

Printed per call: CPU of the process (the peers' share included: the same for every version of
sbc), wall time, and with ``--profile`` the Python function calls (all, and those in ``sbc/``).
The messages are the eleven of ``bench_calls.py``: five in (INVITE, ACK and BYE from 3CX over
UDP, Retell's two 200s over TCP), six out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from inspect import signature
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_calls import free_port, sbc_config  # noqa: E402

PBX = "127.0.0.71"
SBC = "127.0.0.72"
RETELL = "127.0.0.73"
EXTENSION = "101"

INVITE = (
    "INVITE sip:{ext}@{sbc}:{sbc_port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {pbx}:{pbx_port};branch=z9hG4bK-{n}-1;rport\r\n"
    "Record-Route: <sip:{pbx}:{pbx_port};lr>\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice Smith" <sip:4155550123@{pbx}:{pbx_port}>;tag={n}pbx\r\n'
    "To: <sip:{ext}@{sbc}:{sbc_port}>\r\n"
    "Call-ID: {n}-bench@{pbx}\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:3cx@{pbx}:{pbx_port};transport=udp>\r\n"
    "User-Agent: 3CXPhoneSystem 18.0.9.20 (20)\r\n"
    "Supported: replaces, timer\r\n"
    "Allow: INVITE, ACK, CANCEL, BYE, REFER, INFO, UPDATE, NOTIFY\r\n"
    "P-Asserted-Identity: <sip:4155550123@pbx.example>\r\n"
    "X-3CX-Queue: 800\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{sdp}"
)
PBX_SDP = (
    "v=0\r\no=3cxPS 1 1 IN IP4 {pbx}\r\ns=3cxPS Audio call\r\nc=IN IP4 {pbx}\r\nt=0 0\r\n"
    "m=audio 9000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
)
IN_DIALOG = (
    "{method} {target} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {pbx}:{pbx_port};branch=z9hG4bK-{n}-{cseq};rport\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice Smith" <sip:4155550123@{pbx}:{pbx_port}>;tag={n}pbx\r\n'
    "{to}\r\n"
    "Call-ID: {n}-bench@{pbx}\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Content-Length: 0\r\n\r\n"
)
RETELL_SDP = (
    "v=0\r\no=- 7 7 IN IP4 {retell}\r\ns=-\r\nc=IN IP4 {retell}\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n"
)

_COPIED = re.compile(r"^(?:Via|v|From|f|To|t|Call-ID|i|CSeq):.*$", re.IGNORECASE | re.MULTILINE)
_TO = re.compile(r"^(?:To|t):.*$", re.IGNORECASE | re.MULTILINE)
_CALL_ID = re.compile(r"^(?:Call-ID|i):\s*(\S+)", re.IGNORECASE | re.MULTILINE)
_CSEQ = re.compile(r"^CSeq:\s*\d+\s+(\w+)", re.IGNORECASE | re.MULTILINE)
_CONTACT = re.compile(r"^(?:Contact|m):[^<]*<([^>]+)>", re.IGNORECASE | re.MULTILINE)
_LENGTH = re.compile(r"^(?:Content-Length|l):\s*(\d+)", re.IGNORECASE | re.MULTILINE)


def answer(request: str, status: str, extra: str = "", body: str = "") -> bytes:
    """A response copying the request's Via, From, To, Call-ID and CSeq fields."""
    copied = "\r\n".join(m.group(0).rstrip("\r") for m in _COPIED.finditer(request))
    head = f"SIP/2.0 {status}\r\n{copied}\r\n{extra}"
    if body:
        head += "Content-Type: application/sdp\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()


class Pbx(asyncio.DatagramProtocol):
    """3CX: registrar (every REGISTER 200) and caller, one UDP socket."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.registered = asyncio.Event()
        self.waiting: dict[tuple[str, str], asyncio.Future[str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        text = data.decode()
        if text.startswith("REGISTER "):
            contact = _CONTACT.search(text)
            extra = f"Contact: <{contact.group(1)}>;expires=3600\r\n" if contact else ""
            assert self.transport is not None
            self.transport.sendto(answer(text, "200 OK", extra), addr)
            self.registered.set()
            return
        if not text.startswith("SIP/2.0 "):
            return
        status = int(text[8:11])
        call_id, method = _CALL_ID.search(text), _CSEQ.search(text)
        if status < 200 or call_id is None or method is None:
            return
        future = self.waiting.pop((call_id.group(1), method.group(1)), None)
        if future is not None and not future.done():
            future.set_result(text)

    async def request(self, data: str, call_id: str, method: str, sbc: tuple[str, int]) -> str:
        future = asyncio.get_running_loop().create_future()
        self.waiting[(call_id, method)] = future
        assert self.transport is not None
        self.transport.sendto(data.encode(), sbc)
        return await asyncio.wait_for(future, 10.0)


class Retell(asyncio.Protocol):
    """Retell's SIP server on one TCP connection: 200 to INVITE (SDP) and BYE."""

    # Requests seen by method, over every connection (the bench checks each call's ACK and BYE).
    seen: dict[str, int] = {}

    def __init__(self, port: int, transport: str = "tcp") -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.contact = f"Contact: <sip:retell@{RETELL}:{port};transport={transport}>\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode()
            length = _LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.request(head.lstrip("\r\n"))

    def request(self, head: str) -> None:
        assert self.transport is not None
        method = head.split(" ", 1)[0]
        self.seen[method] = self.seen.get(method, 0) + 1
        if head.startswith("INVITE "):
            response = answer(
                _TO.sub(lambda m: m.group(0).rstrip("\r") + ";tag=retell", head, count=1),
                "200 OK",
                self.contact,
                RETELL_SDP.format(retell=RETELL),
            )
            self.transport.write(response)
        elif head.startswith("BYE "):
            self.transport.write(answer(head, "200 OK"))


class RetellUdp(asyncio.DatagramProtocol):
    """Retell's SIP server over UDP (``--retell udp``): the same answers as :class:`Retell`, each
    datagram one request, each answer one datagram back to where the request came from."""

    def __init__(self, port: int) -> None:
        self.answers = Retell(port, "udp")
        self.answers.transport = self  # type: ignore[assignment]  # its write() comes here
        self.udp: asyncio.DatagramTransport | None = None
        self.peer: tuple[Any, ...] = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.peer = addr
        self.answers.request(data.split(b"\r\n\r\n", 1)[0].decode())

    def write(self, response: bytes) -> None:
        assert self.udp is not None
        self.udp.sendto(response, self.peer)


def write_config(
    workdir: Path,
    sip_port: int,
    pbx_port: int,
    retell_port: int,
    level: str,
    retell: str = "tcp",
    retell_socket: bool = False,
) -> Path:
    admin_port = free_port(SBC, udp_too=False)
    config = workdir / "sbc.toml"
    text = sbc_config(
        sip_port,
        pbx_port,
        retell_port,
        admin_port,
        level,
        records=workdir / "calls.sqlite3",
        pbx=PBX,
        bind=SBC,
        retell=RETELL,
        retell_transport=retell,
        script="bench/bench_bridge.py",
    )
    if retell_socket:
        # Retell's own UDP socket, on a port the kernel picks (retell.local_udp_port = 0).
        text = text.replace("[retell]\n", "[retell]\nlocal_udp_port = 0\n", 1)
    config.write_text(text)
    return config


async def run(
    calls: int,
    warmup: int,
    repeat: int,
    level: str,
    profile: bool,
    log: TextIO,
    retell: str = "tcp",
    retell_socket: bool = False,
) -> None:
    from sbc.ops.logging import configure_logging
    from sbc.ops.service import Service
    from sbc.ops.settings import load_settings

    loop = asyncio.get_running_loop()
    Retell.seen = {}
    sip_port = free_port(SBC)  # sbc listens on it over UDP and TCP
    pbx_port = free_port(PBX)
    retell_port = free_port(RETELL, udp_too=retell == "udp")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp), sip_port, pbx_port, retell_port, level, retell, retell_socket
        )
        settings = load_settings(config)
        # As `sbc run` sets it up (lines batched per loop pass, where the checkout has that).
        batched = {"batched": True} if "batched" in signature(configure_logging).parameters else {}
        configure_logging(settings.log.level, settings.log.format, stream=log, **batched)
        pbx = Pbx()
        await loop.create_datagram_endpoint(lambda: pbx, local_addr=(PBX, pbx_port))
        server: asyncio.Server | None = None
        retell_udp: asyncio.DatagramTransport | None = None
        retell_protocol: RetellUdp | None = None
        if retell == "udp":
            retell_protocol = RetellUdp(retell_port)
            retell_udp, _ = await loop.create_datagram_endpoint(
                lambda: retell_protocol, local_addr=(RETELL, retell_port)
            )
        else:
            server = await loop.create_server(lambda: Retell(retell_port), RETELL, retell_port)
        service = Service(settings)
        await service.start()
        try:
            await asyncio.wait_for(pbx.registered.wait(), 10.0)
            numbers = itertools.count(1)
            sbc = (SBC, sip_port)

            async def one_call() -> None:
                n = next(numbers)
                fields = {"pbx": PBX, "pbx_port": pbx_port, "n": n}
                call_id = f"{n}-bench@{PBX}"
                sdp = PBX_SDP.format(**fields)
                invite = INVITE.format(
                    ext=EXTENSION, sbc=SBC, sbc_port=sip_port, length=len(sdp), sdp=sdp, **fields
                )
                ok = await pbx.request(invite, call_id, "INVITE", sbc)
                if not ok.startswith("SIP/2.0 200"):
                    raise RuntimeError(f"call {n}: {ok.splitlines()[0]}")
                to = _TO.search(ok)
                contact = _CONTACT.search(ok)
                assert to is not None and contact is not None
                in_dialog = {"target": contact.group(1), "to": to.group(0).rstrip("\r"), **fields}
                ack = IN_DIALOG.format(method="ACK", cseq=1, **in_dialog)
                assert pbx.transport is not None
                pbx.transport.sendto(ack.encode(), sbc)
                bye = IN_DIALOG.format(method="BYE", cseq=2, **in_dialog)
                done = await pbx.request(bye, call_id, "BYE", sbc)
                if not done.startswith("SIP/2.0 200"):
                    raise RuntimeError(f"call {n}: BYE {done.splitlines()[0]}")

            for _ in range(warmup):
                await one_call()
            await service.wait_settled()
            results = []
            arms = getattr(service.engine.stats, "timer_arms", None)
            for _ in range(repeat):
                gc.collect()
                profiler = None
                if profile:
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    await one_call()
                # The last call's BYE to Retell may still be on its way (3CX had its 200).
                await asyncio.wait_for(service.bridge.wait_idle(), 10.0)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if profiler is not None:
                    profiler.disable()
                    report(profiler, calls)
                results.append((1e6 * cpu / calls, 1e6 * wall / calls))
            active = service.bridge.active
            if arms is not None:
                arms = (service.engine.stats.timer_arms - arms) / (calls * repeat)
            transport_stats = service.engine.transports.stats
            if retell_protocol is not None and retell_socket == (
                retell_protocol.peer[1] == sip_port
            ):
                raise RuntimeError(f"Retell's requests came from {retell_protocol.peer}")
        finally:
            await service.stop()
            if server is not None:
                server.close()
            if retell_udp is not None:
                retell_udp.close()
            assert pbx.transport is not None
            pbx.transport.close()
    if active:
        raise RuntimeError(f"{active} calls still active after the run")
    placed = warmup + calls * repeat
    expected = {"INVITE": placed, "ACK": placed, "BYE": placed}
    connections = 0 if retell == "udp" else 1
    if Retell.seen != expected or transport_stats.connections_opened != connections:
        raise RuntimeError(
            f"Retell saw {Retell.seen}, expected {expected}; sbc opened "
            f"{transport_stats.connections_opened} connections to it (one is reused)"
        )
    if arms is not None:
        # Loop timers the engine armed for its transaction layer (EngineStats.timer_arms).
        print(f"engine loop timers armed per call: {arms:.2f}")
    cpus = [c for c, _ in results]
    walls = [w for _, w in results]
    print(
        f"{calls} calls x {repeat} runs, log level {level}: CPU per call best "
        f"{min(cpus):.0f} us, median {statistics.median(cpus):.0f} us; wall per call best "
        f"{min(walls):.0f} us, median {statistics.median(walls):.0f} us"
    )


# Where --profile-out asks the profile to be written (pstats format), for a per-function look.
PROFILE_OUT = ""


def report(profiler: Any, calls: int) -> None:
    import pstats

    stats = pstats.Stats(profiler)
    if PROFILE_OUT:
        stats.dump_stats(PROFILE_OUT)
    total = ours = 0
    for (filename, _, _), (primitive, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        total += primitive
        if f"{os.sep}sbc{os.sep}" in filename:
            ours += primitive
    print(f"function calls per call: {total / calls:.1f} (in sbc/: {ours / calls:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--profile", action="store_true", help="count function calls (cProfile)")
    parser.add_argument("--profile-out", default="", help="with --profile: write the stats here")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument(
        "--retell", default="tcp", choices=("tcp", "udp"), help="sbc's transport to Retell"
    )
    parser.add_argument(
        "--retell-socket",
        action="store_true",
        help="with --retell udp: sbc's requests to Retell leave from a UDP socket of their own",
    )
    args = parser.parse_args()
    global PROFILE_OUT
    PROFILE_OUT = args.profile_out
    with open(os.devnull, "w") as log:  # written line by line, as to a log file
        coro = run(
            args.calls,
            args.warmup,
            args.repeat,
            args.log_level,
            args.profile,
            log,
            args.retell,
            args.retell_socket,
        )
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)


if __name__ == "__main__":
    main()
