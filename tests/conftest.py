from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.openpgp_tools import KeyFactory, TestKey


@pytest.fixture(scope="session")
def key_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyFactory]:
    with KeyFactory(tmp_path_factory.mktemp("keys")) as factory:
        yield factory


@pytest.fixture(scope="session")
def alice(key_factory: KeyFactory) -> TestKey:
    return key_factory.make("alice@example.test")


@pytest.fixture(scope="session")
def bob(key_factory: KeyFactory) -> TestKey:
    return key_factory.make("bob@example.test", algo="rsa2048")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
