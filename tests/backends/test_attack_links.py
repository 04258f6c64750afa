"""Whoever writes the storage plants links (and FIFOs, sockets, odd names) in the repository.

Threat model: docs/design/repository-format.md, section 10.3. The rule under test: a
file-system backend never follows a link inside the repository, for any operation; a
repository whose top-level folders are links is refused whole unless the location says
``follow-links=1``; deeper links and special files are skipped by listings (and reported)
and refused by every other operation; nothing outside the repository is read, written or
deleted. Local backend first (examples, then a property test that plants random links and
watches the outside tree with inotify), then the SFTP backend against a real OpenSSH server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.backends.conftest import SshServer
from tests.repo.builders import PASS, Content, backup, make_repo, write_dead_lock
from vmvault.backends import open_backend
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend, open_local
from vmvault.backends.sftp import SftpBackend
from vmvault.cli import EXIT, main
from vmvault.errors import ConfigError, ObjectNotFoundError, UnsafeStorageError, VmvaultError
from vmvault.repo.check import check
from vmvault.repo.prune import forget, prune
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy

TOP = ("data", "index", "snapshots", "locks", "keys")
LOCK = "locks/" + "5e" * 16
SENTINEL = b"OUTSIDE-THE-REPOSITORY-" + b"7" * 16


# --- helpers -------------------------------------------------------------------------------


def tree_state(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Every entry under ``root`` (links not followed): type, mode, mtime, content/target."""
    out: dict[str, tuple[str, int, int, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", st_.st_mode, st_.st_mtime_ns, os.readlink(path).encode())
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", st_.st_mode, st_.st_mtime_ns, Path(path).read_bytes())
            else:
                out[rel] = ("other", st_.st_mode, st_.st_mtime_ns, b"")
    return out


def make_outside(base: Path, repo: Path | None = None) -> Path:
    """A folder beside the repository whose entries would betray any access: sentinel bytes,
    names a repository would take for its own objects, and (from ``repo``) valid objects."""
    outside = base / "outside"
    (outside / "objects" / "5e").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SENTINEL)
    (outside / "objects" / ("5e" * 16)).write_bytes(SENTINEL)  # named like a lock
    (outside / "objects" / ("5e" * 32)).write_bytes(SENTINEL)  # like a key, snapshot, index
    (outside / "objects" / "5e" / ("5e" * 32)).write_bytes(SENTINEL)  # like a pack folder
    if repo is not None:
        shutil.copytree(repo, outside / "copy")  # real objects: a followed link would serve them
    return outside


def small_repository(root: Path) -> Repository:
    repo = make_repo(LocalBackend(str(root)))
    backup(repo, Content(disks={"disk": os.urandom(3 * 4096)}, files={"vm.conf": b"name=vm\n"}))
    backup(repo, Content(disks={"disk": os.urandom(3 * 4096)}), location="vm2")
    write_dead_lock(repo, exclusive=False)
    return repo


def first(root: Path, pattern: str) -> str:
    """The relative name of the first entry matching ``pattern`` under ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))[0]


def replace_with_link(path: Path, target: str | Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


def assert_refused(backend: Backend, name: str) -> None:
    """Every operation on ``name``, which is (or lies below) a planted link, is refused."""
    for call in (
        partial(backend.get, name),
        partial(backend.get, name, 0, 10),
        partial(backend.exists, name),
        partial(backend.modified, name),
        partial(backend.put, name, b"replaced"),
        partial(backend.delete, name),
    ):
        with pytest.raises(UnsafeStorageError, match="symbolic link"):
            call()


class Inotify:
    """Reports every open, read, write, attribute change, creation and removal under the
    folders it watches (Linux inotify through libc)."""

    ALL_EVENTS = 0x00000FFF
    DONT_FOLLOW = 0x02000000

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify is not available: {os.strerror(ctypes.get_errno())}")
        self._paths: dict[int, str] = {}

    def watch_tree(self, root: Path) -> None:
        for dirpath in [d for d, _dirs, _files in os.walk(root)]:
            wd = self._libc.inotify_add_watch(self.fd, dirpath.encode(), self.ALL_EVENTS | self.DONT_FOLLOW)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self._paths[wd] = dirpath
        self.events()  # what walking the tree here caused

    def events(self) -> list[str]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode(errors="replace")
                out.append(f"{self._paths.get(wd, '?')}/{name} mask={mask:#x}")
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# --- the reproduction, through the command line ------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct-horse-1")
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("VMVAULT_REPO", raising=False)
    vm = tmp_path / "vm"
    (vm / "sub").mkdir(parents=True)
    (vm / "disk.raw").write_bytes(os.urandom(64 * 1024))
    (vm / "vm.conf").write_text("name=vm1\n")
    (vm / "sub" / "nvram.bin").write_bytes(b"nv")
    return tmp_path


def test_symlinked_locks_folder_makes_forget_refuse_not_delete(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9, critical 2: ``rm -r repo/locks; ln -s /victim repo/locks; forget``."""
    repo = cli_env / "repo"
    assert main(["init", "-r", str(repo), "-q"]) == 0
    assert main(["-r", str(repo), "backup", str(cli_env / "vm"), "-q"]) == 0
    victim = cli_env / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "precious.db").write_bytes(SENTINEL)
    (victim / "deep" / "more.db").write_bytes(SENTINEL)
    (victim / ("ab" * 16)).write_bytes(SENTINEL)  # named exactly like a lock
    before = tree_state(victim)
    shutil.rmtree(repo / "locks")
    (repo / "locks").symlink_to(victim)
    capsys.readouterr()
    for argv in (["forget", "--keep-last", "5"], ["forget", "--keep-last", "1", "--prune"], ["prune"], ["check"]):
        assert main(["-r", str(repo), *argv]) == EXIT["error"], argv
        err = capsys.readouterr().err
        assert "locks is a symbolic link" in err and "follow-links=1" in err and "Traceback" not in err
    assert tree_state(victim) == before
    # put back by hand, the repository works again and its snapshot is intact
    (repo / "locks").unlink()
    (repo / "locks").mkdir()
    assert main(["-r", str(repo), "check", "--read-data"]) == 0


