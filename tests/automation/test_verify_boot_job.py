"""The ``verify-boot`` job type: its configuration, and real runs of the daemon's scheduler
booting the guest of tests/guests.py from a repository: a wiped boot sector fails with its
reason and a screenshot mailed to a real SMTP server, the job's max_age alerts, and a guest
that boots succeeds and recovers."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from tests.automation.conftest import MailSink, WebhookSink, make_config
from tests.guests import guest
from vmvault.automation.config import VerifyBootJob
from vmvault.automation.history import FAILED, SUCCESS
from vmvault.automation.scheduler import FakeClock, Scheduler
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.errors import ConfigError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository

NOW = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)


def _job(tmp_path: Path, body: str) -> VerifyBootJob:
    config = make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "/srv/vms/web01"

        [jobs.boot]
        type = "verify-boot"
        repository = "r"
        source = "web01"
        {body}
        """,
    )
    job = config.jobs["boot"]
    assert isinstance(job, VerifyBootJob)
    return job


def test_a_verify_boot_job_reads_its_keys(tmp_path: Path) -> None:
    job = _job(
        tmp_path,
        """schedule = "0 4 * * sat"
        timeout = "5m"
        marker = "READY"
        heartbeats = ["agent", "marker"]
        network = "restricted"
        max_age = "8d"
        screenshots = "shots"
        """,
    )
    assert (job.timeout, job.marker, job.heartbeats, job.network) == (300.0, "READY", ("agent", "marker"), "restricted")
    assert job.max_age == 8 * 86400.0
    assert job.screenshots == str(tmp_path / "shots")  # relative to the configuration's folder
    assert not job.catch_up
    default = _job(tmp_path, "")
    assert (default.timeout, default.heartbeats, default.network, default.accel) == (600.0, None, "none", "auto")
    assert default.screenshots == str(tmp_path / "screenshots")  # beside the history


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('heartbeats = ["ping"]', "heartbeats takes agent, marker, screen"),
        ('heartbeats = ["marker"]', "needs marker = TEXT"),
        ('network = "bridge"', "network must be none or restricted"),
        ('timeout = "0s"', "timeout must be from 1 s"),
        ('accel = "hvf"', "accel must be auto, tcg or kvm"),
        ("max_age = 'soon'", "max_age"),
        ('retention = "x"', "unknown key 'retention'"),
    ],
)
def test_mistakes_in_a_verify_boot_job_name_the_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _job(tmp_path, body)
    assert str(tmp_path / "vmvault.toml") in str(err.value)


def test_a_verify_boot_job_needs_a_known_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in \\[sources\\]"):
        make_config(tmp_path, '[jobs.b]\ntype = "verify-boot"\nrepository = "r"\nsource = "nope"\n')


@pytest.mark.integration
@pytest.mark.slow
def test_the_daemon_verifies_boots_with_history_mail_screenshot_alert_and_recovery(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: tuple[int, MailSink],
    webhook_server: tuple[str, WebhookSink],
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    g = guest()
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    vm = tmp_path / "vms" / "web01"
    vm.mkdir(parents=True)
    shutil.copyfile(g.disk, vm / "guest.raw")
    with open(vm / "guest.raw", "r+b") as f:
        f.write(bytes(512))  # the first backup cannot boot
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass")
    backup(repo, FilesSource(str(vm)))
    port, mail = smtp_server
    url, hook = webhook_server
    config = make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "{vm}"

        [jobs.boot]
        type = "verify-boot"
        repository = "r"
        source = "web01"
        schedule = "0 4 * * sat"
        timeout = "4m"
        max_age = "8d"

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
        """,
    )
    clock = FakeClock(NOW)
    sched = Scheduler(config, clock=clock)
    clock.busy = lambda: bool(sched.running)

    sched.enqueue_now(config.jobs["boot"])
    sched.tick()
    sched.wait_idle(300)
    failed = sched.history.runs()[0]
    assert failed.status == FAILED, failed.error
    assert failed.error is not None and "did not boot (no-bootable-disk)" in failed.error
    assert failed.snapshot is not None
    shot = failed.details["screenshot"]
    assert shot.startswith(str(tmp_path / "screenshots")) and shot.endswith(".png")
    assert Path(shot).read_bytes().startswith(b"\x89PNG")
    assert failed.details["verify_boot"]["reason"] == "no-bootable-disk"

    # the mail names the reason and carries the screenshot; the webhook links it
    assert mail.received.wait(10) and len(mail.messages) == 1
    msg = mail.messages[0]
    assert msg["Subject"].startswith("[vmvault] FAILED: boot")
    pngs = [p for p in msg.iter_attachments() if p.get_content_type() == "image/png"]
    assert len(pngs) == 1 and pngs[0].get_content() == Path(shot).read_bytes()
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None and "no-bootable-disk" in body.get_content() and shot in body.get_content()
    _, doc = hook.posts[-1]
    assert doc["type"] == "verify-boot" and doc["details"]["screenshot"] == shot

    # with no successful boot verification for more than max_age, an alert
    clock.advance(9 * 86400)
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    alerts = [d for _h, d in hook.posts if d["kind"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["type"] == "verify-boot"
    assert "no successful boot verification on record" in alerts[0]["message"]

    # a bootable backup: success through guest-ping, the alert is cleared, the run says it recovered
    shutil.copyfile(g.disk, vm / "guest.raw")
    backup(repo, FilesSource(str(vm)))
    repo.close()
    clock.advance(60)
    sched.enqueue_now(config.jobs["boot"])
    sched.tick()
    sched.wait_idle(300)
    good = sched.history.runs()[0]
    assert good.status == SUCCESS, good.error
    assert good.details["verify_boot"]["reason"] == "agent"
    assert "boots: the guest agent answered guest-ping" in hook.posts[-1][1]["message"]
    recovered = hook.posts[-1][1]["recovered"]
    assert recovered is not None and recovered["failed_attempts"] == 1
    assert sorted(os.listdir(tmp_path / "screenshots")) == sorted(
        [Path(shot).name, Path(good.details["screenshot"]).name]
    )
    sched.close()
