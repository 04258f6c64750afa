"""The filesystem library's worker process: same answers as in-process, and a worker that
crashes, hangs, lies or is compromised cannot hurt vmvault."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.browse.test_seccomp import REFUSED
from tests.conftest import descriptors_taken
from tests.fsimages import GuestImages
from vmvault import platform
from vmvault.browse import _seccomp, disk_volumes, open_volume, probe
from vmvault.browse import isolated as iso
from vmvault.errors import GuestError, GuestPathError, IntegrityError

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")

SRC = Path(__file__).resolve().parents[2] / "src"


def _reader(path: Path) -> tuple[Callable[[int, int], bytes], int]:
    fd = os.open(path, os.O_RDONLY)
    return (lambda off, length: os.pread(fd, length, off)), os.fstat(fd).st_size


def test_the_worker_answers_as_the_library_does_in_process(guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.disk("mbr"))
    disk = iso.IsolatedDisk(read, size, name="mbr")
    try:
        remote_table, remote = disk_volumes(read, size, prober=disk.probe)
        local_table, local = disk_volumes(read, size)
        assert remote_table == local_table
        assert [v for v, _ in remote] == [v for v, _ in local]
        for (_, rfs), (_, lfs) in zip(remote, local, strict=True):
            assert rfs is not None and lfs is not None
            assert (rfs.kind, rfs.case_insensitive, rfs.root) == (lfs.kind, lfs.case_insensitive, lfs.root)
            assert list(rfs.walk(rfs.root)) == list(lfs.walk(lfs.root))
            entry = lfs.lookup("/docs/report.txt")
            assert rfs.lookup("/DOCS/report.txt" if lfs.case_insensitive else "/docs/report.txt") == entry
            assert rfs.listdir(lfs.lookup("/docs")) == lfs.listdir(lfs.lookup("/docs"))
            assert rfs.reader(entry)(0, entry.size) == lfs.reader(entry)(0, entry.size)
            assert rfs.holes(entry) == lfs.holes(entry)
        _, fs = open_volume(read, size, 1, prober=disk.probe)
        with pytest.raises(GuestPathError, match=r"/nothing: no such file or folder"):
            fs.lookup("/nothing")
        sparse = fs.lookup("/big/sparse.img")
        assert fs.holes(sparse) and fs.reader(sparse)(sparse.size - 10, 100) == bytes(10)
        assert disk.bytes_read > 0
    finally:
        disk.close()


def test_the_worker_is_heard_on_descriptors_past_1023(guest_images: GuestImages) -> None:
    """The web server browses with many connections open: the worker's pipes may lie past
    1023, where ``select`` fails (ValueError)."""
    read, size = _reader(guest_images.disk("mbr"))
    with descriptors_taken():
        disk = iso.IsolatedDisk(read, size, name="mbr")
        try:
            assert disk._rx.fileno() > 1023
            _, volumes = disk_volumes(read, size, prober=disk.probe)
            fs = next(fs for _, fs in volumes if fs is not None)
            assert fs.lookup("/docs/report.txt").size > 0
        finally:
            disk.close()


def test_a_damaged_chunk_under_the_worker_surfaces_as_itself(guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.filesystem("ntfs")[0])
    calls = {"n": 0}

    def failing(off: int, length: int) -> bytes:
        calls["n"] += 1
        if calls["n"] > 8:
            raise IntegrityError("chunk 00ff is damaged — needed by disk d at offset 0x1000 of snapshot 1234")
        return read(off, length)

    disk = iso.IsolatedDisk(failing, size, name="d")
    try:
        with pytest.raises(IntegrityError, match="needed by disk d at offset 0x1000"):
            _, fs = disk.probe(0, size)
            assert fs is not None
            list(fs.walk(fs.root))
    finally:
        disk.close()


def _fake_worker(tmp_path: Path, body: str) -> list[str]:
    """A worker program speaking the protocol with ``body`` as its request handler."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            sys.path.insert(0, {src!r})
            from vmvault.browse import _wire
            rx, tx = _wire.binary_stdio()
            def root():
                return {{"name": "", "path": "/", "type": "dir", "size": 0, "mtime_ns": None, "mode": 0,
                        "inode": 2, "target": None}}
            while True:
                msg, _ = _wire.recv(rx)
                op = msg["op"]
                if op == "probe":
                    _wire.send(tx, {{"result": {{"kind": "ext4", "status": "ok", "note": "",
                               "fs": {{"kind": "ext4", "case_insensitive": False, "root": root()}}}}}})
                    continue
            {body}
            """
        ).format(src=str(SRC), body=textwrap.indent(textwrap.dedent(body), "    "))
    )
    return [sys.executable, str(script)]


def test_a_worker_that_crashes_is_a_clear_error(tmp_path: Path) -> None:
    command = _fake_worker(tmp_path, "os.kill(os.getpid(), 11)")
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=command)
    found, fs = disk.probe(0, 1 << 20)
    assert fs is not None and found.status == "ok"
    with pytest.raises(GuestError, match="killed by signal 11 while it listed /: the filesystem is damaged or hostile"):
        fs.listdir(fs.root)
    with pytest.raises(GuestError, match="killed by signal 11"):
        fs.lookup("/x")


def test_a_worker_that_hangs_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iso, "TIMEOUT", 1.0)
    command = _fake_worker(tmp_path, "time.sleep(60)")
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=command)
    _, fs = disk.probe(0, 1 << 20)
    assert fs is not None
    with pytest.raises(GuestError, match="did not answer within 1 s while it listed /"):
        fs.listdir(fs.root)
    assert disk._proc.returncode is not None, "the hung worker is gone"


def _within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; the exception it raised, or a failure if it is still running after ``seconds``."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on the worker after {seconds} s"
    return raised[0] if raised else None


def test_a_worker_that_stops_inside_a_message_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iso, "TIMEOUT", 1.0)
    body = """
    tx.write((100).to_bytes(4, "big") + b'{"res'); tx.flush()
    time.sleep(60)
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    _, fs = disk.probe(0, 1 << 20)
    assert fs is not None
    exc = _within(20, lambda: fs.listdir(fs.root))
    assert isinstance(exc, GuestError) and "did not answer within 1 s" in str(exc), exc
    assert disk._proc.returncode is not None, "the stalled worker is gone"


