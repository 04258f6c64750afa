"""Job history in SQLite: one row per attempt (job, start, end, status, snapshot, bytes, error).

A row is inserted as ``running`` when an attempt starts, gets a heartbeat every few
seconds while it runs (with how far it got: ``details["progress"]``, which other processes,
``vmvault jobs`` and a dashboard serving apart from the daemon, show), and is updated when it
ends, so a daemon killed mid-job leaves a
visible ``running`` row; it is marked ``interrupted``, ending at its last heartbeat, by
whoever finds nobody holding the job's lock: the next daemon start, the next run of that
job, ``vmvault jobs`` and ``vmvault history`` (``status.settle_interrupted``), so a run going
on elsewhere is never marked (``locks.py``: one daemon per history file, one run of a job
at a time). The daemon's own starts, heartbeats and clean stops are kept too
(``daemon_runs``), and since when it schedules each job (``scheduled_jobs``: a job's RPO and
catch-up count from there).

The history names jobs, sources, snapshots and errors: it is private. The database and
SQLite's ``-wal``, ``-shm`` and ``-journal`` files are 0600 (SQLite gives its side files
the database's mode, so creating the database 0600 is enough; existing files with wider
modes are tightened), the state folder is created 0700, and none of them may be a link.

Each call opens its own connection: the daemon's job threads write concurrently and
SQLite serialises them (WAL mode, busy timeout).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.automation.locks import open_private
from vmvault.automation.times import duration
from vmvault.errors import ConfigError

__all__ = [
    "FAILED",
    "INTERRUPTED",
    "RUNNING",
    "SCHEMA_VERSION",
    "SUCCESS",
    "WARNING",
    "Action",
    "CancelRequest",
    "DaemonRun",
    "History",
    "Progress",
    "Run",
    "Sample",
    "Watch",
]

RUNNING = "running"
SUCCESS = "success"
WARNING = "warning"  # the job's main work succeeded, something secondary did not (e.g. prune)
FAILED = "failed"
INTERRUPTED = "interrupted"

#: the schema, as migrations: entry N turns a database of schema version N (``PRAGMA
#: user_version``) into N + 1. Version 0 is an empty database, or one written before the
#: version was recorded, whose tables are exactly version 1's: the IF NOT EXISTS statements
#: then keep every row. A later change appends an entry (ALTER TABLE ..., a new table) and
#: never edits an earlier one. docs/automation.md ("The job history") describes the tables.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job TEXT NOT NULL,
            type TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 1,
            start TEXT NOT NULL,
            end TEXT,
            status TEXT NOT NULL,
            snapshot TEXT,
            bytes INTEGER,
            error TEXT,
            details TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX IF NOT EXISTS runs_job_start ON runs (job, start)",
        """CREATE TABLE IF NOT EXISTS alerts (
            job TEXT PRIMARY KEY,
            since TEXT NOT NULL,
            message TEXT NOT NULL,
            notified TEXT
        )""",
    ),
    (
        # 2: the dashboard's activity log (who did what, when) and repository size samples
        """CREATE TABLE IF NOT EXISTS actions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time TEXT NOT NULL,
            user TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL DEFAULT '',
            result TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            details TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX IF NOT EXISTS actions_time ON actions (time)",
        """CREATE TABLE IF NOT EXISTS repository_samples (
            repository TEXT NOT NULL,
            time TEXT NOT NULL,
            stored INTEGER NOT NULL,
            unique_bytes INTEGER,
            snapshots INTEGER NOT NULL,
            free INTEGER,
            PRIMARY KEY (repository, time)
        )""",
    ),
    (
        # 3: a heartbeat per running attempt (an interrupted run's duration reaches its last
        # one); the daemon's own runs (first start, sign of life, clean stop); and since when
        # the daemon schedules each job (its RPO and catch-up count from then, not from 1970)
        "ALTER TABLE runs ADD COLUMN heartbeat TEXT",
        """CREATE TABLE IF NOT EXISTS daemon_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            start TEXT NOT NULL,
            heartbeat TEXT,
            stop TEXT,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS scheduled_jobs (
            job TEXT PRIMARY KEY,
            since TEXT NOT NULL,
            first_due TEXT
        )""",
    ),
    (
        # 4: requests to stop a job (``vmvault cancel``, the dashboard): one per running attempt
        # asked, for the process running it, whichever it is, to find at its next look; and one
        # for the job (``run_id`` NULL), for a daemon not to start what it had queued before
        """CREATE TABLE IF NOT EXISTS cancels (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job TEXT NOT NULL,
            run_id INTEGER,
            time TEXT NOT NULL,
            user TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE UNIQUE INDEX IF NOT EXISTS cancels_run ON cancels (run_id)",
        "CREATE INDEX IF NOT EXISTS cancels_job_time ON cancels (job, time)",
    ),
)

#: the schema version this vmvault writes
SCHEMA_VERSION = len(_MIGRATIONS)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _iso_ms(when: dt.datetime) -> str:
    """A run's times are kept to the millisecond, so a run of 0.23 s took 0.23 s, not 0 or 1
    (rows from before kept whole seconds; the text of both sorts in time order)."""
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


@dataclass
class Action:
    """Something a person did through the dashboard or ``vmvault user``: who, what, when,
    and how it ended. Never holds a secret (no password, token or passphrase)."""

    id: int
    time: dt.datetime
    user: str
    action: str
    target: str
    result: str
    address: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": _iso(self.time),
            "user": self.user,
            "action": self.action,
            "target": self.target,
            "result": self.result,
            "address": self.address,
            "details": self.details,
        }


@dataclass(frozen=True)
class Sample:
    """A repository's size at one moment, for growth charts and the "estimated full" date."""

    repository: str
    time: dt.datetime
    stored: int
    unique_bytes: int | None
    snapshots: int
    free: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "stored": self.stored,
            "unique": self.unique_bytes,
            "snapshots": self.snapshots,
            "free": self.free,
        }


