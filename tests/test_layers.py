"""The layers go one way: the key registry (``keystore/``) imports nothing from the filter
(``gpgfilter/``) above it; what it needs from above it names as a Protocol that the process
wiring passes in."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(source: str) -> set[str]:
    """Every module an import statement in ``source`` names, at any depth (function-level
    imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def upward_imports(root: Path) -> list[str]:
    return sorted(
        f"{path.relative_to(root)}: {module}"
        for path in (root / "keystore").rglob("*.py")
        if "node_modules" not in path.parts
        for module in imported_modules(path.read_text())
        if module == "gpgfilter" or module.startswith("gpgfilter.")
    )


def test_keystore_imports_nothing_from_gpgfilter() -> None:
    assert upward_imports(ROOT) == []


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "keystore" / "deep").mkdir(parents=True)
    (tmp_path / "keystore" / "deep" / "m.py").write_text(
        "import gpgfilter.mail\nfrom gpgfilter import process\n"
        "def f():\n    from gpgfilter.openpgp.engine import Engine\n"
        "from keystore import model\n"
    )
    assert upward_imports(tmp_path) == [
        "keystore/deep/m.py: gpgfilter",
        "keystore/deep/m.py: gpgfilter.mail",
        "keystore/deep/m.py: gpgfilter.openpgp.engine",
    ]
