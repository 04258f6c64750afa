"""Many hosts backing up into one S3 repository while forget --prune runs beside them.

Each "host" is a separate ``vmvault backup`` process with its own working directory and its
own VM image; the images share a common base (as VMs cloned from one template do) and
each has data of its own. In every round the images change a little (some changes are
shared by all hosts, like a patch applied to every VM), then the backups and a
``forget --keep-last 2 --prune`` are started at seeded random moments, and one of them
(a random backup, or the prune) is killed with SIGKILL a random moment after it has taken
its lock, so that it dies in the middle of its work. ``VMVAULT_MANY_HOSTS_SEED`` picks
another seed (the default is fixed, so a failure can be replayed). The repository lives on
moto's S3 server and, in a second run, on Ceph's RADOS Gateway (``tests/ceph.py``).

What must hold (docs/design/repository-format.md, sections 7 and 8):

* every process either succeeds or backs off with the "locked" exit code; nothing else;
* a backup adds only what the repository did not hold when its round started: chunks
  another host stored earlier are reused (cross-host deduplication);
* after a last prune, each distinct chunk the remaining snapshots need is stored once;
* ``check --read-data`` finds no error, and every remaining snapshot restores to exactly
  one version of its host's image, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.ceph import CephCluster
from tests.servers import S3Server, running_s3, s3_client_environment
from vmvault.backends import open_backend
from vmvault.engine.restore import restore
from vmvault.repo.locks import list_locks
from vmvault.repo.repository import Repository

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
BASE_CHUNKS = 40  # shared by every host (the template)
OWN_CHUNKS = 16  # different on each host
HOSTS = 3
#: "together": everyone starts within 1.5 s; "prune-first": prune gets a head start
ROUND_MODES = ("together", "prune-first", "together", "prune-first")
ROUNDS = len(ROUND_MODES)
#: who is killed in each round: the prune, or a randomly chosen backup
VICTIMS = ("host", "prune", "host", "host")
PACK_SIZE = 256 * 1024
PASSWORD = "many-hosts-test-passphrase"
EXIT_LOCKED = 11
#: a backup adds at most this much besides its new chunks: its index block (one here)
INDEX_SLACK = 8 * 1024


def _chunks(data: bytes) -> set[bytes]:
    """Content digests of the non-zero chunks: the test's own view of what must be stored."""
    out = set()
    for off in range(0, len(data), CHUNK):
        piece = data[off : off + CHUNK]
        if piece.count(0) != len(piece):
            out.add(hashlib.sha256(piece).digest())
    return out


@dataclass
class Host:
    name: str
    workdir: Path
    image: Path
    #: the S3 server's credentials for this host's processes
    credentials: dict[str, str]
    #: sha256 of every version of the image that was ever on disk -> its chunk digests
    versions: dict[str, set[bytes]] = field(default_factory=dict)

    def remember(self) -> str:
        data = self.image.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        self.versions[digest] = _chunks(data)
        return digest


@pytest.fixture(scope="module", params=["moto", pytest.param("rgw", marks=pytest.mark.slow)])
def s3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server | CephCluster]:
    if request.param == "rgw":
        cluster: CephCluster = request.getfixturevalue("rgw_cluster")
        cluster.create_bucket("fleet")
        yield cluster
        return
    with s3_client_environment(), running_s3(tmp_path_factory.mktemp("moto"), buckets=("fleet",)) as server:
        yield server


def _env(host: Host) -> dict[str, str]:
    env = {**os.environ, **host.credentials}
    env.update(VMVAULT_PASSWORD=PASSWORD, VMVAULT_TEST_CHEAP_KDF="1", HOME=str(host.workdir))
    # each host its own index cache, as separate machines have
    env["VMVAULT_CACHE_DIR"] = str(host.workdir / "cache")
    for key in ("VMVAULT_REPO", "VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE", "AWS_PROFILE"):
        env.pop(key, None)
    return env