# --- local backend: examples ---------------------------------------------------------------


@pytest.mark.parametrize("folder", TOP)
def test_linked_top_level_folder_refuses_every_operation(tmp_path: Path, folder: str) -> None:
    """The link points at a faithful copy, so following it would even "work": refused anyway."""
    root = tmp_path / "repo"
    small_repository(root)
    outside = make_outside(tmp_path, root)
    replace_with_link(root / folder, outside / "copy" / folder)
    before = tree_state(outside)
    backend = LocalBackend(str(root))
    with pytest.raises(UnsafeStorageError, match=f"the folder {folder} is a symbolic link"):
        Repository.open(backend, PASS)
    name = f"{folder}/{'ab' * 32}"
    for call in (
        lambda: backend.get("config"),
        lambda: backend.exists(name),
        lambda: backend.modified(name),
        lambda: list(backend.list(f"{folder}/")),
        lambda: list(backend.list()),
        lambda: backend.put(name, b"x"),
        lambda: backend.delete(name),
        lambda: backend.cleanup_temporary(0),
    ):
        with pytest.raises(UnsafeStorageError):
            call()
    # a fresh backend refuses even its first operation on another folder
    with pytest.raises(UnsafeStorageError):
        LocalBackend(str(root)).get("config")
    assert tree_state(outside) == before


