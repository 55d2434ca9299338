"""Dovecot as setup sees it: the LMTP listeners ``doveconf`` reports, and the drop-in that
adds the one the filter delivers to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpgfilter.ops.commands import Runner, SetupError, run_command
from gpgfilter.process.config import Endpoint

DEFAULT_DOVECOT_CONFIG = Path("/etc/dovecot/dovecot.conf")
DOVECOT_DROP_IN = "99-gpgfilter.conf"


@dataclass(frozen=True, slots=True)
class DovecotListeners:
    inet: tuple[Endpoint, ...]
    unix: tuple[str, ...]


def dovecot_lmtp_listeners(config_file: Path, run: Runner = run_command) -> DovecotListeners | None:
    """Dovecot's LMTP listeners as ``doveconf`` reports them; None without Dovecot."""
    if not config_file.exists():
        return None
    try:
        done = run(["doveconf", "-c", str(config_file), "service/lmtp"])
    except FileNotFoundError:
        return None
    if done.returncode != 0:
        raise SetupError(f"doveconf -c {config_file}: {done.stderr.strip()}")
    inet: list[Endpoint] = []
    unix: list[str] = []
    base_dir = "/run/dovecot"
    base = run(["doveconf", "-c", str(config_file), "-h", "base_dir"])
    if base.returncode == 0 and base.stdout.strip():
        base_dir = base.stdout.strip()
    for kind, body in re.findall(r"(inet|unix)_listener \S+ \{(.*?)\}", done.stdout, re.S):
        settings = dict(re.findall(r"^\s*(\w+) = ?(.*)$", body, re.M))
        if kind == "inet":
            port = settings.get("port", "0")
            addresses = settings.get("address", "").split() or ["*"]
            for address in addresses:
                if port.isdigit() and int(port) > 0:
                    inet.append(Endpoint(address, int(port)))
        else:
            path = settings.get("path", "")
            if path and not path.startswith("/"):
                path = f"{base_dir}/{path}"
            unix.append(path)
    names = re.findall(r"unix_listener (\S+) \{", done.stdout)
    unix = [p if p else f"{base_dir}/{n}" for p, n in zip(unix, names, strict=True)]
    return DovecotListeners(tuple(inet), tuple(unix))


def serves(listeners: DovecotListeners, target: Endpoint) -> bool:
    if target.is_unix:
        return target.path in listeners.unix
    wildcard = {"*", "0.0.0.0"} if ":" not in target.host else {"::", "[::]"}  # noqa: S104
    return any(
        e.port == target.port and (e.host == target.host or e.host in wildcard)
        for e in listeners.inet
    )


def dovecot_drop_in(target: Endpoint) -> str:
    """A Dovecot LMTP listener where the filter delivers (as ``postfix/dovecot/lmtp.conf``)."""
    return (
        "# Written by `gpgfilter setup`: the LMTP listener gpgfilter delivers to.\n"
        "# `gpgfilter setup --undo` removes this file.\n"
        "protocols = $protocols lmtp\n"
        "service lmtp {\n"
        "  inet_listener lmtp {\n"
        f"    address = {target.host}\n"
        f"    port = {target.port}\n"
        "  }\n"
        "}\n"
        "quota_full_tempfail = yes\n"
    )
