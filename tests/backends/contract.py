"""The backend contract: what ``vmvault.backends.base.Backend`` promises, checked on a backend.

Subclass :class:`BackendContract` in a test module; it needs a ``store`` fixture yielding a
:class:`tests.backends.conftest.StoreUnderTest`. ``tests/backends/test_contract.py`` runs it
against memory, local, sftp, s3 (moto) and s3-rgw (Ceph RADOS Gateway).
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.backends.conftest import StoreUnderTest
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import ObjectNotFoundError

MiB = 1 << 20


def payload(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes that differ per seed, so a mixed-up object cannot pass."""
    return random.Random(seed).randbytes(size)


def names(backend: Backend, prefix: str = "") -> list[str]:
    return [info.name for info in backend.list(prefix)]


class BackendContract:
    # --- put / get / exists / delete ------------------------------------------------------

    def test_round_trip(self, store: StoreUnderTest) -> None:
        b = store.backend
        data = payload(1000, seed=1)
        b.put("config", data)
        assert b.get("config") == data
        assert b.exists("config")
        assert not b.exists("conf")

    def test_parts_are_stored_as_their_concatenation(self, store: StoreUnderTest) -> None:
        """``put_parts`` (a pack's sealed blobs) stores exactly what ``put`` of their join
        would, counted as one write: parts of every size, empty ones, one past a write's slice."""
        b = store.backend
        parts = [payload(n, seed=n) for n in (16, 0, 180_000, 1, (1 << 20) + 5, 70_000, 0, 3)]
        before = b.requests.to_dict()
        b.put_parts("data/ab/parts", parts)
        after = b.requests.to_dict()
        assert b.get("data/ab/parts") == b"".join(parts)
        assert after["put"] - before["put"] == 1
        assert after["bytes_written"] - before["bytes_written"] == sum(map(len, parts))

    def test_requests_are_counted(self, store: StoreUnderTest) -> None:
        """``requests`` counts each operation once, with the bytes it moved (the restore's
        benchmarks and tests read it to count round trips)."""
        b = store.backend
        data = payload(3000, seed=7)
        before = b.requests.to_dict()
        b.put("data/aa/counted", data)
        assert b.get("data/aa/counted", 1000, 500) == data[1000:1500]
        assert b.get("data/aa/counted") == data
        assert b.exists("data/aa/counted")
        assert [o.name for o in b.list("data/")] == ["data/aa/counted"]
        b.delete("data/aa/counted")
        after = b.requests.to_dict()
        delta = {k: after[k] - before[k] for k in after}
        assert delta["put"] == 1 and delta["bytes_written"] == 3000
        assert delta["get"] == 2 and delta["bytes_read"] == 3500
        assert delta["stat"] >= 1 and delta["list"] == 1 and delta["delete"] == 1
        assert b.requests.gets == after["get"]

    def test_get_missing_raises_object_not_found(self, store: StoreUnderTest) -> None:
        b = store.backend
        with pytest.raises(ObjectNotFoundError) as info:
            b.get("data/00/missing")
        assert info.value.name == "data/00/missing"
        assert "data/00/missing" in str(info.value)
        with pytest.raises(ObjectNotFoundError):
            b.get("data/00/missing", 10, 10)

    def test_delete(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("locks/a", b"lock")
        b.delete("locks/a")
        assert not b.exists("locks/a")
        assert names(b) == []
        with pytest.raises(ObjectNotFoundError):
            b.get("locks/a")
        # deleting what is not there is not an error, twice over
        b.delete("locks/a")
        b.delete("never/was")

    def test_a_directory_is_not_an_object(self, store: StoreUnderTest) -> None:
        """Names are flat: the "directory" ``data/ab`` of ``data/ab/x`` is no object."""
        b = store.backend
        b.put("data/ab/x", b"x")
        assert not b.exists("data/ab")
        assert not b.exists("data")
        with pytest.raises(ObjectNotFoundError):
            b.get("data/ab")
        b.delete("data/ab")
        assert b.get("data/ab/x") == b"x"

    def test_overwrite_replaces_whole(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("locks/host", payload(5000, seed=2))
        shorter = payload(100, seed=3)
        b.put("locks/host", shorter)
        assert b.get("locks/host") == shorter
        assert list(b.list("locks/")) == [ObjectInfo("locks/host", 100)]
        longer = payload(9000, seed=4)
        b.put("locks/host", longer)
        assert b.get("locks/host") == longer

    def test_a_stamp_changes_when_an_object_is_written_again(self, store: StoreUnderTest) -> None:
        """Where a listing stamps objects (``ObjectInfo.stamp``), the stamp stays while the object
        does and changes when it is written again, even with other bytes of the same size: the
        index cache reads such a file again."""
        b = store.backend
        b.put("index/stamped", payload(300, seed=5))
        (first,) = b.list("index/")
        (again,) = b.list("index/")
        assert again.stamp == first.stamp
        if not first.stamp:
            return  # this storage says nothing
        time.sleep(1.1)  # SFTP gives whole seconds
        b.put("index/stamped", payload(300, seed=6))
        (rewritten,) = b.list("index/")
        assert rewritten.size == first.size and rewritten.stamp != first.stamp

    def test_empty_object(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("keys/empty", b"")
        assert b.exists("keys/empty")
        assert b.get("keys/empty") == b""
        assert b.get("keys/empty", 0, 10) == b""
        assert b.get("keys/empty", 5) == b""
        assert list(b.list("keys/")) == [ObjectInfo("keys/empty", 0)]

    # --- ranged get -----------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("offset", "length", "expected"),
        [
            (0, None, slice(0, 1000)),
            (0, 1000, slice(0, 1000)),
            (10, 20, slice(10, 30)),
            (999, 1, slice(999, 1000)),
            (500, None, slice(500, 1000)),
            (990, 50, slice(990, 1000)),  # short read at the end
            (1000, 10, slice(0, 0)),  # starts at the end
            (5000, 10, slice(0, 0)),  # starts past the end
            (1000, None, slice(0, 0)),
            (7, 0, slice(0, 0)),
        ],
    )
    def test_ranged_get(self, store: StoreUnderTest, offset: int, length: int | None, expected: slice) -> None:
        data = payload(1000, seed=5)
        store.backend.put("data/ab/range", data)
        assert store.backend.get("data/ab/range", offset, length) == data[expected]

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (0, 12411),  # the whole object: three blocks of 4 KiB and a part
            (0, 4096),
            (4096, 8192),  # whole blocks
            (10, 20),  # within one block
            (4000, 200),  # across a block boundary
            (4095, 8193),
            (12000, 1000),  # short at the end
            (12411, 10),  # starts at the end
            (99999, 10),  # past it
            (7, 0),
        ],
    )
    def test_get_into_reads_what_get_reads(self, store: StoreUnderTest, offset: int, length: int) -> None:
        """``get_into`` (a restore's ranged reads) returns ``get``'s bytes, whatever the range's
        alignment, one buffer serving one call after another; one read each."""
        b = store.backend
        data = payload(12411, seed=6)
        b.put("data/ab/into", data)
        buffer = mmap.mmap(-1, 64 * 1024)
        buffer.write(b"\xee" * len(buffer))  # left over from an earlier range: never returned
        before = b.requests.to_dict()
        for _ in range(2):
            got = b.get_into("data/ab/into", offset, length, buffer)
            assert bytes(got) == data[offset : offset + length]
            del got
        after = b.requests.to_dict()
        assert after["get"] - before["get"] == 2
        assert after["bytes_read"] - before["bytes_read"] == 2 * len(data[offset : offset + length])

    def test_get_into_a_large_range(self, store: StoreUnderTest) -> None:
        b = store.backend
        data = payload(3 * MiB + 5, seed=7)
        b.put("data/ab/large", data)
        buffer = mmap.mmap(-1, 4 * MiB)
        for offset, length in ((0, len(data)), (5, 3 * MiB), (MiB - 1, MiB + 2)):
            assert bytes(b.get_into("data/ab/large", offset, length, buffer)) == data[offset : offset + length]
        with pytest.raises(ObjectNotFoundError):
            b.get_into("data/00/missing", 0, 10, buffer)

    # --- list -----------------------------------------------------------------------------

    def test_list_prefixes(self, store: StoreUnderTest) -> None:
        b = store.backend
        objects = {
            "config": 11,
            "keys/key-1": 12,
            "keys/key-2": 13,
            "data/ab/ab01": 14,
            "data/ab/ab02": 15,
            "data/ac/ac01": 16,
            "data/ff/ff01": 0,
            "snapshots/s1": 17,
            "index/ab/cd/ef": 18,
        }
        for name, size in objects.items():
            b.put(name, payload(size, seed=size))
        assert list(b.list()) == sorted((ObjectInfo(n, s) for n, s in objects.items()), key=lambda o: o.name)
        assert names(b, "keys/") == ["keys/key-1", "keys/key-2"]
        assert list(b.list("data/")) == [
            ObjectInfo("data/ab/ab01", 14),
            ObjectInfo("data/ab/ab02", 15),
            ObjectInfo("data/ac/ac01", 16),
            ObjectInfo("data/ff/ff01", 0),
        ]
        assert names(b, "data/ab/") == ["data/ab/ab01", "data/ab/ab02"]
        assert names(b, "data/a") == ["data/ab/ab01", "data/ab/ab02", "data/ac/ac01"]
        assert names(b, "index/") == ["index/ab/cd/ef"]
        assert names(b, "nothing/") == []
        assert names(b, "data/zz/") == []
        # "keys/" must not match a sibling that merely starts the same way
        b.put("keysmith", b"x")
        assert names(b, "keys/") == ["keys/key-1", "keys/key-2"]

    def test_list_sees_a_deleted_object_gone(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("data/00/a", b"a")
        b.put("data/00/b", b"b")
        b.delete("data/00/a")
        assert names(b, "data/") == ["data/00/b"]

    def test_many_levels(self, store: StoreUnderTest) -> None:
        b = store.backend
        deep = "/".join(f"level{i}" for i in range(12)) + "/object"
        data = payload(321, seed=6)
        b.put(deep, data)
        assert b.get(deep) == data
        assert names(b, "level0/") == [deep]
        assert names(b, "level0/level1/level2/") == [deep]

    def test_second_client_sees_the_same_objects(self, store: StoreUnderTest) -> None:
        if store.open_again is None:
            pytest.skip(f"{store.kind}: storage lives in one object only")
        store.backend.put("snapshots/shared", b"seen by both")
        other = store.open_again()
        try:
            assert other.get("snapshots/shared") == b"seen by both"
            other.delete("snapshots/shared")
        finally:
            other.close()
        assert not store.backend.exists("snapshots/shared")

    # --- size -----------------------------------------------------------------------------

    @pytest.mark.slow
    def test_large_object(self, store: StoreUnderTest) -> None:
        b = store.backend
        data = payload(21 * MiB + 12345, seed=7)
        b.put("data/big/object", data)
        assert list(b.list("data/big/")) == [ObjectInfo("data/big/object", len(data))]
        assert b.get("data/big/object") == data
        # ranges that cross 5 MiB (S3 part) and 32 KiB (SFTP request) boundaries
        for offset, length in ((5 * MiB - 3, 7), (MiB - 100, 3 * MiB), (21 * MiB, 1 << 20)):
            assert b.get("data/big/object", offset, length) == data[offset : offset + length]

    # --- concurrency and atomicity -------------------------------------------------------------

    @pytest.mark.slow
    def test_concurrent_puts(self, store: StoreUnderTest) -> None:
        b = store.backend
        jobs = {f"data/{i % 7:02x}/obj{i:03d}": payload(64 * 1024 + i * 4099, seed=100 + i) for i in range(48)}
        jobs["data/big/one"] = payload(9 * MiB, seed=99)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda item: b.put(*item), jobs.items()))
        assert names(b, "data/") == sorted(jobs)
        for name, data in jobs.items():
            assert b.get(name) == data, name

    def test_prepare_reads_names_a_few_reads_at_once_that_then_all_succeed(self, store: StoreUnderTest) -> None:
        """``prepare_reads``: a small count (a restore starts that many threads), and that many
        ranged reads at once return the data; asking again does not lower it."""
        b = store.backend
        data = payload(2_000_000, seed=77)
        b.put("data/77/ranges", data)
        assert b.get("data/77/ranges", 0, 10) == data[:10]  # the storage has answered once
        at_once = b.prepare_reads()
        assert 1 <= at_once <= 16
        starts = [i * 100_000 for i in range(2 * at_once)]
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            got = list(pool.map(lambda start: b.get("data/77/ranges", start, 150_000), starts))
        assert got == [data[s : s + 150_000] for s in starts]
        assert b.prepare_reads() >= at_once

    def test_warm_up_returns_at_once_and_transfers_follow(self, store: StoreUnderTest) -> None:
        """``warm_up`` (connections opened ahead, where a backend has any to open) costs the
        caller nothing and changes nothing: the same reads and writes from several threads
        right after it, on a second client of the same storage where there is one."""
        b = store.backend
        jobs = {f"data/{i:02x}/warm": payload(300_000 + i, seed=300 + i) for i in range(6)}
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda item: b.put(*item), jobs.items()))
        reader = store.open_again() if store.open_again is not None else b
        try:
            started = time.monotonic()
            reader.warm_up()
            assert time.monotonic() - started < 0.1, "warm_up must not wait for its connections"
            with ThreadPoolExecutor(max_workers=6) as pool:
                got = list(pool.map(lambda name: reader.get(name, 1000, 5000), jobs))
            assert got == [data[1000:6000] for data in jobs.values()]
            reader.warm_up()  # again, with every connection open: nothing changes
            assert reader.get("data/00/warm") == jobs["data/00/warm"]
        finally:
            if reader is not b:
                reader.close()

    def test_concurrent_puts_of_one_name(self, store: StoreUnderTest) -> None:
        """Writers racing on one name (lock files): the survivor is one of them, whole."""
        b = store.backend
        versions = [payload(200_000 + i * 1000, seed=200 + i) for i in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda data: b.put("locks/race", data), versions))
        assert b.get("locks/race") in versions
        assert names(b) == ["locks/race"]

    @pytest.mark.slow
    def test_reader_never_sees_a_partial_object(self, store: StoreUnderTest) -> None:
        b = store.backend
        reader = store.open_again() if store.open_again else b
        versions = [payload(6 * MiB, seed=300), payload(9 * MiB, seed=301)]
        b.put("snapshots/current", versions[0])
        seen: list[int] = []
        bad: list[int] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                data = reader.get("snapshots/current")
                if data in versions:
                    seen.append(versions.index(data))
                else:
                    bad.append(len(data))

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for i in range(6):
                b.put("snapshots/current", versions[(i + 1) % 2])
        finally:
            stop.set()
            thread.join()
            if reader is not b:
                reader.close()
        assert not bad, f"saw partial objects of sizes {bad}"
        assert seen
        assert names(b) == ["snapshots/current"]

    @pytest.mark.slow
    def test_killed_writer_leaves_the_old_object(self, store: StoreUnderTest) -> None:
        """Kill a writer process mid-put of a big object: the old object stays, whole, and no
        temporary object shows in ``list``."""
        if store.location is None or store.upload_in_progress is None:
            pytest.skip(f"{store.kind}: no storage outside this process to survive a killed writer")
        b = store.backend
        old = payload(MiB, seed=400)
        b.put("data/ab/victim", old)
        b.put("data/ab/bystander", b"still here")
        script = textwrap.dedent(
            """
            import sys
            from vmvault.backends import open_backend
            backend = open_backend(sys.argv[1])
            data = bytes([0x5A]) * int(sys.argv[2])
            print("writing", flush=True)
            backend.put("data/ab/victim", data)
            print("done", flush=True)
            """
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script, store.location, str(512 * MiB)],
            env={**os.environ, **store.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"writing\n", proc.stderr.read() if proc.stderr else ""
            deadline = time.monotonic() + 60
            while not store.upload_in_progress():
                assert proc.poll() is None, "the writer finished before it could be caught mid-put"
                assert time.monotonic() < deadline, "no upload in progress was ever visible"
                time.sleep(0.005)
            # while the upload runs, readers still see the old object
            assert b.get("data/ab/victim") == old
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert b.get("data/ab/victim") == old
        assert list(b.list()) == [ObjectInfo("data/ab/bystander", 10), ObjectInfo("data/ab/victim", MiB)]
        # and the name can be written again afterwards
        b.put("data/ab/victim", b"new")
        assert b.get("data/ab/victim") == b"new"

    def test_url_names_the_store_without_secrets(self, store: StoreUnderTest) -> None:
        url = store.backend.url
        assert url and url != "?"
        for secret in store.env.values():
            if secret and os.path.sep not in secret and len(secret) > 4:
                assert secret not in url
        for key in ("VMVAULT_SFTP_KEY", "AWS_SECRET_ACCESS_KEY"):
            if key in store.env:
                assert store.env[key] not in url

    # --- capabilities: declared on Backend, checked against the storage ----------------------

    def test_declared_capabilities_match_a_location_without_retention(self, store: StoreUnderTest) -> None:
        b = store.backend
        # the contract's locations ask for no retention: the storage gives none
        assert b.retention_days is None and b.enforces_immutability is False
        assert b.skipped() == {}

    def test_modified_is_the_write_time_or_unknown(self, store: StoreUnderTest) -> None:
        b = store.backend
        before = time.time()
        b.put("data/00/written", b"x")
        when = b.modified("data/00/written")
        # servers on loopback share this clock; S3 stamps whole seconds
        assert when is None or before - 2 <= when <= time.time() + 2, (before, when)
        assert b.modified("data/00/never-written") is None

    def test_a_listing_gives_the_write_time_or_nothing(self, store: StoreUnderTest) -> None:
        b = store.backend
        before = time.time()
        b.put("data/00/listed", b"x")
        (found,) = [o for o in b.list("data/00/") if o.name == "data/00/listed"]
        assert found.modified is None or before - 2 <= found.modified <= time.time() + 2, (before, found)

    def test_retention_of_a_store_that_locks_nothing(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("data/00/kept", b"k")
        # the contract's locations lock nothing: no retention is read, none can be given
        assert b.retention_of("data/00/kept") is None
        assert b.retain("data/00/kept", time.time() + 86400) is False
        b.delete("data/00/kept")
        assert not b.exists("data/00/kept")
        with pytest.raises(ObjectNotFoundError):
            b.retention_of("data/00/never-written")

    def test_a_store_without_versions_keeps_nothing_deleted(self, store: StoreUnderTest) -> None:
        b = store.backend
        b.put("data/00/gone", b"g")
        b.put("data/00/stays", b"s")
        b.delete("data/00/gone")
        # the contract's locations keep no versions: a delete hides nothing, it removes
        assert list(b.hidden("data/00/")) == []

    def test_use_retention_is_enforced_or_changes_nothing(self, store: StoreUnderTest) -> None:
        b = store.backend
        enforced = b.use_retention(1)
        assert isinstance(enforced, bool)
        if enforced:  # (a store with Object Lock: nothing written after this may be deleted)
            assert b.enforces_immutability and b.retention_days == 1
            return
        assert not b.enforces_immutability and b.retention_days is None
        b.put("data/00/r", b"r")
        b.delete("data/00/r")
        assert not b.exists("data/00/r")
