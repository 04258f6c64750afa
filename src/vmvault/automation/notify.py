"""Notifications: one summary per job run (and per new alert), by e-mail (SMTP) or webhook.

A notification that cannot be delivered is logged and otherwise ignored: the daemon keeps
running, and the job's own status is not changed by it (the history tells the truth even
when the mail server is down).

The webhook body is the JSON document ``Summary.to_dict()`` (``Content-Type:
application/json``), POSTed once; the e-mail carries the same facts as text, plus the
JSON as an attachment-free second part for machines that read mail.
"""

from __future__ import annotations

import json
import logging
import smtplib
import socket
import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from vmvault import __version__
from vmvault.automation.config import NotifierConfig
from vmvault.automation.history import FAILED, INTERRUPTED, SUCCESS

__all__ = ["Notifier", "Summary", "send_all"]

log = logging.getLogger("vmvault.automation.notify")


@dataclass
class Summary:
    """What one run (or one alert) tells the people watching."""

    kind: str  # "run" or "alert"
    job: str
    status: str  # success | warning | failed | interrupted | alert
    message: str
    host: str = field(default_factory=socket.gethostname)
    job_type: str = ""
    start: str | None = None
    end: str | None = None
    attempts: int = 1
    snapshot: str | None = None
    bytes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_failure(self) -> bool:
        return self.status not in (SUCCESS,) or bool(self.alerts)

    def subject(self) -> str:
        word = {SUCCESS: "OK", FAILED: "FAILED", INTERRUPTED: "INTERRUPTED"}.get(self.status, self.status.upper())
        return f"[vmvault] {word}: {self.job} on {self.host}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "program": f"vmvault {__version__}",
            "kind": self.kind,
            "host": self.host,
            "job": self.job,
            "type": self.job_type,
            "status": self.status,
            "message": self.message,
            "start": self.start,
            "end": self.end,
            "attempts": self.attempts,
            "snapshot": self.snapshot,
            "bytes": self.bytes,
            "error": self.error,
            "details": self.details,
            "alerts": self.alerts,
        }

    def text(self) -> str:
        lines = [self.message, "", f"job:      {self.job} ({self.job_type or self.kind})", f"host:     {self.host}"]
        lines.append(f"status:   {self.status}")
        if self.start:
            lines.append(f"started:  {self.start}")
        if self.end:
            lines.append(f"ended:    {self.end}")
        if self.attempts > 1:
            lines.append(f"attempts: {self.attempts}")
        if self.snapshot:
            lines.append(f"snapshot: {self.snapshot}")
        if self.bytes is not None:
            lines.append(f"bytes:    {self.bytes}")
        if self.error:
            lines.append(f"error:    {self.error}")
        for a in self.alerts:
            lines.append(f"ALERT:    {a.get('message', a)}")
        for w in self.details.get("warnings", []):
            lines.append(f"warning:  {w}")
        return "\n".join(lines) + "\n"


class Notifier:
    def __init__(self, config: NotifierConfig) -> None:
        self.config = config

    def wants(self, summary: Summary) -> bool:
        return self.config.on == "always" or summary.is_failure

    def send(self, summary: Summary) -> None:
        """Deliver; raises OSError / smtplib.SMTPException / urllib errors on failure."""
        if self.config.type == "smtp":
            self._send_mail(summary)
        else:
            self._post(summary)

    def _send_mail(self, summary: Summary) -> None:
        c = self.config
        msg = EmailMessage()
        msg["Subject"] = summary.subject()
        msg["From"] = c.sender
        msg["To"] = ", ".join(c.recipients)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=summary.host or None)
        msg.set_content(summary.text())
        msg.add_alternative(json.dumps(summary.to_dict(), indent=2), subtype="json")
        smtp: smtplib.SMTP
        if c.security == "ssl":
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
        with smtp:
            if c.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if c.username:
                assert c.password_file is not None
                with open(c.password_file, encoding="utf-8") as f:
                    smtp.login(c.username, f.read().strip())
            smtp.send_message(msg)

    def _post(self, summary: Summary) -> None:
        c = self.config
        body = json.dumps(summary.to_dict()).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"vmvault/{__version__}"}
        headers.update(dict(c.headers))
        req = urllib.request.Request(c.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=c.timeout) as resp:
            resp.read()


def send_all(notifiers: Sequence[Notifier], summary: Summary) -> list[str]:
    """Send ``summary`` to each notifier that wants it; returns the failures (also logged)."""
    failures = []
    for n in notifiers:
        if not n.wants(summary):
            continue
        try:
            n.send(summary)
            log.info("notification %s sent for %s (%s)", n.config.name, summary.job, summary.status)
        except Exception as exc:  # whatever breaks in delivery must not stop the daemon
            text = f"notification {n.config.name} ({n.config.type}) failed: {exc}"
            log.error("%s", text)
            failures.append(text)
    return failures
