"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): log in, a VM turns red after a failed backup and green after a good one, a job's
progress reaches 100 % live, a restore with its confirmation, a viewer refused an operator
action, a VM named like an HTML tag renders as text (and no alert fires), log out.

Each page's screenshot is written into ``<pytest tmp>/screenshots``; with
``VMVAULT_UPDATE_SCREENSHOTS=1`` they are copied to ``docs/web/`` as well (the docs' images).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import PASSWORDS, XSS, Site, close_site, make_site
from vmvault.automation import scheduler as scheduler_module
from vmvault.automation.config import AutomationConfig, Job, WebSettings
from vmvault.automation.history import SUCCESS
from vmvault.automation.runner import JobOutcome
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.progress import ProgressReporter
from vmvault.hypervisors import open_source
from vmvault.repo.repository import Repository
from vmvault.sample_vm import make_sample_vm
from vmvault.web.server import Background, make_server

pytestmark = pytest.mark.integration

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra brings it)")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "web"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], None]:
    folder = tmp_path_factory.mktemp("screenshots")

    def take(driver: Any, name: str) -> None:
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        assert path.stat().st_size > 1000
        if os.environ.get("VMVAULT_UPDATE_SCREENSHOTS") == "1":
            DOCS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS / path.name)

    return take


def _driver(width: int = 1280, height: int = 900, *, phone: bool = False, extra: tuple[str, ...] = ()) -> Any:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing: apt-get install {package} (scripts/setup.sh installs it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="vmvault-chromium-")
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--window-size={width},{height}", *extra,
    ):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if phone:  # a desktop window cannot be this narrow; a phone's screen is emulated
        opts.add_experimental_option(
            "mobileEmulation", {"deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0}}
        )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.vmvault_profile = profile
    return driver


def _quit(driver: Any) -> None:
    driver.quit()
    shutil.rmtree(driver.vmvault_profile, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, str]]:
    """A site served by a real uvicorn on a loopback port; web01 not yet backed up, and a VM
    whose folder is named like an HTML image tag, backed up once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
        site = make_site(tmp_path_factory.mktemp("browser") / "site")
        # a bigger disk, so the backup's progress has steps to show
        shutil.rmtree(site.root / "vms" / "web01")
        make_sample_vm(str(site.root / "vms" / "web01"), name="web01", disk_sizes=(48 << 20,), formats=("raw",))
        evil = site.root / "vms" / XSS
        make_sample_vm(str(evil), name="vm", disk_sizes=(1 << 20,), formats=("raw",))
        repo = Repository.open(LocalBackend(str(site.root / "repo")), b"repository passphrase")
        backup(repo, open_source(str(evil)), tags=["<script>alert(2)</script>"])
        repo.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = Background(make_server(site.app.build(), WebSettings(), "127.0.0.1", port))
        server.start()
        try:
            yield site, f"http://127.0.0.1:{port}"
        finally:
            server.stop()
            close_site(site)


def _wait(driver: Any, cond: Callable[[Any], Any], timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)


def _login(driver: Any, base: str, user: str) -> None:
    driver.get(base + "/")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(PASSWORDS[user])
    driver.find_element(By.ID, "login").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "me"))
    assert driver.find_element(By.ID, "me").text.startswith(user)


def _vm_card(driver: Any, name: str) -> Any:
    cards = [c for c in driver.find_elements(By.CSS_SELECTOR, "article.vm") if c.get_attribute("data-vm") == name]
    assert len(cards) == 1, [c.get_attribute("data-vm") for c in driver.find_elements(By.CSS_SELECTOR, "article.vm")]
    return cards[0]


def _run_now(driver: Any, base: str, job: str, shots: Callable[[Any, str], None] | None = None) -> list[str]:
    """Press "Run now" on the Jobs page and watch the job's progress (updated by server-sent
    events, without reloading) until it finishes; returns what the progress text showed."""
    driver.get(base + "/jobs")
    button = next(
        b for b in driver.find_elements(By.CSS_SELECTOR, "button.run-now") if b.get_attribute("data-run") == job
    )
    button.click()
    _wait(driver, lambda d: d.find_elements(By.ID, "notice"))
    page = driver.find_element(By.TAG_NAME, "html")
    box = next(
        b for b in driver.find_elements(By.CSS_SELECTOR, "[data-progress]") if b.get_attribute("data-progress") == job
    )
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = box.find_element(By.CSS_SELECTOR, ".pct").text
        if not seen or seen[-1] != text:
            seen.append(text)
        if text.startswith("finished"):
            break
        time.sleep(0.05)
    assert page == driver.find_element(By.TAG_NAME, "html")  # the same page: no reload happened
    if shots is not None:
        shots(driver, f"jobs-{job}")
    return seen


def test_a_day_in_the_dashboard(live: tuple[Site, str], shots: Callable[[Any, str], None]) -> None:
    site, base = live
    d = _driver()
    try:
        d.get(base + "/login")
        shots(d, "login")
        _login(d, base, "otto")

        # the repository has not been verified and web01 never backed up: red, and why
        d.get(base + "/")
        card = _vm_card(d, "web01")
        assert card.get_attribute("data-state") == "red"
        assert "no successful backup on record" in card.text

        # a verification, run from the Jobs page
        assert _run_now(d, base, "verify-local")[-1] == "finished 100 % (success)"

        # a failed backup (the VM's folder is gone) turns it red, with the error
        away = site.root / "vms" / "web01.away"
        (site.root / "vms" / "web01").rename(away)
        assert _run_now(d, base, "web01-nightly")[-1].endswith("(failed)")
        d.get(base + "/")
        card = _vm_card(d, "web01")
        assert card.get_attribute("data-state") == "red"
        assert "last backup run (web01-nightly) failed" in card.text and "no such file or folder" in card.text
        shots(d, "overview-red")

        # a good backup turns it green; its progress reaches 100 % live on the Jobs page
        away.rename(site.root / "vms" / "web01")
        seen = _run_now(d, base, "web01-nightly", shots)
        assert seen[-1] == "finished 100 % (success)", seen
        status = next(c for c in d.find_elements(By.CSS_SELECTOR, "[data-status-of]")
                      if c.get_attribute("data-status-of") == "web01-nightly")  # fmt: skip
        assert status.text == "success"  # the last result follows too
        assert seen[0].startswith(("queued", "running")), seen
        d.get(base + "/")
        card = _vm_card(d, "web01")
        assert card.get_attribute("data-state") == "green", card.text
        assert "last good backup" in card.text
        shots(d, "overview")

        # a restore, with a confirmation naming exactly what happens
        d.get(base + "/snapshots?vm=web01")
        # a click that submits or follows a link returns before the next page is there: wait for it
        d.find_element(By.CSS_SELECTOR, "#snapshots tbody tr a").click()
        snap_id = _wait(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "dl.facts dd.mono"))[0].text
        shots(d, "snapshot")
        Select(d.find_element(By.CSS_SELECTOR, "select[name=target]")).select_by_visible_text("scratch")
        d.find_element(By.ID, "restore").click()
        confirmation = _wait(d, lambda drv: drv.find_elements(By.ID, "confirmation"))[0].text
        target = site.root / "restore"
        assert f"Restore snapshot {snap_id[:8]} of web01" in confirmation
        assert str(target / f"web01-{snap_id[:8]}-") in confirmation
        assert "web01-disk0.raw: raw, 48.0 MiB" in confirmation
        assert "(it must not exist)" in confirmation
        shots(d, "confirm-restore")
        assert not target.exists()  # nothing happens before the confirmation
        d.find_element(By.ID, "confirm").click()
        _wait(d, lambda drv: drv.find_elements(By.ID, "notice"))
        task = f"restore {snap_id[:8]}"
        _wait(
            d,
            lambda drv: any(
                b.get_attribute("data-progress") == task and "finished" in b.text
                for b in drv.find_elements(By.CSS_SELECTOR, "[data-progress]")
            ),
        )
        (folder,) = list(target.iterdir())
        restored = folder / "web01-disk0.raw"
        assert restored.read_bytes() == (site.root / "vms" / "web01" / "web01-disk0.raw").read_bytes()
        assert any(a.action == "restore" and a.user == "otto" and a.result == "done" for a in site.history.actions())

        # a VM named like an HTML tag is text, in the overview and the snapshot list
        d.get(base + "/")
        card = _vm_card(d, XSS)
        assert card.find_element(By.CSS_SELECTOR, ".vm-name").text == XSS
        assert not d.find_elements(By.CSS_SELECTOR, "img")  # no element was made from it
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert.text  # noqa: B018
        d.get(base + "/snapshots")
        assert XSS in [c.text for c in d.find_elements(By.CSS_SELECTOR, "#snapshots td.vm-name")]
        assert "<script>alert(2)</script>" in d.find_element(By.ID, "snapshots").text
        assert not d.find_elements(By.CSS_SELECTOR, "#snapshots img, #snapshots script")
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert.text  # noqa: B018
        shots(d, "snapshots")
        # statistics, recomputed on request
        d.get(base + "/repositories")
        d.find_element(By.CSS_SELECTOR, "button.refresh").click()
        _wait(d, lambda drv: drv.find_elements(By.ID, "notice"))
        assert d.find_element(By.CSS_SELECTOR, ".dedup").text.endswith("×")
        assert d.find_element(By.CSS_SELECTOR, "svg.chart")
        for name in ("history", "repositories", "audit", "fleet", "api"):
            d.get(f"{base}/{name}")
            assert d.find_elements(By.TAG_NAME, "h1")
            shots(d, name)

        # log out: the session is gone, pages ask for a login again
        d.find_element(By.ID, "logout").click()
        _wait(d, lambda drv: "/login" in drv.current_url)
        assert "You are logged out" in d.page_source
        d.get(base + "/jobs")
        assert "/login" in d.current_url
        assert not [e for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    finally:
        _quit(d)


def test_a_viewer_is_refused_an_operator_action(live: tuple[Site, str], shots: Callable[[Any, str], None]) -> None:
    site, base = live
    d = _driver()
    try:
        _login(d, base, "vera")
        d.get(base + "/jobs")
        assert d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
        assert not d.find_elements(By.CSS_SELECTOR, "button.run-now")  # no button to press
        snap = site.app.dashboard.snapshots()[0]["id"]
        d.get(f"{base}/snapshots/local/{snap}")
        assert not d.find_elements(By.ID, "restore")
        # going there anyway is refused
        d.get(f"{base}/snapshots/local/{snap}/restore?target=scratch")
        assert d.find_element(By.TAG_NAME, "h1").text == "Not allowed"
        assert "needs the operator role; you are viewer" in d.find_element(By.ID, "error-message").text
        shots(d, "refused")
        # and so is a request the page's own script could make (no CSRF token, viewer)
        status = d.execute_script(
            "return fetch('/api/v1/jobs/web01-nightly/run', {method: 'POST'}).then(r => r.status)"
        )
        assert status == 403
        assert any(a.user == "vera" and a.action == "denied" for a in site.history.actions())
        d.get(base + "/users")
        assert d.find_element(By.TAG_NAME, "h1").text == "Not allowed"
    finally:
        _quit(d)


def test_a_page_under_a_rebound_name_reaches_nothing(live: tuple[Site, str]) -> None:
    """DNS rebinding: a name of the attacker's resolves to the dashboard's address, so its page's
    script shares an origin with whatever answers there. The browser resolves ``rebound.test``
    to 127.0.0.1 here, as the attacker's DNS would once the page has loaded."""
    site, base = live
    port = base.rsplit(":", 1)[1]
    d = _driver(extra=("--host-resolver-rules=MAP rebound.test 127.0.0.1",))
    try:
        d.get(f"http://rebound.test:{port}/login")
        assert "does not answer to the name" in d.find_element(By.TAG_NAME, "body").text
        assert not d.find_elements(By.ID, "username")
        # what the attacker's script would send from that origin: guesses that would lock ada out
        statuses = d.execute_script(
            """
            const guess = () => fetch('/login', {method: 'POST', body: new URLSearchParams(
                {username: 'ada', password: 'guess', login_token: 'x', next: '/'})}).then(r => r.status);
            const all = [fetch('/api/v1/vms').then(r => r.status)];
            for (let i = 0; i < 6; i++) all.push(guess());
            return Promise.all(all);
            """
        )
        assert statuses == [421] * 7
    finally:
        _quit(d)
    assert not [a for a in site.history.actions(action="login") if a.user == "ada" and a.result != "ok"]
    d = _driver()
    try:
        _login(d, base, "ada")  # not locked out
    finally:
        _quit(d)