@dataclass(frozen=True)
class CancelRequest:
    """Somebody asked a job to stop: when, who, and why if they said."""

    time: dt.datetime
    user: str
    reason: str = ""


@dataclass
class Run:
    id: int
    job: str
    type: str
    attempt: int
    start: dt.datetime
    end: dt.datetime | None
    status: str
    snapshot: str | None = None
    bytes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: the attempt's last sign of life while it ran (None: none yet, or written before v2)
    heartbeat: dt.datetime | None = None

    @property
    def progress(self) -> Progress | None:
        """How far the attempt had got at its last heartbeat (None: not said)."""
        return Progress.from_dict(self.details.get("progress"))

    @property
    def seconds(self) -> float | None:
        """How long it took; for an ``interrupted`` run, how long it was seen running."""
        return (self.end - self.start).total_seconds() if self.end else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job": self.job,
            "type": self.type,
            "attempt": self.attempt,
            "start": _iso(self.start),
            "end": _iso(self.end) if self.end else None,
            "seconds": self.seconds,
            "status": self.status,
            "snapshot": self.snapshot,
            "bytes": self.bytes,
            "error": self.error,
            "details": self.details,
            "heartbeat": _iso(self.heartbeat) if self.heartbeat else None,
        }


#: the longest phase name a heartbeat records (a phase is named after a disk of the source)
_PHASE_CHARS = 200


@dataclass(frozen=True)
class Progress:
    """Where a running attempt is: its phase (a disk, a step of a check), how much of the
    phase is done of how much (bytes or objects; ``total`` 0: unknown), and how many phases
    have begun."""

    phase: str
    done: int
    total: int
    phases: int

    @property
    def percent(self) -> float | None:
        return min(100.0, 100.0 * self.done / self.total) if self.total > 0 else None

    def describe(self) -> str:
        """``web01.raw 45%``, or the phase alone while its size is unknown."""
        pct = self.percent
        return self.phase if pct is None else f"{self.phase} {pct:.0f}%"

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase[:_PHASE_CHARS], "done": self.done, "total": self.total, "phases": self.phases}

    @classmethod
    def from_dict(cls, doc: object) -> Progress | None:
        """A recorded progress, or None for anything else (a row of an older vmvault)."""
        if not isinstance(doc, dict):
            return None
        phase, numbers = doc.get("phase"), [doc.get(k) for k in ("done", "total", "phases")]
        counts = [n for n in numbers if type(n) is int and n >= 0]
        if not isinstance(phase, str) or len(counts) != 3:
            return None
        return cls(phase[:_PHASE_CHARS], counts[0], counts[1], counts[2])


