"""Retention (GFS) policy: worked examples and properties."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmvault.errors import ConfigError
from vmvault.repo.retention import RetentionPolicy, apply_policy, parse_time
from vmvault.repo.snapshot import Snapshot

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def snap(when: dt.datetime, location: str = "vm1", tags: list[str] | None = None, host: str = "h") -> Snapshot:
    text = when.isoformat()
    s = Snapshot(time=text, hostname=host, username="u", source={"location": location}, tags=tags or [])
    s.id = hashlib.sha256(f"{text}{location}{host}{tags}".encode()).hexdigest()
    return s


def ids(snaps: list[Snapshot]) -> set[str]:
    return {s.id for s in snaps}


def test_daily_keeps_newest_of_each_day() -> None:
    snaps = [snap(T0 + dt.timedelta(hours=6 * i)) for i in range(12)]  # 3 days, 4 a day
    result = apply_policy(snaps, RetentionPolicy(daily=2))
    kept = sorted(result.keep, key=lambda s: s.time)
    assert [s.time for s in kept] == [(T0 + dt.timedelta(hours=42)).isoformat(), snaps[-1].time]
    assert result.reasons(snaps[-1].id) == ["daily snapshot"]
    assert len(result.remove) == 10


def test_gfs_example_and_reasons() -> None:
    # one snapshot a day for 400 days
    snaps = [snap(T0 + dt.timedelta(days=i, hours=3)) for i in range(400)]
    policy = RetentionPolicy(last=2, daily=7, weekly=4, monthly=6, yearly=2)
    result = apply_policy(snaps, policy)
    newest = max(snaps, key=lambda s: s.time)
    assert set(result.reasons(newest.id)) == {
        "last snapshot",
        "daily snapshot",
        "weekly snapshot",
        "monthly snapshot",
        "yearly snapshot",
    }
    kept = sorted(parse_time(s.time).date() for s in result.keep)
    # the last day is Monday 2025-02-03 (ISO week 6). daily: Jan 28 .. Feb 3; weekly adds the
    # Sundays Jan 26 and Jan 19 (weeks 4, 3; week 5's Sunday Feb 2 is already kept); monthly adds
    # the month ends Dec 31 .. Sep 30 (January's Jan 31 is already kept); yearly: Dec 31 is kept.
    expected = [dt.date(2024, m, d) for m, d in ((9, 30), (10, 31), (11, 30), (12, 31))]
    expected += [dt.date(2025, 1, 19), dt.date(2025, 1, 26)]
    expected += [dt.date(2025, 1, d) for d in range(28, 32)] + [dt.date(2025, 2, d) for d in (1, 2, 3)]
    assert kept == expected


def test_groups_are_independent_and_tags_keep() -> None:
    a = [snap(T0 + dt.timedelta(days=i), "vmA") for i in range(5)]
    b = [snap(T0 + dt.timedelta(days=i), "vmB", tags=["monthly-archive"] if i == 0 else []) for i in range(5)]
    result = apply_policy(a + b, RetentionPolicy(last=1, keep_tags=("monthly-archive",)))
    assert ids(result.keep) == {a[-1].id, b[-1].id, b[0].id}
    assert result.reasons(b[0].id) == ["has tags monthly-archive"]
    assert len(result.groups) == 2


def test_keep_tag_requires_all_tags_of_an_entry() -> None:
    s1 = snap(T0, tags=["a"])
    s2 = snap(T0 + dt.timedelta(days=1), tags=["a", "b"])
    s3 = snap(T0 + dt.timedelta(days=2))
    result = apply_policy([s1, s2, s3], RetentionPolicy(keep_tags=("a,b",)))
    assert ids(result.keep) == {s2.id}


def test_group_by_host() -> None:
    s1 = snap(T0, host="x")
    s2 = snap(T0 + dt.timedelta(days=1), host="y")
    assert len(apply_policy([s1, s2], RetentionPolicy(last=1)).keep) == 1
    assert len(apply_policy([s1, s2], RetentionPolicy(last=1, group_by=("location", "host"))).keep) == 2


def test_empty_policy_keeps_everything() -> None:
    snaps = [snap(T0 + dt.timedelta(days=i)) for i in range(3)]
    result = apply_policy(snaps, RetentionPolicy())
    assert ids(result.keep) == ids(snaps) and not result.remove


def test_minus_one_keeps_every_bucket() -> None:
    snaps = [snap(T0 + dt.timedelta(hours=12 * i)) for i in range(10)]
    assert len(apply_policy(snaps, RetentionPolicy(daily=-1)).keep) == 5


def test_bad_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RetentionPolicy(daily=-3)
    with pytest.raises(ConfigError):
        RetentionPolicy(group_by=("colour",))


# ---- properties ----------------------------------------------------------------------------

times = st.lists(
    st.tuples(st.integers(0, 3 * 365 * 24 * 60), st.sampled_from(["vmA", "vmB", "vmC"])), min_size=0, max_size=40
)
counts = st.integers(0, 5)
policies = st.builds(
    RetentionPolicy,
    last=counts,
    hourly=counts,
    daily=counts,
    weekly=counts,
    monthly=counts,
    yearly=counts,
)


def build(items: list[tuple[int, str]]) -> list[Snapshot]:
    return [snap(T0 + dt.timedelta(minutes=m, microseconds=i), loc) for i, (m, loc) in enumerate(items)]


@settings(max_examples=200, deadline=None)
@given(times, policies)
def test_partition_and_newest_kept(items: list[tuple[int, str]], policy: RetentionPolicy) -> None:
    snaps = build(items)
    result = apply_policy(snaps, policy)
    assert ids(result.keep) | ids(result.remove) == ids(snaps)
    assert not ids(result.keep) & ids(result.remove)
    for loc in {s.source["location"] for s in snaps}:
        group = [s for s in snaps if s.source["location"] == loc]
        newest = max(group, key=lambda s: (parse_time(s.time), s.id))
        # the newest of a group is always kept: by every rule, or because there is no rule
        assert newest.id in ids(result.keep)


@settings(max_examples=200, deadline=None)
@given(times, policies)
def test_idempotent(items: list[tuple[int, str]], policy: RetentionPolicy) -> None:
    first = apply_policy(build(items), policy)
    second = apply_policy(first.keep, policy)
    assert ids(second.keep) == ids(first.keep)
    assert not second.remove


@settings(max_examples=200, deadline=None)
@given(times, st.integers(1, 10))
def test_keep_last_keeps_exactly_the_n_newest(items: list[tuple[int, str]], n: int) -> None:
    snaps = build(items)
    result = apply_policy(snaps, RetentionPolicy(last=n))
    for loc in {s.source["location"] for s in snaps}:
        group = sorted((s for s in snaps if s.source["location"] == loc), key=lambda s: parse_time(s.time))
        kept = [s for s in result.keep if s.source["location"] == loc]
        assert ids(kept) == ids(group[-n:])


@settings(max_examples=200, deadline=None)
@given(times, st.integers(1, 6))
def test_daily_keeps_newest_per_day_for_n_days(items: list[tuple[int, str]], n: int) -> None:
    snaps = build(items)
    result = apply_policy(snaps, RetentionPolicy(daily=n))
    for loc in {s.source["location"] for s in snaps}:
        group = [s for s in snaps if s.source["location"] == loc]
        days = sorted({parse_time(s.time).date() for s in group}, reverse=True)[:n]
        expected = {max((s for s in group if parse_time(s.time).date() == d), key=lambda s: s.time).id for d in days}
        assert ids([s for s in result.keep if s.source["location"] == loc]) == expected


@settings(max_examples=100, deadline=None)
@given(times, policies, st.sampled_from(["last", "hourly", "daily", "weekly", "monthly", "yearly"]))
def test_more_generous_policy_keeps_a_superset(
    items: list[tuple[int, str]], policy: RetentionPolicy, rule: str
) -> None:
    assume(not policy.empty())  # the empty policy keeps all; adding a rule starts removing
    snaps = build(items)
    base = apply_policy(snaps, policy)
    bigger = RetentionPolicy(
        **{**policy.to_dict(), rule: getattr(policy, rule) + 1, "keep_tags": (), "group_by": ("location",)}
    )
    assert ids(base.keep) <= ids(apply_policy(snaps, bigger).keep)


# ---- never forget everything (repository-format.md, section 10.2 / issue: --keep-tag "") --------


@pytest.mark.parametrize("spec", ["", " ", ",", "a,", ",a", "a,,b", " , "])
def test_an_empty_tag_is_a_usage_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="empty tag"):
        RetentionPolicy(keep_tags=(spec,))
    with pytest.raises(ConfigError, match="empty tag"):
        RetentionPolicy(last=1, keep_tags=("fine", spec))


def test_a_tag_no_snapshot_carries_forgets_nothing() -> None:
    snaps = [snap(T0 + dt.timedelta(days=i), tags=["daily"]) for i in range(4)]
    with pytest.raises(ConfigError, match="every snapshot of vm vm1, location vm1"):
        apply_policy(snaps, RetentionPolicy(keep_tags=("typo",)))
    # a tag only one group carries: the other group would lose everything
    other = [snap(T0 + dt.timedelta(days=i), "vmB") for i in range(2)]
    with pytest.raises(ConfigError, match="vmB"):
        apply_policy(snaps + other, RetentionPolicy(keep_tags=("daily",)))
    # with a count the group keeps its newest, so the policy is fine
    result = apply_policy(snaps + other, RetentionPolicy(last=1, keep_tags=("typo",)))
    assert len(result.keep) == 2


@pytest.mark.parametrize("rule", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
@pytest.mark.parametrize("group_by", [("location",), ("host",), ("tags",), ("location", "host", "tags")])
def test_every_rule_alone_keeps_the_newest_of_every_group(rule: str, group_by: tuple[str, ...]) -> None:
    snaps = [
        snap(T0 + dt.timedelta(days=40 * i), loc, tags=[t] if t else [], host=h)
        for i, (loc, t, h) in enumerate(
            [("vmA", "", "x"), ("vmA", "t", "x"), ("vmB", "", "y"), ("vmB", "t", "x"), ("vmC", "u", "y")] * 3
        )
    ]
    result = apply_policy(snaps, RetentionPolicy(**{rule: 1}, group_by=group_by))
    assert len(result.groups) > 1 and all(g.keep for g in result.groups)


tag_specs = st.lists(st.sampled_from(["a", "b", "a,b", "c"]), max_size=2).map(tuple)
tagged_items = st.lists(
    st.tuples(
        st.integers(0, 3 * 365 * 24 * 60),
        st.sampled_from(["vmA", "vmB"]),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(tagged_items, policies, tag_specs, st.sampled_from([("location",), ("tags",), ("location", "host")]))
def test_no_policy_forgets_every_snapshot_of_a_group(
    items: list[tuple[int, str, list[str]]],
    counts: RetentionPolicy,
    keep_tags: tuple[str, ...],
    group_by: tuple[str, ...],
) -> None:
    snaps = [
        snap(T0 + dt.timedelta(minutes=m, microseconds=i), loc, tags=sorted(set(tags)))
        for i, (m, loc, tags) in enumerate(items)
    ]
    policy = RetentionPolicy(**{**counts.to_dict(), "keep_tags": keep_tags, "group_by": group_by})
    try:
        result = apply_policy(snaps, policy)
    except ConfigError:
        # refused only when some group would really have kept nothing: tags alone, none present
        assert all(getattr(policy, r) == 0 for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly"))
        assert policy.keep_tags
        return
    for g in result.groups:
        assert g.keep, "a group lost every snapshot"
