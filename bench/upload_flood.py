"""Does a flood of worst-case key uploads slow the filter's mail down?

Starts ``gpgfilter keyserver`` as its own process, then measures the filter's engine (one gpg
encryption of a 10 KB message, as the filter does per recipient) without and then during a
flood of the costliest uploads a stranger can make: a 1 MB key with 7,000 forged "self-
signatures" (dated after the genuine one, hash prefix recomputed, so gpg must verify each) and
a key with 63 made-up user IDs carrying 100 forged self-signatures each. The flood comes from
``--clients`` processes, each uploading in a loop, for as long as the second measurement runs.

    .venv/bin/python bench/upload_flood.py [--messages 300] [--clients 6] [--source DIR]

``--source`` runs the key service from another checkout (e.g. ``git archive`` of an older
commit) for a before/after comparison. Prints the encryption latency (p50/p90/p99) and rate
with and without the flood, the uploads' answers and the key service's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import http.client
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpgfilter.openpgp.engine import Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine
from keystore.validate import decode_keyblock, validate_key
from tests.support.e2e_stack import cpu_seconds
from tests.support.forgery import forged_self_signatures, forged_user_ids
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import KeyFactory

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: bench\r\n\r\n" + b"0123456789abcdef" * 640


async def encrypt_latencies(engine: GnuPGEngine, recipient: Recipient, count: int) -> list[float]:
    await engine.encrypt(MESSAGE, recipient)  # builds the key set's home once
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        await engine.encrypt(MESSAGE, recipient)
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    rate = len(times) / sum(times)
    return (
        f"p50 {pick(0.5):6.1f} ms  p90 {pick(0.9):6.1f} ms  p99 {pick(0.99):6.1f} ms"
        f"  mean {statistics.mean(times) * 1000:6.1f} ms  ({rate:5.1f} encryptions/s)"
    )


def client(port: int, seconds: float, payloads: list[Path], number: int) -> None:
    """One flooding client: uploads the payloads in turn until ``seconds`` have passed; prints
    the statuses it got as JSON."""
    bodies = [p.read_bytes() for p in payloads]
    counts: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request(
                "POST",
                "/api/v1/keys",
                bodies[n % len(bodies)],
                {"Content-Type": "application/json", "X-Forwarded-For": f"198.51.100.{number}"},
            )
            response = conn.getresponse()
            response.read()
            counts[str(response.status)] += 1
        except OSError as error:
            counts[type(error).__name__] += 1
        finally:
            conn.close()
        n += 1
    print(json.dumps(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--source", type=Path, default=ROOT)
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, seconds, number, files = args.client
        client(int(port), float(seconds), [Path(f) for f in files.split(",")], int(number))
        return
    with (
        tempfile.TemporaryDirectory(prefix="buf-", dir="/tmp") as tmp,
        KeyFactory(Path(tmp) / "keys") as factory,
    ):
        root = Path(tmp)
        reader = factory.make("reader@example.test")
        stored = validate_key(reader.public).key
        recipient = Recipient(stored.key_data, tuple(k.fingerprint for k in stored.encryption_keys))
        attacker = factory.make("flood@example.test")
        binary = decode_keyblock(attacker.public)
        payloads = []
        for name, data in (
            ("forged-7000", forged_self_signatures(binary, 7000)),
            ("forged-uids", forged_user_ids(binary, 63, 100)),
        ):
            path = root / f"{name}.json"
            body = {"address": attacker.address, "key_base64": base64.b64encode(data).decode()}
            path.write_text(json.dumps(body))
            payloads.append(path)
            print(f"payload {name}: {len(data) / 1024:.0f} KiB")

        port = free_port()
        config = root / "gpgfilter.yaml"
        config.write_text(
            f"data_dir: {root / 'data'}\nhostname: mail.example.test\nlog_level: warning\n"
            f"keyserver:\n  listen: 127.0.0.1:{port}\n  expiry_check_interval: 0\n"
            f"  relay: 127.0.0.1:{free_port()}\n  trusted_proxies: [127.0.0.1]\n"
            "  rate_limit: {per_client: 1000000, per_address: 1000000}\n"
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"],
            cwd=args.source,
            stderr=(root / "keyserver.log").open("wb"),
        )
        try:
            for _ in range(300):
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                    break
                except OSError:
                    time.sleep(0.1)
            engine = GnuPGEngine(home=root / "engine")
            quiet = asyncio.run(encrypt_latencies(engine, recipient, args.messages))
            print(f"encrypt, no flood:   {summary(quiet)}")
            seconds = sum(quiet) * 1.5 + 5  # the flood outlasts the second measurement
            files = ",".join(str(p) for p in payloads)
            cpu_before = cpu_seconds(server.pid)
            clients = [
                subprocess.Popen(
                    [sys.executable, __file__, "--client", str(port), str(seconds), str(n), files],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for n in range(args.clients)
            ]
            time.sleep(2)  # let the flood reach its steady state
            flooded = asyncio.run(encrypt_latencies(engine, recipient, args.messages))
            print(f"encrypt, with flood: {summary(flooded)}")
            answers: collections.Counter[str] = collections.Counter()
            for proc in clients:
                out, _ = proc.communicate(timeout=seconds + 300)
                answers.update(json.loads(out.strip().splitlines()[-1]))
            cpu = cpu_seconds(server.pid) - cpu_before
            p50 = statistics.median(flooded) / statistics.median(quiet)
            print(f"p50 latency ratio flooded/quiet: {p50:.2f}")
            total = sum(answers.values())
            print(
                f"flood: {args.clients} clients, {total} uploads in {seconds:.0f} s,"
                f" answers {dict(sorted(answers.items()))};"
                f" key service CPU {cpu:.1f} s ({cpu / seconds:.2f} cores)"
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
