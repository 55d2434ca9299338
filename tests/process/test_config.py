"""The configuration reference documents every key, and its example is the embedded default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from gpgfilter.process.cli import main
from gpgfilter.process.config import Config, ConfigError, Endpoint, load

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of the configuration, dotted."""
    found = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if callable(field.default_factory) else None
        if dataclasses.is_dataclass(default) and type(default).__name__ != "Endpoint":
            found += _keys(type(default), f"{prefix}{field.name}.")
        else:
            found.append(prefix + field.name)
    return found


def test_every_key_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", DOC, re.MULTILINE))
    assert set(_keys(Config)) == documented


def test_documented_example_is_valid_and_the_defaults() -> None:
    example = re.search(r"```yaml\n(.*?)```", DOC, re.DOTALL)
    assert example is not None
    data = yaml.safe_load(example.group(1))
    config = load(None, {k: v for k, v in data.items() if k not in ("data_dir", "hostname")})
    defaults = load(None)
    assert dataclasses.replace(config, data_dir=defaults.data_dir) == defaults


def test_bad_config_names_key_and_problem(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = {
        "mode: pop3\n": "mode: must be one of lmtp, smtp",
        "listen: nowhere\n": "listen: expected HOST:PORT",
        "gpg:\n  compress_level: 12\n": "gpg.compress_level: must be between 0 and 9",
        "max_connections: 0\n": "max_connections: must be at least 1",
        "gpg:\n  engine: pgpy\n": "gpg.engine: must be one of auto, gnupg, sequoia",
        "gpg:\n  engine: sequoia\n  compress_level: 6\n": "Sequoia does not compress",
        "policy:\n  no_kye: defer\n": "policy.no_kye: unknown key",
        "- a list\n": "top level must be a mapping",
        "keystore:\n  backend: postgresql\n": (
            "keystore.dsn: required when keystore.backend is postgresql"
        ),
        "keystore:\n  dsn: postgresql://db/gpgfilter\n": (
            "keystore.dsn: only used when keystore.backend is postgresql"
        ),
        "keystore:\n  backend: postgresql\n  dsn: postgresql:///x\n  path: /k.sqlite\n": (
            "keystore.path: only used when keystore.backend is sqlite"
        ),
    }
    for text, expected in cases.items():
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        result = runner.invoke(main, ["-c", str(config), "serve"])
        assert result.exit_code != 0
        assert expected in result.output, (text, result.output)


def test_config_defaults_are_those_documented() -> None:
    config: Config = load(None, {"data_dir": "/tmp/x"})
    assert config.mode == "lmtp"
    assert str(config.listen) == "127.0.0.1:10025"
    assert str(config.deliver_to) == "127.0.0.1:24"
    assert str(load(None, {"mode": "smtp"}).deliver_to) == "127.0.0.1:10026"


def test_missing_gpg_is_a_clear_start_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nlisten: 127.0.0.1:0\n"
        "metrics:\n  enabled: false\ngpg:\n  binary: /nonexistent/gpg\n"
    )
    result = CliRunner().invoke(main, ["-c", str(config), "serve"])
    assert result.exit_code == 1
    assert "cannot run gpg (/nonexistent/gpg)" in result.output
    assert "Traceback" not in result.output


