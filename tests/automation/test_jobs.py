"""Real jobs against real repositories: honest status after a failed backup, retention that
never goes below the minimum, notifications to a real SMTP and a real HTTP server, alerts."""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.automation.conftest import MailSink, RecordingNotifier, WebhookSink, make_config
from vmvault.automation.config import AutomationConfig
from vmvault.automation.history import FAILED, SUCCESS, History
from vmvault.automation.notify import Notifier, Summary
from vmvault.automation.runner import JobOutcome, execute_job
from vmvault.automation.scheduler import FakeClock, Scheduler
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository

CS = 64 * 1024
NOW = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    folder = tmp_path / "vms" / "web01"
    folder.mkdir(parents=True)
    rng = random.Random(1)
    (folder / "disk.raw").write_bytes(b"".join(rng.randbytes(CS) if i % 3 else bytes(CS) for i in range(6)))
    (folder / "web01.conf").write_text("memory = 2048\n")
    return folder


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    return Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=CS)


def snapshot_ids(tmp_path: Path) -> set[str]:
    return set(Repository.open(LocalBackend(str(tmp_path / "repo")), b"repo pass").snapshot_ids())


def backup_config(tmp_path: Path, vm: Path, extra: str = "") -> AutomationConfig:
    """web01 backed up nightly into r, with retention; ``extra``: more tables (notifiers, jobs)."""
    return make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "{vm}"

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"
        schedule = "0 1 * * *"
        max_age = "26h"

        [jobs.web01.retention]
        keep_last = 1
        min_good = 2
        {extra}
        """,
    )


def run_now(sched: Scheduler, name: str) -> None:
    sched.enqueue_now(sched.config.jobs[name])
    sched.tick()
    sched.wait_idle(60)


@pytest.mark.integration
def test_failed_backup_is_failed_with_its_cause_and_forget_is_skipped(
    tmp_path: Path,
    repo: Repository,
    vm: Path,
    smtp_server: tuple[int, MailSink],
    webhook_server: tuple[str, WebhookSink],
) -> None:
    port, mail = smtp_server
    url, hook = webhook_server
    notify = f"""
        [notifications.mail]
        type = "smtp"
        host = "127.0.0.1"
        port = {port}
        from = "vmvault@test.invalid"
        to = ["ops@test.invalid"]
        on = "failure"

        [notifications.hook]
        type = "webhook"
        url = "{url}"
        on = "always"
        headers = {{ Authorization = "Bearer t0ken" }}
    """
    config = backup_config(tmp_path, vm, notify)
    clock = FakeClock(NOW)
    sched = Scheduler(config, clock=clock)
    clock.busy = lambda: bool(sched.running)

    # three good backups; retention keeps max(keep_last=1, min_good=2) = 2
    for _ in range(3):
        run_now(sched, "web01")
    assert [r.status for r in sched.history.runs()] == [SUCCESS] * 3
    good = snapshot_ids(tmp_path)
    assert len(good) == 2
    last = sched.history.runs()[0]
    assert last.snapshot in good and last.details["retention"]["min_good"] == 2
    assert len(last.details["retention"]["removed"]) == 1
    assert len(hook.posts) == 3 and not mail.messages  # mail only on failure

    # the VM folder is gone: the run fails, says why, and forgets nothing
    vm.rename(vm.with_name("moved"))
    clock.advance(3600)
    run_now(sched, "web01")
    failed = sched.history.runs()[0]
    assert failed.status == FAILED
    assert failed.error is not None and "no such file or folder" in failed.error and str(vm) in failed.error
    assert failed.snapshot is None
    assert failed.details["retention"] == {"skipped": "the backup failed; no snapshot was forgotten"}
    assert snapshot_ids(tmp_path) == good

    # one summary per run: the webhook got JSON, the mail server a real message
    headers, doc = hook.posts[-1]
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer t0ken"
    assert doc["kind"] == "run" and doc["job"] == "web01" and doc["status"] == "failed"
    assert "no such file or folder" in doc["error"] and doc["attempts"] == 1
    assert mail.received.wait(10) and len(mail.messages) == 1
    msg = mail.messages[0]
    assert msg["Subject"].startswith("[vmvault] FAILED: web01")
    assert mail.envelopes[0] == ("vmvault@test.invalid", ["ops@test.invalid"])
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None and "no such file or folder" in body.get_content()

    # 27 h after the last good backup the max-age alert fires, once
    clock.advance(26 * 3600)
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    alerts = [d for _h, d in hook.posts if d["kind"] == "alert"]
    assert (
        len(alerts) == 1 and str(vm) in alerts[0]["message"] and "more than the allowed 1d 2h" in alerts[0]["message"]
    )
    assert len(mail.messages) == 2 and mail.messages[1]["Subject"].startswith("[vmvault] ALERT: web01")

    # the VM is back: success, and the alert clears
    vm.with_name("moved").rename(vm)
    run_now(sched, "web01")
    assert sched.history.runs()[0].status == SUCCESS
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    assert len([d for _h, d in hook.posts if d["kind"] == "alert"]) == 1


def test_a_notification_that_cannot_be_delivered_does_not_change_the_status(
    tmp_path: Path, repo: Repository, vm: Path, webhook_server: tuple[str, WebhookSink]
) -> None:
    url, hook = webhook_server
    hook.status = 500
    dead_port = 9  # discard port on loopback: nothing listens, the connection is refused
    notify = f"""
        [notifications.hook]
        type = "webhook"
        url = "{url}"
        on = "always"

        [notifications.mail]
        type = "smtp"
        host = "127.0.0.1"
        port = {dead_port}
        from = "a@test.invalid"
        to = ["b@test.invalid"]
        on = "always"
        timeout = "2s"
    """
    config = backup_config(tmp_path, vm, notify)
    clock = FakeClock(NOW)
    sched = Scheduler(config, clock=clock)
    run_now(sched, "web01")
    assert sched.history.runs()[0].status == SUCCESS
    assert len(hook.posts) == 1  # it was tried; the 500 is logged, nothing else happens


def test_never_backed_up_alerts_only_once_max_age_has_passed_since_it_was_first_due(
    tmp_path: Path, repo: Repository, vm: Path
) -> None:
    """A first start alerted "no successful backup on record" for every job at once."""
    config = backup_config(tmp_path, vm)  # schedule 01:00 daily, max_age 26h
    rec = RecordingNotifier()
    clock = FakeClock(NOW)  # 10:00: first due tomorrow 01:00
    sched = Scheduler(config, clock=clock, notifiers=[rec], execute=lambda c, j: JobOutcome(FAILED, error="down"))
    clock.busy = lambda: bool(sched.running)
    sched.start()
    sched.tick()  # the first tick checks ages
    assert rec.sent == []

    def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> None:
        clock.advance(to=dt.datetime(2026, 11, day, hh, mm, ss, tzinfo=dt.UTC))
        sched.tick()
        sched.wait_idle(30)
        sched.check_alerts(clock.now())
        sched.wait_idle(30)  # alerts are told in a thread of their own

    at(26, 1)  # the first run fails: a failure, not yet an RPO alert
    at(27, 1)  # so does the second
    at(27, 3)  # exactly 26 h since it was first due: still within
    assert [(s.kind, s.status, s.alerts) for s in rec.sent] == [("run", FAILED, []), ("run", FAILED, [])]
    at(27, 3, 0, 1)
    assert [(s.kind, s.job) for s in rec.sent[2:]] == [("alert", "web01")]
    assert rec.sent[2].message == (
        f"{vm} has no successful backup on record: it was first due 2026-11-26 01:00:00 UTC, 1d 2h 1s ago, "
        "more than the allowed 1d 2h (max_age of job web01)"
    )
    assert rec.sent[2].alerts[0]["counted_from"] == "2026-11-26T01:00:00+00:00"
    sched.close()

    # a daemon that starts again does not alert for it again, nor for a new job
    config = backup_config(
        tmp_path,
        vm,
        f"""
        [jobs.db01]
        type = "backup"
        source = "{vm}"
        repository = "r"
        schedule = "0 4 * * *"
        max_age = "1h"
        """,
    )
    sched = Scheduler(config, clock=clock, notifiers=[rec], execute=lambda c, j: JobOutcome(FAILED, error="down"))
    sched.start()
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    assert len(rec.sent) == 3
    sched.close()


def test_a_successful_run_older_than_max_age_alerts_with_its_age(tmp_path: Path, repo: Repository, vm: Path) -> None:
    from vmvault.automation.status import max_age_alerts

    config = backup_config(tmp_path, vm)
    history = History(config.daemon.history)
    run_id = history.start("web01", "backup", NOW - dt.timedelta(hours=30))
    history.finish(run_id, NOW - dt.timedelta(hours=29, seconds=5), SUCCESS, snapshot="ab" * 32)
    failed = history.start("web01", "backup", NOW - dt.timedelta(hours=2))
    history.finish(failed, NOW - dt.timedelta(hours=2), FAILED, error="storage full")
    alerts = max_age_alerts(config, history, NOW)
    assert len(alerts) == 1
    assert alerts[0].message == (
        f"{vm} was last backed up successfully 2026-11-24 04:59:55 UTC, 1d 5h 5s ago, "
        "more than the allowed 1d 2h (max_age of job web01)"
    )
    assert alerts[0].last_success == NOW - dt.timedelta(hours=29, seconds=5)
    assert max_age_alerts(config, history, NOW - dt.timedelta(hours=5)) == []


def test_an_alert_whose_notifier_hangs_does_not_hold_up_the_schedule(
    tmp_path: Path, repo: Repository, vm: Path
) -> None:
    """Alerts were told in the loop that starts the jobs: a mail server or webhook answering
    slowly held every job back for as long. They are told in a thread of their own."""
    release = threading.Event()

    class Hanging(RecordingNotifier):
        def send(self, summary: Summary) -> None:
            release.wait(30)
            super().send(summary)

    config = backup_config(tmp_path, vm)
    history = History(config.daemon.history)
    run_id = history.start("web01", "backup", NOW - dt.timedelta(hours=30))
    history.finish(run_id, NOW - dt.timedelta(hours=29), SUCCESS, snapshot="ab" * 32)
    rec = Hanging()
    sched = Scheduler(config, clock=FakeClock(NOW), notifiers=[rec], execute=lambda c, j: JobOutcome(SUCCESS))
    sched.start()
    try:
        started = time.monotonic()
        sched.check_alerts(NOW)
        assert time.monotonic() - started < 5 and rec.sent == []
    finally:
        release.set()
    sched.wait_idle(30)
    assert [(s.kind, s.job) for s in rec.sent] == [("alert", "web01")]
    sched.close()


def test_verify_job_reports_damage_as_failed(tmp_path: Path, repo: Repository, vm: Path) -> None:
    config = make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "{vm}"

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"

        [jobs.verify]
        type = "verify"
        repository = "r"
        read_data = true
        """,
    )
    assert execute_job(config, config.jobs["web01"]).status == SUCCESS
    ok = execute_job(config, config.jobs["verify"])
    assert ok.status == SUCCESS and ok.details["check"]["ok"]
    pack = next(p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0xFF
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(raw))
    bad = execute_job(config, config.jobs["verify"])
    assert bad.status == FAILED and bad.error is not None and "check found" in bad.error


