"""A dashboard "site" for web tests: a real repository, VM folders, a configuration with
backup, verify and failing jobs, a history, users of every role, and the application."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmvault.automation.config import AutomationConfig, load_config
from vmvault.automation.history import History
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository
from vmvault.sample_vm import make_sample_vm

pytest.importorskip("starlette", reason="the web extra is not installed: pip install 'vmvault[web]'")

from starlette.testclient import TestClient

from vmvault.web.app import WebApp
from vmvault.web.jobs import StandaloneControl
from vmvault.web.users import UserStore

PASSWORDS = {"ada": "admin-pass-1", "otto": "operator-pass-1", "vera": "viewer-pass-1"}
ROLES = {"ada": "admin", "otto": "operator", "vera": "viewer"}
REPO_PASS = "repository passphrase"
#: the name a VM folder may have when someone wants it to run script in a dashboard
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def write_config(root: Path, *, extra: str = "", web: str = "") -> Path:
    vms = root / "vms"
    text = textwrap.dedent(
        f"""\
        [daemon]
        history = "{root / "state" / "history.sqlite"}"
        timezone = "UTC"
        concurrency = 2

        [repositories.local]
        location = "{root / "repo"}"
        password_file = "{root / "repo.pass"}"

        [sources.web01]
        location = "{vms / "web01"}"

        [jobs.web01-nightly]
        type = "backup"
        source = "web01"
        repository = "local"
        schedule = "30 1 * * *"
        max_age = "26h"

        [jobs.db01-hourly]
        type = "backup"
        source = "{vms / "db01"}"
        repository = "local"
        schedule = "0 * * * *"
        max_age = "3h"

        [jobs.verify-local]
        type = "verify"
        repository = "local"
        schedule = "0 3 * * sun"
        read_data = true

        [web]
        users = "{root / "users.json"}"
        audit = ["{vms}"]
        {web}

        [web.restore_targets]
        scratch = "{root / "restore"}"
        """
    ) + textwrap.dedent(extra)
    path = root / "vmvault.toml"
    path.write_text(text)
    return path


@dataclass
class Site:
    root: Path
    config: AutomationConfig
    history: History
    users: UserStore
    control: StandaloneControl
    app: WebApp
    client: TestClient

    def vm_folder(self, name: str, *, size: int = 2 << 20) -> Path:
        folder = self.root / "vms" / name
        make_sample_vm(str(folder), name=name if "<" not in name else "vm", disk_sizes=(size,), formats=("raw",))
        return folder

    def run(self, job: str) -> str:
        """Run a job now, as the dashboard does, and wait for it; returns its status."""
        self.control.run_now(self.config.jobs[job], "test")
        self.control.wait(120)
        state = self.control.board.state(job)
        assert state is not None and state.status is not None
        return state.status

    def login(self, user: str, client: TestClient | None = None) -> TestClient:
        c = client or TestClient(self.app.build(), base_url="http://127.0.0.1:8620")
        page = c.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token is not None
        r = c.post(
            "/login",
            data={"username": user, "password": PASSWORDS[user], "login_token": token.group(1), "next": "/"},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        return c

    def csrf(self, client: TestClient) -> str:
        m = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/jobs").text)
        assert m is not None
        return m.group(1)


def make_site(root: Path, *, extra: str = "", web: str = "") -> Site:
    root.mkdir(parents=True, exist_ok=True)
    (root / "repo.pass").write_text(REPO_PASS + "\n")
    Repository.init(LocalBackend(str(root / "repo")), REPO_PASS.encode())
    make_sample_vm(str(root / "vms" / "web01"), name="web01", disk_sizes=(2 << 20,), formats=("raw",))
    config = load_config(write_config(root, extra=extra, web=web))
    history = History(config.daemon.history)
    assert config.web is not None
    users = UserStore(config.web.users)
    for name, role in ROLES.items():
        users.add(name, role, PASSWORDS[name])
    control = StandaloneControl(config, history)
    app = WebApp(config, history, users, control)
    client = TestClient(app.build(), base_url="http://127.0.0.1:8620")
    return Site(root, config, history, users, control, app, client)


def close_site(s: Site) -> None:
    s.control.wait(60)
    s.app.actions.wait(60)
    for view in s.app.dashboard.repos.values():
        view.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = make_site(tmp_path / "site")
    yield s
    close_site(s)


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site (shared by a module's tests) after one good backup of web01, one failed backup
    of db01 and one verification."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
        s = make_site(tmp_path_factory.mktemp("web") / "site")
        assert s.run("web01-nightly") == "success"
        assert s.run("db01-hourly") == "failed"
        assert s.run("verify-local") == "success"
        yield s
        close_site(s)
