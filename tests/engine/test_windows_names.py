"""Restores onto Windows: a stored name that Windows would read as a device, a stream of
another file or a forbidden character is refused, and names that differ only in case collide
(``vmvault.platform.WINDOWS`` switched on here: the checks run on Linux, Windows never ran them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.engine.test_backup import new_repo
from vmvault import platform
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore, safe_relpath
from vmvault.errors import IntegrityError
from vmvault.hypervisors.files import FilesSource


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "WINDOWS", True)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("disk.vhdx:evil", "':'"),
        ("C:/Windows/x.dll", "':'"),
        ("sub/NUL.vhdx", "device"),
        ("com1", "device"),
        ("a|b", "'|'"),
        ("folder./x", "dot or a space"),
    ],
)
def test_names_windows_cannot_hold_are_refused(windows: None, name: str, why: str) -> None:
    with pytest.raises(IntegrityError, match=f"refusing to restore a file named .*{why}"):
        safe_relpath(name)


def test_the_same_names_are_fine_on_posix() -> None:
    assert not platform.WINDOWS
    assert safe_relpath("disk.vhdx:evil") == "disk.vhdx:evil"
    assert safe_relpath("sub/nul.vhdx") == "sub/nul.vhdx"
    assert safe_relpath("Sub\\Disk.vhdx") == "Sub/Disk.vhdx"  # a backslash separates on every system


def test_names_that_differ_in_case_collide_on_windows(
    tmp_path: Path, windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "vm.conf").write_text("a\n")
    repo = new_repo()
    monkeypatch.setattr(platform, "WINDOWS", False)
    snap = backup(repo, FilesSource(str(vm))).snapshot
    twin = dataclasses.replace(snap.files[0], name="VM.CONF")
    snap = dataclasses.replace(snap, files=[*snap.files, twin])
    monkeypatch.setattr(platform, "WINDOWS", True)
    with pytest.raises(IntegrityError, match="would both be restored as"):
        restore(repo, snap, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    monkeypatch.setattr(platform, "WINDOWS", False)  # case-sensitive: two files
    restore(repo, snap, str(tmp_path / "posix"))
    assert sorted(p.name for p in (tmp_path / "posix").iterdir()) == ["VM.CONF", "vm.conf"]
