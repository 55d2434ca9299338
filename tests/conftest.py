from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.openpgp_tools import KeyFactory, TestKey


def require_mail_stack() -> None:
    """Skip where the real mail stack cannot run; in CI that is a failure, never a skip."""
    missing = [b for b in ("postfix", "dovecot", "sq", "rnp") if not shutil.which(b)]
    reason = ""
    if os.geteuid() != 0:
        reason = "the end-to-end tests run Postfix and Dovecot and need root"
    elif missing:
        reason = f"missing programs: {', '.join(missing)}"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


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
