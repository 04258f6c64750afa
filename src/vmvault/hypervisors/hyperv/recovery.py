"""Which recovery checkpoints and reference points are vmvault's, and what it keeps about them.

Hyper-V names a recovery checkpoint itself, and ``CreateSnapshot`` cannot be given a name.
So a backup identifies its checkpoint two ways:

* **before** creating it, the backup writes a *journal* (``<VM-ID>.pending.json`` in the state
  folder): run id, host, pid, start time and the recovery checkpoints that already exist;
  after creation it adds the new checkpoint's ID (taken from the job). The journal goes when
  the checkpoint is gone (converted or destroyed).
* right after creation (in the same host step) the checkpoint is renamed to a *marker*
  ``vmvault-recovery run=R host=H pid=P t=T``; it shows who made it in Hyper-V Manager and
  lets a backup from another machine recognise it.

A later backup treats a recovery checkpoint as ours when the marker or a journal says so, or
when a journal whose creation never returned (a crash or timeout in ``CreateSnapshot``)
brackets it: not among the checkpoints that existed before, created after the journal.
Ours and *stale* (the process that made it is gone, or, from another machine, older than
``STALE_AFTER``) are removed; ours and alive mean another backup of the VM is running, and
the new one stops. Checkpoints of other products are never touched.

RCT state: after a backup the reference point's RCT ids are kept per snapshot id in
``<VM-ID>.json`` (Hyper-V hands them out only after the snapshot is written).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vmvault import platform, state
from vmvault.errors import HypervisorError

__all__ = [
    "RECOVERY_MARKER",
    "STALE_AFTER",
    "Journal",
    "Marker",
    "RctState",
    "owner_alive",
    "run_ended",
    "run_started",
    "state_dir",
]

RECOVERY_MARKER = "vmvault-recovery"
#: a marked recovery checkpoint from another machine is stale after this many seconds
STALE_AFTER = 24 * 3600.0
#: RCT states kept per VM (one per snapshot id)
RCT_KEEP = 8


def state_dir() -> str:
    """``$VMVAULT_STATE_DIR/hyperv`` or ``~/.local/state/vmvault/hyperv`` (vmvault/state.py)."""
    return state.state_dir("hyperv")


@dataclass(frozen=True)
class Marker:
    """``vmvault-recovery run=R host=H pid=P t=T``: the name of a recovery checkpoint of ours."""

    run: str
    host: str
    pid: int
    time: float

    def __str__(self) -> str:
        return f"{RECOVERY_MARKER} run={self.run} host={self.host} pid={self.pid} t={int(self.time)}"

    @staticmethod
    def new(clock: Callable[[], float]) -> Marker:
        return Marker(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), clock())

    @staticmethod
    def parse(name: str) -> Marker | None:
        """The marker in a checkpoint name, or None when it is not one of ours."""
        if name != RECOVERY_MARKER and not name.startswith(RECOVERY_MARKER + " "):
            return None
        fields = dict(p.split("=", 1) for p in name.split()[1:] if "=" in p)
        try:
            return Marker(fields["run"], fields["host"], int(fields["pid"]), float(fields["t"]))
        except (KeyError, ValueError):
            # an older or damaged marker still says "vmvault": treat it as ours from an unknown run
            return Marker(fields.get("run", ""), fields.get("host", ""), 0, float(fields.get("t", "0") or 0))


#: runs of this process whose session is open: a daemon runs many backups in one process,
#: so "the pid is alive" alone would take an earlier job's leftover for a running backup
_active_runs: set[str] = set()


def run_started(run: str) -> None:
    _active_runs.add(run)


def run_ended(run: str) -> None:
    _active_runs.discard(run)


def owner_alive(host: str, pid: int, run: str = "") -> bool:
    """Is the backup ``run`` of process ``pid`` on ``host`` (this machine only) still running?"""
    if host != socket.gethostname() or pid <= 0:
        return False
    if pid == os.getpid():
        return run in _active_runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _atomic_json(path: str, doc: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        platform.replace(tmp, path)
    except OSError as exc:
        raise HypervisorError(f"cannot write the Hyper-V state file {path}: {exc.strerror}") from exc


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged state file is treated as absent: the next backup reads everything


@dataclass
class Journal:
    """One backup's claim on the recovery checkpoint it is creating (see the module text)."""

    vm_id: str
    run: str
    host: str
    pid: int
    started: float
    before: list[str] = field(default_factory=list)
    created: str = ""
    #: the create step's deadline: a checkpoint made by a crashed create appears before it
    until: float = 0.0

    @staticmethod
    def path(vm_id: str) -> str:
        return os.path.join(state_dir(), f"{vm_id}.pending.json")

    def save(self) -> None:
        _atomic_json(self.path(self.vm_id), asdict(self))

    def remove(self) -> None:
        try:
            os.unlink(self.path(self.vm_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise HypervisorError(f"cannot remove {self.path(self.vm_id)}: {exc.strerror}") from exc

    @staticmethod
    def load(vm_id: str) -> Journal | None:
        doc = _read_json(Journal.path(vm_id))
        if not isinstance(doc, dict):
            return None
        try:
            j = Journal(**doc)
        except TypeError:
            return None
        return j if j.vm_id == vm_id else None

    def claims(self, checkpoint_id: str, created: float | None) -> bool:
        """Is ``checkpoint_id`` the one this journal's run created (or may have created)?"""
        if self.created:
            return checkpoint_id.upper() == self.created.upper()
        if checkpoint_id.upper() in (b.upper() for b in self.before):
            return False
        # a create that never returned: the checkpoint appeared while it ran
        return created is not None and self.started - 5 <= created <= max(self.until, self.started) + 60

    @property
    def alive(self) -> bool:
        return owner_alive(self.host, self.pid, self.run)


class RctState:
    """``<VM-ID>.json``: snapshot id -> {"reference_point": id, "disks": {host path: rct id}}."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.path = os.path.join(state_dir(), f"{vm_id}.json")

    def _load(self) -> dict[str, dict[str, Any]]:
        doc = _read_json(self.path)
        if not isinstance(doc, dict):
            return {}
        return {k: v for k, v in doc.items() if isinstance(v, dict) and isinstance(v.get("disks"), dict)}

    def get(self, snapshot_id: str) -> dict[str, str]:
        entry = self._load().get(snapshot_id)
        if entry is None:
            return {}
        return {str(k).lower(): str(v) for k, v in entry["disks"].items() if isinstance(v, str)}

    def reference_points(self) -> list[tuple[str, str]]:
        """(snapshot id, reference point id) of every kept entry, oldest first."""
        return [(k, str(v.get("reference_point") or "")) for k, v in self._load().items()]

    def put(self, snapshot_id: str, reference_point: str, disks: dict[str, str]) -> None:
        doc = self._load()
        doc.pop(snapshot_id, None)
        doc[snapshot_id] = {"reference_point": reference_point, "disks": {k.lower(): v for k, v in disks.items()}}
        while len(doc) > RCT_KEEP:
            doc.pop(next(iter(doc)))
        _atomic_json(self.path, doc)

    def forget_reference_point(self, reference_point: str) -> None:
        doc = self._load()
        kept = {k: v for k, v in doc.items() if v.get("reference_point") != reference_point}
        if kept != doc:
            _atomic_json(self.path, kept)
