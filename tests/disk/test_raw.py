"""Raw images: holes found with SEEK_DATA/SEEK_HOLE, reads, a file shrinking under a reader."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest

from tests.pagecache import cached_pages, page_cache_droppable
from vmvault import platform
from vmvault.disk import ExtentKind, open_image
from vmvault.disk.raw import create_raw, open_raw
from vmvault.errors import SourceError

MIB = 1024 * 1024


def _fs_reports_holes(path: Path) -> bool:
    """Whether this file system answers SEEK_DATA with real holes (tmpfs, ext4, xfs, btrfs do)."""
    probe = path / "probe"
    with open(probe, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(2 * MIB)
        f.write(b"x" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        return platform.seek_data(fd, 0) > 0  # hidden (VMVAULT_PLATFORM_HIDE_POSIX): EOPNOTSUPP
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink()


def test_extents_follow_holes(tmp_path: Path) -> None:
    if not _fs_reports_holes(tmp_path):
        pytest.skip("the file system under the temp folder does not report holes via SEEK_DATA")
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(4 * MIB)
        f.write(b"\xaa" * MIB)
        f.seek(15 * MIB)
        f.write(b"\xbb" * MIB)
    with open_raw(str(path)) as img:
        exts = list(img.extents())
        assert img.size == 16 * MIB
        assert exts[0].kind is ExtentKind.ZERO and exts[0].offset == 0
        data = [e for e in exts if e.kind is ExtentKind.DATA]
        # file systems may round data extents to their block size; both written ranges must be covered
        assert any(e.offset <= 4 * MIB and e.end >= 5 * MIB for e in data)
        assert any(e.offset <= 15 * MIB and e.end == 16 * MIB for e in data)
        covered = sum(e.length for e in data)
        assert covered < 8 * MIB  # the 10 MiB gap is a hole
        # the extents tile the disk
        assert exts[-1].end == img.size
        for a, b in itertools.pairwise(exts):
            assert a.end == b.offset
        assert img.read(4 * MIB - 2, 4) == b"\0\0\xaa\xaa"
        assert img.read(16 * MIB - 2, 100) == b"\xbb\xbb"  # short only at the end of the disk


def test_trailing_hole(tmp_path: Path) -> None:
    if not _fs_reports_holes(tmp_path):
        pytest.skip("the file system under the temp folder does not report holes via SEEK_DATA")
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.write(b"\x01" * 65536)
        f.truncate(8 * MIB)
    with open_raw(str(path)) as img:
        exts = list(img.extents())
    assert exts[0].kind is ExtentKind.DATA and exts[0].offset == 0
    assert exts[-1].kind is ExtentKind.ZERO and exts[-1].end == 8 * MIB


def test_file_shrinking_mid_read_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(2 * MIB))
    with open_raw(str(path)) as img:
        assert img.read(MIB, 4096) == path.read_bytes()[MIB : MIB + 4096]
        os.truncate(path, MIB + 100)
        with pytest.raises(SourceError, match=r"changed size|ended"):
            img.read(MIB, 4096)


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        open_raw(str(tmp_path / "absent.raw"))


def test_writer_round_trip_stays_sparse(tmp_path: Path) -> None:
    path = tmp_path / "out.raw"
    with create_raw(str(path), 32 * MIB) as w:
        w.write(MIB, b"hello")
        with pytest.raises(ValueError):
            w.write(32 * MIB - 2, b"abc")
    assert path.stat().st_size == 32 * MIB
    assert path.stat().st_blocks * 512 < 4 * MIB
    with open_image(str(path)) as img:
        assert img.format == "raw"
        assert img.read(MIB - 1, 7) == b"\0hello\0"


def test_bytes_read_and_done_with_leave_the_page_cache(tmp_path: Path) -> None:
    """A backup reads each byte once: what it is done with goes back to the kernel, the rest
    of the file's cached pages stay."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(8 * MIB))
        os.fsync(f.fileno())  # (dirty pages are never dropped)
    with open_raw(str(path)) as img:
        img.read(0, 8 * MIB)
        assert cached_pages(path) == 2048
        img.read_done(0, 4 * MIB)
        assert 0 < cached_pages(path) <= 1024
        img.read_done(4 * MIB, 4 * MIB)
        assert cached_pages(path) == 0
        assert img.read(8 * MIB - 4, 4) == path.read_bytes()[-4:]
