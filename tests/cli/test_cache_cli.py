"""``vmvault cache``: list this host's caches with their location, sizes and last use; remove
the ones named (exit 3 and nothing removed while a command holds one); clean those unused for
``--max-age`` days, with ``--dry-run`` removing nothing; a backup after a removal builds its
cache again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.cli import EXIT
from vmvault.repo.index_cache import hold_in_use

from .admin import env, make_vm, run, run_json

__all__ = ["env"]


def _cache() -> Path:
    return Path(os.environ["VMVAULT_CACHE_DIR"])


def _vmvault(*argv: str) -> None:
    """``vmvault ARGV`` in a process of its own, which ends (and so leaves the cache unused) as
    a command does: one run in this process keeps its repository open (and its cache in use)."""
    done = subprocess.run([sys.executable, "-m", "vmvault", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _backed_up(env: Path, name: str = "web01", *repo: str) -> None:
    _vmvault("backup", *repo, str(make_vm(env / "vms", name, seed=len(name))))


def test_list_remove_and_build_again(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _vmvault("init")
    _backed_up(env)
    code, doc, _ = run_json(capsys, "cache")
    assert code == 0 and doc["root"] == str(_cache())
    (entry,) = doc["caches"]
    assert entry["location"] == str(env / "repo") and entry["in_use"] is False
    assert set(entry["sizes"]) == {"index", "snapshots", "blocks"}
    assert doc["bytes"] == entry["bytes"] == sum(entry["sizes"].values())
    code, text, _ = run(capsys, "cache", "list")
    assert code == 0 and entry["repository"] in text and str(env / "repo") in text and "1 cache," in text

    code, text, err = run(capsys, "cache", "remove", "0123456789abcdef")
    assert code == EXIT["usage"] and "no cache of" in err

    code, doc, _ = run_json(capsys, "cache", "remove", entry["repository"][:8])
    assert code == 0 and [e["name"] for e in doc["removed"]] == [entry["name"]]
    assert run_json(capsys, "cache")[1]["caches"] == []
    _backed_up(env, "db")  # builds the cache again from the repository
    (again,) = run_json(capsys, "cache")[1]["caches"]
    assert again["name"] == entry["name"]
    code, doc, _ = run_json(capsys, "snapshots")
    assert code == 0 and len(doc) == 2


def test_a_cache_in_use_is_left(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _vmvault("init")
    _backed_up(env)
    (entry,) = run_json(capsys, "cache")[1]["caches"]
    held = hold_in_use(str(_cache() / "index" / f"{entry['name']}.sqlite"))
    assert held is not None
    try:
        before = sorted(p for p in _cache().rglob("*"))
        assert run_json(capsys, "cache")[1]["caches"][0]["in_use"] is True
        code, text, _ = run(capsys, "cache", "remove", "--all")
        assert code == EXIT["problems"] and "a running command uses it" in text and "1 cache left" in text
        assert sorted(p for p in _cache().rglob("*")) == before
    finally:
        os.close(held)
    code, doc, _ = run_json(capsys, "cache", "remove", "--all")
    assert code == 0 and len(doc["removed"]) == 1 and doc["left"] == 0


def test_clean_removes_what_was_unused_for_max_age_days(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _vmvault("init")
    _backed_up(env)
    (entry,) = run_json(capsys, "cache")[1]["caches"]
    # a second repository, last used 40 days ago
    _vmvault("init", "-r", str(env / "old-repo"))
    _backed_up(env, "old", "-r", str(env / "old-repo"))
    old = next(e for e in run_json(capsys, "cache")[1]["caches"] if e["name"] != entry["name"])
    stamp = os.path.getmtime(env / "repo") - 40 * 86400
    for path in _cache().rglob(f"{old['name']}*"):
        for item in [path, *path.rglob("*")]:
            os.utime(item, (stamp, stamp), follow_symlinks=False)

    code, doc, _ = run_json(capsys, "cache", "clean", "--dry-run")
    assert code == 0 and doc["dry_run"] and [e["name"] for e in doc["removed"]] == [old["name"]]
    assert len(run_json(capsys, "cache")[1]["caches"]) == 2
    code, _, err = run(capsys, "snapshots")
    assert code == 0 and "note" not in err  # not on a terminal: scripts and cron hear nothing of it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.stderr, "isatty", lambda: True)
        code, _, err = run(capsys, "snapshots")
        assert code == 0 and "1 cache of repositories unused for 30 days" in err and "`vmvault cache clean`" in err
        assert "note" not in run(capsys, "snapshots", "--json")[2]
    code, text, _ = run(capsys, "cache", "clean", "--max-age", "50")
    assert code == 0 and "0 caches removed" in text
    code, text, _ = run(capsys, "cache", "clean")
    assert code == 0 and f"removed {old['name']}" in text and "1 cache removed" in text
    assert [e["name"] for e in run_json(capsys, "cache")[1]["caches"]] == [entry["name"]]
    assert run(capsys, "cache", "clean", "--max-age", "-1")[0] == EXIT["usage"]


def test_a_blocks_limit_that_is_no_size_is_a_usage_error(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _vmvault("init")
    monkeypatch.setenv("VMVAULT_CACHE_BLOCKS", "a lot")
    code, _, err = run(capsys, "snapshots")
    assert code == EXIT["usage"] and "VMVAULT_CACHE_BLOCKS='a lot' is no size" in err and "Traceback" not in err


def test_a_cache_folder_that_cannot_be_used_is_a_clear_error(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = env / "cache-file"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(not_a_folder))
    for argv in (("cache",), ("cache", "clean"), ("cache", "remove", "--all")):
        code, _, err = run(capsys, *argv)
        assert code == EXIT["usage"] and "cannot be used" in err and "Traceback" not in err
    assert not_a_folder.read_text() == "a file"
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(env / "none-yet"))
    code, text, _ = run(capsys, "cache")
    assert code == 0 and text.startswith("0 caches, 0 B") and not (env / "none-yet").exists()
