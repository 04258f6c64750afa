"""Hostile guest filesystems against ``vmvault files``: what a guest can put into its own disk
(forged sizes, names, duplicate entries, loops) must never crash, hang, escape or overwrite.

The filesystems are real ext4 images made by ``mke2fs -d`` and then forged with ``debugfs -w``
(as a guest with root on its own disk could), backed up and read back through the confined
filesystem worker as ``vmvault files`` does.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from tests.fsimages import Part, ext_image, need, partitioned_disk, run
from vmvault.backends.memory import MemoryBackend
from vmvault.browse import MAX_DEPTH, _wire
from vmvault.cli import main
from vmvault.engine.backup import backup
from vmvault.engine.file_restore import restore_files
from vmvault.engine.files import Location, SnapshotFiles
from vmvault.errors import GuestError, TargetError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def forged_ext(
    tmp_path: Path, commands: list[str], *, files: dict[str, bytes] | None = None, size: int = 8 << 20
) -> Path:
    """An ext4 image of ``files`` (guest path: content), then changed by ``debugfs -w`` commands."""
    need("mke2fs", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    for rel, data in (files or {"d/f": b"data\n"}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    image = ext_image(tmp_path / "guest.img", src, size)
    run("debugfs", "-w", "-f", "-", image, stdin="\n".join(commands).encode())
    return image


def backed_up(image: Path) -> tuple[Repository, Snapshot]:
    repo = Repository.init(MemoryBackend(), b"passphrase")
    return repo, backup(repo, FilesSource(str(image))).snapshot


def _holds(folder: Path, size: int) -> bool:
    with open(folder / "probe", "wb") as f:
        try:
            f.truncate(size)
        except OSError:
            return False
        finally:
            os.unlink(folder / "probe")
    return True


@pytest.mark.parametrize("size", ["0x7ffffffffff00000", "0x100000000000"])
def test_a_file_claiming_more_than_the_target_holds_is_refused_before_writing(tmp_path: Path, size: str) -> None:
    # 8 EiB and 16 TiB: more than ext4 (with 4 KiB blocks) holds in one file
    if _holds(tmp_path, int(size, 16)):
        pytest.skip(f"the test folder's file system holds a sparse file of {size} bytes")
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    image = forged_ext(tmp_path, [f"write {small} /d/huge", f"sif /d/huge size {size}"])
    repo, snap = backed_up(image)
    target = tmp_path / "out"
    with SnapshotFiles(repo, snap) as files:
        [huge] = [e for e in files.ls(Location("guest.img", None, "/d")) if e.name == "huge"]
        assert huge.size == int(size, 16)
        with pytest.raises(TargetError, match="more than the target's file system holds"):
            restore_files(files, [Location("guest.img", None, "/d")], str(target))
    assert os.listdir(target) == [], "nothing was written before the refusal"


def test_two_entries_for_one_name_are_refused_before_writing(tmp_path: Path) -> None:
    # a link and a folder under one name (a guest edits its folder's bytes): placing the link
    # first and then the folder's files through it is what the target's rules refuse; the
    # restore must refuse it before it writes anything, not halfway
    need("mke2fs")
    src = tmp_path / "src"
    (src / "d" / "dupe_name_b").mkdir(parents=True)
    (src / "d" / "dupe_name_b" / "inner").write_bytes(b"inner\n")
    (src / "d" / "first").write_bytes(b"first\n")
    os.symlink(str(tmp_path / "elsewhere"), src / "d" / "dupe_name_a")
    (tmp_path / "elsewhere").mkdir()
    image = ext_image(tmp_path / "guest.img", src, 8 << 20)
    raw = image.read_bytes()
    assert raw.count(b"dupe_name_b") == 1
    image.write_bytes(raw.replace(b"dupe_name_b", b"dupe_name_a"))
    repo, snap = backed_up(image)
    target = tmp_path / "out"
    with SnapshotFiles(repo, snap) as files:
        names = [e.name for e in files.ls(Location("guest.img", None, "/d"))]
        assert names.count("dupe_name_a") == 2, names
        with pytest.raises(GuestError, match="lists 'dupe_name_a' twice"):
            restore_files(files, [Location("guest.img", None, "/d")], str(target))
    assert not target.exists(), "refused before anything was made"
    assert os.listdir(tmp_path / "elsewhere") == []


def test_folders_deeper_than_the_limit_are_an_error_not_a_silent_cut(tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = src.joinpath(*["n"] * (MAX_DEPTH + 4))
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_bytes(b"at the bottom\n")
    repo, snap = backed_up(ext_image(tmp_path / "guest.img", src, 8 << 20))
    target = tmp_path / "out"
    with SnapshotFiles(repo, snap) as files:
        with pytest.raises(GuestError, match=f"deeper than {MAX_DEPTH} folders"):
            restore_files(files, [Location("guest.img", None, "/n")], str(target))
        notes: list[str] = []
        assert not [h for h in files.find("bottom.txt", notes=notes)]
        assert any(f"deeper than {MAX_DEPTH} folders" in n for n in notes), notes
    assert not target.exists(), "refused before anything was made"


def test_names_reach_the_terminal_escaped_and_the_target_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    need("mke2fs")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    names = [b"esc\x1b]0;title\x07", b"cr\rover", b"bidi\xe2\x80\xaetxt.exe", b"not utf-8 \xff\xfe"]
    for name in names:
        (src / "d").joinpath(os.fsdecode(name)).write_bytes(b"x")
    os.mkfifo(src / "d" / "fifo\nrestored 999 files")  # a special file: named in the result
    image = ext_image(tmp_path / "guest.img", src, 8 << 20)
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    assert main(["init", "-q"]) == 0
    assert main(["backup", "-q", str(image)]) == 0
    capsys.readouterr()
    assert main(["files", "ls", "latest", "guest.img:/d"]) == 0
    assert main(["files", "find", "latest", "*"]) == 0
    assert main(["files", "restore", "latest", "guest.img:/d", "--target", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\r\x07\u202e"), out
    assert "restored 999" not in out.replace("\\nrestored 999", ""), "a name started a line of its own"
    assert sorted(os.listdir(os.fsencode(tmp_path / "out" / "d"))) == sorted(names)


def test_link_targets_too_long_for_the_inode_are_restored(tmp_path: Path) -> None:
    # ext keeps a target of up to 60 bytes in the inode, a longer one in a data block
    src = tmp_path / "src"
    (src / "l").mkdir(parents=True)
    targets = {"short": "/etc", "long": "../" * 30 + "usr/share/zoneinfo/Europe/Berlin", "block": "x/" * 500 + "y"}
    for name, target in targets.items():
        os.symlink(target, src / "l" / name)
    repo, snap = backed_up(ext_image(tmp_path / "guest.img", src, 8 << 20))
    with SnapshotFiles(repo, snap) as files:
        listed = {e.name: e.target for e in files.ls(Location("guest.img", None, "/l"))}
        assert listed == targets
        result = restore_files(files, [Location("guest.img", None, "/l")], str(tmp_path / "out"))
    assert result.links == 3
    assert {n: os.readlink(tmp_path / "out" / "l" / n) for n in targets} == targets


def test_a_folder_loop_ends_and_hard_links_are_restored_as_files(tmp_path: Path) -> None:
    # debugfs links folder /d into itself (a loop no kernel would make) and a file under two names
    image = forged_ext(tmp_path, ["link /d /d/loop", "link /d/f /d/again"])
    repo, snap = backed_up(image)
    target = tmp_path / "out"
    with SnapshotFiles(repo, snap) as files:
        found = sorted(str(h.location) for h in files.find("*"))
        assert found == [
            "guest.img:/d",
            "guest.img:/d/again",
            "guest.img:/d/f",
            "guest.img:/d/loop",
            "guest.img:/lost+found",
        ]
        result = restore_files(files, [Location("guest.img", None, "/d")], str(target))
    assert result.files == 2 and result.folders == 2
    assert (target / "d" / "f").read_bytes() == (target / "d" / "again").read_bytes() == b"data\n"
    assert (target / "d" / "f").stat().st_ino != (target / "d" / "again").stat().st_ino
    assert os.listdir(target / "d" / "loop") == [], "the folder reached again is not entered"


def test_a_thousand_partitions_over_one_filesystem_are_searched_once(tmp_path: Path) -> None:
    # GPT entries may overlap: 1024 of them starting where the filesystem starts made find walk
    # it 1024 times and the worker hold 1024 open filesystems
    fs_image = forged_ext(tmp_path, [])
    disk = partitioned_disk(tmp_path / "disk.img", 24 << 20, "gpt", [Part(fs_image, "linux")])
    data = bytearray(disk.read_bytes())
    first_entry = bytes(data[1024 : 1024 + 128])
    first_lba, last_lba = struct.unpack_from("<QQ", first_entry, 32)
    entries = bytearray()
    for i in range(1024):
        entry = bytearray(first_entry)
        struct.pack_into("<Q", entry, 40, last_lba - i)  # one start, 1024 ends
        entries += entry
    data[1024 : 1024 + len(entries)] = entries
    data[-512:] = bytes(512)  # no backup header to fall back to
    header = bytearray(data[512 : 512 + 92])
    struct.pack_into("<III", header, 80, 1024, 128, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    data[512 : 512 + 92] = header
    assert first_lba * 512 + 1024 * 128 > 1024 + len(entries)  # the array ends before the partition
    disk.write_bytes(bytes(data))
    repo, snap = backed_up(disk)
    with SnapshotFiles(repo, snap) as files:
        notes: list[str] = []
        hits = sorted(str(h.location) for h in files.find("f", notes=notes))
        assert hits == ["disk.img:1:/d/f"], (hits[:5], notes[:5])
        assert "disk.img: partitions 1 and 2 overlap" in notes and "disk.img: and 1007 more overlaps" in notes
        assert len(notes) == 17, notes
        listing = files.view("disk.img").volumes
        assert len(listing) == 1024 and sum(fs is not None for _, fs in listing) == 1
        assert listing[1][0].probe.note == "starts where partition 1 starts; read as partition 1"
        assert [e.name for e in files.ls(Location("disk.img", 7, "/d"))] == ["f"]  # still readable by number


def test_a_folder_too_big_for_one_message_is_listed_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the wire's bound on one message (64 MiB, some 500,000 entries) stopped `files ls` of a larger
    # folder as "damaged or hostile"; here the bound is made 512 KiB and the folder 0.9 MiB of entries
    monkeypatch.setattr(_wire, "MAX_HEADER", 512 << 10)
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    names = [f"file-{i:06d}.txt" for i in range(6_000)]
    for name in names:
        (src / "big" / name).touch()
    repo, snap = backed_up(ext_image(tmp_path / "guest.img", src, 32 << 20))
    with SnapshotFiles(repo, snap) as files:
        assert [e.name for e in files.ls(Location("guest.img", None, "/big"))] == names
        assert sum(1 for h in files.find("file-*")) == len(names)


def test_find_keeps_one_disks_worker_at_a_time_and_a_listing_may_come_between(tmp_path: Path) -> None:
    # a worker process is some 20 MB: a chain of 200 checkpoint layers searched with --layers held
    # 200 of them (and 400 pipes) until the end
    image = forged_ext(tmp_path, [], files={"d/f": b"data\n", "d/g": b"more\n", "d/h": b"and more\n"})
    vm = tmp_path / "vm"
    vm.mkdir()
    for name in ("a.raw", "b.raw", "c.raw", "d.raw"):
        (vm / name).write_bytes(image.read_bytes())
    repo, snap = backed_up(vm)
    with SnapshotFiles(repo, snap) as files:
        hits = []
        for hit in files.find("?"):
            assert len(files._workers) == 1, sorted(files._workers)
            if hit.entry.name == "g":  # a listing of the same disk in the middle of its search
                assert [e.name for e in files.ls(Location(hit.location.disk, None, "/d"))] == ["f", "g", "h"]
            hits.append(str(hit.location))
        assert not files._workers
    assert hits == [f"{d}.raw:/d{n}" for d in "abcd" for n in ("", "/f", "/g", "/h")]


def test_a_listing_in_the_middle_of_a_long_walk_leaves_the_walk_whole(tmp_path: Path) -> None:
    # the worker kept one walk at a time: a listing asked for between two pieces of a walk
    # (more than 2,000 entries) ended the walk there, silently
    files = {f"many/{i:05d}": b"" for i in range(2500)} | {"other/x": b"x"}
    repo, snap = backed_up(forged_ext(tmp_path, [], files=files, size=16 << 20))
    with SnapshotFiles(repo, snap) as opened:
        fs, root = opened.entry(Location("guest.img", None, "/"))
        walk = fs.walk(root)
        seen = [next(walk)]
        assert [e.name for e in fs.listdir(fs.lookup("/other"))] == ["x"]
        seen += list(walk)
    assert len([e for e in seen if e.path.startswith("/many/")]) == 2500
