"""A snapshot manifest rewritten by whoever can write the repository (here: an unencrypted one,
whose checksums and object names anyone can compute; with encryption, any host holding the
key): every command reports the snapshot as unreadable and goes on with the others, never a
traceback (vmvault.repo.snapshot)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.cli.admin import env, run  # noqa: F401  (env: the fixture)
from vmvault.backends.local import LocalBackend
from vmvault.repo.crypto import open_envelope, seal_envelope
from vmvault.repo.repository import Repository
from vmvault.sample_vm import make_disk

#: a manifest nested deeper than the JSON parser goes (a RecursionError, which escaped as a
#: traceback where a ValueError was expected)
NESTED: dict[str, object] = {"nested": True}


def _forge(repo_path: Path, snap_id: str, change: dict[str, object]) -> str:
    """Rewrite snapshot ``snap_id`` with ``change`` applied to its document and its first disk
    (keys ``disk.NAME``), as an attacker would: checksum and name computed anew."""
    repo = Repository.open(LocalBackend(str(repo_path)), None)
    name = f"snapshots/{snap_id}"
    doc = json.loads(open_envelope(repo.key, repo.backend.get(name), b"snapshot", what=name))
    for key, value in change.items():
        if key.startswith("disk."):
            doc["disks"][0][key[5:]] = value
        else:
            doc[key] = value
    payload = b"[" * 60000 if change == NESTED else json.dumps(doc).encode()
    forged = hashlib.sha256(payload).hexdigest()
    repo.backend.put(f"snapshots/{forged}", seal_envelope(repo.key, payload, b"snapshot"))
    repo.backend.delete(name)
    return forged


@pytest.mark.parametrize(
    "change",
    [
        {"source": 1.5},  # stats, forget: 'float' object has no attribute 'get'
        {"time": "x"},  # show, ls: Invalid isoformat string
        {"disk.stats": {"bytes_read": []}},  # show: bad operand type for abs()
        {"disk.size": 1 << 70},
        NESTED,
    ],
    ids=["source", "time", "disk-stats", "disk-size", "nested"],
)
def test_a_forged_manifest_is_reported_unreadable_by_every_command(
    env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, object],
) -> None:
    monkeypatch.delenv("VMVAULT_PASSWORD")
    repo = env / "repo"
    image = env / "web01.raw"
    make_disk(str(image), 1 << 20, seed=3)
    assert run(capsys, "init", "--insecure-no-encryption", "-q")[0] == 0
    assert run(capsys, "backup", str(image), "-q")[0] == 0
    assert run(capsys, "backup", str(image), "-q")[0] == 0
    code, out, _ = run(capsys, "snapshots", "--json")
    first, second = (s["id"] for s in json.loads(out))
    forged = _forge(repo, first, change)
    (env / "out").mkdir()
    why = "JSON nested too deeply" if change == NESTED else "unreadable manifest: "
    unreadable = f"snapshot {forged[:8]}: {why}"
    for argv, expected, says in (
        (["snapshots"], 3, "1 snapshot\n"),  # the other one listed
        (["show", forged[:8]], 1, unreadable),
        (["ls", forged[:8]], 1, unreadable),
        (["restore", forged[:8], "--target", str(env / "out")], 1, unreadable),
        (["diff", forged[:8], second[:8]], 1, unreadable),
        (["stats"], 3, f"1 unreadable snapshot not counted ({forged[:8]})"),
        (["forget", "--keep-last", "1", "--dry-run"], 0, "1 unreadable snapshot not judged"),
        (["check"], 3, f"snapshots: {forged[:8]}"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == expected and says in err + out and "Traceback" not in err, (argv, code, err, out)
    # the untouched snapshot is still there for every command
    code, out, err = run(capsys, "restore", second[:8], "--target", str(env / "out"), "-q")
    assert code == 0, err
    assert (env / "out" / "web01.raw").read_bytes() == image.read_bytes()
