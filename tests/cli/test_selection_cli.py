"""--vm/--host/--tag/--source on the commands that pick snapshots, and what ``latest`` means."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmvault.cli import EXIT

from .admin import env, make_vm, run, run_json

__all__ = ["env"]


@pytest.fixture()
def two_vms(env: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """web01 (tagged nightly, then nightly,keep from host other) and then db: the README's
    situation where `latest` used to mean db for everything."""
    web = make_vm(env / "vms", "web01", seed=1)
    db = make_vm(env / "vms", "db", seed=2)
    assert run(capsys, "init")[0] == 0
    ids = {}
    code, doc, _ = run_json(capsys, "backup", str(web), "--tag", "nightly")
    assert code == 0
    ids["web1"] = doc["snapshot"]
    code, doc, _ = run_json(capsys, "backup", str(web), "--tag", "nightly", "--tag", "keep", "--host", "other")
    assert code == 0
    ids["web2"] = doc["snapshot"]
    code, doc, _ = run_json(capsys, "backup", str(db))
    assert code == 0
    ids["db"] = doc["snapshot"]
    return ids


def test_snapshots_filters(two_vms: dict[str, str], env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run_json(capsys, "snapshots", "--vm", "web01")
    assert code == 0 and [s["id"] for s in doc] == [two_vms["web1"], two_vms["web2"]]
    code, doc, _ = run_json(capsys, "snapshots", "--vm", "web01", "--vm", "db")
    assert len(doc) == 3
    code, doc, _ = run_json(capsys, "snapshots", "--host", "other")
    assert [s["id"] for s in doc] == [two_vms["web2"]] and doc[0]["hostname"] == "other"
    code, doc, _ = run_json(capsys, "snapshots", "--tag", "nightly,keep")
    assert [s["id"] for s in doc] == [two_vms["web2"]]
    code, doc, _ = run_json(capsys, "snapshots", "--tag", "keep", "--tag", "nightly")
    assert len(doc) == 2
    code, doc, _ = run_json(capsys, "snapshots", "--source", str(env / "vms" / "db") + "/")
    assert [s["id"] for s in doc] == [two_vms["db"]]
    code, out, _ = run(capsys, "snapshots", "--vm", "nosuch")
    assert code == 0 and out.rstrip().endswith("0 snapshots")
    code, out, _ = run(capsys, "snapshots", "--vm", "db")
    assert out.rstrip().endswith("\n1 snapshot")


def test_latest_is_the_newest_matching_and_names_the_vm_it_picked(
    two_vms: dict[str, str], env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, err = run_json(capsys, "show", "latest")
    assert code == 0 and doc["id"] == two_vms["db"]
    assert "latest is snapshot" in err and "of VM db" in err and "2 VMs" in err and "--vm" in err
    code, doc, err = run_json(capsys, "show", "latest", "--vm", "web01")
    assert code == 0 and doc["id"] == two_vms["web2"] and "note" not in err
    code, doc, err = run_json(capsys, "show", "latest", "--vm", "web01", "--host", "h-none")
    assert code == EXIT["error"] and doc is None
    assert err.strip() == "vmvault: error: no snapshot matches vm web01, host h-none"
    # an id with a filter it contradicts is refused, not answered about another VM
    code, _out, err = run(capsys, "show", two_vms["db"][:8], "--vm", "web01")
    assert code == EXIT["error"] and "does not match vm web01" in err

    # the README's restore: with --vm it restores web01, not db
    code, doc, err = run_json(capsys, "restore", "latest", "--vm", "web01", "--target", str(env / "out"))
    assert code == 0 and doc["snapshot"] == two_vms["web2"]
    assert (env / "out" / "web01.raw").read_bytes() == (env / "vms" / "web01" / "web01.raw").read_bytes()
    assert not (env / "out" / "db.raw").exists()
    # and without it, says which VM latest was
    code, _out, err = run(capsys, "restore", "latest", "--target", str(env / "out2"))
    assert code == 0 and "of VM db" in err and (env / "out2" / "db.raw").exists()


def test_one_vm_needs_no_note(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web = make_vm(env / "vms", "web01")
    assert run(capsys, "init")[0] == 0
    assert run(capsys, "backup", str(web))[0] == 0
    code, _out, err = run(capsys, "show", "latest")
    assert code == 0 and err == ""


def test_filters_are_checked_like_every_argument(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["snapshots", "--vm", ""], ["snapshots", "--tag", "a,"], ["show", "latest", "--host", " "]):
        code, _out, err = run(capsys, *argv)
        assert code == EXIT["usage"], argv
        assert err.count("\n") == 2, err


def test_files_takes_the_filters_too(two_vms: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pytsk3")
    code, out, _err = run(capsys, "files", "ls", "latest", "web01.raw", "--vm", "web01")
    assert code == 0 and out.startswith("disk web01.raw")
    code, _out, err = run(capsys, "files", "ls", "latest", "web01.raw")  # latest is db's snapshot
    assert code == EXIT["usage"] and "of VM db" in err and "names no disk" in err
