"""Host status records: what each host's daemon last reported into a repository.

Several hosts may back up into one repository (repository-format.md, section 8). Each
host's daemon writes a small *status record* into every repository its jobs use: its jobs
with their schedule, next run and last result, its alerts and its latest runs. A dashboard
pointed at the repository reads every host's newest record and so sees the whole fleet,
not only the daemon it runs beside. The format is specified in repository-format.md,
section 4 ("Status records")::

    status/<64 hex>      SHA-256 of the record's JSON; sealed, never compressed

Rules that keep a record harmless whoever wrote the storage:

* A record is sealed like a snapshot (aad ``status``) and named by the SHA-256 of its
  plaintext, so it is written atomically, cannot be altered or moved without the key, and
  its content never changes (a reader caches it by name).
* It is stored uncompressed, so its plaintext is never larger than the object, and both
  are bounded: a writer refuses a record over ``MAX_RECORD_SIZE`` after trimming its
  lists, a reader never fetches a larger object nor more than ``MAX_RECORDS`` of them.
* A writer deletes the older records of its own host after writing a new one, and any
  record that a newer record of the same host supersedes (left by a writer that died
  between the two steps). Deleting a record loses nothing: no other object refers to one.
  A host that stops reporting keeps its last record, which the dashboard shows as stale.
* A record only describes; vmvault never acts on one. Every string in it is shown
  escaped, as every name from the storage is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault import __version__, shape
from vmvault.errors import BackendError, IntegrityError, ObjectNotFoundError, RepositoryError
from vmvault.repo._layout import ENVELOPE_HEADER, EnvelopeFlags
from vmvault.repo.crypto import open_envelope, seal_envelope
from vmvault.repo.names import status_id
from vmvault.repo.repository import Repository

__all__ = [
    "MAX_RECORDS",
    "MAX_RECORD_SIZE",
    "StatusRecord",
    "StatusReport",
    "StatusStore",
    "read_statuses",
    "trimmed_runs",
    "write_status",
]

log = logging.getLogger("vmvault.repo")

#: the largest status object (sealed) a writer stores or a reader fetches
MAX_RECORD_SIZE = 64 * 1024
#: a reader reads at most this many status objects (the newest by name order is not
#: knowable without reading, so a storage flooded with records is reported, not read whole)
MAX_RECORDS = 1000
#: the most jobs, alerts and runs a record carries (the writer trims to these first)
MAX_JOBS = 200
MAX_ALERTS = 50
MAX_RUNS = 20
#: the longest string kept in a record (error texts are cut, with an ellipsis)
MAX_TEXT = 1000

_FORMAT = "vmvault-status"
_VERSION = 1
_AAD = b"status"


def _clip(value: Any, depth: int = 0) -> Any:
    """``value`` with every string cut to ``MAX_TEXT`` characters and nesting bounded."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"
    if depth > 6:
        return None
    if isinstance(value, Mapping):
        return {str(k)[:100]: _clip(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, list | tuple):
        return [_clip(v, depth + 1) for v in list(value)[:100]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)[:MAX_TEXT]


@dataclass
class StatusRecord:
    """One host's report. ``jobs`` entries have the shape of ``vmvault jobs --json``'s
    ``jobs``, ``alerts`` that of its ``alert`` fields and ``runs`` that of ``vmvault
    history --json``'s ``runs`` (without ``details`` but for its warnings)."""

    host: str
    time: dt.datetime
    sequence: int = 0
    started: dt.datetime | None = None
    program: str = f"vmvault {__version__}"
    jobs: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: set when read or written: the object's id (hex)
    id: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "host": self.host,
            "time": self.time.astimezone(dt.UTC).isoformat(timespec="seconds"),
            "sequence": self.sequence,
            "started": self.started.astimezone(dt.UTC).isoformat(timespec="seconds") if self.started else None,
            "program": self.program,
            "jobs": self.jobs,
            "alerts": self.alerts,
            "runs": self.runs,
        }

    @classmethod
    def from_dict(cls, doc: Any, *, record_id: str = "") -> StatusRecord:
        """Parse and validate; anything out of shape is an ``IntegrityError``."""
        what = f"status record {record_id[:8]}"
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise IntegrityError(f"{what}: not a status record", object_id=record_id)
        if doc.get("version") != _VERSION:
            raise IntegrityError(f"{what}: unknown version {doc.get('version')!r}", object_id=record_id)
        host = doc.get("host")
        if not isinstance(host, str) or not host.strip() or len(host) > 255:
            raise IntegrityError(f"{what}: no valid host name", object_id=record_id)
        when = _parse_time(doc.get("time"))
        if when is None:
            raise IntegrityError(f"{what}: no valid time", object_id=record_id)
        sequence = doc.get("sequence", 0)
        if not isinstance(sequence, int) or isinstance(sequence, bool) or not 0 <= sequence < 2**63:
            raise IntegrityError(f"{what}: bad sequence number", object_id=record_id)
        lists: dict[str, list[dict[str, Any]]] = {}
        for key, limit in (("jobs", MAX_JOBS), ("alerts", MAX_ALERTS), ("runs", MAX_RUNS)):
            value = doc.get(key, [])
            if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, dict) for v in value):
                raise IntegrityError(f"{what}: {key} is not a list of at most {limit} objects", object_id=record_id)
            # each entry as this host's writer makes it: another host's dashboard reads them
            for entry in value:
                problem = shape.problem(key[:-1], entry, *_ENTRIES[key])
                if problem is not None:
                    raise IntegrityError(f"{what}: {problem}", object_id=record_id)
            lists[key] = value
        program = doc.get("program", "")
        return cls(
            host=host,
            time=when,
            sequence=sequence,
            started=_parse_time(doc.get("started")),
            program=program if isinstance(program, str) else "",
            jobs=lists["jobs"],
            alerts=lists["alerts"],
            runs=lists["runs"],
            id=record_id,
        )

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True).encode()


