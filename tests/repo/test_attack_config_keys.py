"""Whoever writes the storage: the config, key objects and snapshots (repository-format.md, 10.1).

Each class of attack is tried in several forms: every config field tampered, each way of
switching encryption off, key objects planted with hostile parameters or shapes, snapshots
deleted, withheld or replayed, and the host record that remembers what this host saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.repo.builders import PASS, Content, KeepsOtherBytes, backup, disk_image, make_repo
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.errors import (
    ConfigError,
    IntegrityError,
    NotARepositoryError,
    PasswordError,
    RepositoryError,
    TamperingError,
    UnsupportedVersionError,
    VmvaultError,
)
from vmvault.repo import Repository, check, config, keys, secret
from vmvault.repo._limits import MAX_SMALL_OBJECT
from vmvault.repo.crypto import BLAKE3, HMAC_SHA256
from vmvault.repo.format import FORMAT_VERSION
from vmvault.repo.hostrecord import HostRecords

# ---- helpers ----------------------------------------------------------------------------


def everything(backend: Backend) -> dict[str, bytes]:
    return {o.name: backend.get(o.name) for o in backend.list("")}


def rewrite_config(backend: Backend, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(backend.get("config"))
    change(doc)
    backend.put("config", json.dumps(doc, indent=1).encode())


def other_host(tmp_path: Path) -> HostRecords:
    """The records of a host that has never used the repository."""
    return HostRecords(str(tmp_path / "another-host"))


def plant_key(backend: Backend, **fields: Any) -> str:
    """A key object of the right shape (random salt and data) with ``fields`` overriding."""
    doc: dict[str, Any] = {
        "created": "2026-01-01T00:00:00+00:00",
        "hostname": "attacker",
        "username": "mallory",
        "kind": "passphrase",
        "kdf": "argon2id",
        "kdf_params": dict(keys.CHEAP_KDF),
        "salt": base64.b64encode(os.urandom(16)).decode(),
        "data": base64.b64encode(os.urandom(92)).decode(),
    }
    doc.update(fields)
    raw = json.dumps(doc).encode()
    name = f"keys/{hashlib.sha256(raw).hexdigest()}"
    backend.put(name, raw)
    return name


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = make_repo(LocalBackend(str(tmp_path / "repo")))
    backup(r, Content(disks={"d": disk_image(1, 6)}, files={"vm.conf": b"name=vm1\n"}))
    return r


# ---- the config: every field ------------------------------------------------------------

OTHER_ID = "0123456789abcdef0123456789abcdef"


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(field, value)


def _drop(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(field)


def _as_version_2(doc: dict[str, Any]) -> None:
    # what a version-2 config (HMAC-SHA-256 ids) of the same repository would say
    doc.pop("chunk_id")
    doc["version"] = 2


#: (what, change, error on this host, error on a host that never saw the repository)
CONFIG_TAMPERING: list[tuple[str, Callable[[dict[str, Any]], None], type[VmvaultError], type[VmvaultError]]] = [
    ("format", _set("format", "restic"), NotARepositoryError, NotARepositoryError),
    ("version newer", _set("version", FORMAT_VERSION + 1), UnsupportedVersionError, UnsupportedVersionError),
    ("version 0", _set("version", 0), IntegrityError, IntegrityError),
    ("version as text", _set("version", "1"), IntegrityError, IntegrityError),
    ("id", _set("id", OTHER_ID), TamperingError, IntegrityError),
    ("id escaping the record folder", _set("id", "../../../../tmp/x"), IntegrityError, IntegrityError),
    ("chunk_size", _set("chunk_size", 8192), IntegrityError, IntegrityError),
    ("chunk_size not a power of two", _set("chunk_size", 5000), IntegrityError, IntegrityError),
    ("chunk_size a boolean", _set("chunk_size", True), IntegrityError, IntegrityError),
    ("pack_size", _set("pack_size", 32768), IntegrityError, IntegrityError),
    ("pack_size huge", _set("pack_size", 1 << 40), IntegrityError, IntegrityError),
    ("pack_size removed", _drop("pack_size"), IntegrityError, IntegrityError),
    ("encryption none, MAC kept", _set("encryption", "none"), TamperingError, TamperingError),
    ("encryption unknown", _set("encryption", "rot13"), IntegrityError, IntegrityError),
    ("immutable_days added", _set("immutable_days", 30), IntegrityError, IntegrityError),
    ("immutable_days out of range", _set("immutable_days", 0), IntegrityError, IntegrityError),
    # the chunk id function: flipped, it would make the next backup store every chunk again
    # under other ids, and the repository hold two id functions
    ("chunk_id changed", _set("chunk_id", HMAC_SHA256), IntegrityError, IntegrityError),
    ("chunk_id removed", _drop("chunk_id"), IntegrityError, IntegrityError),
    ("chunk_id removed, version 2", _as_version_2, TamperingError, IntegrityError),
    ("chunk_id unknown", _set("chunk_id", "sha3-256"), UnsupportedVersionError, UnsupportedVersionError),
    ("chunk_id not text", _set("chunk_id", [BLAKE3]), IntegrityError, IntegrityError),
    ("created", _set("created", "1999-01-01T00:00:00+00:00"), IntegrityError, IntegrityError),
    ("unknown field", _set("compression", "none"), IntegrityError, IntegrityError),
    ("MAC removed", _drop("mac"), TamperingError, TamperingError),
    ("MAC garbage", _set("mac", "00" * 32), IntegrityError, IntegrityError),
    ("MAC not text", _set("mac", 7), IntegrityError, IntegrityError),
]


@pytest.mark.parametrize(
    ("what", "change", "here", "elsewhere"), CONFIG_TAMPERING, ids=[c[0] for c in CONFIG_TAMPERING]
)
def test_every_config_field_tampered_is_refused(
    repo: Repository,
    tmp_path: Path,
    what: str,
    change: Callable[[dict[str, Any]], None],
    here: type[VmvaultError],
    elsewhere: type[VmvaultError],
) -> None:
    rewrite_config(repo.backend, change)
    before = everything(repo.backend)
    with pytest.raises(here):
        Repository.open(repo.backend, PASS)
    with pytest.raises(elsewhere):
        Repository.open(repo.backend, PASS, records=other_host(tmp_path))
    # refusing wrote nothing, and nothing outside the record folder was created
    assert everything(repo.backend) == before
    assert not Path("/tmp/x.json").exists()


def test_duplicate_fields_are_refused(repo: Repository) -> None:
    # a JSON object with two "encryption" fields: parsers disagree on which one wins
    raw = repo.backend.get("config").decode()
    repo.backend.put("config", raw.replace('"format"', '"encryption": "none", "format"', 1).encode())
    with pytest.raises(IntegrityError, match="appears twice"):
        Repository.open(repo.backend, PASS)


@pytest.mark.parametrize(
    "raw", [b"{" + b" " * (MAX_SMALL_OBJECT + 10) + b"}", b"[" * 100000, b'{"format": "vmvault-repository"}']
)
def test_oversized_nested_or_empty_config(repo: Repository, raw: bytes) -> None:
    repo.backend.put("config", raw)
    with pytest.raises((IntegrityError, NotARepositoryError)):
        Repository.open(repo.backend, PASS)


def test_a_newer_vmvaults_config_field_is_refused_as_newer(repo: Repository) -> None:
    """A field the MAC vouches for was written by a key holder: a newer vmvault, not an attacker."""
    doc = json.loads(repo.backend.get("config"))
    del doc["mac"]
    doc["compression"] = "zstd-19"
    doc["mac"] = config._mac(repo.key, doc)
    repo.backend.put("config", json.dumps(doc).encode())
    with pytest.raises(UnsupportedVersionError, match=r"compression.*written by a newer vmvault"):
        Repository.open(repo.backend, PASS)


# ---- switching encryption off ---------------------------------------------------------


def _switch_off(backend: Backend) -> None:
    rewrite_config(backend, lambda doc: (doc.pop("mac"), doc.__setitem__("encryption", "none")))


@pytest.mark.parametrize("secret", ["given", "prompt", "none"])
def test_encryption_switched_off_while_keys_exist(repo: Repository, tmp_path: Path, secret: str) -> None:
    _switch_off(repo.backend)
    asked: list[int] = []
    given: bytes | Callable[[], bytes] | None = {
        "given": PASS,
        "prompt": lambda: asked.append(1) or PASS,
        "none": None,
    }[secret]
    for records in (None, other_host(tmp_path)):
        with pytest.raises(TamperingError, match="holds key objects"):
            Repository.open(repo.backend, given, records=records)
    assert asked == []


def test_encryption_switched_off_and_keys_deleted_with_a_secret_given(repo: Repository, tmp_path: Path) -> None:
    _switch_off(repo.backend)
    for o in repo.backend.list("keys/"):
        repo.backend.delete(o.name)
    with pytest.raises(TamperingError, match="passphrase or key file was given"):
        Repository.open(repo.backend, PASS, records=other_host(tmp_path))


def test_encryption_switched_off_and_keys_deleted_is_caught_by_the_host_record(
    repo: Repository, tmp_path: Path
) -> None:
    _switch_off(repo.backend)
    for o in repo.backend.list("keys/"):
        repo.backend.delete(o.name)
    # no secret at hand (a script that expects none): this host saw it encrypted
    with pytest.raises(TamperingError, match=r"saw repository .* encrypted"):
        Repository.open(repo.backend, None)
    # the limit: a host that never saw it, given no secret, cannot tell (section 10.1)
    plain = Repository.open(repo.backend, None, records=other_host(tmp_path))
    assert not plain.config.encrypted


def test_replaced_repository_is_refused_until_the_user_says_so(tmp_path: Path) -> None:
    here = tmp_path / "repo"
    make_repo(LocalBackend(str(here)))
    # the storage swaps in another repository, one the same passphrase opens
    make_repo(LocalBackend(str(tmp_path / "other")))
    shutil.rmtree(here)
    shutil.copytree(tmp_path / "other", here)
    with pytest.raises(TamperingError, match="storage was replaced") as info:
        Repository.open(LocalBackend(str(here)), PASS)
    location_file = str(info.value).split("remove ", 1)[1].split(" and run", 1)[0]
    assert Path(location_file).is_file()
    os.unlink(location_file)
    assert Repository.open(LocalBackend(str(here)), PASS).config.id != ""


def test_replaced_by_an_unencrypted_repository_is_refused(tmp_path: Path) -> None:
    here = tmp_path / "repo"
    make_repo(LocalBackend(str(here)))
    shutil.rmtree(here)
    make_repo(LocalBackend(str(tmp_path / "plain")), encrypted=False)
    shutil.copytree(tmp_path / "plain", here)
    with pytest.raises(TamperingError, match="storage was replaced"):
        Repository.open(LocalBackend(str(here)), None)


def test_init_at_a_location_replaces_what_this_host_knew(tmp_path: Path) -> None:
    here = tmp_path / "repo"
    make_repo(LocalBackend(str(here)))
    shutil.rmtree(here)
    fresh = make_repo(LocalBackend(str(here)))  # the user's own new repository
    assert Repository.open(LocalBackend(str(here)), PASS).config.id == fresh.config.id


def test_a_repository_this_host_used_found_missing_is_not_sent_to_init(tmp_path: Path) -> None:
    """No config where this host used a repository (its disk not mounted: the mount point is
    empty): the error names that repository and asks whether its disk is mounted, where a location
    never used is told to ``init`` (which, there, would put the next backups on the wrong disk)."""
    here = tmp_path / "mnt" / "vmvault"
    made = make_repo(LocalBackend(str(here)))
    shutil.rmtree(here)
    with pytest.raises(NotARepositoryError, match=f"this host used repository {made.config.id[:8]} there") as info:
        Repository.open(LocalBackend(str(here)), PASS)
    assert "(last on 20" in str(info.value) and "Is the disk or share that holds it mounted" in str(info.value)
    with pytest.raises(NotARepositoryError, match="no config\\); create one with `vmvault init`"):
        Repository.open(LocalBackend(str(tmp_path / "never-used")), PASS)


def test_unencrypted_config_change_is_caught_by_a_host_that_saw_it(tmp_path: Path) -> None:
    plain = make_repo(LocalBackend(str(tmp_path / "repo")), encrypted=False)
    rewrite_config(plain.backend, _set("chunk_size", 8192))
    with pytest.raises(TamperingError, match="changed since this host last read it"):
        Repository.open(plain.backend, None)
    # no MAC: a host that never saw it can only check the config is well-formed
    assert Repository.open(plain.backend, None, records=other_host(tmp_path)).config.chunk_size == 8192


# ---- the chunk id function (repository-format.md, sections 4 and 11) --------------------


def test_a_new_repository_names_its_chunk_id_function_in_a_version_3_config(repo: Repository) -> None:
    doc = json.loads(repo.backend.get("config"))
    assert (doc["version"], doc["chunk_id"]) == (3, BLAKE3)
    assert repo.key.id_function == BLAKE3 and repo.config.chunk_id_label == "keyed BLAKE3"


@pytest.mark.parametrize(
    "change",
    [_set("chunk_id", BLAKE3), lambda doc: doc.update(version=3, chunk_id=BLAKE3)],
    ids=["field added", "field added, version 3"],
)
def test_a_chunk_id_function_added_to_an_hmac_repository_is_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    hmac_repo = Repository.init(LocalBackend(str(tmp_path / "repo")), PASS, chunk_size=4096, chunk_id=HMAC_SHA256)
    doc = json.loads(hmac_repo.backend.get("config"))
    assert doc["version"] == 2 and "chunk_id" not in doc  # as an earlier vmvault writes it
    rewrite_config(hmac_repo.backend, change)
    before = everything(hmac_repo.backend)
    for records in (None, other_host(tmp_path)):
        with pytest.raises(IntegrityError):
            Repository.open(hmac_repo.backend, PASS, records=records)
    assert everything(hmac_repo.backend) == before


def test_unencrypted_chunk_id_function_changed(tmp_path: Path) -> None:
    """Without a MAC the host record catches a flip; a host that never saw the repository can
    only refuse what no vmvault writes, and reads nothing wrong from what it accepts."""
    plain = make_repo(LocalBackend(str(tmp_path / "repo")), encrypted=False)
    snap = backup(plain, Content(disks={"d": disk_image(1, 6)}))
    rewrite_config(plain.backend, _set("chunk_id", HMAC_SHA256))
    with pytest.raises(TamperingError, match="changed since this host last read it"):
        Repository.open(plain.backend, None)
    # trust on first use (section 10.1): the flip is accepted, but every stored chunk then
    # fails its id check: an error, never other data
    fresh = Repository.open(plain.backend, None, records=other_host(tmp_path))
    assert fresh.key.id_function == HMAC_SHA256
    block = snap.disks[0].index[0]
    assert block is not None
    with pytest.raises(IntegrityError):
        fresh.read_index_block(block)
    cases: list[tuple[Callable[[dict[str, Any]], None], str | None]] = [
        (_as_version_2, None),  # a consistent version-2 config: accepted likewise
        (lambda doc: doc.update(version=2, chunk_id=BLAKE3), "names no chunk id function"),
        (_drop("chunk_id"), "config names its chunk id function, this one does not"),
    ]
    for n, (change, match) in enumerate(cases):
        rewrite_config(plain.backend, lambda doc: doc.update(version=3, chunk_id=BLAKE3))
        rewrite_config(plain.backend, change)
        records = HostRecords(str(tmp_path / f"host-{n}"))  # each time a host that never saw it
        if match is None:
            assert Repository.open(plain.backend, None, records=records).config.chunk_id == HMAC_SHA256
            continue
        with pytest.raises(IntegrityError, match=match):
            Repository.open(plain.backend, None, records=records)


def test_check_reports_the_chunk_id_function_changed_after_opening(repo: Repository) -> None:
    assert check(repo).ok
    rewrite_config(repo.backend, _set("chunk_id", HMAC_SHA256))
    kinds = [p.kind for p in check(repo).problems]
    assert "config-changed" in kinds


def test_migrate_refuses_a_chunk_id_function_changed_while_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.repo.test_migrate import old_repo

    plain = old_repo(tmp_path / "repo", monkeypatch, encrypted=False)
    rewrite_config(plain.backend, lambda doc: doc.update(version=3, chunk_id=BLAKE3))
    before = everything(plain.backend)
    with pytest.raises(TamperingError, match="changed its chunk id function"):
        plain.migrate()
    assert everything(plain.backend) == before


def test_an_earlier_vmvault_refuses_blake3_repositories_and_reads_hmac_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b3 = make_repo(LocalBackend(str(tmp_path / "b3")))
    hm = Repository.init(LocalBackend(str(tmp_path / "hmac")), PASS, chunk_size=4096, chunk_id=HMAC_SHA256)
    monkeypatch.setattr(config, "FORMAT_VERSION", 2)  # what vmvault read before BLAKE3 ids
    with pytest.raises(UnsupportedVersionError, match="format version 3"):
        Repository.open(b3.backend, PASS)
    assert Repository.open(hm.backend, PASS).config.version == 2


def test_unencrypted_repository_given_a_secret_is_refused(tmp_path: Path) -> None:
    plain = make_repo(LocalBackend(str(tmp_path / "repo")), encrypted=False)
    with pytest.raises(TamperingError, match="passphrase or key file was given"):
        Repository.open(plain.backend, PASS)
    assert not Repository.open(plain.backend, lambda: PASS).config.encrypted  # a prompt is not asked


@pytest.mark.parametrize("damage", ["folder is a file", "record damaged"])
def test_an_unusable_host_record_is_a_warning(repo: Repository, tmp_path: Path, damage: str) -> None:
    records = HostRecords(str(tmp_path / "records"))
    if damage == "folder is a file":
        (tmp_path / "records").write_text("not a folder")
    else:
        Repository.open(repo.backend, PASS, records=records)
        Path(records.record_path(repo.config.id)).write_text("{not json")
    opened = Repository.open(repo.backend, PASS, records=records)
    assert any("record of repositories" in w and "cannot be used" in w for w in opened.warnings)
    # the rules that need no record still hold
    _switch_off(repo.backend)
    with pytest.raises(TamperingError):
        Repository.open(repo.backend, PASS, records=records)


# ---- key objects planted in keys/ --------------------------------------------------------

HOSTILE_KEYS: list[tuple[str, dict[str, Any]]] = [
    ("iterations 2**32-1", {"kdf_params": {"memory_kib": 1024, "iterations": 2**32 - 1, "lanes": 1}}),
    ("memory 2**31 KiB", {"kdf_params": {"memory_kib": 2**31, "iterations": 1, "lanes": 1}}),
    ("lanes 0", {"kdf_params": {"memory_kib": 1024, "iterations": 1, "lanes": 0}}),
    ("lanes 2**24", {"kdf_params": {"memory_kib": 1 << 20, "iterations": 1, "lanes": 1 << 24}}),
    ("memory below 8 KiB per lane", {"kdf_params": {"memory_kib": 8, "iterations": 1, "lanes": 4}}),
    ("parameters as booleans", {"kdf_params": {"memory_kib": 1024, "iterations": True, "lanes": 1}}),
    ("parameters as floats", {"kdf_params": {"memory_kib": 1024.0, "iterations": 1, "lanes": 1}}),
    ("extra parameter", {"kdf_params": {"memory_kib": 1024, "iterations": 1, "lanes": 1, "threads": 64}}),
    ("parameters not an object", {"kdf_params": [1024, 1, 1]}),
    ("unknown kind", {"kind": "rsa"}),
    ("kdf does not fit kind", {"kdf": "pbkdf2"}),
    ("salt too short", {"salt": base64.b64encode(b"x").decode()}),
    ("data too long", {"data": base64.b64encode(os.urandom(1 << 12)).decode()}),
    ("data not base64", {"data": "!!!"}),
    ("role not text", {"role": ["full"]}),
    ("huge", {"padding": "x" * (MAX_SMALL_OBJECT + 1)}),
]


@pytest.mark.parametrize("fields", [f for _, f in HOSTILE_KEYS], ids=[n for n, _ in HOSTILE_KEYS])
def test_a_hostile_key_object_is_skipped_never_fatal(repo: Repository, tmp_path: Path, fields: dict[str, Any]) -> None:
    name = plant_key(repo.backend, **fields)
    derived: list[dict[str, int]] = []
    real = keys.derive_passphrase_key
    try:
        keys.derive_passphrase_key = lambda s, salt, p: derived.append(p) or real(s, salt, p)  # type: ignore[assignment]
        # a host that has no preferred key: every key object is looked at
        opened = Repository.open(repo.backend, PASS, records=other_host(tmp_path))
        assert opened.key == repo.key
        with pytest.raises(PasswordError, match="1 unusable key objects") as info:
            Repository.open(repo.backend, b"wrong passphrase", records=other_host(tmp_path))
    finally:
        keys.derive_passphrase_key = real  # type: ignore[assignment]
    assert name.removeprefix("keys/")[:8] in str(info.value) or name in str(info.value)
    assert all(p == keys.CHEAP_KDF for p in derived), "only the genuine key's parameters were ever derived"
    assert [k.problem != "" for k in keys.list_keys(repo.backend)].count(True) == 1
    # and check names it
    assert [p.object for p in check(opened).errors if p.kind == "key-damaged"] == [name]


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b"[" * 50000, b'{"kind": "passphrase"}', b"\xff\xfe"],
    ids=["not json", "a list", "nested", "fields missing", "not utf-8"],
)
def test_malformed_key_objects_are_skipped(repo: Repository, tmp_path: Path, raw: bytes) -> None:
    repo.backend.put(f"keys/{hashlib.sha256(raw).hexdigest()}", raw)
    repo.backend.put("keys/" + "0" * 64, raw)  # and one whose name is not its hash
    repo.backend.put("keys/not-a-key-id", raw)  # no key object at all (repo/names.py): ignored
    assert Repository.open(repo.backend, PASS, records=other_host(tmp_path)).key == repo.key
    with pytest.raises(PasswordError, match="2 unusable key objects"):
        Repository.open(repo.backend, b"wrong passphrase", records=other_host(tmp_path))


@pytest.mark.parametrize("damage", ["flipped", "cut"])
def test_a_repository_whose_every_key_is_damaged_does_not_call_the_passphrase_wrong(
    repo: Repository, tmp_path: Path, damage: str
) -> None:
    """The only key object damaged on the storage: the passphrase met no key to be tried
    against, and "wrong passphrase" (exit 12) would send the administrator looking for
    another one. It is named as damage (exit 1) with the object, whatever the host recorded."""
    (name,) = [o.name for o in repo.backend.list("keys/")]
    raw = bytearray(repo.backend.get(name))
    if damage == "flipped":
        raw[len(raw) // 2] ^= 1
    else:
        del raw[len(raw) // 2 :]
    repo.backend.put(name, bytes(raw))
    for records in (None, other_host(tmp_path)):
        for secret_ in (PASS, b"wrong passphrase"):
            with pytest.raises(IntegrityError, match="passphrase or key file was not tried") as info:
                Repository.open(repo.backend, secret_, **({"records": records} if records else {}))
            assert not isinstance(info.value, PasswordError) and name in str(info.value)


def test_keys_are_tried_cheapest_first(repo: Repository, tmp_path: Path) -> None:
    """An in-bounds but costly planted key (1 GiB, 16 passes) is never derived before the
    genuine one; nor are several keys at the default cost."""
    expensive = {"memory_kib": 1 << 20, "iterations": 16, "lanes": 4}
    plant_key(repo.backend, kdf_params=expensive)
    for _ in range(3):
        plant_key(repo.backend, kdf_params=dict(keys.DEFAULT_KDF))
    derived: list[dict[str, int]] = []
    real = keys.derive_passphrase_key
    try:
        keys.derive_passphrase_key = lambda s, salt, p: derived.append(p) or real(s, salt, p)  # type: ignore[assignment]
        assert Repository.open(repo.backend, PASS, records=other_host(tmp_path)).key == repo.key
    finally:
        keys.derive_passphrase_key = real  # type: ignore[assignment]
    assert derived == [keys.CHEAP_KDF]


def test_many_planted_keys_cannot_hang_opening(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening starts no derivation after the budget: each derivation here costs one second
    of a fake clock, and 40 planted keys cheaper than the genuine one come first."""
    for _ in range(40):
        plant_key(repo.backend, kdf_params={"memory_kib": 8, "iterations": 1, "lanes": 1})
    clock = [0.0]
    real = keys.derive_passphrase_key

    def costly(secret: bytes, salt: bytes, params: dict[str, int]) -> bytes:
        clock[0] += 1.0
        return real(secret, salt, params)

    monkeypatch.setattr(keys, "_clock", lambda: clock[0])
    monkeypatch.setattr(keys, "derive_passphrase_key", costly)
    monkeypatch.setattr(keys, "UNLOCK_BUDGET_SECONDS", 5.0)
    # a host that never opened it runs out of budget after a few keys, and says why
    with pytest.raises(PasswordError, match="35 key objects were not tried"):
        Repository.open(repo.backend, PASS, records=other_host(tmp_path))
    # this host tries the key that opened last from it first, whatever the budget
    clock[0] = 0.0
    assert Repository.open(repo.backend, PASS).key == repo.key
    assert clock[0] == 1.0
    # a key file's secret costs nothing to try: tried first, whatever the budget
    secret = os.urandom(32).hex().encode()
    keys.add_key(repo.backend, repo.key, secret, kind="keyfile")
    clock[0] = 0.0
    assert Repository.open(repo.backend, secret, records=other_host(tmp_path)).key == repo.key
    assert clock[0] == 0.0


# ---- key roles: the last full key ---------------------------------------------------------


def test_the_last_full_key_cannot_become_backup_only(repo: Repository) -> None:
    before = everything(repo.backend)
    with pytest.raises(RepositoryError, match="last key with full rights"):
        keys.replace_key(repo.backend, repo.key, current=repo.key_id, secret=b"backup host pass", role=keys.BACKUP_ONLY)
    assert everything(repo.backend) == before
    # with another full key it may
    keys.add_key(repo.backend, repo.key, b"second full passphrase")
    new_id = keys.replace_key(
        repo.backend, repo.key, current=repo.key_id, secret=b"backup host pass", role=keys.BACKUP_ONLY
    )
    assert {k.id: k.role for k in keys.list_keys(repo.backend)}[new_id] == keys.BACKUP_ONLY
    assert Repository.open(repo.backend, b"backup host pass").role == keys.BACKUP_ONLY


def test_the_last_full_key_cannot_be_removed(repo: Repository) -> None:
    backup_id = keys.add_key(repo.backend, repo.key, b"backup host pass", role=keys.BACKUP_ONLY)
    with pytest.raises(RepositoryError, match="last key with full rights"):
        keys.remove_key(repo.backend, repo.key_id, current=backup_id)
    # a planted object claiming "full" that cannot be parsed does not count as a full key
    plant_key(repo.backend, kdf_params={"memory_kib": 2**31, "iterations": 1, "lanes": 1})
    with pytest.raises(RepositoryError, match="last key with full rights"):
        keys.remove_key(repo.backend, repo.key_id, current=backup_id)
    assert Repository.open(repo.backend, PASS).role == keys.FULL


