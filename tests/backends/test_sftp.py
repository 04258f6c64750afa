"""SFTP backend against a real OpenSSH server on loopback: trust, authentication, faults.

Tests taking the ``transport`` fixture run twice: through an ``ssh`` child process and through
paramiko's SSH; both must refuse, fail and recover in the same words."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from tests.backends.conftest import read_until_near, upload_in_progress
from tests.conftest import small_tmpfs
from tests.latency import relay
from tests.servers import SshServer, process_tree, running_sshd
from vmvault.backends import open_backend
from vmvault.backends._retry import RetryPolicy
from vmvault.backends._sftp_wire import Session
from vmvault.backends.sftp import SftpBackend, open_sftp
from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    BackendPermissionError,
    BackendUnreachableError,
    ConfigError,
    ObjectNotFoundError,
    StorageFullError,
    UnsafeStorageError,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
QUICK = RetryPolicy(attempts=3, initial_delay=0.05, max_delay=0.2)


def backend(server: SshServer, path: str, **options: object) -> SftpBackend:
    b = server.open_backend(path, **options)
    assert isinstance(b, SftpBackend)
    return b


@pytest.fixture(params=["openssh", "paramiko"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A server this test alone may kill and restart."""
    with running_sshd(tmp_path / "sshd") as server:
        yield server


def temporaries(directory: Path) -> list[str]:
    return [name for _d, _s, files in os.walk(directory) for name in files if ".tmp-" in name]


# --- host keys -----------------------------------------------------------------------------


def test_unknown_host_is_refused_with_keyscan_advice(sshd_server: SshServer, tmp_path: Path, transport: str) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    b = backend(sshd_server, "unknown-host", known_hosts=str(known), retry=QUICK, transport=transport)
    with pytest.raises(BackendPermissionError) as info:
        b.put("config", b"x")
    message = str(info.value)
    assert "not in" in message and str(known) in message
    assert f"ssh-keyscan -p {sshd_server.port} 127.0.0.1 >> {known}" in message
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", f"{sshd_server.host_key}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert fingerprint in message
    # refused, not learnt: nothing was written to known_hosts, nothing to the server
    assert known.read_text() == ""
    assert not (sshd_server.root / "unknown-host").exists()


def test_missing_known_hosts_file_is_refused_not_created(
    sshd_server: SshServer, tmp_path: Path, transport: str
) -> None:
    known = tmp_path / "nowhere" / "known_hosts"
    b = backend(sshd_server, "no-known-hosts", known_hosts=str(known), retry=QUICK, transport=transport)
    with pytest.raises(BackendPermissionError, match="ssh-keyscan"):
        b.exists("config")
    assert not known.exists()


