"""A real ``python -m sbc run`` process for the lifecycle tests: its settings file, its JSON log
lines, its signals and its exit status. Imported by bare name (``from sbc_process import
SbcProcess``), as pytest puts this folder on ``sys.path``.

The process gets the test's environment without any ``SBC_*`` variable (plus those the test
passes), logs JSON at the level the settings say to ``<workdir>/sbc-<n>.log``, and is killed at
the end if it is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPO", "SbcProcess", "running_sbc_process", "toml_text"]

REPO = Path(__file__).resolve().parents[2]

# Sets the kernel's memory-deny-write-execute flag (PR_SET_MDWE, Linux 6.3+; what systemd's
# MemoryDenyWriteExecute= does where the kernel has it), then becomes `python -m sbc ...`: the
# flag survives execve, so sbc runs with no writable+executable mapping allowed.
MDWE_WRAPPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
os.execv(sys.executable, [sys.executable, "-m", "sbc", *sys.argv[1:]])
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_text(values: Mapping[str, Mapping[str, Any]]) -> str:
    """Settings as a TOML file (sections of scalars and lists; ``headers`` keys quoted)."""
    lines: list[str] = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


class SbcProcess:
    """One ``sbc run`` process (see :func:`running_sbc_process`)."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, config: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.config = config
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (others, e.g. a traceback, are skipped)."""
        out = []
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_event(self, name: str, limit: float, count: int = 1) -> dict[str, Any]:
        """The ``count``-th log line with event ``name``; fails after ``limit`` seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while True:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            if self.process.returncode is not None or loop.time() > give_up:
                raise AssertionError(
                    f"no {name!r} (x{count}) within {limit} s; exit status "
                    f"{self.process.returncode}; log:\n{self.log_text()[-4000:]}"
                )
            await asyncio.sleep(0.02)  # polling a file another process writes

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        self.process.send_signal(sig)
        return time.monotonic()

    async def wait_exit(self, limit: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), limit)
        except TimeoutError:
            raise AssertionError(
                f"sbc still running {limit} s later; log:\n{self.log_text()[-4000:]}"
            ) from None

    def rewrite(self, values: Mapping[str, Mapping[str, Any]] | str) -> None:
        """Replace the settings file (read again on SIGHUP)."""
        text = values if isinstance(values, str) else toml_text(values)
        tmp = self.config.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(self.config)


_count = 0


@contextlib.asynccontextmanager
async def running_sbc_process(
    workdir: Path,
    values: Mapping[str, Mapping[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    mdwe: bool = False,
    args: Sequence[str] = (),
) -> AsyncIterator[SbcProcess]:
    """Start ``python -m sbc run --config <workdir>/sbc-<n>.toml`` (under PR_SET_MDWE when
    ``mdwe``); killed on exit if still running."""
    global _count
    _count += 1
    config = workdir / f"sbc-{_count}.toml"
    config.write_text(toml_text(values))
    log_path = workdir / f"sbc-{_count}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
    environ.pop("NOTIFY_SOCKET", None)
    environ.pop("CREDENTIALS_DIRECTORY", None)
    environ["PYTHONPATH"] = str(REPO)
    environ["STATE_DIRECTORY"] = str(workdir)  # call records, as systemd's StateDirectory=
    environ.update(env or {})
    command = ["run", "--config", str(config), *args]
    if mdwe:
        argv = [sys.executable, "-c", MDWE_WRAPPER, *command]
    else:
        argv = [sys.executable, "-m", "sbc", *command]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environ,
            cwd=workdir,
        )
    sbc = SbcProcess(process, log_path, config)
    try:
        yield sbc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