def test_follow_links_lets_an_administrator_move_a_top_level_folder(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    small_repository(root)
    disk2 = tmp_path / "other-disk"
    shutil.move(str(root / "data"), disk2)
    (root / "data").symlink_to(disk2)
    location = f"file://{root}?follow-links=1"
    backend = open_backend(location)
    assert isinstance(backend, LocalBackend) and backend.follow_links
    repo = Repository.open(backend, PASS)
    assert len(repo.list_snapshots()) == 2
    assert check(repo, read_data=True).ok
    packs_before = len(list(disk2.rglob("*")))
    backup(repo, Content(disks={"disk": os.urandom(5 * 4096)}))
    assert len(list(disk2.rglob("*"))) > packs_before  # new packs went through the configured link
    # deeper links are still never followed, with the option or without
    elsewhere = make_outside(tmp_path)
    pack_dir = first(disk2, "??")
    (disk2 / pack_dir / ("cd" * 32)).symlink_to(elsewhere / "secret.txt")
    names = [o.name for o in backend.list("data/")]
    assert f"data/{pack_dir}/{'cd' * 32}" not in names and names
    with pytest.raises(UnsafeStorageError):
        backend.get(f"data/{pack_dir}/{'cd' * 32}")
    assert f"data/{pack_dir}/{'cd' * 32}" in backend.skipped()


@pytest.mark.parametrize(
    "place",
    [
        "config",
        "keys/*",
        "snapshots/*",
        "index/*",
        "data/*",  # a pack folder
        "data/*/*",  # a pack
        LOCK,
    ],
)
@pytest.mark.parametrize("target", ["secret", "objects", "copy", "dangling", "loop"])
def test_deeper_links_are_skipped_and_refused(tmp_path: Path, place: str, target: str) -> None:
    root = tmp_path / "repo"
    small_repository(root)
    outside = make_outside(tmp_path, root)
    rel = first(root, place) if "*" in place else place
    to: str | Path = {
        "secret": outside / "secret.txt",
        "objects": outside / "objects",
        "copy": outside / "copy" / rel,
        "dangling": outside / "missing",
        "loop": root / rel,
    }[target]
    replace_with_link(root / rel, to)
    before = tree_state(outside)
    backend = LocalBackend(str(root))
    listed = [o.name for o in backend.list()]
    assert rel not in listed and not any(n.startswith(rel + "/") for n in listed)
    assert rel in backend.skipped() and "symbolic link" in backend.skipped()[rel]
    assert_refused(backend, f"{rel}/{'5e' * 32}" if place == "data/*" else rel)
    if place not in ("config", "keys/*"):  # without those there is no repository to open
        repo = Repository.open(backend, PASS)
        with repo.lock(exclusive=True, operation="prune"):
            pass
        assert rel in {p.object for p in check(repo).warnings if p.kind == "unsafe-entry"}
        forget(repo, RetentionPolicy(last=1))
    assert (root / rel).is_symlink(), "the planted link stays for the administrator to see"
    assert not any(".tmp-" in p.name for p in root.rglob("*")), "a refused put left a temporary file"
    assert tree_state(outside) == before


def test_fifo_and_socket_are_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    repo = small_repository(root)
    os.mkfifo(root / LOCK)
    snap = first(root, "snapshots/*")
    (root / snap).unlink()
    os.mkfifo(root / snap)
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(root / "index")  # a socket's path must be short
    sock.bind("0d" * 32)
    specials = (LOCK, snap, f"index/{'0d' * 32}")
    try:
        backend = LocalBackend(str(root))
        started = time.monotonic()
        assert not set(specials) & {o.name for o in backend.list()}
        assert set(specials) <= set(backend.skipped())
        for name in specials:
            with pytest.raises(UnsafeStorageError, match=r"FIFO|socket"):
                backend.get(name)
            with pytest.raises(UnsafeStorageError):
                backend.delete(name)
        repo = Repository.open(backend, PASS)
        assert len(repo.list_snapshots()) == 1  # the FIFO is no snapshot
        with repo.lock(exclusive=True, operation="prune"):
            pass
        report = check(repo)
        assert {p.object for p in report.warnings if p.kind == "unsafe-entry"} >= {LOCK, snap}
        assert time.monotonic() - started < 30, "something waited on a FIFO"
        assert stat.S_ISFIFO(os.lstat(root / LOCK).st_mode)
    finally:
        sock.close()


def test_names_that_are_not_utf8_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = small_repository(root)
    odd = os.path.join(os.fsencode(root / "locks"), b"\xff\xfe\x1b[2J")
    Path(os.fsdecode(odd)).write_bytes(b"x")
    backend = LocalBackend(str(root))
    names = [o.name for o in backend.list("locks/")]
    assert len(names) == 1 and names[0].isascii()  # the one real lock
    (skipped,) = backend.skipped()
    assert "\x1b" not in skipped and "\\x1b" in skipped and "not UTF-8" in backend.skipped()[skipped]
    repo = Repository.open(backend, PASS)
    with repo.lock(exclusive=True, operation="prune"):
        pass
    assert os.path.exists(odd), "a name vmvault does not write is never deleted"
    assert any(p.kind == "unsafe-entry" for p in check(repo).warnings)


def test_a_deep_planted_tree_is_not_walked_forever(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    small_repository(root)
    deep = root / "data" / "zz"
    for _ in range(100):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    backend = LocalBackend(str(root))
    names = [o.name for o in backend.list("data/")]
    assert names and not any(n.startswith("data/zz/") for n in names)
    assert any("deeper" in why for why in backend.skipped().values())


def test_put_never_creates_folders_or_files_through_links(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    small_repository(root)
    outside = make_outside(tmp_path)
    # a pack folder the backups did not make (their pack ids are random)
    free = next(f"{i:02x}" for i in range(256) if not (root / "data" / f"{i:02x}").exists())
    (root / "data" / free).symlink_to(outside / "objects")
    (root / "index" / "sub").symlink_to(outside / "objects")
    before = tree_state(outside)
    backend = LocalBackend(str(root))
    for name in (f"data/{free}/{free * 32}", "index/sub/deeper/x", "index/sub/x"):
        with pytest.raises(UnsafeStorageError):
            backend.put(name, b"new")
    assert tree_state(outside) == before


def test_cleanup_removes_only_old_temporary_files_it_could_have_written(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    small_repository(root)
    outside = make_outside(tmp_path)
    pack_dir = root / first(root, "data/*")
    old = time.time() - 7 * 86400
    ours_old = pack_dir / f"{'aa' * 32}.tmp-0123456789ab"
    ours_young = root / "locks" / f"{'bb' * 16}.tmp-ba9876543210"
    not_ours = root / "index" / "notes.tmp-backup"
    link = root / "snapshots" / f"{'cc' * 32}.tmp-00112233aabb"
    for path in (ours_old, ours_young, not_ours):
        path.write_bytes(b"partial")
    link.symlink_to(outside / "secret.txt")
    for path in (ours_old, not_ours, link):
        os.utime(path, (old, old), follow_symlinks=False)
    before = tree_state(outside)
    backend = LocalBackend(str(root))
    assert backend.cleanup_temporary() == 1
    assert not ours_old.exists()
    assert ours_young.exists() and not_ours.exists() and link.is_symlink()
    assert backend.cleanup_temporary(older_than=0) == 1
    assert not ours_young.exists() and not_ours.exists() and link.is_symlink()
    assert tree_state(outside) == before


def test_the_root_may_be_a_link_the_user_chose(tmp_path: Path) -> None:
    real = tmp_path / "mnt" / "disk" / "repo"
    small_repository(real)
    (tmp_path / "backup").symlink_to(tmp_path / "mnt" / "disk")
    repo = Repository.open(LocalBackend(str(tmp_path / "backup" / "repo")), PASS)
    assert len(repo.list_snapshots()) == 2 and check(repo).ok


def test_location_options() -> None:
    assert open_local("file:///srv/repo?follow-links=1").follow_links
    assert not open_local("file:///srv/repo?follow-links=0").follow_links
    assert not open_local("file:///srv/repo").follow_links
    assert open_local("/srv/odd?name").root == "/srv/odd?name"  # a plain path takes no options
    for bad in ("file:///srv/repo?follow-links=yes", "file:///srv/repo?follow=1", "file://?follow-links=1"):
        with pytest.raises(ConfigError):
            open_local(bad)


def test_a_directory_where_an_object_belongs_is_still_no_object(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path / "repo"))
    backend.put("data/ab/x", b"x")
    with pytest.raises(ObjectNotFoundError):
        backend.get("data/ab")
    assert not backend.exists("data/ab") and backend.modified("data/ab") is None
    backend.delete("data/ab")
    assert backend.get("data/ab/x") == b"x"


# --- local backend: property test ----------------------------------------------------------

#: where a link (or FIFO) is planted; ``*`` picks an existing entry of the repository. A
#: linked top-level folder, config or key makes the repository refuse to open, so deeper
#: places are drawn more often, for the repository operations to meet them too
SHALLOW = [*TOP, "config", "keys/*"]
DEEP = [
    "data/*",
    "data/*/*",
    "index/*",
    "snapshots/*",
    LOCK,
    f"snapshots/{'5e' * 32}",
    "data/5e",
    f"data/5e/{'5e' * 32}",
    "index/deeper",
    "elsewhere",
]
#: what it points at: outside the repository, nowhere, back into it, or itself
TARGETS = ["secret", "objects", "copy", "outside-root", "dangling", "self", "parent", "repo-root", "sibling", "fifo"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "repo"
    small_repository(root)
    return root


def _resolve(root: Path, place: str) -> Path | None:
    """The path ``place`` names under ``root`` (``*``: the first entry there), through real
    folders only (made if missing); None when a folder on the way is itself planted."""
    path = root
    for component in place.split("/"):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return None
        path.mkdir(exist_ok=True)
        if component == "*":
            entries = sorted(e for e in os.listdir(path) if ".tmp-" not in e)
            if not entries:
                return None
            component = entries[0]
        path = path / component
    return path


def _plant(root: Path, outside: Path, place: str, target: str) -> None:
    path = _resolve(root, place)
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if target == "fifo":
        os.mkfifo(path)
        return
    rel = path.relative_to(root).as_posix()
    to = {
        "secret": str(outside / "secret.txt"),
        "objects": str(outside / "objects"),
        "copy": str(outside / "copy" / rel),
        "outside-root": str(outside),
        "dangling": str(outside / "no-such-thing"),
        "self": path.name,
        "parent": "..",
        "repo-root": str(root),
        "sibling": "../index" if "/" in rel else "index",
    }[target]
    path.symlink_to(to)


def _attempt(call: Callable[[], object], seen: list[bytes]) -> None:
    """Run one operation: a VmvaultError is an acceptable outcome, anything else is a crash."""
    try:
        result = call()
    except VmvaultError:
        return
    if isinstance(result, bytes):
        seen.append(result)


def _names(root: Path) -> Iterator[str]:
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if ".tmp-" not in rel:
                yield rel


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plants=st.lists(
        st.tuples(st.sampled_from(SHALLOW) | st.sampled_from(DEEP) | st.sampled_from(DEEP), st.sampled_from(TARGETS)),
        min_size=1,
        max_size=4,
        unique_by=lambda p: p[0],
    )
)
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nothing_outside_the_repository_is_read_written_or_deleted(
    template: Path, plants: list[tuple[str, str]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "repo"
        shutil.copytree(template, root, symlinks=True)
        outside = make_outside(base, template)
        for place, target in plants:
            _plant(root, outside, place, target)
        before = tree_state(outside)
        watcher = Inotify()
        seen: list[bytes] = []
        try:
            watcher.watch_tree(outside)
            backend = LocalBackend(str(root))
            names = sorted(set(_names(root)) | {p for p, _t in plants if "*" not in p})
            # what the repository does with a listing: open, read, lock, check, forget, prune
            holder: list[Repository] = []
            _attempt(lambda: holder.append(Repository.open(backend, PASS)), seen)
            event("the repository opened" if holder else "the repository was refused")
            if holder:
                repo = holder[0]
                _attempt(lambda: repo.list_snapshots(), seen)
                _attempt(lambda: check(repo, read_data=True), seen)
                _attempt(lambda: repo.lock(exclusive=True, operation="prune").acquire(), seen)
                _attempt(lambda: forget(repo, RetentionPolicy(last=1)), seen)
                _attempt(lambda: prune(repo), seen)
            # every backend operation on every name there is
            for prefix in ["", *(f"{n}/" for n in names), *names]:
                _attempt(partial(lambda p: list(backend.list(p)), prefix), seen)
            for name in names:
                for read in (backend.get, partial(backend.get, offset=1, length=64), backend.exists, backend.modified):
                    _attempt(partial(read, name), seen)
            for name in names:
                _attempt(partial(backend.put, name, b"written by the test"), seen)
                _attempt(partial(backend.put, f"{name}/below", b"written by the test"), seen)
            _attempt(partial(backend.cleanup_temporary, 0), seen)
            for name in reversed(names):
                _attempt(partial(backend.delete, name), seen)
            events = watcher.events()
        finally:
            watcher.close()
        assert events == [], f"touched outside the repository: {events[:10]}"
        assert tree_state(outside) == before
        assert not any(SENTINEL in data for data in seen), "read a file outside the repository"


# --- SFTP: links on the server --------------------------------------------------------------


def sftp_backend(server: SshServer, sub: str, **options: object) -> SftpBackend:
    b = server.open_backend(sub, **options)
    assert isinstance(b, SftpBackend)
    return b


@pytest.fixture
def sftp_repo(sshd_server: SshServer, tmp_path: Path) -> Iterator[tuple[SshServer, str, Path]]:
    """A small repository on the server; yields the server, its sub-path and its folder."""
    sub = f"links-{os.urandom(6).hex()}"
    with sftp_backend(sshd_server, sub) as b:
        repo = make_repo(b)
        backup(repo, Content(disks={"disk": os.urandom(3 * 4096)}, files={"vm.conf": b"x"}))
        write_dead_lock(repo, exclusive=False)
    yield sshd_server, sub, sshd_server.root / sub


@pytest.mark.integration
def test_sftp_symlinked_locks_folder_is_refused(sftp_repo: tuple[SshServer, str, Path], tmp_path: Path) -> None:
    server, sub, root = sftp_repo
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / ("ab" * 16)).write_bytes(SENTINEL)
    (victim / "deep" / ("cd" * 16)).write_bytes(SENTINEL)
    before = tree_state(victim)
    replace_with_link(root / "locks", victim)
    with sftp_backend(server, sub) as b:
        with pytest.raises(UnsafeStorageError, match="locks is a symbolic link"):
            Repository.open(b, PASS)
        for call in (
            lambda: list(b.list("locks/")),
            lambda: b.delete(f"locks/{'ab' * 16}"),
            lambda: b.get(f"locks/{'ab' * 16}"),
            lambda: b.put(f"locks/{'ef' * 16}", b"x"),
            lambda: b.cleanup_temporary(0),
        ):
            with pytest.raises(UnsafeStorageError):
                call()
    assert tree_state(victim) == before
    # configured on purpose, the link is followed (and only names vmvault writes are touched)
    with sftp_backend(server, sub, follow_links=True) as b:
        repo = Repository.open(b, PASS)
        with repo.lock(exclusive=True, operation="prune"):
            pass
        assert len(repo.list_snapshots()) == 1
    assert (victim / "deep" / ("cd" * 16)).read_bytes() == SENTINEL


@pytest.mark.integration
@pytest.mark.parametrize("place", ["data/*", "data/*/*", "snapshots/*", "index/*", "keys/*", "config", LOCK])
def test_sftp_deeper_links_are_skipped_and_refused(
    sftp_repo: tuple[SshServer, str, Path], tmp_path: Path, place: str
) -> None:
    server, sub, root = sftp_repo
    outside = make_outside(tmp_path, root)
    rel = first(root, place) if "*" in place else place
    replace_with_link(root / rel, outside / "copy" / rel)
    before = tree_state(outside)
    with sftp_backend(server, sub) as b:
        listed = [o.name for o in b.list()]
        assert rel not in listed and not any(n.startswith(rel + "/") for n in listed)
        assert rel in b.skipped()
        assert_refused(b, f"{rel}/{'5e' * 32}" if place == "data/*" else rel)
        if place not in ("config", "keys/*"):  # without those there is no repository to open
            repo = Repository.open(b, PASS)
            with repo.lock(exclusive=True, operation="prune"):
                pass
            assert rel in {p.object for p in check(repo).warnings if p.kind == "unsafe-entry"}
            forget(repo, RetentionPolicy(last=1))
    assert (root / rel).is_symlink()
    assert tree_state(outside) == before


@pytest.mark.integration
def test_sftp_odd_names_and_temporary_links(sftp_repo: tuple[SshServer, str, Path], tmp_path: Path) -> None:
    server, sub, root = sftp_repo
    outside = make_outside(tmp_path)
    odd = os.path.join(os.fsencode(root / "locks"), b"\xff\x1b[2J")
    Path(os.fsdecode(odd)).write_bytes(b"x")
    os.mkfifo(root / "snapshots" / ("0f" * 32))
    tmp_link = root / "index" / f"{'cc' * 32}.tmp-00112233aabb"
    tmp_link.symlink_to(outside / "secret.txt")
    os.utime(tmp_link, (0, 0), follow_symlinks=False)
    stale_tmp = root / "index" / f"{'dd' * 32}.tmp-00112233aabb"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (0, 0))
    before = tree_state(outside)
    with sftp_backend(server, sub) as b:
        names = [o.name for o in b.list()]
        assert names and all(n.isascii() for n in names)
        assert any("not UTF-8" in why for why in b.skipped().values())
        assert f"snapshots/{'0f' * 32}" in b.skipped()
        repo = Repository.open(b, PASS)
        with repo.lock(exclusive=True, operation="prune"):
            pass
        assert len(repo.list_snapshots()) == 1
        assert b.cleanup_temporary() == 1
    assert os.path.exists(odd) and tmp_link.is_symlink() and not stale_tmp.exists()
    assert tree_state(outside) == before
