"""An S3 server that answers with what it likes: statuses, headers and bodies of moto's answers
changed on the way by a proxy (tests/servers.py ``FaultyHttpProxy.mangle``), seeded.

What must hold: every backend call returns or raises a ``VmvaultError`` (never what botocore's
parsers raise on a shape they did not expect); a ranged read returns the bytes asked for, or
fewer only at the object's end; a repository read through such answers restores the bytes
that were backed up or fails with a ``VmvaultError``.

A campaign of 1,300 rounds found: a listing entry that is text where an object was expected
(``TypeError`` in botocore's handlers), a date no parser reads (``RuntimeError``), a body that
does not match its stored CRC-32 (``FlexibleChecksumError``), all tracebacks; and ranged reads
answered short, or refused as out of range (416) inside the object, passed on as the end.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator

import pytest

from tests.conftest import CAMPAIGN_SCALE, RANDOM_EXAMPLES
from tests.repo.builders import PASS, Content, backup, disk_image, make_repo, restore_all
from tests.servers import FaultyHttpProxy, Mangle, S3Server, running_s3
from vmvault.backends._retry import RetryPolicy
from vmvault.backends.s3 import S3Backend, open_s3
from vmvault.errors import VmvaultError
from vmvault.repo.repository import Repository

pytestmark = pytest.mark.integration

ROUNDS = 40 * CAMPAIGN_SCALE
SEED = int(os.environ.get("VMVAULT_S3_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if RANDOM_EXAMPLES else 6
)
QUICK = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)
STATUSES = [200, 204, 206, 301, 304, 307, 400, 403, 404, 409, 412, 416, 500, 503, 999]
NUMBERS = [b"-1", b"0", b"18446744073709551616", b"1e9", b"x", b"", b"99999999999999999999999"]
TAGS = [b"Key", b"Size", b"Contents", b"IsTruncated", b"NextContinuationToken", b"Error", b"Code", b"X"]
BODIES = [
    b"<?xml version='1.0'?><a>",
    b"\xff\xfe\x00",
    b"<Error><Code>NoSuchKey</Code></Error>",
    b"{}",
    b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
]
HEADERS = ["Content-Range", "ETag", "Last-Modified", "x-amz-object-lock-retain-until-date", "Content-Type"]
HEADER_VALUES = [
    "bytes 0-0/1", "bytes */5", "bytes 5-1/9", "bytes 0-99999999999/1", "x", "", '""', "Mon, 99 Foo 3000",
    "2026-13-45T99:00:00Z", "-5", "1", "123456789012345678901234567890",
]  # fmt: skip


def _body(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.choice(["flip", "cut", "number", "tag", "repeat", "other", "empty"])
    if kind == "flip" and out:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "cut" and out:
        del out[rng.randrange(len(out)) :]
    elif kind == "number" and (found := list(re.finditer(rb">(\d+)<", data))):
        hit = rng.choice(found)
        out[hit.start(1) : hit.end(1)] = rng.choice(NUMBERS)
    elif kind == "tag" and (found := list(re.finditer(rb"</?([A-Za-z]+)>", data))):
        hit = rng.choice(found)
        out[hit.start(1) : hit.end(1)] = rng.choice(TAGS)
    elif kind == "repeat" and (found := list(re.finditer(rb"<Contents>.*?</Contents>", data, re.S))):
        hit = rng.choice(found)
        out[hit.end() : hit.end()] = hit.group(0) * rng.randint(1, 3)
    elif kind == "other":
        out = bytearray(rng.choice(BODIES))
    elif kind == "empty":
        out = bytearray()
    return bytes(out)


def _headers(headers: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    if rng.random() < 0.2 and headers:
        return [h for i, h in enumerate(headers) if i != rng.randrange(len(headers))]
    name = rng.choice(HEADERS)
    return [h for h in headers if h[0].lower() != name.lower()] + [(name, rng.choice(HEADER_VALUES))]


def _mangler(rng: random.Random, share: float) -> Mangle:
    def mangle(
        _method: str, _path: str, status: int, headers: list[tuple[str, str]], data: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if rng.random() < share:
            roll = rng.random()
            if roll < 0.25:
                status = rng.choice(STATUSES)
            elif roll < 0.5:
                headers = _headers(headers, rng)
            else:
                data = _body(data, rng)
        return status, headers, data

    return mangle


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[FaultyHttpProxy]:
    """Its own moto server (its bucket's objects are the test's), behind a proxy."""
    with (
        running_s3(tmp_path_factory.mktemp("moto-fuzz"), buckets=("fuzz-bucket",)) as server,
        FaultyHttpProxy(server.port) as proxy,
    ):
        yield proxy


def test_changed_answers_end_each_call_in_a_storage_error_or_the_bytes_asked_for(moto: FaultyHttpProxy) -> None:
    rng = random.Random(SEED)
    truth: dict[str, bytes] = {}
    moto.mangle = None
    with open_s3(moto.url("fuzz-bucket", "calls"), retry=QUICK) as setup:
        for i in range(6):
            truth[f"data/{i:02x}/{i:064x}"] = rng.randbytes(rng.randint(0, 300_000))
        for i in range(3):
            truth[f"index/{i:064x}"] = rng.randbytes(500)
        for name, data in truth.items():
            setup.put(name, data)
    failed = 0
    for round_ in range(ROUNDS):
        # one opening in three meets changed answers too, one in five asks for Object Lock
        moto.mangle = _mangler(rng, 0.5) if round_ % 3 == 0 else None
        try:
            backend = open_s3(moto.url("fuzz-bucket", "calls"), retry=QUICK, botocore_attempts=1, **_lock(round_))
        except VmvaultError:
            continue
        moto.mangle = _mangler(rng, 0.5)
        with backend:
            for _ in range(6):
                op, name = (
                    rng.choice(["list", "get", "range", "exists", "put", "delete", "modified"]),
                    rng.choice(sorted(truth)),
                )
                try:
                    _call(backend, op, name, truth[name], rng)
                except VmvaultError:
                    failed += 1
                except Exception as exc:  # the finding: name the round to replay it
                    raise AssertionError((SEED, round_, op, name)) from exc
    assert failed, "the changed answers were never felt"


def _lock(round_: int) -> dict[str, int]:
    return {"retention_days": 3} if round_ % 5 == 0 else {}


def _call(backend: S3Backend, op: str, name: str, data: bytes, rng: random.Random) -> None:
    if op == "list":
        for found in backend.list(rng.choice(["data/", "index/", ""])):
            assert isinstance(found.name, str) and isinstance(found.size, int) and found.size >= 0, found
    elif op == "get":
        backend.get(name)
    elif op == "range" and len(data) > 1:
        offset = rng.randrange(len(data) - 1)
        length = rng.randint(1, len(data) - offset)
        got = backend.get(name, offset, length)
        assert len(got) == length, (name, offset, length, len(got))
    elif op == "exists":
        assert isinstance(backend.exists(name), bool)
    elif op == "put":
        backend.put(f"snapshots/{rng.getrandbits(256):064x}", rng.randbytes(100))
    elif op == "delete":
        backend.delete(f"snapshots/{rng.getrandbits(256):064x}")
    elif op == "modified":
        stamp = backend.modified(name)
        assert stamp is None or isinstance(stamp, float)


def test_a_repository_read_through_changed_answers_gives_its_bytes_or_a_storage_error(moto: FaultyHttpProxy) -> None:
    rng = random.Random(SEED + 1)
    moto.mangle = None
    url = moto.url("fuzz-bucket", "repository")
    content = Content(disks={"web01.raw": disk_image(3, 16), "db01.raw": disk_image(4, 8)})
    with open_s3(url, retry=QUICK) as setup:
        backup(make_repo(setup), content)
    outcomes = {"restored": 0, "refused": 0, "listed otherwise": 0}
    for round_ in range(ROUNDS // 4):
        moto.mangle = _mangler(rng, 0.08)
        try:
            with open_s3(url, retry=QUICK, botocore_attempts=1) as backend:
                repo = Repository.open(backend, PASS)
                ids = set(repo.snapshot_ids())
                if len(ids) != 1:  # a listing the server cut short or repeated: its to decide
                    outcomes["listed otherwise"] += 1
                    continue
                snap = repo.load_snapshot(ids.pop())
                assert restore_all(repo, snap) == content, (SEED + 1, round_, "other bytes restored")
                outcomes["restored"] += 1
        except VmvaultError:
            outcomes["refused"] += 1
        except Exception as exc:
            raise AssertionError((SEED + 1, round_)) from exc
    assert outcomes["refused"], outcomes
