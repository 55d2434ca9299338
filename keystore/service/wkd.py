"""Web Key Directory (draft-koch-openpgp-webkey-service): registered keys served over HTTPS.

A client looks up ``alice@example.org`` at ``https://openpgpkey.example.org/.well-known/
openpgpkey/example.org/hu/HASH?l=alice`` (advanced layout) or, failing that, at
``https://example.org/.well-known/openpgpkey/hu/HASH?l=alice`` (direct layout), where HASH is
the z-base-32 form of the SHA-1 of the lower-cased local part. Only keys that are active in the
store are served: an upload waiting for confirmation, a revoked or a removed key gives 404.

The HTTP service mounts :func:`wkd_routes`; where the keys come from is a :class:`WkdLookup`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Protocol

from aiohttp import web

from keystore.model import StoredKey
from keystore.store import KeyStore, StoreError

log = logging.getLogger(__name__)

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"
_HASH = re.compile(f"^[{_ZBASE32}]{{32}}$")
WELL_KNOWN = "/.well-known/openpgpkey"
CORS = {"Access-Control-Allow-Origin": "*"}
# Store reads for WKD run in threads, at most this many at once, so that a flood of lookups (or
# a slow store) cannot take every worker thread the registration API needs; a lookup that
# waits longer than LOOKUP_WAIT seconds for its turn gets 503 with Retry-After.
LOOKUPS_AT_ONCE = 4
LOOKUP_WAIT = 5.0


def zbase32(data: bytes) -> str:
    """z-base-32 (RFC 6189 section 5.1.6), the encoding of WKD hashes and of WKS nonces."""
    count = len(data) * 8
    chars = -(-count // 5)
    bits = int.from_bytes(data, "big") << (chars * 5 - count)  # pad the last group with zeros
    return "".join(_ZBASE32[(bits >> (5 * i)) & 31] for i in reversed(range(chars)))


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only, as GnuPG does: a non-ASCII local part keeps its case in the hash."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def wkd_hash(local_part: str) -> str:
    """The WKD identifier of a local part: z-base-32 of SHA-1 of its lower-cased UTF-8."""
    digest = hashlib.sha1(ascii_lower(local_part).encode("utf-8"), usedforsecurity=False)
    return zbase32(digest.digest())


def wkd_urls(address: str) -> tuple[str, str]:
    """(advanced, direct) URLs of an address's key, for documentation and messages."""
    local, _, domain = address.rpartition("@")
    domain = domain.lower()
    tail = f"hu/{wkd_hash(local)}?l={ascii_lower(local)}"
    return (
        f"https://openpgpkey.{domain}{WELL_KNOWN}/{domain}/{tail}",
        f"https://{domain}{WELL_KNOWN}/{tail}",
    )


def publishable(key: StoredKey, now: float | None = None) -> bool:
    """Whether a bound key is published: not revoked, and able to encrypt now."""
    return not key.revoked and bool(key.usable_encryption_keys(now))


class WkdLookup(Protocol):
    """What the WKD routes need to know; every method may block (they run in a thread)."""

    def serves(self, domain: str) -> bool:
        """Whether ``domain`` (lower case) is published here at all."""
        ...

    def key(self, domain: str, hashed: str, local: str | None) -> bytes | None:
        """The binary key(s) for a WKD hash in ``domain``; ``local`` is the ``l=`` parameter
        when given. None when nothing is published there."""
        ...

    def policy(self, domain: str) -> bytes:
        """The policy file's content."""
        ...

    def submission_address(self, domain: str) -> str | None:
        """The WKS submission address for ``domain``; None when WKS is not offered."""
        ...


