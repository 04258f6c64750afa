"""The daemon's configuration carries ``backup --allow-parent-dir`` and ``--follow-links``.

Threat model: ``docs/design/repository-format.md`` section 10.4.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from tests.automation.conftest import make_config
from tests.conftest import require_tool
from vmvault.automation.config import BackupJob
from vmvault.automation.history import FAILED
from vmvault.automation.runner import JobOutcome, execute_job
from vmvault.backends.local import LocalBackend
from vmvault.errors import ConfigError
from vmvault.repo.repository import Repository


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=64 * 1024)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "base.raw").write_bytes(b"t" * 65536)
    folder = tmp_path / "vms" / "web01"
    folder.mkdir(parents=True)
    (folder / "web01.conf").write_text("memory = 2048\n")
    subprocess.run(
        [require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "templates" / "base.raw"),
         "-F", "raw", str(folder / "disk.qcow2"), "1M"],
        check=True,
    )  # fmt: skip
    return folder


def config(tmp_path: Path, vm: Path, source_keys: str = "", job_keys: str = "") -> str:
    return f"""
        [sources.web01]
        location = "{vm}"
        {source_keys}

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"
        {job_keys}
        """


def test_options_are_read_from_sources_and_jobs(tmp_path: Path, vm: Path) -> None:
    cfg = make_config(
        tmp_path,
        config(
            tmp_path,
            vm,
            'allow_parent_dirs = ["/srv/a", "/srv/b"]',
            'allow_parent_dirs = ["/srv/c"]\nfollow_links = true',
        ),
    )
    job = cfg.jobs["web01"]
    assert isinstance(job, BackupJob)
    assert cfg.sources["web01"].options.allow_parent_dirs == ("/srv/a", "/srv/b")
    options = cfg.source_options(job)
    assert options.allow_parent_dirs == ("/srv/a", "/srv/b", "/srv/c") and options.follow_links


@pytest.mark.parametrize(
    ("source_keys", "message"),
    [
        ('allow_parent_dirs = ["relative/dir"]', "is not an absolute path"),
        ("allow_parent_dirs = [1]", "must be a list of strings"),
        ('follow_links = "yes"', "must be true or false"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path: Path, vm: Path, source_keys: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        make_config(tmp_path, config(tmp_path, vm, source_keys))
    assert str(tmp_path / "vmvault.toml") in str(err.value)


def test_options_on_a_hypervisor_source_are_refused(tmp_path: Path) -> None:
    body = """
        [sources.db]
        location = "qemu+unix:///run/db.qmp"
        allow_parent_dirs = ["/srv/templates"]

        [jobs.db]
        type = "backup"
        source = "db"
        repository = "r"
        """
    with pytest.raises(ConfigError, match="applies to VM folders and image files, and libvirt domains, not to running"):
        make_config(tmp_path, body)


def test_a_backup_job_refuses_a_parent_outside_unless_configured(tmp_path: Path, vm: Path) -> None:
    cfg = make_config(tmp_path, config(tmp_path, vm))
    outcome = execute_job(cfg, cfg.jobs["web01"])
    assert outcome.status == FAILED
    assert outcome.error is not None and "base.raw" in outcome.error and "outside" in outcome.error
    allowed = f'allow_parent_dirs = ["{tmp_path / "templates"}"]'
    cfg = make_config(tmp_path, config(tmp_path, vm, allowed))
    outcome = execute_job(cfg, cfg.jobs["web01"])
    assert outcome.status != FAILED, outcome.error
    assert outcome.snapshot is not None


# ---- every option of BackupOptions, per job -------------------------------------------------


def test_every_option_key_is_read_and_merged_job_over_source(tmp_path: Path) -> None:
    scratch, other = tmp_path / "scratch", tmp_path / "scratch2"
    body = f"""
        [sources.db]
        location = "qemu+unix:///run/db.qmp"
        scratch_dir = "{scratch}"
        exclude = ["*.iso"]

        [jobs.db]
        type = "backup"
        source = "db"
        repository = "r"
        scratch_dir = "{other}"
        exclude = ["swap*", "*.iso"]
        allow_crash_consistent = true
        """
    cfg = make_config(tmp_path, body)
    job = cfg.jobs["db"]
    assert isinstance(job, BackupJob)
    options = cfg.source_options(job)
    assert options.scratch_dir == str(other) and options.exclude == ("*.iso", "swap*")
    assert options.allow_crash_consistent and not options.follow_links and not options.full


@pytest.mark.parametrize(
    ("location", "keys", "message"),
    [
        ("/srv/vms/web01", 'scratch_dir = "/var/tmp"', "--scratch-dir \\(scratch_dir\\) applies to running QEMU VMs"),
        ("qemu+unix:///run/db.qmp", 'scratch_dir = "tmp"', "is not an absolute path"),
        ("qemu+unix:///run/db.qmp", 'exclude = ["\\u0007"]', "exclude pattern"),
        ("ftp://example.net/vm", "", "unknown source"),
    ],
)
def test_options_a_connector_cannot_take_are_refused_at_load(
    tmp_path: Path, location: str, keys: str, message: str
) -> None:
    body = f"""
        [sources.s]
        location = "{location}"
        {keys}

        [jobs.s]
        type = "backup"
        source = "s"
        repository = "r"
        """
    with pytest.raises(ConfigError, match=message) as err:
        make_config(tmp_path, body)
    assert f"{tmp_path / 'vmvault.toml'}:" in str(err.value)  # file and line


def test_a_job_cannot_add_an_option_its_source_refuses(tmp_path: Path) -> None:
    body = """
        [sources.db]
        location = "qemu+unix:///run/db.qmp"

        [jobs.db]
        type = "backup"
        source = "db"
        repository = "r"
        follow_links = true
        """
    with pytest.raises(ConfigError, match=r"follow_links.*not to running QEMU VMs") as err:
        make_config(tmp_path, body)
    assert "jobs.db" in str(err.value)


def test_two_jobs_in_one_process_each_get_their_own_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Hyper-V lab VMs whose guests' VSS fails; one job allows a crash-consistent backup,
    the other does not. Run at once in one process, then one after the other: each job's
    backup follows its own option only (an option set process-wide would leak into the other)."""
    from vmvault.testing.hyperv_lab import FAULT_ENV, LabHost

    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv(FAULT_ENV, "vss")  # every LabHost the jobs open fails application-consistent checkpoints
    Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=64 * 1024)
    (tmp_path / "lab").mkdir()
    lab = LabHost(str(tmp_path / "lab"))
    for name in ("a", "b"):
        lab.create_vm(name, (2 << 20,))
    body = f"""
        [jobs.allowed]
        type = "backup"
        source = "hyperv-lab://{lab.root}/a"
        repository = "r"
        allow_crash_consistent = true

        [jobs.strict]
        type = "backup"
        source = "hyperv-lab://{lab.root}/b"
        repository = "r"
        """
    cfg = make_config(tmp_path, body)
    running = [lab.start(name, seed=i) for i, name in enumerate(("a", "b"))]
    try:
        outcomes: dict[str, JobOutcome] = {}
        threads = [
            threading.Thread(target=lambda n=n: outcomes.__setitem__(n, execute_job(cfg, cfg.jobs[n])))
            for n in ("allowed", "strict")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = {n: execute_job(cfg, cfg.jobs[n]) for n in ("allowed", "strict")}
    finally:
        for vm in running:
            vm.stop()
    for result in (outcomes, after):
        assert result["allowed"].status != FAILED, result["allowed"].error
        assert result["allowed"].details["backup"]["consistency"] == "crash-consistent"
        assert result["strict"].status == FAILED
        error = result["strict"].error
        assert error is not None and "application-consistent checkpoint failed" in error
