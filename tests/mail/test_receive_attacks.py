"""Hostile clients against the RUNNING mail listeners: the filter (LMTP and SMTP) and the Web Key
Service's LMTP listener, each in its own process, attacked over loopback.

Memory is read from /proc/PID/status of the server process: the peak (VmHWM) after an attack,
less the resident size (VmRSS) before it, is what one hostile connection cost. Every flood is
bounded in bytes and time.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e_stack import FilterProcess
from tests.support.mailstack import _make_reachable, free_port

MB = 1024 * 1024
# The most one connection may cost, whatever it sends.
GROWTH_LIMIT_MB = 64
# Small enough that holding one whole message stays far below the growth limit.
MAX_MESSAGE_SIZE = 4 * MB
FLOOD_DEADLINE = 120.0
# The filter's max_connections in the tests of the connection cap.
CAP = 3
WKS_CAP = 8  # gpgfilter.process.keyserver.WKS_MAX_CONNECTIONS


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class Client:
    """A line-oriented SMTP/LMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        assert self.reply().startswith("220")

    def reply(self) -> str:
        """One (possibly multi-line) reply, as text."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def begin(self, *recipients: bytes, lmtp: bool = True) -> None:
        assert self.command(b"LHLO attacker" if lmtp else b"EHLO attacker").startswith("250")
        assert self.command(b"MAIL FROM:<a@example.test>").startswith("250")
        for recipient in recipients:
            assert self.command(b"RCPT TO:<" + recipient + b">").startswith("250")
        assert self.command(b"DATA").startswith("354")

    def flood(self, pattern: bytes, total: int) -> int:
        """Send ``pattern`` repeated up to ``total`` bytes (or until the deadline)."""
        piece = pattern * (MB // len(pattern))
        sent = 0
        deadline = time.monotonic() + FLOOD_DEADLINE
        while sent < total and time.monotonic() < deadline:
            self.sock.sendall(piece)
            sent += len(piece)
        return sent

    def close(self) -> None:
        self.sock.close()


class Listener:
    """A running listener process and its port."""

    def __init__(self, pid: int, port: int, log: Path) -> None:
        self.pid = pid
        self.port = port
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def warm_up(self, lmtp: bool = True) -> int:
        """One ordinary transaction (so that lazily loaded code is in), then the idle RSS."""
        client = Client(self.port)
        client.command(b"LHLO warm" if lmtp else b"EHLO warm")
        client.command(b"QUIT")
        client.close()
        return _status_kb(self.pid, "VmRSS")

    def growth_mb(self, before_kb: int) -> float:
        return (_status_kb(self.pid, "VmHWM") - before_kb) / 1024


@pytest.fixture
def filter_lmtp(tmp_path: Path) -> Iterator[Listener]:
    yield from _filter(tmp_path, "lmtp")


@pytest.fixture
def filter_smtp(tmp_path: Path) -> Iterator[Listener]:
    yield from _filter(tmp_path, "smtp")


@pytest.fixture
def filter_capped(tmp_path: Path) -> Iterator[Listener]:
    yield from _filter(tmp_path, "lmtp", f"max_connections: {CAP}\n")


def _filter(root: Path, mode: str, extra_yaml: str = "") -> Iterator[Listener]:
    # Nothing listens downstream: whatever gets through is deferred, which no test here wants.
    process = FilterProcess(
        root / "filter",
        mode=mode,
        port=free_port(),
        deliver_port=free_port(),
        extra_yaml=f"max_message_size: {MAX_MESSAGE_SIZE}\n{extra_yaml}",
    )
    process.start()
    try:
        yield Listener(process.pid, process.port, process.log_path)
    finally:
        process.stop()


@pytest.fixture
def wks_listener(tmp_path: Path) -> Iterator[Listener]:
    http, wks = free_port(), free_port()
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nhostname: mail.example.test\n"
        f"keyserver:\n  listen: 127.0.0.1:{http}\n  expiry_check_interval: 0\n"
        f"publication:\n  domains: [example.test]\n  wks_listen: 127.0.0.1:{wks}\n"
    )
    log_path = tmp_path / "keyserver.log"
    log = log_path.open("wb")
    command = [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", wks), timeout=5).close()
                break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield Listener(process.pid, wks, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


WKS_ADDRESS = b"key-submission@example.test"


def _endless_line(listener: Listener, recipients: list[bytes], total: int) -> list[str]:
    """DATA, then ``total`` bytes without a line break, then the end of data: the replies."""
    before = listener.warm_up()
    client = Client(listener.port)
    try:
        client.begin(*recipients)
        sent = client.flood(b"x", total)
        assert sent >= total, f"only {sent} bytes accepted before the deadline"
        time.sleep(0.5)  # what was sent is read
        growth = listener.growth_mb(before)
        print(f"RSS growth after {total // MB} MB without CRLF: {growth:.0f} MB")
        assert growth <= GROWTH_LIMIT_MB
        client.sock.sendall(b"\r\n.\r\n")
        replies = [client.reply() for _ in recipients]
        assert client.command(b"RSET").startswith("250")  # the connection is still usable
    finally:
        client.close()
    assert listener.growth_mb(before) <= GROWTH_LIMIT_MB
    return replies


def test_filter_survives_200_mb_without_a_line_break(filter_lmtp: Listener) -> None:
    replies = _endless_line(filter_lmtp, [b"r1@example.test", b"r2@example.test"], 200 * MB)
    assert all(reply[:1] == "5" for reply in replies), replies


def test_wks_listener_survives_100_mb_without_a_line_break(wks_listener: Listener) -> None:
    replies = _endless_line(wks_listener, [WKS_ADDRESS], 100 * MB)
    assert replies[0][:1] == "5", replies


def test_filter_lmtp_refuses_an_oversize_message_once_per_recipient(
    filter_lmtp: Listener,
) -> None:
    before = filter_lmtp.warm_up()
    client = Client(filter_lmtp.port)
    try:
        client.begin(b"r1@example.test", b"r2@example.test", b"r3@example.test")
        client.flood(b"an ordinary line of text, as long as most of them are here\r\n", 64 * MB)
        client.sock.sendall(b".\r\n")
        replies = [client.reply() for _ in range(3)]
        assert all(reply.startswith("552 ") for reply in replies), replies
        assert client.command(b"NOOP").startswith("250")  # no reply was left over
    finally:
        client.close()
    assert filter_lmtp.growth_mb(before) <= GROWTH_LIMIT_MB


def test_filter_smtp_refuses_an_oversize_message_ending_in_an_endless_line(
    filter_smtp: Listener,
) -> None:
    before = filter_smtp.warm_up(lmtp=False)
    client = Client(filter_smtp.port)
    try:
        client.begin(b"r1@example.test", b"r2@example.test", lmtp=False)
        client.flood(b"..a dot-stuffed line\r\n", 8 * MB)
        client.flood(b"z", 100 * MB)
        client.sock.sendall(b"\r\n.\r\n")
        assert client.reply()[:1] == "5"  # one reply for the transaction
        assert client.command(b"NOOP").startswith("250")
    finally:
        client.close()
    assert filter_smtp.growth_mb(before) <= GROWTH_LIMIT_MB


def test_filter_lmtp_refuses_an_over_long_line_once_per_recipient(filter_lmtp: Listener) -> None:
    client = Client(filter_lmtp.port)
    try:
        client.begin(b"r1@example.test", b"r2@example.test")
        client.sock.sendall(b"Subject: x\r\n\r\n" + b"y" * (3 * MB) + b"\r\n.\r\n")
        replies = [client.reply() for _ in range(2)]
        assert all(reply.startswith("500 ") for reply in replies), replies
        assert client.command(b"NOOP").startswith("250")
    finally:
        client.close()


def test_filter_answers_pipelined_commands_in_order(filter_lmtp: Listener) -> None:
    """PIPELINING is announced, and replies held back to go out together still come in
    order, each once, with the 221 of a pipelined QUIT before the close."""
    client = Client(filter_lmtp.port)
    try:
        assert "250-PIPELINING" in client.command(b"LHLO attacker").splitlines()
        client.sock.sendall(
            b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
            b"RCPT TO:<c\x01@example.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n"
        )
        codes = [client.reply()[:3] for _ in range(5)]
        assert codes == ["250", "250", "501", "250", "354"]
        client.sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        # Nothing listens downstream: each recipient is deferred, then RSET, NOOP, QUIT.
        codes = [client.reply()[:3] for _ in range(5)]
        assert codes == ["451", "451", "250", "250", "221"]
        assert client.sock.recv(1) == b"", "closed after the 221"
    finally:
        client.close()


@pytest.mark.parametrize(
    "address",
    [
        b"dave@x\x00",
        b"da\rve@example.test",
        b"dave\x1b[2J@example.test",
        b"dave\x7f@example.test",
        b"dave@example.test\x00",
        "dave\u009b@example.test".encode(),
    ],
)
def test_filter_refuses_control_characters_in_addresses(
    filter_lmtp: Listener, address: bytes
) -> None:
    client = Client(filter_lmtp.port)
    try:
        assert client.command(b"LHLO attacker").startswith("250")
        sender = client.command(b"MAIL FROM:<" + address + b"> SMTPUTF8")
        assert sender[:3] in ("501", "553"), sender
        assert client.command(b"MAIL FROM:<a@example.test>").startswith("250")
        recipient = client.command(b"RCPT TO:<" + address + b">")
        assert recipient[:3] in ("501", "553"), recipient
        assert "control character" in recipient.lower()
        assert client.command(b"QUIT").startswith("221")
    finally:
        client.close()
    time.sleep(0.2)
    log = filter_lmtp.log()
    assert "\x00" not in log and "\x1b" not in log and "\x7f" not in log


def test_wks_listener_refuses_control_characters_in_addresses(wks_listener: Listener) -> None:
    client = Client(wks_listener.port)
    try:
        assert client.command(b"LHLO attacker").startswith("250")
        sender = client.command(b"MAIL FROM:<eve\x00@example.test>")
        assert sender[:3] in ("501", "553"), sender
        assert client.command(b"MAIL FROM:<eve@example.test>").startswith("250")
        recipient = client.command(b"RCPT TO:<" + WKS_ADDRESS + b"\r>")
        assert recipient[:3] in ("501", "553"), recipient
    finally:
        client.close()
    assert "\x00" not in wks_listener.log()


def _greeting(port: int) -> tuple[socket.socket, str]:
    """A new connection and its greeting (empty when closed without one)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = b""
    while not data.endswith(b"\r\n"):
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return sock, data.decode("utf-8", "replace").strip()


