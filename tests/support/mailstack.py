"""Private, real Postfix and Dovecot instances for end-to-end tests and benchmarks.

Every instance lives in its own directory (configuration, queue, mailboxes, logs, sockets),
listens on free 127.0.0.1 ports only and never reads /etc/postfix or /etc/dovecot, so tests can
run beside a system mail server and beside each other. Needs root and the Debian packages
postfix, dovecot-core, dovecot-imapd and dovecot-lmtpd (see :func:`missing_requirements`).

The Postfix integration snippets an administrator applies (``postfix/`` in the repository) are
applied here too, with only their ports replaced, so the tests run what the documentation says.

Typical use::

    dovecot = Dovecot(tmp / "dovecot")
    dovecot.add_user("alice@example.org")
    dovecot.start()
    postfix = Postfix(tmp / "postfix", mode="direct", dovecot_lmtp_port=dovecot.lmtp_port,
                      domains=["example.org"])
    postfix.start()
    try:
        postfix.send("bob@example.org", ["alice@example.org"], raw_message)
        [stored] = dovecot.wait_for("alice@example.org", 1)
    finally:
        stop_all(postfix, dovecot)

Bounces: the instances deliver only to their own domains (everything else hits an ``error:``
transport), so a DSN reaches a mailbox only when the envelope sender is an address in one of
the Postfix instance's ``domains`` that Dovecot knows. Tests use such senders.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
SNIPPET_DIR = REPO_ROOT / "postfix"

#: Ports written in the snippets under postfix/; the harness replaces them with its own.
DEFAULT_FILTER_PORT = 10025
DEFAULT_REINJECT_PORT = 10026
DEFAULT_DOVECOT_LMTP_PORT = 24

REQUIRED_BINARIES = ("postfix", "postconf", "postqueue", "dovecot", "doveconf", "doveadm")
REQUIRED_USERS = ("postfix", "mail", "dovecot", "dovenull")
REQUIRED_GROUPS = ("postdrop", "mail")
MAIL_USER = "mail"  # owner of all mailboxes (Dovecot's mail_uid / mail_gid)

POSTFIX_MODES = ("direct", "lmtp", "content_filter")

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
_POLL = 0.02


class MailStackError(RuntimeError):
    """A private Postfix or Dovecot instance could not be configured, started or queried."""


# --------------------------------------------------------------------------------------------
# environment checks


def missing_requirements() -> list[str]:
    """Return why the real mail stack cannot run here (empty list: it can)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    missing += [f"{b} not found" for b in REQUIRED_BINARIES if _which(b) is None]
    for user in REQUIRED_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(f"system user {user!r} missing")
    for group in REQUIRED_GROUPS:
        try:
            grp.getgrnam(group)
        except KeyError:
            missing.append(f"system group {group!r} missing")
    if importlib.util.find_spec("aiosmtpd") is None:  # the tests' pass-through filters
        missing.append("python package aiosmtpd missing")
    return missing


def require_mail_stack() -> None:
    """Skip the calling test module when the mail stack is unavailable; fail instead under CI.

    CI (environment variable CI set) must never pass by silently skipping end-to-end tests.
    Call at module level, before any fixture starts a server.
    """
    from tests.support.debian import skip_unless_ci

    missing = missing_requirements()
    if missing:
        reason = "real Postfix/Dovecot unavailable: " + "; ".join(missing)
        skip_unless_ci(reason, allow_module_level=True)


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=_SBIN_PATH)


def _bin(binary: str) -> str:
    path = _which(binary)
    if path is None:
        raise MailStackError(f"{binary} not found (install the Debian package)")
    return path


# --------------------------------------------------------------------------------------------
# ports, files, processes

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and not handed out before in this process.

    Binding port 0 lets the kernel choose; remembering earlier answers avoids giving the same
    port to two instances that are configured before either of them binds it.
    """
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise MailStackError("no free port found")


def rewrite_ports(text: str, ports: Mapping[int, int | None]) -> str:
    """Replace ``127.0.0.1:PORT`` / ``[127.0.0.1]:PORT`` for each default PORT in *ports*.

    A default port that occurs in *text* but maps to None is an error: the snippet needs a
    listener this instance does not have.
    """

    def sub(match: re.Match[str]) -> str:
        port = int(match.group(2))
        if port not in ports:
            return match.group(0)
        new = ports[port]
        if new is None:
            raise MailStackError(f"snippet refers to {match.group(0)} but no port is set for it")
        return f"{match.group(1)}:{new}"

    return re.sub(r"(\[?127\.0\.0\.1\]?):(\d+)\b", sub, text)


def parse_main_cf(text: str) -> list[str]:
    """Return the ``name = value`` lines of a main.cf snippet (comments and blanks dropped)."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line or raw[0].isspace():
            raise MailStackError(f"not a 'name = value' line: {raw!r}")
        lines.append(line)
    return lines