#: a run as ``Run.to_dict`` makes it, an alert as ``Alert.to_dict``, a job as ``job_record``
#: (automation/publish.py): the fields a dashboard reads, each with its type
_RUN: dict[str, shape.Check] = {
    "id": shape.count, "job": shape.text, "type": shape.text, "attempt": shape.optional(shape.count),
    "start": shape.time, "end": shape.optional(shape.time), "seconds": shape.optional(shape.number),
    "status": shape.text, "snapshot": shape.optional(shape.text), "bytes": shape.optional(shape.count),
    "error": shape.optional(shape.text), "details": shape.obj, "heartbeat": shape.optional(shape.time),
}  # fmt: skip
_ALERT: dict[str, shape.Check] = {
    "job": shape.text, "source": shape.optional(shape.text), "message": shape.text,
    "last_success": shape.optional(shape.time), "counted_from": shape.optional(shape.time),
    "max_age": shape.optional(shape.number), "age": shape.number,
}  # fmt: skip
_JOB: dict[str, shape.Check] = {
    "job": shape.text, "type": shape.text, "schedule": shape.optional(shape.text),
    "window": shape.optional(shape.text), "next_run": shape.optional(shape.time), "status": shape.optional(shape.text),
    "last_run": shape.optional(shape.record(_RUN)),
    "last_success": shape.optional(shape.time), "alert": shape.optional(shape.record(_ALERT, ("message",))),
    "repositories": shape.list_of(shape.text), "source": shape.optional(shape.text),
    "max_age": shape.optional(shape.number), "tags": shape.list_of(shape.text),
}  # fmt: skip
_RUN_IN_RECORD = _RUN | {"details": shape.record({"warnings": shape.list_of(shape.text)})}
#: each list's entries: their fields and those that must be there
_ENTRIES: dict[str, tuple[dict[str, shape.Check], tuple[str, ...]]] = {
    "jobs": (_JOB, ("job",)),
    "alerts": (_ALERT, ("message",)),
    "runs": (_RUN_IN_RECORD, ()),
}


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _seal(repo: Repository, record: StatusRecord) -> tuple[str, bytes]:
    payload = record.encode()
    return hashlib.sha256(payload).hexdigest(), seal_envelope(repo.key, payload, _AAD, compress=False)


def _fit(repo: Repository, record: StatusRecord) -> tuple[str, bytes]:
    """Seal ``record``, trimming its lists (oldest runs first, then alerts and jobs) and
    texts until it fits ``MAX_RECORD_SIZE``."""
    record.jobs = [_clip(j) for j in record.jobs[:MAX_JOBS]]
    record.alerts = [_clip(a) for a in record.alerts[:MAX_ALERTS]]
    record.runs = [_clip(r) for r in record.runs[:MAX_RUNS]]
    record.host = record.host[:255]
    record.program = record.program[:100]
    while True:
        record_id, sealed = _seal(repo, record)
        if len(sealed) <= MAX_RECORD_SIZE:
            return record_id, sealed
        for items in (record.runs, record.alerts, record.jobs):
            if items:
                items.pop()
                break
        else:
            raise RepositoryError(f"the status record of {record.host} does not fit {MAX_RECORD_SIZE} bytes")


