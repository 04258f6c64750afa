"""repo/filters.py: restic's filter semantics and what ``latest`` means."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmvault.errors import ConfigError, SnapshotNotFoundError
from vmvault.repo.filters import SnapshotFilter, latest, normalise_location, require_match, vm_name
from vmvault.repo.snapshot import Snapshot


def snap(
    ident: str, time: str, *, vm: str | None, host: str = "h1", tags: tuple[str, ...] = (), location: str = ""
) -> Snapshot:
    return Snapshot(
        time=time,
        hostname=host,
        username="root",
        source={"kind": "files", "location": location or f"/srv/vms/{vm or 'x'}"},
        tags=list(tags),
        vm={"name": vm} if vm else {},
        id=ident * 64,
    )


A1 = snap("a", "2026-01-01T00:00:00+00:00", vm="web01", tags=("daily",))
A2 = snap("b", "2026-01-02T00:00:00+00:00", vm="web01", tags=("daily", "keep"), host="h2")
B1 = snap("c", "2026-01-03T00:00:00+00:00", vm="db", tags=("monthly",))
IMG = snap("d", "2026-01-04T00:00:00+00:00", vm=None, location="/var/lib/libvirt/images/db2.qcow2")
ALL = [A1, A2, B1, IMG]


def ids(snaps: list[Snapshot]) -> list[str]:
    return [s.id[0] for s in snaps]


def test_values_of_one_option_are_alternatives_options_combine() -> None:
    assert ids(SnapshotFilter(vms=("web01", "db")).select(ALL)) == ["a", "b", "c"]
    assert ids(SnapshotFilter(vms=("web01",), hosts=("h2",)).select(ALL)) == ["b"]
    assert ids(SnapshotFilter(hosts=("h1",)).select(ALL)) == ["a", "c", "d"]


def test_a_tag_value_with_commas_needs_all_of_them() -> None:
    assert ids(SnapshotFilter(tags=("daily,keep",)).select(ALL)) == ["b"]
    assert ids(SnapshotFilter(tags=("daily,keep", "monthly")).select(ALL)) == ["b", "c"]
    assert ids(SnapshotFilter(tags=("daily",)).select(ALL)) == ["a", "b"]
    with pytest.raises(ConfigError, match="empty tag"):
        SnapshotFilter(tags=("daily,",))


def test_source_is_compared_as_backup_records_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalise_location("qemu+unix:///run/x.qmp") == "qemu+unix:///run/x.qmp"
    assert normalise_location("/srv/vms/web01/") == "/srv/vms/web01"
    monkeypatch.chdir("/")  # a relative path is taken from the current folder, as backup takes it
    assert ids(SnapshotFilter(sources=("srv/vms/db",)).select(ALL)) == ["c"]
    assert ids(SnapshotFilter(sources=("/srv/vms/db/", "/var/lib/libvirt/images/db2.qcow2")).select(ALL)) == ["c", "d"]


def test_vm_name_falls_back_to_the_location() -> None:
    assert vm_name(IMG) == "db2.qcow2"
    assert ids(SnapshotFilter(vms=("db2.qcow2",)).select(ALL)) == ["d"]


def test_latest_is_the_newest_match_and_says_which_vm_when_ambiguous() -> None:
    picked = latest(ALL)
    assert picked.snapshot is IMG and picked.note is not None
    assert "db2.qcow2" in picked.note and "3 VMs" in picked.note and "--vm" in picked.note
    picked = latest(ALL, SnapshotFilter(vms=("web01",)))
    assert picked.snapshot is A2 and picked.note is None
    with pytest.raises(SnapshotNotFoundError, match="vm nosuch"):
        latest(ALL, SnapshotFilter(vms=("nosuch",)))
    with pytest.raises(SnapshotNotFoundError, match="no snapshots"):
        latest([])


def test_an_id_must_match_the_filter_given_with_it() -> None:
    assert require_match(A1, SnapshotFilter(vms=("web01",))) is A1
    with pytest.raises(SnapshotNotFoundError, match="does not match vm db"):
        require_match(A1, SnapshotFilter(vms=("db",)))


names = st.sampled_from(["web01", "db", "mail"])


@given(
    st.lists(st.tuples(names, st.sampled_from(["h1", "h2"]), st.sets(st.sampled_from(["a", "b", "c"]))), max_size=8),
    st.lists(names, max_size=2),
    st.lists(st.sampled_from(["h1", "h2"]), max_size=2),
    st.lists(st.sampled_from(["a", "b", "a,b", "c,a"]), max_size=2),
)
def test_filter_is_the_restic_formula(
    rows: list[tuple[str, str, set[str]]], vms: list[str], hosts: list[str], tags: list[str]
) -> None:
    snaps = [
        snap(f"{i:x}", f"2026-01-{i + 1:02d}T00:00:00+00:00", vm=v, host=h, tags=tuple(sorted(t)))
        for i, (v, h, t) in enumerate(rows)
    ]
    flt = SnapshotFilter(vms=tuple(vms), hosts=tuple(hosts), tags=tuple(tags))
    expected = [
        s
        for s in snaps
        if (not vms or vm_name(s) in vms)
        and (not hosts or s.hostname in hosts)
        and (not tags or any(set(t.split(",")) <= set(s.tags) for t in tags))
    ]
    assert flt.select(snaps) == expected
