"""Host status records (repository-format.md, section 4, "Status records"): written
atomically, newest per host wins, superseded ones pruned, bounded, and harmless whoever
wrote the storage."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.repo.builders import make_repo, reopen
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendPermissionError, RepositoryError
from vmvault.repo import status as status_mod
from vmvault.repo.check import check
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.repository import Repository
from vmvault.repo.status import MAX_RECORD_SIZE, StatusRecord, StatusStore, read_statuses, trimmed_runs, write_status

T0 = dt.datetime(2026, 11, 25, 1, 30, tzinfo=dt.UTC)


#: entries as vmvault writes them (Run.to_dict, Alert.to_dict, job_record)
RUN = {
    "id": 3, "job": "other-nightly", "type": "backup", "attempt": 1, "start": "2026-12-07T01:30:00+00:00",
    "end": "2026-12-07T01:31:00+00:00", "seconds": 60.5, "status": "failed", "snapshot": None, "bytes": None,
    "error": "boom", "details": {"warnings": ["w"]}, "heartbeat": None,
}  # fmt: skip
ALERT = {
    "job": "other-nightly", "source": "/vm/other", "message": "no successful backup for 30 h",
    "last_success": "2026-12-06T01:31:00+00:00", "counted_from": None, "max_age": 93600, "age": 108000.0,
}  # fmt: skip
JOB = {
    "job": "other-nightly", "type": "backup", "schedule": "30 1 * * *", "window": None,
    "next_run": "2026-12-08T01:30:00+00:00", "status": "failed", "last_run": RUN, "last_success": None,
    "alert": ALERT, "repositories": ["local"], "source": "/vm/other", "max_age": 93600, "tags": ["gold"],
}  # fmt: skip


def record(host: str, minutes: int = 0, **kw: object) -> StatusRecord:
    return StatusRecord(host=host, time=T0 + dt.timedelta(minutes=minutes), **kw)  # type: ignore[arg-type]


def names(repo: Repository) -> list[str]:
    return sorted(o.name for o in repo.backend.list("status/"))


def test_round_trip_and_newest_record_per_host(local_repo: Repository) -> None:
    job = {"job": "web01-nightly", "type": "backup", "status": "success", "next_run": None}
    first = write_status(local_repo, record("hv01", 0, jobs=[job], sequence=1))
    write_status(local_repo, record("hv02", 5, alerts=[{"job": "db", "message": "late"}]))
    second = write_status(local_repo, record("hv01", 10, jobs=[job | {"status": "failed"}], sequence=2))
    assert first != second
    # the first record of hv01 was superseded and deleted by the writer of the second
    assert f"status/{first}" not in names(local_repo)
    assert len(names(local_repo)) == 2
    report = read_statuses(reopen(local_repo))
    assert [r.host for r in report.records] == ["hv01", "hv02"]
    hv01 = report.host("hv01")
    assert hv01 is not None and hv01.id == second and hv01.jobs[0]["status"] == "failed"
    assert hv01.time == T0 + dt.timedelta(minutes=10)
    assert report.problems == [] and report.superseded == []


def test_same_second_is_ordered_by_sequence(local_repo: Repository) -> None:
    store = StatusStore(local_repo)
    store.write(record("hv01", 0, sequence=5, jobs=[{"job": "a"}]))
    store.write(record("hv01", 0, sequence=6, jobs=[{"job": "b"}]))
    rec = read_statuses(local_repo).host("hv01")
    assert rec is not None and rec.jobs == [{"job": "b"}]


def test_a_record_left_by_a_dead_writer_is_pruned_by_the_next_writer(local_repo: Repository) -> None:
    # hv02 wrote twice but died before deleting its older record
    store = StatusStore(local_repo)
    old_id, sealed = status_mod._fit(local_repo, record("hv02", 0))
    local_repo.backend.put(f"status/{old_id}", sealed)
    new_id, sealed = status_mod._fit(local_repo, record("hv02", 3))
    local_repo.backend.put(f"status/{new_id}", sealed)
    assert len(store.read().superseded) == 1
    store.write(record("hv01", 4))
    assert f"status/{old_id}" not in names(local_repo)
    assert f"status/{new_id}" in names(local_repo)


def test_damaged_moved_and_forged_records_are_skipped_and_reported(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    good = write_status(repo, record("hv01"))
    # a byte flipped in another host's record
    bad = write_status(repo, record("hv02"))
    path = tmp_path / "repo" / "status" / bad
    raw = bytearray(path.read_bytes())
    raw[40] ^= 1
    path.write_bytes(bytes(raw))
    # a valid record copied under another name: its content no longer matches its name
    moved = "ab" * 32
    repo.backend.put(f"status/{moved}", repo.backend.get(f"status/{good}"))
    # a compressed record with a valid name: could unpack to any size, never read
    payload = json.dumps(record("hv03").to_dict(), sort_keys=True).encode() + b" " * 5000
    zipped = hashlib.sha256(payload).hexdigest()
    repo.backend.put(f"status/{zipped}", seal_envelope(repo.key, payload, b"status"))
    # valid JSON of the wrong shape, sealed properly
    for doc in ({"format": "vmvault-status", "version": 2, "host": "x", "time": T0.isoformat()},
                {"format": "vmvault-status", "version": 1, "host": "", "time": T0.isoformat()},
                {"format": "vmvault-status", "version": 1, "host": "x", "time": "yesterday"},
                {"format": "vmvault-status", "version": 1, "host": "x", "time": T0.isoformat(), "jobs": "all"},
                ["not", "an", "object"]):  # fmt: skip
        payload = json.dumps(doc).encode()
        repo.backend.put(
            f"status/{hashlib.sha256(payload).hexdigest()}", seal_envelope(repo.key, payload, b"status", compress=False)
        )
    # JSON nested deeper than the parser goes (a RecursionError, not a ValueError: a traceback)
    payload = b"[" * 60000
    nested = hashlib.sha256(payload).hexdigest()
    repo.backend.put(f"status/{nested}", seal_envelope(repo.key, payload, b"status", compress=False))
    report = read_statuses(reopen(repo))
    assert [r.host for r in report.records] == ["hv01"]
    whys = dict(report.problems)
    assert "authentication failed" in whys[f"status/{bad}"]
    assert "does not match its name" in whys[f"status/{moved}"]
    assert "compressed" in whys[f"status/{zipped}"]
    assert "nested too deeply" in whys[f"status/{nested}"]
    assert len(report.problems) == 9
    kinds = [p.kind for p in check(reopen(repo)).warnings]
    assert kinds.count("status-record-unreadable") == 9


def test_entries_must_have_the_shape_vmvault_writes(local_repo: Repository) -> None:
    """Another host's dashboard reads every field of these entries; one of another type makes
    the record unreadable (named, the other hosts' records used), never a failing page."""
    good = record("hv02", jobs=[JOB], alerts=[ALERT], runs=trimmed_runs([RUN]))
    write_status(local_repo, good)
    assert read_statuses(reopen(local_repo)).host("hv02") == good
    for host, change, says in (
        ("a", {"jobs": [JOB | {"last_run": [1]}]}, "the job field 'last_run' holds list [1]"),
        ("b", {"jobs": [JOB | {"repositories": "local"}]}, "the job field 'repositories' holds str 'local'"),
        ("c", {"jobs": [{"type": "backup"}]}, "a job record has no 'job'"),
        ("d", {"alerts": [{"job": "x"}]}, "an alert record has no 'message'"),
        ("e", {"alerts": [ALERT | {"age": "1 h"}]}, "the alert field 'age' holds str '1 h'"),
        ("f", {"runs": [RUN | {"details": {"warnings": "w"}}]}, "the run field 'details' holds dict"),
        ("g", {"runs": [RUN | {"start": "yesterday"}]}, "the run field 'start' holds str 'yesterday'"),
    ):
        write_status(local_repo, record(host, **change))  # type: ignore[arg-type]
        report = read_statuses(reopen(local_repo))
        assert report.host(host) is None and report.host("hv02") == good
        assert any(says in why for _name, why in report.problems), (says, report.problems)


def test_oversized_objects_are_not_fetched(local_repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    big = "cd" * 32
    local_repo.backend.put(f"status/{big}", b"x" * (MAX_RECORD_SIZE + 1))
    fetched: list[str] = []
    real_get = local_repo.backend.get

    def spy(name: str, offset: int = 0, length: int | None = None) -> bytes:
        fetched.append(name)
        return real_get(name, offset, length)

    monkeypatch.setattr(local_repo.backend, "get", spy)
    report = read_statuses(local_repo)
    assert report.records == [] and fetched == []
    assert "more than a status record may hold" in report.problems[0][1]


def test_a_record_is_trimmed_to_fit_and_strings_are_cut(local_repo: Repository) -> None:
    runs = [{"id": i, "job": "j", "error": "e" * 5000, "details": {"warnings": ["w"] * 50, "x": 1}} for i in range(20)]
    jobs = [{"job": f"job{i}", "note": "n" * 900} for i in range(200)]
    rec = record("hv01", jobs=jobs, runs=trimmed_runs(runs))
    rec_id = write_status(local_repo, rec)
    size = next(o.size for o in local_repo.backend.list("status/") if o.name.endswith(rec_id))
    assert size <= MAX_RECORD_SIZE
    back = read_statuses(local_repo).host("hv01")
    assert back is not None
    assert len(back.jobs) < 200  # trimmed: runs went first, then jobs
    assert back.runs == []
    assert all(len(j["note"]) <= 1000 for j in back.jobs)
    assert trimmed_runs(runs)[0]["details"] == {"warnings": ["w"] * 10}


def test_a_record_that_cannot_fit_is_refused(local_repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    # the fixed part of a record (host cut to 255 characters, time, program) is a few hundred
    # bytes; only a limit below that leaves nothing to trim
    monkeypatch.setattr(status_mod, "MAX_RECORD_SIZE", 200)
    with pytest.raises(RepositoryError, match="does not fit"):
        write_status(local_repo, record("hv01", jobs=[{"job": "a"}], runs=[{"id": 1}]))
    assert names(local_repo) == []


def test_flooded_status_folder_is_read_only_up_to_the_limit(
    local_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_mod, "MAX_RECORDS", 3)
    for i in range(5):
        rec_id, sealed = status_mod._fit(local_repo, record(f"hv{i}", i))
        local_repo.backend.put(f"status/{rec_id}", sealed)
    report = read_statuses(local_repo)
    assert len(report.records) == 3
    assert "more than 3 status records" in report.problems[0][1]


def test_odd_names_are_ignored_and_reported_by_check(local_repo: Repository) -> None:
    write_status(local_repo, record("hv01"))
    for odd in ("status/" + "AB" * 32, "status/notes.txt", "status/" + "ab" * 31, "status/" + "ab" * 32 + "~"):
        local_repo.backend.put(odd, b"planted")
    report = read_statuses(local_repo)
    assert [r.host for r in report.records] == ["hv01"] and report.problems == []
    write_status(local_repo, record("hv01", 1))
    for odd in ("status/" + "AB" * 32, "status/notes.txt", "status/" + "ab" * 31, "status/" + "ab" * 32 + "~"):
        assert local_repo.backend.get(odd) == b"planted"  # never deleted
    kinds = [p.kind for p in check(local_repo).warnings]
    assert kinds.count("unexpected-object") == 4


class _NoDelete(MemoryBackend):
    def delete(self, name: str) -> None:
        raise BackendPermissionError(f"{name}: delete refused by the storage policy")


def test_storage_without_delete_rights_keeps_working(caplog: pytest.LogCaptureFixture) -> None:
    repo = make_repo(_NoDelete())
    write_status(repo, record("hv01", 0))
    with caplog.at_level(logging.WARNING, "vmvault.repo"):
        newest = write_status(repo, record("hv01", 1))
    assert len(names(repo)) == 2
    assert "could not remove a superseded status record" in caplog.text
    rec = read_statuses(repo).host("hv01")
    assert rec is not None and rec.id == newest


def test_unencrypted_repository(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")), encrypted=False)
    write_status(repo, record("hv01"))
    assert [r.host for r in read_statuses(reopen(repo)).records] == ["hv01"]


def test_status_is_a_top_level_folder_of_the_layout(tmp_path: Path) -> None:
    from vmvault.backends.base import TOP_LEVEL_FOLDERS

    assert "status" in TOP_LEVEL_FOLDERS
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    write_status(repo, record("hv01"))
    assert (tmp_path / "repo" / "status").is_dir()
    # the status object is sealed: no host name in the clear
    (obj,) = (tmp_path / "repo" / "status").iterdir()
    assert b"hv01" not in obj.read_bytes()


def test_open_without_the_index(local_repo: Repository) -> None:
    write_status(local_repo, record("hv01"))
    light = Repository.open(local_repo.backend, b"correct horse", load_index=False)
    assert len(light.index) == 0
    assert read_statuses(light).host("hv01") is not None


_json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    host=st.text(min_size=1, max_size=300).filter(lambda h: h[:255].strip() != ""),
    jobs=st.lists(st.dictionaries(st.text(max_size=10), _json, max_size=5), max_size=5),
    alerts=st.lists(st.dictionaries(st.text(max_size=10), _json, max_size=5), max_size=3),
    seq=st.integers(0, 2**62),
)
def test_any_record_round_trips_within_bounds(
    local_repo: Repository, host: str, jobs: list[dict[str, object]], alerts: list[dict[str, object]], seq: int
) -> None:
    rec = StatusRecord(host=host, time=T0, sequence=seq, jobs=jobs, alerts=alerts)  # type: ignore[arg-type]
    rec_id = StatusStore(local_repo).write(rec)
    back = StatusStore(local_repo).read()
    got = next((r for r in back.records if r.id == rec_id), None)
    if got is None:
        # entries not of the shape vmvault writes them (most of these): unreadable, and why
        assert [why for name, why in back.problems if name == f"status/{rec_id}"], back.problems
    else:
        assert got.host == host[:255] and got.sequence == seq
        assert got.jobs == rec.jobs and got.alerts == rec.alerts
    for obj in local_repo.backend.list("status/"):
        assert obj.size <= MAX_RECORD_SIZE
    for obj in list(local_repo.backend.list("status/")):
        local_repo.backend.delete(obj.name)