@dataclass
class StatusReport:
    """What a reader found: each host's newest record, and what it could not use."""

    records: list[StatusRecord] = field(default_factory=list)
    #: records superseded by a newer one of the same host (a writer deletes them)
    superseded: list[StatusRecord] = field(default_factory=list)
    #: (object name, why): unreadable, too large, or beyond MAX_RECORDS
    problems: list[tuple[str, str]] = field(default_factory=list)

    def host(self, name: str) -> StatusRecord | None:
        return next((r for r in self.records if r.host == name), None)


class StatusStore:
    """Reads and writes one repository's status records, caching the ones it has read
    (a record's content never changes: its name is its hash)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._cache: dict[str, StatusRecord | str] = {}
        self._lock = threading.Lock()

    def _load(self, record_id: str, size: int) -> StatusRecord:
        name = f"status/{record_id}"
        if size > MAX_RECORD_SIZE:
            raise IntegrityError(f"{name}: {size} bytes, more than a status record may hold", name=name)
        sealed = self.repo.backend.get(name, 0, MAX_RECORD_SIZE + 1)
        if len(sealed) > MAX_RECORD_SIZE:
            raise IntegrityError(f"{name}: more than a status record may hold", name=name)
        if len(sealed) >= ENVELOPE_HEADER.size and sealed[1] & EnvelopeFlags.ZSTD:
            # written uncompressed; a compressed one could unpack to any size
            raise IntegrityError(f"{name}: compressed, which a status record never is", name=name)
        payload = open_envelope(self.repo.key, sealed, _AAD, what=name)
        if hashlib.sha256(payload).hexdigest() != record_id:
            raise IntegrityError(f"{name}: content does not match its name", name=name)
        try:
            doc = shape.loads(payload)
        except ValueError as exc:
            raise IntegrityError(f"{name}: not JSON: {exc}", name=name) from exc
        return StatusRecord.from_dict(doc, record_id=record_id)

    def read(self) -> StatusReport:
        """Every host's newest record (by its time, then sequence), oldest host name first."""
        report = StatusReport()
        found: list[StatusRecord] = []
        listed = 0
        for obj in self.repo.backend.list("status/"):
            record_id = status_id(obj.name)
            if record_id is None:
                continue  # not a name vmvault writes: ignored (check reports it)
            listed += 1
            if listed > MAX_RECORDS:
                report.problems.append((obj.name, f"more than {MAX_RECORDS} status records; the rest are not read"))
                break
            with self._lock:
                cached = self._cache.get(record_id)
            if cached is None:
                try:
                    cached = self._load(record_id, obj.size)
                except ObjectNotFoundError:
                    continue  # deleted by its writer after we listed
                except IntegrityError as exc:
                    cached = str(exc)
                with self._lock:
                    self._cache[record_id] = cached
            if isinstance(cached, str):
                report.problems.append((obj.name, cached))
            else:
                found.append(cached)
        newest: dict[str, StatusRecord] = {}
        for rec in sorted(found, key=lambda r: (r.time, r.sequence, r.id)):
            older = newest.get(rec.host)
            if older is not None:
                report.superseded.append(older)
            newest[rec.host] = rec
        report.records = sorted(newest.values(), key=lambda r: r.host)
        return report

    def write(self, record: StatusRecord) -> str:
        """Store ``record``; then delete the records it and other hosts' newer ones
        supersede. Returns the new record's id. A failed delete (storage without delete
        rights) is logged, never an error: the reader picks the newest record anyway."""
        record_id, sealed = _fit(self.repo, record)
        self.repo.backend.put(f"status/{record_id}", sealed)
        record.id = record_id
        with self._lock:
            self._cache[record_id] = record
        report = self.read()
        for old in report.superseded:
            if old.id == record_id:
                continue
            try:
                self.repo.backend.delete(f"status/{old.id}")
            except BackendError as exc:
                log.warning("could not remove a superseded status record of %s: %s", old.host, exc)
                break
            with self._lock:
                self._cache.pop(old.id, None)
        return record_id


def write_status(repo: Repository, record: StatusRecord) -> str:
    """Write ``record`` into ``repo`` (see ``StatusStore.write``)."""
    return StatusStore(repo).write(record)


def read_statuses(repo: Repository) -> StatusReport:
    """Every host's newest status record in ``repo``."""
    return StatusStore(repo).read()


def trimmed_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Runs (``Run.to_dict()`` shapes) as a record carries them: ``details`` reduced to its
    warnings, at most ``MAX_RUNS``."""
    out = []
    for run in list(runs)[:MAX_RUNS]:
        doc = {k: v for k, v in run.items() if k != "details"}
        details = run.get("details")
        warnings = details.get("warnings") if isinstance(details, Mapping) else None
        doc["details"] = {"warnings": list(warnings)[:10]} if isinstance(warnings, list) and warnings else {}
        out.append(doc)
    return out