def parse_master_cf(text: str) -> list[tuple[str, str]]:
    """Return ``(name/type, entry)`` for each service of a master.cf snippet.

    Continuation lines (leading whitespace) are joined to their entry, as Postfix does; the
    result is what ``postconf -M -e 'name/type = entry'`` takes.
    """
    entries: list[list[str]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if not entries:
                raise MailStackError(f"continuation line without an entry: {raw!r}")
            entries[-1].append(raw.strip())
        else:
            entries.append([raw.strip()])
    result = []
    for parts in entries:
        entry = " ".join(parts)
        fields = entry.split()
        if len(fields) < 8:
            raise MailStackError(f"incomplete master.cf entry: {entry!r}")
        result.append((f"{fields[0]}/{fields[1]}", entry))
    return result


def _make_reachable(root: Path) -> None:
    """Create *root* and let unprivileged daemons (postfix, mail) traverse the path to it.

    Postfix daemons and Dovecot mail processes drop root privileges and must reach their queue
    and mailbox directories. Temporary directories (pytest's among them) are often 0700, so
    the search ("x") bit for others is added to *root* and those of its parents that lie inside
    the system temp directory; other parents must already allow it.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.gettempdir()).resolve()
    for path in [root, *root.parents]:
        mode = path.stat().st_mode
        if mode & 0o001:
            continue
        if path == root or tmp in path.parents:
            path.chmod((mode & 0o7777) | 0o011)
        else:
            raise MailStackError(f"{path} is not searchable by other users; use another root")


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _run_daemon(args: list[str]) -> tuple[int, str]:
    """Run a command that leaves a daemon behind; return (exit status, its output).

    The daemon inherits stdout/stderr: with pipes, reading them would wait for the daemon to
    exit. A temporary file has no such end-of-file problem.
    """
    with tempfile.TemporaryFile() as out:
        returncode = subprocess.call(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.seek(0)
        return returncode, out.read().decode(errors="replace")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return (state, start time) of a process, None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _processes(match: Callable[[int], bool]) -> dict[int, int]:
    """Return {pid: start time} of the live processes that *match* selects."""
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if not match(pid):
                continue
        except OSError:
            continue
        stat = _proc_stat(pid)
        if stat is not None and stat[0] not in "ZX":
            found[pid] = stat[1]
    return found


def _alive(pid: int, start: int) -> bool:
    """True while the process runs; a zombie counts as gone (PID 1 here reaps lazily)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start and stat[0] not in "ZX"


def _terminate(
    master: tuple[int, int] | None, procs: Callable[[], dict[int, int]], timeout: float
) -> None:
    """SIGTERM the master, wait until it and every process *procs* finds are gone.

    Without a live master (it died, or start() failed half-way) every process found gets the
    SIGTERM. Processes still there after *timeout* are SIGKILLed: no server outlives a test.
    """
    seen = procs()
    if master is not None and _alive(*master):
        seen[master[0]] = master[1]
        targets = [master[0]]
    else:
        targets = list(seen)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        seen.update(procs())
        left = {pid: start for pid, start in seen.items() if _alive(pid, start)}
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            return
        time.sleep(_POLL)


def _wait_listening(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise MailStackError(f"{what} does not listen on 127.0.0.1:{port}") from None
            time.sleep(_POLL)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_all(*instances: _Stoppable | None) -> None:
    """Stop several instances in parallel (Dovecot alone needs about a second to exit).

    Every instance is stopped even if another one fails; the first error is raised after.
    """
    todo = [i for i in instances if i is not None]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        futures = [pool.submit(i.stop) for i in todo]
    for future in futures:
        future.result()


# --------------------------------------------------------------------------------------------
# Dovecot


class Dovecot:
    """A private Dovecot 2.3: IMAP and LMTP on free loopback ports, passwd-file users, Maildir.

    Users are virtual (``add_user``); all mailboxes belong to the system user ``mail``. The
    quota plugin is on with ``quota_full_tempfail = yes``, so a delivery that does not fit a
    user's ``quota_bytes`` is answered ``452 4.2.2`` — after DATA by default, or already at
    RCPT TO for a mailbox that is over quota when *rcpt_check_quota* is true. An unknown user
    gets ``550 5.1.1`` at RCPT TO. The repository's ``postfix/dovecot/lmtp.conf`` is included.

    A stored message starts with what Dovecot's LMTP adds: ``Return-Path``, ``Delivered-To``
    and a ``Received`` of its own, followed by the bytes it was given.
    """

    def __init__(
        self,
        root: Path,
        hostname: str = "mail.test",
        *,
        rcpt_check_quota: bool = False,
        recipient_delimiter: str = "+",
    ) -> None:
        self.root = Path(root).resolve()
        _make_reachable(self.root)
        self.hostname = hostname
        self.lmtp_port = free_port()
        self.imap_port = free_port()
        self.instance_name = f"mailstack-{uuid.uuid4().hex[:8]}"
        self.config_path = self.root / "dovecot.conf"
        self.base_dir = self.root / "run"
        self.mail_dir = self.root / "mail"
        self.users_path = self.root / "users"
        self.log_path = self.root / "dovecot.log"
        self._users: dict[str, tuple[str, int | None]] = {}
        self._master: tuple[int, int] | None = None
        self._lock = threading.Lock()

        mail = pwd.getpwnam(MAIL_USER)
        for d in (self.base_dir, self.root / "state"):
            d.mkdir(exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, mail.pw_uid, mail.pw_gid)
        self.mail_dir.chmod(0o700)
        self._write_users()
        # The snippet names its listener as "address = 127.0.0.1" + "port = 24".
        lmtp_snippet, n = re.subn(
            rf"(?m)^(\s*port\s*=\s*){DEFAULT_DOVECOT_LMTP_PORT}\s*$",
            rf"\g<1>{self.lmtp_port}",
            (SNIPPET_DIR / "dovecot" / "lmtp.conf").read_text(),
        )
        if n != 1:
            raise MailStackError("postfix/dovecot/lmtp.conf: expected exactly one 'port = 24'")
        _atomic_write(self.root / "lmtp.conf", lmtp_snippet)
        _atomic_write(
            self.config_path,
            self._config(mail.pw_uid, rcpt_check_quota, recipient_delimiter),
        )
        check = _run([_bin("doveconf"), "-c", str(self.config_path), "-n"])
        if check.returncode != 0 or "Warning" in check.stderr:
            raise MailStackError(f"dovecot configuration rejected:\n{check.stderr}")

    def _config(self, mail_uid: int, rcpt_check_quota: bool, delimiter: str) -> str:
        r = self.root
        return f"""\
# Private Dovecot written by tests/support/mailstack.py (not for production).
base_dir = {self.base_dir}
state_dir = {r}/state
instance_name = {self.instance_name}
log_path = {self.log_path}
hostname = {self.hostname}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = {mail_uid}
mail_uid = {MAIL_USER}
mail_gid = {MAIL_USER}
mail_location = maildir:~/Maildir
mail_plugins = $mail_plugins quota

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {self.users_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {self.users_path}
  default_fields = uid={MAIL_USER} gid={MAIL_USER} home={self.mail_dir}/%Ld/%Ln
}}

plugin {{
  # "count" reads usage from the mailbox indexes: no quota file that could go stale.
  quota = count:User quota
  quota_vsizes = yes
  # Exact limits: by default LMTP lets the last message overshoot the quota by 10 %.
  quota_grace = 0
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}

# The integration snippet from the repository (LMTP listener, quota_full_tempfail, ...).
!include {r}/lmtp.conf

# Test knobs, after the snippet so that they win.
lmtp_rcpt_check_quota = {"yes" if rcpt_check_quota else "no"}
recipient_delimiter = {delimiter}
"""

    # -- users ---------------------------------------------------------------------------

    def add_user(self, address: str, password: str = "pw", quota_bytes: int | None = None) -> None:
        """Create (or replace) a mailbox user; visible to the next delivery when running.

        *quota_bytes*: None = unlimited; 0 = no room at all (stored as 1 byte, because
        Dovecot reads a 0 limit as "unlimited"). Only the user and its quota are waited for:
        a changed password of an existing user may take up to a second to apply.
        """
        address = address.lower()
        for value in (address, password):
            if not value or any(c in value for c in ":\n\t "):
                raise ValueError(f"unusable in a passwd-file: {value!r}")
        with self._lock:
            self._users[address] = (password, quota_bytes)
            self._write_users()
        if self.running:
            self._wait_userdb(address)

    def set_quota(self, address: str, quota_bytes: int | None) -> None:
        """Change a user's quota; returns once Dovecot's userdb answers with the new limit."""
        address = address.lower()
        with self._lock:
            password, _ = self._users[address]
            self._users[address] = (password, quota_bytes)
            self._write_users()
        if self.running:
            self._wait_userdb(address)

    def _quota_rule(self, quota_bytes: int | None) -> str | None:
        if quota_bytes is None:
            return None
        if quota_bytes < 0:
            raise ValueError("quota_bytes must be >= 0")
        return f"*:storage={max(quota_bytes, 1)}B"

    def _write_users(self) -> None:
        lines = []
        for address, (password, quota) in sorted(self._users.items()):
            rule = self._quota_rule(quota)
            extra = f"userdb_quota_rule={rule}" if rule else ""
            lines.append(f"{address}:{{PLAIN}}{password}::::::{extra}\n")
        # Readable by the auth processes (user dovecot); test passwords only.
        _atomic_write(self.users_path, "".join(lines), 0o644)

    def userdb_lookup(self, address: str) -> dict[str, str] | None:
        """Ask the running Dovecot's userdb (auth-userdb socket) about *address*.

        Returns the user's fields, or None for an unknown user.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.base_dir / "auth-userdb"))
            s.sendall(f"VERSION\t1\t0\nUSER\t1\t{address}\tservice=lmtp\n".encode())
            buf = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    raise MailStackError("auth-userdb closed the connection")
                buf += chunk
                for line in buf.decode().split("\n")[:-1]:
                    fields = line.split("\t")
                    if fields[0] == "USER":
                        return dict(f.split("=", 1) for f in fields[3:] if "=" in f)
                    if fields[0] == "NOTFOUND":
                        return None
                    if fields[0] == "FAIL":
                        raise MailStackError(f"userdb lookup failed: {line}")

    def _wait_userdb(self, address: str, timeout: float = 5) -> None:
        """Wait until the auth process has re-read the passwd-file.

        Dovecot stats the passwd-file at most once per second, so a change can stay invisible
        for up to a second; deliveries before that would still see the old quota.
        """
        quota = self._users[address][1]
        want = self._quota_rule(quota)
        deadline = time.monotonic() + timeout
        while True:
            fields = self.userdb_lookup(address)
            if fields is not None and fields.get("quota_rule") == want:
                return
            if time.monotonic() > deadline:
                raise MailStackError(f"userdb still answers {fields!r} for {address}")
            time.sleep(0.05)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._master is not None

    def start(self) -> None:
        """Start the instance; returns when LMTP and IMAP accept connections."""
        if self._master is not None:
            raise MailStackError("dovecot already started")
        # A pid file left by a killed run would be read before the new master replaces it.
        pid_file = self.base_dir / "master.pid"
        pid_file.unlink(missing_ok=True)
        returncode, output = _run_daemon([_bin("dovecot"), "-c", str(self.config_path)])
        if returncode != 0:
            raise MailStackError(f"dovecot did not start:\n{output}\n{_tail(self.log())}")
        try:
            # The command returns once it has forked the daemon, which then writes its pid.
            deadline = time.monotonic() + 10
            while not (pid_file.exists() and pid_file.read_text().strip()):
                if time.monotonic() > deadline:
                    raise MailStackError(f"dovecot wrote no pid file:\n{_tail(self.log())}")
                time.sleep(0.005)
            pid = int(pid_file.read_text().split()[0])
            stat = _proc_stat(pid)
            if stat is None:
                raise MailStackError(f"dovecot exited at once:\n{_tail(self.log())}")
            self._master = (pid, stat[1])
            _wait_listening(self.lmtp_port, 10, "dovecot lmtp")
            _wait_listening(self.imap_port, 10, "dovecot imap")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the instance and wait until all of its processes are gone (idempotent).

        Sends the master the SIGTERM that ``doveadm stop`` sends, but does not use doveadm:
        it waits for the master's PID to vanish, which here only happens when PID 1 reaps
        the zombie (1-2 s later). Dovecot's master itself takes ~1.1 s to exit.
        """
        _terminate(self._master, self.processes, timeout=15)
        self._master = None

    def processes(self) -> dict[int, int]:
        """{pid: start time} of this instance's live processes.

        The master is recognised by its command line, the others by their process title,
        which starts with ``dovecot-<instance_name>/`` (unique per instance).
        """
        title = f"dovecot-{self.instance_name}/".encode()
        master = f"\0-c\0{self.config_path}\0".encode()

        def match(pid: int) -> bool:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            return cmdline.startswith(title) or master in cmdline

        return _processes(match)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """The instance's log (all Dovecot processes)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- mailbox access over IMAP ------------------------------------------------------------

    @contextlib.contextmanager
    def _imap(self, address: str) -> Iterator[imaplib.IMAP4]:
        password, _ = self._users[address.lower()]
        imap = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        try:
            imap.login(address, password)
            yield imap
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                imap.logout()

    @staticmethod
    def _select(imap: imaplib.IMAP4) -> int:
        typ, data = imap.select("INBOX")
        if typ != "OK" or not data or data[0] is None:
            raise MailStackError(f"SELECT INBOX failed: {typ} {data!r}")
        return int(data[0])

    @staticmethod
    def _fetch(imap: imaplib.IMAP4, count: int) -> list[bytes]:
        if count == 0:
            return []
        typ, data = imap.fetch(f"1:{count}", "(BODY.PEEK[])")
        if typ != "OK":
            raise MailStackError(f"FETCH failed: {typ} {data!r}")
        found: dict[int, bytes] = {}
        for item in data:
            if isinstance(item, tuple):
                found[int(item[0].split()[0])] = item[1]
        return [found[n] for n in sorted(found)]

    def fetch_all(self, address: str) -> list[bytes]:
        """Raw bytes (as IMAP serves them, CRLF) of every INBOX message, oldest first."""
        with self._imap(address) as imap:
            return self._fetch(imap, self._select(imap))

    def count(self, address: str) -> int:
        """Number of messages in the user's INBOX."""
        with self._imap(address) as imap:
            return self._select(imap)

    def wait_for(self, address: str, count: int, timeout: float = 20) -> list[bytes]:
        """Poll until INBOX holds at least *count* messages; return all of them."""
        deadline = time.monotonic() + timeout
        with self._imap(address) as imap:
            while True:
                have = self._select(imap)
                if have >= count:
                    return self._fetch(imap, have)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{address}: {have} of {count} messages after {timeout}s\n"
                        f"{_tail(self.log())}"
                    )
                time.sleep(0.05)

    def delete_all(self, address: str) -> None:
        """Expunge every message in the user's INBOX."""
        with self._imap(address) as imap:
            count = self._select(imap)
            if count:
                imap.store(f"1:{count}", "+FLAGS.SILENT", r"(\Deleted)")
                imap.expunge()


# --------------------------------------------------------------------------------------------
# Postfix

_MASTER_CF = """\
# Private Postfix written by tests/support/mailstack.py (not for production). No chroot anywhere.
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix:
    """A private Postfix 3.7 (``postfix -c DIR``) delivering virtual domains over LMTP.

    *mode*:

    - ``"direct"``: virtual_transport goes straight to Dovecot's LMTP (no filter; baselines,
      benchmarks);
    - ``"lmtp"``: applies ``postfix/lmtp-mode/main.cf``; Postfix delivers over LMTP to the
      filter on *filter_port*, which must deliver on to Dovecot (*dovecot_lmtp_port*);
    - ``"content_filter"``: applies ``postfix/content-filter/*``; Postfix sends over SMTP to
      the filter on *filter_port*, which reinjects into ``reinject_port``; the reinjected copy
      goes to Dovecot.

    Every address in *domains* is accepted (Postfix validates no recipient), so unknown users
    reach Dovecot and its ``550`` is what bounces. Nothing leaves: other domains hit an
    ``error:`` transport. Retry timers are short (5 s, at most 60 s) for fault tests.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: str,
        dovecot_lmtp_port: int,
        domains: list[str],
        filter_port: int | None = None,
        recipient_delimiter: str = "+",
        hostname: str = "mail.test",
    ) -> None:
        if mode not in POSTFIX_MODES:
            raise ValueError(f"mode must be one of {POSTFIX_MODES}, not {mode!r}")
        if mode != "direct" and filter_port is None:
            raise ValueError(f"mode {mode!r} needs filter_port")
        if not domains:
            raise ValueError("at least one domain is needed")
        self.root = Path(root).resolve()
        _make_reachable(self.root)
        self.mode = mode
        self.domains = list(domains)
        self.hostname = hostname
        self.dovecot_lmtp_port = dovecot_lmtp_port
        self.filter_port = filter_port
        self.recipient_delimiter = recipient_delimiter
        self.smtp_port = free_port()
        self.reinject_port: int | None = free_port() if mode == "content_filter" else None
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "maillog"
        self._master: tuple[int, int] | None = None
        self._configure()

    # -- configuration -------------------------------------------------------------------

    def _main_cf(self) -> str:
        return f"""\
# Private Postfix written by tests/support/mailstack.py (not for production).
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
myorigin = $myhostname
maillog_file = {self.log_path}
maillog_file_prefixes = {self.root}

# Loopback only; every listener in master.cf also names 127.0.0.1 explicitly.
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no

# Only the test domains exist, as virtual mailbox domains. With empty virtual_mailbox_maps
# Postfix accepts every address there, so Dovecot decides (550 unknown user -> bounce).
mydestination =
virtual_mailbox_domains = {" ".join(self.domains)}
virtual_mailbox_maps =
virtual_alias_maps =
smtpd_reject_unlisted_recipient = no
virtual_transport = lmtp:inet:127.0.0.1:{self.dovecot_lmtp_port}
recipient_delimiter = {self.recipient_delimiter}
alias_maps =
alias_database =
relay_domains =
local_transport = error:5.1.1 no local delivery in this test instance
default_transport = error:5.7.1 this test instance delivers to its own domains only
relay_transport = error:5.7.1 this test instance delivers to its own domains only

# Treat the test client (127.0.0.1) like a remote one: no header rewriting, no added headers.
local_header_rewrite_clients =
notify_classes =
biff = no
append_dot_mydomain = no

# Fast retries for fault tests.
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 60s
"""

    def _postconf(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = _run([_bin("postconf"), "-c", str(self.config_dir), *args])
        if result.returncode != 0 or "warning:" in result.stderr:
            raise MailStackError(f"postconf {' '.join(args)}: {result.stderr.strip()}")
        if "-e" in args:
            self._backdate_config()
        return result

    def _backdate_config(self) -> None:
        """Move main.cf/master.cf's mtime 10 s into the past.

        Postfix programs re-read a main.cf modified within the last second until it is older
        (a guard against half-edited files), in 300 ms steps: every postconf and the start
        after an edit would lose up to 2.5 s.
        """
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _configure(self) -> None:
        postfix = pwd.getpwnam("postfix")
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        self.data_dir.chmod(0o700)
        _atomic_write(self.config_dir / "main.cf", self._main_cf())
        _atomic_write(self.config_dir / "master.cf", _MASTER_CF.format(smtp_port=self.smtp_port))
        self._backdate_config()

        ports = {
            DEFAULT_FILTER_PORT: self.filter_port,
            DEFAULT_REINJECT_PORT: self.reinject_port,
            DEFAULT_DOVECOT_LMTP_PORT: self.dovecot_lmtp_port,
        }
        if self.mode == "lmtp":
            text = rewrite_ports((SNIPPET_DIR / "lmtp-mode" / "main.cf").read_text(), ports)
            self._postconf("-e", *parse_main_cf(text))
            self._expect("virtual_transport", f"lmtp:inet:127.0.0.1:{self.filter_port}")
        elif self.mode == "content_filter":
            snippet = SNIPPET_DIR / "content-filter"
            text = rewrite_ports((snippet / "main.cf").read_text(), ports)
            self._postconf("-e", *parse_main_cf(text))
            entries = parse_master_cf(rewrite_ports((snippet / "master.cf").read_text(), ports))
            self._postconf("-M", "-e", *[f"{key} = {entry}" for key, entry in entries])
            self._expect("content_filter", f"gpgfilter:[127.0.0.1]:{self.filter_port}")
            listen = self._postconf("-M", f"127.0.0.1:{self.reinject_port}/inet").stdout
            if "content_filter=" not in listen.replace(" ", ""):
                raise MailStackError("content-filter/master.cf: no reinjection smtpd found")
        # Any unknown parameter or malformed service is a warning: refuse it.
        self._postconf("-n")
        self._postconf("-M")
        self._postconf("-P")

    def apply_main_cf(self, settings: list[str]) -> None:
        """Apply more ``name = value`` settings (a snippet's lines) before the start."""
        self._postconf("-e", *settings)
        self._postconf("-n")

    def _expect(self, name: str, value: str) -> None:
        actual = self._postconf("-h", name).stdout.strip()
        if actual != value:
            raise MailStackError(f"snippet sets {name} = {actual!r}, harness expects {value!r}")

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._master is not None

    def start(self) -> None:
        """``postfix -c DIR start``; returns when the SMTP listener accepts connections."""
        if self._master is not None:
            raise MailStackError("postfix already started")
        returncode, output = _run_daemon([_bin("postfix"), "-c", str(self.config_dir), "start"])
        if returncode != 0:
            self.stop()
            raise MailStackError(f"postfix did not start:\n{output}\n{_tail(self.log())}")
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            stat = _proc_stat(pid)
            if stat is None:
                raise MailStackError(f"postfix master exited at once:\n{_tail(self.log())}")
        except BaseException:
            self.stop()
            raise
        # "master -w" returned only after the listeners were bound: nothing more to wait for.
        self._master = (pid, stat[1])

    def stop(self) -> None:
        """Stop the instance and wait until all of its processes are gone (idempotent).

        Sends the master the SIGTERM that ``postfix stop`` sends, without that script's
        one-second polling; Postfix's processes are found by their MAIL_CONFIG environment.
        """
        _terminate(self._master, self.processes, timeout=15)
        self._master = None

    def processes(self) -> dict[int, int]:
        """{pid: start time} of this instance's live processes (master included).

        ``postfix -c DIR`` exports MAIL_CONFIG=DIR and the master passes it on to every
        daemon it spawns, so the environment identifies them even after reparenting.
        """
        marker = f"MAIL_CONFIG={self.config_dir}\0".encode()
        return _processes(lambda p: marker in Path(f"/proc/{p}/environ").read_bytes())

    def __enter__(self) -> Postfix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail ---------------------------------------------------------------------------------

    def send(
        self,
        mail_from: str,
        rcpts: list[str],
        data: bytes,
        *,
        smtputf8: bool | None = None,
    ) -> None:
        """Submit one message over SMTP (as a remote client would); raise on any refusal.

        *data* is sent as is (use CRLF line ends). SMTPUTF8 is requested when *smtputf8* is
        true, or (None) when the envelope has non-ASCII addresses.
        """
        if smtputf8 is None:
            smtputf8 = not all(a.isascii() for a in [mail_from, *rcpts])
        options = ["SMTPUTF8"] if smtputf8 else []
        if not data.isascii():
            options.append("BODY=8BITMIME")
        with smtplib.SMTP("127.0.0.1", self.smtp_port, "client.test", timeout=60) as smtp:
            refused = smtp.sendmail(mail_from, rcpts, data, mail_options=options)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def flush(self) -> None:
        """``postqueue -f``: attempt every queued message now, ignoring retry back-off."""
        result = _run([_bin("postqueue"), "-c", str(self.config_dir), "-f"])
        if result.returncode != 0:
            raise MailStackError(f"postqueue -f: {result.stderr.strip()}")

    def queue_ids(self) -> list[str]:
        """Queue ids of the messages still queued (maildrop, incoming, active, deferred, hold)."""
        ids = []
        for queue in _QUEUES:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / queue):
                ids.extend(files)
        return sorted(ids)

    def wait_queue_empty(self, timeout: float = 20) -> None:
        """Poll until no message is queued."""
        deadline = time.monotonic() + timeout
        while ids := self.queue_ids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"still queued after {timeout}s: {ids}\n{_tail(self.log())}")
            time.sleep(_POLL)

    def log(self) -> str:
        """The instance's mail log (maillog_file)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Poll the mail log until the regular expression *pattern* matches; return the match."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while (match := regex.search(self.log())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not logged after {timeout}s\n{_tail(self.log())}")
            time.sleep(_POLL)
        return match
