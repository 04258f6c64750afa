"""Whoever writes an encrypted repository's storage, without its key: objects deleted, bits
flipped, cut, extended, exchanged, copied over one another or under new names, and objects a
prune removed or an older version put back (docs/design/repository-format.md, section 10).

Each round damages a copy of one repository (three snapshots of two disks, one of them
forgotten and pruned), then runs what an administrator would: ``check --read-data``, a restore
of every snapshot, a new backup and its restore, ``prune``, and the restores again. What must
hold whatever was done:

* every command ends with an exit code README.md documents, never a traceback;
* a restore that succeeds gives back the exact bytes that were backed up;
* ``check --read-data`` does not pass a repository whose config, keys, packs, index files or
  snapshots were changed, or whose config, keys or packs were removed;
* ``prune`` never makes a snapshot unreadable that could be read before it ran.

Seeded like the manifest fuzzer: a failure names its seed and round, and the round fails again.
300 rounds of a campaign found one wrong message: a repository whose only key object was
damaged said "wrong passphrase" (exit 12), now damage (exit 1; repo/keys.py).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.cli.admin import env, run, run_json  # noqa: F401  (env: the fixture)
from tests.conftest import CAMPAIGN_SCALE, RANDOM_EXAMPLES
from vmvault.sample_vm import make_disk

ROUNDS = 40 * CAMPAIGN_SCALE
SEED = int(os.environ.get("VMVAULT_STORAGE_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if RANDOM_EXAMPLES else 3
)
#: every exit code README.md documents for a command that ran (not 130, not a traceback)
EXITS = {0, 1, 2, 3, 10, 12, 13}
#: the folders whose objects vmvault reads as the repository
STORED = ("config", "keys", "data", "index", "snapshots")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _damage(repo: Path, old: Path, rng: random.Random) -> list[str]:
    """One to three changes of the storage; returns what was done."""
    done = []
    for _ in range(rng.randint(1, 3)):
        files = _files(repo)
        victim = rng.choice(files)
        kind = rng.choice(["delete", "flip", "cut", "extend", "exchange", "copy over", "put back", "new name", "older"])
        data = victim.read_bytes()
        if kind == "delete":
            victim.unlink()
        elif kind == "flip" and data:
            i = rng.randrange(len(data))
            victim.write_bytes(data[:i] + bytes([data[i] ^ 1 << rng.randrange(8)]) + data[i + 1 :])
        elif kind == "cut":
            victim.write_bytes(data[: rng.randrange(max(1, len(data)))])
        elif kind == "extend":
            victim.write_bytes(data + rng.randbytes(rng.randint(1, 64)))
        elif kind == "exchange" and (others := [p for p in files if p.parent == victim.parent and p != victim]):
            other = rng.choice(others)
            victim.write_bytes(other.read_bytes())
            other.write_bytes(data)
        elif kind == "copy over":
            victim.write_bytes(rng.choice(files).read_bytes())
        elif kind == "put back" and (gone := [p for p in _files(old) if not (repo / p.relative_to(old)).exists()]):
            back = rng.choice(gone)
            (repo / back.relative_to(old)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(back, repo / back.relative_to(old))
        elif kind == "new name" and victim.name != "config":
            name = f"{rng.getrandbits(256):064x}"
            folder = repo / "data" / name[:2] if victim.parent.parent.name == "data" else victim.parent
            folder.mkdir(exist_ok=True)
            shutil.copyfile(victim, folder / name)
        elif kind == "older" and (old / victim.relative_to(repo)).exists():
            shutil.copyfile(old / victim.relative_to(repo), victim)
        done.append(f"{kind} {victim.relative_to(repo)}")
    return done


def _damaged(base: Path, repo: Path) -> bool:
    """Whether an object of ``base`` was changed, or one ``check`` must miss was removed."""
    for path in _files(base):
        rel = path.relative_to(base)
        if rel.parts[0] not in STORED:
            continue
        now = repo / rel
        if now.exists() and now.read_bytes() != path.read_bytes():
            return True
        if not now.exists() and rel.parts[0] in ("config", "keys", "data"):
            return True
    return False


def test_storage_changed_without_the_key_never_yields_wrong_data_or_a_traceback(
    env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, other = env / "web01.raw", env / "db01.raw"
    assert run(capsys, "init", "--chunk-size", "64K", "-q")[0] == 0
    backed_up: dict[str, tuple[str, bytes]] = {}
    for disk, seed in ((image, 5), (other, 7), (image, 6)):
        make_disk(str(disk), 2 << 20, seed=seed)
        assert run(capsys, "backup", str(disk), "-q")[0] == 0
        (new,) = {s["id"] for s in run_json(capsys, "snapshots")[1]} - set(backed_up)
        backed_up[new] = (disk.name, disk.read_bytes())
    # a prune's leftovers, for the storage to put back
    old = env / "repo.old"
    shutil.copytree(env / "repo", old)
    first = next(iter(backed_up))
    assert run(capsys, "forget", first[:8], "-q")[0] == 0
    assert run(capsys, "prune", "-q")[0] == 0
    base = env / "repo.base"
    shutil.copytree(env / "repo", base)
    state, cache = os.environ["VMVAULT_STATE_DIR"], os.environ["VMVAULT_CACHE_DIR"]
    make_disk(str(image), 2 << 20, seed=8)
    newest = image.read_bytes()

    rng = random.Random(SEED)
    outcomes: dict[tuple[str, int], int] = {}
    for round_ in range(ROUNDS):
        for folder, original in ((env / "repo", base), (env / "state", Path(state)), (env / "cache", Path(cache))):
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(original, folder)
        # this host's records as they were after the prune (what it remembers of the repository)
        monkeypatch.setenv("VMVAULT_STATE_DIR", str(env / "state"))
        monkeypatch.setenv("VMVAULT_CACHE_DIR", str(env / "cache"))
        done = _damage(env / "repo", old, rng)
        where = (SEED, round_, done)

        def vmvault(*argv: str) -> int:
            code, _out, err = run(capsys, *argv, "-q")
            assert code in EXITS and "Traceback" not in err, (*where, argv, code, err[-800:])  # noqa: B023
            outcomes[(argv[0], code)] = outcomes.get((argv[0], code), 0) + 1
            return code

        def restored(snapshot: str, name: str, data: bytes) -> bool:
            target = env / "out"
            shutil.rmtree(target, ignore_errors=True)
            if vmvault("restore", snapshot, "--target", str(target)) != 0:
                return False
            assert (target / name).read_bytes() == data, (*where, "restored other bytes", snapshot)  # noqa: B023
            return True

        if vmvault("check", "--read-data") == 0:
            assert not _damaged(base, env / "repo"), (*where, "check passed a damaged repository")
        readable = {sid for sid, (name, data) in backed_up.items() if restored(sid[:8], name, data)}
        image.write_bytes(newest)
        if vmvault("backup", str(image)) == 0:
            restored("latest", image.name, newest)
        vmvault("prune")
        for sid in readable:
            name, data = backed_up[sid]
            assert restored(sid[:8], name, data), (*where, "prune made a readable snapshot unreadable", sid[:8])
    # the damage was felt: checks failed, restores both succeeded and failed
    felt = [outcomes.get(("check", 3), 0), outcomes.get(("restore", 0), 0), outcomes.get(("restore", 1), 0)]
    assert all(felt), outcomes