def test_a_new_key_that_does_not_read_back_never_replaces_the_key_in_use(tmp_path: Path) -> None:
    """`key passwd` adds the new key, then removes the one in use: had the storage kept other
    bytes, no key would open the repository any more. The new key is read back first."""
    backend = KeepsOtherBytes()
    repo = make_repo(backend)
    backend.garble, backend.prefix = True, "keys/"
    with pytest.raises(IntegrityError, match=r"read back: the storage does not keep .*; no key was removed"):
        keys.replace_key(backend, repo.key, current=repo.key_id, secret=b"new passphrase 1")
    with pytest.raises(IntegrityError, match="other bytes read back"):
        keys.add_key(backend, repo.key, b"another passphrase")
    backend.garble = False
    assert Repository.open(backend, PASS, records=other_host(tmp_path)).key_id == repo.key_id


def test_a_role_field_edited_in_storage_makes_the_key_unopenable(repo: Repository, tmp_path: Path) -> None:
    backup_id = keys.add_key(repo.backend, repo.key, b"backup host pass", role=keys.BACKUP_ONLY)
    raw = repo.backend.get(f"keys/{backup_id}")
    doc = json.loads(raw)
    del doc["role"]  # try to give it full rights back
    forged = json.dumps(doc).encode()
    repo.backend.put(f"keys/{hashlib.sha256(forged).hexdigest()}", forged)
    repo.backend.delete(f"keys/{backup_id}")
    with pytest.raises(PasswordError):
        Repository.open(repo.backend, b"backup host pass", records=other_host(tmp_path))


