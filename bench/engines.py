"""Time, CPU and memory per encrypted message for each way of running OpenPGP.

    .venv/bin/python bench/engines.py [--rounds 200] [--skip-memory]

Engines, all to one RSA-3072 key made by gpg, armored, uncompressed:
- gnupg: the product's GnuPGEngine, one gpg process per message;
- gpg-server: a prototype of one long-lived ``gpg --server`` (Assuan). gpg 2.2 refuses
  descriptor passing on its stdin socket, so the prototype hands it a stock of inherited
  descriptors (duplicates of two memfds) at start and restarts it when they run out;
- sequoia: the product's SequoiaEngine (pysequoia, certificate prepared once), in-process;
- auto: the product's AutoEngine (Sequoia up to 1 MiB, gpg above).
CPU is this process plus its children (gpg). Memory: the peak resident-set growth of a fresh
process encrypting one 20 MB message (children included), against the message size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.choice import AutoEngine
from gpgfilter.openpgp.engine import Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine
from gpgfilter.openpgp.sequoia import SequoiaEngine
from keystore.validate import validate_key
from tests.support.openpgp_tools import KeyFactory

SIZES = {"10 KB": 10_000, "50 KB": 50_000, "1 MB": 1 << 20, "20 MB": 20 << 20}


class GpgServer:
    """One ``gpg --server`` for one gpg home; each ENCRYPT consumes one pair of descriptors."""

    STOCK = 500

    def __init__(self, home: Path) -> None:
        self.home = home
        self.inp = os.memfd_create("in")
        self.out = os.memfd_create("out")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu = 0.0  # of servers already stopped

    def _start(self) -> None:
        self.fds = [os.dup(fd) for _ in range(self.STOCK) for fd in (self.inp, self.out)]
        ours, theirs = socket.socketpair()
        argv = ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--no-random-seed-file"]
        argv += ["--no-autostart", "--trust-model", "always", "--lock-never"]
        argv += ["--compress-level", "0", "--armor", "--server"]
        self.proc = subprocess.Popen(
            argv, stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL, pass_fds=self.fds
        )
        theirs.close()
        for fd in self.fds:
            os.close(fd)
        self.sock = ours
        self.reader = ours.makefile("rb")
        self._reply()

    def _reply(self) -> bytes:
        while True:
            line = self.reader.readline()
            if line.startswith(b"ERR") or not line:
                raise RuntimeError(f"gpg --server: {line!r}")
            if line.startswith(b"OK"):
                return line

    def stop(self) -> None:
        if self.proc is None:
            return
        self.sock.sendall(b"BYE\n")
        self.proc.wait()
        self.cpu += _child_cpu_now()  # reaped: now in RUSAGE_CHILDREN
        self.sock.close()
        self.reader.close()
        self.proc = None

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        if self.proc is None or not self.fds:
            self.stop()
            self._start()
        inp, out = self.fds.pop(0), self.fds.pop(0)
        for fd in (self.inp, self.out):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        os.write(self.inp, plaintext)
        os.lseek(self.inp, 0, os.SEEK_SET)
        script = b"".join(b"RECIPIENT %s!\n" % f.encode() for f in recipient.encryption_keys)
        script += b"INPUT FD=%d\nOUTPUT FD=%d\nENCRYPT\n" % (inp, out)
        self.sock.sendall(script)
        for _ in range(len(recipient.encryption_keys) + 3):
            self._reply()
        size = os.lseek(self.out, 0, os.SEEK_END)
        os.lseek(self.out, 0, os.SEEK_SET)
        return os.read(self.out, size).replace(b"\n", b"\r\n")


def _child_cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_engine(name: str, root: Path, gpg_home: Path) -> object:
    if name == "gnupg":
        return GnuPGEngine(home=root / "gnupg")
    if name == "gpg-server":
        return GpgServer(gpg_home)
    if name == "sequoia":
        return SequoiaEngine()
    return AutoEngine(SequoiaEngine(), GnuPGEngine(home=root / "auto"))


async def measure(
    engine: object, recipient: Recipient, size: int, rounds: int
) -> tuple[float, float]:
    data = os.urandom(size)
    encrypt = engine.encrypt  # type: ignore[attr-defined]
    check_ciphertext(await encrypt(data, recipient), recipient)  # warm: homes, caches
    server_cpu = engine.cpu_seconds if isinstance(engine, GpgServer) else lambda: 0.0
    cpu0 = time.process_time() + _child_cpu_now() + server_cpu()
    wall0 = time.perf_counter()
    for _ in range(rounds):
        await encrypt(data, recipient)
    wall = (time.perf_counter() - wall0) / rounds
    cpu = (time.process_time() + _child_cpu_now() + server_cpu() - cpu0) / rounds
    return wall * 1000, cpu * 1000


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory(name: str, root: Path, gpg_home: Path, recipient: Recipient) -> tuple[float, float]:
    """Run in a fresh process (see --memory-child): this process's peak RSS growth and the
    largest gpg child's peak, in MB. For gpg-server the two memfds (plaintext and output,
    memory that neither process's RSS shows) are added to the child's figure."""
    engine = make_engine(name, root, gpg_home)
    asyncio.run(engine.encrypt(b"warm", recipient))  # type: ignore[attr-defined]
    if isinstance(engine, GpgServer):
        engine.stop()
    parts = [os.urandom(1 << 20) for _ in range(20)]  # as the filter holds a message: pieces
    plaintext = parts if name != "gpg-server" else b"".join(parts)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    armored = asyncio.run(engine.encrypt(plaintext, recipient))  # type: ignore[attr-defined]
    check_ciphertext(armored, recipient)
    grown = _status_kb("VmHWM") - before
    child = 0
    if isinstance(engine, GpgServer):
        child = (os.fstat(engine.inp).st_size + os.fstat(engine.out).st_size) // 1024
        engine.stop()
    if name != "sequoia":
        child += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return grown / 1024, child / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, root, home = args.memory_child
        key = (Path(home) / "public.asc").read_bytes()
        stored = validate_key(key).key
        recipient = Recipient(stored.key_data, stored.usable_encryption_keys())
        grown, child = memory(name, Path(root), Path(home), recipient)
        print(f"{grown:.1f} {child:.1f}")
        return
    names = ["gnupg", "gpg-server", "sequoia", "auto"]
    with tempfile.TemporaryDirectory() as tmp, KeyFactory(Path(tmp) / "keys") as keys:
        key = keys.make("bench@example.test", algo="rsa3072")
        stored = validate_key(key.public).key
        recipient = Recipient(stored.key_data, stored.usable_encryption_keys())
        print("ms per message, wall / CPU (this process + gpg), RSA-3072, armored, no compression")
        print(f"{'engine':<11}" + "".join(f"{label:>20}" for label in SIZES))
        for name in names:
            engine = make_engine(name, Path(tmp), key.home)
            cells = []
            for size in SIZES.values():
                rounds = max(3, min(args.rounds, args.rounds * 50_000 // size))
                wall, cpu = asyncio.run(measure(engine, recipient, size, rounds))
                cells.append(f"{wall:8.2f} / {cpu:7.2f}")
            if isinstance(engine, GpgServer):
                engine.stop()
            print(f"{name:<11}" + "".join(f"{c:>20}" for c in cells), flush=True)
        if args.skip_memory:
            return
        print("\npeak RSS growth for one 20 MB message held as 20 pieces (fresh process)")
        for name in names:
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, tmp, str(key.home)],
                capture_output=True,
                text=True,
                check=True,
            )
            grown, gpg = (float(x) for x in child.stdout.split()[-2:])
            total = grown + gpg
            print(
                f"{name:<11} {grown:6.1f} MB here + {gpg:5.1f} MB in gpg"
                f" = {total / 20:.2f} x the message"
            )


if __name__ == "__main__":
    main()
