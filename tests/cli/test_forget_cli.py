"""forget: --keep-within, grouping by VM with a header per group, filters, --keep-last 0 alone;
prune --dry-run predicts prune; check's summary and filters; unlock; copy filters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.backends.local import LocalBackend
from vmvault.cli import EXIT
from vmvault.repo.locks import RepositoryLock
from vmvault.repo.repository import Repository
from vmvault.sample_vm import guest_writes

from .admin import PASSWORD, env, make_vm, run, run_json

__all__ = ["env"]


def retime(env: Path, times_by_vm: dict[str, list[str]]) -> dict[str, list[str]]:
    """Rewrite the repository's snapshots with the given times (oldest first per VM), as the
    repository API does (a new manifest, the old one removed): retention is about time."""
    repo = Repository.open(LocalBackend(str(env / "repo")), PASSWORD.encode())
    ids: dict[str, list[str]] = {}
    by_vm: dict[str, list] = {}
    for s in repo.list_snapshots():
        by_vm.setdefault(str(s.vm.get("name")), []).append(s)
    for vm, stamps in times_by_vm.items():
        for snap, stamp in zip(by_vm[vm], stamps, strict=True):
            old = snap.id
            snap.time = stamp
            new = repo.save_snapshot(snap)
            repo.delete_snapshot(old)
            ids.setdefault(vm, []).append(new)
    return ids


@pytest.fixture()
def history(env: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, list[str]]:
    """web01 backed up 4 times and db 3 times, at known days."""
    web = make_vm(env / "vms", "web01", seed=1)
    db = make_vm(env / "vms", "db", seed=2)
    assert run(capsys, "init")[0] == 0
    for n in range(4):
        guest_writes(str(web / "web01.raw"), percent=2, seed=n)
        assert run(capsys, "backup", str(web))[0] == 0
    for n in range(3):
        guest_writes(str(db / "db.raw"), percent=2, seed=10 + n)
        assert run(capsys, "backup", str(db))[0] == 0
    return retime(
        env,
        {
            "web01": [
                "2026-03-01T10:00:00+00:00",
                "2026-03-08T10:00:00+00:00",
                "2026-03-09T10:00:00+00:00",
                "2026-03-10T10:00:00+00:00",
            ],
            "db": ["2026-02-01T10:00:00+00:00", "2026-02-20T10:00:00+00:00", "2026-03-05T10:00:00+00:00"],
        },
    )


def test_keep_within_is_relative_to_each_vms_newest(
    history: dict[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, _err = run_json(capsys, "forget", "--keep-within", "3d", "--dry-run")
    assert code == 0
    kept = set(doc["forget"]["kept"])
    # web01: newest 03-10, so 03-08 and 03-09 are within 3 days; db: newest 03-05 only
    assert kept == {*history["web01"][1:], history["db"][2]}
    groups = {g["group"]["vm"]: g for g in doc["forget"]["groups"]}
    assert set(groups) == {"web01", "db"}
    reasons = {k["id"]: k["reasons"] for k in groups["web01"]["keep"]}
    assert reasons[history["web01"][1]] == ["within 3d of the newest"]

    code, doc, _err = run_json(capsys, "forget", "--keep-within-weekly", "30d", "--dry-run")
    kept = set(doc["forget"]["kept"])
    # weekly within 30 days: web01's newest of ISO weeks 11 (03-09, 03-10) and 10 (03-08) and 9 (03-01)
    assert kept == {history["web01"][3], history["web01"][1], history["web01"][0], history["db"][2], history["db"][1]}


def test_human_output_has_a_header_per_vm_and_local_times(
    history: dict[str, list[str]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    import time

    time.tzset()
    try:
        code, out, _err = run(capsys, "forget", "--keep-last", "1", "--dry-run")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert code == 0
    assert re.search(r"^VM db, from \S+/vms/db: keep 1, would remove 2$", out, re.M)
    assert re.search(r"^VM web01, from \S+/vms/web01: keep 1, would remove 3$", out, re.M)
    assert "2026-03-10 11:00:00 CET" in out and "last snapshot" in out
    assert out.rstrip().endswith("would remove 5 snapshots of 2 groups")
    code, out, _err = run(capsys, "forget", "--keep-last", "1", "--dry-run", "--utc")
    assert "2026-03-10 10:00:00 UTC" in out


def test_filters_limit_what_forget_judges(history: dict[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _err = run_json(capsys, "forget", "--keep-last", "1", "--vm", "db")
    assert code == 0
    assert sorted(doc["forget"]["removed"]) == sorted(history["db"][:2])
    code, snaps, _err = run_json(capsys, "snapshots")
    assert len(snaps) == 5  # web01's four untouched


def test_keep_last_zero_alone_says_why(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "init")[0] == 0
    code, out, err = run(capsys, "forget", "--keep-last", "0")
    assert code == EXIT["usage"] and out == ""
    assert err.startswith("vmvault: error: --keep-last 0 alone keeps nothing, and forget never removes every")
    code, _out, err = run(capsys, "forget")
    assert code == EXIT["usage"] and "give at least one --keep-* option" in err
    code, _out, err = run(capsys, "forget", "--keep-within", "26")
    assert code == EXIT["usage"] and "has no unit" in err
    code, _out, err = run(capsys, "forget", "abcd1234", "--vm", "web01")
    assert code == EXIT["usage"] and "not both" in err


def test_prune_dry_run_predicts_prune(history: dict[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "forget", "--keep-last", "1")[0] == 0
    code, dry, _err = run_json(capsys, "prune", "--dry-run", "--max-unused", "0")
    assert code == 0 and dry["dry_run"] is True
    code, real, _err = run_json(capsys, "prune", "--max-unused", "0")
    assert code == 0
    same = ("blobs_removed", "bytes_removed", "packs_deleted", "packs_repacked", "blobs_repacked", "bytes_repacked")
    assert dry["blobs_removed"] > 0
    assert {k: dry[k] for k in same} == {k: real[k] for k in same}
    # the size afterwards is an estimate (new packs' headers): within 1 % of what prune measured
    assert abs(dry["bytes_after"] - real["bytes_after"]) <= real["bytes_after"] / 100
    code, out, _err = run(capsys, "prune", "--dry-run")
    assert code == 0 and "would remove 0 unused chunks" in out and "dry run: nothing was changed" in out


def test_check_summary_filters_and_own_lock(history: dict[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "check")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "checked the structure:"
    assert re.fullmatch(
        r"  7 snapshots, 1 key, \d+ index files?, \d+ packs? \(.*\), \d+ chunks and index blocks indexed", lines[1]
    )
    assert "no other process holds a lock" in out and "_" not in out
    assert lines[-1] == "no errors found"
    code, doc, _err = run_json(capsys, "check", "--read-data")
    everything = doc["stats"]["blobs_read"]
    assert doc["stats"]["locks"] == 0
    code, doc, _err = run_json(capsys, "check", "--read-data", "--vm", "db")
    assert code == 0 and doc["stats"]["snapshots_selected"] == 3
    assert 0 < doc["stats"]["blobs_read"] < everything
    code, out, _err = run(capsys, "check", "--read-data", "--vm", "db")
    assert "holding data of the 3 snapshots matching vm db" in out
    code, _out, err = run(capsys, "check", "--vm", "db")
    assert code == EXIT["usage"] and "--read-data" in err


def test_unlock(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "init")[0] == 0
    repo = Repository.open(LocalBackend(str(env / "repo")), PASSWORD.encode())
    live = RepositoryLock(repo.backend, repo.key, exclusive=False, operation="backup")
    live.acquire()
    # a lock left by a process of this host that died holding it: stale
    code = (
        "import os, sys; from vmvault.backends.local import LocalBackend; from vmvault.repo.repository import "
        "Repository; r = Repository.open(LocalBackend(sys.argv[1]), sys.argv[2].encode()); "
        "r.lock(exclusive=True, operation='prune').acquire(); os._exit(0)"
    )
    live.release()
    subprocess.run([sys.executable, "-c", code, str(env / "repo"), PASSWORD], check=True)
    live = RepositoryLock(repo.backend, repo.key, exclusive=False, operation="backup")
    live.acquire()
    try:
        code, out, _err = run(capsys, "unlock")
        assert code == 0
        assert "removed 1 lock; 1 live lock kept" in out and "exclusive lock for prune" in out
        assert len(os.listdir(env / "repo" / "locks")) == 1
        code, doc, _err = run_json(capsys, "unlock", "--remove-all")
        assert code == 0 and [lock["operation"] for lock in doc["removed"]] == ["backup"]
        assert doc["removed"][0]["time"].endswith("+00:00")
        assert os.listdir(env / "repo" / "locks") == []
    finally:
        live.release()


def test_copy_takes_the_filters(
    history: dict[str, list[str]], env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMVAULT_FROM_PASSWORD", PASSWORD)
    target = env / "offsite"
    assert run(capsys, "init", "-r", str(target))[0] == 0
    code, doc, err = run_json(capsys, "copy", "--from", str(env / "repo"), "--to", str(target), "--vm", "db")
    assert code == 0 and len(doc["copied"]) == 3, err
    code, snaps, _err = run_json(capsys, "snapshots", "-r", str(target))
    assert {s["vm"]["name"] for s in snaps} == {"db"}
    assert json.dumps(snaps)  # the same shape as the source's listing