@dataclass(frozen=True)
class DaemonRun:
    """One life of a daemon on this history: when it started, its last sign of life, and
    when it stopped cleanly (None: it runs, or it died)."""

    id: int
    start: dt.datetime
    heartbeat: dt.datetime | None
    stop: dt.datetime | None
    pid: int
    host: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": _iso(self.start),
            "heartbeat": _iso(self.heartbeat) if self.heartbeat else None,
            "stop": _iso(self.stop) if self.stop else None,
            "pid": self.pid,
            "host": self.host,
        }


@dataclass(frozen=True)
class Watch:
    """Since when the daemon schedules a job, and when the job was first due then: its RPO
    and catch-up count from here (``scheduled_jobs``)."""

    job: str
    since: dt.datetime
    first_due: dt.datetime | None


#: SQLite's side files of a database in WAL mode (and the rollback journal used before)
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _private_file(path: str, *, create: bool) -> None:
    """Make ``path`` a regular file with mode 0600 (creating it when asked); never follows a link."""
    try:
        fd = open_private(path, os.O_RDONLY | (os.O_CREAT if create else 0), "the job history file")
    except FileNotFoundError:
        if create:
            raise
        return
    os.close(fd)


class History:
    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        try:
            # the state folder: private when vmvault makes it (an existing one, such as
            # /etc/vmvault or the configuration's folder, is left as its owner set it)
            with contextlib.suppress(FileExistsError):
                os.makedirs(parent, mode=0o700)
            _private_file(path, create=True)
            for suffix in _SIDE_FILES:
                _private_file(path + suffix, create=False)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the job history {path}: {exc}") from exc

    def _migrate(self) -> None:
        """Bring the database to SCHEMA_VERSION, each step in one transaction (a second
        process opening the same file at once waits, then finds the work done)."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: set once, as every connection asks
            db.execute("BEGIN IMMEDIATE")
            try:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise ConfigError(
                        f"the job history {self.path} has schema version {version}, written by a newer "
                        f"vmvault (this one knows up to {SCHEMA_VERSION}); run that version, or give "
                        "this one another history file"
                    )
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {step + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash may lose the last row, never corrupt
            with db:
                yield db
        finally:
            db.close()

    def start(self, job: str, type_: str, start: dt.datetime, *, attempt: int = 1) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO runs (job, type, attempt, start, status) VALUES (?, ?, ?, ?, ?)",
                (job, type_, attempt, _iso_ms(start), RUNNING),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish(
        self,
        run_id: int,
        end: dt.datetime,
        status: str,
        *,
        snapshot: str | None = None,
        bytes_: int | None = None,
        error: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET end = ?, status = ?, snapshot = ?, bytes = ?, error = ?, details = ? WHERE id = ?",
                (_iso_ms(end), status, snapshot, bytes_, error, json.dumps(details or {}, default=str), run_id),
            )

    def running_jobs(self) -> list[str]:
        """Jobs with a row still ``running``."""
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT job FROM runs WHERE status = ?", (RUNNING,))]

    def heartbeat(self, run_id: int, when: dt.datetime, progress: Progress | None = None) -> None:
        """A running attempt's sign of life (``scheduler.HEARTBEAT_SECONDS`` apart), with where
        it is (``details["progress"]``) when ``progress`` is given. Only the process running
        the attempt writes its row until it ends."""
        with self._connect() as db:
            if progress is None:
                db.execute(
                    "UPDATE runs SET heartbeat = ? WHERE id = ? AND status = ?", (_iso_ms(when), run_id, RUNNING)
                )
                return
            row = db.execute("SELECT details FROM runs WHERE id = ? AND status = ?", (run_id, RUNNING)).fetchone()
            if row is None:
                return
            details = json.loads(row[0] or "{}")
            details["progress"] = progress.to_dict()
            db.execute(
                "UPDATE runs SET heartbeat = ?, details = ? WHERE id = ? AND status = ?",
                (_iso_ms(when), json.dumps(details, default=str), run_id, RUNNING),
            )

    def request_cancel(self, job: str, when: dt.datetime, user: str, reason: str = "") -> list[Run]:
        """Ask every running attempt of ``job`` to stop, and a daemon not to start an attempt of
        it queued before ``when`` (a retry waiting, a firing waiting for its window); returns
        the running attempts asked (none: the job was not running). The process running an
        attempt looks for the request every ``scheduler.PROGRESS_SECONDS`` (``cancel_request``)
        and stops at the attempt's next progress report; a daemon looks before it starts a
        queued attempt (``cancelled_since``). For a running attempt the first request stands."""
        reason = reason[:500]
        with self._connect() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM runs WHERE job = ? AND status = ?", (job, RUNNING))
            runs = [self._run(r) for r in rows.fetchall()]
            for run_id in [*(r.id for r in runs), None]:
                db.execute(
                    "INSERT OR IGNORE INTO cancels (job, run_id, time, user, reason) VALUES (?, ?, ?, ?, ?)",
                    (job, run_id, _iso_ms(when), user, reason),
                )
        return runs

    def cancel_request(self, run_id: int) -> CancelRequest | None:
        """The request to stop attempt ``run_id``, if one was made."""
        with self._connect() as db:
            row = db.execute("SELECT time, user, reason FROM cancels WHERE run_id = ?", (run_id,)).fetchone()
        return self._request(row)

    def cancelled_since(self, job: str, since: dt.datetime) -> CancelRequest | None:
        """The newest request to stop ``job`` made at or after ``since`` (an attempt queued
        then is not to start)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT time, user, reason FROM cancels WHERE job = ? AND run_id IS NULL AND time >= ? "
                "ORDER BY time DESC, id DESC LIMIT 1",
                (job, _iso_ms(since)),
            ).fetchone()
        return self._request(row)

    @staticmethod
    def _request(row: tuple[Any, ...] | None) -> CancelRequest | None:
        if row is None:
            return None
        when = _time(row[0])
        assert when is not None
        return CancelRequest(when, row[1], row[2])

    def mark_interrupted(
        self,
        now: dt.datetime,
        *,
        job: str | None = None,
        ids: tuple[int, ...] | None = None,
        holder: str = "",
    ) -> int:
        """Rows (of ``job``, of ``ids``, or of every job) left ``running`` by a process that
        died; returns how many. Each ends at its last heartbeat (at its start when it died
        before the first one), so its duration is the time it was seen running, not the time
        until somebody noticed. The caller held the job's lock (``locks.job_lock``) when it
        found them: a run going on elsewhere must not be marked. ``holder`` names the dead
        process (from the lock file) for the error text."""
        sql = f"SELECT {self._COLUMNS} FROM runs WHERE status = ?"
        params: list[Any] = [RUNNING]
        if job is not None:
            sql += " AND job = ?"
            params.append(job)
        if ids is not None:
            if not ids:
                return 0
            sql += f" AND id IN ({', '.join('?' * len(ids))})"
            params.extend(ids)
        who = holder or "the process running it"
        count = 0
        with self._connect() as db:
            for row in db.execute(sql, params).fetchall():
                run = self._run(row)
                end = run.heartbeat or run.start
                seen = (end - run.start).total_seconds()
                last = run.progress
                error = f"interrupted: {who} stopped before the run finished" + (
                    f" (seen running for {duration(seen)}, until its last heartbeat"
                    + (f", in {last.describe()})" if last is not None else ")")
                    if run.heartbeat
                    else " (it stopped before its first heartbeat)"
                )
                details = dict(run.details)
                details["interrupted"] = {
                    "holder": holder or None,
                    "last_heartbeat": _iso(run.heartbeat) if run.heartbeat else None,
                    "noticed": _iso(now),
                }
                count += db.execute(
                    "UPDATE runs SET status = ?, end = ?, error = ?, details = ? WHERE id = ? AND status = ?",
                    (INTERRUPTED, _iso_ms(end), error, json.dumps(details, default=str), run.id, RUNNING),
                ).rowcount
        return count

    _COLUMNS = "id, job, type, attempt, start, end, status, snapshot, bytes, error, details, heartbeat"

    def runs(
        self,
        *,
        job: str | None = None,
        limit: int | None = None,
        statuses: tuple[str, ...] = (),
        types: tuple[str, ...] = (),
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        offset: int = 0,
    ) -> list[Run]:
        """Newest first (by start time); ``since``/``until`` bound the start time."""
        sql = f"SELECT {self._COLUMNS} FROM runs"
        where: list[str] = []
        args: list[str] = []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if types:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            args.extend(types)
        if since is not None:
            where.append("start >= ?")
            args.append(_iso_ms(since))
        if until is not None:
            where.append("start < ?")
            args.append(_iso_ms(until))
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start DESC, id DESC"
        if limit is not None or offset:
            sql += f" LIMIT {int(limit) if limit is not None else -1} OFFSET {int(offset)}"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [self._run(r) for r in rows]

    @staticmethod
    def _run(r: tuple[Any, ...]) -> Run:
        start = _time(r[4])
        assert start is not None
        return Run(
            r[0], r[1], r[2], r[3], start, _time(r[5]), r[6], r[7], r[8], r[9], json.loads(r[10] or "{}"), _time(r[11])
        )  # fmt: skip

    def run(self, run_id: int) -> Run | None:
        """Attempt ``run_id`` as it stands now (None: no such row)."""
        with self._connect() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._run(row)

    def last(self, job: str) -> Run | None:
        runs = self.runs(job=job, limit=1)
        return runs[0] if runs else None

    def last_success(self, job: str) -> Run | None:
        """The newest run that did its work (``success`` or ``warning``)."""
        runs = self.runs(job=job, limit=1, statuses=(SUCCESS, WARNING))
        return runs[0] if runs else None

    def first_start(self, job: str) -> dt.datetime | None:
        """When the job's first recorded attempt started (by anyone: daemon or ``vmvault run``)."""
        with self._connect() as db:
            row = db.execute("SELECT MIN(start) FROM runs WHERE job = ?", (job,)).fetchone()
        return _time(row[0])

    def started_since(self, job: str, since: dt.datetime, statuses: tuple[str, ...]) -> bool:
        """Whether an attempt of ``job`` with one of ``statuses`` started at or after ``since``."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT 1 FROM runs WHERE job = ? AND start >= ? AND status IN ({', '.join('?' * len(statuses))}) "
                "LIMIT 1",
                (job, _iso_ms(since), *statuses),
            ).fetchone()
        return row is not None

    # ---- the daemon's own runs, and since when it schedules each job ------------------------

    def daemon_started(self, when: dt.datetime, pid: int, host: str) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO daemon_runs (start, heartbeat, pid, host) VALUES (?, ?, ?, ?)",
                (_iso(when), _iso(when), pid, host),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def daemon_heartbeat(self, daemon_id: int, when: dt.datetime) -> None:
        with self._connect() as db:
            db.execute("UPDATE daemon_runs SET heartbeat = ? WHERE id = ?", (_iso(when), daemon_id))

    def daemon_stopped(self, daemon_id: int, when: dt.datetime) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE daemon_runs SET stop = ?, heartbeat = ? WHERE id = ?", (_iso(when), _iso(when), daemon_id)
            )

    def last_daemon_run(self) -> DaemonRun | None:
        """The newest daemon start on this history (None: no daemon ever ran on it)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT id, start, heartbeat, stop, pid, host FROM daemon_runs ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        start = _time(row[1])
        assert start is not None
        return DaemonRun(row[0], start, _time(row[2]), _time(row[3]), row[4], row[5])

    def watch(self, job: str, since: dt.datetime, first_due: dt.datetime | None) -> Watch:
        """Record that the daemon schedules ``job`` from ``since`` (first due at ``first_due``),
        unless it already did: the first record stays. Returns the record in force."""
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO scheduled_jobs (job, since, first_due) VALUES (?, ?, ?)",
                (job, _iso(since), _iso(first_due) if first_due else None),
            )
        found = self.watched(job)
        assert found is not None
        return found

    def watched(self, job: str) -> Watch | None:
        """Since when the daemon schedules ``job`` (None: no daemon has scheduled it yet)."""
        with self._connect() as db:
            row = db.execute("SELECT since, first_due FROM scheduled_jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            return None
        since = _time(row[0])
        assert since is not None
        return Watch(job, since, _time(row[1]))

    # ---- alerts: one row per job in alert, so each alert is notified once ------------------

    def open_alert(self, job: str, since: dt.datetime, message: str) -> bool:
        """Record an alert; returns True when it is new (not yet notified)."""
        with self._connect() as db:
            row = db.execute("SELECT notified FROM alerts WHERE job = ?", (job,)).fetchone()
            if row is None:
                db.execute("INSERT INTO alerts (job, since, message) VALUES (?, ?, ?)", (job, _iso(since), message))
                return True
            db.execute("UPDATE alerts SET message = ? WHERE job = ?", (message, job))
            return row[0] is None

    def mark_alert_notified(self, job: str, when: dt.datetime) -> None:
        with self._connect() as db:
            db.execute("UPDATE alerts SET notified = ? WHERE job = ?", (_iso(when), job))

    def close_alert(self, job: str) -> str | None:
        """Clear the job's alert; returns its text when it had been notified (its clearing
        is news to whoever got it), else None."""
        with self._connect() as db:
            row = db.execute("SELECT message, notified FROM alerts WHERE job = ?", (job,)).fetchone()
            db.execute("DELETE FROM alerts WHERE job = ?", (job,))
        return str(row[0]) if row is not None and row[1] is not None else None

    # ---- actions: who did what through the dashboard, and when -------------------------------

    def record_action(
        self,
        when: dt.datetime,
        user: str,
        action: str,
        target: str,
        result: str,
        *,
        address: str = "",
        details: dict[str, Any] | None = None,
    ) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO actions (time, user, action, target, result, address, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_iso(when), user, action, target, result, address, json.dumps(details or {}, default=str)),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def actions(
        self,
        *,
        limit: int | None = None,
        user: str | None = None,
        action: str | None = None,
        since: dt.datetime | None = None,
    ) -> list[Action]:
        """Newest first."""
        sql = "SELECT id, time, user, action, target, result, address, details FROM actions"
        where: list[str] = []
        args: list[str] = []
        for column, value in (("user", user), ("action", action)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("time >= ?")
            args.append(_iso(since))
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            when = _time(r[1])
            assert when is not None
            out.append(Action(r[0], when, r[2], r[3], r[4], r[5], r[6], json.loads(r[7] or "{}")))
        return out

    # ---- repository samples: size over time ---------------------------------------------------

    def add_sample(self, sample: Sample) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO repository_samples (repository, time, stored, unique_bytes, snapshots, free) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    sample.repository, _iso(sample.time), sample.stored, sample.unique_bytes, sample.snapshots,
                    sample.free,
                ),
            )  # fmt: skip

    def samples(self, repository: str, *, since: dt.datetime | None = None) -> list[Sample]:
        """Oldest first."""
        sql = (
            "SELECT repository, time, stored, unique_bytes, snapshots, free FROM repository_samples "
            "WHERE repository = ?"
        )
        args = [repository]
        if since is not None:
            sql += " AND time >= ?"
            args.append(_iso(since))
        sql += " ORDER BY time"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            when = _time(r[1])
            assert when is not None
            out.append(Sample(r[0], when, r[2], r[3], r[4], r[5]))
        return out