class StoreWkdLookup:
    """Serves the active keys of a :class:`KeyStore`, and the WKS submission address's key.

    A lookup with ``l=`` (every GnuPG since 2.1.23 sends it) reads the one address from the
    store. Without it the hash is all there is, so a hash-to-address index is built from the
    store's bindings and reused for ``index_seconds``.
    """

    def __init__(
        self,
        store: KeyStore,
        domains: Iterable[str],
        *,
        submission_address: str = "",
        submission_key: bytes = b"",
        pending_seconds: int | None = None,
        index_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.domains = frozenset(d.lower() for d in domains)
        self.submission = submission_address.lower()
        self.submission_key = submission_key
        self.pending_seconds = pending_seconds
        self.index_seconds = index_seconds
        self._index: dict[tuple[str, str], list[str]] = {}
        self._index_built = -float("inf")
        self._lock = threading.Lock()

    def serves(self, domain: str) -> bool:
        return domain in self.domains

    def key(self, domain: str, hashed: str, local: str | None) -> bytes | None:
        if domain not in self.domains:
            return None
        if local is not None:
            if wkd_hash(local) != hashed:
                return None  # the hash is authoritative; ``l`` only names the address
            candidates = [f"{local.lower()}@{domain}"]
        else:
            candidates = self._addresses_for(domain, hashed)
        for address in candidates:
            if address == self.submission and self.submission_key:
                return self.submission_key
            keys = [k for k in self.store.keys_for(address) if publishable(k)]
            if keys:
                return b"".join(k.key_data for k in keys)
        return None

    def _addresses_for(self, domain: str, hashed: str) -> list[str]:
        with self._lock:
            if time.monotonic() - self._index_built > self.index_seconds:
                index: dict[tuple[str, str], list[str]] = {}
                addresses = {b.address for b in self.store.bindings()}
                if self.submission:
                    addresses.add(self.submission)
                for address in sorted(addresses):
                    local, _, where = address.rpartition("@")
                    index.setdefault((where, wkd_hash(local)), []).append(address)
                self._index = index
                self._index_built = time.monotonic()
            return list(self._index.get((domain, hashed), []))

    def policy(self, domain: str) -> bytes:
        lines = [f"# Policy flags for domain {domain}"]
        if self.submission and self.pending_seconds:
            lines.append(f"max-pending: {self.pending_seconds}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    def submission_address(self, domain: str) -> str | None:
        return self.submission or None


def wkd_routes(
    lookup: WkdLookup, *, at_once: int = LOOKUPS_AT_ONCE, wait: float = LOOKUP_WAIT
) -> list[web.RouteDef]:
    """aiohttp routes for both layouts; the direct layout takes the domain from ``Host``.

    Every answer carries ``Access-Control-Allow-Origin: *`` (the draft asks for it, so that
    web mail clients can look keys up). Key lookups run off the event loop, ``at_once`` at
    most; the policy and submission-address answers need no store.
    """
    turns = _Turns(at_once, wait)

    async def direct_key(request: web.Request) -> web.Response:
        return await _key(lookup, _host_domain(request), request, turns)

    async def advanced_key(request: web.Request) -> web.Response:
        return await _key(lookup, request.match_info["domain"].lower(), request, turns)

    async def direct_policy(request: web.Request) -> web.Response:
        return _policy(lookup, _host_domain(request))

    async def advanced_policy(request: web.Request) -> web.Response:
        return _policy(lookup, request.match_info["domain"].lower())

    async def direct_submission(request: web.Request) -> web.Response:
        return _submission(lookup, _host_domain(request))

    async def advanced_submission(request: web.Request) -> web.Response:
        return _submission(lookup, request.match_info["domain"].lower())

    # The direct routes first: "hu" is never a domain, and they must win over {domain}/...
    return [
        web.get(f"{WELL_KNOWN}/hu/{{hash}}", direct_key),
        web.get(f"{WELL_KNOWN}/policy", direct_policy),
        web.get(f"{WELL_KNOWN}/submission-address", direct_submission),
        web.get(f"{WELL_KNOWN}/{{domain}}/hu/{{hash}}", advanced_key),
        web.get(f"{WELL_KNOWN}/{{domain}}/policy", advanced_policy),
        web.get(f"{WELL_KNOWN}/{{domain}}/submission-address", advanced_submission),
    ]


def _host_domain(request: web.Request) -> str:
    host = (request.host or "").strip().lower()
    if host.startswith("["):
        return ""  # an IPv6 literal is no mail domain
    return host.rsplit(":", 1)[0] if ":" in host else host


def _not_found() -> web.Response:
    return web.Response(status=404, text="not found\n", headers=CORS)


class _Turns:
    """At most ``at_once`` store reads in threads; a turn waited for at most ``wait`` s."""

    def __init__(self, at_once: int, wait: float) -> None:
        self.free = asyncio.Semaphore(at_once)
        self.wait = wait

    async def run(
        self, lookup: WkdLookup, domain: str, hashed: str, local: str | None
    ) -> bytes | None:
        async with asyncio.timeout(self.wait):
            await self.free.acquire()
        try:
            return await asyncio.to_thread(lookup.key, domain, hashed, local)
        finally:
            self.free.release()


async def _key(lookup: WkdLookup, domain: str, request: web.Request, turns: _Turns) -> web.Response:
    hashed = request.match_info["hash"]
    if not _HASH.match(hashed) or not lookup.serves(domain):
        return _not_found()
    local = request.query.get("l")
    try:
        data = await turns.run(lookup, domain, hashed, local)
    except TimeoutError:
        log.warning("WKD lookup refused: every lookup slot stayed busy")
        busy = {**CORS, "Retry-After": str(max(1, round(turns.wait)))}
        return web.Response(status=503, text="busy, try again shortly\n", headers=busy)
    except StoreError as error:
        log.error("WKD lookup failed: %s", error)
        return web.Response(status=503, text="key store unavailable\n", headers=CORS)
    if data is None:
        return _not_found()
    return web.Response(body=data, content_type="application/octet-stream", headers=CORS)


def _policy(lookup: WkdLookup, domain: str) -> web.Response:
    if not lookup.serves(domain):
        return _not_found()
    return web.Response(body=lookup.policy(domain), content_type="text/plain", headers=CORS)


def _submission(lookup: WkdLookup, domain: str) -> web.Response:
    address = lookup.submission_address(domain) if lookup.serves(domain) else None
    if address is None:
        return _not_found()
    return web.Response(text=address + "\n", content_type="text/plain", headers=CORS)