# ---- snapshots: withheld, deleted, rolled back, replayed -----------------------------------


def test_snapshots_this_host_wrote_that_vanish_are_reported_once(repo: Repository) -> None:
    snaps = [backup(repo, Content(files={"f": os.urandom(100)})) for _ in range(3)]
    assert Repository.open(repo.backend, PASS).warnings == []
    repo.backend.delete(f"snapshots/{snaps[2].id}")  # the storage withholds the newest
    warnings = Repository.open(repo.backend, PASS).warnings
    assert len(warnings) == 1 and "1 snapshots this host wrote are gone" in warnings[0]
    assert snaps[2].id[:8] in warnings[0]
    assert Repository.open(repo.backend, PASS).warnings == []


def test_a_rollback_to_an_older_copy_of_the_repository_is_reported(repo: Repository, tmp_path: Path) -> None:
    old_copy = tmp_path / "old"
    shutil.copytree(repo.backend.url, old_copy)
    for _ in range(2):
        backup(repo, Content(files={"f": os.urandom(100)}))
    shutil.rmtree(repo.backend.url)
    shutil.copytree(old_copy, repo.backend.url)
    # by a new command: this backend took the folder for replaced, unless it got the same inode
    warnings = Repository.open(LocalBackend(repo.backend.url), PASS).warnings
    assert any("2 snapshots this host wrote are gone" in w and "rolled back" in w for w in warnings)


