"""``vmvault audit``: checkpoints, orphans, leftover recovery checkpoints, stale backups."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from vmvault.cli import EXIT, main
from vmvault.cli.audit import parse_age
from vmvault.hypervisors.hyperv import RECOVERY_MARKER
from vmvault.testing.hyperv_lab import LabHost

MIB = 1024 * 1024


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.delenv("VMVAULT_REPO", raising=False)
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    return tmp_path


@pytest.fixture()
def host(env: Path) -> LabHost:
    (env / "host").mkdir()
    h = LabHost(str(env / "host"))
    h.create_vm("web", (8 * MIB,))
    h.write("web", "scsi0:0", 0, b"w" * MIB)
    cp = h.checkpoint("web", "cp1")
    h.write("web", "scsi0:0", MIB, b"v" * MIB)
    h.checkpoint("web", "cp2")
    h.write("web", "scsi0:0", 0, b"u" * 4096)
    h.create_vm("db", (8 * MIB,))
    assert cp
    return h


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_clean_host_exits_0_and_lists_checkpoints(host: LabHost, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run(capsys, "audit", f"hyperv-lab://{host.root}")
    assert code == EXIT["ok"] and doc["problems"] == 0
    web = next(v for v in doc["vms"] if v["name"] == "web")
    assert web["checkpoints"]["count"] == 2 and web["checkpoints"]["chain_depth"] == 2
    assert web["checkpoints"]["differencing_bytes"] > MIB
    assert [c["depth"] for c in web["checkpoints"]["list"]] == [1, 2]
    assert web["checkpoints"]["oldest_age_seconds"] is not None
    # a plain folder path gives the same
    assert main(["audit", host.root]) == EXIT["ok"]
    out = capsys.readouterr().out
    assert "2 VMs, 0 problems" in out and "give -r REPOSITORY" in out


def test_orphans_and_leftover_recovery_checkpoints(host: LabHost, capsys: pytest.CaptureFixture[str]) -> None:
    web = host.model("web")
    shutil.copy(web.current["scsi0:0"], Path(web.folder) / "Virtual Hard Disks" / "web_DEADBEEF.avhdx")
    host.create_recovery_checkpoint("db", f"{RECOVERY_MARKER} pid=999999999 host={socket.gethostname()} t=1")
    code, doc = run(capsys, "audit", f"hyperv-lab://{host.root}")
    assert code == EXIT["problems"]
    by = {v["name"]: v for v in doc["vms"]}
    assert [Path(o["path"]).name for o in by["web"]["orphans"]] == ["web_DEADBEEF.avhdx"]
    assert by["db"]["recovery_checkpoints_left"] and by["db"]["checkpoints"]["count"] == 0
    # human output names each problem
    assert main(["audit", f"hyperv-lab://{host.root}/db"]) == EXIT["problems"]
    assert "left behind by a failed backup" in capsys.readouterr().out


def test_with_a_repository_stale_vms_are_problems(host: LabHost, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(env / "repo")
    assert main(["-r", repo, "init", "-q"]) == 0
    assert main(["-r", repo, "backup", "-q", f"hyperv-lab://{host.root}/web"]) == 0
    code, doc = run(capsys, "audit", host.root, "--repo", repo)
    by = {v["name"]: v for v in doc["vms"]}
    assert code == EXIT["problems"]
    assert by["web"]["problems"] == [] and by["web"]["last_backup_age_seconds"] is not None
    assert by["db"]["problems"] == ["no snapshot of this VM in the repository"]
    code, doc = run(capsys, "audit", f"hyperv-lab://{host.root}/web", "--repo", repo, "--max-age", "0s")
    assert code == EXIT["problems"] and "checkpoints are not backups" in doc["vms"][0]["problems"][0]
    # the backup left nothing behind, so the VM itself is clean
    assert [c.name for c in host.model("web").checkpoints] == ["cp1", "cp2"]


def test_bad_arguments(env: Path) -> None:
    assert main(["audit", str(env / "missing")]) == EXIT["usage"]
    assert main(["audit", "ftp://x"]) == EXIT["usage"]
    assert parse_age("26h") == 26 * 3600 and parse_age("3d") == 3 * 86400 and parse_age("1d12H") == 36 * 3600
    for bad in ("soon", "2", "5300w"):
        with pytest.raises(SystemExit):
            main(["audit", str(env), "--max-age", bad])
