"""``gpgfilter doctor``: check every part the mail path depends on and say what to fix.

Each check gives one line, ok / warn / fail, and for anything not ok the fix. The checks read
only: they never change the configuration, the store or Postfix.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpgfilter.openpgp.engine import Recipient
from gpgfilter.openpgp.factory import engine_summary, uses_sequoia
from gpgfilter.ops.commands import SetupError
from gpgfilter.ops.postfix import (
    ROUTE_MAP,
    Postconf,
    content_filter,
    lmtp_parameters,
    probe_failed,
    route_probe,
    route_table,
)
from gpgfilter.process.config import Config, ConfigError, Endpoint, load
from keystore.model import Binding
from keystore.storage.open import open_store
from keystore.store import StoreError, StoreUnavailable

MIN_GPG = (2, 2)
PYSEQUOIA = "0.1.35"  # as pinned in pyproject.toml
# Longer than libpq's connect_timeout (5 s), so that its own message says what went wrong.
STORE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Check:
    status: str  # "ok", "warn" or "fail"
    what: str
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        line = f"{self.status:<4} {self.what}: {self.detail}"
        return f"{line}\n     fix: {self.fix}" if self.fix else line


def _ok(what: str, detail: str) -> Check:
    return Check("ok", what, detail)


def _warn(what: str, detail: str, fix: str) -> Check:
    return Check("warn", what, detail, fix)


def _fail(what: str, detail: str, fix: str) -> Check:
    return Check("fail", what, detail, fix)


def run_checks(
    config_path: Path | None, postfix_dir: Path | None, *, days: int = 14
) -> Iterator[Check]:
    """Every check, in the order a message meets the parts."""
    try:
        config = load(config_path)
    except ConfigError as error:
        yield _fail("config", str(error), "correct the file; `gpgfilter doctor` checks it again")
        return
    yield _ok("config", f"{config_path or 'embedded defaults'} is valid ({config.mode} mode)")
    if postfix_dir is not None:
        yield check_postfix(config, postfix_dir)
    yield check_listener(config)
    yield check_downstream(config)
    yield from check_gpg(config)
    yield check_engine(config)
    yield from check_keystore(config, days)
    yield check_health(config)


# -- Postfix ---------------------------------------------------------------------------------


def check_postfix(config: Config, postfix_dir: Path) -> Check:
    what = "postfix"
    try:
        postconf = Postconf(postfix_dir)
        maps = postconf.explicit("transport_maps") or ""
        if config.route == "enrolled" or ROUTE_MAP in maps:
            return _check_route(config, postconf, maps)
        if config.mode == "lmtp":
            target = lmtp_parameters(config)["virtual_transport"]
            routes = {
                name: postconf.effective(name)
                for name in ("virtual_transport", "mailbox_transport")
            }
            routed = [name for name, value in routes.items() if value == target]
            if routed:
                return _ok(what, f"{' and '.join(routed)} = {target}")
            shown = ", ".join(f"{k} = {v or '(none)'}" for k, v in routes.items())
            return _fail(what, f"Postfix does not deliver to gpgfilter ({shown})", _SETUP_FIX)
        value = postconf.effective("content_filter")
        wanted = content_filter(config.listen)
        if value != wanted:
            return _fail(what, f"content_filter = {value or '(none)'}, not {wanted}", _SETUP_FIX)
        if postconf.service("gpgfilter/unix") is None:
            return _fail(what, "master.cf has no gpgfilter/unix service", _SETUP_FIX)
        return _ok(what, f"content_filter = {wanted}")
    except (SetupError, OSError) as error:
        return _fail(what, str(error), "run doctor with -c DIR naming Postfix's configuration")


_SETUP_FIX = "gpgfilter setup (see --dry-run first)"


def _check_route(config: Config, postconf: Postconf, maps: str) -> Check:
    """Routing by enrolment: the table is named, the configuration agrees, and Postfix's own
    user gets an answer from the store through it (else enrolled mail is deferred)."""
    what = "postfix route"
    table = route_table(postconf, config)
    if table not in maps:
        return _fail(
            what,
            f"route: enrolled, but transport_maps does not name {table}",
            "gpgfilter setup --route enrolled (see --dry-run first)",
        )
    if config.route != "enrolled":
        return _fail(
            what,
            "Postfix routes only enrolled recipients to the filter, but the configuration says"
            " route: all",
            "add route: enrolled to the configuration (or gpgfilter setup --undo)",
        )
    owner = postconf.effective("mail_owner") or "postfix"
    done = subprocess.run(
        route_probe(postconf, config, postconf.expanded("virtual_mailbox_domains"), owner),
        capture_output=True,
        text=True,
        timeout=STORE_TIMEOUT,
        check=False,
    )
    if probe_failed(done.returncode, done.stderr):
        return _fail(
            what,
            f"Postfix ({owner}) cannot query the key store: {done.stderr.strip()[-200:]}",
            "give Postfix's user read access to the store (docs/install.md); until then mail"
            " for the mailbox domains is deferred",
        )
    others = postconf.effective("virtual_transport")
    return _ok(what, f"enrolled recipients via {table}; the others via {others}")


# -- network ---------------------------------------------------------------------------------


def _greeting(endpoint: Endpoint, timeout: float = 5.0) -> str:
    family = socket.AF_UNIX if endpoint.is_unix else socket.AF_INET6
    if not endpoint.is_unix and ":" not in endpoint.host:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(endpoint.path if endpoint.is_unix else (endpoint.host, endpoint.port))
        greeting = sock.recv(512).decode("ascii", "replace").strip()
        sock.sendall(b"QUIT\r\n")
    return greeting


def check_listener(config: Config) -> Check:
    what = "filter listener"
    try:
        greeting = _greeting(config.listen)
    except OSError as error:
        return _fail(
            what,
            f"nothing answers on {config.listen} ({error.strerror or error})",
            "systemctl start gpgfilter; then journalctl -u gpgfilter",
        )
    if not greeting.startswith("220") or "gpgfilter" not in greeting:
        return _fail(what, f"{config.listen} answers but is not gpgfilter", "check listen:")
    return _ok(what, f"gpgfilter answers on {config.listen}")


def check_downstream(config: Config) -> Check:
    target = config.deliver_to
    if config.mode == "lmtp":
        what, name = "dovecot lmtp", "Dovecot's LMTP"
        fix = f"start Dovecot, or give it an LMTP listener on {target} (gpgfilter setup does)"
    else:
        what, name = "reinjection", "Postfix's reinjection smtpd"
        fix = "gpgfilter setup adds the reinjection smtpd to master.cf; then postfix reload"
    try:
        greeting = _greeting(target)
    except OSError as error:
        return _fail(what, f"{name} does not answer on {target} ({error.strerror or error})", fix)
    if not greeting.startswith("220"):
        return _fail(what, f"{target} answers {greeting[:60]!r}", fix)
    return _ok(what, f"{name} answers on {target}")


def check_health(config: Config) -> Check:
    what = "metrics and health"
    if not config.metrics.enabled:
        return _warn(what, "metrics are disabled", "metrics: {enabled: true} to watch the filter")
    url = f"http://{config.metrics.listen}/health"
    try:
        # /health asks the store and waits for it up to keystore.lookup_timeout.
        with urllib.request.urlopen(url, timeout=config.keystore.lookup_timeout + 5) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read() or b"{}")
        return _fail(
            what,
            f"{url} says {body.get('status', error.code)}: {body.get('checks', {})}",
            "see the checks above and the filter's log",
        )
    except (OSError, ValueError) as error:
        return _fail(what, f"{url} does not answer ({error})", "is the filter running?")
    return _ok(what, f"{url} reports {body.get('status')}")


# -- gpg -------------------------------------------------------------------------------------


def check_gpg(config: Config) -> Iterator[Check]:
    binary = config.gpg.binary
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as error:
        yield _fail("gpg", f"cannot run {binary}: {error.strerror}", "apt install gnupg")
        return
    match = re.search(r"\(GnuPG\) (\d+)\.(\d+)\.(\d+)", done.stdout)
    if done.returncode != 0 or not match:
        yield _fail("gpg", f"{binary} --version failed", "apt install gnupg")
        return
    version = tuple(int(part) for part in match.groups())
    if version[:2] < MIN_GPG:
        yield _fail("gpg", f"GnuPG {'.'.join(map(str, version))} is too old", "GnuPG 2.2 or later")
    else:
        yield _ok("gpg", f"GnuPG {'.'.join(map(str, version))} ({binary})")
    home = config.gnupg_home
    try:
        info = home.stat()
    except FileNotFoundError:
        yield _ok("gpg home", f"{home} is made at the first encrypted message")
        return
    except OSError as error:
        yield _fail(
            "gpg home", f"cannot read {home}: {error.strerror}", "chown -R to the filter user"
        )
        return
    problems = []
    if stat.S_IMODE(info.st_mode) & 0o077:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):o} lets others in")
    if info.st_uid != os.geteuid():
        problems.append(f"owned by uid {info.st_uid}, not {os.geteuid()}")
    if not os.access(home, os.W_OK | os.X_OK):
        problems.append("not writable")
    if problems:
        yield _fail(
            "gpg home",
            f"{home}: {', '.join(problems)}",
            f"chown -R gpgfilter: {home} && chmod 700 {home} (run doctor as the filter's user)",
        )
    else:
        yield _ok("gpg home", f"{home} is private (700) and writable")
    configs = [p for p in home.rglob("gpg.conf")] if home.is_dir() else []
    if configs:
        yield _warn(
            "gpg options",
            f"{configs[0]} exists: the filter passes its options on the command line",
            f"remove {configs[0]}; options there (auto-key-retrieve, keyserver) do not belong",
        )


def check_engine(config: Config) -> Check:
    """Which engine encrypts, and what serves what; pysequoia that does not import is a
    failure when the configuration needs it (the filter would not start)."""
    what = "engine"
    summary = engine_summary(config.gpg)
    if not uses_sequoia(config.gpg):
        return _ok(what, summary)
    try:
        import pysequoia  # noqa: F401, PLC0415  # a failed import is what this checks
    except ImportError as error:
        return _fail(
            what,
            f"gpg.engine {config.gpg.engine} needs pysequoia, which does not import ({error})",
            f"reinstall gpgfilter (it pins pysequoia=={PYSEQUOIA}), or set gpg.engine: gnupg",
        )
    installed = importlib.metadata.version("pysequoia")
    if installed != PYSEQUOIA:
        return _warn(
            what,
            f"{summary}; pysequoia {installed} is installed, this release is tested with"
            f" {PYSEQUOIA} (its API is not stable)",
            f"reinstall gpgfilter (pip install . pins pysequoia=={PYSEQUOIA})",
        )
    return _ok(what, f"{summary} (pysequoia {installed}; gpg as above)")


def _check_engine_keys(bindings: list[Binding], config: Config) -> Check:
    """How many stored keys the configured engine serves with Sequoia and with gpg, decided
    as the filter decides (a trial encryption per key, checked)."""
    what = "engine per key"
    if not uses_sequoia(config.gpg):
        return _ok(what, "gpg serves every key")
    try:
        from gpgfilter.openpgp.sequoia import SequoiaEngine, Unsupported  # noqa: PLC0415
    except ImportError:
        return _fail(what, "pysequoia does not import", "see the engine check")
    engine = SequoiaEngine(cache_size=1)
    by_gpg: list[Binding] = []
    served: dict[str, bool] = {}
    now = time.time()
    for binding in bindings:
        key = binding.key
        if key.fingerprint not in served:
            fingerprints = key.usable_encryption_keys(now)
            if not fingerprints:
                continue
            try:
                engine.prepare(Recipient(key.key_data, fingerprints))
                served[key.fingerprint] = True
            except Unsupported:
                served[key.fingerprint] = False
        if not served[key.fingerprint]:
            by_gpg.append(binding)
    fast = sum(served.values())
    detail = f"{fast} key(s) by Sequoia, {len(served) - fast} by gpg"
    if by_gpg:
        detail += f" ({_addresses(by_gpg)}: their keys advertise what clients cannot read)"
    return _ok(what, detail)


# -- key store -------------------------------------------------------------------------------


def check_keystore(config: Config, days: int) -> Iterator[Check]:
    what = "key store"
    try:
        bindings = _read_bindings(config)
    except StoreUnavailable as error:
        # Down is not lost: restoring a backup over a database that merely stopped answering
        # would throw away every key registered since.
        yield _fail(
            what,
            f"the key store's database does not answer ({error})",
            "check PostgreSQL: `systemctl status postgresql` and its log on the database host,"
            " and that this host reaches it as keystore.dsn says (host, port, pg_hba.conf);"
            " nothing is lost, mail for enrolled users is deferred until it answers",
        )
        return
    except StoreError as error:
        missing = config.keystore.backend == "sqlite" and not config.keystore_path.exists()
        yield _fail(
            what,
            f"{config.keystore_path} is missing" if missing else str(error),
            "restore the store from backup, or `gpgfilter keys import` to create it;"
            " until then mail for enrolled users is deferred",
        )
        return
    where = "PostgreSQL" if config.keystore.backend == "postgresql" else str(config.keystore_path)
    yield _ok(what, f"{where}: {len({b.address for b in bindings})} address(es) enrolled")
    yield _check_consistency(bindings, config.gpg.binary)
    yield _check_engine_keys(bindings, config)
    now = time.time()
    soon = now + days * 86400
    dead = [b for b in bindings if not b.key.usable_encryption_keys(now)]
    expiring = [b for b in bindings if b not in dead and not b.key.usable_encryption_keys(soon)]
    if dead:
        yield _warn(
            "unusable keys",
            f"{_addresses(dead)} can no longer be encrypted to; their mail is"
            " handled by policy.unusable_key",
            "ask them to upload a renewed or new key",
        )
    else:
        yield _ok("unusable keys", "none")
    if expiring:
        yield _warn(
            "expiring keys",
            f"{_addresses(expiring)} expire within {days} days",
            "ask them to extend their key's expiry and upload it again",
        )
    else:
        yield _ok("expiring keys", f"none within {days} days")


def _read_bindings(config: Config, timeout: float = STORE_TIMEOUT) -> list[Binding]:
    """Every binding, or ``StoreUnavailable`` when the store gives no answer in ``timeout``.

    The store is read in a daemon thread: a frozen database holds that thread (no timeout of
    libpq fires while the kernel still acknowledges), and doctor must still finish its report.
    """
    outcome: list[list[Binding] | StoreError] = []

    def read() -> None:
        try:
            store = open_store(config.keystore, config.keystore_path, create=False)
            try:
                outcome.append(store.bindings())
            finally:
                store.close()
        except StoreError as error:
            outcome.append(error)

    thread = threading.Thread(target=read, name="doctor-keystore", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise StoreUnavailable(f"no answer within {timeout:g}s")
    result = outcome[0]
    if isinstance(result, StoreError):
        raise result
    return result


def _addresses(bindings: list[Binding]) -> str:
    names = sorted({b.address for b in bindings})
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_consistency(bindings: list[Binding], binary: str) -> Check:
    """gpg must read each stored key as the store describes it: same primary, and every
    encryption subkey the store would encrypt to present and able to encrypt."""
    what = "store and gpg agree"
    keys = {b.key.fingerprint: b.key for b in bindings}
    if not keys:
        return _ok(what, "no keys to compare")
    try:
        done = subprocess.run(
            [binary, "--batch", "--with-colons", "--import-options", "show-only", "--import"],
            input=b"".join(k.key_data for k in keys.values()),
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return _fail(what, f"gpg could not read the stored keys ({error})", "see the gpg check")
    seen: dict[str, set[str]] = {}  # primary -> its (sub)keys gpg says can encrypt
    primary = ""
    kind, caps = "", ""
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub") and len(fields) > 11:
            kind, caps = fields[0], fields[11]
        elif fields[0] == "fpr" and kind and len(fields) > 9:
            if kind == "pub":
                primary = fields[9]
                seen[primary] = set()
            if "e" in caps:
                seen[primary].add(fields[9])
            kind = ""
    wrong = []
    for fpr, key in keys.items():
        usable = set(key.usable_encryption_keys())
        if fpr not in seen or not usable <= seen[fpr]:
            wrong.append(fpr)
    if wrong:
        shown = ", ".join(w[-16:] for w in wrong[:5])
        return _fail(
            what,
            f"{len(wrong)} stored key(s) differ from what gpg reads: {shown}",
            "re-import them with `gpgfilter keys import`; the store was edited or damaged",
        )
    return _ok(what, f"{len(keys)} key(s) read by gpg as stored")