def test_forget_from_this_host_is_not_reported_and_a_replay_is(repo: Repository) -> None:
    snap = backup(repo, Content(files={"f": os.urandom(100)}))
    sealed = repo.backend.get(f"snapshots/{snap.id}")
    repo.delete_snapshot(snap.id)
    assert Repository.open(repo.backend, PASS).warnings == []
    repo.backend.put(f"snapshots/{snap.id}", sealed)  # the storage puts the old object back
    warnings = Repository.open(repo.backend, PASS).warnings
    assert len(warnings) == 1 and "forgot are back" in warnings[0] and snap.id[:8] in warnings[0]
    Repository.open(repo.backend, PASS).delete_snapshot(snap.id)
    assert Repository.open(repo.backend, PASS).warnings == []


def test_a_concurrent_write_or_forget_on_this_host_is_not_a_false_alarm(repo: Repository) -> None:
    """The listing of one process and the writes of another interleave: what was recorded
    after the listing began is not judged by it."""
    doomed = backup(repo, Content(files={"f": os.urandom(100)}))
    observer = Repository.open(repo.backend, PASS)
    writer = Repository.open(repo.backend, PASS)
    listed = observer.snapshot_ids()

    def stale_listing() -> list[str]:
        # the other process writes one snapshot and forgets another after this listing
        backup(writer, Content(files={"g": os.urandom(100)}))
        writer.delete_snapshot(doomed.id)
        return listed

    observer.snapshot_ids = stale_listing  # type: ignore[method-assign]
    observer.warnings = []
    observer._check_history()
    assert observer.warnings == []
    del observer.snapshot_ids
    assert Repository.open(repo.backend, PASS).warnings == []


