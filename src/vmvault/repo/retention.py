"""Retention policies (grandfather-father-son): which snapshots ``forget`` keeps.

Semantics follow restic's ``forget`` so that users who know one know the other:

* Snapshots are grouped (by default by VM: the VM's name and the location it was backed up
  from, so two images both called ``disk.qcow2`` in different folders stay apart;
  optionally by host and tags) and each group is judged on its own.
* Within a group, snapshots are walked newest first (by time, ties broken by id).
* Each ``keep-*`` rule has a count and a bucket function (``last``: every snapshot is its
  own bucket; ``hourly``: the hour; ``daily``: the date; ``weekly``: the ISO year and week;
  ``monthly``; ``yearly``). A snapshot whose bucket differs from the bucket of the last
  snapshot that rule kept is kept by the rule, and the rule's count goes down by one.
  So each rule keeps the newest snapshot of each of its N most recent buckets.
  A count of ``-1`` means "every bucket".
* ``within`` (seconds): every snapshot taken less than that long before the group's newest
  snapshot is kept (restic's ``--keep-within``: relative to the newest snapshot, not to now,
  so a VM that stopped being backed up keeps its last ones). ``within_hourly`` ...
  ``within_yearly`` keep the newest snapshot of each hour ... year within their duration.
* ``keep_tags``: a snapshot carrying every tag of any listed entry (``"a,b"`` means a and b)
  is kept; such snapshots do not use up any count.
* A policy with no rule keeps everything: forgetting all snapshots must never be the
  accident of an empty configuration.
* Unlike restic, a policy never removes every snapshot of a group: a ``keep_tags`` entry no
  snapshot carries (a mistyped tag) would otherwise keep nothing. ``apply_policy`` refuses
  such a policy (``ConfigError``); the snapshots of a source that is gone for good are
  removed by naming them (``forget_ids``). An empty tag (``--keep-tag ""`` from an unset
  shell variable) is refused when the policy is built.

Times are bucketed in the time zone the snapshot's time was recorded in.

Everything here is a pure function of the snapshot list, so it is tested with hypothesis.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault import times
from vmvault.errors import ConfigError
from vmvault.repo.filters import vm_name
from vmvault.repo.snapshot import Snapshot

__all__ = ["GROUP_KEYS", "GroupDecision", "RetentionPolicy", "RetentionResult", "apply_policy", "group_key"]

#: what snapshots may be grouped by
GROUP_KEYS = ("vm", "location", "host", "tags")

#: the bucket rules that have a ``within_`` form
_WITHIN_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    #: each entry is a comma-separated set of tags that must all be present
    keep_tags: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ("vm", "location")
    #: seconds: keep every snapshot this close to the group's newest one (0: no such rule)
    within: float = 0.0
    within_hourly: float = 0.0
    within_daily: float = 0.0
    within_weekly: float = 0.0
    within_monthly: float = 0.0
    within_yearly: float = 0.0

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < -1:
                raise ConfigError(f"keep-{name} must be a whole number >= 0 (or -1 for all), not {value!r}")
        for name in ("within", *(f"within_{r}" for r in _WITHIN_RULES)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"keep-{name.replace('_', '-')} must be a duration, not {value!r}")
        for key in self.group_by:
            if key not in GROUP_KEYS:
                raise ConfigError(f"cannot group snapshots by {key!r}; choose from {', '.join(GROUP_KEYS)}")
        for spec in self.keep_tags:
            if not isinstance(spec, str) or any(not t.strip() for t in spec.split(",")):
                raise ConfigError(
                    f"keep-tag {spec!r} names an empty tag (an unset shell variable?); give the tags to keep, "
                    "comma-separated"
                )

    def empty(self) -> bool:
        """True when no rule is given (then every snapshot is kept)."""
        counts = (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        return all(c == 0 for c in counts) and not self.keep_tags and not any(self.windows().values())

    def windows(self) -> dict[str, float]:
        """``{"": within, "hourly": within_hourly, ...}``."""
        return {"": self.within} | {r: getattr(self, f"within_{r}") for r in _WITHIN_RULES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "hourly": self.hourly,
            "daily": self.daily,
            "weekly": self.weekly,
            "monthly": self.monthly,
            "yearly": self.yearly,
            "within": self.within,
            **{f"within_{r}": getattr(self, f"within_{r}") for r in _WITHIN_RULES},
            "keep_tags": list(self.keep_tags),
            "group_by": list(self.group_by),
        }


@dataclass
class GroupDecision:
    """The verdict for one group: kept snapshots (newest first) with reasons, and removed ones."""

    key: dict[str, Any]
    keep: list[Snapshot] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # snapshot id -> why kept
    remove: list[Snapshot] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.key,
            "keep": [{"id": s.id, "time": s.time, "reasons": self.reasons.get(s.id, [])} for s in self.keep],
            "remove": [{"id": s.id, "time": s.time} for s in self.remove],
        }


@dataclass
class RetentionResult:
    groups: list[GroupDecision]

    @property
    def keep(self) -> list[Snapshot]:
        return [s for g in self.groups for s in g.keep]

    @property
    def remove(self) -> list[Snapshot]:
        return [s for g in self.groups for s in g.remove]

    def reasons(self, snap_id: str) -> list[str]:
        for g in self.groups:
            if snap_id in g.reasons:
                return g.reasons[snap_id]
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups]}


def parse_time(text: str) -> dt.datetime:
    """A snapshot's time; naive times are taken as UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"snapshot time {text!r} is not an ISO 8601 time") from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def group_key(snap: Snapshot, group_by: Iterable[str]) -> dict[str, Any]:
    key: dict[str, Any] = {}
    for name in group_by:
        if name == "vm":
            key["vm"] = vm_name(snap)
        elif name == "location":
            key["location"] = snap.source.get("location", "")
        elif name == "host":
            key["host"] = snap.hostname
        elif name == "tags":
            key["tags"] = sorted(set(snap.tags))
    return key


