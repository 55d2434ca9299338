"""A private PostgreSQL server for the tests: Debian's binaries, a temporary directory, a free
port on 127.0.0.1, trust authentication, no durability (fsync off) — and always stopped.

As root the server runs as the ``postgres`` system user (initdb refuses root); otherwise as
the current user. The directory lives directly under the system temporary directory, not in
pytest's (mode 0700, owned by root), so that user can reach it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.support.mailstack import free_port

SUPERUSER = "postgres"


class PostgresServerError(RuntimeError):
    pass


def find_bindir() -> Path | None:
    """Debian's newest PostgreSQL server binaries, e.g. /usr/lib/postgresql/15/bin."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def missing_requirements() -> list[str]:
    missing = []
    if find_bindir() is None:
        missing.append(
            "no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("no postgres system user to run the server as (root cannot)")
        if shutil.which("runuser") is None:
            missing.append("runuser is missing")
    return missing


class PostgresServer:
    """One cluster; ``start``/``stop`` may be called again (tests that stop the database)."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresServerError("PostgreSQL binaries are missing")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="gpgfilter-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.running = False
        self._frozen: list[int] = []
        self._databases = 0
        self._as_user: list[str] = []
        self.sockets.mkdir()
        self.log.touch()
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            account = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets, self.log):
                os.chown(path, account.pw_uid, account.pw_gid)
        atexit.register(self.close)
        # -N: no fsync (a test database need not survive a crash of the machine); the C locale
        # exists everywhere, whatever LANG says.
        self._run(
            "initdb", "-N", "-E", "UTF8", "--locale=C", "-U", SUPERUSER, "--auth=trust",
            "-D", str(self.data),
        )  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as_user, str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise PostgresServerError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}"
            )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets}"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
            "-o", options,
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """Stop at once, as a crash or a lost database host would look to the clients."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
            self.running = False

    def processes(self) -> list[int]:
        """The postmaster's process id, then its children's (checkpointer, backends, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            if int(stat.rpartition(")")[2].split()[1]) == postmaster:
                children.append(int(entry.name))
        return [postmaster, *children]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every server process stopped (SIGSTOP), as a hung database host looks to its
        clients: connections stay open and the kernel still acknowledges, but nothing answers.
        Continued when the block ends, however it ends (and by ``close`` at the latest)."""
        try:
            postmaster, *_ = self.processes()
            os.kill(postmaster, signal.SIGSTOP)  # first, so that it forks no new child
            self._frozen.append(postmaster)
            for pid in self.processes()[1:]:
                os.kill(pid, signal.SIGSTOP)
                self._frozen.append(pid)
            yield
        finally:
            self.thaw()

    def thaw(self) -> None:
        while self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._frozen.pop(), signal.SIGCONT)

    def close(self) -> None:
        self.thaw()
        with contextlib.suppress(PostgresServerError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty database; returns its DSN."""
        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)


def require_postgres() -> None:
    """Skip the calling test when PostgreSQL is unavailable; fail instead under CI.

    CI (environment variable CI set) must never pass by silently skipping the PostgreSQL
    backend's tests.
    """
    from tests.support.debian import skip_unless_ci

    missing = missing_requirements()
    if missing:
        skip_unless_ci("PostgreSQL unavailable: " + "; ".join(missing))


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped when the block ends (the tests' fixtures use this)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
