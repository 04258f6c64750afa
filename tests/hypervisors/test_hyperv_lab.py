"""Hyper-V behaviour on the lab host: live backups of a VM with a checkpoint tree while a
writer runs, restore (chain, flatten, qcow2/raw, clone), failures at every step, RCT-style
incrementals. Disks are checked with our reader and with libvhdi (pyvhdi)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.disk import open_image
from vmvault.disk.base import DiskImage, Extent, ExtentKind
from vmvault.engine.backup import backup
from vmvault.engine.clone import restore_clone
from vmvault.engine.restore import restore
from vmvault.errors import SourceError, VmvaultError
from vmvault.hypervisors import open_source
from vmvault.hypervisors.base import PreviousBackup
from vmvault.hypervisors.hyperv import RECOVERY_MARKER, register_restored
from vmvault.hypervisors.hyperv import session as hyperv_session
from vmvault.hypervisors.hyperv_model import HyperVVm, discover
from vmvault.repo.repository import Repository
from vmvault.testing.hyperv_lab import LabClock, LabHost, RunningVm, lab_source

MIB = 1024 * 1024
CS = 64 * 1024


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("VMVAULT_LAB_FAULTS", raising=False)


@pytest.fixture
def repo() -> Repository:
    return Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)


@pytest.fixture
def host(tmp_path: Path) -> LabHost:
    root = tmp_path / "host"
    root.mkdir()
    return LabHost(str(root))


def build_tree(host: LabHost, name: str = "web") -> dict[str, str]:
    """base → cp1 → cp2, and a branch cp1 → cp3 → current, on two disks."""
    host.create_vm(name, (16 * MIB, 8 * MIB))
    rng = random.Random(7)
    host.write(name, "scsi0:0", 0, rng.randbytes(3 * MIB))
    host.write(name, "scsi0:1", MIB, rng.randbytes(MIB))
    cp1 = host.checkpoint(name, "cp1")
    host.write(name, "scsi0:0", MIB, rng.randbytes(MIB))
    cp2 = host.checkpoint(name, "cp2")
    host.write(name, "scsi0:0", 6 * MIB, rng.randbytes(MIB))
    host.apply_checkpoint(name, cp1)
    host.write(name, "scsi0:0", 2 * MIB, rng.randbytes(512 * 1024))
    host.write(name, "scsi0:1", 0, rng.randbytes(256 * 1024))
    cp3 = host.checkpoint(name, "cp3")
    host.write(name, "scsi0:0", 9 * MIB, rng.randbytes(MIB))
    return {"cp1": cp1, "cp2": cp2, "cp3": cp3}


def full_read(path: str) -> bytes:
    with open_image(path) as img:
        return img.read(0, img.size)


def has_own_data(path: str) -> bool:
    with open_image(path) as img:
        return any(e.kind is ExtentKind.DATA for e in img.extents())


def pyvhdi_read(chain: list[str]) -> bytes:
    """Read the leaf of ``chain`` (base first) with libvhdi, each parent set explicitly."""
    pyvhdi = pytest.importorskip("pyvhdi", reason="libvhdi-python (PyPI) is the independent VHDX oracle")
    files: list[Any] = []
    for path in chain:
        f = pyvhdi.file()
        f.open(path)
        if files:
            f.set_parent(files[-1])
        files.append(f)
    leaf = files[-1]
    data = leaf.read_buffer_at_offset(leaf.get_media_size(), 0)
    for f in reversed(files):
        f.close()
    return bytes(data)


def assert_same_vm(before: HyperVVm, after: HyperVVm) -> None:
    assert after.structure() == before.structure()
    assert not [c for c in after.checkpoints if c.is_recovery]
    # the disk folder holds the VM's disks and their change maps (``<disk>.rct``), nothing left
    # behind by the backup; a running VM saves its change map through ``<name>.<thread>.tmp``
    folder = "Virtual Hard Disks"
    names = {n for n in os.listdir(os.path.join(after.folder, folder)) if not n.endswith(".tmp")}
    disks = {os.path.basename(d.rel) for d in before.disks.values() if os.path.dirname(d.rel) == folder}
    maps = {os.path.splitext(d)[0] + ".rct" for d in disks}
    assert disks <= names and names <= disks | maps, sorted(names - disks - maps)


def leaf_matches_writer(host: LabHost, name: str, vm: RunningVm) -> None:
    for slot, model in vm.models.items():
        assert host.read_disk(name, slot) == bytes(model), slot


# ---- live backup of a checkpoint tree, restore with valid chains ------------------------


def test_live_backup_restores_every_layer(host: LabHost, repo: Repository, tmp_path: Path) -> None:
    build_tree(host)
    before = host.model("web")
    running = host.start("web", seed=3)
    deadline = time.monotonic() + 30
    while running.writes == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        result = backup(repo, open_source(f"hyperv-lab://{host.root}/web"))
    finally:
        time.sleep(0.1)
        running.stop()
    assert running.writes > 0
    snap = result.snapshot
    assert snap.consistency == "application-consistent"  # the writer was paused for the checkpoint
    assert_same_vm(before, host.model("web"))
    leaf_matches_writer(host, "web", running)
    (cp_id,) = running.frozen  # one recovery checkpoint was taken
    frozen = running.frozen[cp_id]

    # the snapshot records the tree and every layer
    record = snap.extra["hyperv"]
    assert sorted(c["name"] for c in record["checkpoints"]) == ["cp1", "cp2", "cp3"]
    assert len([d for d in snap.disks if d.layer]) == len([d for d in before.disks.values() if d.parent])

    target = tmp_path / "restored" / "web"
    restore(repo, snap, str(target))
    restored = discover(str(target))
    assert sorted(restored.structure()["disks"].items()) == sorted(before.structure()["disks"].items())
    for path, disk in before.disks.items():
        new_path = os.path.join(str(target), disk.rel)
        chain_new = [os.path.join(str(target), before.disks[p].rel) for p in before.chain(path)]
        ours = full_read(new_path)
        with open_image(new_path) as img:  # the parent is found through the restored locator
            assert img.parent is None or os.path.dirname(img.parent.path) == os.path.dirname(new_path)
        if has_own_data(new_path):
            assert pyvhdi_read(chain_new) == ours, disk.rel
        # else: libvhdi 20260901 reads a differencing file with no sector-bitmap block at all
        # (an untouched checkpoint layer) wrongly: it takes bytes at file offset 0x10000 as data.
        slot = next((s for s, p in before.current.items() if p == path), None)
        if slot is not None:
            assert ours == frozen[slot], f"{disk.rel}: restored current state differs from the frozen view"
        else:
            assert ours == full_read(path), f"{disk.rel}: checkpoint layer differs"
    # the restored folder is a VM the lab can register and run
    LabHost(str(target.parent)).import_vm("web")
    vm2 = host_for(target).start("web", seed=9)
    time.sleep(0.05)
    vm2.stop()


def host_for(folder: Path) -> LabHost:
    return LabHost(str(folder.parent))


def test_clone_runs_beside_the_original(host: LabHost, repo: Repository, tmp_path: Path) -> None:
    build_tree(host)
    snap = backup(repo, lab_source(host, "web")).snapshot
    result = restore_clone(repo, snap, host.root, "web2")
    assert result.target == os.path.join(host.root, "web2")
    orig, clone = host.model("web"), host.model("web2")
    assert clone.name == "web2" and clone.vm_id and clone.vm_id != orig.vm_id
    assert not set(map(os.path.basename, clone.disks)) & set(map(os.path.basename, orig.disks))
    assert len(clone.checkpoints) == 3 and clone.chain_depth() == orig.chain_depth()
    assert not clone.warnings
    for slot in orig.current:
        assert host.read_disk("web2", slot) == host.read_disk("web", slot)
    a, b = host.start("web", seed=1), host.start("web2", seed=2)
    deadline = time.monotonic() + 30
    while (a.writes == 0 or b.writes == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    a.stop()
    b.stop()
    leaf_matches_writer(host, "web", a)
    leaf_matches_writer(host, "web2", b)
    assert host.read_disk("web", "scsi0:0") != host.read_disk("web2", "scsi0:0")


@pytest.mark.parametrize("fmt", [None, "qcow2", "raw"])
def test_flatten_and_convert(host: LabHost, repo: Repository, tmp_path: Path, fmt: str | None) -> None:
    build_tree(host)
    expected = {slot: host.read_disk("web", slot) for slot in ("scsi0:0", "scsi0:1")}
    before = host.model("web")
    snap = backup(repo, lab_source(host, "web")).snapshot
    out = restore(repo, snap, str(tmp_path / "flat"), format=fmt, flatten=True)
    by_name = {d["name"]: d["path"] for d in out.disks}
    for slot, path in before.current.items():
        new = by_name[before.disks[path].rel]
        with open_image(new) as img:
            assert img.parent is None
            assert img.format == (fmt or "vhdx")
            assert img.read(0, img.size) == expected[slot]


# ---- nothing is left behind, whatever fails --------------------------------------------


class _FailingImage(DiskImage):
    """Wraps an image and fails once ``budget`` bytes were read (a share that goes away)."""

    def __init__(self, inner: DiskImage, budget: int) -> None:
        self.inner = inner
        self.format = inner.format
        self.budget = budget
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def parent(self) -> DiskImage | None:
        return self.inner.parent

    def extents(self) -> Iterator[Extent]:
        return self.inner.extents()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.budget -= length
            if self.budget < 0:
                raise SourceError(f"{self.path}: injected read failure at offset {offset:#x}")
        return self.inner.read(offset, length)

    def close(self) -> None:
        self.inner.close()


#: every step of the connector after the checkpoint exists, failing before or after it acted
FAULTS = [
    "create",
    "step:create_recovery",
    "late:create_recovery",
    "step:checkpoint_disks",
    "late:checkpoint_disks",
    "step:changes",
    "read",
    "step:host_of",
    "migrate",
    "step:convert",
    "late:convert",
]


@pytest.mark.parametrize("fault", FAULTS)
def test_failures_leave_the_vm_as_it_was(
    host: LabHost, repo: Repository, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_tree(host)
    before = host.model("web")
    first = backup(repo, lab_source(host, "web"))  # so that the next one asks for changes
    assert not first.warnings
    host.write("web", "scsi0:0", 0, b"q" * 4096)
    before = host.model("web")
    running = host.start("web", seed=5)
    time.sleep(0.05)
    source = lab_source(host, "web")
    real_open = hyperv_session.open_image
    if fault == "read":
        monkeypatch.setattr(hyperv_session, "open_image", lambda p, **kw: _FailingImage(real_open(p, **kw), 2 * MIB))
    else:
        host.faults.add(fault)
    try:
        if fault == "step:changes":  # change tracking failing is a full read with a warning
            result = backup(repo, source)
            assert any("change tracking unusable" in w for w in result.warnings)
        else:
            with pytest.raises(VmvaultError, match=r"injected|LAB-HV02"):
                backup(repo, source)
    finally:
        running.stop()
    assert_same_vm(before, host.model("web"))
    leaf_matches_writer(host, "web", running)
    # and the next backup works and keeps nothing either
    host.faults.clear()
    monkeypatch.setattr(hyperv_session, "open_image", real_open)
    result = backup(repo, lab_source(host, "web"))
    assert not [w for w in result.warnings if "interrupted" in w], result.warnings
    assert_same_vm(before, host.model("web"))
    assert len(host.host_state(before.vm_id)["reference_points"]) <= 2  # old ones are destroyed


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["hang-after-checkpoint", "hang-in-create"])
def test_killed_backup_is_cleaned_up_by_the_next(host: LabHost, repo: Repository, fault: str) -> None:
    """Killed with the checkpoint's ID journaled, or inside CreateSnapshot before the ID
    came back: the next backup finds the checkpoint either way and removes only it."""
    build_tree(host)
    foreign = host.create_recovery_checkpoint("web", "Veeam backup checkpoint")  # another product's
    before = host.model("web")
    env = dict(os.environ, VMVAULT_LAB_FAULTS=fault)
    code = (
        "import sys; from vmvault.testing.hyperv_lab import LabHost, lab_source; "
        "lab_source(LabHost(sys.argv[1]), 'web').open_session(None)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, host.root], env=env)
    try:
        deadline = time.monotonic() + 60
        while len([c for c in host.model("web").checkpoints if c.is_recovery]) < 2:
            assert proc.poll() is None, "the backup process ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len([c for c in host.model("web").checkpoints if c.is_recovery]) == 2
    result = backup(repo, lab_source(host, "web"))
    assert any("interrupted backup" in w for w in result.warnings)
    assert host.model("web").structure() == before.structure()  # the other product's checkpoint stays
    assert [c.id for c in host.model("web").checkpoints if c.is_recovery] == [foreign]


# ---- change tracking -----------------------------------------------------------------


def test_incremental_reads_only_changed_ranges(host: LabHost, repo: Repository, tmp_path: Path) -> None:
    size = 32 * MIB
    host.create_vm("db", (size,))
    rng = random.Random(11)
    host.write("db", "scsi0:0", 0, rng.randbytes(size))
    source = lab_source(host, "db")
    first = backup(repo, source)
    assert first.snapshot.disks[0].stats["bytes_read"] == size
    # ~1 %: five 64 KiB writes
    for off in (MIB, 7 * MIB, 7 * MIB + 64 * 1024, 20 * MIB, 31 * MIB):
        host.write("db", "scsi0:0", off, rng.randbytes(64 * 1024))
    second = backup(repo, source)
    disk = second.snapshot.disks[0]
    assert disk.stats["incremental"] == 1
    assert disk.stats["bytes_read"] == 5 * 64 * 1024
    assert not second.warnings
    out = restore(repo, second.snapshot, str(tmp_path / "r"))
    assert full_read(out.disks[0]["path"]) == host.read_disk("db", "scsi0:0")


def test_lost_reference_point_means_full_read_with_warning(host: LabHost, repo: Repository) -> None:
    host.create_vm("app", (8 * MIB,))
    host.write("app", "scsi0:0", 0, os.urandom(4 * MIB))
    source = lab_source(host, "app")
    backup(repo, source)
    cp = host.checkpoint("app", "before-upgrade")
    host.write("app", "scsi0:0", 0, os.urandom(MIB))
    host.apply_checkpoint("app", cp)  # the disk jumps back: reference points are void
    host.delete_checkpoint("app", cp)
    second = backup(repo, source)
    assert any("change tracking unusable" in w for w in second.warnings)
    assert second.snapshot.disks[0].stats["incremental"] == 0


# ---- the lab host itself behaves like Hyper-V ------------------------------------------


def test_checkpoint_apply_delete_semantics(host: LabHost) -> None:
    host.create_vm("vm", (4 * MIB,))
    host.write("vm", "scsi0:0", 0, b"A" * MIB)
    base = host.model("vm").current["scsi0:0"]
    base_bytes = Path(base).read_bytes()
    cp = host.checkpoint("vm", "one")
    vm = host.model("vm")
    leaf = vm.current["scsi0:0"]
    assert leaf.endswith(".avhdx") and os.path.basename(leaf).startswith("vm_")
    assert vm.disks[leaf].parent == base
    host.write("vm", "scsi0:0", 0, b"B" * MIB)
    assert Path(base).read_bytes() == base_bytes  # the parent is never written
    host.apply_checkpoint("vm", cp)
    assert host.read_disk("vm", "scsi0:0")[:MIB] == b"A" * MIB
    assert not os.path.exists(leaf)
    host.write("vm", "scsi0:0", 0, b"C" * MIB)
    host.delete_checkpoint("vm", cp)
    vm = host.model("vm")
    assert vm.current["scsi0:0"] == base and not vm.checkpoints
    assert [p for p in vm.disks] == [base]  # the .avhdx is gone after the merge
    assert host.read_disk("vm", "scsi0:0")[:MIB] == b"C" * MIB


def test_live_incremental_matches_the_frozen_view(host: LabHost, repo: Repository, tmp_path: Path) -> None:
    size = 16 * MIB
    host.create_vm("live", (size,))
    host.write("live", "scsi0:0", 0, random.Random(2).randbytes(size))
    running = host.start("live", seed=4, max_write=16 * 1024, interval=0.005)
    try:
        source = lab_source(host, "live")
        first = backup(repo, source)
        time.sleep(0.1)
        second = backup(repo, source)
        writes_after = running.writes
    finally:
        running.stop()
    disk = second.snapshot.disks[0]
    assert disk.stats["incremental"] == 1
    assert first.snapshot.disks[0].stats["bytes_read"] == size
    cp_first, cp_second = list(running.frozen)
    # only what the writer touched since the first checkpoint is read: each write of at most
    # 16 KiB dirties at most two 64 KiB tracking blocks
    writes = writes_after - running.writes_at[cp_first]
    assert writes > 0 and 0 < disk.stats["bytes_read"] <= writes * 128 * 1024
    for snap, cp in ((first.snapshot, cp_first), (second.snapshot, cp_second)):
        out = restore(repo, snap, str(tmp_path / cp))
        assert full_read(out.disks[0]["path"]) == running.frozen[cp]["scsi0:0"]
    leaf_matches_writer(host, "live", running)


def test_unreadable_configuration_fails_clearly_and_the_folder_backs_up(
    host: LabHost, repo: Repository, tmp_path: Path
) -> None:
    """Hyper-V does not list a VM whose configuration it cannot read: the connector says so,
    touching nothing; the stopped VM's folder still backs up as files (disks discovered from
    their parent locators)."""
    build_tree(host)
    vm = host.model("web")
    assert vm.config_path is not None
    Path(vm.config_path).write_bytes(Path(vm.config_path).read_bytes()[:200])
    files_before = {p: Path(p).read_bytes() for p in [vm.config_path, *vm.disks]}
    with pytest.raises(VmvaultError, match="no VM named 'web'"):
        backup(repo, lab_source(host, "web"))
    result = backup(repo, open_source(vm.folder))
    assert {p: Path(p).read_bytes() for p in files_before} == files_before  # nothing was touched
    stored = {d.name for d in result.snapshot.disks}
    assert {d.rel for d in vm.disks.values()} <= {n.split("/", 1)[-1] for n in stored} | stored


def test_deleting_a_checkpoint_in_the_middle_of_a_chain(host: LabHost) -> None:
    host.create_vm("mid", (4 * MIB,))
    host.write("mid", "scsi0:0", 0, b"a" * MIB)
    cp1 = host.checkpoint("mid", "cp1")
    host.write("mid", "scsi0:0", MIB, b"b" * MIB)
    cp2 = host.checkpoint("mid", "cp2")
    host.write("mid", "scsi0:0", 2 * MIB, b"c" * MIB)
    before = host.model("mid")
    cp2_view = full_read(before.checkpoint(cp2).disks["scsi0:0"])
    current = host.read_disk("mid", "scsi0:0")
    host.delete_checkpoint("mid", cp1)
    after = host.model("mid")
    assert [c.name for c in after.checkpoints] == ["cp2"] and after.checkpoints[0].parent_id == ""
    base = before.checkpoint(cp1).disks["scsi0:0"]
    assert after.checkpoint(cp2).disks["scsi0:0"] == base  # cp2's layer was folded into the base file
    assert len(after.disks) == 2 and after.chain(after.current["scsi0:0"])[0] == base
    assert full_read(base) == cp2_view and host.read_disk("mid", "scsi0:0") == current
    assert pyvhdi_read(after.chain(after.current["scsi0:0"])) == current


def test_crash_between_merge_and_configuration_update(host: LabHost, repo: Repository) -> None:
    """The process died after the recovery checkpoint was merged back but before the VM's
    configuration named the parent again: the next backup finishes the job, losing nothing."""
    from vmvault.disk import chain

    host.create_vm("c", (4 * MIB,))
    host.write("c", "scsi0:0", 0, b"1" * MIB)
    before = host.model("c")
    host.create_recovery_checkpoint("c", f"{RECOVERY_MARKER} pid=999999999 host={socket.gethostname()} t=1")
    host.write("c", "scsi0:0", MIB, b"2" * MIB)  # lands in the recovery .avhdx
    expected = host.read_disk("c", "scsi0:0")
    chain.merge(host.model("c").current["scsi0:0"])  # ... and the process dies here
    broken = host.model("c")
    assert broken.missing and not broken.current
    with pytest.raises(VmvaultError, match="missing disks"):
        host.delete_checkpoint("c", broken.checkpoints[0].id)  # never deletes blindly
    result = backup(repo, lab_source(host, "c"))
    assert any("interrupted backup" in w for w in result.warnings)
    assert_same_vm(before, host.model("c"))
    assert host.read_disk("c", "scsi0:0") == expected


@pytest.mark.parametrize("seed", [1, 2, 4, 5])
def test_random_checkpoint_histories_back_up_and_restore(
    host: LabHost, repo: Repository, tmp_path: Path, seed: int
) -> None:
    """Random writes, checkpoints, applies, deletes and backups against a model of every
    checkpoint's content: backups change nothing, the last one restores every layer."""
    from vmvault.errors import HypervisorError

    rng = random.Random(seed)
    size = 4 * MIB
    host.create_vm("r", (size,))
    current = bytearray(size)
    at: dict[str, bytes] = {}  # checkpoint id -> content when taken
    source = lab_source(host, "r")
    done: dict[str, int] = {}
    ops = ["write"] * 3 + ["checkpoint"] * 2 + ["apply"] * 2 + ["delete", "backup"]
    for _ in range(30):
        op = rng.choice(ops)
        if op == "write":
            off, n = rng.randrange(0, size // 4096) * 4096, rng.randrange(1, 64) * 4096
            data = rng.randbytes(min(n, size - off))
            host.write("r", "scsi0:0", off, data)
            current[off : off + len(data)] = data
        elif op == "checkpoint":
            at[host.checkpoint("r", f"cp{len(at)}")] = bytes(current)
        elif op == "apply" and at:
            cp = rng.choice(list(at))  # insertion order: ids are random, the run must not be
            host.apply_checkpoint("r", cp)
            current[:] = at[cp]
        elif op == "delete" and at:
            cp = rng.choice(list(at))  # insertion order: ids are random, the run must not be
            shape = host.model("r").structure()
            try:
                host.delete_checkpoint("r", cp)
                del at[cp]
            except HypervisorError:  # a layer with several children: refused, nothing changed
                assert host.model("r").structure() == shape
                op = "refused"
        elif op == "backup":
            vm_before = host.model("r")
            backup(repo, source)
            assert_same_vm(vm_before, host.model("r"))
        else:
            op = "nothing to do"
        done[op] = done.get(op, 0) + 1
        vm = host.model("r")
        assert host.read_disk("r", "scsi0:0") == bytes(current)
        assert {c.id for c in vm.checkpoints} == set(at)
        for c in vm.checkpoints:
            assert full_read(c.disks["scsi0:0"]) == at[c.id], c.name
    assert {"checkpoint", "apply", "delete", "backup"} <= set(done), done
    final = host.model("r")
    snap = backup(repo, source).snapshot
    assert_same_vm(final, host.model("r"))
    target = tmp_path / "restored" / "r"
    restore(repo, snap, str(target))
    restored = LabHost(str(target.parent)).import_vm("r")
    assert restored.structure()["disks"] == final.structure()["disks"]
    assert LabHost(str(target.parent)).read_disk("r", "scsi0:0") == bytes(current)
    for c in restored.checkpoints:
        assert full_read(c.disks["scsi0:0"]) == at[c.id], c.name


def test_frozen_layers_are_reported_unchanged(host: LabHost, repo: Repository) -> None:
    build_tree(host)
    source = lab_source(host, "web")
    first = backup(repo, source).snapshot
    vm = host.model("web")
    leaves = {slot: vm.disks[p].rel for slot, p in vm.current.items()}
    frozen = {d.name for d in first.disks if d.cbt and "data_write_guid" in d.cbt} - set(leaves.values())
    assert len(frozen) == len(vm.disks) - len(leaves)
    host.write("web", "scsi0:0", 3 * MIB, b"z" * 4096)
    with source.open_session(PreviousBackup(first.id, {d.name: d.cbt for d in first.disks if d.cbt})) as s:
        by_name = {d.name: d for d in s.disks}
        assert all(by_name[n].changed == [] for n in frozen)
        assert by_name[leaves["scsi0:0"]].changed == [(3 * MIB, 64 * 1024)]  # the leaf's RCT ranges
        assert by_name[leaves["scsi0:1"]].changed == []


# ---- the connector's decisions, end to end on the lab host ------------------------------


def test_vss_failure_is_an_error_unless_crash_consistent_is_allowed(host: LabHost, repo: Repository) -> None:
    host.create_vm("v", (4 * MIB,))
    before = host.model("v")
    running = host.start("v", seed=1)
    host.faults.add("vss")
    try:
        with pytest.raises(VmvaultError, match=r"VSS writers.*allow_crash_consistent=1"):
            backup(repo, lab_source(host, "v"))
        assert_same_vm(before, host.model("v"))
        result = backup(repo, lab_source(host, "v", "allow_crash_consistent=1"))
    finally:
        running.stop()
    assert result.snapshot.consistency == "crash-consistent"
    assert any(w.startswith("CRASH-CONSISTENT") for w in result.snapshot.warnings)
    assert_same_vm(before, host.model("v"))
    levels = [c["consistency_level"] for c in host.host_state(before.vm_id)["created"].values()]
    assert levels == [2]  # the application-consistent attempts left nothing; one crash-consistent checkpoint


def test_disks_hyper_v_cannot_checkpoint_are_named(host: LabHost, repo: Repository) -> None:
    host.create_vm(
        "pt",
        (4 * MIB,),
        extra_drives=(("scsi0:1", "dvd", "/isos/setup.iso"), ("scsi0:2", "passthrough", "Disk 3")),
    )
    result = backup(repo, lab_source(host, "pt"))
    snap = result.snapshot
    assert [d.name for d in snap.disks] == ["Virtual Hard Disks/pt.vhdx"]  # no ISO among the disks
    assert snap.extra["hyperv"]["not_backed_up"] == [{"slot": "scsi0:2", "kind": "passthrough", "path": "Disk 3"}]
    assert any(w.startswith("NOT BACKED UP: pass-through disk Disk 3") for w in result.warnings)
    assert snap.extra["hyperv"]["guest_backup_type"] == "full"


def test_vm_names_resolve_to_one_vm(host: LabHost, repo: Repository) -> None:
    host.create_vm("web-a", (4 * MIB,), display_name="web")
    host.create_vm("web-b", (4 * MIB,), display_name="web")
    host.create_vm("web[1]", (4 * MIB,))
    with pytest.raises(VmvaultError, match="2 VMs are named 'web'"):
        backup(repo, lab_source(host, "web"))
    with pytest.raises(VmvaultError, match=r"no VM named 'web\*'"):
        backup(repo, lab_source(host, "web*"))
    assert backup(repo, lab_source(host, "web[1]")).snapshot.vm["name"] == "web[1]"
    by_id = backup(repo, lab_source(host, host.model("web-b").vm_id))
    assert by_id.snapshot.vm["id"] == host.model("web-b").vm_id


def test_another_hosts_checkpoint_is_left_alone_until_stale(tmp_path: Path, repo: Repository) -> None:
    clock = LabClock()
    (tmp_path / "h").mkdir()
    host = LabHost(str(tmp_path / "h"), clock=clock)
    host.create_vm("s", (4 * MIB,))
    other = host.create_recovery_checkpoint("s", f"{RECOVERY_MARKER} run=x host=backup02 pid=4242 t={int(clock())}")
    with pytest.raises(VmvaultError, match="another backup of VM s is running"):
        backup(repo, lab_source(host, "s"))
    assert [c.id for c in host.model("s").checkpoints] == [other]
    clock.advance(25 * 3600)
    result = backup(repo, lab_source(host, "s"))
    assert any("interrupted backup" in w for w in result.warnings)
    assert not host.model("s").checkpoints


def test_merge_suspended_by_an_export_is_re_enabled(host: LabHost, repo: Repository) -> None:
    vm = host.create_vm("m", (4 * MIB,))
    state = host.host_state(vm.vm_id)
    state["merge_enabled_state"] = 0
    host.save_host_state(vm.vm_id, state)
    result = backup(repo, lab_source(host, "m"))
    assert any("merging was suspended" in w for w in result.warnings)
    assert host.host_state(vm.vm_id)["merge_enabled_state"] == 1


def test_restored_vm_is_registered_through_compare_import(host: LabHost, repo: Repository) -> None:
    host.create_vm("orig", (4 * MIB,))
    host.write("orig", "scsi0:0", 0, b"o" * MIB)
    snap = backup(repo, lab_source(host, "orig")).snapshot
    target = Path(host.root) / "copy"
    restore(repo, snap, str(target))
    src = lab_source(host, "orig")
    (vmcx,) = (target / "Virtual Machines").glob("*.xml")
    doc = register_restored(src, str(vmcx), str(target))
    assert doc["imported"] and doc["id"] != snap.vm["id"]
    assert host.read_disk("copy", "scsi0:0") == host.read_disk("orig", "scsi0:0")
    with pytest.raises(VmvaultError, match="Import-VM refused"):
        register_restored(src, str(tmp_outside(host) / "Virtual Machines" / "x.xml"), "/elsewhere")


def tmp_outside(host: LabHost) -> Path:
    return Path(host.root).parent / "elsewhere" / "vm"
