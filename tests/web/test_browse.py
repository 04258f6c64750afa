"""File-level browse and download in the dashboard: an ext4 guest disk backed up, its folders
listed as `vmvault files ls --json` lists them, a file downloaded byte for byte (operators
only, recorded), hostile names escaped, wrong locations clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fsimages import MiB, ext_image, guest_tree
from tests.web.conftest import REPO_PASS, Site
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors import open_source
from vmvault.repo.repository import Repository
from vmvault.web import browse

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")

HOSTILE = "<img src=x onerror=alert(7)>.txt"


@pytest.fixture
def guest(site: Site, tmp_path: Path) -> tuple[Site, str, Path]:
    """A VM folder whose one disk is a whole-disk ext4 filesystem, backed up into the site."""
    src = tmp_path / "guest-files"
    guest_tree(src)
    (src / HOSTILE).write_bytes(b"not a script\n")
    folder = site.root / "vms" / "files01"
    folder.mkdir(parents=True)
    ext_image(folder / "files01-disk0.raw", src, 8 * MiB)
    repo = Repository.open(LocalBackend(str(site.root / "repo")), REPO_PASS.encode())
    snap = backup(repo, open_source(str(folder))).snapshot
    repo.close()
    return site, snap.id, src


def _auth(site: Site, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {site.users.add_token(user, 'browse')[1]}"}


def test_browse_disks_volumes_and_folders(guest: tuple[Site, str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    site, snap, src = guest
    auth = _auth(site, "vera")
    url = f"/api/v1/snapshots/local/{snap[:12]}/files"
    disks = site.client.get(url, headers=auth).json()["disks"]
    assert [d["name"] for d in disks] == ["files01-disk0.raw"]
    disk = site.client.get(url, params={"loc": "files01-disk0.raw"}, headers=auth).json()
    assert disk["partition_table"] == "none" and disk["volumes"][0]["filesystem"] == "ext4"
    root = site.client.get(url, params={"loc": "files01-disk0.raw:/"}, headers=auth).json()
    names = {e["name"]: e for e in root["entries"]}
    assert {"hello.txt", "docs", "emptydir", HOSTILE} <= set(names)
    assert names["hello.txt"]["size"] == (src / "hello.txt").stat().st_size
    nested = site.client.get(url, params={"loc": "files01-disk0.raw:/docs/Deep/nested"}, headers=auth).json()
    assert [e["name"] for e in nested["entries"] if e["type"] == "file"] == ["file.bin"]
    # the same document as `vmvault files ls --json`
    from vmvault.cli import main

    assert main(["files", "ls", snap, "files01-disk0.raw:/", "-r", str(site.root / "repo"),
                 "--password-file", str(site.root / "repo.pass"), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == root
    # mistakes are clear errors
    for loc, status in (("nosuch.raw:/", 400), ("files01-disk0.raw:/nope", 404), ("files01-disk0.raw:7:/", 422)):
        r = site.client.get(url, params={"loc": loc}, headers=auth)
        assert r.status_code == status, (loc, r.text)


def test_download_is_for_operators_and_recorded(guest: tuple[Site, str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    site, snap, src = guest
    monkeypatch.setattr(browse, "PIECE", 64 * 1024)  # several pieces for the 300 KiB file
    url = f"/api/v1/snapshots/local/{snap}/download"
    loc = {"loc": "files01-disk0.raw:/docs/Deep/nested/file.bin"}
    assert site.client.get(url, params=loc).status_code == 401
    assert site.client.get(url, params=loc, headers=_auth(site, "vera")).status_code == 403
    r = site.client.get(url, params=loc, headers=_auth(site, "otto"))
    assert r.status_code == 200
    assert r.content == (src / "docs" / "Deep" / "nested" / "file.bin").read_bytes()
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == "attachment; filename=\"file.bin\"; filename*=UTF-8''file.bin"
    (action,) = [a for a in site.history.actions(action="download") if a.result == "done"]
    assert action.user == "otto" and action.target.endswith(":files01-disk0.raw:/docs/Deep/nested/file.bin")
    # not a file, or no path at all
    for bad, status in (("files01-disk0.raw:/docs", 404), ("files01-disk0.raw", 400)):
        assert site.client.get(url, params={"loc": bad}, headers=_auth(site, "otto")).status_code == status
    # a hostile name is a file like any other; its download name is made safe
    r = site.client.get(url, params={"loc": f"files01-disk0.raw:/{HOSTILE}"}, headers=_auth(site, "otto"))
    assert r.content == b"not a script\n"
    plain = re.search(r'filename="([^"]*)"', r.headers["content-disposition"])
    assert plain is not None and "<" in plain.group(1) and '"' not in plain.group(1)


def test_the_files_page(guest: tuple[Site, str, Path]) -> None:
    site, snap, _src = guest
    viewer = site.login("vera")
    page = viewer.get(f"/snapshots/local/{snap}/files", params={"loc": "files01-disk0.raw:/"})
    assert page.status_code == 200
    assert "hello.txt" in page.text and "&lt;img src=x onerror=alert(7)&gt;.txt" in page.text
    assert HOSTILE not in page.text
    assert "download" not in page.text.split("<table", 1)[1]  # no download links for a viewer
    operator = site.login("otto")
    page = operator.get(f"/snapshots/local/{snap}/files", params={"loc": "files01-disk0.raw:/"})
    assert 'class="download"' in page.text
    assert operator.get(f"/snapshots/local/{snap}").text.count("/files") >= 1


def test_names_that_are_not_utf8_are_shown_with_their_bytes() -> None:
    raw = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    assert browse.shown(raw) == "caf\\xe9.txt"
    assert browse.shown("café.txt") == "café.txt"
