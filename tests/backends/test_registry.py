"""The backend registry: one table from a repository location to its storage."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import pytest

from vmvault.backends import BACKENDS, BackendEntry, backend_for, describe, open_backend
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import ConfigError, MissingDependencyError


def test_the_table_is_consistent() -> None:
    schemes = [s for e in BACKENDS for s in e.schemes]
    assert len(schemes) == len(set(schemes)) and all(s == s.lower() for s in schemes)
    assert [e.name for e in BACKENDS if e.paths] == ["local"]


@pytest.mark.parametrize("entry", BACKENDS, ids=lambda e: e.name)
def test_every_opener_resolves(entry: BackendEntry) -> None:
    module, _, attribute = entry.opener.partition(":")
    opener = getattr(__import__(module, fromlist=[attribute]), attribute)
    assert callable(opener) and len(inspect.signature(opener).parameters) >= 1


def test_locations_go_to_their_storage(tmp_path: Path) -> None:
    cases = {
        str(tmp_path): "local",
        f"file://{tmp_path}": "local",
        "relative/folder": "local",
        "sftp://backup@nas/srv/vmvault": "sftp",
        "SFTP://backup@nas/srv/vmvault": "sftp",
        "s3://minio:9000/bucket/prefix": "s3",
        "memory://": "memory",
    }
    for location, name in cases.items():
        assert backend_for(location).name == name, location
    assert isinstance(open_backend(str(tmp_path / "repo")), LocalBackend)
    assert isinstance(open_backend("memory://"), MemoryBackend)


def test_an_unknown_location_is_one_line_naming_the_storages() -> None:
    with pytest.raises(ConfigError) as err:
        open_backend("ftp://nas/backups")
    text = str(err.value)
    assert "\n" not in text and "ftp://nas/backups" in text
    for e in BACKENDS:
        assert (e.usage in text) != e.test_only
    assert "memory" not in describe() and "sftp://" in describe()


def test_a_missing_package_is_one_line_with_the_install_command() -> None:
    entry = replace(BACKENDS[1], name="example", opener="vmvault_missing_store_for_tests:open_it", extra="example")
    with pytest.raises(MissingDependencyError) as err:
        entry.open("example://x")
    assert "\n" not in str(err.value) and "'vmvault[example]'" in str(err.value)
    assert "the example storage" in str(err.value)
    broken = replace(entry, opener="vmvault.backends.no_such_backend:open_it")
    with pytest.raises(ModuleNotFoundError):  # vmvault's own module missing: a bug, not hidden
        broken.open("example://x")