def _refused(port: int) -> bool:
    """Whether a new connection is refused as over the cap: 421, then closed by the server."""
    sock, greeting = _greeting(port)
    try:
        if greeting.startswith("220"):
            return False
        assert greeting == "421 4.3.2 Too many connections, try again later", greeting
        assert sock.recv(4096) == b""  # closed after the 421
        return True
    finally:
        sock.close()


def _held_then_freed(listener: Listener, cap: int) -> None:
    """``cap`` connections are served, more are refused, and one closing frees its place."""
    held = [Client(listener.port) for _ in range(cap)]
    try:
        assert all(_refused(listener.port) for _ in range(cap * 3))
        for client in held:  # the connections within the cap are untouched
            assert client.command(b"NOOP").startswith("250")
        held.pop().close()
        deadline = time.monotonic() + 10
        while _refused(listener.port):
            assert time.monotonic() < deadline, "a closed connection never gave its place back"
            time.sleep(0.1)
    finally:
        for client in held:
            client.close()


def test_filter_refuses_connections_past_its_cap_until_one_closes(
    filter_capped: Listener,
) -> None:
    _held_then_freed(filter_capped, CAP)
    time.sleep(0.2)
    log = filter_capped.log()
    assert log.count("refusing new ones (421)") == 1, log  # once per episode, not per client


