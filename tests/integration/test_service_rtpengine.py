"""The service in ``media.mode = "rtpengine"``: it checks rtpengine at startup.

With a real rtpengine daemon (started here on 127.0.0.74 by
``rtpengine_helpers.running_rtpengine``) the service starts, its backend polls call counters (so
media timeouts work), and stopping closes it. With nothing on the NG port the service does not
start: a ``StartupError`` naming rtpengine, nothing left listening or running, and ``sbc run``
exits 1 with one ``sbc_start_failed`` line.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import free_port
from rtpengine_helpers import running_rtpengine

from sbc.media.rtpengine import RtpengineBackend
from sbc.ops.service import Service, StartupError
from sbc.ops.settings import Settings, load_settings

pytestmark = pytest.mark.integration

RTPENGINE_HOST = "127.0.0.74"
SBC = "127.0.0.75"
PBX = "127.0.0.76"  # nothing answers there: registration keeps retrying, which is fine here


@pytest.fixture(scope="module")
def rtpengine_ng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    with running_rtpengine(RTPENGINE_HOST, tmp_path_factory.mktemp("rtpengine")) as daemon:
        yield daemon.ng


def _toml(ng_port: int, sip_port: int, admin_port: int) -> str:
    return f"""
[sip]
bind = "{SBC}"
port = {sip_port}
[pbx]
host = "{PBX}"
extension = "1000"
password = "secret"
trusted = ["{PBX}/32"]
keepalive = "off"
[retell]
number = "+14155550100"
[media]
mode = "rtpengine"
rtpengine = "{RTPENGINE_HOST}:{ng_port}"
[admin]
listen = "{SBC}:{admin_port}"
[log]
format = "json"
"""


def _settings(tmp_path: Path, ng_port: int) -> tuple[Settings, Path]:
    path = tmp_path / "sbc.toml"
    path.write_text(_toml(ng_port, free_port(SBC), free_port(SBC, udp=False)))
    return load_settings(path, {}), path


def _bindable(settings: Settings) -> bool:
    """True when the SIP (UDP and TCP) and admin ports are free again."""
    try:
        for kind, port in (
            (socket.SOCK_DGRAM, settings.sip.port),
            (socket.SOCK_STREAM, settings.sip.port),
            (socket.SOCK_STREAM, settings.admin.port),
        ):
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind((SBC, port))
    except OSError:
        return False
    return True


async def test_service_starts_against_a_running_rtpengine(
    tmp_path: Path, rtpengine_ng: tuple[str, int]
) -> None:
    settings, _ = _settings(tmp_path, rtpengine_ng[1])
    service = Service(settings)
    backend = service.media
    assert isinstance(backend, RtpengineBackend)
    await service.start()
    try:
        assert backend.client.requests_sent >= 1  # the startup ping, answered
        assert backend.poll_interval == 5.0
        assert backend._poller is not None and not backend._poller.done()
    finally:
        await service.stop()
    assert backend._poller is None  # closed at stop
    assert _bindable(settings)


async def test_service_does_not_start_without_rtpengine(tmp_path: Path) -> None:
    settings, _ = _settings(tmp_path, free_port(RTPENGINE_HOST))  # nothing listens there
    before = asyncio.all_tasks()
    service = Service(settings)
    with pytest.raises(StartupError) as failure:
        async with asyncio.timeout(10):
            await service.start()
    message = str(failure.value)
    assert message.startswith(f"cannot start rtpengine at {settings.media.rtpengine}")
    assert "'ping' failed" in message
    await asyncio.sleep(0)  # done callbacks of finished tasks
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t not in before and t is not current] == []
    assert _bindable(settings)  # the SIP listener never opened, the admin endpoint is closed
    assert not service.registration.registered


def test_sbc_run_exits_1_when_rtpengine_is_down(tmp_path: Path) -> None:
    _, path = _settings(tmp_path, free_port(RTPENGINE_HOST))
    done = subprocess.run(
        [sys.executable, "-m", "sbc", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    failed = [line for line in done.stderr.splitlines() if "sbc_start_failed" in line]
    assert len(failed) == 1
    assert "cannot start rtpengine at" in failed[0]
    assert "Traceback" not in done.stderr
