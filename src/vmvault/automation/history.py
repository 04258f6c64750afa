"""Job history in SQLite: one row per attempt (job, start, end, status, snapshot, bytes, error).

A row is inserted as ``running`` when an attempt starts and updated when it ends, so a
daemon killed mid-job leaves a visible ``running`` row; the next daemon start marks such
rows ``interrupted`` (nothing else can be running them: one daemon per history file).

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

from vmvault.errors import ConfigError

__all__ = ["FAILED", "INTERRUPTED", "RUNNING", "SUCCESS", "WARNING", "History", "Run"]

RUNNING = "running"
SUCCESS = "success"
WARNING = "warning"  # the job's main work succeeded, something secondary did not (e.g. prune)
FAILED = "failed"
INTERRUPTED = "interrupted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
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
);
CREATE INDEX IF NOT EXISTS runs_job_start ON runs (job, start);
CREATE TABLE IF NOT EXISTS alerts (
    job TEXT PRIMARY KEY,
    since TEXT NOT NULL,
    message TEXT NOT NULL,
    notified TEXT
);
"""


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


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

    @property
    def seconds(self) -> float | None:
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
        }


class History:
    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the job history {path}: {exc}") from exc

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
                (job, type_, attempt, _iso(start), RUNNING),
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
                (_iso(end), status, snapshot, bytes_, error, json.dumps(details or {}, default=str), run_id),
            )

    def mark_interrupted(self, now: dt.datetime) -> int:
        """Rows left ``running`` by a daemon that died; returns how many."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, end = ?, error = ? WHERE status = ?",
                (INTERRUPTED, _iso(now), "the daemon stopped before the job finished", RUNNING),
            )
            return cur.rowcount

    _COLUMNS = "id, job, type, attempt, start, end, status, snapshot, bytes, error, details"

    def runs(self, *, job: str | None = None, limit: int | None = None, statuses: tuple[str, ...] = ()) -> list[Run]:
        """Newest first (by start time)."""
        sql = f"SELECT {self._COLUMNS} FROM runs"
        where: list[str] = []
        args: list[str] = []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [self._run(r) for r in rows]

    @staticmethod
    def _run(r: tuple[Any, ...]) -> Run:
        start = _time(r[4])
        assert start is not None
        return Run(r[0], r[1], r[2], r[3], start, _time(r[5]), r[6], r[7], r[8], r[9], json.loads(r[10] or "{}"))

    def last(self, job: str) -> Run | None:
        runs = self.runs(job=job, limit=1)
        return runs[0] if runs else None

    def last_success(self, job: str) -> Run | None:
        """The newest run that did its work (``success`` or ``warning``)."""
        runs = self.runs(job=job, limit=1, statuses=(SUCCESS, WARNING))
        return runs[0] if runs else None

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

    def close_alert(self, job: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM alerts WHERE job = ?", (job,))
