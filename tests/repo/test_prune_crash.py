"""kill -9 at every storage write of forget + prune: the repository stays consistent.

After each kill: ``check(read_data=True)`` has no error, every snapshot still present
restores byte for byte, and a second prune completes and leaves a repository with no
warnings either.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.repo.builders import CHUNK, Content, backup, disk_image, make_repo, reopen, restore_all
from vmvault.backends.local import LocalBackend
from vmvault.repo import Repository, check, prune, repair_index, repair_snapshots
from vmvault.repo.format import BlobType
from vmvault.repo.pack import pack_name

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def build_template(path: Path) -> dict[str, Content]:
    """5 snapshots of one VM (forget keeps 2), one of another, an orphan pack, duplicate packs."""
    repo = make_repo(LocalBackend(str(path)), pack_size=16 * 1024)
    contents: dict[str, Content] = {}
    base = bytearray(disk_image(11, 24))
    for day in range(5):
        base[day * 4 * CHUNK : (day + 1) * 4 * CHUNK] = disk_image(50 + day, 4, zero_every=0)
        content = Content(disks={"sda": bytes(base)}, files={"vm.conf": f"v{day}".encode() * 300})
        contents[backup(repo, content, time=T0 + dt.timedelta(days=day)).id] = content
    other = Content(disks={"vdb": disk_image(77, 6)})
    contents[backup(repo, other, location="vm2", time=T0).id] = other
    # duplicates: a second writer that did not see the first one's blobs
    contents[backup(repo, other, location="vm2", time=T0 + dt.timedelta(days=1), dedup=False).id] = other
    # an orphan pack: a killed backup's pack without its index file
    writer = repo.writer(index_every=1 << 20)
    data = os.urandom(CHUNK)
    writer.add(BlobType.DATA, repo.key.chunk_id(data), data)
    pack_id, raw = writer._builder.finish(repo.key)
    repo.backend.put(pack_name(pack_id), raw)
    writer.close(flush=False)
    return contents


def run_child(repo_dir: Path, kill_at: int, mode: str = "prune") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMVAULT_TEST_CHEAP_KDF="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "tests.repo._prune_child", str(repo_dir), str(kill_at), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_consistent(repo_dir: Path, contents: dict[str, Content], *, min_snapshots: int = 3) -> None:
    repo = Repository.open(LocalBackend(str(repo_dir)), b"correct horse")
    report = check(repo, read_data=True)
    assert report.ok, report.to_dict()
    # what a crash may leave: orphan packs, superseded index files, the dead process's lock
    assert {w.kind for w in report.warnings} <= {"orphan-pack", "index-file-superseded", "lock-stale"}
    remaining = repo.snapshot_ids()
    assert len(remaining) >= min_snapshots
    for sid in remaining:
        assert restore_all(repo, repo.load_snapshot(sid)) == contents[sid]
    prune(repo, max_unused=0.0)
    repo = reopen(repo)
    report = check(repo, read_data=True)
    assert report.ok and not report.warnings, report.to_dict()
    for sid in remaining:
        assert restore_all(repo, repo.load_snapshot(sid)) == contents[sid]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Content]]:
    os.environ["VMVAULT_TEST_CHEAP_KDF"] = "1"
    path = tmp_path_factory.mktemp("crash") / "template"
    return path, build_template(path)


@pytest.mark.slow
def test_kill_at_every_write(template: tuple[Path, dict[str, Content]], tmp_path: Path) -> None:
    tpl, contents = template
    full = tmp_path / "full"
    shutil.copytree(tpl, full)
    done = run_child(full, 0)
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split()[-2])
    # lock, 5 snapshot deletes, repacked packs, their index file, the consolidated index,
    # index deletes, pack deletes, unlock
    assert writes > 20
    assert_consistent(full, contents)
    for n in range(1, writes + 1):
        work = tmp_path / f"kill{n}"
        shutil.copytree(tpl, work)
        res = run_child(work, n)
        assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
        assert_consistent(work, contents)
        shutil.rmtree(work)


@pytest.mark.slow
def test_kill_after_random_delays(template: tuple[Path, dict[str, Content]], tmp_path: Path) -> None:
    """SIGKILL from outside at arbitrary instants, also in the middle of a write."""
    tpl, contents = template
    full = tmp_path / "full"
    shutil.copytree(tpl, full)
    done = run_child(full, 0)
    assert done.returncode == 0, done.stderr
    duration = float(done.stdout.split()[-1])
    rnd = random.Random(1234)
    env = dict(os.environ, VMVAULT_TEST_CHEAP_KDF="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    killed = 0
    for i in range(10):
        work = tmp_path / f"delay{i}"
        shutil.copytree(tpl, work)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.repo._prune_child", str(work), "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "start"
            time.sleep(rnd.uniform(0.0, duration))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.communicate(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        assert_consistent(work, contents)
        shutil.rmtree(work)
    assert killed >= 5, f"only {killed} of 10 runs were cut short"


@pytest.mark.slow
def test_kill_repair_index_at_every_write(template: tuple[Path, dict[str, Content]], tmp_path: Path) -> None:
    tpl, contents = template
    full = tmp_path / "full"
    shutil.copytree(tpl, full)
    done = run_child(full, 0, "repair")
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split()[-2])
    assert writes >= 4  # lock, the new index, old index deletes, unlock
    assert_consistent(full, contents, min_snapshots=len(contents))
    for n in range(1, writes + 1):
        work = tmp_path / f"kill{n}"
        shutil.copytree(tpl, work)
        res = run_child(work, n, "repair")
        assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
        assert_consistent(work, contents, min_snapshots=len(contents))
        shutil.rmtree(work)


def truncate_a_pack(repo_dir: Path) -> None:
    """Cut the first indexed pack of two or more blobs after its first blob."""
    repo = Repository.open(LocalBackend(str(repo_dir)), b"correct horse")
    packs = repo.index.packs()
    pack_id = min(p for p, es in packs.items() if len(es) >= 2)
    first = min(packs[pack_id], key=lambda e: e.offset)
    path = repo_dir / pack_name(pack_id)
    path.write_bytes(path.read_bytes()[: first.offset + first.length])


def repaired_outcome(repo_dir: Path) -> dict[str, bytes]:
    """Finish the repair (index, then snapshots), prune, and return what each snapshot holds."""
    repo = Repository.open(LocalBackend(str(repo_dir)), b"correct horse")
    repair_index(repo, read_data=True)
    repair_snapshots(repo, forget=True)
    prune(repo, max_unused=0.0)
    repo = reopen(repo)
    report = check(repo, read_data=True)
    assert report.ok and not report.warnings, report.to_dict()
    out = {}
    for sid in repo.snapshot_ids():
        snap = repo.load_snapshot(sid)
        content = restore_all(repo, snap)
        key = snap.extra.get("repaired_from", sid)
        out[key] = repr(sorted(content.disks.items())).encode() + repr(sorted(content.files.items())).encode()
    return out


@pytest.mark.slow
def test_kill_repair_index_salvaging_a_truncated_pack_at_every_write(
    template: tuple[Path, dict[str, Content]], tmp_path: Path
) -> None:
    tpl, _contents = template
    full = tmp_path / "full"
    shutil.copytree(tpl, full)
    truncate_a_pack(full)
    done = run_child(full, 0, "salvage")
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split()[-2])
    assert writes >= 6  # lock, the salvage pack, its index file, the new index, old index deletes, unlock
    expected = repaired_outcome(full)
    for n in range(1, writes + 1):
        work = tmp_path / f"kill{n}"
        shutil.copytree(tpl, work)
        truncate_a_pack(work)
        res = run_child(work, n, "salvage")
        assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
        # whatever the kill left, finishing the repair gives the same snapshots back
        assert repaired_outcome(work) == expected, n
        shutil.rmtree(work)
