"""merge() killed with SIGKILL before every file write it makes: the chain always reads right.

A forked child process wraps the calls that change files (pwrite, write, ftruncate, fsync,
rename, replace, unlink) and SIGKILLs itself just before the Nth one; N runs over every call
a complete merge makes. After each kill the leaf must read exactly as before the merge (the
merge never changes what the guest sees), the checkpoint being merged must read as before if
it still exists, the parent must read either as before or as after, and a second ``merge``
must finish the job and leave no scratch files behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmvault.disk import create_image, open_image
from vmvault.disk.chain import checkpoint, merge
from vmvault.disk.qcow2 import open_qcow2_for_write
from vmvault.disk.vhdx import open_vhdx_for_write

MIB = 1024 * 1024
SIZE = 8 * MIB
#: the os functions through which merge (and the writers it uses) change files
WATCHED = ("pwrite", "write", "ftruncate", "fsync", "rename", "replace", "unlink")


def read_all(path: Path) -> bytes:
    with open_image(str(path)) as img:
        return img.read(0, img.size)


def build_chain(folder: Path, fmt: str) -> tuple[Path, Path, Path]:
    """base <- c1 <- c2 with data in every layer; returns (base, c1, c2)."""
    base = folder / f"disk.{fmt}"
    with create_image(str(base), fmt, SIZE) as w:
        w.write(0, b"A" * MIB)
        w.write(3 * MIB, b"B" * 8192)
    if fmt == "vhd":
        # VHD layers are written when they are created (there is no in-place VHD writer)
        c1 = folder / "disk_c1.avhd"
        with create_image(str(c1), "vhd", SIZE, parent=str(base)) as w:
            w.write(512, b"C" * 1000)
            w.write(5 * MIB, b"D" * MIB)
        c2 = folder / "disk_c2.avhd"
        with create_image(str(c2), "vhd", SIZE, parent=str(c1)) as w:
            w.write(6 * MIB, b"E" * 4096)
        return base, c1, c2
    opener: Callable[[str], object] = open_vhdx_for_write if fmt == "vhdx" else open_qcow2_for_write
    c1 = Path(checkpoint(str(base), name="disk_c1"))
    w1 = opener(str(c1))
    w1.write(512, b"C" * 1000)  # type: ignore[attr-defined]
    w1.write(5 * MIB, b"D" * MIB)  # type: ignore[attr-defined]
    w1.close()  # type: ignore[attr-defined]
    c2 = Path(checkpoint(str(c1), name="disk_c2"))
    w2 = opener(str(c2))
    w2.write(6 * MIB, b"E" * 4096)  # type: ignore[attr-defined]
    w2.write(0, b"F" * 512)  # type: ignore[attr-defined]
    w2.close()  # type: ignore[attr-defined]
    # a second checkpoint below c1 (a tree): both must be re-pointed, each on its own
    sibling = Path(checkpoint(str(c1), name="disk_c2b"))
    w3 = opener(str(sibling))
    w3.write(7 * MIB, b"G" * 1024)  # type: ignore[attr-defined]
    w3.close()  # type: ignore[attr-defined]
    return base, c1, c2


def merge_in_child(child: Path, kill_at: int, count_file: Path) -> int:
    """Fork; the child runs merge() and SIGKILLs itself before watched call ``kill_at`` (0: never).

    Returns the child's wait status. With kill_at 0 the number of watched calls is written to
    ``count_file``.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            calls = [0]

            def wrap(name: str) -> None:
                real = getattr(os, name)

                def counted(*args: object, **kwargs: object) -> object:
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                setattr(os, name, counted)

            for name in WATCHED:
                wrap(name)
            merge(str(child))
            if kill_at == 0:
                made = calls[0]
                count_file.write_text(str(made))  # its own writes come after the count was taken
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status


def copy_tree(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for p in src.iterdir():
        shutil.copy2(p, dest / p.name)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: a SIGKILL loses nothing from the page cache, so
    fsync adds only time here (durability against power loss is not what this test checks)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="vmvault-crash-", dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2", "vhd"])
def test_merge_survives_sigkill_at_every_write(fast_dir: Path, fmt: str) -> None:
    tmp_path = fast_dir
    template = tmp_path / "template"
    template.mkdir()
    base, c1, c2 = build_chain(template, fmt)
    leaf_view = read_all(c2)
    leaves = {p.name: read_all(p) for p in template.iterdir() if p.name.startswith("disk_c2")}
    c1_view = read_all(c1)
    base_view = read_all(base)
    assert c1_view != base_view and leaf_view != c1_view

    # how many watched calls does a complete merge make?
    probe = tmp_path / "probe"
    copy_tree(template, probe)
    count_file = tmp_path / "count"
    status = merge_in_child(probe / c1.name, 0, count_file)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    total = int(count_file.read_text())
    assert total > 10
    assert read_all(probe / c2.name) == leaf_view
    assert read_all(probe / base.name) == c1_view
    assert not (probe / c1.name).exists()

    work = tmp_path / "work"
    outcomes = {"before": 0, "after": 0}
    for n in range(1, total + 1):
        copy_tree(template, work)
        status = merge_in_child(work / c1.name, n, count_file)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"call {n}: {status}"
        # the guest's view through every leaf never changes
        for name, view in leaves.items():
            assert read_all(work / name) == view, f"{fmt}: {name} wrong after kill at call {n}/{total}"
        if (work / c1.name).exists():
            assert read_all(work / c1.name) == c1_view, f"{fmt}: checkpoint wrong after kill at {n}"
        parent_now = read_all(work / base.name)
        if parent_now == base_view:
            outcomes["before"] += 1
        else:
            assert parent_now == c1_view, f"{fmt}: parent neither before nor after at call {n}"
            outcomes["after"] += 1
        # running merge again completes it
        assert merge(str(work / c1.name)) == str(work / base.name)
        assert read_all(work / base.name) == c1_view
        for name, view in leaves.items():
            assert read_all(work / name) == view
            with open_image(str(work / name)) as img:
                assert img.parent is not None and os.path.samefile(img.parent.path, work / base.name)
        assert sorted(p.name for p in work.iterdir()) == sorted([base.name, *leaves]), f"leftovers at {n}"
    assert outcomes["before"] and outcomes["after"], outcomes
