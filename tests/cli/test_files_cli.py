"""``vmvault files`` as a user meets it: raw, VHDX, qcow2 and a checkpoint chain, backed up and
browsed; clear errors with their exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.fsimages import GuestImages
from vmvault.cli import EXIT, main

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q"]) == 0
    return tmp_path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def backed_up(capsys: pytest.CaptureFixture[str], source: Path) -> str:
    code, doc = run_json(capsys, "backup", str(source))
    assert code == 0, doc
    return str(doc["snapshot"])


@pytest.mark.parametrize("fmt", ["raw", "vhdx", "qcow2"])
def test_ls_lists_partitions_and_folders_in_every_container(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    disk = guest_images.container("mbr", fmt)
    snap = backed_up(capsys, disk.parent)
    name = disk.name
    code, doc = run_json(capsys, "files", "ls", snap[:8], name)
    assert code == 0
    assert doc["partition_table"] == "mbr"
    assert [(v["partition"], v["filesystem"], v["status"]) for v in doc["volumes"]] == [
        (1, "ext4", "ok"),
        (2, "fat32", "ok"),
        (5, "ntfs", "ok"),
        (6, "fat16", "ok"),
    ]
    _, tree = guest_images.filesystem("ntfs")
    code, doc = run_json(capsys, "files", "ls", "latest", f"{name}:5:/docs")
    assert code == 0
    entries = {e["name"]: e for e in doc["entries"]}
    assert sorted(entries) == ["Deep", "empty.txt", "report.txt"]
    assert entries["report.txt"]["size"] == tree["/docs/report.txt"].size
    assert entries["report.txt"]["type"] == "file" and entries["Deep"]["type"] == "dir"
    assert entries["report.txt"]["mtime"].startswith("2021-03-0")
    code, doc = run_json(capsys, "files", "ls", "latest", f"{name}:1:/links/escape")
    assert [(e["type"], e["target"]) for e in doc["entries"]] == [("symlink", "../../../../outside")]
    capsys.readouterr()
    assert main(["files", "ls", "latest", f"{name}:2:/"]) == 0
    text = capsys.readouterr().out
    assert "hello.txt" in text and "docs" in text and f"{name}:2:/ in snapshot {snap[:8]}" in text


def test_ls_of_a_disk_without_a_partition_table(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = guest_images.container("bare", "qcow2")
    backed_up(capsys, disk.parent)
    code, doc = run_json(capsys, "files", "ls", "latest", disk.name)
    assert code == 0 and doc["partition_table"] == "none"
    assert [(v["partition"], v["filesystem"]) for v in doc["volumes"]] == [(None, "ntfs")]
    code, doc = run_json(capsys, "files", "ls", "latest", f"{disk.name}:/DOCS/deep")
    assert code == 0 and [e["name"] for e in doc["entries"]] == ["nested"]


def test_the_checkpoint_layer_shows_the_changed_files(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, changes = guest_images.chain()
    backed_up(capsys, folder)
    code, doc = run_json(capsys, "files", "ls", "latest", "guest_ckpt.avhdx:2:/hello.txt")
    assert code == 0 and doc["entries"][0]["size"] == len(changes["ntfs:/hello.txt"])
    code, doc = run_json(capsys, "files", "ls", "latest", "guest.vhdx:2:/hello.txt")
    assert code == 0 and doc["entries"][0]["size"] == len(b"hello from the guest\n")
    code, doc = run_json(capsys, "files", "find", "latest", "new.txt")
    assert code == 0 and [m["location"] for m in doc["matches"]] == ["guest_ckpt.avhdx:3:/new.txt"]
    code, doc = run_json(capsys, "files", "find", "latest", "hello.TXT", "--layers")
    assert [m["location"] for m in doc["matches"]] == [
        "guest.vhdx:1:/hello.txt",
        "guest.vhdx:2:/hello.txt",
        "guest_ckpt.avhdx:1:/hello.txt",
        "guest_ckpt.avhdx:2:/hello.txt",
    ]
    capsys.readouterr()
    assert main(["files", "find", "latest", "*.bin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "guest_ckpt.avhdx:3:/docs/Deep/nested/file.bin" in lines and len(lines) == 3


def test_find_reports_what_it_could_not_search(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = guest_images.container("odd", "raw")
    backed_up(capsys, disk.parent)
    capsys.readouterr()
    assert main(["files", "find", "latest", "*.nothing"]) == EXIT["problems"]
    captured = capsys.readouterr()
    assert "odd.raw:3: LUKS encrypted volume: not supported" in captured.err
    assert "no match for '*.nothing'" in captured.out
    code, doc = run_json(capsys, "files", "ls", "latest", "odd.raw")
    assert code == 0
    assert [v["note"] for v in doc["volumes"] if v["status"] != "ok"] == [
        "XFS filesystem: not supported",
        "LUKS encrypted volume: not supported",
        "LVM physical volume: not supported",
        "BitLocker encrypted volume: not supported",
        "no known filesystem",
    ]


@pytest.mark.parametrize(
    ("location", "code", "message"),
    [
        ("mbr.raw:5:/nothing", EXIT["error"], "mbr.raw:5:/nothing: no such file or folder"),
        ("mbr.raw:5:/hello.txt/x", EXIT["error"], "/hello.txt is a file, not a folder"),
        ("mbr.raw:/hello.txt", EXIT["error"], "the disk has a MBR partition table: name a partition"),
        ("mbr.raw:3:/", EXIT["error"], "no partition 3 in the MBR table"),
        ("nodisk.raw:/x", EXIT["usage"], "names no disk of snapshot"),
        ("mbr.raw:x", EXIT["usage"], "names no disk of snapshot"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str], location: str, code: int, message: str
) -> None:
    backed_up(capsys, guest_images.container("mbr", "raw").parent)
    capsys.readouterr()
    assert main(["files", "ls", "latest", location]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---- restore ------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("fmt", ["raw", "vhdx", "qcow2"])
def test_restore_gives_back_files_folders_links_times_and_holes(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    disk = guest_images.container("mbr", fmt)
    backed_up(capsys, disk.parent)
    _, tree = guest_images.filesystem("ext4")
    target = env / "out"
    name = disk.name
    code, doc = run_json(
        capsys, "files", "restore", "latest",
        f"{name}:1:/docs", f"{name}:1:/hello.txt", f"{name}:1:/links", f"{name}:1:/big/sparse.img",
        "--target", str(target),
    )  # fmt: skip
    assert code == 0, doc
    assert doc["files"] == 5 and doc["links"] == 3 and doc["folders"] == 4
    assert _listing(target) == sorted(
        [
            "docs", "docs/Deep", "docs/Deep/nested", "docs/Deep/nested/file.bin", "docs/empty.txt",
            "docs/report.txt", "hello.txt", "links", "links/abs", "links/escape", "links/rel", "sparse.img",
        ]
    )  # fmt: skip
    for rel, guest in (
        ("hello.txt", "/hello.txt"),
        ("docs/report.txt", "/docs/report.txt"),
        ("docs/Deep/nested/file.bin", "/docs/Deep/nested/file.bin"),
        ("docs/empty.txt", "/docs/empty.txt"),
        ("sparse.img", "/big/sparse.img"),
    ):
        path = target / rel
        want = tree[guest]
        assert _sha(path) == want.sha256, rel
        assert int(path.stat().st_mtime) == want.mtime, rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, rel
    sparse = (target / "sparse.img").stat()
    assert sparse.st_blocks * 512 < 1024 * 1024, "the guest's hole is a hole"
    for link in ("rel", "abs", "escape"):
        path = target / "links" / link
        assert path.is_symlink() and os.readlink(path) == tree[f"/links/{link}"].target
    assert not (env / "outside").exists() and not (env.parent / "outside").exists()
    assert int((target / "docs" / "Deep").stat().st_mtime) == int(
        guest_images.tree("ext")[0].joinpath("docs", "Deep").stat().st_mtime
    )
    assert not [p for p in os.listdir(target) if p.startswith(".vmvault-restore-")]


def test_restore_from_ntfs_ignores_case_and_a_root_gets_the_disks_name(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = guest_images.container("gpt", "vhdx")
    backed_up(capsys, disk.parent)
    _, tree = guest_images.filesystem("ntfs")
    target = env / "out"
    code, doc = run_json(
        capsys, "files", "restore", "latest", "gpt.vhdx:2:/DOCS/deep", "gpt.vhdx:1:/", "--target", str(target)
    )
    assert code == 0, doc
    assert _sha(target / "Deep" / "nested" / "file.bin") == tree["/docs/Deep/nested/file.bin"].sha256
    assert _sha(target / "gpt.vhdx-1" / "hello.txt") == tree["/hello.txt"].sha256  # the FAT root
    assert (target / "gpt.vhdx-1" / "emptydir").is_dir()


def test_restore_from_the_checkpoint_layer_gives_the_new_version(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, changes = guest_images.chain()
    backed_up(capsys, folder)
    new, old = env / "new", env / "old"
    assert main(["files", "restore", "latest", "guest_ckpt.avhdx:2:/hello.txt", "guest_ckpt.avhdx:3:/new.txt",
                 "--target", str(new), "-q"]) == 0  # fmt: skip
    assert (new / "hello.txt").read_bytes() == changes["ntfs:/hello.txt"]
    assert (new / "new.txt").read_bytes() == changes["ext4:/new.txt"]
    assert main(["files", "restore", "latest", "guest.vhdx:2:/hello.txt", "--target", str(old), "-q"]) == 0
    assert (old / "hello.txt").read_bytes() == b"hello from the guest\n"


def test_an_existing_file_stops_the_restore_before_anything_is_written(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    backed_up(capsys, guest_images.container("mbr", "raw").parent)
    target = env / "out"
    (target / "docs").mkdir(parents=True)
    (target / "docs" / "report.txt").write_text("mine")
    capsys.readouterr()
    code = main(["files", "restore", "latest", "mbr.raw:1:/hello.txt", "mbr.raw:1:/docs", "--target", str(target)])
    assert code == EXIT["usage"]
    err = capsys.readouterr().err
    assert "report.txt" in err and "exists" in err and err.count("\n") == 1
    assert (target / "docs" / "report.txt").read_text() == "mine"
    assert _listing(target) == ["docs", "docs/report.txt"], "nothing written, no work folder left"
    # an existing folder is used; a link where a folder goes is refused
    (target / "docs" / "report.txt").unlink()
    assert main(["files", "restore", "latest", "mbr.raw:1:/docs", "--target", str(target), "-q"]) == 0
    assert (target / "docs" / "Deep" / "nested" / "file.bin").is_file()
    elsewhere = env / "elsewhere"
    elsewhere.mkdir()
    other = env / "other"
    other.mkdir()
    (other / "docs").symlink_to(elsewhere)
    capsys.readouterr()
    assert main(["files", "restore", "latest", "mbr.raw:1:/docs", "--target", str(other)]) != 0
    assert "link" in capsys.readouterr().err
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize(
    ("locations", "code", "message"),
    [
        (["mbr.raw:1:/nothing"], EXIT["error"], "mbr.raw:1:/nothing: no such file or folder"),
        (["mbr.raw:1:/hello.txt", "mbr.raw:5:/hello.txt"], EXIT["usage"], "would both be restored as 'hello.txt'"),
        (["mbr.raw:1:/hello.txt", "mbr.raw:9:/x"], EXIT["error"], "no partition 9"),
    ],
)
def test_restore_errors_write_nothing(
    env: Path,
    guest_images: GuestImages,
    capsys: pytest.CaptureFixture[str],
    locations: list[str],
    code: int,
    message: str,
) -> None:
    backed_up(capsys, guest_images.container("mbr", "raw").parent)
    target = env / "out"
    capsys.readouterr()
    assert main(["files", "restore", "latest", *locations, "--target", str(target)]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not target.exists()


def test_a_damaged_chunk_stops_the_restore_naming_it_and_leaves_no_file(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    backed_up(capsys, guest_images.container("mbr", "raw").parent)
    for pack in (env / "repo" / "data").rglob("*"):
        if pack.is_file():
            data = bytearray(pack.read_bytes())
            for pos in range(64, len(data), 4096):
                data[pos] ^= 0x20
            pack.write_bytes(bytes(data))
    target = env / "out"
    capsys.readouterr()
    code = main(["files", "restore", "latest", "mbr.raw:1:/docs", "--target", str(target)])
    assert code == EXIT["error"]
    err = capsys.readouterr().err
    assert "needed by disk mbr.raw at offset" in err and "Traceback" not in err
    assert not target.exists() or not [p for p in target.rglob("*") if p.is_file()]


def test_restore_from_exfat_fat12_ext2_and_ext3(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = guest_images.container("odd", "qcow2")
    backed_up(capsys, disk.parent)
    _, fat = guest_images.filesystem("fat12")
    _, ext = guest_images.filesystem("ext2")
    _, exfat = guest_images.filesystem("exfat")
    target = env / "out"
    parts = {k: guest_images.partition_of("odd", k) for k in ("exfat", "fat12", "ext2", "ext3")}
    code, doc = run_json(
        capsys, "files", "restore", "latest",
        f"odd.qcow2:{parts['exfat']}:/", f"odd.qcow2:{parts['fat12']}:/docs", f"odd.qcow2:{parts['ext2']}:/links",
        f"odd.qcow2:{parts['ext3']}:/hello.txt", "--target", str(target),
    )  # fmt: skip
    assert code == 0, doc
    root = target / f"odd.qcow2-{parts['exfat']}"
    restored = {"/" + str(p.relative_to(root)) for p in root.rglob("*")}
    assert restored == set(exfat)
    for path, want in exfat.items():
        if want.type == "file":
            assert _sha(root / path[1:]) == want.sha256 and int((root / path[1:]).stat().st_mtime) == want.mtime, path
    assert _sha(target / "docs" / "report.txt") == fat["/docs/report.txt"].sha256
    assert int((target / "docs" / "report.txt").stat().st_mtime) == fat["/docs/report.txt"].mtime
    assert os.readlink(target / "links" / "abs") == ext["/links/abs"].target
    assert _sha(target / "hello.txt") == ext["/hello.txt"].sha256


@pytest.mark.parametrize(
    ("kind", "message"),
    [("luks", "LUKS encrypted volume: not supported"), ("empty", "no known filesystem")],
)
def test_restore_from_a_volume_vmvault_cannot_read_writes_nothing(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    backed_up(capsys, guest_images.container("odd", "raw").parent)
    target = env / "out"
    part = guest_images.partition_of("odd", kind)
    capsys.readouterr()
    assert main(["files", "restore", "latest", f"odd.raw:{part}:/", "--target", str(target)]) == EXIT["error"]
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not target.exists()


def test_restore_from_a_damaged_filesystem_writes_nothing(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = env / "vm"
    folder.mkdir()
    data = bytearray(guest_images.filesystem("ext4")[0].read_bytes())
    data[1024 + 24 : 1024 + 28] = b"\xff" * 4  # the superblock's block size
    (folder / "bad.raw").write_bytes(bytes(data))
    backed_up(capsys, folder)
    target = env / "out"
    target.mkdir()
    capsys.readouterr()
    assert main(["files", "restore", "latest", "bad.raw:/docs", "--target", str(target)]) == EXIT["error"]
    err = capsys.readouterr().err
    assert "bad.raw: damaged ext" in err and err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(target) == []
