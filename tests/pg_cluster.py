"""
A throwaway PostgreSQL cluster for tests: ``initdb`` into a fresh
directory, ``pg_ctl start`` listening on a unix socket in that directory
only (no TCP port), trust authentication for the one role it creates, and
``pg_ctl stop`` plus removal at the end.

PostgreSQL refuses to run as root.  Run as root (as CI does), the cluster
belongs to the ``postgres`` user Debian's package creates (else
``nobody``), and every server command runs through ``runuser``; the
directory lives under the system temporary folder, which that user can
reach.  The binaries are found in ``/usr/lib/postgresql/*/bin`` (Debian
keeps them off PATH) or on PATH.  Missing binaries skip the test with a
clear reason, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Optional

from twisted.trial.unittest import SkipTest

#: The superuser role the cluster is created with.
ROLE = "ledger"
#: The port number in the socket's name (no TCP listener is opened).
PORT = 5432


def pg_bin_dir() -> str:
    """The directory of ``initdb`` and ``pg_ctl``, or skip (fail under CI)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(initdb)
    reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if os.environ.get("CI"):
        raise AssertionError(reason + "; CI must run the PostgreSQL tests")
    raise SkipTest(reason)


def _server_user() -> Optional[str]:
    """The user the server runs as when we are root, None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise AssertionError("running as root with neither a postgres nor a nobody user")


class Cluster:
    """One running throwaway cluster; :attr:`url` reaches it."""

    def __init__(self) -> None:
        self.bin = pg_bin_dir()
        self.user = _server_user()
        self.dir = tempfile.mkdtemp(prefix="tf-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.running = False
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o700)
        #: psycopg URL: the role, over the unix socket in :attr:`dir`.
        self.url = f"postgresql://{ROLE}@/postgres?host={self.dir}&port={PORT}"

    def _run(self, *args: str) -> None:
        command = [os.path.join(self.bin, args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, check=False
        )
        if result.returncode != 0:
            log = ""
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    log = f.read()[-2000:]
            raise AssertionError(
                f"{args[0]} failed ({result.returncode}): "
                f"{result.stdout.decode(errors='replace')[-2000:]}\n{log}"
            )

    def start(self) -> "Cluster":
        """initdb, then start and wait until it accepts connections."""
        self._run("initdb", "-D", self.data, "-U", ROLE, "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        return self.resume()

    def halt(self) -> None:
        """Stop the server (fast), keeping its files for :meth:`resume`."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def resume(self) -> "Cluster":
        """Start the (initialised) server and wait until it accepts connections."""
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -p {PORT} "
            "-c fsync=off -c max_connections=30 -c shared_buffers=16MB"
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60",
                  "start")
        self.running = True
        return self

    def stop(self) -> None:
        """Stop the server (fast: sessions are cut) and remove every file."""
        try:
            if self.running:
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
                self.running = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def execute(self, sql: str) -> list[tuple]:
        """Run one statement (blocking, autocommit); its rows, if any."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []
