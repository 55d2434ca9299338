"""The HTTP face of key registration: JSON API, admin API, signup and confirmation pages.

Everything that decides lives in :mod:`keystore.registration`; this module only translates.
Other services (Web Key Directory, ...) add their routes to the application :func:`create_app`
returns. Tokens only ever travel in POST bodies (or URL fragments, which browsers never send),
and the access log writes the path without the query, so no token reaches a log.

Anyone can reach this port, so every input is checked before use: a body that is not a JSON
object in UTF-8, a field of the wrong type, text that cannot be encoded, a control character
in an address or token, each gets a 4xx with the reason; a client that goes away mid-body
costs one access-log line. A 500 means a bug of ours.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from keystore.gpgbound import Busy
from keystore.logsafe import escape
from keystore.model import HEADER_PROTECTION_MODES, HeaderProtection
from keystore.ratelimit import RateLimited, RateLimiter
from keystore.registration import Outcome, Refused, Registry
from keystore.store import StoreError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
OPENAPI = Path(__file__).parent / "openapi.yaml"
OPENPGP_JS = WEB_DIR / "node_modules" / "openpgp" / "dist" / "openpgp.min.mjs"

_STATUS = {
    "bad-request": 400,
    "not-offered": 400,
    "token-malformed": 400,
    "bad-address": 422,
    "foreign-domain": 422,
    "sub-address": 422,
    "revoked-key-stays": 409,
    "key-rejected": 422,
    "key-revoked": 422,
    "revocation-unmatched": 422,
    "too-large": 413,
    "unsupported-charset": 415,
    "nothing-registered": 404,
    "token-invalid": 410,
    "stale": 409,
    "mail-failed": 503,
}
_ACCEPTED = {"pending": 202, "withdrawal-pending": 202, "protection-pending": 202}
_MESSAGES = {
    "pending": "A confirmation mail, encrypted to this key, was sent to {address}. Decrypt it"
    " and follow the link in it (or enter its code on the confirmation page) to activate the"
    " key. Until then nothing changes.",
    "withdrawal-pending": "A mail, encrypted to the registered key, was sent to {address}."
    " Decrypt it and confirm to withdraw the key.",
    "renewed": "The registered key was updated.",
    "unchanged": "This key is already registered, unchanged.",
    "revoked": "The key is revoked: mail for {address} is held until a new key is registered.",
    "registered": "The key is now registered: incoming mail for {address} is encrypted to it.",
    "replaced": "The new key is now registered: incoming mail for {address} is encrypted to it.",
    "withdrawn": "The key is no longer registered for {address}.",
    "protection-pending": "A mail, encrypted to the registered key, was sent to {address}."
    " Decrypt it and confirm to change the header protection.",
    "protection-changed": "The header protection of mail to {address} was changed.",
}
_STATIC = {
    "app.js": "text/javascript",
    "confirm.js": "text/javascript",
    "style.css": "text/css",
}
# JSON is UTF-8 (RFC 8259); ASCII is a subset. Any other declared charset is refused.
_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_MAX_FIELD = 1024  # characters of an address or token: far above any real one
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry them; UTF-8 cannot
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Settings:
    max_key_bytes: int = 1024 * 1024
    admin_token: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    openpgp_js: Path = OPENPGP_JS
    web_dir: Path = WEB_DIR
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(init=False)

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)
        object.__setattr__(self, "networks", nets)

    @property
    def body_limit(self) -> int:
        """A JSON body may carry the key in base64 (4/3 of its size) plus a few fields."""
        return self.max_key_bytes * 4 // 3 + 4096


REGISTRY = web.AppKey("registry", Registry)
LIMITER = web.AppKey("limiter", RateLimiter)
SETTINGS = web.AppKey("settings", Settings)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    registry: Registry, settings: Settings, limiter: RateLimiter | None
) -> web.Application:
    app = web.Application(
        client_max_size=settings.body_limit, middlewares=[_headers, _errors, _limit_clients]
    )
    app[REGISTRY] = registry
    app[SETTINGS] = settings
    if limiter is not None:
        app[LIMITER] = limiter
    router = app.router
    router.add_get("/", _page("index.html"))
    router.add_get("/confirm", _page("confirm.html"))
    router.add_get("/static/openpgp.min.mjs", _openpgp_js)
    router.add_get("/static/{name}", _static)
    router.add_get("/api/v1/openapi.yaml", _openapi)
    router.add_get("/api/v1/options", options)
    router.add_post("/api/v1/keys", upload)
    router.add_get("/api/v1/keys/{address}", status)
    router.add_post("/api/v1/confirm", confirm)
    router.add_post("/api/v1/withdraw", withdraw)
    router.add_post("/api/v1/header-protection", header_protection)
    router.add_put("/api/v1/admin/keys/{address}", admin_bind)
    router.add_delete("/api/v1/admin/keys/{address}", admin_withdraw)
    router.add_put("/api/v1/admin/header-protection/{address}", admin_header_protection)
    router.add_get("/api/v1/admin/audit", admin_audit)
    return app


# -- middlewares ---------------------------------------------------------------------------
@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as refused:
        return _error(_STATUS.get(refused.code, 400), refused.code, str(refused))
    except RateLimited as limited:
        response = _error(429, "rate-limited", str(limited))
        response.headers["Retry-After"] = str(limited.retry_after)
        return response
    except Busy as busy:
        response = _error(503, "busy", str(busy))
        response.headers["Retry-After"] = str(busy.retry_after)
        return response
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except web.HTTPException:
        raise
    except StoreError as error:
        log.error("key store: %s", error)
        return _error(503, "unavailable", "the key store is unavailable: try again later")
    except ClientGone:
        # Nobody reads the answer; the access log still records the request, once.
        return _error(400, "incomplete", "the request body was cut off")
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        return _error(500, "internal", "an internal error: the request changed nothing")


class ClientGone(Exception):
    """The client closed the connection before sending the whole body."""


@web.middleware
async def _limit_clients(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per-client limits on the public API; the admin API and the description are exempt."""
    path = request.path
    limiter = request.app.get(LIMITER)
    if (
        limiter is not None
        and path.startswith("/api/v1/")
        and not path.startswith("/api/v1/admin/")
        and path != "/api/v1/openapi.yaml"
    ):
        await limiter.client(client_ip(request, request.app[SETTINGS]))
    return await handler(request)