def test_a_worker_that_reads_without_end_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a loop in the library that keeps reading is never silent: the bytes one request may read are bounded
    monkeypatch.setattr(iso, "READ_BUDGET", 64 << 20)
    body = """
    while True:
        _wire.send(tx, {"read": [4096, 65536]})
        _wire.recv(rx)
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    _, fs = disk.probe(0, 1 << 20)
    assert fs is not None
    exc = _within(60, lambda: fs.listdir(fs.root))
    assert isinstance(exc, GuestError) and "more than 64 MiB of the disk while it listed /" in str(exc), exc
    assert disk._proc.returncode is not None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ('{"name": "..", "path": "/..", "type": "file"}', "an entry named '..'"),
        ('{"name": "a/b", "path": "/a/b", "type": "file"}', "an entry named 'a/b'"),
        ('{"name": "x", "path": "/etc/x", "type": "file"}', "sent '/etc/x' as an entry of '/'"),
        ('{"name": "x", "path": "/x", "type": "device"}', "malformed entry"),
        ('{"name": "x", "path": "/../x", "type": "file"}', r"an entry at '/\.\./x'"),
        ('{"name": "x", "path": "/y", "type": "file"}', "an entry at '/y'"),
        ('{"name": "x", "path": "/x", "type": "file", "size": -1}', "bad numbers"),
    ],
)
def test_a_lying_worker_cannot_make_names_that_climb_out(tmp_path: Path, answer: str, message: str) -> None:
    body = f"""
    doc = {{"name": "x", "path": "/x", "type": "file", "size": 1, "mtime_ns": None, "mode": 0, "inode": 5,
           "target": None}}
    doc.update({answer})
    _wire.send(tx, {{"result": [doc]}})
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    try:
        _, fs = disk.probe(0, 1 << 20)
        assert fs is not None
        with pytest.raises(GuestError, match=message):
            fs.listdir(fs.root)
    finally:
        disk.close()


def test_a_worker_found_without_its_limits_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the kernel shows a worker lacks once it answers (here one that never limits itself:
    no filter, the host's network) is a warning, once per process for every disk."""
    if not os.path.exists("/proc/self/ns/net"):
        pytest.skip("no /proc to look into a worker with")
    monkeypatch.setattr(iso, "_said", set())
    disks = [
        iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name=f"d{i}", command=_fake_worker(tmp_path, ""))
        for i in range(2)
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="vmvault.browse"):
            for disk in disks:
                assert disk.missing is None  # not looked at before it answers
                disk.probe(0, 1 << 20)
                assert disk.missing is not None and len(disk.missing) == 3
        said = [r.getMessage() for r in caplog.records if r.name == "vmvault.browse"]
        assert len(said) == 3, said
        assert "without its seccomp filter" in said[0] and "without a network namespace of its own" in said[1]
        assert "without an empty root of its own" in said[2]
    finally:
        for disk in disks:
            disk.close()


