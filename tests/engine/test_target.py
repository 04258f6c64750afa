"""RestoreTarget's folders, folder times and symbolic links (what file-level restore needs):
never through a link, never over an existing name, resumable like files."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmvault.engine.target import WORK_PREFIX, RestoreTarget
from vmvault.errors import TargetError

KEY = {"snapshot": "ab" * 32, "files": ["d.raw:1:/x"]}


def work_folders(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(WORK_PREFIX)]


def started(path: Path) -> RestoreTarget:
    tgt = RestoreTarget.open(str(path))
    tgt.begin(KEY)
    return tgt


def test_folders_are_made_and_links_placed_verbatim(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    try:
        tgt.check_folder("a/b/c")
        tgt.folder("a/b/c")
        tgt.place_link("a/b/c/up", "../../../../../etc/passwd")
        tgt.place_link("a/abs", "/etc")
        tgt.set_folder_time("a/b/c", 1_600_000_000_123_456_789)
        tgt.set_folder_time("a", 1_500_000_000 * 10**9)
        tgt.finish()
    finally:
        tgt.close()
    assert os.readlink(target / "a/b/c/up") == "../../../../../etc/passwd"
    assert os.readlink(target / "a/abs") == "/etc"
    assert (target / "a/b/c").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (target / "a").stat().st_mtime_ns == 1_500_000_000 * 10**9
    assert work_folders(target) == []


def test_check_folder_refuses_links_and_files_in_the_way(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "t", tmp_path / "elsewhere"
    (target / "real").mkdir(parents=True)
    elsewhere.mkdir()
    (target / "real" / "linked").symlink_to(elsewhere)
    (target / "file").write_text("mine")
    tgt = RestoreTarget.open(str(target))
    try:
        tgt.check_folder("real")  # an existing folder is used
        tgt.check_folder("real/new/deeper")  # missing parts are fine
        with pytest.raises(TargetError, match="is a link; links inside a restore target are never followed"):
            tgt.check_folder("real/linked/sub")
        with pytest.raises(TargetError, match="is a link"):
            tgt.check_folder("real/linked")
        with pytest.raises(TargetError, match="exists and is not a folder"):
            tgt.check_folder("file/sub")
        with pytest.raises(TargetError, match="holds at most"):
            tgt.check_folder("real/" + "n" * 300)
    finally:
        tgt.close()
    assert os.listdir(elsewhere) == []


def test_a_link_swapped_in_after_the_check_is_never_followed(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "t", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tgt = started(target)
    try:
        tgt.check_folder("docs")
        (target / "docs").symlink_to(elsewhere)  # someone who may write the target, between check and use
        with pytest.raises(TargetError, match="is a link"):
            tgt.folder("docs/sub")
        with pytest.raises(TargetError, match="is a link"):
            tgt.place_link("docs/l", "x")
        tgt.abort()
    finally:
        tgt.close()
    assert os.listdir(elsewhere) == []
    assert work_folders(target) == []


@pytest.mark.parametrize("existing", ["file", "dangling link", "folder"])
def test_a_link_never_replaces_an_existing_name(tmp_path: Path, existing: str) -> None:
    target = tmp_path / "t"
    target.mkdir()
    name = target / "l"
    if existing == "file":
        name.write_text("mine")
    elif existing == "dangling link":
        name.symlink_to("nowhere")
    else:
        name.mkdir()
    tgt = started(target)
    try:
        with pytest.raises(TargetError, match="exists; restore into an empty folder"):
            tgt.place_link("l", "/etc/shadow")
        tgt.abort()
    finally:
        tgt.close()
    if existing == "file":
        assert name.read_text() == "mine"
    elif existing == "dangling link":
        assert os.readlink(name) == "nowhere"
    else:
        assert name.is_dir() and not name.is_symlink()
    assert work_folders(target) == []


def test_an_empty_or_nul_link_target_is_refused(tmp_path: Path) -> None:
    tgt = started(tmp_path / "t")
    try:
        for bad in ("", "a\0b"):
            with pytest.raises(TargetError, match="empty target or one with a NUL byte"):
                tgt.place_link("l", bad)
        tgt.abort()
    finally:
        tgt.close()
    assert os.listdir(tmp_path / "t") == []


def test_links_placed_before_a_kill_are_kept_by_a_rerun(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    tgt.folder("f")
    tgt.place_link("f/one", "target-one")
    tgt.close()  # killed: no finish, no abort; the journal and the work folder stay
    assert len(work_folders(target)) == 1
    rerun = started(target)
    try:
        assert rerun.is_placed("f/one")
        assert not rerun.is_placed("f/two")
        rerun.place_link("f/two", "target-two")
        rerun.finish()
        assert any("1 files it completed are kept" in n for n in rerun.notes), rerun.notes
    finally:
        rerun.close()
    assert os.readlink(target / "f/one") == "target-one" and os.readlink(target / "f/two") == "target-two"
    assert work_folders(target) == []


def test_a_link_replaced_after_a_kill_is_not_adopted(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    tgt.place_link("one", "a")
    tgt.close()
    os.unlink(target / "one")
    os.symlink("someone-elses", target / "one")
    rerun = started(target)
    try:
        assert not rerun.is_placed("one")
        with pytest.raises(TargetError, match="exists"):
            rerun.check_free("one")
    finally:
        rerun.close()


def test_a_dead_runs_partial_link_is_removed_without_following_it(tmp_path: Path) -> None:
    target, precious = tmp_path / "t", tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("keep")
    tgt = started(target)
    tgt.close()  # a dead run: a work folder with its journal
    (work,) = work_folders(target)
    os.symlink(str(precious), target / work / "7.partial")  # killed between symlinkat and rename
    rerun = started(target)
    try:
        rerun.finish()
    finally:
        rerun.close()
    assert work_folders(target) == []
    assert (precious / "keep").read_text() == "keep"


def test_a_work_folder_with_a_link_no_restore_makes_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    tgt.close()
    (work,) = work_folders(target)
    os.symlink("/", target / work / "journal.json.tmp")
    rerun = started(target)
    try:
        rerun.finish()
        assert any("not a regular file" in n for n in rerun.notes), rerun.notes
    finally:
        rerun.close()
    assert work_folders(target) == [work]


def test_untrusted_sizes_beyond_the_system_are_one_line_errors_and_times_are_clamped(tmp_path: Path) -> None:
    # a source (a guest filesystem, a stored record) may claim any 64-bit number
    target = tmp_path / "t"
    tgt = started(target)
    try:
        tgt.check_size(1 << 30, "fits")  # sparse: costs no space
        for size in (1 << 63, (1 << 64) - 1, (1 << 63) - 1):
            with pytest.raises(TargetError, match="more than the target's file system holds in one file"):
                tgt.check_size(size, "huge")
        partial = tgt.new_partial()
        os.close(tgt.create(partial, "late"))
        tgt.place(partial, "late", mode=0o644, owner=None, mtime_ns=(1 << 64) - 1)  # a time the kernel clamps
        tgt.finish()
    finally:
        tgt.close()
    assert os.listdir(target) == ["late"]


@pytest.fixture()
def few_descriptors() -> Iterator[int]:
    """Room for some 100 more descriptors than the process holds now (other tests may hold many)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(len(os.listdir("/proc/self/fd")) + 100, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_tree_of_more_folders_than_descriptors_is_restored(tmp_path: Path, few_descriptors: int) -> None:
    target = tmp_path / "t"
    count = few_descriptors + 50  # more folders than the process may hold descriptors
    tgt = started(target)
    try:
        for i in range(count):
            rel = f"top/d{i:04d}/sub"
            tgt.check_folder(rel)
            tgt.folder(rel)
        tgt.place_link("top/d0000/sub/link", "x")  # a folder closed meanwhile is opened again
        for i in range(count):
            tgt.set_folder_time(f"top/d{i:04d}", 1_500_000_000 * 10**9)
        tgt.finish()
    finally:
        tgt.close()
    assert len(os.listdir(target / "top")) == count
    assert os.readlink(target / "top/d0000/sub/link") == "x"
    assert (target / "top/d0000").stat().st_mtime_ns == 1_500_000_000 * 10**9


def test_a_folder_replaced_after_it_was_closed_is_not_written_into(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    try:
        tgt.folder("a")
        for i in range(100):  # "a" is closed to make room
            tgt.folder(f"b/{i}")
        os.rename(target / "a", target / "moved")
        (target / "a").mkdir()  # someone else's folder under the same name
        with pytest.raises(TargetError, match="was replaced by another folder during the restore"):
            tgt.place_link("a/link", "x")
        tgt.abort()
    finally:
        tgt.close()
    assert os.listdir(target / "a") == [] and os.listdir(target / "moved") == []


def _bytes_written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_each_placed_file_adds_one_line_to_the_journal(tmp_path: Path) -> None:
    # the journal was rewritten whole before each rename: 100,000 files wrote some 300 GB
    target = tmp_path / "t"
    tgt = started(target)
    try:
        tgt.folder("f")
        before = _bytes_written()
        for i in range(500):
            tgt.place_link(f"f/{i}", "x")
        written = _bytes_written() - before
        tgt.finish()
    finally:
        tgt.close()
    assert written < 500 * 1024, f"{written} bytes written for 500 links"  # it was 6.5 MB


def test_a_journal_line_cut_short_or_taken_back_is_no_placed_file(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tgt = started(target)
    tgt.place_link("one", "a")
    tgt.place_link("two", "b")
    (target / "three").write_text("someone else's")
    partial = tgt.new_partial()
    os.close(tgt.create(partial, "three"))
    with pytest.raises(TargetError, match="exists"):
        tgt.place(partial, "three", mode=0o644, owner=None, mtime_ns=None)  # journaled, then taken back
    tgt.close()  # killed
    [work] = work_folders(target)
    with open(target / work / "journal.json", "ab") as f:
        f.write(b'["four", 1, 2')  # a kill while a line was appended
    rerun = started(target)
    try:
        assert rerun.is_placed("one") and rerun.is_placed("two")
        assert not rerun.is_placed("three") and not rerun.is_placed("four")
        rerun.finish()
    finally:
        rerun.close()
    assert (target / "three").read_text() == "someone else's"


def test_a_name_like_a_work_folder_is_not_restored_at_the_top(tmp_path: Path) -> None:
    # it would be taken for a dead restore's work folder by the next restore here, and removed
    tgt = started(tmp_path / "t")
    try:
        name = f"{WORK_PREFIX}0123456789abcdef"
        with pytest.raises(TargetError, match="named like a restore's work folder"):
            tgt.check_folder(name)
        with pytest.raises(TargetError, match="named like a restore's work folder"):
            tgt.check_free(f"{name}/journal.json")
        tgt.check_free(f"sub/{name}")  # below the top it is any name
    finally:
        tgt.close()
