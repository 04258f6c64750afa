"""The S3 backend against a real object store: Ceph's RADOS Gateway (Debian 12's radosgw 16.2)
on a single-node cluster on loopback (``tests/ceph.py``), besides moto (``test_s3.py``).

The backend contract runs against it as the ``s3-rgw`` flavour of ``store`` (conftest.py);
here: multipart uploads, list pagination, Object Lock retention enforced by the gateway
(for the backend, and for a whole repository with ``immutable_days`` or ``?immutable-days=``),
refused credentials, a real quota, and the gateway killed mid-upload and mid-backup.

Where RGW answers differently from moto (and what vmvault does about it):

* RGW 16 ignores the Object Lock headers of CreateMultipartUpload: the completed object has
  no retention. The backend checks every multipart object after completing it and sets its
  retention with PutObjectRetention (``S3Backend._ensure_retention``); without that, every
  pack above the multipart threshold would have been deletable.
* RGW keeps unfinished multipart uploads across a gateway restart (its state is in RADOS);
  moto forgets them. An upload cut by a restart continues where it stopped.
* RGW answers error responses without a message, and a full quota as ``403 QuotaExceeded``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.ceph import CephCluster
from tests.engine.test_network_faults import _finish, _init, _paused_when, _start_backup, _verify
from tests.repo.test_immutability import CHUNK, KEEP_ONE, PASSWORD, _image, _names, _two_snapshots, _unreferenced_pack
from vmvault.backends import open_backend
from vmvault.backends._retry import RetryPolicy
from vmvault.backends.s3 import S3Backend, open_s3
from vmvault.engine.backup import backup
from vmvault.errors import BackendPermissionError, ConfigError, StorageFullError
from vmvault.hypervisors import open_source
from vmvault.repo.check import DELETED, UNLOCKED, check
from vmvault.repo.immutability import deleted_objects, lock_objects, undelete_objects, unlocked_objects
from vmvault.repo.prune import forget, prune
from vmvault.repo.repository import Repository

pytestmark = pytest.mark.integration

MiB = 1 << 20
SMALL_PARTS: dict[str, Any] = {"multipart_threshold": 8 * MiB, "part_size": 5 * MiB}
QUICK = RetryPolicy(attempts=3, initial_delay=0.05, max_delay=0.2)
EXIT_OK, EXIT_STORAGE_FULL = 0, 14
#: the disk image of the whole-backup tests, in 1 MiB packs (``_init``)
IMAGE_SIZE = 16 * MiB


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _client(rgw: CephCluster) -> Any:
    return rgw.client()


def _retention(client: Any, bucket: str, key: str) -> tuple[str | None, datetime.datetime | None]:
    head = client.head_object(Bucket=bucket, Key=key)
    return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")


# --- plain S3 behaviour ---------------------------------------------------------------------


def test_multipart_above_threshold_only(rgw: CephCluster) -> None:
    rgw.create_bucket("plain")
    client = _client(rgw)
    with open_s3(rgw.url("plain", "multipart"), multipart_threshold=16 * MiB, part_size=5 * MiB) as b:
        at_threshold = os.urandom(16 * MiB)
        above = os.urandom(16 * MiB + 1)
        b.put("data/at", at_threshold)
        b.put("data/above", above)
        assert b.get("data/at") == at_threshold
        assert b.get("data/above") == above
        assert b.get("data/above", 15 * MiB - 7, MiB + 100) == above[15 * MiB - 7 :]
        assert {o.name: o.size for o in b.list("data/")} == {"data/above": 16 * MiB + 1, "data/at": 16 * MiB}
    # the gateway marks a multipart object's ETag with "-<number of parts>", as S3 does
    assert "-" not in client.head_object(Bucket="plain", Key="multipart/data/at")["ETag"]
    assert client.head_object(Bucket="plain", Key="multipart/data/above")["ETag"].endswith('-4"')
    assert client.list_multipart_uploads(Bucket="plain", Prefix="multipart/").get("Uploads", []) == []


def test_list_paginates(rgw: CephCluster) -> None:
    rgw.create_bucket("plain")
    with open_s3(rgw.url("plain", "pages"), list_page_size=50) as b:
        names = [f"data/{i % 16:02x}/{i:05d}" for i in range(234)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: b.put(n, n.encode()), names))
        listed = list(b.list("data/"))
        assert [o.name for o in listed] == sorted(names)
        assert all(o.size == len(o.name) for o in listed)
        assert [o.name for o in b.list("data/0")] == sorted(n for n in names if n.startswith("data/0"))


def test_wrong_secret_is_a_permission_error_at_once(rgw: CephCluster, caplog: pytest.LogCaptureFixture) -> None:
    import boto3

    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    rgw.create_bucket("plain")
    session = boto3.session.Session(
        aws_access_key_id=rgw.access_key, aws_secret_access_key="not-the-secret", region_name="us-east-1"
    )
    with pytest.raises(BackendPermissionError, match="check the credentials") as info:
        S3Backend("plain", "p", endpoint_url=rgw.endpoint, session=session, retry=QUICK)
    assert not caplog.records, "refused credentials must not be retried"
    assert rgw.secret_key not in str(info.value)


# --- Object Lock, enforced by the gateway ---------------------------------------------------


def test_object_lock_retention_is_enforced_by_the_gateway(rgw: CephCluster) -> None:
    rgw.create_bucket("vault", object_lock=True)
    client = _client(rgw)
    with open_s3(rgw.url("vault", "backend?immutable-days=7"), **SMALL_PARTS) as b:
        assert b.enforces_immutability
        b.put("data/small", b"keep me")
        b.put("data/big", os.urandom(11 * MiB))  # multipart: the gateway ignores its lock headers
        b.put("locks/mine", b"lock")
        now = datetime.datetime.now(datetime.UTC)
        for key in ("backend/data/small", "backend/data/big"):
            mode, until = _retention(client, "vault", key)
            assert mode == "COMPLIANCE", key
            assert until is not None and datetime.timedelta(days=6, hours=23) < until - now <= datetime.timedelta(
                days=7
            )
        assert _retention(client, "vault", "backend/locks/mine") == (None, None)
        b.delete("locks/mine")
        assert client.list_object_versions(Bucket="vault", Prefix="backend/locks/").get("Versions")

        for key in ("backend/data/small", "backend/data/big"):
            version = client.head_object(Bucket="vault", Key=key)["VersionId"]
            # the gateway itself refuses, to the bucket's owner: removing the locked version ...
            with pytest.raises(client.exceptions.ClientError) as refused:
                client.delete_object(Bucket="vault", Key=key, VersionId=version)
            assert refused.value.response["Error"]["Code"] == "AccessDenied"
            # ... shortening its retention, or weakening it to GOVERNANCE
            for retention in (
                {"Mode": "COMPLIANCE", "RetainUntilDate": now + datetime.timedelta(hours=1)},
                {"Mode": "GOVERNANCE", "RetainUntilDate": now + datetime.timedelta(days=8)},
            ):
                with pytest.raises(client.exceptions.ClientError) as refused:
                    client.put_object_retention(
                        Bucket="vault", Key=key, VersionId=version, Retention=retention, BypassGovernanceRetention=True
                    )
                assert refused.value.response["Error"]["Code"] == "AccessDenied"
        # the backend's delete only hides the object behind a delete marker; an overwrite is a
        # new version: the locked bytes stay
        version = client.head_object(Bucket="vault", Key="backend/data/small")["VersionId"]
        b.put("data/small", b"overwritten")
        b.delete("data/small")
        assert not b.exists("data/small")
        kept = client.get_object(Bucket="vault", Key="backend/data/small", VersionId=version)
        assert kept["Body"].read() == b"keep me"


def test_object_lock_needs_a_locking_bucket(rgw: CephCluster) -> None:
    rgw.create_bucket("plain")
    with pytest.raises(ConfigError, match="Object Lock"):
        open_s3(rgw.url("plain", "x?immutable-days=7"))
    with open_s3(rgw.url("plain", "x")) as b:
        assert not b.enforces_immutability


def test_repository_retention_on_the_gateway(rgw: CephCluster, tmp_path: Path) -> None:
    """A repository made with ``immutable_days``: every data, index and snapshot object (packs
    above the multipart threshold too) is locked by the gateway; forget and prune decline,
    check stays clean, and the gateway refuses a direct delete of a locked version."""
    rgw.create_bucket("vault", object_lock=True)
    client = _client(rgw)
    url = rgw.url("vault", "repo") + "?multipart-threshold=5242880&part-size=5242880"
    repo = Repository.init(open_backend(url), PASSWORD, chunk_size=CHUNK, pack_size=8 * MiB, immutable_days=1)
    assert repo.retention_enforced and repo.backend.enforces_immutability
    old, _new = _two_snapshots(repo, tmp_path)
    # a pack above the multipart threshold (5 MiB) goes up in parts
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(7 * MiB))
    backup(repo, open_source(str(big)))
    repo.close()

    objects = {o.name: o.size for p in ("data/", "index/", "snapshots/") for o in repo.backend.list(p)}
    assert any(size > 5 * MiB for name, size in objects.items() if name.startswith("data/")), objects
    for name in objects:
        assert _retention(client, "vault", f"repo/{name}")[0] == "COMPLIANCE", name
    for name in _names(repo.backend, "keys/"):
        assert _retention(client, "vault", f"repo/{name}")[0] is None, name

    repo = Repository.open(open_backend(rgw.url("vault", "repo")), PASSWORD)
    assert repo.config.immutable_days == 1 and repo.retention_enforced
    report = forget(repo, KEEP_ONE)
    assert old in report.retained and report.removed == []
    _unreferenced_pack(repo)
    before = _names(repo.backend, "data/", "index/", "snapshots/")
    pr = prune(repo, max_unused=0.0)
    assert pr.packs_retained >= 1 and pr.packs_deleted == 0
    assert _names(repo.backend, "data/", "index/", "snapshots/") == before
    result = check(repo, read_data=True)
    assert result.ok, [p.to_dict() for p in result.problems]
    # check looked each object's lock up on the gateway (HeadObject's Object Lock fields)
    assert result.stats["objects_lock_checked"] >= len(objects)
    assert not list(repo.backend.list("locks/")), "locks must stay deletable"
    # a backup whose uploads asked for no retention (as to a server that ignores it): check
    # names what the gateway left unlocked, and repair locks it (PutObjectRetention)
    backend: Any = repo.backend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "_lock_args", lambda name: {})
        patch.setattr(backend, "_ensure_retention", lambda name, key, version: None)
        backup(repo, open_source(str(_image(tmp_path / "late.img", 9))))
    unlocked = {p.object for p in check(repo).errors if p.kind == UNLOCKED}
    assert unlocked and all(_retention(client, "vault", f"repo/{n}")[0] is None for n in unlocked)
    found = unlocked_objects(repo).unlocked
    assert lock_objects(repo, found) == len(unlocked)
    assert check(repo).ok
    assert all(_retention(client, "vault", f"repo/{n}")[0] == "COMPLIANCE" for n in unlocked)
    # a snapshot deleted with the storage's credentials: the gateway keeps the locked version
    # under a delete marker; check names it and repair undelete brings it back
    client.delete_object(Bucket="vault", Key=f"repo/snapshots/{old}")
    assert [p.object for p in check(repo).errors if p.kind == DELETED] == [f"snapshots/{old}"]
    assert undelete_objects(repo, deleted_objects(repo)) == 1
    assert check(repo).ok and old in Repository.open(open_backend(rgw.url("vault", "repo")), PASSWORD).snapshot_ids()
    repo.close()

    key = f"repo/snapshots/{old}"
    version = client.list_object_versions(Bucket="vault", Prefix=key)["Versions"][0]["VersionId"]
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.delete_object(Bucket="vault", Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_location_retention_on_the_gateway(rgw: CephCluster, tmp_path: Path) -> None:
    """``?immutable-days=N`` on the location of a repository made without it."""
    rgw.create_bucket("vault", object_lock=True)
    client = _client(rgw)
    repo = Repository.init(open_backend(rgw.url("vault", "by-url") + "?immutable-days=1"), PASSWORD, chunk_size=CHUNK)
    assert repo.config.immutable_days is None and repo.retention_enforced
    old, _new = _two_snapshots(repo, tmp_path)
    for name in _names(repo.backend, "data/", "index/", "snapshots/"):
        assert _retention(client, "vault", f"by-url/{name}")[0] == "COMPLIANCE", name
    assert forget(repo, KEEP_ONE).retained == [old]
    assert old in repo.snapshot_ids()
    repo.close()


# --- the gateway killed mid-upload ------------------------------------------------------------


def _uploading(client: Any, bucket: str) -> Callable[[], bool]:
    """True once a multipart upload in ``bucket`` has a part stored."""

    def check() -> bool:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return any(client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts") for u in uploads)

    return check


@pytest.mark.slow
def test_gateway_killed_mid_multipart_then_back(rgw: CephCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    rgw.create_bucket("fault-bucket")
    client = _client(rgw)
    data = os.urandom(60 * MiB)
    patient = RetryPolicy(attempts=10, initial_delay=0.3, max_delay=1.5)
    with open_s3(rgw.url("fault-bucket", "repo"), retry=patient, botocore_attempts=2, **SMALL_PARTS) as b:
        errors: list[BaseException] = []
        partial: list[int] = []

        def upload() -> None:
            try:
                b.put("data/big", data)
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=upload)
        writer.start()
        deadline = time.monotonic() + 60
        while not _uploading(client, "fault-bucket")():
            assert writer.is_alive() and time.monotonic() < deadline, "never caught the multipart upload in flight"
            time.sleep(0.01)
        with pytest.raises(client.exceptions.ClientError):
            client.head_object(Bucket="fault-bucket", Key="repo/data/big")
        rgw.kill_gateway()
        assert writer.is_alive(), "the upload ended before the gateway was killed"
        # down for longer than botocore's own retries last, so that the backend's retry
        # loop has to carry the upload over the gap
        time.sleep(3.0)
        rgw.start_gateway()
        # from the restart on, the name shows nothing or the whole object, never a part
        while writer.is_alive():
            try:
                size = client.head_object(Bucket="fault-bucket", Key="repo/data/big")["ContentLength"]
                if size != len(data):
                    partial.append(size)
            except client.exceptions.ClientError:
                pass
            time.sleep(0.01)
        writer.join()
        assert not errors, errors
        assert not partial, partial
        assert b.get("data/big") == data
        assert [o.name for o in b.list()] == ["data/big"]
        assert client.list_multipart_uploads(Bucket="fault-bucket").get("Uploads", []) == []
    assert any("retrying" in r.getMessage() for r in caplog.records), "the kill caused no retry"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gateway_killed_mid_backup_is_retried(rgw: CephCluster, tmp_path: Path) -> None:
    rgw.create_bucket("faults")
    client = _client(rgw)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    backend = open_backend(rgw.url("faults", "killed"))
    _init(backend)

    def indexed() -> bool:
        return bool(client.list_objects_v2(Bucket="faults", Prefix="killed/index/").get("KeyCount"))

    proc = _start_backup(rgw.url("faults", "killed"), image, rgw.client_env())
    with _paused_when(indexed, proc, "the first index file"):
        rgw.kill_gateway()  # every connection the backup holds dies with it
    time.sleep(1.5)
    rgw.start_gateway()
    code, out, err = _finish(proc)
    assert code == EXIT_OK, err
    assert json.loads(out)["bytes_read"] == IMAGE_SIZE
    _verify(backend, image, tmp_path, snapshots=1)


# --- a real quota ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bucket_quota_is_storage_full(rgw: CephCluster, tmp_path: Path) -> None:
    """The gateway's own bucket quota (403 QuotaExceeded): exit code 14, no snapshot, and
    the next run after the quota is raised reuses what was uploaded."""
    rgw.create_bucket("quota")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    url = rgw.url("quota", "repo")
    backend = open_backend(url)
    _init(backend)
    # room for three quarters of the image: past the first index file (every 8 packs)
    limit = IMAGE_SIZE * 3 // 4
    rgw.admin("quota", "set", "--quota-scope", "bucket", "--bucket", "quota", "--max-size", str(limit))
    rgw.admin("quota", "enable", "--quota-scope", "bucket", "--bucket", "quota")
    try:
        with pytest.raises(StorageFullError, match="full or over quota"):
            backend.put("data/xx/too-big", os.urandom(limit + MiB))
        code, _out, err = _finish(_start_backup(url, image, rgw.client_env()))
        assert code == EXIT_STORAGE_FULL, err
        assert "full or over quota" in err and "Traceback" not in err, err
        assert list(backend.list("snapshots/")) == [], "a failed backup left a snapshot"
        # the gateway checks a write against the bucket's cached size: a pack or two may go
        # past the limit, not the whole image
        stored = sum(o.size for o in backend.list("data/"))
        assert limit // 2 < stored < IMAGE_SIZE
    finally:
        rgw.admin("quota", "disable", "--quota-scope", "bucket", "--bucket", "quota")
    code, out, err = _finish(_start_backup(url, image, rgw.client_env()))
    assert code == EXIT_OK, err
    # the packs indexed before the refusal (an index file every 8 packs) are reused
    assert json.loads(out)["bytes_added"] < IMAGE_SIZE - 4 * MiB, out
    _verify(backend, image, tmp_path, snapshots=1)
