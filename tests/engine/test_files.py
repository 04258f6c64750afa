"""File-level browsing of a snapshot: locations, listing, finding, and what it reads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.fsimages import GuestImages, MiB, Part, ext_image, ntfs_image, partitioned_disk
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.files import Location, SnapshotFiles, parse_location
from vmvault.errors import ConfigError, GuestError, GuestPathError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _snap(*names: str) -> Snapshot:
    disks = [DiskRecord(n, "raw", 0, 65536, 4096, []) for n in names]
    return Snapshot(time="", hostname="", username="", source={}, disks=disks, id="ab" * 32)


def test_locations_parse_against_the_snapshots_disk_names() -> None:
    snap = _snap("web.vhdx", "data:1.raw", "data")
    assert parse_location(snap, "web.vhdx") == Location("web.vhdx")
    assert parse_location(snap, "web.vhdx:/a/b c") == Location("web.vhdx", None, "/a/b c")
    assert parse_location(snap, "web.vhdx:2") == Location("web.vhdx", 2)
    assert parse_location(snap, "web.vhdx:2:/") == Location("web.vhdx", 2, "/")
    assert parse_location(snap, "web.vhdx:2:/x:/y") == Location("web.vhdx", 2, "/x:/y")
    # the longest disk name that fits wins: "data:1.raw" is a disk, not partition 1 of "data"
    assert parse_location(snap, "data:1.raw:/f") == Location("data:1.raw", None, "/f")
    assert parse_location(snap, "data:1:/f") == Location("data", 1, "/f")
    assert str(Location("data", 1, "/f")) == "data:1:/f"
    for bad in ("nodisk:/x", "web.vhdx:0:/x", "web.vhdx:x", "web.vhdx:2:x", "web.vhdx:-1", "web.vhdx:１:/", ""):
        with pytest.raises(ConfigError, match="names no disk of snapshot"):
            parse_location(snap, bad)


@pytest.fixture(scope="module")
def chain_snapshot(guest_images: GuestImages) -> tuple[Repository, Snapshot, dict[str, bytes]]:
    folder, changes = guest_images.chain()
    repo = Repository.init(MemoryBackend(), b"passphrase")
    return repo, backup(repo, FilesSource(str(folder))).snapshot, changes


def _read_all(files: SnapshotFiles, loc: Location) -> bytes:
    fs, entry = files.entry(loc)
    return fs.reader(entry)(0, entry.size)


def test_each_layer_shows_the_files_as_they_were_then(
    chain_snapshot: tuple[Repository, Snapshot, dict[str, bytes]],
) -> None:
    repo, snap, changes = chain_snapshot
    assert [(d.name, d.layer) for d in snap.disks] == [("guest.vhdx", False), ("guest_ckpt.avhdx", True)]
    with SnapshotFiles(repo, snap) as files:
        new = _read_all(files, Location("guest_ckpt.avhdx", 2, "/hello.txt"))
        old = _read_all(files, Location("guest.vhdx", 2, "/hello.txt"))
        assert new == changes["ntfs:/hello.txt"]
        assert old == b"hello from the guest\n"
        assert _read_all(files, Location("guest_ckpt.avhdx", 3, "/new.txt")) == changes["ext4:/new.txt"]
        with pytest.raises(GuestPathError, match=r"guest\.vhdx:3:/new\.txt: no such file or folder"):
            files.entry(Location("guest.vhdx", 3, "/new.txt"))
        names = [e.name for e in files.ls(Location("guest_ckpt.avhdx", 3, "/"))]
        assert names == ["big", "docs", "emptydir", "hello.txt", "links", "lost+found", "new.txt", "unicode"]
        one = files.ls(Location("guest_ckpt.avhdx", 3, "/links/rel"))
        assert [(e.type, e.target) for e in one] == [("symlink", "../hello.txt")]


def test_find_searches_the_newest_layer_of_every_disk_and_older_ones_on_request(
    chain_snapshot: tuple[Repository, Snapshot, dict[str, bytes]],
) -> None:
    repo, snap, _ = chain_snapshot
    with SnapshotFiles(repo, snap) as files:
        found = [str(h.location) for h in files.find("HELLO.txt")]
        # NTFS and FAT match without regard to case; ext4 does not
        assert found == ["guest_ckpt.avhdx:1:/hello.txt", "guest_ckpt.avhdx:2:/hello.txt"]
        found = [str(h.location) for h in files.find("hello.txt", layers=True)]
        assert len(found) == 6 and found[0].startswith("guest.vhdx:1:")
        assert [str(h.location) for h in files.find("/docs/deep/*/file.bin")] == [
            "guest_ckpt.avhdx:1:/docs/Deep/nested/file.bin",
            "guest_ckpt.avhdx:2:/docs/Deep/nested/file.bin",
        ]
        assert [h.entry.type for h in files.find("nested")] == ["dir", "dir", "dir"]


def test_find_names_the_volumes_it_cannot_search(guest_images: GuestImages) -> None:
    repo = Repository.init(MemoryBackend(), b"passphrase")
    snap = backup(repo, FilesSource(str(guest_images.container("odd", "raw")))).snapshot
    notes: list[str] = []
    with SnapshotFiles(repo, snap) as files:
        found = [str(h.location) for h in files.find("*.txt", notes=notes)]
    assert "odd.raw:7:/hello.txt" in found and "odd.raw:9:/docs/report.txt" in found
    assert notes == [
        "odd.raw:2: XFS filesystem: not supported",
        "odd.raw:3: LUKS encrypted volume: not supported",
        "odd.raw:4: LVM physical volume: not supported",
        "odd.raw:5: BitLocker encrypted volume: not supported",
    ]
    with SnapshotFiles(repo, snap) as files, pytest.raises(GuestError, match=r"odd\.raw:2: XFS filesystem"):
        files.ls(Location("odd.raw", 2, "/"))


# ---- what listing reads --------------------------------------------------------------------


def _populate(root: Path, megabytes: int, seed: int) -> None:
    rng = random.Random(seed)
    for d in range(16):
        folder = root / f"folder{d:02d}"
        folder.mkdir(parents=True)
        for f in range(megabytes // 16):
            (folder / f"file{f:03d}.bin").write_bytes(rng.randbytes(MiB))
        for f in range(6):
            (folder / f"small{f:03d}.txt").write_text(f"note {d} {f}\n" * 20)


@pytest.fixture(scope="module")
def four_gib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, Snapshot]:
    """A 4 GiB GPT disk: 2 GiB NTFS and 2 GiB ext4, each with 64 MiB of files in 16 folders."""
    work = tmp_path_factory.mktemp("four-gib")
    for name, seed in (("ntfs", 1), ("ext4", 2)):
        _populate(work / f"src-{name}", 64, seed)
    size = 2048 * MiB - 2 * MiB
    ntfs = ntfs_image(work / "ntfs.img", work / "src-ntfs", size)
    ext4 = ext_image(work / "ext4.img", work / "src-ext4", size)
    for src in ("src-ntfs", "src-ext4"):
        for path in sorted((work / src).rglob("*.bin")):
            path.unlink()
    folder = work / "vm"
    folder.mkdir()
    disk = partitioned_disk(
        folder / "big.raw",
        4096 * MiB,
        "gpt",
        [Part(ntfs, "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"), Part(ext4, "linux")],
    )
    ntfs.unlink()
    ext4.unlink()
    assert disk.stat().st_size == 4096 * MiB
    repo = Repository.init(MemoryBackend(), b"passphrase")
    return repo, backup(repo, FilesSource(str(folder))).snapshot


@pytest.mark.slow
@pytest.mark.parametrize(("part", "kind"), [(1, "ntfs"), (2, "ext4")])
def test_listing_a_folder_reads_a_small_part_of_the_disk(
    four_gib: tuple[Repository, Snapshot], part: int, kind: str
) -> None:
    repo, snap = four_gib
    disk_size = snap.disks[0].size
    with SnapshotFiles(repo, snap) as files:
        entries = files.ls(Location("big.raw", part, "/folder07"))
        fetched = files.bytes_fetched
        fs = files.filesystem("big.raw", part)
        assert fs.kind == kind
    assert len(entries) == 10
    share = fetched / disk_size
    print(f"\n{kind}: listing /folder07 fetched {fetched / MiB:.2f} MiB = {share:.3%} of the 4 GiB disk")
    assert share < 0.01, f"{fetched} bytes fetched"


@pytest.mark.slow
def test_finding_across_the_whole_disk_reads_metadata_not_data(four_gib: tuple[Repository, Snapshot]) -> None:
    repo, snap = four_gib
    with SnapshotFiles(repo, snap) as files:
        found = list(files.find("small003.txt"))
        fetched = files.bytes_fetched
    assert len(found) == 32
    share = fetched / snap.disks[0].size
    print(f"\nfind over both filesystems fetched {fetched / MiB:.2f} MiB = {share:.3%} of the 4 GiB disk")
    assert share < 0.02, f"{fetched} bytes fetched"