# ---- key files and passphrases given to vmvault (repo/secret.py) ---------------------------


def _bad_key_files(tmp_path: Path) -> dict[str, str]:
    files = {
        "empty": b"",
        "31 bytes": os.urandom(31).hex().encode()[:31],
        "all zeros": bytes(64),
        "all spaces": b" " * 64,
        "one letter": b"a" * 64,
        "two letters": b"ab" * 32,
        "too large": os.urandom(secret.MAX_SECRET_FILE + 1),
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(data)
        out[name] = str(path)
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: reading must not hang
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    out |= {
        "/dev/null": "/dev/null",
        "/dev/zero": "/dev/zero",
        "fifo": str(tmp_path / "fifo"),
        "folder": str(tmp_path / "folder"),
        "dangling link": str(tmp_path / "dangling"),
        "missing": str(tmp_path / "missing"),
    }
    return out


BAD_KEY_FILES = [
    "empty", "31 bytes", "all zeros", "all spaces", "one letter", "two letters", "too large",
    "/dev/null", "/dev/zero", "fifo", "folder", "dangling link", "missing",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_KEY_FILES)
def test_a_weak_or_odd_key_file_is_never_a_key(tmp_path: Path, kind: str) -> None:
    path = _bad_key_files(tmp_path)[kind]
    with pytest.raises(ConfigError) as info:
        secret.read_key_file(path)
    assert path in str(info.value)
    with pytest.raises(ConfigError):
        secret.given_secret(key_file=path, env="VMVAULT_PASSWORD")
    if kind not in ("missing", "dangling link"):
        with pytest.raises(ConfigError):  # an existing file is read, never replaced
            secret.key_file_secret(path)


def test_good_key_files(tmp_path: Path) -> None:
    made = tmp_path / "made.key"
    created = secret.key_file_secret(str(made))
    assert created.created and created.kind == secret.KEYFILE
    assert made.stat().st_mode & 0o777 == 0o600 and len(made.read_bytes()) == 65
    assert secret.read_key_file(str(made)) == created.value
    again = secret.key_file_secret(str(made))  # exists now: read, not recreated
    assert again.value == created.value and not again.created
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"k" + os.urandom(62) + b"k")
    assert secret.read_key_file(str(binary)) == binary.read_bytes()
    os.symlink(made, tmp_path / "link.key")  # a link to a good key file is fine to read
    assert secret.read_key_file(str(tmp_path / "link.key")) == created.value


