"""A throwaway PostgreSQL server for the call records tests: Debian's ``postgresql`` binaries,
``initdb`` into a temporary directory, ``postgres`` on a free loopback port and a Unix socket in
that directory. Imported by bare name (``from pg_server import postgres_server``).

PostgreSQL refuses to run as root: under root (CI) the directory is handed to the ``postgres``
user (created by the Debian package) and both programs run as that user through ``setpriv``,
which execs them (so the process we signal is the server itself). The superuser ``sbc`` has a
password (scram-sha-256 over TCP), so the tests exercise password handling. The server is
stopped (fast shutdown) and the directory removed at the end, whatever the test did.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import free_port

__all__ = ["PostgresServer", "find_bindir", "postgres_server"]

USER = "sbc"
PASSWORD = "pg-Secret-4711"
HOST = "127.0.0.1"


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb (a missing one fails the test
    on CI, skips it elsewhere, as ``peers.require_binary`` does)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).parent
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("initdb (Debian package postgresql) is required on CI but not installed")
    pytest.skip("PostgreSQL (initdb) not installed")


class PostgresServer:
    """One server; :meth:`start` and :meth:`stop` may be called again (an outage)."""

    def __init__(self, bindir: Path, workdir: Path, port: int, run_as: list[str]) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = port
        self.run_as = run_as
        self.log = workdir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The database's URL without the password."""
        return f"postgresql://{USER}@{HOST}:{self.port}/postgres"

    @property
    def url_with_password(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@{HOST}:{self.port}/postgres"

    def initdb(self) -> None:
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        argv = [
            str(self.bindir / "initdb"),
            "-D", str(self.data),
            "-U", USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        done = subprocess.run(
            [*self.run_as, *argv], cwd=self.workdir, capture_output=True, timeout=120
        )
        if done.returncode != 0:
            raise AssertionError(f"initdb failed: {done.stdout!r} {done.stderr!r}")
        pwfile.unlink()

    def start(self, limit: float = 60.0) -> None:
        argv = [
            str(self.bindir / "postgres"),
            "-D", str(self.data),
            "-k", str(self.workdir),
            "-h", HOST,
            "-p", str(self.port),
            # a test server: speed over durability, and few resources on a shared machine
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=20",
            "-c", "shared_buffers=16MB",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*self.run_as, *argv],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self._wait_ready(limit)

    def _wait_ready(self, limit: float) -> None:
        import psycopg

        give_up = time.monotonic() + limit
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited {self.process.returncode}: {self.logs()}")
            try:
                with psycopg.connect(self.url, password=PASSWORD, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > give_up:
                    raise AssertionError(
                        f"postgres not ready in {limit} s: {self.logs()}"
                    ) from None
                time.sleep(0.1)  # the server's start has no event to wait for

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, no wait for them)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs the postgres user (Debian package postgresql)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root needs setpriv (util-linux) to become postgres")
    return [
        setpriv,
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--clear-groups",
        "--",
    ]


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh, running server; stopped and its directory removed on exit."""
    bindir = find_bindir()
    run_as = _run_as()
    workdir = Path(tempfile.mkdtemp(prefix="sbc-pg-"))
    server = PostgresServer(bindir, workdir, free_port(HOST, udp=False), run_as)
    try:
        server._own(workdir)
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
