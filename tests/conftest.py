from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pysequoia
import pytest

from keystore.storage.config import KeystoreConfig
from keystore.storage.open import open_store
from keystore.store import KeyStore
from tests.support.openpgp_tools import KeyFactory, TestKey
from tests.support.postgres_server import PostgresServer, require_postgres, running_postgres


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


@pytest.fixture(scope="session")
def seipdv2_key(key_factory: KeyFactory) -> TestKey:
    """Sequoia 2 (pysequoia): a v4 key whose Features advertise SEIPDv2, which the fast engine
    would encrypt to in a form GnuPG 2.2, RNP and sq 0.27 cannot read."""
    tsk = pysequoia.Tsk.generate("<new@example.test>", profile=pysequoia.Profile.RFC4880)
    return key_factory.adopt("new@example.test", str(tsk).encode())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session; every test gets its own database."""
    require_postgres()
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each test that uses a store runs once per backend."""
    param: str = request.param
    return param


@pytest.fixture
def keystore_config(backend: str, request: pytest.FixtureRequest) -> KeystoreConfig:
    """The ``keystore`` configuration section for ``backend`` (SQLite: the default path)."""
    if backend == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        return KeystoreConfig(backend="postgresql", dsn=dsn)
    return KeystoreConfig()


@pytest.fixture
def store(keystore_config: KeystoreConfig, tmp_path: Path) -> Iterator[KeyStore]:
    """A new, empty store of each backend."""
    opened = open_store(keystore_config, tmp_path / "k.sqlite", create=True)
    yield opened
    opened.close()


@pytest.fixture
def keystore_yaml(keystore_config: KeystoreConfig) -> str:
    """``keystore_config`` as a configuration file's lines (none for the default SQLite)."""
    if keystore_config.backend == "postgresql":
        return f"keystore:\n  backend: postgresql\n  dsn: {keystore_config.dsn}\n"
    return ""
