"""Retention (``immutable_days``) and backup-only keys: who refuses what.

* S3 with Object Lock: every data, index and snapshot object carries COMPLIANCE retention
  (the storage enforces it: moto refuses to delete a locked version), forget and prune
  skip retained objects and report them (the client declines), locks and keys stay
  deletable.
* Local, SFTP, S3 without Object Lock: the client declines; once the period is over,
  prune deletes as usual (object times moved back with ``os.utime``).
* A backup-only key: the client refuses forget, prune and key management with it.
* SFTP with ``internal-sftp -P remove``: the server refuses deletes; a backup succeeds
  (its lock is left behind and goes stale), prune fails with a permission error and
  removes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from tests.servers import S3Server, running_s3, running_sshd, s3_client_environment
from vmvault.backends import open_backend
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import BackendPermissionError, ImmutableError, PasswordError
from vmvault.hypervisors import open_source
from vmvault.repo import keys
from vmvault.repo.check import DELETED, UNLOCKED, check
from vmvault.repo.format import BlobType
from vmvault.repo.immutability import LockReview, deleted_objects, lock_objects, unlocked_objects
from vmvault.repo.prune import forget, prune
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy

PASSWORD = b"immutability-test-passphrase"
CHUNK = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _image(path: Path, seed: int) -> Path:
    path.write_bytes(os.urandom(8 * CHUNK) + seed.to_bytes(4, "big") * (CHUNK // 4))
    return path


def _two_snapshots(repo: Repository, tmp_path: Path) -> tuple[str, str]:
    """Two snapshots of one image whose content changed completely in between."""
    img = tmp_path / "vm.img"
    first = backup(repo, open_source(str(_image(img, 1)))).snapshot.id
    second = backup(repo, open_source(str(_image(img, 2)))).snapshot.id
    return first, second


def _names(backend: Backend, *prefixes: str) -> set[str]:
    return {o.name for p in prefixes for o in backend.list(p)}


KEEP_ONE = RetentionPolicy(last=1)


def _unreferenced_pack(repo: Repository) -> None:
    """An indexed pack no snapshot needs (what a backup killed before its snapshot leaves)."""
    writer = repo.writer()
    data = os.urandom(CHUNK)
    writer.add(BlobType.DATA, repo.key.chunk_id(data), data)
    writer.flush()
    writer.close()


# ---- S3 with Object Lock -----------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with (
        s3_client_environment(),
        running_s3(tmp_path_factory.mktemp("moto"), buckets=("vault:locked", "plain")) as server,
    ):
        yield server


@pytest.mark.integration
def test_s3_object_lock_enforced_and_client_declines(moto: S3Server, tmp_path: Path) -> None:
    url = moto.url("vault", "repo")
    repo = Repository.init(open_backend(url), PASSWORD, chunk_size=CHUNK, immutable_days=1)
    assert repo.retention_enforced and repo.backend.enforces_immutability
    old, _new = _two_snapshots(repo, tmp_path)
    repo.close()

    client: Any = moto.client()
    for name in _names(repo.backend, "data/", "index/", "snapshots/"):
        head = client.head_object(Bucket="vault", Key=f"repo/{name}")
        assert head.get("ObjectLockMode") == "COMPLIANCE", name
    for name in _names(repo.backend, "keys/", "config"):
        if name.startswith("keys/"):
            assert "ObjectLockMode" not in client.head_object(Bucket="vault", Key=f"repo/{name}"), name

    # the setting lives in the repository: a plain URL (no ?immutable-days) still applies it
    repo = Repository.open(open_backend(url), PASSWORD)
    assert repo.config.immutable_days == 1 and repo.retention_enforced
    before = _names(repo.backend, "data/", "index/", "snapshots/")
    report = forget(repo, KEEP_ONE)
    assert report.retained == [old] and report.removed == []
    _unreferenced_pack(repo)
    before = _names(repo.backend, "data/", "index/", "snapshots/")
    pr = prune(repo, max_unused=0.0)
    assert pr.packs_retained == 1 and pr.packs_deleted == 0
    # with nothing it may delete, prune does not even write a new index file (it would be
    # one more object under retention)
    assert pr.index_files_written == 0
    assert _names(repo.backend, "data/", "index/", "snapshots/") == before
    assert check(repo, read_data=True).ok
    assert not list(repo.backend.list("locks/")), "locks must stay deletable"
    repo.close()

    # the storage side: deleting a locked version is refused by the server itself
    key = f"repo/snapshots/{old}"
    version = client.list_object_versions(Bucket="vault", Prefix=key)["Versions"][0]["VersionId"]
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.delete_object(Bucket="vault", Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


@pytest.mark.integration
def test_s3_location_retention_is_declined_too(moto: S3Server, tmp_path: Path) -> None:
    """``?immutable-days=N`` on the location (no repository setting): the objects are locked,
    and forget declines to delete them rather than hide them behind delete markers."""
    repo = Repository.init(open_backend(moto.url("vault", "by-url") + "?immutable-days=1"), PASSWORD, chunk_size=CHUNK)
    assert repo.config.immutable_days is None and repo.retention_enforced
    old, _new = _two_snapshots(repo, tmp_path)
    assert forget(repo, KEEP_ONE).retained == [old]
    assert old in repo.snapshot_ids()
    repo.close()


@pytest.mark.integration
def test_s3_without_object_lock_is_advisory(moto: S3Server, tmp_path: Path) -> None:
    repo = Repository.init(open_backend(moto.url("plain", "repo")), PASSWORD, chunk_size=CHUNK, immutable_days=3)
    assert not repo.retention_enforced
    old, _new = _two_snapshots(repo, tmp_path)
    assert forget(repo, KEEP_ONE).retained == [old]
    assert old in repo.snapshot_ids()
    repo.close()


@pytest.mark.integration
def test_cli_init_immutable_days(moto: S3Server, tmp_path: Path) -> None:
    env = {**os.environ, **S3Server.client_env(), "VMVAULT_PASSWORD": PASSWORD.decode()}
    for bucket, enforced in (("vault", True), ("plain", False)):
        done = subprocess.run(
            [sys.executable, "-m", "vmvault", "-r", moto.url(bucket, "cli"), "--json", "init", "--immutable-days", "7"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["immutable_days"] == 7 and doc["retention_enforced"] is enforced


# ---- objects the storage should lock and does not -----------------------------------------


def _vmvault(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmvault", *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )


@pytest.mark.integration
def test_objects_the_storage_left_unlocked_are_found_by_check_and_locked_by_repair(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores the lock headers of an upload, or a process killed between a
    multipart upload's completion and its PutObjectRetention, leaves an object unlocked:
    anyone with the storage's credentials may delete it, and nothing said so. ``check`` now
    names each such object; ``repair locks`` gives it the retention it should have had."""
    url = moto.url("vault", "unlocked")
    repo = Repository.init(open_backend(url), PASSWORD, chunk_size=CHUNK, immutable_days=2)
    first = backup(repo, open_source(str(_image(tmp_path / "vm.img", 1)))).snapshot.id
    locked_before = _names(repo.backend, "data/", "index/", "snapshots/")
    assert check(repo).ok
    assert unlocked_objects(repo, remember=False) == LockReview([], len(locked_before), 0)
    # the second backup's uploads get no retention, as from a server that ignored it
    backend: Any = repo.backend
    monkeypatch.setattr(backend, "_lock_args", lambda name: {})
    monkeypatch.setattr(backend, "_ensure_retention", lambda name, key, version: None)
    second = backup(repo, open_source(str(_image(tmp_path / "vm.img", 2)))).snapshot.id
    monkeypatch.undo()
    unlocked = _names(repo.backend, "data/", "index/", "snapshots/") - locked_before
    assert f"snapshots/{second}" in unlocked and any(n.startswith("data/") for n in unlocked)

    report = check(repo)
    assert not report.ok
    assert {p.object for p in report.errors} == unlocked
    assert {p.kind for p in report.problems} == {UNLOCKED}
    assert all("has no Object Lock retention" in p.message and "repair locks" in p.message for p in report.errors)
    assert report.damaged_snapshots == [] and set(report.intact_snapshots) == {first, second}
    # the storage really lets them go: a version of an unlocked object can be deleted
    client: Any = moto.client()
    versions = client.list_object_versions(Bucket="vault", Prefix=f"unlocked/snapshots/{second}")["Versions"]
    assert "ObjectLockMode" not in client.head_object(Bucket="vault", Key=f"unlocked/snapshots/{second}")

    # one of them locked, but too briefly: still named, with the date its lock ends
    short = sorted(unlocked)[0]
    assert repo.backend.retain(short, time.time() + 120)
    found = unlocked_objects(repo).unlocked
    brief = next(o for o in found if o.name == short)
    assert brief.until is not None and "is locked only until" in brief.describe()

    # objects past the retention period need no lock any more: none is even looked up
    assert unlocked_objects(repo, now=time.time() + 3 * 86400) == LockReview([], 0, 0)

    assert lock_objects(repo, found) == len(unlocked)
    assert check(repo).ok
    for name in unlocked:
        head = client.head_object(Bucket="vault", Key=f"unlocked/{name}")
        assert head["ObjectLockMode"] == "COMPLIANCE", name
        written = head["LastModified"].timestamp()
        assert head["ObjectLockRetainUntilDate"].timestamp() >= written + 2 * 86400 - 1, name
    with pytest.raises(client.exceptions.ClientError):
        client.delete_object(Bucket="vault", Key=f"unlocked/snapshots/{second}", VersionId=versions[0]["VersionId"])
    repo.close()


