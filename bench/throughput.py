"""End-to-end throughput through real Postfix + Dovecot, without a filter and with gpgfilter in
LMTP mode, measured in the same run on the same machine; prints the figures and their ratio.

    .venv/bin/python bench/throughput.py [--messages N] [--sessions S] [--unix]

Needs root and Debian's postfix, dovecot-core, dovecot-imapd, dovecot-lmtpd (as the tests).
Load comes from Postfix's own ``smtp-source`` (C, cheap), so the client does not steal the CPU
that is being measured. Per message, the filter's CPU (its process and its gpg children) and
its own processing time (from its log: end of DATA to reply, minus the time Dovecot took) are
reported as well.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpugroups
from tests.support.e2e_stack import Stack, cpu_seconds
from tests.support.openpgp_tools import KeyFactory

DOMAIN = "example.test"
SENDER = f"sender@{DOMAIN}"
# smtp-source numbers the recipients of a transaction: 1r@, 2r@, ... (just r@ for one).
RECIPIENTS = [f"{prefix}r@{DOMAIN}" for prefix in ("", "1", "2", "3")]
# Postfix's own measure of each delivery, from arrival to the next hop's final reply.
_DELAY = re.compile(r" to=<[^>]*>, .*? delay=([\d.]+), .* status=sent ")
_LOG_LINE = re.compile(r"message queue_id=\S+ .* ms=([\d.]+) encrypt_ms=[\d.]+ deliver_ms=([\d.]+)")


def delivered(stack: Stack) -> int:
    total = 0
    for address in RECIPIENTS:
        local = address.split("@")[0]
        maildir = stack.dovecot.mail_dir / DOMAIN / local / "Maildir"
        for sub in ("new", "cur"):
            folder = maildir / sub
            if folder.is_dir():
                total += sum(1 for _ in folder.iterdir())
    return total


def run_load(
    stack: Stack, *, messages: int, size: int, rcpts: int, sessions: int, wait: int = 0
) -> float:
    """Inject ``messages`` and wait until all copies are in the mailboxes; returns seconds.
    With ``wait``, each session pauses that many seconds after each message: a paced load of
    about ``sessions / wait`` messages per second instead of a saturating one."""
    before = delivered(stack)
    expected = before + messages * rcpts
    started = time.monotonic()
    subprocess.run(
        [
            "/usr/sbin/smtp-source",
            "-s", str(sessions),
            *(["-w", str(wait)] if wait else []),
            "-m", str(messages),
            "-l", str(size),
            "-r", str(rcpts),
            "-f", SENDER,
            "-t", f"r@{DOMAIN}",
            f"127.0.0.1:{stack.postfix.smtp_port}",
        ],
        check=True,
        timeout=600,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while delivered(stack) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {delivered(stack) - before} of {messages * rcpts} arrived")
        time.sleep(0.02)
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=900, help="copies per measurement")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    parser.add_argument(
        "--gpg-processes", type=int, default=None, help="gpg.max_processes for the filter"
    )
    parser.add_argument(
        "--no-keys",
        action="store_true",
        help="register no keys: measures the filter as a pass-through, without encryption",
    )
    parser.add_argument(
        "--wait",
        type=int,
        default=0,
        help="seconds each session waits after each message: paced, e.g. --sessions 50"
        " --wait 1 for ~50 msg/s (the latency figures then show what the filter adds)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample the filter with py-spy during its rounds (collapsed stacks into FILE)",
    )
    parser.add_argument(
        "--unix",
        action="store_true",
        help="Postfix -> [gpgfilter ->] Dovecot over unix sockets instead of loopback TCP",
    )
    parser.add_argument(
        "--cases",
        default="10240x1,10240x3,51200x1,51200x3",
        help="comma-separated SIZExRECIPIENTS",
    )
    args = parser.parse_args()
    cases = [
        (int(size), int(rcpts))
        for size, rcpts in (case.split("x") for case in args.cases.split(","))
    ]
    rates: dict[tuple[str, int, int], list[float]] = {}
    cpu_ms: dict[tuple[int, int], list[float]] = {}
    own: dict[tuple[int, int], list[float]] = {}
    total: dict[tuple[int, int], list[float]] = {}
    # CPU ms per message by stack, case and component (postfix, dovecot, filter).
    parts: dict[tuple[str, int, int, str], list[float]] = {}
    delays: dict[tuple[str, int, int], list[float]] = {}
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix="gpgfilter-bench-") as tmp,
        KeyFactory(Path(tmp) / "keys") as keys,
        Stack(
            Path(tmp) / "direct", mode="direct", users=[*RECIPIENTS, SENDER], unix=args.unix
        ) as direct,
        Stack(
            Path(tmp) / "lmtp",
            mode="lmtp",
            users=[*RECIPIENTS, SENDER],
            gpg_yaml=f"  max_processes: {args.gpg_processes}\n" if args.gpg_processes else "",
            unix=args.unix,
        ) as filtered,
    ):
        assert filtered.filter is not None
        for address in [] if args.no_keys else RECIPIENTS:
            filtered.filter.import_key(keys.make(address, algo="rsa3072").public)
        for stack in (direct, filtered):  # warm up: caches, connections, gpg homes
            run_load(stack, messages=50, size=10_240, rcpts=1, sessions=args.sessions)
        groups: dict[str, dict[str, cpugroups.CpuGroup]] = {}
        if cpugroups.available():
            for name, stack in (("direct", direct), ("lmtp", filtered)):
                members = {
                    "postfix": stack.postfix.processes(),
                    "dovecot": stack.dovecot.processes(),
                }
                if stack.filter is not None:
                    members["filter"] = {stack.filter.pid: 0}
                groups[name] = cleanup.enter_context(cpugroups.groups(members, prefix=name))
                for part, pids in members.items():
                    groups[name][part].adopt(pids)
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record",
                 "--pid", str(filtered.filter.pid), "--rate", "250",
                 "--format", "raw", "--output", args.profile, "--nonblocking"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        # Both stacks stay up and take turns, so drift on a shared machine hits both alike.
        for _ in range(args.rounds):
            for size, rcpts in cases:
                count = args.messages // rcpts
                for name, stack in (("direct", direct), ("lmtp", filtered)):
                    log_mark = len(filtered.filter.log())
                    postfix_mark = len(stack.postfix.log())
                    cpu_before = cpu_seconds(filtered.filter.pid)
                    used_before = {p: g.seconds() for p, g in groups.get(name, {}).items()}
                    seconds = run_load(
                        stack,
                        messages=count,
                        size=size,
                        rcpts=rcpts,
                        sessions=args.sessions,
                        wait=args.wait,
                    )
                    rates.setdefault((name, size, rcpts), []).append(count / seconds)
                    delays.setdefault((name, size, rcpts), []).extend(
                        float(d) * 1000 for d in _DELAY.findall(stack.postfix.log()[postfix_mark:])
                    )
                    for part, group in groups.get(name, {}).items():
                        used_ms = (group.seconds() - used_before[part]) * 1000 / count
                        parts.setdefault((name, size, rcpts, part), []).append(used_ms)
                    if stack is filtered:
                        used = cpu_seconds(filtered.filter.pid) - cpu_before
                        cpu_ms.setdefault((size, rcpts), []).append(used * 1000 / count)
                        lines = _LOG_LINE.findall(filtered.filter.log()[log_mark:])
                        total.setdefault((size, rcpts), []).extend(float(ms) for ms, _ in lines)
                        own.setdefault((size, rcpts), []).extend(
                            float(ms) - float(deliver) for ms, deliver in lines
                        )
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file and stops
            profiler.wait(timeout=60)
        load = os.getloadavg()
    print()
    print(f"load average at the end (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("Messages/s end to end (smtp-source -> Postfix -> [gpgfilter ->] Dovecot), median of")
    print(
        f"{args.rounds} alternating rounds, {args.messages} mailbox copies per case,"
        f" {args.sessions} sessions, RSA-3072 keys,"
        f" {'unix sockets' if args.unix else 'loopback TCP'} between the hops, this machine:"
    )
    print()
    print(
        f"{'size':>6} {'rcpts':>5} {'no filter':>10} {'gpgfilter':>10} {'ratio':>6}"
        f" {'filter CPU ms/msg':>18} {'own p50/p99 ms':>15} {'total p50/p99 ms':>17}"
        "  ratio per round"
    )
    for size, rcpts in cases:
        base = statistics.median(rates[("direct", size, rcpts)])
        with_filter = statistics.median(rates[("lmtp", size, rcpts)])
        print(
            f"{size // 1024:>4}KB {rcpts:>5} {base:>10.1f} {with_filter:>10.1f}"
            f" {with_filter / base:>6.2f} {statistics.median(cpu_ms[(size, rcpts)]):>18.1f}"
            f" {percentile(own[(size, rcpts)], 0.5):>7.1f}/"
            f"{percentile(own[(size, rcpts)], 0.99):<7.1f}"
            f" {percentile(total[(size, rcpts)], 0.5):>8.1f}/"
            f"{percentile(total[(size, rcpts)], 0.99):<8.1f}"
            "  "
            + " ".join(
                f"{f / d:.2f}"
                for d, f in zip(
                    rates[("direct", size, rcpts)], rates[("lmtp", size, rcpts)], strict=True
                )
            )
        )
    print()
    print("Latency end to end (Postfix's delay= for each delivery: arrival to the final reply")
    print("of the next hop; 10 ms resolution), ms:")
    print(
        f"{'size':>6} {'rcpts':>5} {'no filter p50/p99':>18} {'gpgfilter p50/p99':>18}"
        f" {'added p50/p99':>14}"
    )
    for size, rcpts in cases:
        direct_ms = delays.get(("direct", size, rcpts)) or [0.0]
        filter_ms = delays.get(("lmtp", size, rcpts)) or [0.0]
        p50 = (percentile(direct_ms, 0.5), percentile(filter_ms, 0.5))
        p99 = (percentile(direct_ms, 0.99), percentile(filter_ms, 0.99))
        print(
            f"{size // 1024:>4}KB {rcpts:>5} {p50[0]:>8.0f}/{p99[0]:<9.0f}"
            f" {p50[1]:>8.0f}/{p99[1]:<9.0f}"
            f" {p50[1] - p50[0]:>6.0f}/{p99[1] - p99[0]:<7.0f}"
        )
    if parts:
        print()
        print("CPU ms per message by component (cgroup accounting, median of the rounds):")
        print(
            f"{'size':>6} {'rcpts':>5} {'stack':>9}"
            f" {'postfix':>8} {'dovecot':>8} {'filter':>8} {'sum':>8}"
        )
        for size, rcpts in cases:
            for name in ("direct", "lmtp"):
                values = {
                    part: statistics.median(parts[(name, size, rcpts, part)])
                    for part in ("postfix", "dovecot", "filter")
                    if (name, size, rcpts, part) in parts
                }
                print(
                    f"{size // 1024:>4}KB {rcpts:>5} {name:>9}"
                    + "".join(
                        f" {values.get(p, 0.0):>8.2f}" for p in ("postfix", "dovecot", "filter")
                    )
                    + f" {sum(values.values()):>8.2f}"
                )
    print()
    print("own = the filter's processing (classify, key lookup, encrypt, assemble), delivery")
    print("excluded; total = end of DATA to the last reply, Dovecot's delivery included. Under")
    print("this saturating load both include the wait for a free gpg slot.")


if __name__ == "__main__":
    main()
