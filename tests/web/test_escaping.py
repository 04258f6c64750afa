"""Names from VM folders, the storage and other hosts render inert everywhere, and no secret
(passphrase, password, hash, token) appears in any page, API answer or log line."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from tests.web.conftest import PASSWORDS, REPO_PASS, XSS, make_site
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors import open_source
from vmvault.repo.repository import Repository
from vmvault.repo.status import StatusRecord, write_status
from vmvault.sample_vm import make_sample_vm

EVIL_HOST = "<svg onload=alert(3)>"
EVIL_JOB = '<b onmouseover="alert(4)">job</b>'
EVIL_TAG = "<script>alert(2)</script>"
EVIL_FILE = "<iframe src=javascript:alert(5)>.conf"
PAYLOADS = (XSS, EVIL_HOST, EVIL_JOB, EVIL_TAG, "<iframe src=javascript:alert(5)>")

PAGES = ("/", "/jobs", "/history", "/repositories", "/snapshots", "/audit", "/fleet", "/activity", "/users", "/api")


def test_hostile_names_render_inert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    evil_source = tmp_path / "site" / "vms" / XSS
    site = make_site(
        tmp_path / "site",
        extra=f"""
        [jobs.'{EVIL_JOB}']
        type = "backup"
        source = "{tmp_path / "site" / "vms" / "gone" / XSS}"
        repository = "local"
        max_age = "1h"
        """,
    )
    make_sample_vm(str(evil_source), name="vm", disk_sizes=(1 << 20,), formats=("raw",))
    (evil_source / EVIL_FILE).write_text("x")
    repo = Repository.open(LocalBackend(str(site.root / "repo")), REPO_PASS.encode())
    snap = backup(repo, open_source(str(evil_source)), tags=[EVIL_TAG]).snapshot
    # another "host" reports into the repository with hostile names everywhere
    write_status(
        repo,
        StatusRecord(
            host=EVIL_HOST,
            time=dt.datetime.now(dt.UTC),
            jobs=[{"job": EVIL_JOB, "type": "backup", "status": "failed", "source": str(evil_source),
                   "last_run": {"status": "failed", "error": XSS, "start": "2026-01-01T00:00:00+00:00"}}],
            alerts=[{"job": EVIL_JOB, "message": XSS}],
            runs=[{"id": 1, "job": EVIL_JOB, "type": "backup", "status": "failed", "error": EVIL_TAG,
                   "start": dt.datetime.now(dt.UTC).isoformat()}],
        ),
    )  # fmt: skip
    repo.close()
    assert site.run(EVIL_JOB) == "failed"  # its error names the hostile path
    c = site.login("ada")
    with caplog.at_level(logging.DEBUG):
        for path in (*PAGES, f"/snapshots/local/{snap.id}"):
            page = c.get(path)
            assert page.status_code == 200, path
            for payload in PAYLOADS:
                assert payload not in page.text, (path, payload)
        overview = c.get("/").text
        assert "&lt;img src=x onerror=alert(1)&gt;" in overview
        assert "&lt;svg onload=alert(3)&gt;" in c.get("/fleet").text
        assert "&lt;script&gt;alert(2)&lt;/script&gt;" in c.get("/snapshots").text
        assert "&lt;b onmouseover=&#34;alert(4)&#34;&gt;job&lt;/b&gt;" in c.get("/jobs").text
        detail = c.get(f"/snapshots/local/{snap.id}").text
        assert "&lt;iframe src=javascript:alert(5)&gt;.conf" in detail
        # the API returns the names exactly, as JSON (which is inert in a JSON response)
        vms = c.get("/api/v1/vms").json()["vms"]
        assert XSS in [v["name"] for v in vms]
        hosts = [h["hostname"] for h in c.get("/api/v1/hosts").json()["hosts"]]
        assert EVIL_HOST in hosts
        assert c.get("/api/v1/vms").headers["content-type"] == "application/json"
    # the job's name went through the log escaped or not at all; never as markup that matters
    # here, but a log line is one line: no raw control characters
    assert all("\x1b" not in r.getMessage() for r in caplog.records)


def test_no_secret_in_pages_answers_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(tmp_path / "site")
    assert site.run("web01-nightly") == "success"
    record, token = site.users.add_token("ada", "monitoring")
    users_file = json.loads(Path(site.config.web.users).read_text())  # type: ignore[union-attr]
    secrets = [REPO_PASS, token, token.split("_")[-1], *PASSWORDS.values()]
    for u in users_file["users"].values():
        secrets += [u["password"]["hash"], u["password"]["salt"]] + [t["sha256"] for t in u["tokens"]]
    with caplog.at_level(logging.DEBUG):
        c = site.login("ada")
        session = c.cookies.get("vmvault_session")
        texts = []
        for path in PAGES:
            texts.append(c.get(path).text)
        auth = {"Authorization": f"Bearer {token}"}
        for path in ("/api/v1/vms", "/api/v1/jobs", "/api/v1/history", "/api/v1/repositories", "/api/v1/snapshots",
                     "/api/v1/hosts", "/api/v1/actions", "/api/v1/users", "/api/v1/whoami"):  # fmt: skip
            texts.append(site.client.get(path, headers=auth).text)
        # failed logins with a password typed into the user name field are not echoed back
        page = site.client.get("/login")
        texts.append(page.text)
        logs = "\n".join(r.getMessage() for r in caplog.records)
    assert session and all(session not in t for t in texts[1:])
    for secret in secrets:
        for text in (*texts, logs):
            assert secret not in text, secret[:6]
    # the activity log says who made a token, never the token
    assert record.id in json.dumps(site.client.get("/api/v1/users", headers=auth).json())
