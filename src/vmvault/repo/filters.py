"""Which snapshots a command works on: ``--vm``, ``--host``, ``--tag``, ``--source``.

One filter for every command that picks snapshots (``snapshots``, ``show``, ``restore``,
``forget``, ``check --read-data``, ``copy``, ``ls``, ``diff``, ``stats``, ``tag``, ``dump``,
``files``), with restic's semantics:

* the values of one option are alternatives: ``--vm a --vm b`` matches a snapshot of ``a``
  or of ``b``;
* different options must all match: ``--vm a --host h`` is ``a``'s snapshots taken on ``h``;
* one ``--tag`` value may name several tags separated by commas, all of which must be
  present: ``--tag daily,keep --tag monthly`` matches snapshots tagged both ``daily`` and
  ``keep``, or tagged ``monthly``;
* ``--source`` compares the location a snapshot was taken from: a path (made absolute and
  normalised, as ``vmvault backup`` records it) or a URL (``qemu+unix://...``, compared as
  given).

``latest`` means the newest snapshot the filter matches (:func:`latest`); when it was not
narrowed to one VM and the repository holds several, :class:`Resolved` says which VM it
picked so the command can tell the user.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import ConfigError, SnapshotNotFoundError
from vmvault.repo.snapshot import Snapshot

__all__ = ["Resolved", "SnapshotFilter", "latest", "normalise_location", "require_match", "vm_name"]


def normalise_location(location: str) -> str:
    """A source location as ``vmvault backup`` records it: URLs as given, paths absolute."""
    text = location.strip()
    if "://" in text:
        return text
    return os.path.abspath(text)


def vm_name(snap: Snapshot) -> str:
    """The VM a snapshot is of: its recorded name, else the last part of its location."""
    name = snap.vm.get("name") if isinstance(snap.vm, dict) else None
    if isinstance(name, str) and name:
        return name
    location = str(snap.source.get("location", ""))
    return os.path.basename(location.rstrip("/")) or location


@dataclass(frozen=True)
class SnapshotFilter:
    """Empty fields match everything (module docstring for the rules)."""

    vms: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    #: each entry is one ``--tag`` value: tags separated by commas, all required
    tags: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    _tag_sets: tuple[frozenset[str], ...] = field(init=False, repr=False, compare=False)
    _locations: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tag_sets = []
        for spec in self.tags:
            parts = [t.strip() for t in spec.split(",")]
            if any(not t for t in parts):
                raise ConfigError(f"--tag {spec!r} names an empty tag (tags are separated by commas)")
            tag_sets.append(frozenset(parts))
        object.__setattr__(self, "_tag_sets", tuple(tag_sets))
        object.__setattr__(self, "_locations", frozenset(normalise_location(s) for s in self.sources))

    @classmethod
    def from_args(cls, args: Any) -> SnapshotFilter:
        """The filter of a parsed command line (``--vm``, ``--host``, ``--tag``, ``--source``;
        an option the command does not have counts as not given)."""

        def values(name: str) -> tuple[str, ...]:
            return tuple(getattr(args, name, None) or ())

        return cls(
            vms=values("filter_vm"),
            hosts=values("filter_host"),
            tags=values("filter_tag"),
            sources=values("filter_source"),
        )

    def empty(self) -> bool:
        return not (self.vms or self.hosts or self.tags or self.sources)

    def matches(self, snap: Snapshot) -> bool:
        if self.vms and vm_name(snap) not in self.vms:
            return False
        if self.hosts and snap.hostname not in self.hosts:
            return False
        if self._tag_sets and not any(wanted.issubset(snap.tags) for wanted in self._tag_sets):
            return False
        return not (self._locations and str(snap.source.get("location", "")) not in self._locations)

    def select(self, snaps: Iterable[Snapshot]) -> list[Snapshot]:
        """The matching snapshots, in the order given."""
        return [s for s in snaps if self.matches(s)]

    def describe(self) -> str:
        """``vm web01, host h1, tag daily`` (for messages), or ``""``."""
        parts = []
        for label, values in (("vm", self.vms), ("host", self.hosts), ("tag", self.tags), ("source", self.sources)):
            if values:
                parts.append(f"{label} {' or '.join(values)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, list[str]]:
        return {"vm": list(self.vms), "host": list(self.hosts), "tag": list(self.tags), "source": list(self.sources)}


@dataclass(frozen=True)
class Resolved:
    """A snapshot picked by reference, and what the user should hear about how."""

    snapshot: Snapshot
    #: set when ``latest`` chose among several VMs: "latest is web01's snapshot ... (2 VMs ...)"
    note: str | None = None


def _newest(snaps: Sequence[Snapshot]) -> Snapshot:
    return max(snaps, key=lambda s: (s.time, s.id))


def latest(snaps: Sequence[Snapshot], flt: SnapshotFilter | None = None) -> Resolved:
    """The newest snapshot matching ``flt`` (by time, ties by id), and a note naming the VM
    picked when the matching snapshots are of several VMs."""
    flt = flt or SnapshotFilter()
    chosen = flt.select(snaps)
    if not chosen:
        what = flt.describe()
        raise SnapshotNotFoundError(f"no snapshot matches {what}" if what else "the repository has no snapshots")
    snap = _newest(chosen)
    vms = sorted({vm_name(s) for s in chosen})
    note = None
    if len(vms) > 1:
        shown = ", ".join(vms[:5]) + (f" and {len(vms) - 5} more" if len(vms) > 5 else "")
        note = (
            f"latest is snapshot {snap.short_id} of VM {vm_name(snap)}, the newest of {len(vms)} VMs ({shown}); "
            "give --vm NAME for another"
        )
    return Resolved(snap, note)


def require_match(snap: Snapshot, flt: SnapshotFilter) -> Snapshot:
    """``snap`` when it matches ``flt``: an id together with a filter it contradicts
    (``show ID --vm other``) is an error, not a quiet answer about another VM."""
    if not flt.matches(snap):
        raise SnapshotNotFoundError(f"snapshot {snap.short_id} does not match {flt.describe()}")
    return snap
