"""CPU time per component of a running stack (Postfix, Dovecot, the filter), children that
have already exited included: each component's processes are moved into a cgroup of their
own (cgroup v1 ``cpuacct``), and whatever they fork later is counted there too.

Needs root and a mounted ``cpuacct`` hierarchy; without them the breakdown is skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup/cpuacct")


def available() -> bool:
    return os.geteuid() == 0 and (_ROOT / "cpuacct.usage").exists()


class CpuGroup:
    """One cgroup; :meth:`seconds` is the CPU its members used since they joined."""

    def __init__(self, name: str) -> None:
        self.path = _ROOT / f"gpgfilter-bench-{os.getpid()}-{name}"
        self.path.mkdir(exist_ok=True)

    def adopt(self, pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that exited meanwhile
                (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Hand the members back to the root group, then delete the group."""
        if not self.path.exists():
            return
        for line in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (_ROOT / "cgroup.procs").write_text(f"{line}\n")
        with contextlib.suppress(OSError):
            self.path.rmdir()


@contextlib.contextmanager
def groups(names: Iterable[str], *, prefix: str) -> Iterator[dict[str, CpuGroup]]:
    made = {name: CpuGroup(f"{prefix}-{name}") for name in names}
    try:
        yield made
    finally:
        for group in made.values():
            group.remove()