def test_key_file_creation_never_follows_or_replaces(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    os.symlink(victim, tmp_path / "dangling")
    with pytest.raises(ConfigError, match="link to a missing file"):
        secret.create_key_file(str(tmp_path / "dangling"))
    assert not victim.exists()
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="it exists"):
        secret.create_key_file(str(existing))
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ConfigError, match="does not exist"):
        secret.create_key_file(str(tmp_path / "no" / "such" / "folder" / "k"))


@pytest.mark.parametrize(("value", "ok"), [("a", False), ("1234567", False), ("12345678", True), ("ÄÖÜäöüß€", True)])
def test_one_minimum_for_new_passphrases(value: str, ok: bool) -> None:
    if ok:
        secret.check_new_passphrase(value.encode(), source="test")
    else:
        with pytest.raises(ConfigError, match="at least 8"):
            secret.check_new_passphrase(value.encode(), source="test")


def test_password_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"  spaces count  \r\n")
    assert secret.read_password_file(str(f)) == b"  spaces count  "
    for path in ("/dev/null", str(tmp_path / "empty")):
        Path(tmp_path / "empty").write_bytes(b"\n")
        with pytest.raises(ConfigError, match="empty"):
            secret.read_password_file(path)
    with pytest.raises(ConfigError, match="larger than 64 KiB"):
        secret.read_password_file("/dev/zero")
    # a pipe (--password-file <(pass show x)) is read to its end
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"from a pipe\n")
    os.close(write_fd)
    try:
        assert secret.read_password_file(f"/proc/self/fd/{read_fd}") == b"from a pipe"
    finally:
        os.close(read_fd)
    # precedence: key file, password file, environment; an empty variable is unset
    monkeypatch.setenv("PW_VAR", "")
    assert secret.given_secret(env="PW_VAR") is None
    monkeypatch.setenv("PW_VAR", "from the environment")
    given = secret.given_secret(password_file=str(f), env="PW_VAR")
    assert given is not None and given.value == b"  spaces count  " and given.kind == secret.PASSPHRASE


def test_a_repository_made_with_a_weak_key_file_can_still_be_moved_to_a_good_one(tmp_path: Path) -> None:
    """Section 6: an older vmvault accepted weak key files. Given as a password file, the same
    secret still opens (the key object decides how it is used); then the key is replaced."""
    weak = tmp_path / "weak.key"
    weak.write_bytes(b"guessable\n")
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"guessable", key_kind="keyfile")
    with pytest.raises(ConfigError, match="holds 9 bytes"):
        secret.read_key_file(str(weak))
    opened = Repository.open(repo.backend, secret.read_password_file(str(weak)))
    good = secret.key_file_secret(str(tmp_path / "good.key"))
    keys.replace_key(opened.backend, opened.key, current=opened.key_id, secret=good.value, kind=good.kind)
    assert Repository.open(repo.backend, secret.read_key_file(str(tmp_path / "good.key"))).key == repo.key
    with pytest.raises(PasswordError):
        Repository.open(repo.backend, b"guessable")