@pytest.mark.integration
def test_cli_check_names_unlocked_objects_and_repair_locks_them(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = moto.url("vault", "cli-locks")
    repo = Repository.init(open_backend(url), PASSWORD, chunk_size=CHUNK, immutable_days=1)
    backend: Any = repo.backend
    monkeypatch.setattr(backend, "_lock_args", lambda name: {})
    monkeypatch.setattr(backend, "_ensure_retention", lambda name, key, version: None)
    backup(repo, open_source(str(_image(tmp_path / "vm.img", 1))))
    monkeypatch.undo()
    unlocked = _names(repo.backend, "data/", "index/", "snapshots/")
    repo.close()
    env = {**os.environ, **S3Server.client_env(), "VMVAULT_PASSWORD": PASSWORD.decode(), "VMVAULT_TEST_CHEAP_KDF": "1"}

    done = _vmvault(env, "-r", url, "check")
    assert done.returncode == 3, done.stderr
    assert done.stdout.count("error: object-not-locked: ") == len(unlocked)
    assert "`vmvault repair locks` locks them" in done.stdout and "repair index" not in done.stdout

    done = _vmvault(env, "-r", url, "--json", "repair", "locks", "--dry-run")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {o["name"] for o in doc["unlocked"]} == unlocked and doc["locked"] == 0 and doc["dry_run"]
    assert _vmvault(env, "-r", url, "check").returncode == 3

    done = _vmvault(env, "-r", url, "repair", "locks")
    assert done.returncode == 0, done.stderr
    assert f"{len(unlocked)} objects locked, of {len(unlocked)} looked up" in done.stdout
    done = _vmvault(env, "-r", url, "check")
    assert done.returncode == 0, done.stdout
    assert f"Object Lock retention of {len(unlocked)} objects still inside the retention period" in done.stdout

    # a storage that locks nothing has nothing to repair: said plainly, no traceback
    local = str(tmp_path / "local")
    assert _vmvault(env, "-r", local, "init", "--immutable-days", "1").returncode == 0
    done = _vmvault(env, "-r", local, "repair", "locks")
    assert done.returncode == 2 and "locks no object" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_objects_deleted_under_object_lock_are_named_by_check_and_brought_back(moto: S3Server, tmp_path: Path) -> None:
    """Whoever holds the storage's credentials deletes a snapshot and a pack: Object Lock keeps
    the versions, S3 only puts delete markers over them, and the repository silently lacks a
    backup (a deleted snapshot was found by nothing). ``check`` names both (a delete of what
    the storage holds locked is never vmvault's: it deletes nothing inside the retention
    period); ``repair undelete`` removes the markers and the backup restores again."""
    url = moto.url("vault", "deleted")
    repo = Repository.init(open_backend(url), PASSWORD, chunk_size=CHUNK, immutable_days=1)
    image = _image(tmp_path / "vm.img", 1)
    first = backup(repo, open_source(str(image))).snapshot.id
    original = image.read_bytes()
    second = backup(repo, open_source(str(_image(image, 2)))).snapshot.id
    repo.close()
    pack = sorted(_names(repo.backend, "data/"))[0]
    client: Any = moto.client()
    for name in (f"snapshots/{first}", pack):
        client.delete_object(Bucket="vault", Key=f"deleted/{name}")
    repo = Repository.open(open_backend(url), PASSWORD)
    assert repo.snapshot_ids() == [second]

    report = check(repo)
    gone = {p.object: p.message for p in report.errors if p.kind == DELETED}
    assert set(gone) == {f"snapshots/{first}", pack}
    assert all("not by vmvault" in m and "repair undelete" in m for m in gone.values())
    assert any(p.kind == "pack-missing" for p in report.errors)  # what the hidden pack means

    env = {**os.environ, **S3Server.client_env(), "VMVAULT_PASSWORD": PASSWORD.decode(), "VMVAULT_TEST_CHEAP_KDF": "1"}
    done = _vmvault(env, "-r", url, "check")
    assert done.returncode == 3 and "first `vmvault repair undelete` brings them back" in done.stdout
    assert "`vmvault repair index` and" not in done.stdout  # it would drop the hidden pack from the index
    done = _vmvault(env, "-r", url, "--json", "repair", "undelete", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert {d["name"] for d in json.loads(done.stdout)["deleted"]} == set(gone)
    assert len(deleted_objects(repo)) == 2
    done = _vmvault(env, "-r", url, "repair", "undelete")
    assert done.returncode == 0 and "2 objects brought back" in done.stdout, done.stderr
    repo.close()

    repo = Repository.open(open_backend(url), PASSWORD)
    assert sorted(repo.snapshot_ids()) == sorted([first, second])
    assert check(repo, read_data=True).ok
    target = tmp_path / "restored"
    restore(repo, repo.load_snapshot(first), str(target))
    assert (target / "vm.img").read_bytes() == original
    # deletes of versions the storage no longer holds locked (prune's, once the period is
    # over) are no one's concern
    client.delete_object(Bucket="vault", Key=f"deleted/snapshots/{first}")
    assert deleted_objects(repo, now=time.time() + 2 * 86400) == []
    repo.close()


class _RefusesRetention:
    """A client for a caller without ``s3:GetObjectRetention``, as the Amazon S3 API Reference
    describes it: HeadObject answers without ``ObjectLockMode`` and ``ObjectLockRetainUntilDate``
    ("only returned if the requester has the s3:GetObjectRetention permission"), and
    GetObjectRetention is refused with ``AccessDenied``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def head_object(self, **kwargs: Any) -> Any:
        answer = dict(self._client.head_object(**kwargs))
        answer.pop("ObjectLockMode", None)
        answer.pop("ObjectLockRetainUntilDate", None)
        return answer

    def get_object_retention(self, **kwargs: Any) -> Any:
        raise botocore.exceptions.ClientError(
            {
                "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                "ResponseMetadata": {"HTTPStatusCode": 403},
            },
            "GetObjectRetention",
        )

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_lock_seen_once_is_not_asked_about_again_until_its_object_is_written_again(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMPLIANCE lock cannot be shortened: once seen on a version of an object, this host
    asks no more about that version (the nightly check of a large repository with a long
    retention period would otherwise ask about every object, every night). The same name
    written again is another version (another listing time): asked about, and named."""
    repo = Repository.init(open_backend(moto.url("vault", "memo")), PASSWORD, chunk_size=CHUNK, immutable_days=2)
    snap = backup(repo, open_source(str(_image(tmp_path / "vm.img", 1)))).snapshot.id
    objects = _names(repo.backend, "data/", "index/", "snapshots/")
    asked: list[str] = []
    backend: Any = repo.backend
    real = backend.retention_of

    def retention_of(name: str, version: str | None = None) -> float | None:
        asked.append(name)
        return real(name, version)

    monkeypatch.setattr(backend, "retention_of", retention_of)
    assert unlocked_objects(repo) == LockReview([], len(objects), 0)
    assert sorted(asked) == sorted(objects)
    asked.clear()
    report = check(repo)
    assert report.ok and asked == [] and report.stats["objects_lock_checked"] == len(objects)
    assert report.stats["objects_lock_looked_up"] == 0
    assert unlocked_objects(repo, remember=False).looked_up == len(objects)  # trusting nothing kept
    asked.clear()

    # the snapshot's name written again, the same bytes, without retention (a client without
    # immutable-days, a server ignoring the headers): its listing time tells the versions apart
    time.sleep(1.1)
    client: Any = moto.client()
    key = f"memo/snapshots/{snap}"
    body = client.get_object(Bucket="vault", Key=key)["Body"].read()
    client.put_object(Bucket="vault", Key=key, Body=body)
    review = unlocked_objects(repo)
    assert [o.name for o in review.unlocked] == [f"snapshots/{snap}"] and asked == [f"snapshots/{snap}"]
    assert review.known == len(objects) - 1
    repo.close()


@pytest.mark.integration
def test_credentials_that_may_not_read_retention_are_a_warning_not_unlocked_objects(
    moto: S3Server, tmp_path: Path
) -> None:
    """Without ``s3:GetObjectRetention`` every object would look unlocked to HeadObject: check
    says instead that it could not tell (a warning), and ``repair locks`` refuses to guess."""
    repo = Repository.init(open_backend(moto.url("vault", "no-read")), PASSWORD, chunk_size=CHUNK, immutable_days=1)
    backup(repo, open_source(str(_image(tmp_path / "vm.img", 1))))
    backend: Any = repo.backend
    refusing = _RefusesRetention(backend._client)
    backend._client = refusing
    backend._single_attempt = lambda: refusing
    report = check(repo)
    assert report.ok, [p.to_dict() for p in report.problems]
    (warning,) = report.warnings
    assert warning.kind == "object-locks-not-checked" and "s3:GetObjectRetention" in warning.message
    with pytest.raises(BackendPermissionError, match="s3:GetObjectRetention"):
        unlocked_objects(repo)
    repo.close()


# ---- advisory retention on a local repository ---------------------------------------------


def _age(backend: LocalBackend, days: float) -> None:
    """Move every object's time ``days`` into the past (what waiting would do)."""
    then = time.time() - days * 86400
    for o in backend.list(""):
        path = os.path.join(backend.root, o.name)
        os.utime(path, (then, then))


def test_local_retention_declines_then_expires(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path / "repo"))
    repo = Repository.init(backend, PASSWORD, chunk_size=CHUNK, immutable_days=2)
    assert not repo.retention_enforced
    old, new = _two_snapshots(repo, tmp_path)
    stored = _names(backend, "data/")

    report = forget(repo, KEEP_ONE)
    assert report.retained == [old] and report.removed == []
    _age(backend, 1)  # still inside the period
    assert forget(repo, KEEP_ONE).retained == [old]
    _age(backend, 3)
    report = forget(repo, KEEP_ONE)
    assert report.removed == [old] and report.retained == []

    # the old snapshot's chunks are in a pack of their own: while it is inside the period
    # prune keeps it, indexed, so that check sees nothing amiss
    assert len(stored) == 2
    for name in stored:
        os.utime(os.path.join(backend.root, name))
    pr = prune(repo, max_unused=0.0)
    assert pr.packs_retained == 1
    assert check(repo, read_data=True).ok, "a retained pack must stay indexed: no warnings, no errors"
    _age(backend, 3)
    pr = prune(repo, max_unused=0.0)
    assert pr.packs_retained == 0 and pr.packs_deleted >= 1
    report_check = check(repo, read_data=True)
    assert report_check.ok and not report_check.warnings, [p.to_dict() for p in report_check.problems]
    assert repo.snapshot_ids() == [new]


def test_config_mac_covers_immutable_days(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path / "repo"))
    Repository.init(backend, PASSWORD, immutable_days=30)
    doc = json.loads(backend.get("config"))
    doc["immutable_days"] = None  # an attacker lowering the period
    backend.put("config", json.dumps(doc).encode())
    with pytest.raises(Exception, match="MAC"):
        Repository.open(backend, PASSWORD)


