"""``BackupOptions`` in the engine: exclusions, change tracking ignored, options reaching the
session, and connector options refused before anything is opened."""

from __future__ import annotations

import pytest

from tests.engine.helpers import MemoryDisk, ScriptedSession
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.errors import ConfigError
from vmvault.hypervisors.base import (
    DEFAULT_OPTIONS,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Source,
    SourceDisk,
    SourceFile,
)
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture()
def repo() -> Repository:
    return Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)


def _file(name: str, data: bytes) -> SourceFile:
    import tempfile

    def opener() -> tempfile._TemporaryFileWrapper[bytes]:
        f = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the engine, which closes it
        f.write(data)
        f.seek(0)
        return f  # type: ignore[return-value]

    return SourceFile(name, len(data), 0o644, 0, opener)


class VmSource(Source):
    """A VM with a checkpoint chain (base + two layers), another disk and two files; records
    the options each session was opened with."""

    kind, location = "test", "test://vm"

    def __init__(self) -> None:
        self.seen: list[BackupOptions] = []
        self.sessions: list[ScriptedSession] = []

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        self.seen.append(options)
        disks = [
            SourceDisk("Virtual Hard Disks/web.vhdx", MemoryDisk(bytearray(b"b" * CS)), "vhdx"),
            SourceDisk(
                "Virtual Hard Disks/web_A.avhdx",
                MemoryDisk(bytearray(b"1" * CS)),
                "vhdx",
                layer=True,
                parent_name="Virtual Hard Disks/web.vhdx",
            ),
            SourceDisk(
                "Virtual Hard Disks/web_B.avhdx",
                MemoryDisk(bytearray(b"2" * CS)),
                "vhdx",
                layer=True,
                parent_name="Virtual Hard Disks/web_A.avhdx",
            ),
            SourceDisk("Virtual Hard Disks/scratch.vhdx", MemoryDisk(bytearray(b"s" * CS)), "vhdx"),
        ]
        session = ScriptedSession(disks)
        session.files = [_file("Virtual Machines/web.vmcx", b"config"), _file("install.iso", b"iso" * 100)]
        self.sessions.append(session)
        return session


def test_options_reach_the_session_as_given(repo: Repository) -> None:
    source = VmSource()
    options = BackupOptions(allow_crash_consistent=True, exclude=("*.iso",))
    backup(repo, source, options)
    backup(repo, source)
    assert source.seen[0] is options and source.seen[1] == BackupOptions()


def test_exclusions_drop_files_and_whole_disks_with_their_layers(repo: Repository) -> None:
    source = VmSource()
    result = backup(repo, source, BackupOptions(exclude=("*.iso", "web.vhdx")))
    snap = result.snapshot
    assert [d.name for d in snap.disks] == ["Virtual Hard Disks/scratch.vhdx"]
    assert [f.name for f in snap.files] == ["Virtual Machines/web.vmcx"]
    excluded = [
        "Virtual Hard Disks/web.vhdx",
        "Virtual Hard Disks/web_A.avhdx",
        "Virtual Hard Disks/web_B.avhdx",
        "install.iso",
    ]
    assert result.excluded == excluded and snap.stats["excluded"] == excluded
    assert result.to_dict()["excluded"] == excluded
    # a full path pattern works too, and without exclusions nothing is recorded
    assert backup(repo, VmSource(), BackupOptions(exclude=("Virtual Hard Disks/scratch.*",))).excluded == [
        "Virtual Hard Disks/scratch.vhdx"
    ]
    plain = backup(repo, VmSource())
    assert plain.excluded == [] and "excluded" not in plain.snapshot.stats


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (("*.avhdx",), "web_A.avhdx is a checkpoint layer of Virtual Hard Disks/web.vhdx; exclude the whole disk"),
        (("web_B.avhdx",), "web_B.avhdx is a checkpoint layer"),
        (("*",), "leave nothing to back up"),
    ],
)
def test_exclusions_that_would_lose_data_silently_are_refused(
    repo: Repository, patterns: tuple[str, ...], message: str
) -> None:
    source = VmSource()
    with pytest.raises(ConfigError, match=message):
        backup(repo, source, BackupOptions(exclude=patterns))
    assert source.sessions[0].closed and source.sessions[0].completed is None
    assert repo.list_snapshots() == []


def test_connector_options_are_refused_before_the_source_is_opened(repo: Repository) -> None:
    source = VmSource()  # a kind no registered connector owns: it takes no connector option
    with pytest.raises(ConfigError, match="takes connector options"):
        backup(repo, source, BackupOptions(scratch_dir="/tmp"))
    assert source.seen == []


def test_full_ignores_change_tracking(repo: Repository) -> None:
    class Tracked(VmSource):
        def open_session(
            self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS
        ) -> BackupSession:
            session = super().open_session(previous, options)
            for d in session.disks:
                d.changed = [] if previous else None  # "nothing changed" once there is a previous
                d.cbt = {"t": 1}
            return session

    backup(repo, Tracked())
    assert backup(repo, Tracked()).bytes_read < 4 * CS
    assert backup(repo, Tracked(), BackupOptions(full=True)).bytes_read >= 4 * CS


def test_option_values_are_checked_and_frozen() -> None:
    with pytest.raises(ConfigError, match="exclude pattern"):
        BackupOptions(exclude=("",))
    with pytest.raises(ConfigError, match="exclude pattern"):
        BackupOptions(exclude=("a\nb",))
    with pytest.raises(ConfigError, match="allowed parent folder"):
        BackupOptions(allow_parent_dirs=(" ",))
    with pytest.raises(ConfigError, match="scratch folder"):
        BackupOptions(scratch_dir="")
    given = BackupOptions(exclude=["a"], allow_parent_dirs=["/x"])  # type: ignore[arg-type]
    assert given.exclude == ("a",) and given.allow_parent_dirs == ("/x",) and hash(given)
    assert given.given() == {"exclude", "allow_parent_dirs"} and BackupOptions().given() == frozenset()
    merged = BackupOptions(exclude=("a",), scratch_dir="/s1").merged(
        BackupOptions(exclude=("b", "a"), follow_links=True)
    )
    assert merged == BackupOptions(exclude=("a", "b"), scratch_dir="/s1", follow_links=True)
    assert BackupOptions(scratch_dir="/s1").merged(BackupOptions(scratch_dir="/s2")).scratch_dir == "/s2"
