"""VMCX/VMRS and XML configuration reading.

No real VMCX file is available here, so ``build_vmcx`` (``vmvault.testing.hyperv_host``)
writes a container in the layout vhdx-format.md Appendix B documents (headers with CRC-32,
object table at 0x2000, key tables with typed entries, file objects for values of 0x800
bytes and more). The reader must give back the tree it was built from and fail with
FormatError on damage.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import FormatError
from vmvault.hypervisors._vmcx import (
    IDE_CONTROLLER,
    SCSI_CONTROLLER,
    VmConfig,
    parse_config,
    parse_vmcx,
    parse_xml_config,
    render_xml_config,
)
from vmvault.hypervisors.hyperv_model import discover
from vmvault.testing.hyperv_host import KEY_TABLE_OFFSET, build_vmcx

SCSI_INSTANCE = "4E7D5B2A-1C3F-4A6B-8D9E-0F1A2B3C4D5E"
IDE_INSTANCE = "9A8B7C6D-5E4F-4321-8765-43210FEDCBA9"


def sample_tree(long_path: bool = False) -> dict[str, Any]:
    disk = "C:\\Disks\\Default Generation 2.vhdx"
    if long_path:
        disk = "C:\\" + "deep\\" * 300 + "web.vhdx"
    return {
        "configuration": {
            "properties": {"name": "web01", "subtype": 1, "creation_time": struct.pack("<Q", 133_000_000_000_000_000)},
            "manifest": {
                "vdev000": {"device": SCSI_CONTROLLER, "instance": SCSI_INSTANCE},
                "vdev001": {"device": IDE_CONTROLLER, "instance": IDE_INSTANCE},
                "vdev002": {"device": "00000000-0000-0000-0000-000000000000", "instance": "1111"},
            },
            f"_{SCSI_INSTANCE}_": {
                "controller0": {
                    "drive0": {"type": "VHD", "pathname": disk},
                    "drive1": {"type": "ISO", "pathname": "C:\\iso\\setup.iso"},
                    "drive2": {"type": "VHD", "pathname": "D:\\data.vhdx"},
                }
            },
            f"_{IDE_INSTANCE}_": {"controller1": {"drive0": {"type": "NONE", "pathname": ""}}},
            "settings": {"memory": {"bank": {"size": 4096, "dynamic_memory_enabled": True, "weight": -5}}},
        }
    }


def test_round_trip_and_vm_facts() -> None:
    tree = sample_tree()
    assert parse_vmcx(build_vmcx(tree)) == tree
    cfg = VmConfig.from_tree(tree, file_name="5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.vmcx")
    assert cfg.name == "web01" and cfg.generation == 2
    assert cfg.vm_id == "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11"
    assert [(d.slot, d.pathname) for d in cfg.disks] == [
        ("scsi0:0", "C:\\Disks\\Default Generation 2.vhdx"),
        ("scsi0:2", "D:\\data.vhdx"),
    ]
    assert cfg.creation_time is not None and 2022 < 1970 + cfg.creation_time / 31_557_600 < 2023


def test_large_values_live_in_file_objects() -> None:
    tree = sample_tree(long_path=True)
    data = build_vmcx(tree)
    assert parse_vmcx(data) == tree


@given(
    st.recursive(
        st.one_of(
            st.text(max_size=40),
            st.integers(-(2**63), 2**64 - 1),
            st.booleans(),
            st.binary(max_size=40),
            st.floats(allow_nan=False),
        ),
        lambda children: st.dictionaries(
            st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=8), children, max_size=4
        ),
        max_leaves=20,
    ).filter(lambda v: isinstance(v, dict))
)
@settings(max_examples=60, deadline=None)
def test_any_tree_round_trips(tree: dict[str, Any]) -> None:
    # strings lose trailing NULs (Hyper-V pads some); keep them out of the comparison
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v.rstrip("\0") if isinstance(v, str) else v

    tree = clean(tree)
    assert parse_vmcx(build_vmcx(tree, large=64)) == tree


def test_active_header_is_the_valid_one_with_the_higher_sequence() -> None:
    tree = sample_tree()
    assert parse_vmcx(build_vmcx(tree, seqs=(9, 3))) == tree
    assert parse_vmcx(build_vmcx(tree, seqs=(3, 9), bad_header=1)) == tree  # falls back to header 0
    with pytest.raises(FormatError, match="CRC-32"):
        parse_vmcx(build_vmcx(tree, bad_header=-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"version": 0x300}, "version"), ({"dirty_log": True}, "unreplayed")],
)
def test_refused_containers(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_vmcx(build_vmcx(sample_tree(), **kwargs))


def test_not_a_container_and_truncation() -> None:
    with pytest.raises(FormatError, match="not a HyperVStorage"):
        parse_vmcx(b"\0" * 0x3000)
    data = build_vmcx(sample_tree())
    with pytest.raises(FormatError):
        parse_vmcx(data[:0x2004])
    with pytest.raises(FormatError):
        parse_vmcx(data[: KEY_TABLE_OFFSET + 40])


def test_byte_flips_give_format_error_or_a_tree() -> None:
    data = build_vmcx(sample_tree(long_path=True))
    rng = random.Random(1)
    interesting = (
        list(range(0, 0x2E))
        + list(range(0x2000, 0x2000 + 8 + 3 * 18))
        + list(range(KEY_TABLE_OFFSET, KEY_TABLE_OFFSET + 2000))
    )
    for _ in range(1500):
        pos = rng.choice(interesting)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        try:
            tree = parse_vmcx(bytes(flipped))
        except FormatError:
            continue
        assert isinstance(tree, dict)


def test_xml_configuration() -> None:
    tree = {
        "configuration": {
            "properties": {"name": "old-vm", "subtype": 0, "global_id": "0B5D2C4E-1111-4A2B-8C3D-4E5F60718293"},
            "manifest": {"vdev000": {"device": IDE_CONTROLLER, "instance": IDE_INSTANCE}},
            f"_{IDE_INSTANCE}_": {"controller0": {"drive0": {"type": "VHD", "pathname": "C:\\VMs\\old.vhd"}}},
            "flags": {"secure": False, "blob": b"\x01\x02"},
        }
    }
    data = render_xml_config(tree)
    assert data.startswith(b"\xff\xfe")  # UTF-16 with a BOM, as Hyper-V 2012 R2 wrote it
    assert parse_xml_config(data) == tree
    cfg = VmConfig.from_tree(parse_xml_config(data))
    assert cfg.generation == 1 and cfg.vm_id == "0B5D2C4E-1111-4A2B-8C3D-4E5F60718293"
    assert [d.slot for d in cfg.disks] == ["ide0:0"]
    with pytest.raises(FormatError, match="not well-formed"):
        parse_xml_config(b"<configuration><a>")


def test_damaged_config_falls_back_to_the_disk_files(tmp_path: Path) -> None:
    vm = tmp_path / "web"
    (vm / "Virtual Machines").mkdir(parents=True)
    (vm / "Virtual Hard Disks").mkdir()
    data = bytearray(build_vmcx(sample_tree()))
    data[KEY_TABLE_OFFSET] ^= 0xFF  # key table signature
    (vm / "Virtual Machines" / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.vmcx").write_bytes(bytes(data))
    base = vm / "Virtual Hard Disks" / "web.vhdx"
    create_vhdx(str(base), 8 << 20).close()
    child = vm / "Virtual Hard Disks" / "web_1B2C.avhdx"
    create_vhdx(str(child), 0, parent=str(base)).close()
    with pytest.raises(FormatError, match="key table"):
        parse_config(str(vm / "Virtual Machines" / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.vmcx"))
    model = discover(str(vm))
    assert model.config_error is not None and "key table" in model.config_error
    assert any("discovered from the files" in w for w in model.warnings)
    assert list(model.current.values()) == [str(child)]
    assert model.chain(str(child)) == [str(base), str(child)]


def test_vmcx_config_drives_the_model(tmp_path: Path) -> None:
    vm = tmp_path / "web01"
    (vm / "Virtual Machines").mkdir(parents=True)
    (vm / "Virtual Hard Disks").mkdir()
    create_vhdx(str(vm / "Virtual Hard Disks" / "Default Generation 2.vhdx"), 8 << 20).close()
    create_vhdx(str(vm / "Virtual Hard Disks" / "data.vhdx"), 8 << 20).close()
    create_vhdx(str(vm / "Virtual Hard Disks" / "leftover.vhdx"), 8 << 20).close()
    (vm / "Virtual Machines" / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.vmcx").write_bytes(build_vmcx(sample_tree()))
    model = discover(str(vm))
    assert model.config_error is None and model.name == "web01" and model.generation == 2
    assert sorted(model.current) == ["scsi0:0", "scsi0:2"]
    assert [Path(p).name for p in model.orphans()] == ["leftover.vhdx"]


def test_chained_object_tables_are_followed() -> None:
    """An object-table entry of type 1 names the next object table (large files have several):
    key tables listed only there are read, a loop or a bad table is a FormatError."""
    tree = sample_tree()
    assert parse_vmcx(build_vmcx(tree, chain="ok")) == tree
    with pytest.raises(FormatError, match="loops"):
        parse_vmcx(build_vmcx(tree, chain="loop"))
    with pytest.raises(FormatError, match="bad signature"):
        parse_vmcx(build_vmcx(tree, chain="bad"))
