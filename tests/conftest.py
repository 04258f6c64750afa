"""Shared fixtures: where ../shared is, skips for missing external tools, the Ceph cluster."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# the Ceph cluster is session-wide across packages (backends, engine): one definition here,
# so that a session starts at most one
from tests.ceph import rgw, rgw_cluster
from tests.fsimages import GuestImages

__all__ = ["require_tool", "rgw", "rgw_cluster", "small_tmpfs"]

# Property tests on a shared, loaded machine: how long an example takes is no verdict (a
# deadline or the too_slow health check would fail a correct program that was merely
# scheduled late); a hang is still one, caught by pytest-timeout and by the tests' own
# CPU-time limits. Tests that set their own health checks add too_slow to them.

#: campaigns: ``VMVAULT_HYPOTHESIS_SCALE=20`` runs every property test with 20 times its
#: examples (its own ``max_examples``, or hypothesis's 100), in the docs' "Development"
CAMPAIGN_SCALE = int(os.environ.get("VMVAULT_HYPOTHESIS_SCALE", "1"))
#: The test suite (and CI) runs the same examples every time: a seed derived from each test,
#: so a red run is a change's doing and reproduces as it is. Exploring new examples is what
#: campaigns are for: they (``VMVAULT_HYPOTHESIS_SCALE``, ``VMVAULT_FUZZ_EXAMPLES``) and
#: ``VMVAULT_HYPOTHESIS_RANDOM=1`` draw fresh ones each run.
RANDOM_EXAMPLES = (
    CAMPAIGN_SCALE != 1 or "VMVAULT_FUZZ_EXAMPLES" in os.environ or os.environ.get("VMVAULT_HYPOTHESIS_RANDOM") == "1"
)
settings.register_profile(
    "vmvault",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not RANDOM_EXAMPLES,
)
settings.load_profile("vmvault")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a campaign, each property test's examples multiplied by ``CAMPAIGN_SCALE``."""
    if CAMPAIGN_SCALE == 1:
        return
    scaled: set[int] = set()  # a parametrized test is one function behind several items
    for item in items:
        owner = getattr(item, "cls", None)
        test = getattr(item, "obj", None)
        if id(owner) in scaled or id(test) in scaled:
            continue
        if isinstance(getattr(owner, "settings", None), settings):
            # a rule-based state machine's TestCase carries its settings on the class
            scaled.add(id(owner))
            owner.settings = settings(owner.settings, max_examples=owner.settings.max_examples * CAMPAIGN_SCALE)
            continue
        # @given keeps the settings it runs with on the test function (hypothesis's attribute)
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(own, settings):
            scaled.add(id(test))
            test._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * CAMPAIGN_SCALE)


#: the read-only folder beside the project with real test images; absent for a user's clone
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it holds the real Windows/qemu test images (developers' checkout only)")
    return SHARED


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (``24m``) mounted at ``folder`` (created), for tests of a
    full disk; unmounted afterwards. Mounting needs root: the test is skipped otherwise."""
    folder.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path (keys and indexes) of every value inside JSON ``value``, outermost first: what
    the fuzzers of documents someone else writes pick from to change."""
    found = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        found += json_paths(inner, (*prefix, key))
    return found


#: what the fuzzers of documents put in place of a value
JSON_VALUES: list[Any] = [
    -1, 0, 1, 2**31, 2**63, 2**64 + 5, 1.5, 1e308, "x", "", None, True, [], {}, [1, 2], {"a": 1},
    "../../../etc/passwd", "a" * 5000, "\u0000", "00" * 32, "zz" * 32, 4096, 3 << 20,
]  # fmt: skip


def mutate_json(doc: Any, rng: random.Random) -> Any:
    """``doc`` changed in place by its structure, one to three times: a field removed, a list
    entry repeated or dropped, a value replaced by one of ``JSON_VALUES``; returned (a document
    with nothing inside is replaced whole)."""
    for _ in range(rng.randint(1, 3)):
        paths = json_paths(doc)
        if not paths:
            return copy.deepcopy(rng.choice(JSON_VALUES))
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last, roll = path[-1], rng.random()
        if roll < 0.15 and isinstance(parent, dict):
            del parent[last]
        elif roll < 0.25 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last])) if rng.random() < 0.5 else parent.pop(last)
        else:
            parent[last] = copy.deepcopy(rng.choice(JSON_VALUES))
    return doc