def _vmvault(host: Host, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmvault", *args],
        cwd=host.workdir,
        env=_env(host),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    proc = _vmvault(host, *args)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stored_bytes(repo: Repository) -> int:
    return sum(o.size for o in repo.backend.list("data/"))


def _alive_chunks(repo: Repository, hosts: dict[str, Host], made_by: dict[str, tuple[str, str]]) -> set[bytes]:
    """Chunk digests of every version some snapshot in the repository holds now."""
    out: set[bytes] = set()
    for snap_id in repo.snapshot_ids():
        if snap_id in made_by:
            host, version = made_by[snap_id]
            out |= hosts[host].versions[version]
    return out


def test_many_hosts_with_concurrent_prune(
    s3: S3Server | CephCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = int(os.environ.get("VMVAULT_MANY_HOSTS_SEED", "20261125"))
    rng = random.Random(seed)
    url = s3.url("fleet", "vms")
    credentials = s3.client_env()
    for key, value in credentials.items():  # for the repository opened in this process
        monkeypatch.setenv(key, value)
    hosts: dict[str, Host] = {}
    base = bytearray(rng.randbytes(BASE_CHUNKS * CHUNK))
    for i in range(HOSTS):
        wd = tmp_path / f"host{i}"
        wd.mkdir()
        h = Host(f"host{i}", wd, wd / f"vm{i}.img", credentials)
        h.image.write_bytes(bytes(base) + rng.randbytes(OWN_CHUNKS * CHUNK))
        hosts[h.name] = h
    admin = Host("admin", tmp_path / "admin", tmp_path / "admin" / "none", credentials)
    admin.workdir.mkdir()
    # through the API for a small pack size: a backup then uploads several packs and index
    # files, so a kill lands between them
    Repository.init(open_backend(url), PASSWORD.encode(), chunk_size=CHUNK, pack_size=PACK_SIZE).close()

    repo = _open(url)
    try:
        made_by: dict[str, tuple[str, str]] = {}  # snapshot id -> (host, image version)
        outcomes: list[str] = []
        for rnd in range(ROUNDS):
            # change the images: a shared patch on the base, and each host's own writes
            if rnd:
                patch = {rng.randrange(BASE_CHUNKS): rng.randbytes(CHUNK) for _ in range(3)}
                for h in hosts.values():
                    with open(h.image, "r+b") as f:
                        for idx, data in patch.items():
                            f.seek(idx * CHUNK)
                            f.write(data)
                        for _ in range(2):
                            f.seek(rng.randrange(BASE_CHUNKS, BASE_CHUNKS + OWN_CHUNKS) * CHUNK)
                            f.write(rng.randbytes(CHUNK))
            version = {h.name: h.remember() for h in hosts.values()}
            repo.load_index()
            known = _alive_chunks(repo, hosts, made_by)

            procs: dict[str, subprocess.Popen[str]] = {}
            order = [*hosts, "prune"]
            rng.shuffle(order)
            start = time.monotonic()
            if ROUND_MODES[rnd] == "prune-first":
                delays = {name: rng.uniform(1.0, 3.0) for name in order} | {"prune": 0.0}
            else:
                delays = {name: rng.uniform(0.0, 1.5) for name in order}
            # the victim is killed a random moment after it has taken its lock (its work
            # lies between taking and releasing it)
            victim = VICTIMS[rnd] if VICTIMS[rnd] == "prune" else rng.choice(list(hosts))
            kill_after_lock = rng.uniform(0.0, 0.4)
            kill_at: float | None = None
            pending = sorted(order, key=lambda n: delays[n])
            killed = False
            # prune-first: the others' delays count from the moment prune holds its lock (or
            # has ended), so a slow start of prune on a loaded machine cannot lose its head start
            held_from: float | None = 0.0 if ROUND_MODES[rnd] != "prune-first" else None
            while pending or any(p.poll() is None for p in procs.values()):
                now = time.monotonic() - start
                if (
                    held_from is None
                    and "prune" in procs
                    and (
                        procs["prune"].poll() is not None
                        or any(lk.pid == procs["prune"].pid for lk in list_locks(repo.backend, repo.key))
                    )
                ):
                    held_from = now
                while pending and (
                    (pending[0] == "prune" and held_from is None)
                    or (held_from is not None and delays[pending[0]] <= now - held_from)
                ):
                    name = pending.pop(0)
                    if name == "prune":
                        procs[name] = _vmvault(admin, "-r", url, "--json", "forget", "--keep-last", "2", "--prune")
                    else:
                        h = hosts[name]
                        procs[name] = _vmvault(h, "-r", url, "--json", "backup", "--tag", name, str(h.image))
                if victim in procs and not killed and procs[victim].poll() is None:
                    if kill_at is None and any(
                        lk.pid == procs[victim].pid for lk in list_locks(repo.backend, repo.key)
                    ):
                        kill_at = now + kill_after_lock
                    if kill_at is not None and now >= kill_at:
                        procs[victim].send_signal(signal.SIGKILL)
                        killed = True
                assert now < 90, "a round took longer than 90 s"
                time.sleep(0.02)

            for name, proc in procs.items():
                out, err = proc.communicate()
                code = proc.returncode
                if killed and name == victim and code == -signal.SIGKILL:
                    outcomes.append(f"{rnd}:{name}:killed")
                    continue
                assert code in (0, EXIT_LOCKED), f"round {rnd}, {name}: exit {code}\n{err}"
                if code == EXIT_LOCKED:
                    # "the repository is locked", or a prune that found a lock taken meanwhile
                    assert "lock" in err, err
                    outcomes.append(f"{rnd}:{name}:locked")
                    continue
                outcomes.append(f"{rnd}:{name}:ok")
                if name == "prune":
                    continue
                doc = json.loads(out)
                made_by[doc["snapshot"]] = (name, version[name])
                # cross-host deduplication: only chunks the repository lacked at the start of
                # the round may be added (two hosts adding one new chunk at once may both add it)
                new = hosts[name].versions[version[name]] - known
                assert doc["raw_bytes_added"] <= len(new) * CHUNK + INDEX_SLACK, (rnd, name, doc, len(new))

        # a killed backup may have written its snapshot just before the kill: learn its version
        for snap in repo.list_snapshots():
            if snap.id not in made_by:
                h = hosts[snap.tags[0]]
                made_by[snap.id] = (h.name, "")  # resolved by restoring below

        # a last prune with nobody else around: each distinct chunk is then stored once
        done = _run(admin, "-r", url, "--json", "prune", "--max-unused", "0.1%")
        assert done.returncode == 0, done.stderr
        done = _run(admin, "-r", url, "--json", "check", "--read-data")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["errors"] == 0, report
        assert report["warnings"] == 0, report

        repo.load_index()
        snaps = repo.list_snapshots()
        assert snaps, outcomes
        needed: set[bytes] = set()
        for snap in snaps:
            host = hosts[made_by[snap.id][0]]
            target = tmp_path / "restore" / snap.id
            restore(repo, snap, str(target))
            data = (target / host.image.name).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            assert digest in host.versions, f"snapshot {snap.id[:8]} of {host.name} restored to an unknown image"
            if made_by[snap.id][1]:
                assert digest == made_by[snap.id][1], f"snapshot {snap.id[:8]} restored to another version"
            needed |= host.versions[digest]
            shutil.rmtree(target)
        # shared chunks are stored once: the data objects hold the needed chunks, each once,
        # plus per-blob overhead (envelope, pack header) and the snapshots' index blocks
        stored = _stored_bytes(repo)
        data_blobs = sum(1 for loc in repo.index.packs().values() for _ in loc)
        raw_unique = len(needed) * CHUNK
        assert stored >= raw_unique
        assert stored <= raw_unique + data_blobs * 200 + len(snaps) * INDEX_SLACK, (stored, raw_unique, outcomes)
        assert data_blobs <= len(needed) + len(snaps), (data_blobs, len(needed))
        print(f"seed {seed}, outcomes:", " ".join(outcomes))
        assert any(o.endswith(":killed") for o in outcomes), outcomes
        # the schedule gives prune a head start twice: it must have run at least once
        assert any(o.endswith(":prune:ok") for o in outcomes), outcomes
    finally:
        repo.close()


def _open(url: str) -> Repository:
    return Repository.open(open_backend(url), PASSWORD.encode())
