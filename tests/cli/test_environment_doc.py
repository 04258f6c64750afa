"""The README lists every environment variable the code reads, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_by_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src" / "vmvault").rglob("*.py"):
        text = path.read_text()
        # os.environ.get("X"), os.environ["X"], os.getenv("X"), the secret reader's env="X"
        # (repo/secret.py: given_secret reads the variable it is named), and NAME = "X" constants used so
        names.update(
            re.findall(r"""(?:environ(?:\.get)?\(|environ\[|getenv\(|\benv=)\s*["']([A-Z][A-Z0-9_]+)["']""", text)
        )
        for constant, value in re.findall(r"""^(\w+)\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", text, re.M):
            if re.search(rf"environ(?:\.get)?\(\s*{constant}\b|environ\[\s*{constant}\b|getenv\(\s*{constant}\b", text):
                names.add(value)
    return names


def documented() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Environment variables", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"`((?:VMVAULT|XDG|LIBVIRT|SSH|SQLITE)_[A-Z0-9_]+)`", section))


def test_every_variable_the_code_reads_is_documented() -> None:
    code = read_by_code()
    assert {"VMVAULT_KEY_FILE", "VMVAULT_REPO", "VMVAULT_LAB_FAULTS"} <= code  # the scan finds them
    assert code - documented() == set(), "read by the code but not in the README"
    assert documented() - code == set(), "in the README but read by nothing"
