"""The connector registry: one table dispatches sources, restore steps, audits and options."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vmvault.errors import ConfigError, MissingDependencyError
from vmvault.hypervisors import registry
from vmvault.hypervisors.base import CONNECTOR_OPTIONS, BackupOptions, Source
from vmvault.hypervisors.registry import (
    CONNECTORS,
    Connector,
    check_options,
    connector_for,
    connector_for_kind,
    describe,
    open_source,
)


def test_the_table_is_consistent() -> None:
    schemes = [s for c in CONNECTORS for s in c.schemes]
    kinds = [k for c in CONNECTORS for k in c.kinds]
    assert len(schemes) == len(set(schemes)), "a scheme answered by two connectors"
    assert len(kinds) == len(set(kinds)), "a snapshot kind owned by two connectors"
    assert [c.name for c in CONNECTORS if not c.schemes] == ["files"], "exactly one connector takes plain paths"
    for c in CONNECTORS:
        assert c.options <= CONNECTOR_OPTIONS, f"{c.name} lists an option that is not connector-specific"
        assert all(s == s.lower() and "://" not in s for s in c.schemes)
        assert (c.audit is None) == (not c.audit_usage), f"{c.name}: audit and audit_usage go together"


@pytest.mark.parametrize("connector", CONNECTORS, ids=lambda c: c.name)
def test_every_reference_resolves_to_a_callable(connector: Connector) -> None:
    for ref in (connector.source, connector.after_restore, connector.audit):
        if ref is None:
            continue
        target = connector.load(ref)
        assert callable(target), ref
    restore_hook = connector.after_restore and connector.load(connector.after_restore)
    if restore_hook:
        assert list(inspect.signature(restore_hook).parameters) == ["restored"]
    if connector.audit:
        assert list(inspect.signature(connector.load(connector.audit)).parameters)[:2] == ["target", "now"]


def test_sources_go_to_their_connector(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    (tmp_path / "lab").mkdir()
    cases = {
        str(image): "files",
        f"qemu+unix://{tmp_path}/vm.qmp": "qemu",
        "QEMU+UNIX:///run/vm.qmp": "qemu",  # schemes are case-blind, like URLs
        "hyperv:///web01": "hyperv",
        f"hyperv-lab://{tmp_path}/lab/web": "hyperv-lab",
    }
    for spec, name in cases.items():
        assert connector_for(spec).name == name, spec
    for spec in (str(image), f"qemu+unix://{tmp_path}/vm.qmp", "hyperv:///web01", f"hyperv-lab://{tmp_path}/lab/web"):
        source = open_source(spec)
        assert isinstance(source, Source)
        connector = connector_for_kind(source.kind)
        assert connector is not None and connector is connector_for(spec)


def test_an_unknown_scheme_is_one_line_naming_every_kind_of_source() -> None:
    with pytest.raises(ConfigError) as err:
        open_source("vmware://esx1/web")
    text = str(err.value)
    assert "\n" not in text and "vmware://esx1/web" in text
    for c in CONNECTORS:
        assert c.usage in text
    assert connector_for_kind("vmware") is None


def test_connector_options_are_refused_where_they_mean_nothing(tmp_path: Path) -> None:
    files = connector_for(str(tmp_path))
    qemu = connector_for("qemu+unix:///x")
    with pytest.raises(
        ConfigError, match=r"--scratch-dir \(scratch_dir\) applies to running QEMU VMs and libvirt domains, not to VM"
    ):
        check_options(files, BackupOptions(scratch_dir="/tmp"), str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"--allow-parent-dir \(allow_parent_dirs\) applies to VM folders and image files, and libvirt "
        r"domains; --follow-links \(follow_links\) applies to VM folders and image files, not to running QEMU VMs$",
    ):
        check_options(qemu, BackupOptions(allow_parent_dirs=("/srv",), follow_links=True), "qemu+unix:///x")
    # options for every source, and an option a connector lists, pass
    general = BackupOptions(allow_crash_consistent=True, exclude=("*.iso",), full=True)
    for c in CONNECTORS:
        check_options(c, general, "x")
        check_options(c, replace(general, scratch_dir="/tmp") if "scratch_dir" in c.options else general, "x")
    with pytest.raises(ConfigError, match="applies to VM folders and image files"):
        open_source("qemu+unix:///x", BackupOptions(follow_links=True))


def test_a_missing_optional_package_is_one_line_with_the_install_command() -> None:
    fake = Connector(
        name="example",
        noun="example VMs",
        schemes=("example",),
        kinds=("example",),
        usage="example://VM",
        summary="an example",
        source="vmvault_missing_binding_for_tests.connector:open_source",
        extra="example",
    )
    with pytest.raises(MissingDependencyError) as err:
        fake.load(fake.source)
    text = str(err.value)
    assert "\n" not in text and err.value.module == "vmvault_missing_binding_for_tests"
    assert text.startswith("the example connector (example://VM) needs the Python package vmvault_missing_binding")
    assert "'vmvault[example]'" in text
    # a module of vmvault itself that is missing is a bug, not an install problem: not disguised
    broken = replace(fake, source="vmvault.hypervisors.no_such_connector:open_source")
    with pytest.raises(ModuleNotFoundError):
        broken.load(broken.source)


def test_a_connector_module_that_cannot_be_imported_is_reported_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmvault.cli import EXIT, main

    missing = Connector(
        name="example",
        noun="example VMs",
        schemes=("example",),
        kinds=("example",),
        usage="example://VM",
        summary="an example",
        source="vmvault_missing_binding_for_tests:open_source",
        extra="example",
    )
    monkeypatch.setattr(registry, "CONNECTORS", (*CONNECTORS, missing))
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    repo = str(tmp_path / "repo")
    assert main(["-r", repo, "init", "-q"]) == 0
    capsys.readouterr()
    assert main(["-r", repo, "backup", "example://vm1"]) == EXIT["usage"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "vmvault[example]" in err


def test_connectors_are_imported_only_when_used(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    code = (
        "import contextlib, sys\n"
        "from vmvault.hypervisors import open_source\n"
        f"open_source({str(image)!r})\n"
        "import vmvault.automation.runner, vmvault.engine.clone\n"
        "from vmvault.cli import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"  # builds every command's parser
        "print(sorted(m for m in sys.modules if m.startswith(('vmvault.hypervisors.qemu', "
        "'vmvault.hypervisors.hyperv', 'vmvault.hypervisors._', 'vmvault.testing'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_help_texts_come_from_the_registry() -> None:
    text = describe()
    for c in CONNECTORS:
        assert (c.usage in text) != c.demo, c.name  # demo machinery is left out of help
    audit_text = describe(audit=True)
    assert "hyperv://[HOST]" in audit_text and "qemu+unix" not in audit_text


def test_the_heartbeat_names_kept_apart_for_lazy_imports_are_the_engines() -> None:
    """The command line and the daemon's configuration name verify-boot's heartbeats without
    importing the engine module (it loads the QEMU connector); they must say the same."""
    from vmvault.automation import config
    from vmvault.cli import verify_boot as cli_verify_boot
    from vmvault.engine import verify_boot

    assert cli_verify_boot.HEARTBEATS == verify_boot.HEARTBEATS
    assert config._HEARTBEATS == verify_boot.HEARTBEATS