def test_a_worker_may_not_read_outside_limits_or_send_huge_headers(tmp_path: Path) -> None:
    body = """
    _wire.send(tx, {"read": [0, 1 << 40]})
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    _, fs = disk.probe(0, 1 << 20)
    assert fs is not None
    with pytest.raises(GuestError, match="asked to read 1099511627776 bytes"):
        fs.listdir(fs.root)
    body = """
    tx.write((1 << 31).to_bytes(4, "big")); tx.flush()
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    _, fs = disk.probe(0, 1 << 20)
    assert fs is not None
    with pytest.raises(GuestError, match="the filesystem is damaged or hostile"):
        fs.listdir(fs.root)


def test_the_worker_confines_itself_before_parsing(tmp_path: Path) -> None:
    victim = tmp_path / "written-by-worker"
    program = f"""
import resource, sys
sys.path.insert(0, {str(SRC)!r})
from vmvault.browse._worker import confine
confine()
print(resource.getrlimit(resource.RLIMIT_FSIZE), resource.getrlimit(resource.RLIMIT_AS)[0] >> 30, flush=True)
with open({str(victim)!r}, "w") as f:
    f.write("x" * 100)
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("(0, 0) 2"), proc.stdout
    assert proc.returncode != 0, "writing a file must fail"
    assert not victim.exists() or victim.stat().st_size == 0


@pytest.fixture
def host_shared_memory() -> Iterator[int]:
    """The key of a System V shared memory segment of this user's (0600), removed afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x766D0000 + os.getpid() % 0xFFFF
    shm_id = libc.shmget(key, 4096, 0o1600)  # IPC_CREAT, this user only
    assert shm_id >= 0, os.strerror(ctypes.get_errno())
    try:
        yield key
    finally:
        libc.shmctl(shm_id, 0, None)  # IPC_RMID


