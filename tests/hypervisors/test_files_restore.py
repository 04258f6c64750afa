"""A clone of a VM folder says which restored files still name the original VM or its disks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.cli import main
from vmvault.engine.backup import backup
from vmvault.engine.clone import restore_vm
from vmvault.hypervisors.base import RestoredVm
from vmvault.hypervisors.files import FilesSource
from vmvault.hypervisors.files_restore import SEARCHED_BYTES, after_restore
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _folder(tmp_path: Path) -> Path:
    vm = tmp_path / "web"
    (vm / "conf").mkdir(parents=True)
    (vm / "web-disk.raw").write_bytes(b"d" * CS)
    (vm / "data.raw").write_bytes(b"e" * CS)
    (vm / "web.nvram").write_bytes(b"n" * 100)
    # names the VM and a disk renamed for the clone, and the nvram renamed too
    (vm / "vm.conf").write_text("name=web\ndisk=web-disk.raw\ndisk=data.raw\nnvram=web.nvram\n")
    # Windows writes UTF-16LE: the renamed disk only
    (vm / "conf" / "settings.xml").write_bytes("<disk>C:\\VMs\\web-disk.raw</disk>".encode("utf-16-le"))
    # names only the disk whose name stays (data.raw is not renamed): nothing to say
    (vm / "conf" / "other.txt").write_text("data.raw\n")
    # a name inside a longer word is not the name: nothing to say either
    (vm / "conf" / "words.txt").write_text("webserver old-web-disk.raw web.nvram2\n")
    return vm


def test_a_clone_names_each_file_that_still_names_the_original(tmp_path: Path) -> None:
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    snap = backup(repo, FilesSource(str(_folder(tmp_path)))).snapshot
    done = restore_vm(repo, snap, str(tmp_path / "out"), clone_name="shop")
    assert (tmp_path / "out" / "shop" / "shop-disk.raw").exists()
    assert done.note.facts == {
        "not_rewritten": [
            {"file": "conf/settings.xml", "names": ["web-disk.raw"]},
            {"file": "vm.conf", "names": ["web", "web-disk.raw", "web.nvram"]},
        ]
    }
    (conf_line,) = [line for line in done.note.lines if "vm.conf" in line]
    assert "web-disk.raw (restored as shop-disk.raw)" in conf_line
    assert "web.nvram (restored as shop.nvram)" in conf_line
    assert "web (the original VM)" in conf_line
    assert "other.txt" not in "".join(done.note.lines) and "words.txt" not in "".join(done.note.lines)
    # the files themselves are restored as they were
    assert (tmp_path / "out" / "shop" / "vm.conf").read_text().startswith("name=web\n")


def test_a_plain_restore_and_a_clean_clone_say_nothing(tmp_path: Path) -> None:
    vm = tmp_path / "db"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(b"d" * CS)
    (vm / "notes.txt").write_text("nothing of interest\n")
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    snap = backup(repo, FilesSource(str(vm))).snapshot
    assert restore_vm(repo, snap, str(tmp_path / "plain")).note.facts == {}
    clean = restore_vm(repo, snap, str(tmp_path / "clones"), clone_name="db2").note
    assert clean.facts == {"not_rewritten": []} and clean.lines == []


def test_only_the_head_of_a_big_file_is_searched(tmp_path: Path) -> None:
    vm = tmp_path / "web"
    vm.mkdir()
    (vm / "web.raw").write_bytes(b"d" * CS)
    (vm / "early.bin").write_bytes(b"web.raw" + bytes(SEARCHED_BYTES))
    (vm / "late.bin").write_bytes(bytes(SEARCHED_BYTES) + b"web.raw")
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    snap = backup(repo, FilesSource(str(vm))).snapshot
    note = restore_vm(repo, snap, str(tmp_path / "out"), clone_name="w2").note
    assert note.facts == {"not_rewritten": [{"file": "early.bin", "names": ["web.raw"]}]}


def test_the_cli_prints_the_warning_and_json_carries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    vm = _folder(tmp_path)
    assert main(["init", "-q"]) == 0
    assert main(["backup", str(vm), "-q"]) == 0
    capsys.readouterr()
    assert main(["restore", "latest", "--target", str(tmp_path / "t"), "--as-clone", "shop"]) == 0
    out = capsys.readouterr().out
    assert "warning: vm.conf was not rewritten for the clone" in out
    assert main(["restore", "latest", "--target", str(tmp_path / "j"), "--as-clone", "shop", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"file": "vm.conf", "names": ["web", "web-disk.raw", "web.nvram"]} in doc["not_rewritten"]


def test_a_restored_file_swapped_for_a_fifo_is_not_read_and_nothing_hangs(tmp_path: Path) -> None:
    """The restore target is not trusted: a file replaced by a FIFO after it was written is
    reported as unreadable, never opened for a read that would wait for a writer."""
    folder = tmp_path / "shop"
    folder.mkdir()
    os.mkfifo(folder / "vm.conf")
    (folder / "shop.raw").write_bytes(b"d")
    restored = RestoredVm(
        kind="files",
        vm={"name": "web"},
        folder=str(folder),
        disks={"web.raw": str(folder / "shop.raw")},
        formats={"web.raw": "raw"},
        files={"vm.conf": str(folder / "vm.conf")},
        clone_name="shop",
    )
    note = after_restore(restored)
    assert note.facts == {"not_rewritten": []}
    assert note.lines == ["  warning: vm.conf could not be read back to check it for the original's names"]
