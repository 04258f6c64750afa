"""Without the libvirt binding, a libvirt source is one line naming the install command, exit 2;
with only Debian's python3-libvirt, it is loaded for our Python; locations parse strictly."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main
from vmvault.errors import ConfigError
from vmvault.hypervisors import _debian
from vmvault.hypervisors.libvirt import _OWNER_FILE, INSTALL_HINT, _read_owner, import_libvirt, parse_location


def test_missing_binding_is_one_line_with_the_install_command_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt raises ImportError
    monkeypatch.setattr(_debian, "DIST_PACKAGES", str(tmp_path))  # and no Debian module either
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    repo = str(tmp_path / "repo")
    assert main(["init", "-q", "-r", repo]) == 0
    capsys.readouterr()
    code = main(["backup", "-r", repo, "libvirt:///web01"])
    err = capsys.readouterr().err
    assert code == EXIT["usage"] == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install libvirt-python" in lines[0] and "Traceback" not in err
    with pytest.raises(ConfigError, match="libvirt-python"):
        import_libvirt()
    assert "apt-get install python3-libvirt" in INSTALL_HINT


def test_debian_binding_is_loaded_for_our_python(monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists(os.path.join(_debian.DIST_PACKAGES, "libvirt.py")):
        pytest.skip("Debian's python3-libvirt is not installed")
    if not any(
        f.startswith(f"libvirtmod.cpython-{sys.version_info[0]}{sys.version_info[1]}")
        for f in os.listdir(_debian.DIST_PACKAGES)
    ):
        pytest.skip("Debian's python3-libvirt is built for another Python version")
    for name in ("libvirt", "libvirtmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    module = import_libvirt()
    assert module.__file__ is not None and hasattr(module, "virConnect")
    assert not [
        p for p in os.listdir("/tmp") if p.startswith("vmvault-libvirt-") and not os.listdir(os.path.join("/tmp", p))
    ]


@pytest.mark.parametrize(
    ("spec", "domain", "uri", "exclude"),
    [
        ("libvirt:///web01", "web01", None, set()),
        ("libvirt:///", None, None, set()),
        ("libvirt:///db%20one?uri=qemu%2Bssh%3A%2F%2Froot%40h%2Fsystem", "db one", "qemu+ssh://root@h/system", set()),
        ("libvirt:///w?exclude=vdb,vdc", "w", None, {"vdb", "vdc"}),
    ],
)
def test_locations(spec: str, domain: str | None, uri: str | None, exclude: set[str]) -> None:
    loc = parse_location(spec)
    assert (loc.domain, loc.uri, set(loc.exclude)) == (domain, uri, exclude)


@pytest.mark.parametrize(
    "spec", ["libvirt://host/web", "libvirt:///a/b", "libvirt:///w?bogus=1", "libvirt:///w?uri=", "qemu:///w"]
)
def test_bad_locations(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_location(spec)


def test_an_owner_file_that_is_not_a_file_is_no_owner(tmp_path: Path) -> None:
    """A scratch folder may be QEMU's, and what runs in QEMU may put a FIFO or a link under the
    owner file's name: the sweep of the next backup read it, and hung for ever on the FIFO."""
    fine, fifo, link = (tmp_path / n for n in ("fine", "fifo", "link"))
    for folder in (fine, fifo, link):
        folder.mkdir()
    (fine / _OWNER_FILE).write_text("host1\n1234\nuuid-1\n")
    os.mkfifo(fifo / _OWNER_FILE)
    (link / _OWNER_FILE).symlink_to(fine / _OWNER_FILE)
    assert _read_owner(str(fine)) == ("host1", 1234, "uuid-1")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(_read_owner, str(fifo)).result(timeout=10) is None
    assert _read_owner(str(link)) is None
    assert _read_owner(str(tmp_path / "missing")) is None


def test_tpm_state_is_walked_without_leaving_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """swtpm's user owns a domain's TPM state folder: whatever runs as that user (swtpm taken
    over) can put links there and swap its folders for links during the walk. Only the state's
    own regular files are stored; a folder swapped for a link after the walk saw it is named,
    never entered (``os.walk``, used before, looks for a link and then lists the folder by
    name: a swap between the two went where the link led)."""
    import xml.etree.ElementTree as ET

    from vmvault.hypervisors import libvirt as lv
    from vmvault.hypervisors import walk

    uuid = "6b0c6f4e-6d1e-4a4b-9a51-3f7c1c7c0a01"
    state, outside = tmp_path / "swtpm", tmp_path / "outside"
    (state / uuid / "tpm2").mkdir(parents=True)
    (state / uuid / "tpm2" / "tpm2-00.permall").write_bytes(b"permall")
    (state / uuid / "tpm2" / "lock").mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    os.symlink(outside / "secret", state / uuid / "tpm2" / "linked")
    monkeypatch.setattr(lv, "SWTPM_STATE", str(state))
    session = lv.LibvirtSession.__new__(lv.LibvirtSession)
    session.files, session.warnings, session._uuid = [], [], uuid
    live = ET.fromstring("<domain><devices><tpm><backend type='emulator'/></tpm></devices></domain>")
    list_folder = walk.platform.list_folder

    def list_then_swap(path: str, seen: os.stat_result | None = None, *, limit: int | None = None) -> object:
        listed = list_folder(path, seen, limit=limit)
        if path == str(state / uuid / "tpm2"):  # "lock" was seen as a folder: now a link
            os.rmdir(state / uuid / "tpm2" / "lock")
            os.symlink(outside, state / uuid / "tpm2" / "lock")
        return listed

    monkeypatch.setattr(walk.platform, "list_folder", list_then_swap)
    session._add_state_files(live)
    assert [f.name for f in session.files] == ["tpm/tpm2/tpm2-00.permall"]
    opened = session.files[0].open()
    assert opened is not None and opened.read() == b"permall"
    opened.close()
    assert session.warnings == [f"{state / uuid / 'tpm2' / 'lock'}: cannot list: is a link (not followed)"]