@pytest.mark.parametrize("started_as", ["its user", "root"])
def test_a_worker_taken_over_after_confine_cannot_reach_outside_itself(
    tmp_path: Path, host_shared_memory: int, started_as: str
) -> None:
    """Code a hostile filesystem got to run in the worker (here: Python after ``confine``, as
    the worker is once it parses) reads no host file, changes none, starts no program, opens
    no socket, signals no process nor changes its limits or priority, neither reads nor changes
    extended attributes (also through Linux 6.13's ``*xattrat`` calls), reaches no shared memory
    of the host's, and finds no host path (not even whether one exists); it still computes, with
    threads, and reads its own limits. Started by vmvault running as some user (a user namespace
    of its own) or as root (transient ids)."""
    ids = None
    if started_as == "root":
        if os.geteuid() != 0:
            pytest.skip("a worker started as root needs root")
        ids = platform.transient_ids()
    secret, victim, sock = tmp_path / "secret", tmp_path / "victim", tmp_path / "s.sock"
    secret.write_text("key")
    victim.write_text("keep me")
    try:
        os.setxattr(victim, "user.keep", b"1")
    except OSError as exc:
        pytest.skip(f"no user extended attributes on {tmp_path}: {exc}")
    numbers = REFUSED[os.uname().machine]
    sleeper = subprocess.Popen(["sleep", "60"])
    program = f"""
import ctypes, os, resource, socket, subprocess, sys, threading
sys.path.insert(0, {str(SRC)!r})
from vmvault.browse._worker import confine
confine({ids!r})
libc = ctypes.CDLL(None, use_errno=True)
def call(result):
    if result < 0:
        raise OSError(ctypes.get_errno(), "refused")
def unshare():
    call(libc.unshare(0x00020000))  # CLONE_NEWNS
class XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]
value = ctypes.create_string_buffer(b"2")
args = XattrArgs(ctypes.addressof(value), 1, 0)
path = {str(victim).encode()!r}
tries = {{
    "read": lambda: open({str(secret)!r}).read(),
    "open by /proc": lambda: open("/proc/self/environ", "rb").read(),
    "unlink": lambda: os.unlink({str(victim)!r}),
    "rename": lambda: os.rename({str(victim)!r}, {str(victim)!r} + ".2"),
    "chmod": lambda: os.chmod({str(victim)!r}, 0o777),
    "truncate": lambda: os.truncate({str(victim)!r}, 0),
    "mkdir": lambda: os.mkdir({str(tmp_path / "made")!r}),
    "symlink": lambda: os.symlink("/", {str(tmp_path / "link")!r}),
    "program": lambda: subprocess.run(["true"]),
    "fork": lambda: os.fork(),
    "unix socket": lambda: socket.socket(socket.AF_UNIX).connect({str(sock)!r}),
    "socketpair": lambda: socket.socketpair(),
    "signal": lambda: os.kill({sleeper.pid}, 9),
    "its limits": lambda: resource.prlimit({sleeper.pid}, resource.RLIMIT_NOFILE, (3, 3)),
    "its priority": lambda: os.setpriority(os.PRIO_PROCESS, {sleeper.pid}, 19),
    "namespace": unshare,
    "read an attribute": lambda: os.getxattr(path, "user.keep"),
    "list attributes": lambda: os.listxattr(path),
    "set an attribute (setxattrat)": lambda: call(
        libc.syscall({numbers["setxattrat"]}, -100, path, 0, b"user.new", ctypes.byref(args), 16)
    ),
    "remove an attribute (removexattrat)": lambda: call(
        libc.syscall({numbers["removexattrat"]}, -100, path, 0, b"user.keep")
    ),
    "shared memory": lambda: call(libc.shmget({host_shared_memory}, 0, 0)),
    "watch a file": lambda: call(libc.inotify_init1(0)),
    "the kernel log": lambda: call(libc.klogctl(10, None, 0)),
    "sync the disks": lambda: call(libc.syscall({numbers["sync"]})),
    "a pipe of its own": lambda: os.pipe(),
    "memory as a file": lambda: os.memfd_create("x"),
    "stat a host file": lambda: os.stat({str(secret)!r}),
    "stat the host's /etc": lambda: os.stat("/etc"),
    "ask whether a host path exists": lambda: call(libc.access(b"/etc/passwd", 0)),
    "read a link of /proc": lambda: os.readlink("/proc/self/exe"),
}}
for name, attempt in tries.items():
    try:
        attempt()
        print(name, "DONE")
    except OSError as exc:
        print(name, "refused", exc.errno)
out = []
t = threading.Thread(target=lambda: out.append(sum(range(1000))))
t.start()
t.join()
print("thread", out, resource.getrlimit(resource.RLIMIT_FSIZE))
"""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen()
        try:
            proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
        finally:
            alive = sleeper.poll() is None
            limits = Path(f"/proc/{sleeper.pid}/limits").read_text() if alive else ""
            nice = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) if alive else 0
            sleeper.kill()
            sleeper.wait()
    lines = proc.stdout.splitlines()
    assert lines[-1] == "thread [499500] (0, 0)", proc.stdout + proc.stderr  # its own limits: read
    refused = {name: int(code) for name, _, code in (line.rpartition(" refused ") for line in lines[:-1]) if name}
    assert len(refused) == len(lines) - 1 == 30, proc.stdout
    paths = [name for name in refused if name.startswith(("stat ", "ask whether", "read a link"))]
    # refused by the filter, or no host path exists for it (ENOENT; EACCES for the transient ids,
    # in a root only root may search): newfstatat is allowed, for glibc's fstat
    assert len(paths) == 4 and all(refused.pop(name) in (errno.EPERM, errno.ENOENT, errno.EACCES) for name in paths)
    assert "stat the host's /etc refused 1" not in lines, proc.stdout  # (the empty root answers it)
    assert set(refused.values()) == {errno.EPERM}, proc.stdout
    assert os.getxattr(victim, "user.keep") == b"1" and os.listxattr(victim) == ["user.keep"]
    match = re.search(r"Max open files\s+(\d+)", limits)
    assert match is not None and match.group(1) != "3" and nice == 0
    assert alive and victim.read_text() == "keep me" and oct(victim.stat().st_mode)[-3:] != "777"
    assert not (tmp_path / "made").exists() and not (tmp_path / "link").is_symlink()


def test_the_filter_numbers_are_the_kernels() -> None:
    """The allowed calls' numbers, and those of the refused ones the tests try, against the
    kernel headers of this machine (x86-64's own table and the generic one AArch64 uses)."""
    headers = {
        "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "aarch64": "/usr/include/asm-generic/unistd.h",
    }
    checked = 0
    for machine, header in headers.items():
        if not os.path.exists(header):
            continue
        text = Path(header).read_text()
        table = {m.group(2): int(m.group(3)) for m in re.finditer(r"#define __NR(3264)?_(\w+)\s+(\d+)", text)}
        for name, number in [*_seccomp.ALLOWED[machine].items(), *REFUSED[machine].items()]:
            if name in table:  # (calls newer than these headers are checked where they are known)
                assert table[name] == number, (machine, name)
                checked += 1
    if not checked:
        pytest.skip("no kernel headers here (Debian: linux-libc-dev)")
    assert checked > 150, checked


