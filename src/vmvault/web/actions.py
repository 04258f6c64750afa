"""What operators and admins start from the dashboard besides jobs: restore a snapshot
(as it was, or as a clone), verify a snapshot, forget a snapshot, prune a repository.

Each is planned first (``plan_*``: exactly what will happen, shown on a confirmation page),
then run in a thread of its own that reports to the progress board; each is recorded in
the history database when it starts and when it ends (who, what, when, how it ended).
Restores go only into the folders configured as ``[web.restore_targets]``, always into a
new folder inside one; nothing existing is overwritten.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from vmvault.automation.history import History
from vmvault.backends import open_backend
from vmvault.engine.clone import restore_clone
from vmvault.engine.progress import ProgressReporter
from vmvault.engine.restore import restore
from vmvault.errors import ConfigError, IntegrityError, VmvaultError
from vmvault.repo.format import BlobType, ChunkResolver
from vmvault.repo.prune import forget_ids, prune
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

from .jobs import ProgressBoard
from .model import Dashboard

__all__ = ["Actions", "Plan"]

log = logging.getLogger("vmvault.web")

_CLONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64].strip("._") or "vm"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@dataclass
class Plan:
    """What an action will do, in words and as data (the confirmation names it exactly)."""

    action: str  # restore | clone | verify | forget | prune
    repository: str
    snapshot: str | None
    summary: str
    steps: list[str] = field(default_factory=list)
    target: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "repository": self.repository,
            "snapshot": self.snapshot,
            "summary": self.summary,
            "steps": self.steps,
            "target": self.target,
            "params": self.params,
        }


class Actions:
    def __init__(self, dashboard: Dashboard, board: ProgressBoard, history: History) -> None:
        self.dashboard = dashboard
        self.board = board
        self.history = history
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # ---- planning ------------------------------------------------------------------------

    def _snapshot(self, repository: str, ref: str) -> Snapshot:
        return self.dashboard.repo(repository).snapshot(ref)

    def _target(self, name: str) -> str:
        targets = dict(self.dashboard.settings.restore_targets)
        if name not in targets:
            raise ConfigError(
                f"no restore target {name!r}; configured: {', '.join(targets) or 'none (add [web.restore_targets])'}"
            )
        return targets[name]

    def plan_restore(self, repository: str, ref: str, target: str, clone: str | None = None) -> Plan:
        snap = self._snapshot(repository, ref)
        base = self._target(target)
        vm = str(snap.vm.get("name") or os.path.basename(str(snap.source.get("location", ""))) or "vm")
        when = (snap.time[:19].replace(":", "").replace("-", "")) or "snapshot"
        disks = [d for d in snap.disks]
        size = snap.total_size()
        params = {"repository": repository, "snapshot": snap.id, "target": target}
        if clone is not None:
            if not _CLONE_NAME.fullmatch(clone):
                raise ConfigError(
                    f"clone name {clone!r} is not allowed: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                    "letter or digit"
                )
            if clone == vm:
                raise ConfigError("a clone needs a name other than the original VM's")
            folder = os.path.join(base, clone)
            params["clone"] = clone
            summary = (
                f"Restore snapshot {snap.short_id} of {vm} (taken {snap.time[:19]} UTC on {snap.hostname}) as a NEW "
                f"VM named {clone} into {folder}"
            )
            steps = [
                f"create the folder {folder} (it must not exist)",
                f"write {len(disks)} disk(s) and {len(snap.files)} file(s), {_human(size)} in all, in their original "
                "formats, with names and identity of a new VM (new id; the original is not touched)",
            ]
            action = "clone"
        else:
            folder = os.path.join(base, f"{_folder_name(vm)}-{snap.short_id}-{when}")
            summary = (
                f"Restore snapshot {snap.short_id} of {vm} (taken {snap.time[:19]} UTC on {snap.hostname}) into the "
                f"new folder {folder}"
            )
            steps = [
                f"create the folder {folder} (it must not exist)",
                f"write {len(disks)} disk(s) and {len(snap.files)} file(s), {_human(size)} in all, in their original "
                "formats; the VM itself and any running copy of it are not touched",
            ]
            action = "restore"
        for d in disks:
            kind = f"checkpoint layer of {d.parent}" if d.layer else "disk"
            steps.append(f"{kind} {d.name}: {d.format}, {_human(d.size)}")
        steps.append("every chunk is verified as it is read; a damaged one stops the restore")
        if os.path.lexists(folder):
            raise ConfigError(f"{folder} exists already; nothing is ever restored over existing files")
        return Plan(action, repository, snap.id, summary, steps, folder, params)

    def plan_verify(self, repository: str, ref: str) -> Plan:
        snap = self._snapshot(repository, ref)
        chunks = sum(len(f.chunks) for f in snap.files)
        return Plan(
            "verify",
            repository,
            snap.id,
            f"Verify snapshot {snap.short_id} of {snap.vm.get('name') or snap.source.get('location')}: read, decrypt "
            f"and re-hash every chunk it needs from repository {repository}",
            [
                f"{len(snap.disks)} disk(s) ({_human(snap.total_size() - sum(f.size for f in snap.files))}) and "
                f"{len(snap.files)} file(s) ({chunks} chunks)",
                "nothing is written anywhere; the result is recorded in the history",
            ],
            params={"repository": repository, "snapshot": snap.id},
        )

    def plan_forget(self, repository: str, ref: str) -> Plan:
        snap = self._snapshot(repository, ref)
        return Plan(
            "forget",
            repository,
            snap.id,
            f"Forget snapshot {snap.short_id} of {snap.vm.get('name') or snap.source.get('location')} (taken "
            f"{snap.time[:19]} UTC) from repository {repository}",
            [
                "delete the snapshot object (its data stays until a prune removes what no snapshot needs)",
                "refused while another process holds a lock on the repository, and for objects under retention",
            ],
            params={"repository": repository, "snapshot": snap.id},
        )

    def plan_prune(self, repository: str) -> Plan:
        self.dashboard.repo(repository)
        return Plan(
            "prune",
            repository,
            None,
            f"Prune repository {repository}: remove the data no snapshot needs",
            [
                "takes the repository's exclusive lock (refused while a backup or check runs)",
                "repacks packs with more than 10% unused data, then deletes unused packs and superseded index files",
                "objects under retention are kept",
            ],
            params={"repository": repository},
        )

    # ---- running ------------------------------------------------------------------------

    def _open(self, repository: str, *, transfer: bool = False) -> Repository:
        """``transfer``: the action moves data; the backend opens its connections meanwhile."""
        rc = self.dashboard.repo(repository).config
        backend = open_backend(rc.location)
        if transfer:
            backend.warm_up()
        try:
            return Repository.open(backend, rc.secret())
        except BaseException:
            backend.close()
            raise

    def start(self, plan: Plan, user: str, address: str) -> str:
        """Run ``plan`` in a thread; returns the name it has on the progress board."""
        key = f"{plan.action} {plan.snapshot[:8] if plan.snapshot else plan.repository}"
        with self._lock:
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            if key in self._threads:
                raise ConfigError(f"{key} is running already")
            self._record(plan, user, address, "started")
            self.board.queued(key, user)
            t = threading.Thread(target=self._run, args=(plan, key, user, address), name=f"vmvault-web-{plan.action}")
            t.daemon = True
            self._threads[key] = t
            t.start()
        return key

    def _record(self, plan: Plan, user: str, address: str, result: str, **extra: Any) -> None:
        details = {"repository": plan.repository, "snapshot": plan.snapshot, "target": plan.target} | extra
        target = plan.target or (f"{plan.repository}:{plan.snapshot[:8]}" if plan.snapshot else plan.repository)
        self.history.record_action(
            dt.datetime.now(dt.UTC), user, plan.action, target, result, address=address, details=details
        )

    def _run(self, plan: Plan, key: str, user: str, address: str) -> None:
        progress = _BoardProgress(self.board, key)
        try:
            result = self._do(plan, progress)
        except VmvaultError as exc:
            log.error("%s by %s failed: %s", key, user, exc)
            self._record(plan, user, address, "failed", error=str(exc))
            self.board.finished(key, "failed")
        except Exception as exc:  # a bug must not kill the server; it is recorded as a failure
            log.exception("%s by %s failed", key, user)
            self._record(plan, user, address, "failed", error=f"unexpected {type(exc).__name__}: {exc}")
            self.board.finished(key, "failed")
        else:
            self._record(plan, user, address, "done", outcome=result)
            self.board.finished(key, "success")
            if plan.action in ("forget", "prune"):
                self.dashboard.repo(plan.repository).snapshots(fresh=True)

    def _do(self, plan: Plan, progress: ProgressReporter) -> dict[str, Any]:
        repo = self._open(plan.repository, transfer=plan.action in ("restore", "clone"))
        try:
            if plan.action in ("restore", "clone"):
                snap = repo.find_snapshot(plan.params["snapshot"])
                assert plan.target is not None
                if os.path.lexists(plan.target):
                    raise ConfigError(f"{plan.target} exists already; nothing is ever restored over existing files")
                if plan.action == "clone":
                    result = restore_clone(
                        repo, snap, os.path.dirname(plan.target), plan.params["clone"], progress=progress
                    )
                else:
                    result = restore(repo, snap, plan.target, progress=progress)
                return result.to_dict()
            if plan.action == "verify":
                return verify_snapshot(repo, repo.find_snapshot(plan.params["snapshot"]), progress)
            if plan.action == "forget":
                return {"forgotten": forget_ids(repo, [plan.params["snapshot"]])}
            if plan.action == "prune":
                progress.start("prune", 0)
                return prune(repo).to_dict()
            raise ConfigError(f"unknown action {plan.action}")
        finally:
            repo.close()

    def wait(self, timeout: float | None = None) -> None:
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(timeout)


class _BoardProgress:
    def __init__(self, board: ProgressBoard, key: str) -> None:
        self.board = board
        self.key = key
        self._reporter: ProgressReporter | None = None

    def _r(self) -> ProgressReporter:
        if self._reporter is None:
            from .jobs import _Reporter

            self._reporter = _Reporter(self.board, self.key)
        return self._reporter

    def start(self, label: str, total: int) -> None:
        self._r().start(label, total)

    def advance(self, n: int) -> None:
        self._r().advance(n)

    def finish(self) -> None:
        self._r().finish()

    def warn(self, text: str) -> None:
        self._r().warn(text)


def verify_snapshot(repo: Repository, snap: Snapshot, progress: ProgressReporter) -> dict[str, Any]:
    """Read, decrypt and re-hash every chunk ``snap`` needs (each distinct chunk once);
    ``IntegrityError`` names the first damaged one and where it belongs."""
    seen: set[bytes] = set()
    checked = 0
    nbytes = 0
    for record in snap.disks:
        resolver = ChunkResolver(repo, snap, record)
        n_chunks = -(-record.size // record.chunk_size)
        progress.start(f"disk {record.name}", n_chunks)
        for chunk in range(n_chunks):
            cid = resolver.chunk_id(chunk)
            if cid is not None and cid not in seen:
                try:
                    nbytes += len(resolver.fetch(cid))
                except IntegrityError as exc:
                    raise IntegrityError(
                        f"snapshot {snap.short_id}, disk {record.name}, offset {chunk * record.chunk_size}: {exc}",
                        object_id=cid.hex(),
                    ) from exc
                seen.add(cid)
                checked += 1
            progress.advance(1)
        progress.finish()
    if snap.files:
        progress.start("files", len(snap.files))
        for f in snap.files:
            for cid_hex in f.chunks:
                cid = bytes.fromhex(cid_hex)
                if cid in seen:
                    continue
                try:
                    nbytes += len(repo.get_blob(BlobType.DATA, cid))  # verified against its id
                except IntegrityError as exc:
                    raise IntegrityError(f"snapshot {snap.short_id}, file {f.name}: {exc}", object_id=cid_hex) from exc
                seen.add(cid)
                checked += 1
            progress.advance(1)
        progress.finish()
    return {"snapshot": snap.id, "chunks_verified": checked, "bytes_verified": nbytes}