def test_changed_host_key_is_refused(
    sshd_server: SshServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    impostor = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    public = Path(f"{impostor}.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {public[0]} {public[1]}\n")
    b = backend(sshd_server, "changed-key", known_hosts=str(known), retry=QUICK, transport=transport)
    with pytest.raises(BackendPermissionError) as info:
        b.put("config", b"x")
    assert not caplog.records, "a refused host key must not be retried"
    message = str(info.value)
    assert "CHANGED" in message
    assert f"ssh-keygen -R [127.0.0.1]:{sshd_server.port}" in message
    assert not (sshd_server.root / "changed-key").exists()


def test_hashed_known_hosts_entry_is_accepted(sshd_server: SshServer, tmp_path: Path, transport: str) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "|1|" in known.read_text()
    with backend(sshd_server, "hashed", known_hosts=str(known), transport=transport) as b:
        b.put("config", b"ok")
        assert b.get("config") == b"ok"


# --- authentication ------------------------------------------------------------------------


def test_wrong_key_gives_permission_error(
    sshd_server: SshServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    b = backend(sshd_server, "wrong-key", key_filename=str(stranger), retry=QUICK, transport=transport)
    with pytest.raises(BackendPermissionError) as info:
        b.put("config", b"x")
    assert not caplog.records, "refused credentials must not be retried"
    message = str(info.value)
    assert f"user {sshd_server.user}" in message
    assert str(stranger) in message and "authorized_keys" in message


def test_no_key_at_all_gives_permission_error(sshd_server: SshServer, transport: str) -> None:
    b = backend(sshd_server, "no-key", key_filename=None, retry=QUICK, transport=transport)
    with pytest.raises(BackendPermissionError, match="authorized_keys"):
        b.exists("x")


def test_the_agent_is_used_only_when_allowed(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """The key is only in an agent: found with ``use_agent``, refused without."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(["ssh-add", "-q", str(sshd_server.client_key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        with backend(sshd_server, "agent", key_filename=None, use_agent=True, transport=transport) as b:
            b.put("config", b"by agent")
        b = backend(sshd_server, "agent", key_filename=None, use_agent=False, retry=QUICK, transport=transport)
        with pytest.raises(BackendPermissionError, match="authorized_keys"):
            b.get("config")
    finally:
        agent.terminate()
        agent.wait()


def test_key_and_known_hosts_from_environment(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty home: no ~/.ssh keys or known_hosts, no agent: only the environment can help
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for key, value in sshd_server.env.items():
        monkeypatch.setenv(key, value)
    with open_backend(sshd_server.url("from-env")) as b:
        b.put("data/00/x", b"env")
        assert b.get("data/00/x") == b"env"
    monkeypatch.delenv("VMVAULT_SFTP_KNOWN_HOSTS")
    with open_backend(sshd_server.url("from-env")) as b, pytest.raises(BackendPermissionError, match="not in"):
        b.exists("data/00/x")


def test_key_from_url_query(sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("VMVAULT_SFTP_KEY", raising=False)
    url = f"{sshd_server.url('from-query')}?key={sshd_server.client_key}&known-hosts={sshd_server.known_hosts}"
    with open_sftp(url) as b:
        b.put("config", b"query")
        assert b.get("config") == b"query"
        assert str(sshd_server.client_key) not in b.url


def test_location_parsing(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not used")
    b = open_sftp(f"sftp://backup@nas.example:2222/srv/vm%20backups?key={key}&connections=2")
    assert (b.user, b.host, b.port, b.root, b.key_filename) == (
        "backup",
        "nas.example",
        2222,
        "/srv/vm backups",
        str(key),
    )
    assert b.url == "sftp://backup@nas.example:2222/srv/vm backups"
    home = open_sftp("sftp://nas.example/~/backups")
    assert home.root == "backups" and home.port == 22
    for bad, why in [
        ("sftp://user:secret@nas/x", "passwords"),
        ("sftp://nas/x?colour=blue", "unknown SFTP option"),
        ("sftp://nas/x?key=/nonexistent/key", "does not exist"),
        ("sftp://nas/", "not the server's root"),
        ("sftp://nas:port/x", "bad port"),
    ]:
        with pytest.raises(ConfigError, match=why):
            open_sftp(bad)


# --- server-side refusals --------------------------------------------------------------------


def test_read_only_server_gives_permission_error(tmp_path: Path) -> None:
    with running_sshd(tmp_path / "sshd", sftp_options="-R") as server:
        (server.root / "ro" / "data").mkdir(parents=True)
        (server.root / "ro" / "data" / "old").write_bytes(b"readable")
        with backend(server, "ro") as b:
            assert b.get("data/old") == b"readable"
            assert [o.name for o in b.list()] == ["data/old"]
            with pytest.raises(BackendPermissionError, match="permission denied"):
                b.put("data/new", b"x")
            with pytest.raises(BackendPermissionError):
                b.delete("data/old")
        assert (server.root / "ro" / "data" / "old").read_bytes() == b"readable"


def test_without_posix_rename_and_fsync(tmp_path: Path) -> None:
    """A server that refuses the OpenSSH extensions still gets whole objects and overwrites."""
    with running_sshd(tmp_path / "sshd", sftp_options="-P posix-rename,fsync") as server, backend(server, "plain") as b:
        b.put("locks/l", b"first")
        b.put("locks/l", b"second, longer")
        b.put("locks/l", b"3rd")
        assert b.get("locks/l") == b"3rd"
        assert [o.name for o in b.list()] == ["locks/l"]
        assert temporaries(server.root / "plain") == []


@pytest.fixture
def small_disk(sshd_server: SshServer) -> Iterator[Path]:
    """A 4 MiB tmpfs under the server's root (needs root and mount rights)."""
    mountpoint = sshd_server.root / "small-disk"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "vmvault-test", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill ({result.stderr.strip()}); needs root in a privileged container"
        )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_disk_gives_storage_full(sshd_server: SshServer, small_disk: Path) -> None:
    with backend(sshd_server, "small-disk/repo") as b:
        b.put("data/00/fits", b"x" * MiB)
        with pytest.raises(StorageFullError, match="full"):
            b.put("data/00/too-big", b"y" * (5 * MiB))
        assert [o.name for o in b.list()] == ["data/00/fits"]
        assert temporaries(small_disk) == []
        # the space the failed upload took is free again
        b.put("data/00/fits-again", b"z" * MiB)


# --- pooling -----------------------------------------------------------------------------


def served_connections(server: SshServer) -> int:
    """SSH connections being served: the listener's direct children (one per connection; SFTP
    runs inside them as internal-sftp, below a privilege-separated child)."""
    assert server.process is not None
    listener = server.process.pid
    count = 0
    for pid in process_tree(listener):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                count += int(fh.read().rsplit(")", 1)[1].split()[1]) == listener
        except OSError:
            continue
    return count


def test_concurrent_uploads_use_several_connections(own_sshd: SshServer, transport: str) -> None:
    assert own_sshd.process is not None

    def sftp_servers() -> int:
        return served_connections(own_sshd)

    with backend(own_sshd, "pool", connections=3, transport=transport) as b:
        barrier = threading.Barrier(6)

        def upload(i: int) -> None:
            barrier.wait()
            b.put(f"data/{i:02x}/obj", os.urandom(4 * MiB))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(list(b.list("data/"))) == 6
        # three sessions were opened for six concurrent uploads, and kept for reuse
        assert sftp_servers() == 3
    deadline = time.monotonic() + 5
    while sftp_servers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sftp_servers() == 0, "close() left sessions open"


def test_ranges_of_a_pack_share_its_lstat_which_a_failure_forgets(
    sshd_server: SshServer, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack's lstat serves its further ranged reads (one round trip less each, its CLOSE not
    waited for either); a pack gone since is ObjectNotFoundError, and the next read looks
    again, so a link put in its place is refused. Whole reads, and objects that are not packs,
    look every time."""
    lstats: list[str] = []
    real_lstat = Session.lstat

    def counted(self: Session, path: str) -> object:
        lstats.append(path.rsplit("/", 2)[-1])
        return real_lstat(self, path)

    monkeypatch.setattr(Session, "lstat", counted)
    name = f"pack-stat-{transport}"
    data = os.urandom(3 * MiB)
    with backend(sshd_server, name, connections=1, transport=transport) as b:
        b.put("data/ab/pack", data)
        b.put("snapshots/snap", b"snapshot")
        lstats.clear()
        for offset in (0, MiB, 2 * MiB, 3 * MiB - 5):
            assert b.get("data/ab/pack", offset, MiB) == data[offset : offset + MiB]
        assert lstats == ["pack"], "one lstat for the four ranges"
        assert b.get("data/ab/pack") == data
        assert b.get("snapshots/snap", 0, 100) == b.get("snapshots/snap", 0, 100) == b"snapshot"
        assert lstats == ["pack", "pack", "snap", "snap"]
        pack = sshd_server.root / name / "data" / "ab" / "pack"
        pack.unlink()
        with pytest.raises(ObjectNotFoundError):
            b.get("data/ab/pack", 0, 10)
        (sshd_server.root / name / "elsewhere").write_bytes(data)
        pack.symlink_to(sshd_server.root / name / "elsewhere")
        with pytest.raises(UnsafeStorageError):
            b.get("data/ab/pack", 0, 10)
        # the sessions stayed in step: every CLOSE sent ahead was answered and passed over
        assert b.get("snapshots/snap") == b"snapshot"


def test_a_range_is_received_into_the_callers_buffer(sshd_server: SshServer, transport: str) -> None:
    """``get_into`` (a restore's ranged reads) returns a view of the caller's buffer, no copy of
    the range; a range longer than the buffer is read as ``get`` reads it."""
    import mmap

    data = os.urandom(3 * MiB)
    buffer = mmap.mmap(-1, 2 * MiB)
    with backend(sshd_server, f"into-{transport}", connections=1, transport=transport) as b:
        b.put("data/ab/pack", data)
        got = b.get_into("data/ab/pack", 12345, MiB, buffer)
        assert got == data[12345 : 12345 + MiB] and got.obj is buffer
        assert buffer[:MiB] == data[12345 : 12345 + MiB]
        del got
        longer = b.get_into("data/ab/pack", 0, 3 * MiB, buffer)
        assert longer == data and longer.obj is not buffer


def test_a_first_read_looks_up_its_folders_and_the_object_in_one_round_trip(
    sshd_server: SshServer, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that has not met a pack's folder yet sends the folder's lstat and the pack's
    at once; the folder's answer is judged first: a link in its place is refused, a missing one
    is a missing object, whatever the pack's lstat found behind it."""
    name = f"first-read-{transport}"
    data = os.urandom(MiB)
    with backend(sshd_server, name, transport=transport) as b:
        b.put("data/ab/pack", data)
    together: list[list[str]] = []
    alone: list[str] = []
    real_many, real_one = Session.lstat_many, Session.lstat

    def many(self: Session, paths: list[str]) -> object:
        together.append([p.rsplit("/", 2)[-1] if p.endswith("pack") else p.rsplit("/", 1)[-1] for p in paths])
        return real_many(self, paths)

    def one(self: Session, path: str) -> object:
        alone.append(path.rsplit("/", 1)[-1])
        return real_one(self, path)

    monkeypatch.setattr(Session, "lstat_many", many)
    monkeypatch.setattr(Session, "lstat", one)
    with backend(sshd_server, name, transport=transport) as b:
        assert b.get("data/ab/pack", 10, 100) == data[10:110]
        assert len(together) == 1 and together[0][-2:] == ["ab", "pack"] and not alone
        assert b.get("data/ab/pack", 0, 10) == data[:10]  # the pack's lstat serves
        assert len(together) == 1 and not alone
    root = sshd_server.root / name
    (root / "data" / "cd").symlink_to(root / "data" / "ab")
    with backend(sshd_server, name, transport=transport) as b:
        with pytest.raises(UnsafeStorageError):
            b.get("data/cd/pack", 0, 10)
        with pytest.raises(ObjectNotFoundError):
            b.get("data/ef/pack", 0, 10)
        assert not b.exists("data/ef/pack") and b.exists("data/ab/pack")


def read_on_each_connection(server: SshServer, b: SftpBackend, n: int, deadline: float) -> None:
    """Wait (until ``deadline``) for ``n`` connections to be open, then read ``data/obj`` (1 MiB
    of ``x``) from ``n`` threads at once: every read returns it, and no connection more opens."""
    while served_connections(server) < n:
        assert time.monotonic() < deadline, "the connections were not opened ahead"
        time.sleep(0.02)
    barrier = threading.Barrier(n)
    got: list[bytes] = []

    def read() -> None:
        barrier.wait()
        got.append(b.get("data/obj"))

    threads = [threading.Thread(target=read) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [b"x" * MiB] * n
    assert served_connections(server) == n


def test_warm_up_opens_the_connections_ahead_and_transfers_use_them(own_sshd: SshServer, transport: str) -> None:
    """``warm_up`` returns at once and opens the pool's connections in the background; the
    reads that follow run on them (no connection more is opened) and return the data."""
    with backend(own_sshd, "warm", connections=3, transport=transport) as b:
        b.put("data/obj", b"x" * MiB)
    with backend(own_sshd, "warm", connections=3, transport=transport) as b:
        deadline = time.monotonic() + 10
        while served_connections(own_sshd):  # the writer's sessions are gone
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        b.warm_up()
        assert time.monotonic() - started < 0.1, "warm_up must not wait for the handshakes"
        assert b.get("data/obj", 10, 5) == b"xxxxx"  # the first read waits for a warm connection
        read_on_each_connection(own_sshd, b, 3, deadline)


def test_a_far_server_gets_more_connections_to_read_from(own_sshd: SshServer, transport: str) -> None:
    """``prepare_reads``: a server whose answers take 30 ms (reached through the relay of
    tests/latency.py) gets 8 connections for a restore's reads, opened at once and all used;
    on loopback 4 stay; ``connections=N`` stays whatever the distance, and before any answer
    the distance is unknown."""
    with backend(own_sshd, "far", transport=transport) as b:
        b.put("data/obj", b"x" * MiB)
        quickest = read_until_near(b, "data/obj", 1)
        assert b.prepare_reads() == 4, f"the quickest of 300 answers took {quickest * 1000:.1f} ms"
    options: dict[str, object] = {
        "key_filename": str(own_sshd.client_key),
        "known_hosts": str(own_sshd.known_hosts),
        "use_agent": False,
        "look_for_keys": False,
        "transport": transport,
    }
    with relay(own_sshd.port, 30) as (port, _pid):
        known = own_sshd.known_hosts.read_text()
        own_sshd.known_hosts.write_text(known + known.replace(f"]:{own_sshd.port} ", f"]:{port} "))
        url = own_sshd.url("far").replace(f":{own_sshd.port}/", f":{port}/")
        deadline = time.monotonic() + 20
        while served_connections(own_sshd):  # the near backend's sessions are gone
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with open_sftp(url, **options) as b:  # type: ignore[arg-type]
            assert b.prepare_reads() == 4
            assert b.get("data/obj", 0, 1) == b"x"
            assert b.prepare_reads() == 8
            read_on_each_connection(own_sshd, b, 8, deadline)
        with open_sftp(url + "?connections=2", **options) as b:  # type: ignore[arg-type]
            assert b.get("data/obj", 0, 1) == b"x"
            assert b.prepare_reads() == 2


def test_warm_up_against_a_server_that_is_not_there_fails_as_before(tmp_path: Path, transport: str) -> None:
    """Nothing listens: the first operation reports the server unreachable, once and at once,
    the same with the connections opened ahead as without."""
    with running_sshd(tmp_path / "sshd") as server:
        b = backend(server, "none", transport=transport, timeout=5)
    messages = []
    for warm in (False, True):
        if warm:
            b.warm_up()
        started = time.monotonic()
        with pytest.raises(BackendUnreachableError) as caught:
            b.get("config")
        assert time.monotonic() - started < 5
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    b.close()


# --- dropped connections ---------------------------------------------------------------------


def _watch_final_name(path: Path, size: int, stop: threading.Event, wrong: list[int]) -> None:
    """Record any moment at which ``path`` exists with a size other than the whole object."""
    while not stop.is_set():
        try:
            seen = path.stat().st_size
        except FileNotFoundError:
            seen = size
        if seen != size:
            wrong.append(seen)
        time.sleep(0.002)


@pytest.mark.slow
def test_server_killed_mid_upload_then_back(own_sshd: SshServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    data = os.urandom(96 * MiB)
    directory = own_sshd.root / "fault"
    final = directory / "data" / "big"
    patient = RetryPolicy(attempts=8, initial_delay=0.2, max_delay=1.0)
    with backend(own_sshd, "fault", retry=patient, timeout=10) as b:
        b.put("data/small", b"before")
        errors: list[BaseException] = []
        wrong: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_final_name, args=(final, len(data), stop, wrong))
        watcher.start()

        def upload() -> None:
            try:
                b.put("data/big", data)
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=upload)
        writer.start()
        deadline = time.monotonic() + 30
        while not upload_in_progress(directory):
            assert time.monotonic() < deadline and writer.is_alive(), "never caught the upload in flight"
            time.sleep(0.002)
        own_sshd.freeze()
        assert writer.is_alive(), "the upload finished before the server could be killed"
        own_sshd.kill()
        assert not final.exists()
        time.sleep(0.5)
        own_sshd.start()
        writer.join(timeout=120)
        stop.set()
        watcher.join()
        assert not writer.is_alive()
        assert not errors, errors
        assert not wrong, f"the final name showed partial sizes {wrong}"
        assert final.read_bytes() == data
        assert b.get("data/small") == b"before"
        assert [o.name for o in b.list()] == ["data/big", "data/small"]
        assert any("retrying" in r.getMessage() for r in caplog.records), "the kill caused no retry"
        # the attempt cut off by the kill removed its temporary file when it retried
        assert temporaries(directory) == []


@pytest.mark.slow
def test_server_gone_for_good_gives_connection_error(own_sshd: SshServer, transport: str) -> None:
    data = os.urandom(64 * MiB)
    directory = own_sshd.root / "gone"
    policy = RetryPolicy(attempts=4, initial_delay=0.1, max_delay=0.3)
    with backend(own_sshd, "gone", retry=policy, timeout=5, transport=transport) as b:
        b.put("data/small", b"before")
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                b.put("data/big", data)
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=upload)
        writer.start()
        deadline = time.monotonic() + 30
        while not upload_in_progress(directory):
            assert time.monotonic() < deadline and writer.is_alive(), "never caught the upload in flight"
            time.sleep(0.002)
        own_sshd.kill()
        started = time.monotonic()
        writer.join(timeout=60)
        assert not writer.is_alive()
        assert time.monotonic() - started < 30, "retries must be bounded"
        assert len(errors) == 1 and isinstance(errors[0], BackendConnectionError), errors
        assert "gave up on" in str(errors[0]) and "data/big" in str(errors[0])
        assert not (directory / "data" / "big").exists()
        with pytest.raises(BackendConnectionError):
            b.get("data/small")
        with pytest.raises(BackendConnectionError):
            list(b.list())
        # once the server is back, the same backend object carries on
        own_sshd.start()
        assert b.get("data/small") == b"before"
        assert [o.name for o in b.list()] == ["data/small"]


def test_cleanup_removes_only_old_temporary_files(sshd_server: SshServer) -> None:
    with backend(sshd_server, "cleanup") as b:
        b.put("data/ab/object", b"kept")
        directory = sshd_server.root / "cleanup" / "data" / "ab"
        stale = directory / "object.tmp-0123456789ab"
        fresh = directory / "other.tmp-ba9876543210"
        stale.write_bytes(b"left by a killed writer")
        fresh.write_bytes(b"an upload still running elsewhere")
        two_days_ago = time.time() - 2 * 24 * 3600
        os.utime(stale, (two_days_ago, two_days_ago))
        assert b.cleanup_temporary() == 1
        assert not stale.exists() and fresh.exists()
        assert b.cleanup_temporary(older_than=0) == 1
        assert temporaries(sshd_server.root / "cleanup") == []
        assert b.get("data/ab/object") == b"kept"


def test_a_repository_folder_found_once_is_never_made_again(sshd_server: SshServer, transport: str) -> None:
    """A folder removed on the server (or its disk unmounted there) while the command runs is
    not made afresh by the next write: that backup would land in no repository."""
    folder = sshd_server.root / "gone"
    with backend(sshd_server, "gone", transport=transport) as b:
        b.put("data/ab/object", b"x")  # the first write makes it
        (folder / "data" / "ab" / "object").unlink()
        (folder / "data" / "ab").rmdir()
        b.put("data/ab/object", b"x")  # a folder inside it is made again, as before
        for entry in sorted(folder.rglob("*"), reverse=True):
            entry.unlink() if entry.is_file() else entry.rmdir()
        folder.rmdir()
        with pytest.raises(BackendError, match="the repository folder is gone"):
            b.put("data/cd/other", b"y")
        assert not folder.exists()


def test_a_disk_unmounted_on_the_server_is_not_written_through(sshd_server: SshServer, transport: str) -> None:
    """The repository's disk is unmounted on the server while the command runs: the path now
    leads to the empty mount point, on another file system. The next write that finds a known
    folder gone fails with the reason instead of making the repository's folders there."""
    point = sshd_server.root / f"mounted-{transport}"
    with small_tmpfs(point, "16m"), backend(sshd_server, point.name, transport=transport) as b:
        b.put("data/ab/object", b"x")
        subprocess.run(["umount", "-l", str(point)], check=True)
        for name in ("data/ab/other", "data/cd/other"):  # a known folder, and one not yet made
            with pytest.raises(BackendError, match="the repository folder is gone, or is another folder"):
                b.put(name, b"y")
        assert list(point.iterdir()) == []


@pytest.mark.slow
def test_server_killed_mid_download_then_back(
    own_sshd: SshServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.WARNING, logger="vmvault.backends._retry")
    data = os.urandom(192 * MiB)
    (own_sshd.root / "read").mkdir()
    (own_sshd.root / "read" / "big").write_bytes(data)
    patient = RetryPolicy(attempts=8, initial_delay=0.2, max_delay=1.0)
    with backend(own_sshd, "read", retry=patient, timeout=10, transport=transport) as b:
        assert b.exists("big")
        results: list[bytes] = []
        errors: list[BaseException] = []

        def download() -> None:
            try:
                results.append(b.get("big"))
            except BaseException as exc:
                errors.append(exc)

        # a 192 MiB download takes about half a second here, less than a busy machine may take
        # to notice it began: the server is let run 5 ms at a time until it has read a tenth,
        # so the download is surely in flight, and held still, when it is killed
        sessions = own_sshd.processes()  # the connection of exists() serves the download too
        before = own_sshd.bytes_read(sessions)
        own_sshd.freeze(sessions)
        reader = threading.Thread(target=download)
        reader.start()
        deadline = time.monotonic() + 30
        while own_sshd.bytes_read(sessions) - before < 16 * MiB:
            assert time.monotonic() < deadline and reader.is_alive(), "never caught the download in flight"
            own_sshd.thaw(sessions)
            time.sleep(0.005)
            own_sshd.freeze(sessions)
        time.sleep(0.2)
        assert reader.is_alive(), "the download finished before the server could be killed"
        own_sshd.kill()
        time.sleep(0.5)
        own_sshd.start()
        reader.join(timeout=120)
        assert not errors, errors
        assert len(results) == 1 and results[0] == data
    assert any("read big failed" in r.getMessage() for r in caplog.records), "the kill caused no retry"


def test_a_hanging_sftp_session_is_an_error_not_a_wait(own_sshd: SshServer, transport: str) -> None:
    """A server that accepts the login but never starts SFTP (e.g. a stuck login shell)."""
    own_sshd.stop()
    config = own_sshd.config.read_text().splitlines()
    config = [line for line in config if not line.startswith("Subsystem")] + ["Subsystem sftp /bin/sleep 600"]
    own_sshd.config.write_text("\n".join(config) + "\n")
    own_sshd.start()
    started = time.monotonic()
    with pytest.raises(BackendConnectionError, match="did not answer"):
        backend(own_sshd, "hang", timeout=2, retry=RetryPolicy(attempts=2, initial_delay=0.1), transport=transport).put(
            "x", b"y"
        )
    assert time.monotonic() - started < 60


@pytest.mark.skipif(
    not any(c.endswith("-gcm@openssh.com") for c in paramiko.Transport._preferred_ciphers),
    reason="this paramiko has no AES-GCM (it came with 3.5; the floor 3.4.1 falls back to AES-CTR)",
)
def test_connections_use_aes_gcm_when_the_server_offers_it(sshd_server: SshServer) -> None:
    """OpenSSH offers AES-GCM; reading through it costs half the client CPU of AES-CTR + HMAC."""
    b = backend(sshd_server, "cipher", transport="paramiko")
    try:
        b.put("data/aa/x", b"x" * 100_000)
        assert b.get("data/aa/x", 10, 20) == b"x" * 20
        with b._pool.connection() as conn:
            assert conn.client is not None
            ssh = conn.client.get_transport()
            assert ssh is not None
            assert ssh.remote_cipher.endswith("-gcm@openssh.com")
            assert ssh.local_cipher == ssh.remote_cipher
    finally:
        b.close()


def test_a_server_without_aes_gcm_is_still_reached(own_sshd: SshServer) -> None:
    own_sshd.stop()
    # sshd takes the first value it reads for a keyword: this one, before the rest
    own_sshd.config.write_text("Ciphers aes128-ctr,aes256-ctr\n" + own_sshd.config.read_text())
    own_sshd.start()
    b = backend(own_sshd, "ctr", transport="paramiko")
    try:
        b.put("data/aa/x", b"payload")
        assert b.get("data/aa/x") == b"payload"
        with b._pool.connection() as conn:
            assert conn.client is not None
            ssh = conn.client.get_transport()
            assert ssh is not None and ssh.remote_cipher == "aes128-ctr"
    finally:
        b.close()
