"""Notifications through a real SMTP server (aiosmtpd) and a real HTTP server: a failure
names every attempt and the first one's start; a recovery is told; mail is plain text and
HTML with the JSON attached; the webhook body is the documented document."""

from __future__ import annotations

import datetime as dt
import email.message
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.automation.conftest import MailSink, WebhookSink, make_config
from vmvault.automation.config import AutomationConfig, Job, NotifierConfig, load_config
from vmvault.automation.history import FAILED, SUCCESS
from vmvault.automation.notify import Notifier, Summary, send_all
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = '<script>alert(1)</script> & "quotes" <img src=x onerror=alert(2)>'


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hh, mm, ss, tzinfo=dt.UTC)


def mail_parts(msg: email.message.EmailMessage) -> tuple[str, str, dict[str, object]]:
    """The plain-text part, the HTML part and the attached JSON document."""
    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, rich = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain" and rich.get_content_type() == "text/html"
    assert attachment.get_content_type() == "application/json"
    assert attachment.get_filename() == "vmvault-summary.json" and attachment.is_attachment()
    assert "text/json" not in msg.as_string()
    doc = json.loads(attachment.get_content())
    return plain.get_content(), rich.get_content(), doc


@pytest.fixture
def daemon(
    tmp_path: Path, smtp_server: tuple[int, MailSink], webhook_server: tuple[str, WebhookSink]
) -> tuple[Scheduler, FakeClock, list[JobOutcome]]:
    port, _mail = smtp_server
    url, _hook = webhook_server
    make_config(
        tmp_path,
        f"""
        [jobs.web01]
        type = "backup"
        source = "/srv/vms/web01"
        repository = "r"
        schedule = "30 1 * * *"
        retries = 2
        retry_delay = "1m"
        max_age = "90s"

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
    # times are read in the configuration's zone: Berlin here, not the UTC of the clock
    path = tmp_path / "vmvault.toml"
    path.write_text(path.read_text().replace('timezone = "UTC"', 'timezone = "Europe/Berlin"'))
    config = load_config(path)
    outcomes: list[JobOutcome] = []
    clock = FakeClock(at(25, 10))

    def execute(_config: AutomationConfig, job: Job) -> JobOutcome:
        return outcomes.pop(0)

    sched = Scheduler(config, clock=clock, execute=execute)
    clock.busy = lambda: bool(sched.running)
    sched.start()
    return sched, clock, outcomes


def drive(sched: Scheduler, clock: FakeClock, *times: dt.datetime) -> None:
    for t in times:
        clock.advance(to=t)
        sched.tick()
        sched.wait_idle(30)


@pytest.mark.integration
def test_failure_names_every_attempt_then_the_recovery_is_told(
    daemon: tuple[Scheduler, FakeClock, list[JobOutcome]],
    smtp_server: tuple[int, MailSink],
    webhook_server: tuple[str, WebhookSink],
) -> None:
    sched, clock, outcomes = daemon
    _port, mail = smtp_server
    _url, hook = webhook_server
    outcomes += [
        JobOutcome(FAILED, error=f"storage unreachable {HOSTILE}", message="backup job web01 failed"),
        JobOutcome(FAILED, error="storage unreachable (2)", message="backup job web01 failed"),
        JobOutcome(FAILED, error="storage unreachable (3)", message="backup job web01 failed"),
    ]
    # 01:30 Berlin is 00:30 UTC; retries after 1 and 2 minutes
    drive(sched, clock, at(26, 0, 30), at(26, 0, 31, 5), at(26, 0, 33, 20))
    assert len(mail.messages) == 1 and len(hook.posts) == 1
    msg = mail.messages[0]
    assert msg["Subject"].startswith("[vmvault] FAILED: web01")
    plain, rich, doc = mail_parts(msg)
    assert doc == hook.posts[0][1]
    assert doc["start"] == "2026-11-26T00:30:00+00:00" and doc["end"] == "2026-11-26T00:33:20+00:00"
    assert doc["attempts"] == 3 and [r["attempt"] for r in doc["runs"]] == [1, 2, 3]
    assert [r["start"] for r in doc["runs"]] == [
        "2026-11-26T00:30:00+00:00",
        "2026-11-26T00:31:05+00:00",
        "2026-11-26T00:33:20+00:00",
    ]
    assert "started:     2026-11-26 01:30:00 CET (first attempt)" in plain  # the zone people read times in
    assert "ended:       2026-11-26 01:33:20 CET (after 3m 20s)" in plain
    assert "  1. 2026-11-26 01:30:00 CET, 0s: failed: storage unreachable <script>" in plain
    assert "  2. 2026-11-26 01:31:05 CET, 0s: failed: storage unreachable (2)" in plain
    assert "  3. 2026-11-26 01:33:20 CET, 0s: failed: storage unreachable (3)" in plain
    # the HTML part shows the same, with nothing from an error text active
    assert "<script>" not in rich and "<img" not in rich
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot; &lt;img src=x" in rich
    assert "2026-11-26 01:31:05 CET" in rich and "storage unreachable (3)" in rich
    assert "ALERT:       /srv/vms/web01 has no successful backup on record" in plain

    # the next night it works: a recovery, mailed to the failure-only list too
    outcomes.append(JobOutcome(SUCCESS, snapshot="ab" * 32, bytes=4096, message="backup of web01 saved"))
    drive(sched, clock, at(27, 0, 30))
    assert len(mail.messages) == 2
    assert mail.messages[1]["Subject"].startswith("[vmvault] RECOVERED: web01")
    plain, rich, doc = mail_parts(mail.messages[1])
    # its RPO (90 s) was missed by then too: the failure mail carried the alert, this clears it
    assert doc["status"] == SUCCESS and doc["recovered"] == {
        "failed_attempts": 3,
        "failing_since": "2026-11-26T00:30:00+00:00",
        "alert_cleared": "/srv/vms/web01 has no successful backup on record: it was first due "
        "2026-11-26 01:30:00 CET, 3m 20s ago, more than the allowed 1m 30s (max_age of job web01)",
    }
    assert "recovered:   after 3 failed attempts since 2026-11-26 01:30:00 CET" in plain
    assert "cleared:     ALERT: /srv/vms/web01 has no successful backup on record" in plain
    assert "every attempt" not in plain  # one good attempt: nothing to list
    assert hook.posts[-1][1]["recovered"]["failed_attempts"] == 3

    # a success after a success is not news to the failure list
    outcomes.append(JobOutcome(SUCCESS, message="backup of web01 saved"))
    drive(sched, clock, at(28, 0, 30))
    assert len(mail.messages) == 2 and hook.posts[-1][1]["recovered"] is None


@pytest.mark.integration
def test_an_alert_is_exact_and_its_end_is_told(
    daemon: tuple[Scheduler, FakeClock, list[JobOutcome]],
    smtp_server: tuple[int, MailSink],
    webhook_server: tuple[str, WebhookSink],
) -> None:
    """``max_age = "90s"`` used to read "last backed up 2 minutes ago, more than the allowed
    2 minutes"."""
    sched, clock, outcomes = daemon
    _port, mail = smtp_server
    _url, hook = webhook_server
    outcomes.append(JobOutcome(SUCCESS, message="backup of web01 saved"))
    drive(sched, clock, at(26, 0, 30))
    clock.advance(to=at(26, 0, 32, 3))
    sched.check_alerts(clock.now())
    sched.wait_idle(30)  # alerts are told in a thread of their own
    alert = hook.posts[-1][1]
    assert alert["kind"] == "alert" and alert["status"] == "alert"
    assert alert["message"] == (
        "/srv/vms/web01 was last backed up successfully 2026-11-26 01:30:00 CET, 2m 3s ago, "
        "more than the allowed 1m 30s (max_age of job web01)"
    )
    assert alert["alerts"][0]["last_success"] == "2026-11-26T00:30:00+00:00"
    assert alert["alerts"][0]["max_age"] == 90 and alert["alerts"][0]["age"] == 123
    assert mail.messages[-1]["Subject"].startswith("[vmvault] ALERT: web01")
    plain, _rich, _doc = mail_parts(mail.messages[-1])
    assert "2m 3s ago, more than the allowed 1m 30s" in plain

    outcomes.append(JobOutcome(SUCCESS, message="backup of web01 saved"))
    drive(sched, clock, at(27, 0, 30))
    assert mail.messages[-1]["Subject"].startswith("[vmvault] RECOVERED: web01")
    plain, _rich, doc = mail_parts(mail.messages[-1])
    assert doc["recovered"]["failed_attempts"] == 0 and "2m 3s ago" in doc["recovered"]["alert_cleared"]
    assert "cleared:     ALERT: /srv/vms/web01 was last backed up successfully" in plain


def test_the_webhook_payload_is_documented() -> None:
    """docs/automation.md lists every field of the JSON document, and no other."""
    doc = (ROOT / "docs" / "automation.md").read_text()
    section = doc[doc.index("### The notification document") :]
    section = section[: section.index("\n## ")]
    first_cells = re.findall(r"^\| (`[^|]*`) \|", section, re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}
    keys = set(Summary(kind="run", job="j", status=SUCCESS, message="").to_dict())
    assert documented == keys


def test_a_webhook_answering_without_end_is_not_read_to_its_end(webhook_server: tuple[str, WebhookSink]) -> None:
    """The answer's body is not wanted: a little of it is read, never more, so an endpoint that
    answers without end costs neither memory nor the daemon's time (it was read to its end)."""
    url, hook = webhook_server
    hook.status, hook.endless = 200, True
    notifier = Notifier(NotifierConfig(name="hook", type="webhook", on="always", url=url, timeout=10.0))
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(notifier.send, Summary(kind="run", job="j", status=SUCCESS, message="ok"))
        try:
            sending.result(timeout=10)
            sent = hook.sent
        finally:
            hook.endless = False  # lets a sender still reading end
    assert len(hook.posts) == 1
    assert sent < 64 << 20  # the socket buffers' worth, not the body


def test_a_webhook_answering_a_byte_at_a_time_is_given_up(webhook_server: tuple[str, WebhookSink]) -> None:
    """The timeout bounds each wait on the server: an endpoint sending a byte every tenth of a
    second never let it expire, and its 64 KiB were read for two hours while the job that
    notified counted as running. A notification now ends within six times its timeout."""
    url, hook = webhook_server
    hook.status, hook.trickle = 200, True
    notifier = Notifier(NotifierConfig(name="hook", type="webhook", on="always", url=url, timeout=1.0))
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send_all, [notifier], Summary(kind="run", job="j", status=SUCCESS, message="ok"))
        try:
            failures = sending.result(timeout=30)
        finally:
            hook.trickle = False  # lets a sender still reading end
    assert time.monotonic() - started < 15
    assert failures == ["notification hook (webhook) failed: not delivered within 6 s (the server answers too slowly); "
                        "given up"]  # fmt: skip