def require_tool(name: str) -> str:
    """The path of an external program, or skip the test saying which package brings it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/test.sh installs it)")
    return path


def as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child that dropped root (root reads everything); returns its text
    (or ``"ErrorType: message"`` if it raised)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()

    def child() -> None:
        os.setgid(65534)
        os.setuid(65534)
        try:
            child_end.send(fn())
        except Exception as exc:
            child_end.send(f"{type(exc).__name__}: {exc}")

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(60)
    return str(parent_end.recv())


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a thread; the test fails if it has not returned within ``seconds`` (a hang).

    Its exception, if any, is raised here.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: something blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


class ShortRepr(dict[str, Any]):
    """A fixture's files by name, shown by their names only: a failing hypothesis example
    prints its arguments, and the files' bytes made that report (and hypothesis's patch file)
    hundreds of MB."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self)})"


class Hang(Exception):
    """A test's own time limit ran out: something loops without end."""


@contextlib.contextmanager
def cpu_time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the block once this process has used ``seconds`` of CPU time in
    it. CPU time, not wall clock, so that a machine busy with other work never trips it; a
    block that waits without end (a read from a FIFO) is pytest-timeout's to catch, whose
    SIGALRM this leaves alone."""

    def on_prof(_signum: int, _frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s of CPU time")

    old = signal.signal(signal.SIGPROF, on_prof)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


@contextlib.contextmanager
def descriptors_taken(below: int = 1100) -> Iterator[None]:
    """Every free descriptor number below ``below`` taken (by copies of /dev/null), so that
    the descriptors the block opens lie past 1023, where ``select`` fails: a daemon or the web
    server holding many connections is there."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < below + 64:
        pytest.skip(f"the hard descriptor limit ({hard}) is below {below + 64}")
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, below + 64) if soft != resource.RLIM_INFINITY else soft, hard)
    )
    taken = []
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        taken.append(null)
        while True:
            fd = os.dup(null)
            taken.append(fd)
            if fd >= below - 1:
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(autouse=True)
def _vmvault_logger_restored() -> Any:
    """Commands run in-process configure the ``vmvault`` logger (handlers, level, no
    propagation, as the daemon does); put it back so later tests' caplog still sees records."""
    logger = logging.getLogger("vmvault")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> GuestImages:
    """Guest filesystem images and disks (tests/fsimages.py), each built once per session."""
    return GuestImages(tmp_path_factory.mktemp("guest-images"))


#: the environment variables a child keeps when a test clears vmvault's settings for it
#: (:func:`environment_without_settings`): the test's own state and cache folders
HOST_FOLDERS = ("VMVAULT_STATE_DIR", "VMVAULT_CACHE_DIR")


def environment_without_settings(*, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without vmvault's settings (``VMVAULT_*``) and ``drop``, for
    a child that must start from none; the test's state and cache folders stay, so that what
    the child remembers of a repository location ends with the test."""
    return {
        k: v for k, v in os.environ.items() if k not in drop and (not k.startswith("VMVAULT_") or k in HOST_FOLDERS)
    }


@pytest.fixture(scope="session", autouse=True)
def _session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The state and cache folders of session fixtures (and of the children they start), which
    run before any test's own: never the user's, where a record of a repository at a path
    this run reuses (the --basetemp of an earlier run) would make it "replaced"."""
    saved = {k: os.environ.get(k) for k in HOST_FOLDERS}
    os.environ["VMVAULT_STATE_DIR"] = str(tmp_path_factory.mktemp("session-state"))
    os.environ["VMVAULT_CACHE_DIR"] = str(tmp_path_factory.mktemp("session-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # what vmvault remembers on this host (repo/hostrecord.py, Hyper-V reference points) stays
    # with each test: one test's repositories must not be "seen before" by another
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    # ... and so does this host's cache of repository indexes (repo/index_cache.py)
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


#: for each file system a test makes: the Debian package with its mkfs, and mkfs's quiet option
_MKFS = {"xfs": ("xfsprogs", "-q"), "btrfs": ("btrfs-progs", "-q")}


@contextlib.contextmanager
def mounted_loop_filesystem(image: Path, mnt: Path, kind: str, size_mib: int) -> Iterator[Path]:
    """A new ``kind`` file system (``xfs`` or ``btrfs``) of ``size_mib`` MiB made in the sparse
    file ``image`` and mounted at the new folder ``mnt`` through a loop device; unmounted and its
    loop device freed afterwards. Needs root, the file system's mkfs and loop devices: the test is
    skipped, saying which is missing, otherwise."""
    package, quiet = _MKFS[kind]
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} file system needs root")
    mkfs = shutil.which(f"mkfs.{kind}")
    if mkfs is None:
        pytest.skip(f"mkfs.{kind} is not installed (apt-get install {package})")
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    made = subprocess.run([mkfs, quiet, str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.{kind} failed here: {made.stderr.strip()[:300]}")
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", "-t", kind, str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {kind} file system through a loop device here: {mounted.stderr.strip()[:300]}")
    try:
        yield mnt
    finally:
        # (a plain umount frees the loop device that mount -o loop set up)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
