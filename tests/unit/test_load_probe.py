"""bench/load.py's step probe: what it reports about a ramp step's processes and UDP sockets is
read from the kernel as it is (a real socket made to overflow here, this process's own CPU)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import ROOT, bench_script


@pytest.fixture(scope="module")
def load() -> ModuleType:
    return bench_script("load.py", "bench_load_probe")


def drain(receiver: socket.socket) -> int:
    """Read what waits in ``receiver`` without blocking; how many datagrams that was."""
    received = 0
    receiver.setblocking(False)
    while True:
        try:
            receiver.recv(2048)
        except BlockingIOError:
            return received
        received += 1


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    # The smallest receive buffer the kernel allows (it doubles what is asked, to a floor of
    # a few KiB): a burst that is not read overflows it at once.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_udp_sockets_sees_the_queue_and_the_drops_of_a_full_receive_buffer(
    load: ModuleType, receiver: socket.socket
) -> None:
    address = receiver.getsockname()
    assert load.udp_sockets()[address] == (0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(200):
            sender.sendto(b"x" * 500, address)
    queue, drops = load.udp_sockets()[address]
    assert queue > 0
    assert 0 < drops < 200
    # What was queued is still there to read: the drops are the rest of the burst.
    assert drain(receiver) + drops == 200
    assert load.udp_sockets()[address] == (0, drops)


def test_step_probe_reports_drops_during_the_step_and_cpu_per_process(
    load: ModuleType, receiver: socket.socket
) -> None:
    address = receiver.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(200):  # dropped before the probe: not the step's
            sender.sendto(b"x" * 500, address)
        before = load.udp_sockets()[address][1]
        assert before > 0
        drain(receiver)
        probe = load.StepProbe({"me": os.getpid()}, {"sock": address}, interval=0.01)
        for _ in range(200):
            sender.sendto(b"x" * 500, address)
        sum(i * i for i in range(200_000))  # some CPU of this process during the step
        where = probe.stop()
    dropped = load.udp_sockets()[address][1] - before
    assert where["udp_drops"] == {"sock": dropped}
    assert dropped > 0
    assert where["udp_queue_max_bytes"]["sock"] > 0
    assert where["kernel_udp"]["RcvbufErrors"] >= dropped  # machine-wide: others' too
    me = where["cpu"]["me"]
    assert me["user_s"] + me["system_s"] >= 0
    assert set(me) == {"user_s", "system_s", "share"}
    line = load.print_where({**where, "b2bua_retransmissions": 3.0})
    assert f"sock {dropped} (queue max" in line
    assert "B2BUA retransmissions 3" in line


def test_sipp_socket_reads_the_address_sipp_was_started_on(load: ModuleType) -> None:
    class Proc:
        args = ["sipp", "-sf", "x.xml", "-t", "u1", "-i", "127.0.0.83", "-p", "5070"]

    class Child:
        proc = Proc()

    class Sipp:
        child = Child()

    assert load.sipp_socket(Sipp()) == ("127.0.0.83", 5070)
    Proc.args = ["sipp"]
    assert load.sipp_socket(Sipp()) is None


def test_retell_socket_option_writes_the_setting_only_for_udp_out(
    load: ModuleType, tmp_path: Path
) -> None:
    # --retell-socket: sbc's config names Retell's own UDP port, which the service accepts;
    # over TCP out the key is left out (the socket would carry nothing).
    from sbc.ops.settings import load_settings

    options = load.Options(
        python=sys.executable, repo=ROOT, sippy=None, sbc_in="u1", sbc_out="udp",
        log_level="info", warmup=0, retell_udp_port=5099,
    )  # fmt: skip
    text = load.sbc_config(tmp_path, 5070, 5071, 5072, 5073, options)
    path = tmp_path / "sbc.toml"
    path.write_text(text)
    settings = load_settings(path, {"SBC_PBX__PASSWORD": "x"})
    assert (settings.retell.transport, settings.retell.local_udp_port) == ("udp", 5099)
    tcp = load.sbc_config(tmp_path, 5070, 5071, 5072, 5073, load.replace(options, sbc_out="tcp"))
    assert "local_udp_port" not in tcp