# ---- backup-only keys --------------------------------------------------------------------


def test_backup_only_key_refuses_destructive_operations(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path / "repo"))
    admin = Repository.init(backend, PASSWORD, chunk_size=CHUNK)
    keys.add_key(backend, admin.key, b"backup-host-secret", kind="keyfile", role=keys.BACKUP_ONLY)
    limited = Repository.open(LocalBackend(str(tmp_path / "repo")), b"backup-host-secret")
    assert limited.role == keys.BACKUP_ONLY
    old, _new = _two_snapshots(limited, tmp_path)
    before = _names(backend, "")
    for operation in (lambda: forget(limited, KEEP_ONE), lambda: prune(limited)):
        with pytest.raises(ImmutableError, match="backup-only"):
            operation()
    assert _names(backend, "") == before
    # the full key still can
    assert forget(Repository.open(backend, PASSWORD), KEEP_ONE).removed == [old]

    # the role is bound to the wrapped key: editing it away makes the key unopenable
    (key_name,) = [o.name for o in backend.list("keys/") if json.loads(backend.get(o.name)).get("role")]
    doc = json.loads(backend.get(key_name))
    del doc["role"]
    backend.put(key_name, json.dumps(doc).encode())
    with pytest.raises(PasswordError):
        Repository.open(backend, b"backup-host-secret")


