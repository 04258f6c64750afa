"""Fixtures for automation tests: configs written to disk, a recording notifier, a fake clock."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.message
import email.policy
import http.server
import json
import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmvault.automation.config import AutomationConfig, NotifierConfig, load_config
from vmvault.automation.notify import Notifier, Summary

T0 = dt.datetime(2026, 11, 25, 10, 3, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def make_config(tmp_path: Path, body: str, *, concurrency: int = 1, max_jobs: int = 0) -> AutomationConfig:
    """A config with a UTC daemon section and one repository ``r`` (plus what ``body`` adds)."""
    text = textwrap.dedent(
        f"""\
            [daemon]
            concurrency = {concurrency}
            history = "{tmp_path / "history.sqlite"}"
            timezone = "UTC"

            [repositories.r]
            location = "{tmp_path / "repo"}"
            password_env = "VMVAULT_TEST_REPO_PW"
            max_jobs = {max_jobs}
            """
    ) + textwrap.dedent(body)
    path = tmp_path / "vmvault.toml"
    path.write_text(text)
    return load_config(path)


@contextlib.contextmanager
def host_zone(name: str) -> Iterator[None]:
    """The host's local time zone (``TZ``) set to ``name`` for the block."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


class RecordingNotifier(Notifier):
    """Keeps what it would send (the scheduler's logic under test, not delivery)."""

    def __init__(self) -> None:
        super().__init__(NotifierConfig(name="rec", type="webhook", on="always", url="http://unused.invalid/"))
        self.sent: list[Summary] = []

    def send(self, summary: Summary) -> None:
        self.sent.append(summary)


# ---- real servers on loopback ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MailSink:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.received = threading.Event()

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)  # the default policy builds these
        self.messages.append(msg)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.received.set()
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, MailSink]]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1, stopped after the test."""
    from aiosmtpd.controller import Controller

    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, sink
    finally:
        controller.stop()


class WebhookSink:
    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], Any]] = []
        self.status = 204
        #: answer with a body without end (what was sent is counted in ``sent``)
        self.endless = False
        self.sent = 0
        #: answer a byte every tenth of a second while set (a body announced as 1 GB)
        self.trickle = False


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, WebhookSink]]:
    """A real HTTP server (http.server in a thread) recording JSON POSTs."""
    sink = WebhookSink()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            sink.posts.append((dict(self.headers.items()), json.loads(body)))
            self.send_response(sink.status)
            if sink.trickle:
                self.send_header("Content-Length", str(10**9))
            self.end_headers()
            while sink.trickle:
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            while sink.endless:
                try:
                    self.wfile.write(bytes(1 << 20))
                except OSError:
                    return
                sink.sent += 1 << 20

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
