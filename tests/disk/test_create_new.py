"""Creating an image never replaces or follows what is already at its name, and a full file
system is reported as the place being written being full (every writer, every format)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import small_tmpfs
from vmvault.disk import FORMATS, create_image, open_image
from vmvault.errors import TargetError, TargetFullError

MIB = 1 << 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_file_is_never_replaced(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"disk.{fmt}"
    path.write_bytes(b"precious")
    os.chmod(path, 0o600)
    with pytest.raises(TargetError, match="exists"):
        create_image(str(path), fmt, 4 * MIB)
    assert path.read_bytes() == b"precious" and path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_at_the_name_is_never_followed(tmp_path: Path, fmt: str, dangling: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if not dangling:
        victim.write_bytes(b"victim data")
    folder = tmp_path / "folder"
    folder.mkdir()
    link = folder / f"disk.{fmt}"
    link.symlink_to(victim)
    with pytest.raises(TargetError, match=r"exists|link"):
        create_image(str(link), fmt, 4 * MIB)
    if dangling:
        assert not os.path.lexists(victim), "a dangling link must not create its target"
    else:
        assert victim.read_bytes() == b"victim data"
    assert link.is_symlink()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_opener_decides_where_the_file_is_created(tmp_path: Path, fmt: str) -> None:
    """A restore creates the file elsewhere (a temporary name under a directory descriptor);
    the name given is the image's final name, used in messages and parent references."""
    work = tmp_path / "work"
    work.mkdir()
    dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    seen: list[tuple[str, int]] = []

    def opener(path: str, flags: int) -> int:
        seen.append((path, flags))
        return os.open("0.partial", flags, 0o600, dir_fd=dfd)

    try:
        final = tmp_path / f"final.{fmt}"
        with create_image(str(final), fmt, 4 * MIB, opener=opener) as w:
            w.write(MIB, b"x" * 4096)
    finally:
        os.close(dfd)
    assert seen and seen[0][0] == str(final)
    flags = seen[0][1]
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT
    assert not final.exists()
    os.rename(work / "0.partial", final)
    with open_image(str(final)) as img:
        assert img.format == fmt
        assert img.read(MIB, 4096) == b"x" * 4096


@pytest.mark.parametrize("fmt", ["vhdx", "vhd", "qcow2"])
def test_a_child_names_its_parent_relative_to_its_final_name(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "sub"
    folder.mkdir()
    parent = folder / f"base.{fmt}"
    with create_image(str(parent), fmt, 4 * MIB) as w:
        w.write(0, b"p" * 4096)
    work = tmp_path / "work"
    work.mkdir()
    dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        child = folder / f"child.{fmt}"
        with create_image(
            str(child),
            fmt,
            4 * MIB,
            parent=str(parent),
            opener=lambda _p, flags: os.open("1.partial", flags, 0o600, dir_fd=dfd),
        ) as w:
            w.write(MIB, b"c" * 4096)
    finally:
        os.close(dfd)
    os.rename(work / "1.partial", child)
    # moved elsewhere with its parent, the chain still opens: the reference is relative
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    with open_image(str(moved / f"child.{fmt}")) as img:
        assert img.read(0, 4096) == b"p" * 4096
        assert img.read(MIB, 4096) == b"c" * 4096


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tmpfs", "3m") as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_file_system_is_the_target_being_full(tiny_tmpfs: Path, fmt: str) -> None:
    path = tiny_tmpfs / f"disk.{fmt}"
    with pytest.raises(TargetFullError, match="No space left on the file system being written"):
        w = create_image(str(path), fmt, 64 * MIB)
        try:
            for off in range(0, 64 * MIB, MIB):
                w.write(off, os.urandom(4096) * 256)
        finally:
            with contextlib.suppress(TargetError):
                w.close()
