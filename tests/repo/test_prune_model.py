"""Random sequences of backups (some racing, some killed), forgets and prunes.

After every step each snapshot present restores exactly what was backed up; after every
prune, ``check --read-data`` is clean and the index holds exactly the blobs in use.
"""

from __future__ import annotations

import datetime as dt
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.repo.builders import CHUNK, Content, backup, make_repo, reopen, restore_all
from vmvault.backends.memory import MemoryBackend
from vmvault.repo import Repository, RetentionPolicy, check, forget, prune
from vmvault.repo.format import BlobType
from vmvault.repo.prune import referenced_blobs

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


class PruneModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.repo = make_repo(MemoryBackend(), pack_size=12 * 1024)
        self.contents: dict[str, Content] = {}
        self.clock = 0
        # a pool of chunks, so that snapshots share data with each other
        rnd = random.Random(0)
        self.pool = [rnd.randbytes(CHUNK) for _ in range(12)] + [bytes(CHUNK)]

    def _content(self, picks: list[int]) -> Content:
        disk = b"".join(self.pool[p % len(self.pool)] for p in picks)
        return Content(disks={"sda": disk}, files={"conf": bytes(picks) * 3})

    def _backup(self, repo: Repository, vm: str, picks: list[int], *, dedup: bool = True) -> None:
        self.clock += 1
        content = self._content(picks)
        snap = backup(repo, content, location=vm, time=T0 + dt.timedelta(hours=self.clock), dedup=dedup)
        self.contents[snap.id] = content

    @rule(vm=st.sampled_from(["vm1", "vm2"]), picks=st.lists(st.integers(0, 12), min_size=1, max_size=9))
    def do_backup(self, vm: str, picks: list[int]) -> None:
        self._backup(self.repo, vm, picks)

    @rule(picks=st.lists(st.integers(0, 12), min_size=1, max_size=9))
    def racing_backup(self, picks: list[int]) -> None:
        """A backup that started before the others' index files existed: stores duplicates."""
        self._backup(self.repo, "vm3", picks, dedup=False)

    @rule(picks=st.lists(st.integers(0, 12), min_size=1, max_size=9))
    def killed_backup(self, picks: list[int]) -> None:
        """Packs uploaded, no index file, no snapshot."""
        writer = self.repo.writer(index_every=1 << 20)
        for p in picks:
            data = self.pool[p % len(self.pool)] + b"killed"
            writer.add(BlobType.DATA, self.repo.key.chunk_id(data), data)
        builder = writer._builder
        if len(builder):
            pack_id, raw = builder.finish(self.repo.key)
            from vmvault.repo.pack import pack_name

            self.repo.backend.put(pack_name(pack_id), raw)
        writer._builder = type(builder)()
        writer.close(flush=False)
        self.repo = reopen(self.repo)

    @rule(last=st.integers(1, 3))
    def do_forget(self, last: int) -> None:
        report = forget(self.repo, RetentionPolicy(last=last))
        for sid in report.removed:
            del self.contents[sid]

    @rule(max_unused=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    def do_prune(self, max_unused: float) -> None:
        prune(self.repo, max_unused=max_unused)
        # the cache agreed with the index files: never rebuilt by prune (repository-format.md 12.5)
        assert not [w for w in self.repo.warnings + self.repo.index.warnings if "disagrees" in w]
        fresh = reopen(self.repo)
        report = check(fresh, read_data=True)
        assert report.ok and not report.warnings, report.to_dict()
        used = referenced_blobs(fresh, fresh.list_snapshots())
        indexed = {b for b, _loc in fresh.index.items()}
        assert used <= indexed
        if max_unused == 0.0:
            assert indexed == used

    @invariant()
    def everything_restores(self) -> None:
        fresh = reopen(self.repo)  # what a new process sees
        assert set(fresh.snapshot_ids()) == set(self.contents)
        for sid, content in self.contents.items():
            assert restore_all(fresh, fresh.load_snapshot(sid)) == content


PruneModel.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None)
TestPruneModel = PruneModel.TestCase