def _hourly(t: dt.datetime, _n: int) -> object:
    return (t.year, t.month, t.day, t.hour)


def _daily(t: dt.datetime, _n: int) -> object:
    return (t.year, t.month, t.day)


def _weekly(t: dt.datetime, _n: int) -> object:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _monthly(t: dt.datetime, _n: int) -> object:
    return (t.year, t.month)


def _yearly(t: dt.datetime, _n: int) -> object:
    return t.year


def _last(_t: dt.datetime, n: int) -> object:
    return n  # every snapshot is its own bucket


_RULES: tuple[tuple[str, str, Callable[[dt.datetime, int], object]], ...] = (
    ("last", "last snapshot", _last),
    ("hourly", "hourly snapshot", _hourly),
    ("daily", "daily snapshot", _daily),
    ("weekly", "weekly snapshot", _weekly),
    ("monthly", "monthly snapshot", _monthly),
    ("yearly", "yearly snapshot", _yearly),
)


_NONE = object()


def _has_tags(snap: Snapshot, spec: str) -> bool:
    wanted = {t.strip() for t in spec.split(",")}
    return "" not in wanted and wanted.issubset(snap.tags)


def _decide_group(key: dict[str, Any], snaps: Sequence[Snapshot], policy: RetentionPolicy) -> GroupDecision:
    decision = GroupDecision(key=key)
    ordered = sorted(snaps, key=lambda s: (parse_time(s.time), s.id), reverse=True)
    if policy.empty():
        decision.keep = list(ordered)
        decision.reasons = {s.id: ["no retention policy given"] for s in ordered}
        return decision
    counts = {name: getattr(policy, name) for name, _r, _b in _RULES}
    last_bucket: dict[str, object] = {}
    windows = policy.windows()
    newest = parse_time(ordered[0].time) if ordered else None
    window_bucket: dict[str, object] = {}
    buckets = {name: bucket_of for name, _reason, bucket_of in _RULES}
    for n, snap in enumerate(ordered):
        reasons = [f"has tags {spec}" for spec in policy.keep_tags if _has_tags(snap, spec)]
        when = parse_time(snap.time)
        age = (newest - when).total_seconds() if newest is not None else 0.0
        if windows[""] and age < windows[""]:
            reasons.append(f"within {times.duration(windows[''])} of the newest")
        for rule in _WITHIN_RULES:
            span = windows[rule]
            if not span or age >= span:
                continue
            bucket = buckets[rule](when, n)
            if window_bucket.get(rule, _NONE) != bucket:
                window_bucket[rule] = bucket
                reasons.append(f"{rule} within {times.duration(span)}")
        for name, reason, bucket_of in _RULES:
            if counts[name] == 0:
                continue
            bucket = bucket_of(when, n)
            if name in last_bucket and last_bucket[name] == bucket:
                continue
            last_bucket[name] = bucket
            if counts[name] > 0:
                counts[name] -= 1
            reasons.append(reason)
        if reasons:
            decision.keep.append(snap)
            decision.reasons[snap.id] = reasons
        else:
            decision.remove.append(snap)
    return decision


def apply_policy(snapshots: Iterable[Snapshot], policy: RetentionPolicy) -> RetentionResult:
    """Split ``snapshots`` into kept and removed ones, group by group. Pure: touches nothing.

    Raises ConfigError when the policy would keep no snapshot of some group (module docstring).
    """
    groups: dict[str, tuple[dict[str, Any], list[Snapshot]]] = {}
    for snap in snapshots:
        key = group_key(snap, policy.group_by)
        ident = repr(sorted(key.items()))
        groups.setdefault(ident, (key, []))[1].append(snap)
    decisions = [_decide_group(key, snaps, policy) for _ident, (key, snaps) in sorted(groups.items())]
    emptied = [d for d in decisions if d.remove and not d.keep]
    if emptied:
        names = "; ".join(
            ", ".join(f"{k} {v}" for k, v in d.key.items()) + f" ({len(d.remove)} snapshots)" for d in emptied[:3]
        )
        more = f" and {len(emptied) - 3} more groups" if len(emptied) > 3 else ""
        raise ConfigError(
            f"this policy would forget every snapshot of {names}{more}; nothing was forgotten. "
            "(A --keep-tag no snapshot of a group carries keeps none of it: add --keep-last 1, or name "
            "the snapshots to forget: `vmvault forget ID...`)"
        )
    return RetentionResult(decisions)
