"""The automation config: the documented example loads; every mistake names file and line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from vmvault.automation.config import EXAMPLE, BackupJob, CopyJob, VerifyJob, load_config, parse_duration
from vmvault.errors import ConfigError

BASE = """\
[repositories.local]
location = "/srv/repo"
password_env = "PW"

[sources.web01]
location = "/vms/web01"

[jobs.nightly]
type = "backup"
source = "web01"
repository = "local"
schedule = "30 1 * * *"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vmvault.toml"
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    job = cfg.jobs["web01-nightly"]
    assert isinstance(job, BackupJob)
    assert job.retention is not None and job.retention.min_good == 3 and job.retention.policy.daily == 7
    assert job.max_age == 26 * 3600 and job.retries == 3 and job.retry_delay == 600
    assert job.window is not None and job.window.contains(dt.datetime(2026, 1, 1, 23, 0))
    assert not job.window.contains(dt.datetime(2026, 1, 1, 12, 0))
    verify = cfg.jobs["verify-weekly"]
    assert isinstance(verify, VerifyJob) and verify.subset == pytest.approx(0.10) and verify.read_data
    copy = cfg.jobs["offsite"]
    assert isinstance(copy, CopyJob) and copy.repositories == ("local", "offsite")
    assert cfg.daemon.concurrency == 2
    assert cfg.notifiers["admins"].port == 587 and cfg.notifiers["chat"].on == "always"
    assert cfg.source_location("web01") == "hyperv://hv01/web01"


def test_docs_carry_the_same_example() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "automation.md"
    assert EXAMPLE.strip() in docs.read_text()


@pytest.mark.parametrize(
    ("change", "needle", "message"),
    [
        (("30 1 * * *", "61 1 * * *"), "schedule =", "minute 61 is out of range"),
        (('repository = "local"', 'repository = "nas"'), 'repository = "nas"', "names 'nas', which is not in"),
        (('source = "web01"', 'source = "web02"'), 'source = "web02"', "not in [sources]"),
        (('type = "backup"', 'type = "backup"\nretries = -1'), "retries = -1", "at least 0"),
        (('type = "backup"', 'type = "backup"\nmax_age = "1 fortnight"'), "max_age", "not a duration"),
        (('type = "backup"', 'type = "backup"\nwindow = "22-6"'), "window =", "must look like 22:00-06:00"),
        (('type = "backup"', 'type = "backup"\nretires = 2'), "retires", "unknown key 'retires'"),
        (('type = "backup"', 'type = "bakup"'), 'type = "bakup"', "must be one of backup, verify, copy"),
        (('password_env = "PW"', 'password_env = "PW"\nkey_file = "/k"'), "key_file", "only one of"),
        (('type = "backup"', 'type = "backup"\ntags = [1]'), "tags =", "list of strings"),
    ],
)
def test_semantic_errors_name_file_and_line(tmp_path: Path, change: tuple[str, str], needle: str, message: str) -> None:
    text = BASE.replace(*change)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.line == line_of(text, needle), str(info.value)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}:{info.value.line}: ")


def test_retention_errors_point_into_the_subtable(tmp_path: Path) -> None:
    text = BASE + "\n[jobs.nightly.retention]\nkeep_daily = 7\nmin_good = 0\n"
    with pytest.raises(ConfigError, match="at least 1") as info:
        load_config(write(tmp_path, text))
    assert info.value.line == line_of(text, "min_good")
    text = BASE + "\n[jobs.nightly.retention]\nmin_good = 2\n"
    with pytest.raises(ConfigError, match="no keep_\\* rule") as info:
        load_config(write(tmp_path, text))
    assert info.value.line == line_of(text, "[jobs.nightly.retention]")


def test_missing_required_key_points_at_its_table(tmp_path: Path) -> None:
    text = BASE.replace('repository = "local"\n', "")
    with pytest.raises(ConfigError, match=r"\[jobs.nightly\] needs repository") as info:
        load_config(write(tmp_path, text))
    assert info.value.line == line_of(text, "[jobs.nightly]")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = BASE.replace('schedule = "30 1 * * *"', "schedule = 30 1 * * *")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="TOML syntax error") as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.line == line_of(text, "schedule =")


def test_unreadable_and_empty_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration") as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.path == str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="no jobs are configured"):
        load_config(write(tmp_path, "[daemon]\nconcurrency = 1\n"))
    with pytest.raises(ConfigError, match="unknown time zone") as info:
        load_config(write(tmp_path, BASE + '\n[daemon]\ntimezone = "Mars/Olympus"\n'))
    assert info.value.line is not None


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("1.5H") == parse_duration(" 1h 30m ") == 5400
    with pytest.raises(ValueError, match=r"has no unit: write e\.g\. 12h, 12m or 12s"):
        parse_duration("12")
    for bad in ("", "h", "5x", "5h3", "-5m", "1e3s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
