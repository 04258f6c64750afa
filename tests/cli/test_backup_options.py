"""``vmvault backup`` flags become one ``BackupOptions``: exclusions, scratch folder, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct-horse-1")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "vm.raw").write_bytes(b"d" * 65536)
    (vm / "vm.conf").write_text("name=vm\n")
    (vm / "install.iso").write_bytes(b"i" * 1000)
    assert main(["init", "-q"]) == 0
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_exclude_leaves_out_what_it_names_and_says_so(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "backup", str(env / "vm"), "--exclude", "*.iso", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["excluded"] == ["install.iso"]
    code, out, _err = run(capsys, "show", "latest", "--json")
    assert [f["name"] for f in json.loads(out)["files"]] == ["vm.conf"]
    code, out, _err = run(capsys, "backup", str(env / "vm"), "--exclude", "*.conf", "--exclude", "*.iso")
    assert code == 0 and "excluded: install.iso, vm.conf" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--scratch-dir", "/tmp"),
            "--scratch-dir (scratch_dir) applies to running QEMU VMs and libvirt domains, not to VM folders",
        ),
        (("--exclude", "*"), "leave nothing to back up"),
        (("--exclude", "a\x07b"), "exclude pattern"),
    ],
)
def test_options_that_cannot_apply_are_one_line_usage_errors(
    env: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, _out, err = run(capsys, "backup", str(env / "vm"), *args)
    assert code == EXIT["usage"] and message in err and len(err.strip().splitlines()) == 1
    code, out, _err = run(capsys, "snapshots", "--json")
    assert json.loads(out) == []


def test_every_source_is_checked_before_the_first_is_read(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "backup", str(env / "vm"), "vmware://esx/web")
    assert code == EXIT["usage"] and "unknown source 'vmware://esx/web'" in err
    code, out, _err = run(capsys, "snapshots", "--json")
    assert json.loads(out) == []


def test_help_lists_the_connectors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["backup", "--help"])
    out = capsys.readouterr().out
    assert "qemu+unix://" in out and "hyperv://[HOST]/VM" in out and "hyperv-lab" not in out
