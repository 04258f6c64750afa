"""The layer rule (docs/design.md, "Packages and dependencies") and private modules.

* ``lint-imports`` checks the contracts in pyproject.toml: the layers (cli, automation,
  engine, hypervisors | repo, backends | disk, errors), production never importing
  ``vmvault.testing``, connectors never importing ``vmvault.backends``.
* A module named ``_something`` is private to its package: no module outside that package
  imports it (nor a ``_name`` from a module of another package), checked here on the syntax
  tree of every module, imports inside functions included.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: (importing module, imported private module) -> why it is allowed for now. Each needs a
#: reason and an end: the entry goes when that work lands.
EXEMPT: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_package(name: str) -> bool:
    return (SRC.joinpath(*name.split(".")) / "__init__.py").is_file()


def _owner_of_private(name: str) -> str | None:
    """The package a private module or name belongs to (``vmvault.repo`` for
    ``vmvault.repo._layout``, ``vmvault.repo._layout.X`` and ``vmvault.repo.prune._helper``),
    or None when no part of ``name`` is private."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if i and part.startswith("_") and not part.startswith("__"):
            # a private module of a package, or a private name of a module of the package
            return ".".join(parts[:i] if _is_package(".".join(parts[:i])) else parts[: i - 1])
    return None


def _private_module(name: str) -> str:
    """``vmvault.repo._layout`` for ``vmvault.repo._layout.ID_SIZE``: a private module's names
    count as the module; a private name of a public module stays itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if i and part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[: i + 1])
    return name


def private_imports(importer: str, source: str, *, is_package: bool = False) -> list[tuple[str, str]]:
    """``(importer, private name)`` for every import in ``source`` of a private module (or a
    private name of a module) of another package."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, is_package, node.level, node.module)
            targets = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        for target in targets:
            owner = _owner_of_private(target)
            if owner is None or not target.startswith("vmvault."):
                continue
            if importer == owner or importer.startswith(owner + "."):
                continue  # its own package
            found.append((importer, target))
    return found


def test_no_module_imports_a_private_module_of_another_package() -> None:
    found: list[tuple[str, str]] = []
    for path in sorted((SRC / "vmvault").rglob("*.py")):
        found += private_imports(module_name(path), path.read_text(), is_package=path.name == "__init__.py")
    violations = sorted({(importer, _private_module(target)) for importer, target in found})
    unexplained = [v for v in violations if v not in EXEMPT]
    assert unexplained == [], "import the package's public names instead (or move the code): " + repr(unexplained)
    stale = [e for e in EXEMPT if e not in violations]
    assert stale == [], f"exemptions no longer needed, remove them: {stale}"


def test_the_private_import_check_finds_what_it_should() -> None:
    bad = (
        "from vmvault.repo._layout import ID_SIZE\n"
        "import vmvault.disk._open\n"
        "def later():\n    from vmvault.repo import _layout\n"
        "from ..repo._limits import X\n"
        "from vmvault.cli.audit import _age\n"
    )
    found = private_imports("vmvault.engine.backup", bad)
    assert {t for _i, t in found} == {
        "vmvault.repo._layout",
        "vmvault.repo._layout.ID_SIZE",
        "vmvault.disk._open",
        "vmvault.repo._limits",
        "vmvault.repo._limits.X",
        "vmvault.cli.audit._age",
    }
    fine = "from vmvault.repo._layout import ID_SIZE\nfrom ._open import x\nfrom vmvault.repo.names import index_id\n"
    assert private_imports("vmvault.repo.check", fine) == []
    assert private_imports("vmvault.disk", "from ._open import open_checked\n", is_package=True) == []


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not os.path.exists(lint):
        pytest.fail("lint-imports is missing: install the development extras (python3 -m pip install -e '.[dev]')")
    env = os.environ | {"PYTHONPATH": str(SRC)}
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout
