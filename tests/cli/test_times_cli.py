"""Times as the commands print them: local time with the zone (or UTC with --utc), ISO 8601
with an offset in every JSON document, durations never rounded up."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmvault.testing.hyperv_lab import LabHost

from .admin import env, make_vm, run, run_json

__all__ = ["env"]

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")


@pytest.fixture()
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


def all_times(doc: object) -> list[str]:
    """Every value of a key that names a time, anywhere in a JSON document."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("time", "created", "mtime", "started", "finished") and value is not None:
                found.append(value)
            found += all_times(value)
    elif isinstance(doc, list):
        for value in doc:
            found += all_times(value)
    return found


def test_people_read_local_time_with_its_zone(env: Path, tokyo: None, capsys: pytest.CaptureFixture[str]) -> None:
    vm = make_vm(env / "vms", "web01")
    assert run(capsys, "init")[0] == 0
    code, out, _err = run(capsys, "backup", str(vm))
    assert code == 0 and re.search(r" in \d+(\.\d+)?s$", out, re.M)  # "in 0.23s", not "in 1s"
    stamp = dt.datetime.now(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=9)))
    code, out, _err = run(capsys, "snapshots")
    assert f"{stamp:%Y-%m-%d} " in out and " JST " in out
    code, out, _err = run(capsys, "snapshots", "--utc")
    assert " UTC " in out and " JST " not in out
    code, out, _err = run(capsys, "show", "latest")
    assert re.search(r"^  time +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d JST$", out, re.M)
    code, out, _err = run(capsys, "key", "list")
    assert " JST" in out


def test_every_json_time_has_an_offset(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm = make_vm(env / "vms", "web01")
    assert run(capsys, "init")[0] == 0
    assert run(capsys, "backup", str(vm))[0] == 0
    for argv in (["snapshots"], ["show", "latest"], ["ls", "latest"], ["key", "list"], ["forget", "--keep-last", "1"]):
        code, doc, _err = run_json(capsys, *argv)
        assert code == 0, argv
        stamps = all_times(doc)
        assert stamps, argv
        assert all(isinstance(t, str) and ISO.match(t) for t in stamps), (argv, stamps)


def test_audit_json_gives_checkpoint_times_as_iso(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = LabHost(str(env / "host"))
    host.create_vm("web", (4 << 20,))
    host.checkpoint("web", "cp1")
    assert run(capsys, "init")[0] == 0
    _code, doc, _err = run_json(capsys, "audit", f"hyperv-lab://{host.root}")
    created = doc["vms"][0]["checkpoints"]["list"][0]["created"]
    assert isinstance(created, str) and ISO.match(created), created
