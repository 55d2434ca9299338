"""Configuration: embedded defaults, a YAML file, command-line overrides — checked at start.

A wrong configuration must stop the filter at start with a message naming the key and the
problem, never surface later as a deferred message. ``docs/configuration.md`` documents every
key; ``tests/process/test_config.py`` checks the two stay in step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType, get_args, get_origin

import yaml

from keystore.storage.config import KeystoreConfig


class ConfigError(ValueError):
    """A configuration problem, phrased for the administrator."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to listen or connect: ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse and check an endpoint, so that a typo stops the program at start instead of
        every message being deferred later as "downstream unavailable"."""
        text = text.strip()
        if not text:
            raise ValueError("expected HOST:PORT or unix:/path, got nothing")
        if _UNPRINTABLE.search(text):
            raise ValueError(f"expected HOST:PORT or unix:/path, got {text!r}: a blank or control")
        if "://" in text:
            raise ValueError(
                f"expected HOST:PORT or unix:/path, not a URL: {text!r}"
                " (e.g. 127.0.0.1:24 rather than lmtp://127.0.0.1:24)"
            )
        if text.startswith("unix:") or text.startswith("/"):
            path = text.removeprefix("unix:")
            if not path.startswith("/") or path.endswith("/"):
                raise ValueError(
                    f"a unix socket needs an absolute file path (unix:/run/x.sock), got {text!r}"
                )
            return cls(path=path)
        text = text.removeprefix("inet:")
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT or unix:/path, got {text!r}")
        if not port.isascii() or not port.isdigit():
            raise ValueError(f"expected a port number after the last colon, got {text!r}")
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError(f"port {number} is out of range")
        return cls(host=_check_host(host, text), port=number)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_HOST_NAME = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _check_host(host: str, text: str) -> str:
    """An IPv4 address, a host name, or an IPv6 address in brackets; the host as used."""
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"expected an IPv6 address in brackets, got {text!r}") from None
        return inner
    if ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, e.g. [::1]:24, got {text!r}")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        return host
    if not _HOST_NAME.match(host):
        raise ValueError(f"{host!r} is not a host name or address")
    return host


Seconds = NewType("Seconds", int)
"""A duration: whole seconds, or text such as ``90s``, ``30m``, ``48h``, ``7d`` in YAML."""

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> Seconds:
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"expected a duration such as 90s, 30m, 48h or 7d, got {text!r}")
    return Seconds(int(match.group(1)) * _UNIT[match.group(2)])


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/gpgfilter")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpgfilter"


@dataclass(frozen=True, slots=True)
class GpgConfig:
    # Which OpenPGP engine encrypts: auto (Sequoia in-process where it writes what the clients
    # read, gpg for the rest), gnupg (one gpg process per copy) or sequoia (as auto, without
    # the size limit). docs/configuration.md says what each costs.
    engine: Literal["auto", "gnupg", "sequoia"] = "auto"
    binary: str = "gpg"
    # 0 = no compression: 3-4x less CPU above ~50 KB, and mail attachments are mostly
    # compressed already (docs/design.md).
    compress_level: int = 0
    # Parallel gpg processes at most.
    max_processes: int = 4
    # Seconds one encryption may take before the recipient is deferred.
    timeout: float = 120.0

    def check(self, prefix: str) -> None:
        if not 0 <= self.compress_level <= 9:
            raise ConfigError(f"{prefix}compress_level: must be between 0 and 9")
        if self.engine == "sequoia" and self.compress_level:
            raise ConfigError(
                f"{prefix}compress_level: Sequoia does not compress; set {prefix}engine to"
                " auto or gnupg (gpg then serves every recipient), or compress_level to 0"
            )
        if self.max_processes < 1:
            raise ConfigError(f"{prefix}max_processes: must be at least 1")
        if self.timeout <= 0:
            raise ConfigError(f"{prefix}timeout: must be positive")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    # What happens to mail for an address with no registered key.
    no_key: Literal["deliver", "defer"] = "deliver"
    # What happens when every registered key of an address has expired (or was revoked).
    unusable_key: Literal["defer", "deliver"] = "defer"
    # Header protection (RFC 9788) for addresses whose owner chose nothing: off, copy (the
    # header fields also inside the encryption) or hide-subject (outside the Subject is [...]).
    header_protection: Literal["off", "copy", "hide-subject"] = "off"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 9425))


@dataclass(frozen=True, slots=True)
class PublicationConfig:
    """Publishing registered keys by Web Key Directory and accepting them by Web Key Service."""

    # Mail domains whose keys are published; empty: publication is off.
    domains: tuple[str, ...] = ()
    # Where WKS clients send keys and confirmations. Default: key-submission@FIRST_DOMAIN.
    submission_address: str = ""
    # Where the WKS mail listener accepts mail for the submission address (LMTP).
    wks_listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 10027))
    # Where the WKS service hands its own mail (confirmation requests) to Postfix (SMTP).
    wks_relay: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 25))
    # Seconds a confirmation request stays valid.
    token_ttl: int = 86400

    @property
    def submission(self) -> str:
        if self.submission_address:
            return self.submission_address.lower()
        return f"key-submission@{self.domains[0]}" if self.domains else ""

    def check(self, prefix: str) -> None:
        _check_domains(self.domains, f"{prefix}domains")
        if self.submission_address:
            local, at, domain = self.submission_address.strip().lower().rpartition("@")
            if not at or not local or domain not in self.domains:
                raise ConfigError(
                    f"{prefix}submission_address: must be an address in one of the domains"
                    f" ({', '.join(self.domains) or 'none configured'})"
                )
        if self.token_ttl < 60:
            raise ConfigError(f"{prefix}token_ttl: must be at least 60 seconds")
        _check_connects(self.wks_relay, f"{prefix}wks_relay")


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    # Key uploads and withdrawal requests per address within ``window``.
    per_address: int = 5
    # Requests to the API per client IP within ``window``.
    per_client: int = 60
    window: Seconds = Seconds(3600)

    def check(self, prefix: str) -> None:
        if self.per_address < 1 or self.per_client < 1 or self.window < 1:
            raise ConfigError(f"{prefix.rstrip('.')}: limits and window must be positive")


@dataclass(frozen=True, slots=True)
class KeyserverConfig:
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 8425))
    # The https URL users see (behind the reverse proxy); links in mails point there.
    # Default: http://LISTEN.
    public_url: str = ""
    # File holding the admin API's bearer token; the admin API is off when unset.
    admin_token_file: Path | None = None
    # Sender of challenges and notices. Default: keyserver@HOSTNAME.
    mail_from: str = ""
    relay: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 25))
    token_ttl: Seconds = Seconds(48 * 3600)
    min_valid_days: int = 7
    max_key_bytes: int = 1024 * 1024
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ()
    expiry_notice_days: int = 14
    # How often the service looks for expiring keys; 0: never (run
    # ``gpgfilter keys notify-expiry`` from cron instead).
    expiry_check_interval: Seconds = Seconds(6 * 3600)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def check(self, prefix: str) -> None:
        if self.public_url:
            _check_public_url(self.public_url, f"{prefix}public_url")
        _check_connects(self.relay, f"{prefix}relay")
        if self.max_key_bytes < 4096:
            raise ConfigError(f"{prefix}max_key_bytes: must be at least 4096")
        if self.token_ttl < 60:
            raise ConfigError(f"{prefix}token_ttl: must be at least a minute")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(f"{prefix}trusted_proxies: {proxy!r} is not an address") from None


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    """``gpgfilter mailbox encrypt``: encrypting mail already stored (docs/mailbox.md)."""

    # The doveadm program, and Dovecot's configuration file when not the default one.
    doveadm: str = "doveadm"
    dovecot_config: Path | None = None
    # Folders left in clear: names, or special-use attributes such as \Drafts (clients must
    # be able to edit drafts).
    skip_folders: tuple[str, ...] = ("\\Drafts", "Drafts")
    # Messages replaced per second at most; 0: as fast as gpg goes.
    throttle: float = 0.0
    # Offer, on the signup page, to encrypt the mail already stored once a key is confirmed
    # (and do it for `gpgfilter keys import`): queued, done by `mailbox encrypt --queued`.
    encrypt_on_enrolment: bool = False

    def check(self, prefix: str) -> None:
        if self.throttle < 0:
            raise ConfigError(f"{prefix}throttle: must be 0 (no limit) or a positive rate")


@dataclass(frozen=True, slots=True)
class Config:
    mode: Literal["lmtp", "smtp"] = "lmtp"
    # "enrolled": Postfix routes only addresses with a registered key through the filter, by
    # a lookup table that reads the key store (gpgfilter setup wires it); "all": every message.
    route: Literal["all", "enrolled"] = "all"
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 10025))
    # Default: Dovecot's LMTP (127.0.0.1:24) in lmtp mode, Postfix's reinjection
    # smtpd (127.0.0.1:10026) in smtp mode.
    deliver: Endpoint | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    hostname: str = field(default_factory=socket.getfqdn)
    # The mail domains this server delivers mail for: the key service registers keys for
    # their addresses only. Default: publication.domains. Required by ``gpgfilter keyserver``.
    domains: tuple[str, ...] = ()
    recipient_delimiter: str = "+"
    max_message_size: int = 64 * 1024 * 1024
    # Connections open at once on ``listen``; past it a new one gets 421. Bounds memory in
    # total (each connection holds at most max_message_size). Postfix's own transport
    # concurrency is 20 by default.
    max_connections: int = 64
    # Seconds for a whole downstream transaction.
    delivery_timeout: float = 300.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    keystore: KeystoreConfig = field(default_factory=KeystoreConfig)
    gpg: GpgConfig = field(default_factory=GpgConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    publication: PublicationConfig = field(default_factory=PublicationConfig)
    keyserver: KeyserverConfig = field(default_factory=KeyserverConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)

    def check(self, prefix: str) -> None:
        """Checks of the top level, and those that span sections (its sections are checked
        as they are built, before it)."""
        if self.deliver is not None:
            _check_connects(self.deliver, "deliver")
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size: must be at least 1024 bytes")
        if self.max_connections < 1:
            raise ConfigError("max_connections: must be at least 1")
        if self.delivery_timeout <= 0:
            raise ConfigError("delivery_timeout: must be positive")
        if not self.recipient_delimiter.strip() and self.recipient_delimiter:
            raise ConfigError("recipient_delimiter: must not be blank")
        if "@" in self.recipient_delimiter:
            raise ConfigError("recipient_delimiter: must not contain @")
        _check_domains(self.domains, "domains")
        _check_route(self)
        outside = [d for d in self.publication.domains if self.domains and d not in self.domains]
        if outside:
            raise ConfigError(
                f"publication.domains: {outside[0]} is not one of domains"
                f" ({', '.join(self.domains)}): only served domains can be published"
            )

    @property
    def served_domains(self) -> tuple[str, ...]:
        """The mail domains keys are registered for: ``domains``, else those published."""
        return self.domains or self.publication.domains

    def require_served_domains(self) -> tuple[str, ...]:
        """``served_domains`` for the key service, which must never mail a challenge out of
        them; a ConfigError naming the key when none is configured."""
        if not self.served_domains:
            raise ConfigError(
                "domains: required by the key service: list the mail domains this server"
                " delivers mail for (e.g. domains: [example.org])"
            )
        return self.served_domains

    @property
    def deliver_to(self) -> Endpoint:
        if self.deliver is not None:
            return self.deliver
        return Endpoint("127.0.0.1", 24 if self.mode == "lmtp" else 10026)

    @property
    def keystore_path(self) -> Path:
        return self.keystore.path or self.data_dir / "keys.sqlite"

    @property
    def gnupg_home(self) -> Path:
        return self.data_dir / "gnupg"

    @property
    def wks_home(self) -> Path:
        """The Web Key Service's own gpg home: the submission address's secret key."""
        return self.data_dir / "wks"

    @property
    def keyserver_url(self) -> str:
        """Where users reach the key service, without a trailing slash."""
        if self.keyserver.public_url:
            return self.keyserver.public_url.rstrip("/")
        return f"http://{self.keyserver.listen}"

    @property
    def keyserver_mail_from(self) -> str:
        return self.keyserver.mail_from or f"keyserver@{self.hostname}"


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Embedded defaults, then the YAML file, then ``overrides`` (dotted keys allowed)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, last = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    config: Config = _build(Config, data, "")
    return config


def _build(cls: type[Any], data: Any, prefix: str) -> Any:
    if data is None:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for name, raw in data.items():
        values[name] = _convert(hints[name], raw, f"{prefix}{name}")
    config = cls(**values)
    if isinstance(config, _Checked):
        try:
            config.check(prefix)
        except ConfigError:
            raise
        except ValueError as error:  # from a section defined below gpgfilter (keystore)
            raise ConfigError(str(error)) from None
    return config


def _convert(hint: Any, raw: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(hint) if a is not type(None)]
        if raw is None:
            return None
        return _convert(options[0], raw, key)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if hint is Endpoint:
            if not isinstance(raw, str):
                raise ConfigError(f"{key}: expected HOST:PORT or unix:/path, got {raw!r}")
            try:
                return Endpoint.parse(raw)
            except ValueError as error:
                raise ConfigError(f"{key}: {error}") from None
        return _build(hint, raw, f"{key}.")
    if hint is Seconds:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ConfigError(f"{key}: expected a duration such as 48h, got {raw!r}")
        try:
            return parse_duration(str(raw))
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
    if origin is tuple and get_args(hint)[1:] == (Ellipsis,):
        if not isinstance(raw, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        return tuple(
            _convert(get_args(hint)[0], item, f"{key}[{index}]") for index, item in enumerate(raw)
        )
    if origin is Literal:
        choices = get_args(hint)
        if raw is False and "off" in choices:
            raw = "off"  # YAML 1.1 reads a bare off as false
        if raw not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{key}: expected true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key}: expected a whole number, got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        return float(raw)
    if hint is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{key}: expected a path, got {raw!r}")
        return Path(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected text, got {raw!r}")
        return raw
    raise ConfigError(f"{key}: unsupported value {raw!r}")  # pragma: no cover


@typing.runtime_checkable
class _Checked(typing.Protocol):
    """A section with checks of its own: ranges and combinations that types cannot express.
    ``prefix`` is where the section sits (``keyserver.``), so messages name the full key."""

    def check(self, prefix: str) -> None: ...


def _check_route(config: Config) -> None:
    """Routing by enrolment sends mail for unenrolled addresses past the filter, so two
    settings that need to see that mail cannot hold with it; say so before anything runs."""
    if config.route != "enrolled":
        return
    if config.policy.no_key == "defer":
        raise ConfigError(
            "route: enrolled sends mail for addresses without a key past the filter, so"
            " policy.no_key: defer would never see it: use one or the other"
        )
    if config.mode != "lmtp":
        raise ConfigError(
            "route: enrolled needs mode: lmtp (a content_filter applies to every message;"
            " the per-recipient route is a transport, which only the LMTP wiring uses)"
        )


def _check_domains(domains: tuple[str, ...], key: str) -> None:
    for domain in domains:
        if domain != domain.strip().lower() or "." not in domain or "@" in domain or "/" in domain:
            raise ConfigError(f"{key}: {domain!r} is not a lower-case domain name like example.org")


def _check_connects(endpoint: Endpoint, key: str) -> None:
    """Port 0 means "any free port" to listen on; there is nothing to connect to there."""
    if not endpoint.is_unix and endpoint.port == 0:
        raise ConfigError(f"{key}: port 0 cannot be connected to")


def _check_public_url(url: str, key: str) -> None:
    """An http(s) URL that goes into mails and pages as it is: no blanks or control characters
    that could break a header or a link, no credentials, a host and a valid port."""
    problem = ""
    if _UNPRINTABLE.search(url):
        problem = "it contains a blank or a control character"
    else:
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018  # raises on a port that is no number in range
        except ValueError:
            problem = "its port is not a number from 1 to 65535"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "expected http(s)://HOST[/PATH]"
        elif parts.username is not None:
            problem = "it must not hold credentials"
        elif parts.query or parts.fragment:
            problem = "it must not have a query or a fragment"
    if problem:
        raise ConfigError(f"{key}: {url!r} is not a usable URL: {problem}")