def test_copy_job_replicates_and_then_has_nothing_to_do(tmp_path: Path, repo: Repository, vm: Path) -> None:
    os.environ["VMVAULT_TEST_OFFSITE_PW"] = "offsite pass"
    Repository.init(LocalBackend(str(tmp_path / "offsite")), b"offsite pass", chunk_size=CS)
    config = make_config(
        tmp_path,
        f"""
        [repositories.offsite]
        location = "{tmp_path / "offsite"}"
        password_env = "VMVAULT_TEST_OFFSITE_PW"

        [sources.web01]
        location = "{vm}"

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"

        [jobs.offsite]
        type = "copy"
        from = "r"
        to = "offsite"
        sources = ["web01"]
        """,
    )
    assert execute_job(config, config.jobs["web01"]).status == SUCCESS
    first = execute_job(config, config.jobs["offsite"])
    assert first.status == SUCCESS and len(first.details["copy"]["copied"]) == 1 and first.bytes
    second = execute_job(config, config.jobs["offsite"])
    assert second.status == SUCCESS and second.details["copy"]["copied"] == [] and second.bytes == 0


def test_wrong_repository_password_is_a_failed_run(tmp_path: Path, repo: Repository, vm: Path) -> None:
    os.environ["VMVAULT_TEST_REPO_PW"] = "not the pass"
    config = backup_config(tmp_path, vm)
    out = execute_job(config, config.jobs["web01"])
    assert out.status == FAILED and out.error is not None
    assert isinstance(out.exception, Exception)
    assert snapshot_ids(tmp_path) == set()


