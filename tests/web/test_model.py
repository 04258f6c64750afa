"""A VM's state and its reasons, the task grid, and the "estimated full" regression."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import REPO_PASS, Site, make_site
from vmvault.automation.history import Sample
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot
from vmvault.repo.status import StatusRecord, write_status
from vmvault.web.model import parse_since, regression_full

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def _repo(site: Site) -> Repository:
    return Repository.open(LocalBackend(str(site.root / "repo")), REPO_PASS.encode())


def _snapshot(site: Site, location: str, when: dt.datetime, *, consistency: str = "offline", host: str = "") -> None:
    repo = _repo(site)
    repo.save_snapshot(
        Snapshot(
            time=when.isoformat(), hostname=host or socket.gethostname(), username="root",
            source={"kind": "files", "location": location}, consistency=consistency,
        )
    )  # fmt: skip
    repo.close()
    site.app.dashboard.repo("local").snapshots(fresh=True)


def _vms(site: Site, now: dt.datetime) -> dict[str, dict[str, Any]]:
    site.app.dashboard.clock = lambda: now
    return {v["name"]: v for v in site.app.dashboard.vms()}


def _reasons(vm: dict[str, Any], level: str) -> list[str]:
    return [r["text"] for r in vm["reasons"] if r["level"] == level]


def _verified(site: Site, when: dt.datetime, status: str = "success") -> None:
    run = site.history.start("verify-local", "verify", when)
    site.history.finish(run, when, status)


@pytest.fixture
def quiet_site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


def test_green_then_red_as_the_rpo_passes(quiet_site: Site) -> None:
    site = quiet_site
    web01 = str(site.root / "vms" / "web01")
    _snapshot(site, web01, NOW - dt.timedelta(hours=2))
    _verified(site, NOW - dt.timedelta(days=1))
    vm = _vms(site, NOW)["web01"]
    assert vm["state"] == "green", vm["reasons"]
    assert "last good backup 2.0 h ago (RPO 26.0 h)" in _reasons(vm, "green")
    vm = _vms(site, NOW + dt.timedelta(hours=25))["web01"]
    assert vm["state"] == "red"
    assert _reasons(vm, "red") == ["last good backup 27.0 h ago, more than the allowed 26.0 h"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("crash", "newest backup is only crash-consistent"),
        ("never-verified", "repository local was never verified"),
        ("old-verification", "repository local last verified 9.0 days ago"),
        ("warning-run", "last backup run (web01-nightly) ended with warnings: VSS writer timed out"),
        ("not-immutable", "repository local keeps nothing immutable"),
    ],
)
def test_amber_reasons(tmp_path: Path, setup: str, expected: str) -> None:
    site = make_site(tmp_path / "site", web="require_immutable = true" if setup == "not-immutable" else "")
    web01 = str(site.root / "vms" / "web01")
    _snapshot(
        site, web01, NOW - dt.timedelta(hours=1), consistency="crash-consistent" if setup == "crash" else "offline"
    )
    if setup != "never-verified":
        _verified(site, NOW - dt.timedelta(days=9 if setup == "old-verification" else 1))
    if setup == "warning-run":
        run = site.history.start("web01-nightly", "backup", NOW - dt.timedelta(hours=1))
        site.history.finish(run, NOW - dt.timedelta(hours=1), "warning", details={"warnings": ["VSS writer timed out"]})
    vm = _vms(site, NOW)["web01"]
    assert vm["state"] == "amber", vm["reasons"]
    assert _reasons(vm, "amber") == [expected]
    assert not _reasons(vm, "red")


def test_a_failed_verification_is_red(quiet_site: Site) -> None:
    site = quiet_site
    _snapshot(site, str(site.root / "vms" / "web01"), NOW - dt.timedelta(hours=1))
    _verified(site, NOW - dt.timedelta(days=2))
    _verified(site, NOW - dt.timedelta(hours=3), "failed")
    vm = _vms(site, NOW)["web01"]
    assert vm["state"] == "red" and "last verification of local (3.0 h ago) found damage" in _reasons(vm, "red")


def test_vms_of_other_hosts_and_their_staleness(quiet_site: Site) -> None:
    site = quiet_site
    _verified(site, NOW - dt.timedelta(days=1))
    _snapshot(site, "/srv/vms/far", NOW - dt.timedelta(hours=30), host="hv-far")
    # a VM seen only in snapshots: the dashboard's default RPO (26 h) applies
    vm = _vms(site, NOW)["far"]
    assert vm["hostname"] == "hv-far" and vm["max_age"] == 26 * 3600 and vm["state"] == "red"
    # with the far host's record, its job's max_age applies and the record's age is judged
    repo = _repo(site)
    write_status(
        repo,
        StatusRecord(
            host="hv-far", time=NOW - dt.timedelta(hours=3),
            jobs=[{"job": "far-nightly", "type": "backup", "source": "/srv/vms/far", "max_age": 48 * 3600,
                   "repositories": ["central"], "status": "success",
                   "last_run": {"status": "success", "start": "2026-11-25T01:30:00+00:00"}}],
        ),
    )  # fmt: skip
    repo.close()
    vm = _vms(site, NOW)["far"]
    assert vm["max_age"] == 48 * 3600 and vm["jobs"] == ["far-nightly"]
    assert vm["state"] == "amber" and _reasons(vm, "amber") == ["host hv-far has not reported for 3.0 h"]
    hosts = {h["hostname"]: h for h in site.app.dashboard.fleet()}
    assert hosts["hv-far"]["stale"] is True and hosts["hv-far"]["age_seconds"] == 3 * 3600


def test_a_broken_repository_is_a_reason_not_a_crash(quiet_site: Site) -> None:
    site = quiet_site
    rc = site.config.repositories["local"]
    site.app.dashboard.repos["local"].config = dataclasses.replace(rc, location=str(site.root / "nowhere"))
    vms = _vms(site, NOW)
    assert any("cannot be read" in t for v in vms.values() for t in _reasons(v, "amber"))
    repos = site.app.dashboard.repositories()
    assert "not a vmvault repository" in repos[0]["error"]


def test_task_grid_counts_runs_prunes_and_windows(quiet_site: Site) -> None:
    site = quiet_site
    h = site.history
    for job, kind, status, hours, details in (
        ("web01-nightly", "backup", "success", 1, {"retention": {"prune": {}}}),
        ("web01-nightly", "backup", "warning", 2, {"retention": {"error": "locked"}}),
        ("db01-hourly", "backup", "failed", 3, {}),
        ("db01-hourly", "backup", "interrupted", 30, {}),
        ("verify-local", "verify", "success", 50, {}),
    ):
        run = h.start(job, kind, NOW - dt.timedelta(hours=hours))
        h.finish(run, NOW - dt.timedelta(hours=hours), status, details=details)
    h.record_action(NOW - dt.timedelta(hours=1), "ada", "prune", "local", "failed")
    site.app.dashboard.clock = lambda: NOW
    day = site.app.dashboard.task_grid(24)
    assert day["backup"] == {"ok": 1, "warning": 1, "failed": 1}
    assert day["prune"] == {"ok": 1, "warning": 1, "failed": 1}
    assert day["verify"] == {"ok": 0, "warning": 0, "failed": 0}
    week = site.app.dashboard.task_grid(24 * 7)
    assert week["backup"]["failed"] == 2 and week["verify"]["ok"] == 1


def test_estimated_full_by_regression() -> None:
    def s(hours: float, free: int | None) -> Sample:
        return Sample("r", NOW + dt.timedelta(hours=hours), 0, None, 0, free)

    # 10 GiB free falling by 1 GiB a day: full ten days after the first sample
    falling = [s(24 * d, (10 - d) << 30) for d in range(5)]
    full = regression_full(falling, NOW + dt.timedelta(days=4))
    assert full is not None and abs((full - (NOW + dt.timedelta(days=10))).total_seconds()) < 60
    assert regression_full([s(0, 5 << 30), s(24, 6 << 30)], NOW + dt.timedelta(days=1)) is None  # growing
    assert regression_full([s(0, 5 << 30)], NOW) is None
    assert regression_full([s(0, 5 << 30), s(0.5, 4 << 30)], NOW) is None  # too short a span
    assert regression_full([s(0, None), s(48, None)], NOW) is None  # the storage says nothing


def test_parse_since() -> None:
    assert parse_since("24h", NOW) == NOW - dt.timedelta(hours=24)
    assert parse_since("7d", NOW) == NOW - dt.timedelta(days=7)
    assert parse_since("all", NOW) is None and parse_since("", NOW) is None
    for bad in ("7", "x7d", "0h", "-1d", "9999d", "1w"):
        with pytest.raises(ValueError):
            parse_since(bad, NOW)


def test_statistics_and_samples(quiet_site: Site) -> None:
    site = quiet_site
    assert site.run("web01-nightly") == "success"
    assert site.run("web01-nightly") == "success"  # the same data again: deduplicated
    site.app.dashboard.refresh_stats()
    (repo,) = site.app.dashboard.repositories()
    stats = repo["stats"]
    assert stats["snapshots"] == 2
    assert stats["logical"] == 2 * stats["unique"]  # two snapshots of the same 2 MiB
    assert stats["dedup_ratio"] == 2.0
    assert stats["compression_ratio"] > 1.0 and stats["stored"] > stats["stored_data"] > 0
    assert stats["free"] > 0
    assert len(repo["samples"]) == 1 and repo["growth"][-1]["added"] > 0
    site.app.dashboard.refresh_stats()
    assert len(site.history.samples("local")) == 1  # at most one sample an hour
