"""The filter's own CPU per message, without Postfix in the way: Postfix's ``smtp-source``
speaks LMTP straight to ``gpgfilter serve`` (LMTP mode), which encrypts and delivers to a real
Dovecot. The figure moves far less between runs than the end-to-end ratio of
``throughput.py``, so it is the one to watch while changing the filter's hot path.

    .venv/bin/python bench/filter_cpu.py [--messages N] [--size BYTES] [--rcpts R] [--strace]

Needs root and Debian's postfix (for smtp-source), dovecot-core, dovecot-lmtpd.
``--strace`` also counts the filter's system calls per message.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpugroups
from tests.support.e2e_stack import FilterProcess, cpu_seconds
from tests.support.mailstack import Dovecot, free_port
from tests.support.openpgp_tools import KeyFactory

DOMAIN = "example.test"
SENDER = f"sender@{DOMAIN}"
RECIPIENTS = [f"{prefix}r@{DOMAIN}" for prefix in ("", "1", "2", "3")]


def inject(port: int, *, messages: int, size: int, rcpts: int, sessions: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            "/usr/sbin/smtp-source", "-L", "-d",
            "-s", str(sessions), "-m", str(messages), "-l", str(size), "-r", str(rcpts),
            "-f", SENDER, "-t", f"r@{DOMAIN}", f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=600,
    )  # fmt: skip
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--rcpts", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=8, help="Postfix's LMTP concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-keys", action="store_true", help="pass-through only")
    parser.add_argument("--strace", action="store_true", help="count system calls per message")
    args = parser.parse_args()
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix="gpgfilter-bench-") as tmp,
        KeyFactory(Path(tmp) / "keys") as keys,
        Dovecot(Path(tmp) / "dovecot") as dovecot,
    ):
        for address in [*RECIPIENTS, SENDER]:
            dovecot.add_user(address)
        port = free_port()
        process = FilterProcess(
            Path(tmp) / "gpgfilter", mode="lmtp", port=port, deliver_port=dovecot.lmtp_port
        )
        if not args.no_keys:
            for address in RECIPIENTS:
                process.import_key(keys.make(address, algo="rsa3072").public)
        process.start()
        try:
            common = {"size": args.size, "rcpts": args.rcpts, "sessions": args.sessions}
            inject(port, messages=100, **common)  # warm up: connections, caches, keys
            inject(dovecot.lmtp_port, messages=100, **common)
            group = None
            if cpugroups.available():
                group = cleanup.enter_context(cpugroups.groups(["dovecot"], prefix="fc"))["dovecot"]
                group.adopt(dovecot.processes())
            figures = []
            for _ in range(args.rounds):
                before = cpu_seconds(process.pid)
                dovecot_before = group.seconds() if group else 0.0
                seconds = inject(port, messages=args.messages, **common)
                used = cpu_seconds(process.pid) - before
                dovecot_used = group.seconds() - dovecot_before if group else 0.0
                before = group.seconds() if group else 0.0
                inject(dovecot.lmtp_port, messages=args.messages, **common)
                direct = group.seconds() - before if group else 0.0
                figures.append(
                    (
                        used * 1000 / args.messages,
                        args.messages / seconds,
                        dovecot_used * 1000 / args.messages,
                        direct * 1000 / args.messages,
                    )
                )
            syscalls = ""
            if args.strace:
                syscalls = count_syscalls(process.pid, port, args.messages // 3, common)
        finally:
            process.stop()
    print(
        f"gpgfilter alone, {args.size // 1024} KB x {args.rcpts} recipient(s),"
        f" {args.sessions} LMTP sessions, {'no keys' if args.no_keys else 'RSA-3072 keys'}:"
    )
    for cpu_ms, rate, dovecot_ms, direct_ms in figures:
        print(
            f"  filter CPU {cpu_ms:5.2f} ms/msg   {rate:7.1f} msg/s   Dovecot CPU"
            f" {dovecot_ms:5.2f} ms/msg from the filter, {direct_ms:5.2f} from smtp-source"
        )
    print(f"  best {min(f[0] for f in figures):.2f} ms/msg")
    if syscalls:
        print(syscalls)


def count_syscalls(pid: int, port: int, messages: int, common: dict[str, int]) -> str:
    out = Path(tempfile.mkstemp(prefix="strace-")[1])
    tracer = subprocess.Popen(["strace", "-f", "-c", "-p", str(pid), "-o", str(out)])
    time.sleep(0.5)
    inject(port, messages=messages, **common)
    tracer.terminate()
    tracer.wait(timeout=30)
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    out.unlink()
    rows = []
    for line in lines[2:]:
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit() and not line.startswith("100.00"):
            rows.append((int(parts[3]), parts[-1]))
    rows.sort(reverse=True)
    return "  system calls per message: " + ", ".join(
        f"{name} {count / messages:.1f}" for count, name in rows[:12]
    )


if __name__ == "__main__":
    main()
