"""How every gpg run of ours is invoked, shared by the registry (validation) and the engines
above it."""

from __future__ import annotations

GPG_OPTIONS = [
    # Every gpg process locks the random seed file: concurrent encryptions queue on it.
    "--no-random-seed-file",
    # Never look keys up anywhere: we name each key by fingerprint from our own store.
    "--no-auto-key-retrieve",
    "--auto-key-locate",
    "local",
    "--no-greeting",
    # Public-key work needs no agent; without this, importing starts one per gpg home.
    "--no-autostart",
    "--no-permission-warning",
]


def status_keywords(stderr: bytes) -> set[str]:
    """The keywords of gpg's ``[GNUPG:]`` status lines (never their arguments: no key data)."""
    found = set()
    for line in stderr.splitlines():
        if line.startswith(b"[GNUPG:] "):
            words = line.split()
            if len(words) > 1:
                found.add(words[1].decode("ascii", "replace"))
    return found