def test_cli_backup_only_key(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    env = {**os.environ, "VMVAULT_PASSWORD": PASSWORD.decode(), "VMVAULT_TEST_CHEAP_KDF": "1"}
    env.pop("VMVAULT_KEY_FILE", None)

    def vmvault(*args: str, key_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--key-file", str(key_file)] if key_file else []
        return subprocess.run(
            [sys.executable, "-m", "vmvault", "-r", str(repo_dir), *extra, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    assert vmvault("init").returncode == 0
    limited = tmp_path / "backup.key"
    done = vmvault("key", "add", "--role", "backup-only", "--new-key-file", str(limited))
    assert done.returncode == 0, done.stderr
    assert "backup-only" in vmvault("key", "list").stdout
    img = _image(tmp_path / "vm.img", 1)
    assert vmvault("backup", str(img), key_file=limited).returncode == 0
    for args in (("forget", "--keep-last", "1", "--prune"), ("prune",), ("key", "add", "--new-key-file", "x")):
        done = vmvault(*args, key_file=limited)
        assert done.returncode == 1, (args, done.stderr)
        assert "backup-only" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()


# ---- SFTP server without remove rights ----------------------------------------------------


@pytest.mark.integration
def test_sftp_without_remove_rights(tmp_path: Path) -> None:
    with running_sshd(tmp_path / "full") as full:
        # set the repository up with full rights (a snapshot to forget later) ...
        repo = Repository.init(full.open_backend("repo"), PASSWORD, chunk_size=CHUNK)  # type: ignore[arg-type]
        _two_snapshots(repo, tmp_path)
        repo.close()
        root = full.root
    # ... then serve the same directory to a backup host that may not remove anything; the
    # commands run as processes, as on a real backup host (a lock they cannot remove is then
    # a dead process's lock, stale at once on this host)
    with running_sshd(tmp_path / "limited", sftp_options="-P remove,rmdir") as limited:
        limited.root.rmdir()
        limited.root.symlink_to(root)
        env = {**os.environ, **limited.env, "VMVAULT_PASSWORD": PASSWORD.decode()}
        url = limited.url("repo")

        def vmvault(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "vmvault", "-r", url, *args],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )

        backend: Any = limited.open_backend("repo")
        before = _names(backend, "data/", "index/", "snapshots/")
        done = vmvault("backup", str(_image(tmp_path / "vm.img", 3)))
        assert done.returncode == 0, done.stderr
        # the backup could not remove its lock: it is left behind (stale: its process is gone)
        assert len(list(backend.list("locks/"))) == 1
        during = _names(backend, "data/", "index/", "snapshots/")
        assert before < during and len(during - before) >= 3  # a pack, an index file, a snapshot
        for args in (("prune",), ("forget", "--keep-last", "1"), ("forget", "--keep-last", "1", "--prune")):
            done = vmvault(*args)
            assert done.returncode == 1, (args, done.stderr)
            assert "permission denied" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert _names(backend, "data/", "index/", "snapshots/") == during
    # what it could not delete does no harm: with full rights the repository checks clean
    # and prune clears the leftover locks
    with running_sshd(tmp_path / "again") as again:
        again.root.rmdir()
        again.root.symlink_to(root)
        repo = Repository.open(again.open_backend("repo"), PASSWORD)  # type: ignore[arg-type]
        result = check(repo, read_data=True)
        assert result.ok, [p.to_dict() for p in result.problems]
        assert len(repo.snapshot_ids()) == 3
        prune(repo)
        assert not list(repo.backend.list("locks/"))
        repo.close()


# ---- S3: a backup-only IAM policy, enforced by the server --------------------------------

#: the policy docs/storage.md gives for a backup host (bucket "fleet", repository "repo")
BACKUP_ONLY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "SeeTheBucket",
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucketObjectLockConfiguration"],
            "Resource": "arn:aws:s3:::fleet",
        },
        {
            "Sid": "ReadAndAdd",
            "Effect": "Allow",
            "Action": [
                "s3:GetObject",
                "s3:GetObjectVersion",
                "s3:PutObject",
                "s3:PutObjectRetention",
                "s3:GetObjectRetention",
            ],
            "Resource": "arn:aws:s3:::fleet/repo/*",
        },
        {
            "Sid": "RemoveOwnLocks",
            "Effect": "Allow",
            "Action": ["s3:DeleteObject"],
            "Resource": "arn:aws:s3:::fleet/repo/locks/*",
        },
    ],
}
#: moto authorises HeadBucket as its own action "s3:HeadBucket" (AWS: s3:ListBucket)
MOTO_HEAD_BUCKET = {"Effect": "Allow", "Action": ["s3:HeadBucket"], "Resource": "arn:aws:s3:::fleet"}