def test_admin_pages_and_a_phone(live: tuple[Site, str], shots: Callable[[Any, str], None]) -> None:
    _site, base = live
    d = _driver()
    try:
        _login(d, base, "ada")
        for name in ("activity", "users"):
            d.get(f"{base}/{name}")
            shots(d, name)
        assert "otto" in d.find_element(By.ID, "users").text
    finally:
        _quit(d)
    phone = _driver(390, 844, phone=True)
    try:
        _login(phone, base, "vera")
        phone.get(base + "/")
        assert phone.execute_script("return window.innerWidth") == 390
        width = phone.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the overview is {width} px wide on a 390 px phone"
        shots(phone, "phone-overview")
    finally:
        _quit(phone)


def test_a_running_job_is_stopped_with_its_stop_button(live: tuple[Site, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop appears while the job runs (server-sent events, no reload), and pressing it ends
    the run failed, naming who stopped it; then Stop goes away again."""
    site, base = live

    def execute_job(config: AutomationConfig, job: Job, progress: ProgressReporter) -> JobOutcome:
        progress.start("slow phase", 3000)
        for _ in range(3000):  # at most a minute
            progress.advance(1)
            time.sleep(0.02)
        return JobOutcome(SUCCESS, message="ran to its end")

    monkeypatch.setattr(scheduler_module, "execute_job", execute_job)
    job = "verify-local"

    def stop_form(dr: Any) -> Any:
        return next(
            f for f in dr.find_elements(By.CSS_SELECTOR, "form[data-stop-of]") if f.get_attribute("data-stop-of") == job
        )

    d = _driver()
    try:
        _login(d, base, "otto")
        d.get(base + "/jobs")
        assert not stop_form(d).is_displayed()
        run_now = [b for b in d.find_elements(By.CSS_SELECTOR, "button.run-now") if b.get_attribute("data-run") == job]
        run_now[0].click()
        _wait(d, lambda dr: dr.find_elements(By.ID, "notice"))  # the page after the redirect
        _wait(d, lambda dr: stop_form(dr).is_displayed())
        form = stop_form(d)
        form.find_element(By.CSS_SELECTOR, "button.cancel").click()
        _wait(d, lambda dr: "Asked to stop" in dr.find_element(By.ID, "notice").text)

        def finished(dr: Any) -> str | None:
            for box in dr.find_elements(By.CSS_SELECTOR, "[data-progress]"):
                if box.get_attribute("data-progress") == job and box.get_attribute("data-state") == "finished":
                    return str(box.find_element(By.CSS_SELECTOR, ".pct").text)
            return None

        assert _wait(d, finished).endswith("(failed)")
        form = stop_form(d)
        _wait(d, lambda _d: not form.is_displayed())
    finally:
        _quit(d)
    site.control.wait(30)
    run = site.history.runs(job=job, limit=1)[0]
    assert run.status == "failed" and run.error is not None and run.error.startswith("cancelled by otto")