def client_ip(request: web.Request, settings: Settings) -> str:
    """The peer, or behind a trusted reverse proxy the last address it saw that is not
    itself a trusted proxy (the left part of X-Forwarded-For can be forged by the client)."""
    peer = request.remote or ""
    chain = [peer]
    if _trusted(peer, settings):
        for header in request.headers.getall("X-Forwarded-For", []):
            chain[:0] = [part.strip() for part in header.split(",") if part.strip()]
    for hop in reversed(chain):
        if not _trusted(hop, settings):
            return hop
    return chain[0]


def _trusted(address: str, settings: Settings) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in settings.networks)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _too_large(request: web.Request) -> web.Response:
    limit = request.app[SETTINGS].max_key_bytes
    return _error(413, "too-large", f"a key may have at most {limit} bytes")


# -- JSON API -------------------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request, refused before reading when its announced size is over."""
    length = request.content_length
    if length is not None and length > request.app[SETTINGS].body_limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.app[SETTINGS].body_limit, actual_size=length
        )
    charset = request.charset
    if charset is not None and charset.lower() not in _CHARSETS:
        raise Refused("unsupported-charset", "the body must be JSON in UTF-8 (charset=utf-8)")
    try:
        raw = await request.read()
    except ConnectionError:
        raise ClientGone from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past Python's stack
        raise Refused("bad-request", "the body must be a JSON object in UTF-8") from None
    if not isinstance(data, dict):
        raise Refused("bad-request", "the body must be a JSON object")
    return data


def _text(body: dict[str, Any], name: str) -> str:
    """A short text field (address, token): a non-empty string without control characters."""
    return checked_text(body.get(name), name)


def checked_text(value: object, name: str, *, limit: int = _MAX_FIELD) -> str:
    """``value`` when it is usable text for the field ``name``, else a 400 saying why."""
    if not isinstance(value, str) or not value:
        raise Refused("bad-request", f"{name} is missing or not a string")
    if len(value) > limit:
        raise Refused("bad-request", f"{name} is longer than {limit} characters")
    if _SURROGATE.search(value):
        raise Refused("bad-request", f"{name} is not valid Unicode text")
    if _CONTROL.search(value):
        raise Refused("bad-request", f"{name} contains control characters")
    return value


def _key_bytes(body: dict[str, Any]) -> bytes:
    """The key as text (armored) in ``key``, or in any form base64-encoded in ``key_base64``."""
    if "key_base64" in body:
        encoded = body["key_base64"]
        if not isinstance(encoded, str):
            raise Refused("bad-request", "key_base64 must be a string")
        try:
            return base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or characters outside ASCII
            raise Refused("bad-request", "key_base64 is not base64") from None
    value = body.get("key")
    if not isinstance(value, str) or not value:
        raise Refused("bad-request", "key (or key_base64) is missing or not a string")
    if _SURROGATE.search(value):
        raise Refused("bad-request", "key is not valid Unicode text")
    return value.encode("utf-8")


def _path_address(request: web.Request) -> str:
    return checked_text(request.match_info["address"], "the address")


def _outcome(outcome: Outcome) -> web.Response:
    payload: dict[str, Any] = {
        "status": outcome.action,
        "address": outcome.address,
        "fingerprint": outcome.fingerprint,
        "message": _MESSAGES[outcome.action].format(address=outcome.address),
    }
    key = "token_expires" if outcome.action in _ACCEPTED else "expires"
    payload[key] = outcome.expires
    return web.json_response(payload, status=_ACCEPTED.get(outcome.action, 200))


