"""Names from the storage or a VM folder never drive the terminal.

A snapshot whose VM name, disk and file names, tags, host and warnings carry ESC sequences
(colour, title, clear screen, OSC 8 links), CR, BEL, backspace, C1 controls and bidi
overrides: every human-readable line vmvault prints about it (tables, show, backup and
restore summaries, check findings, warnings, errors, progress bars, log lines) holds only
printable characters and newlines; the JSON output keeps every name exact.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from vmvault.backends.local import LocalBackend
from vmvault.cli import main
from vmvault.cli._terminal import install_log_handler, terminal_safe
from vmvault.cli.progress import QuietReporter, TerminalReporter
from vmvault.engine.backup import backup
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository

ESC_COLOUR = "\x1b[31m"
ESC_TITLE = "\x1b]0;owned\x07"
ESC_CLEAR = "\x1b[2J\x1b[H"
OSC_LINK = "\x1b]8;;evil.invalid\x1b\\"
CSI_C1 = "\x9b2J"  # the 8-bit CSI
RLO = "\u202e"  # right-to-left override

VM_NAME = f"web{ESC_TITLE}01{RLO}"
DISK_NAME = f"{ESC_CLEAR}sys{RLO}gpj.raw"
FILE_NAME = f"nv\rram\x08\x7f{CSI_C1}.bin"
CONF_NAME = f"{OSC_LINK}vm.conf"
TAG = f"night{ESC_COLOUR}ly\u2066"
HOST = f"host\r{ESC_COLOUR}evil"
WARNING = f"disk skipped\rall good{ESC_CLEAR}\u2028fake line"
NASTY = [VM_NAME, DISK_NAME, FILE_NAME, CONF_NAME, TAG, HOST, WARNING]


def assert_inert(text: str) -> None:
    """Only printable characters and line breaks: nothing a terminal acts on."""
    bad = sorted({c for c in text if not (c.isprintable() or c == "\n")})
    assert not bad, f"{bad!r} reached the terminal in:\n{text!r}"


# ---- the function ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain name.vhdx", "plain name.vhdx"),
        ("Ünïcødé 日本 ✓", "Ünïcødé 日本 ✓"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\rb\tc\nd", "a\\rb\\tc\\nd"),
        ("\x00\x07\x08\x7f", "\\x00\\x07\\x08\\x7f"),
        ("\x9b2J\x85", "\\x9b2J\\x85"),
        ("exe\u202egpj", "exe\\u202egpj"),
        ("\u2066a\u2069\u200f\u061c", "\\u2066a\\u2069\\u200f\\u061c"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("bad\udcffutf8", "bad\\udcffutf8"),  # a lone surrogate from an undecodable file name
        ("tag\U000e0041", "tag\\U000e0041"),  # Unicode tag characters hide text
        ("nbsp\xa0", "nbsp\\xa0"),
    ],
)
def test_terminal_safe(raw: str, shown: str) -> None:
    assert terminal_safe(raw) == shown
    assert terminal_safe(shown) == shown  # escaping twice changes nothing
    assert_inert(terminal_safe(raw))


def test_newlines_kept_only_when_asked() -> None:
    assert terminal_safe("a\nb\x1b", newlines=True) == "a\nb\\x1b"
    assert terminal_safe("a\nb") == "a\\nb"


# ---- a snapshot full of escape sequences, through the real commands ----------------------------------


@pytest.fixture
def nasty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A repository holding a backup of a VM folder with hostile names, and a snapshot whose
    tags, host, user and warnings (as the storage could hold them) are hostile too."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    vm = tmp_path / VM_NAME
    vm.mkdir()
    (vm / DISK_NAME).write_bytes(os.urandom(3 << 16))
    (vm / FILE_NAME).write_bytes(b"nvram")
    (vm / CONF_NAME).write_text("name = web01\n")
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"correct horse", chunk_size=1 << 16)
    snap = backup(repo, FilesSource(str(vm)), tags=[TAG]).snapshot
    original = snap.id
    snap.hostname = HOST
    snap.username = f"root{ESC_COLOUR}"
    snap.warnings = [WARNING]
    snap.vm = dict(snap.vm, id=f"id{CSI_C1}")
    forged = repo.save_snapshot(snap)
    repo.delete_snapshot(original)
    assert repo.snapshot_ids() == [forged]
    return vm, forged


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_listing_and_show_print_no_control_characters(
    nasty: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _vm, snap_id = nasty
    code, out, err = run(capsys, "snapshots")
    assert code == 0
    assert_inert(out + err)
    assert terminal_safe(VM_NAME) in out and terminal_safe(TAG) in out and terminal_safe(HOST) in out
    assert out.count("\n") == 4  # header, rule, one row, count: no name started a line of its own

    code, out, err = run(capsys, "show", snap_id[:8])
    assert code == 0
    assert_inert(out + err)
    for name in (VM_NAME, DISK_NAME, FILE_NAME, CONF_NAME, TAG, HOST, WARNING):
        assert terminal_safe(name) in out, name
    # every line is one vmvault wrote: the warning's CR and U+2028 did not start new ones
    own = re.compile(r"(snapshot |  |$|\d+ (disks?|files?|warnings?):$)")
    assert all(own.match(line) for line in out.splitlines()), out


def test_json_output_keeps_names_exact(nasty: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    _vm, snap_id = nasty
    code, out, _err = run(capsys, "show", snap_id, "--json")
    assert code == 0
    assert out.isascii()  # JSON escapes: inert on any terminal
    doc = json.loads(out)
    assert doc["vm"]["name"] == VM_NAME and doc["tags"] == [TAG] and doc["hostname"] == HOST
    assert {d["name"] for d in doc["disks"]} == {DISK_NAME}
    assert {f["name"] for f in doc["files"]} == {FILE_NAME, CONF_NAME}
    assert doc["warnings"] == [WARNING]
    code, out, _err = run(capsys, "snapshots", "--json")
    assert json.loads(out)[0]["tags"] == [TAG]


def test_backup_restore_and_check_print_no_control_characters(
    nasty: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    vm, snap_id = nasty
    code, out, err = run(capsys, "backup", str(vm))
    assert code == 0, err
    assert_inert(out + err)
    assert terminal_safe(VM_NAME) in out

    code, out, err = run(capsys, "restore", snap_id[:8], "--target", str(tmp_path / "out"))
    assert code == 0, err
    assert_inert(out + err)
    assert terminal_safe(DISK_NAME) in out
    assert (tmp_path / "out" / DISK_NAME).read_bytes() == (vm / DISK_NAME).read_bytes()

    # damage: check names every file and disk the lost pack held
    packs = [p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()]
    for p in packs:
        p.unlink()
    code, out, err = run(capsys, "check")
    assert code == 3
    assert_inert(out + err)
    assert terminal_safe(DISK_NAME) in out and terminal_safe(FILE_NAME) in out
    for line in out.splitlines():  # each finding is one line vmvault composed
        assert (
            line.startswith(
                ("checked ", "error: ", "warning: ", "    affects ", "no errors", "ways out: ", f"{len(packs)}")
            )
            or re.match(r"  (\d+ |read |no other process)", line)
            or ("errors; damaged snapshots" in line)
        ), line


def test_copy_prints_source_locations_escaped(
    nasty: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _vm, snap_id = nasty
    Repository.init(LocalBackend(str(tmp_path / "copy")), b"other horse", chunk_size=1 << 16)
    monkeypatch.setenv("VMVAULT_FROM_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_PASSWORD", "other horse")
    code, out, err = run(capsys, "copy", "--from", str(tmp_path / "repo"), "--to", str(tmp_path / "copy"))
    assert code == 0, err
    assert_inert(out + err)
    (line,) = [x for x in out.splitlines() if x.startswith(f"  {snap_id[:8]} -> ")]
    assert line.endswith(terminal_safe(str(tmp_path / VM_NAME)))


def test_errors_quoting_names_are_one_escaped_line(
    nasty: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    vm, _snap_id = nasty
    code, out, err = run(capsys, "disk", "info", str(vm / f"missing{ESC_CLEAR}\nvmvault: all fine{RLO}.vhdx"))
    assert code != 0
    assert_inert(out + err)
    assert err.count("\n") == 1 and err.startswith("vmvault: error: ")
    shutil.rmtree(vm)
    code, out, err = run(capsys, "backup", str(vm))
    assert code != 0
    assert_inert(out + err)
    assert terminal_safe(VM_NAME) in err and err.count("\n") == 1


def test_progress_labels_and_warnings_are_escaped() -> None:
    stream = io.StringIO()
    bar = TerminalReporter(stream)
    bar.start(DISK_NAME, 100)
    bar.advance(50)
    bar.warn(WARNING)
    bar.finish()
    drawn = stream.getvalue().replace("\r\x1b[K", "")  # the bar's own redraw sequence
    assert_inert(drawn)
    assert "gpj.raw" in drawn and terminal_safe(WARNING) in drawn

    quiet = io.StringIO()
    QuietReporter(quiet).warn(WARNING)
    assert quiet.getvalue() == f"warning: {terminal_safe(WARNING)}\n"


def test_log_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    install_log_handler()
    install_log_handler()  # once only
    logging.getLogger("vmvault.backends.test").warning("retrying %s", FILE_NAME)
    err = capsys.readouterr().err
    assert err == f"vmvault: retrying {terminal_safe(FILE_NAME)}\n"


def test_audit_prints_vm_folder_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disks = tmp_path / VM_NAME / "Virtual Hard Disks"
    disks.mkdir(parents=True)
    (disks / f"orphan{ESC_CLEAR}{RLO}.avhdx").write_bytes(b"not a disk")
    code, out, err = run(capsys, "audit", str(tmp_path))
    assert code == 3  # no configuration: a problem, named with the VM
    assert_inert(out + err)
    assert f"  {terminal_safe(VM_NAME)}: configuration unreadable" in out
    code, out, _err = run(capsys, "audit", str(tmp_path), "--json")
    assert json.loads(out)["vms"][0]["name"] == VM_NAME