@pytest.mark.integration
def test_s3_backup_only_policy_is_enforced_by_the_server(tmp_path: Path) -> None:
    """moto checks IAM user policies once INITIAL_NO_AUTH_ACTION_COUNT requests are spent.

    moto 5 rejects the signature of ListObjectsV2 requests that carry a Prefix when it checks
    credentials, so a whole backup cannot run against it this way; each kind of request a
    backup and a prune make is tried on its own instead, through vmvault's S3 backend.
    """
    import boto3

    from vmvault.backends.s3 import S3Backend

    with running_s3(tmp_path / "moto", buckets=("fleet",), extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "6"}) as s3:
        iam: Any = boto3.client(
            "iam", endpoint_url=s3.endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        )
        everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        backup_policy = {**BACKUP_ONLY_POLICY, "Statement": [*BACKUP_ONLY_POLICY["Statement"], MOTO_HEAD_BUCKET]}
        sessions: dict[str, Any] = {}
        for user, policy in (("admin", everything), ("backup", backup_policy)):  # the six free requests
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="vmvault", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            sessions[user] = boto3.session.Session(
                aws_access_key_id=key["AccessKeyId"],
                aws_secret_access_key=key["SecretAccessKey"],
                region_name="us-east-1",
            )
        admin = S3Backend("fleet", "repo", endpoint_url=s3.endpoint, session=sessions["admin"])
        host = S3Backend("fleet", "repo", endpoint_url=s3.endpoint, session=sessions["backup"])
        for name in ("config", "keys/k1", "data/ab/ab01", "index/i1", "snapshots/s1"):
            admin.put(name, b"written by the administrator")

        # what a backup does: read anything, add objects, take and drop its lock
        assert host.get("config") == b"written by the administrator"
        for name in ("data/cd/cd02", "index/i2", "snapshots/s2", "locks/l1"):
            host.put(name, b"added by the backup host")
        assert host.modified("snapshots/s2") is not None
        host.delete("locks/l1")
        # what forget, prune and key removal do: refused by the server, with a clear error
        for name in ("data/ab/ab01", "index/i1", "snapshots/s1", "keys/k1", "config"):
            with pytest.raises(BackendPermissionError, match="access denied"):
                host.delete(name)
            assert admin.get(name) == b"written by the administrator"
        # outside the repository's prefix it can do nothing at all
        with pytest.raises(BackendPermissionError):
            S3Backend("fleet", "other", endpoint_url=s3.endpoint, session=sessions["backup"]).put("x", b"1")


class _RecordingBackend(LocalBackend):
    """A local backend that writes down every delete asked of it."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.deleted: list[str] = []

    def delete(self, name: str) -> None:
        self.deleted.append(name)
        super().delete(name)


def test_backup_deletes_nothing_but_its_own_lock(tmp_path: Path) -> None:
    Repository.init(LocalBackend(str(tmp_path / "repo")), PASSWORD, chunk_size=CHUNK).close()
    backend = _RecordingBackend(str(tmp_path / "repo"))
    repo = Repository.open(backend, PASSWORD)
    img = tmp_path / "vm.img"
    for seed in (1, 2):  # a first backup and an incremental one
        backend.deleted.clear()
        backup(repo, open_source(str(_image(img, seed))))
        assert len(backend.deleted) == 1 and backend.deleted[0].startswith("locks/"), backend.deleted
