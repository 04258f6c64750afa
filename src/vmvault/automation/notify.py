"""Notifications: one summary per job run (and per new alert), by e-mail (SMTP) or webhook.

A notification that cannot be delivered is logged and otherwise ignored: the daemon keeps
running, and the job's own status is not changed by it (the history tells the truth even
when the mail server is down).

The webhook body is the JSON document ``Summary.to_dict()`` (``Content-Type:
application/json``; docs/automation.md lists every field), POSTed once. The e-mail is a
``multipart/alternative`` of a plain-text and an HTML rendering of the same facts (times in
the configuration's zone, durations exact), with the JSON document attached as
``vmvault-summary.json`` for programs that read mail, and a boot verification's screenshot
(its path is in ``details.screenshot``) attached as a PNG. Everything in the HTML part that came
from a configuration, a source or an error text is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import smtplib
import socket
import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from vmvault import __version__, platform
from vmvault.automation.config import NotifierConfig
from vmvault.automation.history import FAILED, INTERRUPTED, SUCCESS, WARNING
from vmvault.automation.times import duration, local_time
from vmvault.waits import within

__all__ = ["Notifier", "Summary", "attempt_record", "send_all"]

log = logging.getLogger("vmvault.automation.notify")


def attempt_record(
    attempt: int, start: dt.datetime, end: dt.datetime, status: str, error: str | None
) -> dict[str, Any]:
    """One attempt of a run, as a summary lists it (``runs``)."""
    return {
        "attempt": attempt,
        "start": start.isoformat(timespec="seconds"),
        "end": end.isoformat(timespec="seconds"),
        "seconds": round((end - start).total_seconds(), 3),
        "status": status,
        "error": error,
    }


@dataclass
class Summary:
    """What one run (or one alert) tells the people watching."""

    kind: str  # "run" or "alert"
    job: str
    status: str  # success | warning | failed | interrupted | alert
    message: str
    host: str = field(default_factory=socket.gethostname)
    job_type: str = ""
    #: the first attempt's start and the last attempt's end (ISO 8601)
    start: str | None = None
    end: str | None = None
    attempts: int = 1
    snapshot: str | None = None
    bytes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    #: every attempt of the run, first to last (``attempt_record``)
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: set when a failing job succeeded again (``status.Recovery.to_dict()``)
    recovered: dict[str, Any] | None = None
    #: the zone people read times in (the configuration's ``timezone``; None: the host's)
    tz: dt.tzinfo | None = field(default=None, repr=False, compare=False)

    @property
    def is_failure(self) -> bool:
        return self.status not in (SUCCESS,) or bool(self.alerts)

    def subject(self) -> str:
        word = {SUCCESS: "OK", FAILED: "FAILED", INTERRUPTED: "INTERRUPTED"}.get(self.status, self.status.upper())
        if self.recovered is not None and self.status in (SUCCESS, WARNING):
            word = "RECOVERED"
        stopped = self.details.get("cancelled") or self.details.get("retries_cancelled")
        if self.status == FAILED and isinstance(stopped, dict) and stopped.get("by") not in ("time_limit", "window"):
            word = "CANCELLED"  # somebody stopped it (still a failed run: it did not do its work)
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
            "runs": self.runs,
            "snapshot": self.snapshot,
            "bytes": self.bytes,
            "error": self.error,
            "recovered": self.recovered,
            "details": self.details,
            "alerts": self.alerts,
        }

    # ---- renderings ---------------------------------------------------------------------------

    def _time(self, iso: str | None) -> str:
        return local_time(dt.datetime.fromisoformat(iso), self.tz) if iso else "-"

    def facts(self) -> list[tuple[str, str]]:
        """(label, value) pairs both renderings show, in order."""
        rows = [("job", f"{self.job} ({self.job_type or self.kind})"), ("host", self.host), ("status", self.status)]
        if self.start:
            first = " (first attempt)" if self.attempts > 1 else ""
            rows.append(("started", self._time(self.start) + first))
        if self.end:
            took = ""
            if self.start:
                seconds = (dt.datetime.fromisoformat(self.end) - dt.datetime.fromisoformat(self.start)).total_seconds()
                took = f" (after {duration(seconds)})"
            rows.append(("ended", self._time(self.end) + took))
        if self.attempts > 1:
            rows.append(("attempts", str(self.attempts)))
        catch_up = self.details.get("catch_up")
        if isinstance(catch_up, dict) and catch_up.get("missed_firing"):
            missed = self._time(catch_up["missed_firing"])
            rows.append(("caught up", f"the firing due {missed}, missed while no daemon ran"))
        if self.recovered is not None:
            failed = self.recovered.get("failed_attempts") or 0
            if failed:
                rows.append(
                    (
                        "recovered",
                        f"after {failed} failed attempt{'s' if failed != 1 else ''} since "
                        f"{self._time(self.recovered.get('failing_since'))}",
                    )
                )
            if self.recovered.get("alert_cleared"):
                rows.append(("cleared", f"ALERT: {self.recovered['alert_cleared']}"))
        if self.snapshot:
            rows.append(("snapshot", self.snapshot))
        if self.bytes is not None:
            rows.append(("bytes added", str(self.bytes)))
        if self.error:
            rows.append(("error", self.error))
        if isinstance(self.details.get("screenshot"), str):
            rows.append(("screenshot", self.details["screenshot"]))
        for a in self.alerts:
            rows.append(("ALERT", str(a.get("message", a))))
        for w in self.details.get("warnings", []):
            rows.append(("warning", str(w)))
        return rows

    def attempt_lines(self) -> list[tuple[str, str, str, str, str]]:
        """(number, start, took, status, error) for each attempt, when there were several or
        the run failed (a failure mail shows every attempt)."""
        if len(self.runs) < 2 and self.status in (SUCCESS, WARNING):
            return []
        return [
            (
                str(r.get("attempt", "?")),
                self._time(r.get("start")),
                duration(float(r.get("seconds") or 0.0)),
                str(r.get("status", "")),
                str(r.get("error") or ""),
            )
            for r in self.runs
        ]

    def text(self) -> str:
        lines = [self.message, ""]
        for label, value in self.facts():
            lines.append(f"{label + ':':<13}{value}")
        attempts = self.attempt_lines()
        if attempts:
            lines += ["", "every attempt:"]
            for number, start, took, status, error in attempts:
                lines.append(f"  {number}. {start}, {took}: {status}" + (f": {error}" if error else ""))
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        colour = {SUCCESS: "#1a7f37", WARNING: "#9a6700", FAILED: "#cf222e", INTERRUPTED: "#cf222e"}.get(
            self.status, "#cf222e"
        )
        if self.recovered is not None and self.status in (SUCCESS, WARNING):
            colour = "#1a7f37"
        out = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8"><title>' + e(self.subject()) + "</title></head>",
            '<body style="font-family: sans-serif; font-size: 14px">',
            f'<p style="font-size: 16px; color: {colour}"><strong>{e(self.message)}</strong></p>',
            '<table style="border-collapse: collapse">',
        ]
        for label, value in self.facts():
            out.append(
                '<tr><th style="text-align: left; vertical-align: top; padding: 2px 12px 2px 0">'
                f'{e(label)}</th><td style="padding: 2px 0">{e(value)}</td></tr>'
            )
        out.append("</table>")
        attempts = self.attempt_lines()
        if attempts:
            out.append("<p><strong>Every attempt</strong></p>")
            out.append('<table style="border-collapse: collapse">')
            cell = 'style="text-align: left; padding: 2px 12px 2px 0"'
            out.append("<tr>" + "".join(f"<th {cell}>{h}</th>" for h in ("#", "started", "took", "status", "error")))
            out[-1] += "</tr>"
            for row in attempts:
                out.append("<tr>" + "".join(f'<td style="padding: 2px 12px 2px 0">{e(c)}</td>' for c in row) + "</tr>")
            out.append("</table>")
        out.append(f'<p style="color: #57606a">vmvault {e(__version__)} on {e(self.host)}</p>')
        out.append("</body></html>")
        return "\n".join(out) + "\n"


class Notifier:
    def __init__(self, config: NotifierConfig) -> None:
        self.config = config

    def wants(self, summary: Summary) -> bool:
        """``always``: every summary; ``failure``: failed, warning and interrupted runs,
        alerts, and the recovery that ends them (whoever heard of a failure hears it is over)."""
        return self.config.on == "always" or summary.is_failure or summary.recovered is not None

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
        msg.add_alternative(summary.html(), subtype="html")
        msg.add_attachment(
            json.dumps(summary.to_dict(), indent=2).encode(),
            maintype="application",
            subtype="json",
            filename="vmvault-summary.json",
        )
        shot = _screenshot(summary)
        if shot is not None:
            msg.add_attachment(shot[1], maintype="image", subtype="png", filename=shot[0])
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
            resp.read(MAX_ANSWER)  # the answer is not wanted, nor read to an end it may not have


#: what of a webhook's answer is read
MAX_ANSWER = 64 << 10

#: the largest screenshot attached to a mail (a bigger one is only named)
MAX_ATTACHMENT = 4 << 20


def _screenshot(summary: Summary) -> tuple[str, bytes] | None:
    """(file name, PNG) of the run's screenshot (a boot verification's), when it can be read."""
    path = summary.details.get("screenshot")
    if not isinstance(path, str):
        return None
    try:
        fd = platform.open_nofollow(path, os.O_RDONLY | platform.O_CLOEXEC | platform.O_BINARY)
    except OSError as exc:
        log.warning("the screenshot %s is not attached: %s", path, exc.strerror)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_ATTACHMENT + 1)
    if len(data) > MAX_ATTACHMENT or not data.startswith(b"\x89PNG"):
        log.warning("the screenshot %s is not attached: not a PNG of at most %d bytes", path, MAX_ATTACHMENT)
        return None
    return os.path.basename(path), data


#: a notification is given up after this many times its ``timeout`` in all: the timeout bounds
#: each wait on the server, and a server sending a byte now and then never lets one expire
TOTAL_TIMEOUTS = 6


def send_all(notifiers: Sequence[Notifier], summary: Summary) -> list[str]:
    """Send ``summary`` to each notifier that wants it; returns the failures (also logged).
    Each delivery ends within ``TOTAL_TIMEOUTS`` times its timeout: one still going on then is
    left to its thread and counted as failed."""
    failures = []
    for n in notifiers:
        if not n.wants(summary):
            continue
        try:
            _deliver(n, summary)
            log.info("notification %s sent for %s (%s)", n.config.name, summary.job, summary.status)
        except Exception as exc:  # whatever breaks in delivery must not stop the daemon
            text = f"notification {n.config.name} ({n.config.type}) failed: {exc}"
            log.error("%s", text)
            failures.append(text)
    return failures


def _deliver(notifier: Notifier, summary: Summary) -> None:
    seconds = TOTAL_TIMEOUTS * notifier.config.timeout
    within(
        seconds,
        lambda: notifier.send(summary),
        name=f"vmvault-notify-{notifier.config.name}",
        late=lambda: TimeoutError(f"not delivered within {seconds:g} s (the server answers too slowly); given up"),
    )