def _may_unshare_network() -> bool:
    probe = "import ctypes; c = ctypes.CDLL(None); raise SystemExit(c.unshare(0x50000000) and c.unshare(0x40000000))"
    return subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


def test_the_worker_has_no_network(tmp_path: Path, guest_images: GuestImages) -> None:
    """... and an IPC namespace of its own: no System V IPC object of the host's."""
    if not _may_unshare_network():
        pytest.skip("this system lets a process make neither a user nor a network namespace")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        program = f"""
import socket, sys
sys.path.insert(0, {str(SRC)!r})
from vmvault.browse._worker import confine
confine()
try:  # (an address, not a name: a name's lookup would load a codec, which it can no more)
    socket.socket().connect(("127.0.0.1", {port}))
except OSError as exc:
    print("refused", exc.errno)
else:
    print("connected")
"""
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("refused"), proc.stdout + proc.stderr
    read, size = _reader(guest_images.filesystem("ext4")[0])
    disk = iso.IsolatedDisk(read, size, name="d")
    try:
        found, _ = disk.probe(0, size)  # it parses as before
        assert found.kind == "ext4"
        assert disk.missing == [], "the kernel shows every limit in place"
        for kind in ("net", "ipc"):
            assert os.readlink(f"/proc/{disk._proc.pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    finally:
        disk.close()


def test_the_worker_gets_only_its_pipes_and_a_small_environment(tmp_path: Path, guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.filesystem("ext4")[0])
    secret = tmp_path / "secret"
    secret.write_text("key")
    keep = os.open(secret, os.O_RDONLY)  # a descriptor vmvault holds must not reach the worker
    os.set_inheritable(keep, True)
    os.environ["VMVAULT_PASSWORD"] = "must not leak"
    try:
        disk = iso.IsolatedDisk(read, size, name="d")
        try:
            found, _ = disk.probe(0, size)
            assert found.kind == "ext4"
            pid = disk._proc.pid
            fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        finally:
            disk.close()
    finally:
        os.close(keep)
        del os.environ["VMVAULT_PASSWORD"]
    assert fds == [0, 1, 2], fds
    assert status["Seccomp"] == "2", status  # its filter (vmvault.browse._seccomp)
    if os.geteuid() == 0:  # started as root (from a Python under /root, too), it gave itself ids of its own
        assert disk.ids is not None and disk.ids[0] in platform.TRANSIENT_IDS
        assert status["Uid"].split() == [str(disk.ids[0])] * 4 and status["Gid"].split() == [str(disk.ids[1])] * 4
        assert status["Groups"].strip() == "" and int(status["CapEff"], 16) == 0
    assert not [e for e in environ if e.startswith(b"VMVAULT")]
    assert sorted(e.split(b"=")[0] for e in environ if e) == [b"LC_ALL", b"PATH", b"PYTHONPATH"]


def test_in_process_and_worker_agree_on_what_cannot_be_read(guest_images: GuestImages) -> None:
    read, size = _reader(guest_images.disk("odd"))
    disk = iso.IsolatedDisk(read, size, name="odd")
    try:
        _, remote = disk_volumes(read, size, prober=disk.probe)
        _, local = disk_volumes(read, size)
        assert [v.probe for v, _ in remote] == [v.probe for v, _ in local]
    finally:
        disk.close()
    assert probe(read, 0, 512)[0].status == "none"


def test_a_lying_worker_cannot_walk_out_of_the_folder(tmp_path: Path) -> None:
    body = """
    if op == "walk":
        _wire.send(tx, {"result": None})
    else:
        doc = {"name": "x", "path": "/docs/../../x", "type": "file", "size": 1, "mtime_ns": None, "mode": 0,
               "inode": 5, "target": None}
        _wire.send(tx, {"result": [doc], "end": True})
    """
    disk = iso.IsolatedDisk(lambda o, n: bytes(n), 1 << 20, name="d", command=_fake_worker(tmp_path, body))
    try:
        _, fs = disk.probe(0, 1 << 20)
        assert fs is not None
        docs = fs.root.__class__("docs", "/docs", "dir", 0, None, 0, 3, None)
        with pytest.raises(GuestError, match=r"an entry at '/docs/\.\./\.\./x'"):
            list(fs.walk(docs))
    finally:
        disk.close()