def test_config_option_before_or_after_the_command(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("mode: pop3\n")
    for args in (["-c", str(config), "serve"], ["serve", "--config", str(config)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "mode: must be one of" in result.output, args
    listing = CliRunner().invoke(main, ["keys", "list", "-c", str(config)])
    assert "mode: must be one of" in listing.output


def test_dash_c_names_the_configuration_file_for_every_command(tmp_path: Path) -> None:
    """``-c`` is gpgfilter's configuration file for setup and doctor too; Postfix's directory
    is ``--postfix-dir``."""
    bad = tmp_path / "gpgfilter.yaml"
    bad.write_text("no_such_key: 1\n")
    for command in (["setup", "--dry-run"], ["doctor", "--no-postfix"]):
        result = CliRunner().invoke(main, [*command, "-c", str(bad)])
        assert result.exit_code != 0
        assert "no_such_key" in result.output, result.output


ENDPOINT_KEYS = [
    "listen",
    "deliver",
    "metrics.listen",
    "keyserver.listen",
    "keyserver.relay",
    "publication.wks_listen",
    "publication.wks_relay",
]


def test_a_malformed_endpoint_flag_fails_at_start_naming_it(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = {
        ("serve", "--deliver", "lmtp://127.0.0.1:24"): "deliver: expected HOST:PORT",
        ("serve", "--deliver", "127.0.0.1:0"): "deliver: port 0 cannot be connected to",
        ("serve", "--listen", "::1:10025"): "listen: an IPv6 address needs brackets",
        ("serve", "--metrics-listen", "127.0.0.1 :9425"): "metrics.listen: expected",
        ("keyserver", "--listen", "http://0.0.0.0:8425/"): "keyserver.listen: expected",
    }
    config = tmp_path / "empty.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    for args, expected in cases.items():
        result = runner.invoke(main, ["-c", str(config), *args])
        assert result.exit_code != 0
        assert expected in result.output, (args, result.output)


def _nested(dotted: str, value: object) -> dict[str, object]:
    *parents, last = dotted.split(".")
    data: dict[str, object] = {last: value}
    for parent in reversed(parents):
        data = {parent: data}
    return data


def test_every_endpoint_key_refuses_malformed_values(tmp_path: Path) -> None:
    bad = [
        "lmtp://127.0.0.1:24",
        "127.0.0.1:24\r\nRCPT",
        "mail host:25",
        "999.0.0.1:25",
        "[::1:25",
        "example.org:",
        "unix:relative.sock",
        "unix:/run/dir/",
        "inet:",
    ]
    for key in ENDPOINT_KEYS:
        for value in bad:
            config = tmp_path / "bad.yaml"
            config.write_text(yaml.safe_dump(_nested(key, value)))
            with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
                load(config)


def test_public_url_must_be_a_plain_http_url() -> None:
    for url in (
        "keys.example.org",
        "ftp://keys.example.org",
        "https://keys.example.org/\x00",
        "https://keys.example.org/a b",
        "https://user:pw@keys.example.org",
        "https://keys.example.org:99999",
        "https://keys.example.org/?next=evil",
        "https://",
    ):
        with pytest.raises(ConfigError, match=r"^keyserver\.public_url: "):
            load(None, {"keyserver.public_url": url})
    ok = load(None, {"keyserver.public_url": "https://keys.example.org:8443/gpg/"})
    assert ok.keyserver_url == "https://keys.example.org:8443/gpg"


@given(st.text(max_size=40))
def test_endpoint_parse_either_refuses_or_round_trips(text: str) -> None:
    try:
        endpoint = Endpoint.parse(text)
    except ValueError:
        return
    assert Endpoint.parse(str(endpoint)) == endpoint
    assert not re.search(r"[\x00-\x20\x7f-\x9f]", str(endpoint))


@given(st.sampled_from(["127.0.0.1", "[::1]", "localhost", "mail.example.org", "[fe80::1]"]))
def test_good_endpoints_still_parse(host: str) -> None:
    assert str(Endpoint.parse(f"{host}:24")) == f"{host}:24"
    assert str(Endpoint.parse(f"inet:{host}:24")) == f"{host}:24"


def test_header_protection_off_written_bare_in_yaml(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare ``off`` as false; the admin meant the setting "off"."""
    config = tmp_path / "hp.yaml"
    for text, expected in (("off", "off"), ("copy", "copy"), ("hide-subject", "hide-subject")):
        config.write_text(f"data_dir: {tmp_path}\npolicy:\n  header_protection: {text}\n")
        assert load(config).policy.header_protection == expected
    config.write_text(f"data_dir: {tmp_path}\npolicy:\n  header_protection: hide\n")
    with pytest.raises(ConfigError, match="header_protection: must be one of off, copy"):
        load(config)