def test_notifier_filters_by_on(tmp_path: Path) -> None:
    from vmvault.automation.config import NotifierConfig
    from vmvault.automation.notify import Summary

    failure_only = Notifier(NotifierConfig("m", "smtp", "failure", host="h", sender="a", recipients=("b",)))
    assert not failure_only.wants(Summary(kind="run", job="j", status=SUCCESS, message=""))
    assert failure_only.wants(Summary(kind="run", job="j", status=FAILED, message=""))
    assert failure_only.wants(Summary(kind="alert", job="j", status="alert", message=""))
    assert failure_only.wants(Summary(kind="run", job="j", status="warning", message=""))


def test_retention_blocked_by_a_lock_makes_the_run_a_warning(tmp_path: Path, repo: Repository, vm: Path) -> None:
    config = backup_config(tmp_path, vm)
    job = config.jobs["web01"]
    for _ in range(2):
        assert execute_job(config, job).status == SUCCESS
    before = snapshot_ids(tmp_path)
    assert len(before) == 2
    # another backup is writing (shared lock): the backup proceeds, forget cannot
    with repo.lock(exclusive=False, operation="backup"):
        out = execute_job(config, job)
    assert out.status == "warning" and out.snapshot is not None
    assert "retention failed" in " ".join(out.details["warnings"])
    assert snapshot_ids(tmp_path) == before | {out.snapshot}  # nothing was forgotten
