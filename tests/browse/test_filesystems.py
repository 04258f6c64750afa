"""Guest filesystems through the library, on images built by Debian's own tools."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fsimages import GuestImages
from vmvault.browse import Filesystem, disk_volumes, open_volume, probe
from vmvault.errors import GuestError, GuestPathError, IntegrityError

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")


def _reader(path: Path) -> tuple[Callable[[int, int], bytes], int]:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    return (lambda off, length: os.pread(fd, length, off)), size


def _open(path: Path) -> Filesystem:
    read, size = _reader(path)
    found, fs = probe(read, 0, size)
    assert fs is not None, found
    return fs


def _content(fs: Filesystem, path: str) -> bytes:
    entry = fs.lookup(path)
    read = fs.reader(entry)
    out = bytearray()
    while len(out) < entry.size:
        out += read(len(out), 64 * 1024)
    return bytes(out)


@pytest.mark.parametrize("kind", ["ext2", "ext3", "ext4", "fat12", "fat16", "fat32", "ntfs", "exfat"])
def test_every_entry_reads_back_as_it_was_put_in(guest_images: GuestImages, kind: str) -> None:
    image, tree = guest_images.filesystem(kind)
    fs = _open(image)
    assert fs.kind == kind
    found = {e.path: e for e in fs.walk(fs.root)}
    if kind.startswith("ext"):
        found.pop("/lost+found")
    assert sorted(found) == sorted(tree)
    for path, want in tree.items():
        got = found[path]
        assert got.type == want.type, path
        if want.type == "file":
            assert got.size == want.size, path
            assert hashlib.sha256(_content(fs, path)).hexdigest() == want.sha256, path
            assert got.mtime_ns is not None and abs(got.mtime_ns // 10**9 - want.mtime) <= 2, path
        if want.type == "symlink":
            assert got.target == want.target
    if kind.startswith("ext"):
        assert found["/hello.txt"].mode == 0o644
        assert found["/docs"].mode == 0o755
    else:
        assert found["/hello.txt"].mode == 0


def test_the_filesystems_own_entries_are_not_listed(guest_images: GuestImages) -> None:
    for kind in ("ntfs", "fat16", "exfat"):
        fs = _open(guest_images.filesystem(kind)[0])
        names = [e.name for e in fs.listdir(fs.root)]
        assert not [n for n in names if n.startswith("$")], (kind, names)


def test_ntfs_and_fat_paths_ignore_case_ext_paths_do_not(guest_images: GuestImages) -> None:
    for kind in ("ntfs", "fat32"):
        fs = _open(guest_images.filesystem(kind)[0])
        assert fs.lookup("/DOCS/deep/NESTED/File.BIN").path == "/docs/Deep/nested/file.bin"
    fs = _open(guest_images.filesystem("ext4")[0])
    with pytest.raises(GuestPathError, match="no such file"):
        fs.lookup("/DOCS")
    assert fs.lookup("/docs/Deep").name == "Deep"


def test_missing_paths_and_paths_through_files_are_clear_errors(guest_images: GuestImages) -> None:
    fs = _open(guest_images.filesystem("ext4")[0])
    with pytest.raises(GuestPathError, match=r"/docs/nothing\.txt: no such file or folder"):
        fs.lookup("/docs/nothing.txt")
    with pytest.raises(GuestPathError, match=r"/hello\.txt is a file, not a folder"):
        fs.lookup("/hello.txt/x")
    with pytest.raises(GuestPathError, match=r"'\.\.' is not allowed"):
        fs.lookup("/docs/../hello.txt")
    with pytest.raises(GuestPathError, match="not a folder"):
        fs.listdir(fs.lookup("/hello.txt"))
    with pytest.raises(GuestPathError, match="symbolic link, not a file"):
        fs.reader(fs.lookup("/links/rel"))
    assert fs.lookup("/links/rel").type == "symlink", "a link is never followed"
    assert fs.lookup("//docs/./Deep/").path == "/docs/Deep"


def test_sparse_files_report_their_holes(guest_images: GuestImages) -> None:
    fs = _open(guest_images.filesystem("ext4")[0])
    entry = fs.lookup("/big/sparse.img")
    holes = fs.holes(entry)
    assert holes and all(off >= 4096 and off + length <= entry.size for off, length in holes)
    covered = sum(length for _, length in holes)
    assert 3 * 1024 * 1024 <= covered <= entry.size - 8192
    data = _content(fs, "/big/sparse.img")
    for off, length in holes:
        assert data[off : off + length] == bytes(length)
    assert fs.holes(fs.lookup("/docs/report.txt")) == []


@pytest.mark.parametrize(
    ("kind", "status", "note"),
    [
        ("exfat", "ok", ""),
        ("xfs", "unsupported", "XFS filesystem: not supported"),
        ("luks", "unsupported", "LUKS encrypted volume: not supported"),
        ("lvm", "unsupported", "LVM physical volume: not supported"),
        ("bitlocker", "unsupported", "BitLocker encrypted volume: not supported"),
        ("empty", "none", "no known filesystem"),
    ],
)
def test_volumes_the_library_cannot_read_are_named(
    guest_images: GuestImages, kind: str, status: str, note: str
) -> None:
    read, size = _reader(guest_images.filesystem(kind)[0])
    found, fs = probe(read, 0, size)
    assert (found.status, found.note) == (status, note)
    assert (fs is not None) == (status == "ok")
    if kind == "exfat":
        assert fs is not None and fs.kind == "exfat" and "hello.txt" in {e.name for e in fs.listdir(fs.root)}


def test_a_damaged_superblock_is_reported_as_damage(guest_images: GuestImages, tmp_path: Path) -> None:
    for kind, (off, length) in (("ext4", (1024 + 24, 4)), ("ntfs", (11, 2)), ("fat32", (11, 2))):
        image = tmp_path / f"{kind}.img"
        data = bytearray(guest_images.filesystem(kind)[0].read_bytes())
        data[off : off + length] = b"\xff" * length  # block size / bytes per sector
        image.write_bytes(data)
        read, size = _reader(image)
        found, fs = probe(read, 0, size)
        assert fs is None and found.status == "damaged", (kind, found)
        assert found.note.startswith(f"damaged {kind[:3]}"), found.note


def test_the_disks_volumes_and_partitions(guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.disk("mbr"))
    table, volumes = disk_volumes(read, size)
    assert table.scheme == "mbr"
    assert [(v.number, v.probe.kind) for v, _ in volumes] == [(1, "ext4"), (2, "fat32"), (5, "ntfs"), (6, "fat16")]
    _, fs = open_volume(read, size, 5)
    assert fs.lookup("/hello.txt").size == len(b"hello from the guest\n")
    with pytest.raises(GuestError, match=r"name a partition as DISK:PART:/PATH \(partitions: 1, 2, 5, 6\)"):
        open_volume(read, size, None)
    with pytest.raises(GuestError, match="no partition 3"):
        open_volume(read, size, 3)
    read, size = _reader(guest_images.disk("bare"))
    volume, fs = open_volume(read, size, None)
    assert volume.number is None and fs.kind == "ntfs"
    with pytest.raises(GuestError, match="no partition table, so no partition 1"):
        open_volume(read, size, 1)
    read, size = _reader(guest_images.disk("odd"))
    table, volumes = disk_volumes(read, size)
    assert [(v.number, v.probe.kind, v.probe.status) for v, _ in volumes] == [
        (1, "exfat", "ok"),
        (2, "xfs", "unsupported"),
        (3, "luks", "unsupported"),
        (4, "lvm", "unsupported"),
        (5, "bitlocker", "unsupported"),
        (6, "", "none"),
        (7, "fat12", "ok"),
        (8, "ext2", "ok"),
        (9, "ext3", "ok"),
    ]
    with pytest.raises(GuestError, match="LVM physical volume: not supported"):
        open_volume(read, size, 4)


def test_a_read_error_underneath_surfaces_as_itself(guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.filesystem("ntfs")[0])
    fs = _open(guest_images.filesystem("ntfs")[0])
    assert fs.bytes_read > 0
    calls = {"n": 0}

    def failing(off: int, length: int) -> bytes:
        calls["n"] += 1
        if calls["n"] > 5:
            raise IntegrityError("chunk 00ff is damaged — needed by disk d at offset 0x1000 of snapshot 1234")
        return read(off, length)

    with pytest.raises(IntegrityError, match="needed by disk d at offset 0x1000"):
        _found, fs2 = probe(failing, 0, size)
        assert fs2 is not None
        list(fs2.walk(fs2.root))


@pytest.mark.parametrize("kind", ["ext4", "ntfs", "fat32"])
def test_random_damage_to_metadata_gives_errors_or_data_never_a_crash(
    guest_images: GuestImages, tmp_path: Path, kind: str
) -> None:
    clean = guest_images.filesystem(kind)[0].read_bytes()
    fs = _open(guest_images.filesystem(kind)[0])
    metadata_end = min(len(clean), 2 * 1024 * 1024)
    rng = random.Random(kind)
    for round_ in range(25):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(metadata_end)] = rng.randrange(256)
        image = tmp_path / f"{kind}-{round_}.img"
        image.write_bytes(data)
        read, size = _reader(image)
        try:
            _found, damaged = probe(read, 0, size)
            if damaged is None:
                continue
            for entry in damaged.walk(damaged.root):
                if entry.type == "file" and entry.size < (1 << 20):
                    damaged.reader(entry)(0, entry.size)
        except GuestError:
            continue
    assert fs.kind == kind
