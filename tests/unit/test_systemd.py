"""sd_notify written by hand (sbc/ops/systemd.py): datagrams to $NOTIFY_SOCKET, path and
abstract names, the watchdog interval from $WATCHDOG_USEC / $WATCHDOG_PID."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sbc.ops.systemd import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def test_ready_status_stopping_and_watchdog_reach_a_path_socket(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("registered with pbx:5060/udp\nas 101")
    assert _fields(sock.recv(4096)) == {
        "READY": "1",
        "STATUS": "registered with pbx:5060/udp as 101",  # one line: newlines would split it
    }
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.reloading()
    reloading = _fields(sock.recv(4096))
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert notifier.stopping("draining 2 calls")
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "draining 2 calls"}
    notifier.close()


def test_abstract_namespace_name() -> None:
    name = f"sbc-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x") and not notifier.watchdog()
    # vsock addresses (systemd 253+) and relative names are not supported: disabled.
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half of WatchdogSec=30
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval == interval


def test_a_failing_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with structlog.testing.capture_logs() as logs:
        assert not notifier.ready("x")
        assert not notifier.watchdog()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