async def upload(request: web.Request) -> web.Response:
    body = await _body(request)
    data = _key_bytes(body)
    if len(data) > request.app[SETTINGS].max_key_bytes:
        return _too_large(request)
    choice = _header_protection(body, required=False)
    existing = body.get("encrypt_existing", False)
    if not isinstance(existing, bool):
        raise Refused("bad-request", "encrypt_existing must be true or false")
    return _outcome(
        await request.app[REGISTRY].upload(
            _text(body, "address"), data, choice, encrypt_existing=existing
        )
    )


async def options(request: web.Request) -> web.Response:
    """What this server offers beyond the basics, so the signup page shows only that."""
    return web.json_response({"encrypt_existing": request.app[REGISTRY].enrolment is not None})


def _header_protection(body: dict[str, Any], *, required: bool) -> HeaderProtection | None:
    """The optional ``header_protection`` field: one of the settings, or null for none."""
    value = body.get("header_protection")
    if value is None and not required:
        return None
    for mode in HEADER_PROTECTION_MODES:
        if value == mode:
            return mode
    raise Refused(
        "bad-request", "header_protection must be one of " + ", ".join(HEADER_PROTECTION_MODES)
    )


async def header_protection(request: web.Request) -> web.Response:
    body = await _body(request)
    mode = _header_protection(body, required=True)
    assert mode is not None
    registry = request.app[REGISTRY]
    return _outcome(await registry.request_header_protection(_text(body, "address"), mode))


async def confirm(request: web.Request) -> web.Response:
    body = await _body(request)
    return _outcome(await request.app[REGISTRY].confirm(_text(body, "token").strip()))


async def withdraw(request: web.Request) -> web.Response:
    body = await _body(request)
    return _outcome(await request.app[REGISTRY].request_withdrawal(_text(body, "address")))


async def status(request: web.Request) -> web.Response:
    found = await request.app[REGISTRY].status(_path_address(request))
    active = None
    if found.fingerprint is not None:
        active = {
            "fingerprint": found.fingerprint,
            "expires": found.expires,
            "revoked": found.revoked,
        }
    return web.json_response({"address": found.address, "key": active, "pending": found.pending})


# -- admin API ------------------------------------------------------------------------------
def _admin(request: web.Request) -> Registry:
    """Bearer token compared in constant time; without a configured token the API is absent."""
    expected = request.app[SETTINGS].admin_token
    if expected is None:
        raise web.HTTPNotFound
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8"), expected.encode("utf-8")
    ):
        raise web.HTTPUnauthorized(
            headers={"WWW-Authenticate": 'Bearer realm="gpgfilter-admin"'},
            text=json.dumps({"error": "unauthorized", "message": "a valid admin token is needed"}),
            content_type="application/json",
        )
    return request.app[REGISTRY]


async def admin_bind(request: web.Request) -> web.Response:
    registry = _admin(request)
    body = await _body(request)
    data = _key_bytes(body)
    if len(data) > request.app[SETTINGS].max_key_bytes:
        return _too_large(request)
    return _outcome(await registry.admin_bind(_path_address(request), data))


async def admin_withdraw(request: web.Request) -> web.Response:
    registry = _admin(request)
    return _outcome(await registry.admin_withdraw(_path_address(request)))


async def admin_header_protection(request: web.Request) -> web.Response:
    """Set an address's choice; null hands it back to the configuration's default."""
    registry = _admin(request)
    body = await _body(request)
    mode = _header_protection(body, required=False)
    return _outcome(await registry.admin_header_protection(_path_address(request), mode))


async def admin_audit(request: web.Request) -> web.Response:
    registry = _admin(request)
    try:
        limit = min(int(request.query.get("limit", "100")), 1000)
    except ValueError:
        raise Refused("bad-request", "limit must be a number") from None
    address = request.query.get("address")
    if address is not None:
        address = checked_text(address, "address")
    entries = await registry.audit_log(address, max(limit, 1))
    return web.json_response(
        {
            "entries": [
                {
                    "at": e.at,
                    "address": e.address,
                    "action": e.action,
                    "fingerprint": e.fingerprint,
                    "actor": e.actor,
                }
                for e in entries
            ]
        }
    )


# -- pages and files -----------------------------------------------------------------------
def _page(name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.app[SETTINGS].web_dir / name
        return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

    return handler


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound
    path = request.app[SETTINGS].web_dir / "static" / name
    return web.FileResponse(path, headers={"Content-Type": _STATIC[name]})


async def _openpgp_js(request: web.Request) -> web.StreamResponse:
    """Served from our own host (no CDN): missing means the page offers paste/upload only."""
    path = request.app[SETTINGS].openpgp_js
    if not path.is_file():
        raise web.HTTPNotFound
    return web.FileResponse(path, headers={"Content-Type": "text/javascript"})


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(OPENAPI, headers={"Content-Type": "application/yaml"})


class PathOnlyAccessLogger(AbstractAccessLogger):
    """One line per request with the path but never the query string, nor any header that
    could carry a token (Authorization, Referer). The path is the client's: escaped and cut
    here too, whatever formatter the process installed."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3f',
            request.remote,
            escape(request.method, 32),
            escape(request.path, 512),
            response.status,
            response.body_length,
            time,
        )
