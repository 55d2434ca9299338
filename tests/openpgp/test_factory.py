"""The engine the configuration names: what serves each recipient, and what the metrics see."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.choice import LARGE, AutoEngine
from gpgfilter.openpgp.engine import EngineError, EngineName, Recipient
from gpgfilter.openpgp.factory import make_engine
from gpgfilter.process.config import GpgConfig, load
from gpgfilter.process.metrics import Metrics
from keystore.validate import validate_key
from tests.support.openpgp_tools import TestKey, decrypt_all


def recipient_of(key: TestKey) -> Recipient:
    stored = validate_key(key.public).key
    return Recipient(stored.key_data, stored.usable_encryption_keys())


def encrypt_with(settings: GpgConfig, home: Path, key: TestKey) -> list[EngineName]:
    served: list[EngineName] = []
    engine = make_engine(settings, home=home, served=served.append)
    recipient = recipient_of(key)
    armored = asyncio.run(engine.encrypt(b"Subject: x\r\n\r\nbody\r\n", recipient))
    check_ciphertext(armored, recipient)
    assert decrypt_all(key, armored) == b"Subject: x\r\n\r\nbody\r\n"
    return served


def test_auto_is_the_default_and_serves_common_keys_in_process(
    tmp_path: Path, alice: TestKey, seipdv2_key: TestKey
) -> None:
    settings = load(None, {"data_dir": str(tmp_path)}).gpg
    assert settings.engine == "auto"
    engine = make_engine(settings, home=tmp_path / "home")
    assert isinstance(engine, AutoEngine) and engine.large == LARGE
    assert encrypt_with(settings, tmp_path / "a", alice) == ["sequoia"]
    assert encrypt_with(settings, tmp_path / "b", seipdv2_key) == ["gnupg"]


def test_sequoia_has_no_size_limit_and_still_gives_way_for_seipdv2(
    tmp_path: Path, seipdv2_key: TestKey
) -> None:
    settings = GpgConfig(engine="sequoia")
    engine = make_engine(settings, home=tmp_path / "home")
    assert isinstance(engine, AutoEngine) and engine.large is None
    assert encrypt_with(settings, tmp_path / "s", seipdv2_key) == ["gnupg"]


@pytest.mark.parametrize(
    "settings", [GpgConfig(engine="gnupg"), GpgConfig(engine="auto", compress_level=6)]
)
def test_gnupg_or_compression_means_gpg_for_everyone(
    tmp_path: Path, alice: TestKey, settings: GpgConfig
) -> None:
    assert not isinstance(make_engine(settings, home=tmp_path / "home"), AutoEngine)
    assert encrypt_with(settings, tmp_path / "g", alice) == ["gnupg"]


def test_metrics_count_each_engine(tmp_path: Path, alice: TestKey, seipdv2_key: TestKey) -> None:
    metrics = Metrics()
    engine = make_engine(GpgConfig(), home=tmp_path / "home", served=metrics.served)
    for key in (alice, alice, seipdv2_key):
        asyncio.run(engine.encrypt(b"m", recipient_of(key)))

    def count(name: str) -> float | None:
        return metrics.registry.get_sample_value("gpgfilter_encryptions_total", {"engine": name})

    assert (count("sequoia"), count("gnupg")) == (2.0, 1.0)


def test_missing_pysequoia_stops_the_start_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m.startswith(("pysequoia", "gpgfilter.openpgp."))]:
        if name.startswith("pysequoia") or name.endswith((".choice", ".sequoia")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pysequoia", None)  # import pysequoia now fails
    with pytest.raises(EngineError, match=r"needs pysequoia.*gpg\.engine: gnupg"):
        make_engine(GpgConfig(), home=tmp_path / "home")
    make_engine(GpgConfig(engine="gnupg"), home=tmp_path / "home")  # gnupg does not need it
