"""The systemd service notification protocol (``sd_notify``), written out here.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path,
or an abstract-namespace name spelled with a leading ``@``), and waits for ``READY=1`` before it
calls the unit started. Each datagram is newline-separated ``KEY=VALUE`` assignments:
``READY=1``, ``STOPPING=1``, ``RELOADING=1`` (with ``MONOTONIC_USEC=``), ``WATCHDOG=1`` and a
free-text ``STATUS=`` shown by ``systemctl status``. With ``WatchdogSec=`` set, systemd passes
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and kills the service when no ``WATCHDOG=1`` came
within that time; :meth:`Notifier.watchdog_interval` is half of it, as sd_watchdog_enabled(3)
advises.

Why no library: python-systemd (PyPI ``systemd-python``, 235) is a source distribution only,
whose build needs libsystemd's headers and a C compiler (pip fails with "Cannot find
libsystemd" on a box without libsystemd-dev), too much to install for one datagram; and
``sdnotify`` (0.3.2, the latest on PyPI) is unmaintained, swallows every error with a bare
``except:``, and knows nothing of the watchdog variables. The protocol is a dozen lines.

Without ``$NOTIFY_SOCKET`` (not under systemd, or another ``Type=``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` of ``env`` (default: ``os.environ``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(environ)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram, ``notify(READY=1, STATUS="...")``; True when it was sent.

        Never raises: a failure is logged once (systemd then sees no READY and times out the
        start, which says more than a crash would).
        """
        if self.address is None or not fields:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(text.encode("utf-8"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify_failed", socket=_printable(self.address), error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) checks; ignored before that.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the "@" (unix(7)).
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT, systemd 253+) and anything else: not supported


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the watchdog is for; a child that inherited it is not.
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec


def _one_line(value: str | int) -> str:
    return " ".join(str(value).split())


def _printable(address: str | bytes) -> str:
    return address if isinstance(address, str) else "@" + address[1:].decode(errors="replace")
