"""A real Kamailio (Debian's ``kamailio`` package) running ``deploy/kamailio-dispatcher.cfg`` for
integration tests, started and stopped by the test itself.

:func:`running_dispatcher` runs the shipped configuration file unchanged: what differs from a
deployment (listen addresses, the destination list, the probe interval, timers, the control
socket) goes in as ``-A NAME=VALUE`` defines and ``-l`` listen options, so the test exercises the
very file an operator copies. It runs in the foreground (``-DD``), logs to stderr
(``-E``, kept in ``<workdir>/kamailio.log``), keeps its runtime files in the workdir (``-Y``),
and is yielded once it listens on both transports (read from /proc/net, no probe). A missing
binary fails the test on CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peers import free_port, require_binary
from sipp_helpers import listening

__all__ = ["DISPATCHER_CFG", "Dispatcher", "check_config", "running_dispatcher"]

DISPATCHER_CFG = Path(__file__).resolve().parents[2] / "deploy" / "kamailio-dispatcher.cfg"


def _binary(name: str) -> str:
    """Debian installs Kamailio's programs in /usr/sbin, which an unprivileged user's PATH may
    lack; otherwise as ``require_binary`` (fail on CI, skip elsewhere)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return found if found is not None else require_binary(name)


@dataclass
class Dispatcher:
    """A running Kamailio: SIP on ``host:port`` (UDP and TCP), its log and control socket."""

    process: asyncio.subprocess.Process
    host: str
    port: int
    log_path: Path
    ctl: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def rpc(self, *command: str) -> str:
        """``kamcmd`` against this instance's control socket; its output."""
        kamcmd = _binary("kamcmd")
        process = await asyncio.create_subprocess_exec(
            kamcmd,
            "-s",
            f"unix:{self.ctl}",
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 10)
        return out.decode(errors="replace")


def _defines(values: Mapping[str, str | int]) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        out += ["-A", f"{name}={value}"]
    return out


def check_config(
    defines: Mapping[str, str | int] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``kamailio -c``: parse the configuration file and load its modules, nothing else."""
    binary = _binary("kamailio")
    return subprocess.run(
        [binary, "-c", "-f", str(DISPATCHER_CFG), *_defines(defines or {})],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextlib.asynccontextmanager
async def running_dispatcher(
    host: str,
    workdir: Path,
    destinations: Sequence[str],
    *,
    defines: Mapping[str, str | int] | None = None,
) -> AsyncIterator[Dispatcher]:
    """Kamailio on ``host`` (a free port, UDP and TCP) dispatching to ``destinations`` (SIP
    URIs, set 1); stopped (SIGTERM, then SIGKILL) on exit."""
    binary = _binary("kamailio")
    port = free_port(host)
    ds_list = workdir / "dispatcher.list"
    ds_list.write_text("".join(f"1 {uri} 0 0\n" for uri in destinations))
    ctl = workdir / "kamailio_ctl"
    runtime = workdir / "kamailio-run"
    runtime.mkdir(exist_ok=True)
    values: dict[str, str | int] = {
        "NO_DEFAULT_LISTEN": 1,
        "DS_LIST": f'"{ds_list}"',
        "CTL_SOCKET": f'"unix:{ctl}"',
        **(defines or {}),
    }
    log_path = workdir / "kamailio.log"
    argv = [
        binary,
        *("-f", str(DISPATCHER_CFG)),
        *_defines(values),
        *("-l", f"udp:{host}:{port}", "-l", f"tcp:{host}:{port}"),
        "-DD",  # no daemon: the test owns the process
        "-E",  # log to stderr
        *("-Y", str(runtime), "-w", str(workdir)),
        *("-m", "64", "-M", "8"),  # shared and private memory (MB): small, it is a test
    ]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir
        )
    dispatcher = Dispatcher(process, host, port, log_path, ctl)
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 15
        while not (listening(host, port, "u1") and listening(host, port, "t1")):
            if process.returncode is not None or loop.time() > give_up:
                raise AssertionError(
                    f"kamailio not listening on {host}:{port} (exit status "
                    f"{process.returncode}); log:\n{dispatcher.log_text()[-4000:]}"
                )
            await asyncio.sleep(0.02)  # polling kernel state, not standing in for an event
        yield dispatcher
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