def test_wks_listener_refuses_connections_past_its_cap(wks_listener: Listener) -> None:
    _held_then_freed(wks_listener, WKS_CAP)


def test_filter_memory_is_bounded_in_total_whatever_the_number_of_connections(
    filter_capped: Listener,
) -> None:
    """Many connections each streaming most of a message: only the capped few are read, so the
    filter's growth stays within CAP messages however many clients try."""
    before = filter_capped.warm_up()
    clients: list[Client] = []
    refused = 0
    try:
        for _ in range(16):
            sock, greeting = _greeting(filter_capped.port)
            if not greeting.startswith("220"):
                assert greeting.startswith("421"), greeting
                refused += 1
                sock.close()
                continue
            client = Client.__new__(Client)
            client.sock, client.buffer = sock, b""
            client.begin(b"r1@example.test")
            client.flood(b"a line of a large message, held open by its sender\r\n", 3 * MB)
            clients.append(client)
        time.sleep(1)  # what was sent is read
        growth = filter_capped.growth_mb(before)
        print(f"RSS growth with {len(clients)} connections holding 3 MB each: {growth:.0f} MB")
        assert growth <= CAP * MAX_MESSAGE_SIZE / MB + 16
        assert len(clients) == CAP and refused == 16 - CAP
    finally:
        for client in clients:
            client.close()


def test_filter_on_a_unix_socket_answers_another_user(tmp_path: Path) -> None:
    """Postfix's LMTP client runs as ``postfix``, not as the filter's user: a unix listener
    must accept it, as a loopback port would (the directory decides who may reach it)."""
    _make_reachable(tmp_path / "run")
    path = tmp_path / "run" / "lmtp"
    process = FilterProcess(
        tmp_path / "filter",
        mode="lmtp",
        port=free_port(),
        deliver_port=free_port(),
        listen=f"unix:{path}",
    )
    process.start()
    try:
        client = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            " print(s.recv(100).decode())"
        )
        done = subprocess.run(
            ["/usr/bin/python3", "-c", client, str(path)],
            user="nobody",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.stdout.startswith("220 "), done.stderr
    finally:
        process.stop()
