"""Forged manifests and index files of an unencrypted repository, as its storage's
administrator could write them (checksums and names computed anew), against nine commands:
each must end with an exit code, never a traceback (vmvault.repo.snapshot, vmvault.shape).

Snapshots are changed by their structure (a field given another type or removed, a list
entry repeated or dropped), index files byte by byte. Seeded: a failure names its round, and
the same round fails again. This found the manifests of the wrong shape (show, ls, stats,
forget and diff failed with AttributeError, TypeError, ValueError).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli.admin import env, run  # noqa: F401  (env: the fixture)
from tests.conftest import CAMPAIGN_SCALE, RANDOM_EXAMPLES, mutate_json
from vmvault.repo.crypto import MasterKey, open_envelope, seal_envelope
from vmvault.sample_vm import make_disk

#: the rounds and their seed: fixed in the suite; a campaign (tests/conftest.py) draws a fresh
#: seed, named in a failure, and runs CAMPAIGN_SCALE times as many; ``VMVAULT_MANIFEST_FUZZ_SEED``
#: replays one
ROUNDS = 60 * CAMPAIGN_SCALE
SEED = int(os.environ.get("VMVAULT_MANIFEST_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if RANDOM_EXAMPLES else 29
)
#: every exit code README.md documents for a command that ran (not 130, not a traceback)
EXITS = {0, 1, 2, 3, 10, 12, 13}


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["flip", "int", "cut", "add"]) if out else "add"
        if kind == "flip":
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == "int":
            i, n = rng.randrange(max(1, len(out) - 8)), rng.choice([1, 2, 4, 8])
            value = rng.choice([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1])
            out[i : i + n] = value.to_bytes(8, rng.choice(["little", "big"]))[:n]
        elif kind == "cut":
            del out[rng.randrange(len(out)) :]
        else:
            out += rng.randbytes(rng.randint(1, 40))
    return bytes(out)


def _aad(folder: str, name: str) -> bytes:
    return b"snapshot" if folder == "snapshots" else f"index/{name}".encode()


def _forge(path: Path, change: Any) -> str:
    """Rewrite the object at ``path`` with ``change(plaintext)``, sealed and named as vmvault
    would; returns the new name."""
    folder, key = path.parent.name, MasterKey.unencrypted()
    payload = change(open_envelope(key, path.read_bytes(), _aad(folder, path.name), what=path.name))
    name = hashlib.sha256(payload).hexdigest()
    path.unlink()
    (path.parent / name).write_bytes(seal_envelope(key, payload, _aad(folder, name), compress=False))
    return name


def test_forged_manifests_and_index_files_end_every_command_with_an_exit_code(
    env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VMVAULT_PASSWORD")
    image = env / "web01.raw"
    make_disk(str(image), 2 << 20, seed=5)
    assert run(capsys, "init", "--insecure-no-encryption", "--chunk-size", "64K", "-q")[0] == 0
    assert run(capsys, "backup", str(image), "-q")[0] == 0
    make_disk(str(image), 2 << 20, seed=6)
    assert run(capsys, "backup", str(image), "-q")[0] == 0
    base = env / "repo.base"
    shutil.copytree(env / "repo", base)
    rng = random.Random(SEED)
    outcomes: dict[tuple[str, int], int] = {}
    for round_ in range(ROUNDS):
        shutil.rmtree(env / "repo")
        shutil.copytree(base, env / "repo")
        monkeypatch.setenv("XDG_CACHE_HOME", str(env / f"cache{round_}"))  # index files read anew
        snaps = sorted((env / "repo" / "snapshots").iterdir())
        if rng.random() < 0.6:
            victim = rng.choice(snaps)
            forged = _forge(victim, lambda p: json.dumps(mutate_json(json.loads(p), rng)).encode())
        else:
            victim = rng.choice(sorted((env / "repo" / "index").iterdir()))
            forged = _forge(victim, lambda p: _mutate_bytes(p, rng))
        named = forged[:8] if victim.parent.name == "snapshots" else "latest"
        ids = sorted(p.name[:8] for p in (env / "repo" / "snapshots").iterdir())
        target = env / f"out{round_}"
        target.mkdir()
        for argv in (
            ["snapshots"], ["show", named], ["ls", named], ["restore", named, "--target", str(target)],
            ["stats"], ["diff", *ids[:2]], ["forget", "--keep-last", "1", "--dry-run"], ["check", "--read-data"],
            ["repair", "snapshots", "--dry-run"],
        ):  # fmt: skip
            code, _out, err = run(capsys, *argv, "-q")
            assert code in EXITS and "Traceback" not in err, (SEED, round_, argv, code, err[-500:])
            outcomes[(argv[0], code)] = outcomes.get((argv[0], code), 0) + 1
        shutil.rmtree(target)
    # the forgeries were read: some commands succeeded, some found them unreadable
    assert outcomes.get(("show", 1), 0) > 0 and outcomes.get(("show", 0), 0) > 0, outcomes
