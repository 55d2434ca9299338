"""The rule for tests that need a Debian package: a skip on a workstation, a failure in CI."""

from __future__ import annotations

import pytest

from tests.support.debian import require_program, under_ci


def test_a_present_program_is_found_by_name_and_by_path() -> None:
    assert require_program("sh", "dash").endswith("/sh")
    assert require_program("/bin/sh", "dash") == "/bin/sh"


@pytest.mark.parametrize("program", ["no-such-program-x", "/usr/lib/no-such/program"])
def test_a_missing_program_skips_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, program: str
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install some-package"):
        require_program(program, "some-package")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"needs {program}.*CI is set"):
        require_program(program, "some-package")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", False), ("0", False), ("false", False), ("No", False), ("true", True), ("1", True)],
)
def test_ci_is_read_as_the_ci_services_set_it(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("CI", value)
    assert under_ci() is expected
