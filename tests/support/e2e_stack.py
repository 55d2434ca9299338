"""The whole product stack on loopback: private Dovecot, private Postfix and the gpgfilter
command running as a real process — for the end-to-end tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tests.support.mailstack import Dovecot, Postfix, free_port, stop_all

GPG_FAULTS = ("exit-2", "empty-output")


class FilterProcess:
    """``gpgfilter serve`` with a config of its own, started and stopped by the test.

    gpg is reached through a wrapper that can be told to fail (:meth:`set_gpg_fault`), so a
    test can break encryption in the running process and mend it again.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: str,
        port: int,
        deliver_port: int,
        extra_yaml: str = "",
        listen: str = "",
        deliver: str = "",
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.port = port
        self.metrics_port = free_port()
        self.data_dir = root / "data"
        self.log_path = root / "gpgfilter.log"
        self.config_path = root / "gpgfilter.yaml"
        self.gpg_wrapper = root / "gpg"
        self._fault = root / "gpg-fault"
        self._write_gpg_wrapper()
        self.config_path.write_text(
            f"mode: {mode}\n"
            f"listen: {listen or f'127.0.0.1:{port}'}\n"
            f"deliver: {deliver or f'127.0.0.1:{deliver_port}'}\n"
            f"data_dir: {self.data_dir}\n"
            "hostname: filter.test\n"
            "log_level: info\n"
            f"gpg:\n  binary: {self.gpg_wrapper}\n{extra_yaml}"
            f"metrics:\n  listen: 127.0.0.1:{self.metrics_port}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def _write_gpg_wrapper(self) -> None:
        self.gpg_wrapper.write_text(
            "#!/bin/sh\n"
            f'fault=$(cat "{self._fault}" 2>/dev/null)\n'
            'case " $* " in *" --encrypt "*)\n'
            '  case "$fault" in\n'
            "    exit-2) cat >/dev/null; echo 'gpg: simulated failure' >&2; exit 2;;\n"
            "    empty-output) cat >/dev/null; exit 0;;\n"
            "  esac;;\n"
            "esac\n"
            'exec gpg "$@"\n'
        )
        self.gpg_wrapper.chmod(self.gpg_wrapper.stat().st_mode | stat.S_IEXEC)

    def set_gpg_fault(self, fault: str | None) -> None:
        if fault is None:
            self._fault.unlink(missing_ok=True)
        else:
            assert fault in GPG_FAULTS
            self._fault.write_text(fault)

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpgfilter", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def import_key(self, key: bytes, address: str | None = None) -> None:
        key_file = self.root / "upload.asc"
        key_file.write_bytes(key)
        extra = ["--address", address] if address else []
        done = self.command("keys", "import", *extra, str(key_file))
        assert done.returncode == 0, done.stderr

    def start(self) -> None:
        ready = "metrics and health on"  # logged once the listener and the metrics are up
        earlier = self.log().count(ready)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpgfilter", "-c", str(self.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while self.log().count(ready) == earlier:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gpgfilter did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Stack:
    """Dovecot + Postfix (+ gpgfilter unless ``mode == "direct"``), on free loopback ports;
    with ``unix=True`` (LMTP mode and direct only) Postfix and the filter reach the next hop
    over unix sockets instead."""

    def __init__(
        self,
        root: Path,
        *,
        mode: str,
        users: list[str],
        domains: tuple[str, ...] = ("example.test",),
        gpg_yaml: str = "",
        unix: bool = False,
    ) -> None:
        self.root = root
        self.mode = mode
        self.unix = unix
        self.dovecot = Dovecot(root / "dovecot")
        for user in users:
            self.dovecot.add_user(user)
        filter_port = free_port() if mode != "direct" else None
        self.postfix = Postfix(
            root / "postfix",
            mode=mode,
            dovecot_lmtp_port=self.dovecot.lmtp_port,
            domains=list(domains),
            filter_port=filter_port,
        )
        self.filter: FilterProcess | None = None
        if filter_port is not None:
            deliver = self.postfix.reinject_port or self.dovecot.lmtp_port
            self.filter = FilterProcess(
                root / "gpgfilter",
                mode="smtp" if mode == "content_filter" else "lmtp",
                port=filter_port,
                deliver_port=deliver,
                extra_yaml=gpg_yaml,
                listen=f"unix:{self.filter_socket}" if unix else "",
                deliver=f"unix:{self.dovecot.base_dir / 'lmtp'}" if unix else "",
            )

    @property
    def filter_socket(self) -> Path:
        return self.root / "gpgfilter-lmtp"

    def start(self) -> Stack:
        try:
            self.dovecot.start()
            if self.filter is not None:
                self.filter.start()
            if self.unix:  # the harness's Postfix is not chrooted: absolute paths work
                to = self.filter_socket if self.filter else self.dovecot.base_dir / "lmtp"
                self.postfix.apply_main_cf([f"virtual_transport=lmtp:unix:{to}"])
            self.postfix.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.filter is not None:
            self.filter.stop()
        stop_all(self.postfix, self.dovecot)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (gpg runs as children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")
