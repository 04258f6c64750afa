"""Only repo/ knows how repository objects are laid out (issue 11, section 4).

Every module outside ``vmvault/repo`` that uses the repository reads index blocks with
``Repository.read_index_block``, stores them with ``BlobWriter.add_index_block`` and takes
names from ``vmvault.repo.format``. Checked on the syntax tree of every such module: no import
of a private module of repo/, no name of the byte layout, no INDEX blob read or written raw,
no slicing of bytes into 32-byte entries.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "vmvault"

#: the names of repo/_layout.py: knowing one of them outside repo/ is knowing a byte layout
LAYOUT_NAMES = frozenset(
    {
        "BLOB_ENTRY",
        "ENVELOPE_HEADER",
        "ENVELOPE_VERSION",
        "ID_SIZE",
        "INDEX_HEADER",
        "INDEX_MAGIC",
        "INDEX_PACK",
        "PACK_MAGIC",
        "PACK_TRAILER",
        "TAG_SIZE",
        "EnvelopeFlags",
    }
)


def _imports_repo(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "repo" in node.module.split("."):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("vmvault.repo") for a in node.names):
            return True
    return False


def _is_32(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Constant) and node.value == 32) or (
        isinstance(node, ast.Name) and node.id == "ID_SIZE"
    )


def violations(source: str) -> list[str]:
    """What in ``source`` (a module outside repo/) knows the repository's byte layout."""
    tree = ast.parse(source)
    uses_repo = _imports_repo(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if "repo" in parts:
                after = parts[parts.index("repo") + 1 :]
                if any(p.startswith("_") for p in after) or (
                    not after and any(a.name.startswith("_") for a in node.names)
                ):
                    found.append(f"{line}: imports a private module of repo/ ({node.module})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vmvault.repo._"):
                    found.append(f"{line}: imports a private module of repo/ ({alias.name})")
        if isinstance(node, ast.Name | ast.alias | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.name if isinstance(node, ast.alias) else node.attr
            if name in LAYOUT_NAMES:
                found.append(f"{line}: uses {name}, a name of the byte layout")
        if not uses_repo:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            first = node.args[0]
            if node.func.attr in ("get_blob", "add") and isinstance(first, ast.Attribute) and first.attr == "INDEX":
                found.append(f"{line}: {node.func.attr}(…INDEX…): use read_index_block / add_index_block")
        is_range = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
        if is_range and len(node.args) == 3 and _is_32(node.args[2]):
            found.append(f"{line}: steps through bytes 32 at a time (index-block entries)")
        if isinstance(node, ast.Slice):
            upper = node.upper
            if _is_32(node.step) or (isinstance(upper, ast.BinOp) and (_is_32(upper.right) or _is_32(upper.left))):
                found.append(f"{line}: slices 32-byte entries out of bytes")
    return found


def test_nothing_outside_repo_knows_the_byte_layout() -> None:
    problems: dict[str, list[str]] = {}
    checked = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "repo":
            continue
        found = violations(path.read_text())
        checked += 1
        if found:
            problems[str(rel)] = found
    assert checked > 50
    assert problems == {}, "use vmvault.repo.format and the index-block API instead: " + repr(problems)


def test_the_check_finds_what_it_should() -> None:
    bad = """
from vmvault.repo._layout import ZERO_ID
from vmvault.repo import _limits
import vmvault.repo._layout as layout
from ..repo._limits import MAX_INDEX_BLOCKS
from vmvault.repo.repository import Repository

def read(repo, block_id, raw, i, ID_SIZE):
    raw = repo.get_blob(BlobType.INDEX, block_id)
    writer.add(BlobType.INDEX, block_id, raw)
    entries = [raw[i : i + 32] for i in range(0, len(raw), 32)]
    one = raw[i * ID_SIZE : (i + 1) * ID_SIZE]
    every = raw[::32]
    return layout.ID_SIZE
"""
    found = violations(bad)
    text = "\n".join(found)
    assert text.count("private module of repo/") == 4, text
    assert "get_blob(…INDEX…)" in text and "add(…INDEX…)" in text
    assert "steps through bytes 32 at a time" in text
    assert text.count("slices 32-byte entries") == 3, text
    assert "uses ID_SIZE" in text
    fine = """
from vmvault.repo.format import ZERO_ID, BlobType, ChunkResolver
from vmvault.repo.repository import Repository

def read(repo, block_id, writer, block):
    found = repo.read_index_block(block_id, count=4)
    writer.add(BlobType.DATA, block_id, b"x")
    writer.add_index_block(block)
    return [ref for ref in found if ref != ZERO_ID], found[1:3]
"""
    assert violations(fine) == []
    # a module that does not use the repository may slice 32 bytes (a GUID, a disk header)
    assert violations("def guid(raw, i):\n    return raw[i : i + 32]\n") == []
