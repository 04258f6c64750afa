"""VMCX/VMRS and XML configuration reading.

No real VMCX file is available here, so ``build_vmcx`` (``vmvault.testing.hyperv_host``)
writes a container in the layout vhdx-format.md Appendix B documents (headers with CRC-32,
object table at 0x2000, key tables with typed entries, file objects for values of 0x800
bytes and more). The reader must give back the tree it was built from and fail with
FormatError on damage.
"""

from __future__ import annotations

import itertools
import random
import struct
import zlib
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import cpu_time_limit
from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import FormatError
from vmvault.hypervisors._vmcx import (
    IDE_CONTROLLER,
    KEY_TABLE,
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


# ---------------------------------------------------------------------------------------- fuzzing
# A VM folder is untrusted: its configuration may be damaged or made by an attacker. Whatever
# its bytes, reading it (parse_config, then VmConfig.from_tree, as hyperv_model.discover does)
# gives a tree or a FormatError, within a bounded amount of CPU time.

#: CPU seconds one mutant may take (a real configuration reads in milliseconds)
FUZZ_CPU_LIMIT = 5.0


def _key_entries(data: bytes) -> list[int]:
    """Offsets, relative to the key table, of the entries build_vmcx wrote."""
    table = data[KEY_TABLE_OFFSET:]
    out, pos = [], KEY_TABLE.size
    while True:
        (esize,) = struct.unpack_from("<I", table, pos + 2)
        if esize == 0:
            return out
        out.append(pos)
        pos += esize


def _fix_header_crcs(buf: bytearray) -> None:
    for off in (0, 0x1000):
        raw = bytearray(buf[off : off + 0x2E])
        raw[4:8] = bytes(4)
        struct.pack_into("<I", buf, off + 4, zlib.crc32(bytes(raw)) & 0xFFFFFFFF)


def _read_config(path: Path) -> None:
    """What discovering a Hyper-V VM does with a configuration file; FormatError or a tree."""
    try:
        with cpu_time_limit(FUZZ_CPU_LIMIT):
            VmConfig.from_tree(parse_config(str(path)), file_name=path.name, path=str(path))
    except FormatError:
        pass


_edit = st.tuples(
    st.sampled_from(["byte", "u16", "u32", "u64"]),
    st.sampled_from(["headers", "object table", "key table", "anywhere"]),
    st.integers(0, 2**32),
    st.one_of(
        st.integers(0, 255),
        st.sampled_from([0, 1, 2, 9, 0x15, 0x16, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**64 - 1]),
    ),
)


def _vmcx_mutant(siblings: int, chain: tuple[int, int], edits: list[tuple[str, str, int, int]], fix: bool) -> bytes:
    """sample_tree() with ``siblings`` more nodes, a run of entries re-parented into a chain
    (``chain``: where it starts, how long), then ``edits`` written over its bytes."""
    tree = sample_tree()
    tree["configuration"]["extra"] = {f"n{i}": {} for i in range(siblings)}
    buf = bytearray(build_vmcx(tree))
    entries = _key_entries(bytes(buf))
    # re-parent a run of entries, each under the one before: nodes nested as deep as the run
    start, length = chain
    run = entries[start % len(entries) :][:length]
    for before, entry in itertools.pairwise(run):
        struct.pack_into("<HI", buf, KEY_TABLE_OFFSET + entry + 6, 1, before)
    spots = {"headers": (0, 0x1030), "object table": (0x2000, 0x100), "key table": (KEY_TABLE_OFFSET, 0x1000)}
    for kind, where, at, value in edits:
        width = {"byte": 1, "u16": 2, "u32": 4, "u64": 8}[kind]
        start_at, span = spots.get(where, (0, len(buf)))
        pos = min(start_at + at % span, len(buf) - width)
        buf[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    if fix:
        _fix_header_crcs(buf)
    return bytes(buf)


def _vmcx_file(folder: Path, data: bytes) -> Path:
    path = folder / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.vmcx"
    path.write_bytes(data)
    return path


@settings(max_examples=150, deadline=None)
@given(
    # up to 100,000 nodes (~4 MB, read in ~0.8 s of CPU; a 64 MiB file holds ~2.9 million)
    siblings=st.one_of(st.integers(0, 300), st.integers(0, 100_000)),
    chain=st.tuples(st.integers(0, 2**32), st.one_of(st.integers(0, 300), st.integers(0, 100_000))),
    edits=st.lists(_edit, max_size=4),
    fix=st.booleans(),
)
def test_mutated_vmcx_reads_as_a_tree_or_a_format_error(
    tmp_path_factory: pytest.TempPathFactory,
    siblings: int,
    chain: tuple[int, int],
    edits: list[tuple[str, str, int, int]],
    fix: bool,
) -> None:
    _read_config(_vmcx_file(tmp_path_factory.mktemp("vmcx-fuzz"), _vmcx_mutant(siblings, chain, edits, fix)))


def test_a_wide_vmcx_reads_within_the_cpu_limit(tmp_path: Path) -> None:
    """The campaign's example (siblings=131070, chain=(967, 1)): 131,070 sibling nodes, 5.3 MB,
    read in ~1 s of CPU (it ran out of the 5 s only under hypothesis's tracing)."""
    path = _vmcx_file(tmp_path, _vmcx_mutant(131070, (967, 1), [], False))
    with cpu_time_limit(FUZZ_CPU_LIMIT):
        cfg = VmConfig.from_tree(parse_config(str(path)), file_name=path.name, path=str(path))
    assert cfg.name == "web01"


def test_a_deep_chain_of_vmcx_nodes_is_refused_in_linear_time(tmp_path: Path) -> None:
    """100,000 nodes each the parent of the next: checking the tree carried each node's set of
    ancestors, quadratic in the depth (20,000 levels took 1.6 s of CPU, this minutes)."""
    tree = sample_tree()
    tree["configuration"]["extra"] = {}
    first = len(_key_entries(build_vmcx(tree)))  # the entries of "extra"'s children follow
    data = _vmcx_mutant(100_000, (first, 100_000), [], False)
    with cpu_time_limit(FUZZ_CPU_LIMIT), pytest.raises(FormatError, match="nested deeper than 64"):
        parse_config(str(_vmcx_file(tmp_path, data)))
    # as deep as allowed still reads
    assert parse_vmcx(_vmcx_mutant(100, (first, 60), [], False))


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(0, 3000),
    text=st.text(max_size=20),
    edits=st.lists(st.tuples(st.integers(0, 2**32), st.binary(min_size=1, max_size=4)), max_size=3),
)
def test_mutated_xml_reads_as_a_tree_or_a_format_error(
    tmp_path_factory: pytest.TempPathFactory, depth: int, text: str, edits: list[tuple[int, bytes]]
) -> None:
    path = tmp_path_factory.mktemp("xml-fuzz") / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.xml"
    path.write_bytes(_xml_mutant(depth, text, edits))
    _read_config(path)


def _xml_mutant(depth: int, text: str, edits: list[tuple[int, bytes]]) -> bytes:
    """sample_tree() as XML with elements nested ``depth`` deep, then ``edits`` written over it."""
    buf = bytearray(render_xml_config(sample_tree()))
    inner = ("<n>" * depth + "<v type='string'>" + escape(text) + "</v>" + "</n>" * depth).encode("utf-16-le")
    close = "</configuration>".encode("utf-16-le")
    at = buf.rfind(close)
    buf[at:at] = inner
    for where, data in edits:
        pos = where % len(buf)
        buf[pos : pos + len(data)] = data
    return bytes(buf)


def test_bytes_that_are_not_ascii_are_a_format_error(tmp_path: Path) -> None:
    """The campaign's example (depth=0, text='0', edits=[(47639, b'\\x01')]): one byte of the
    base64 text of creation_time became U+0141, and b64decode raised ValueError, not
    binascii.Error: a traceback instead of "bytes are not base64"."""
    path = tmp_path / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.xml"
    path.write_bytes(_xml_mutant(0, "0", [(47639, b"\x01")]))
    with pytest.raises(FormatError, match="not base64"):
        parse_config(str(path))


def test_a_deeply_nested_xml_configuration_is_a_format_error(tmp_path: Path) -> None:
    """The campaign's class of example: elements nested ~1,000 deep made the conversion to a
    tree recurse past Python's limit (RecursionError, a traceback); 2,000 levels here."""
    inner = "<n>" * 2000 + "<v type='string'>x</v>" + "</n>" * 2000
    path = tmp_path / "vm.xml"
    head = "<configuration><properties><name type='string'>a</name></properties>"
    path.write_bytes(f"{head}{inner}</configuration>".encode())
    with pytest.raises(FormatError, match="nested deeper than 64"):
        parse_config(str(path))
    ok = "<n>" * 60 + "<v type='string'>x</v>" + "</n>" * 60
    path.write_bytes(f"{head}{ok}</configuration>".encode())
    assert VmConfig.from_tree(parse_config(str(path))).name == "a"


def test_an_encoding_xml_cannot_use_is_a_format_error(tmp_path: Path) -> None:
    """The campaign's example (depth=92, text='\U00010000', edits=[(3446862, b'A')]): the
    declaration's "UTF-16" became "ATF-16", and ElementTree raised LookupError."""
    path = tmp_path / "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11.xml"
    data = _xml_mutant(92, "\U00010000", [(3446862, b"A")])
    assert 'encoding="ATF-16"'.encode("utf-16-le") in data
    path.write_bytes(data)
    with pytest.raises(FormatError, match="unusable encoding"):
        parse_config(str(path))


@pytest.mark.parametrize("encoding", ["ATF-16", "rot13", "UTF-32", "shift_jis", "idna", "punycode", "undefined"])
def test_any_encoding_xml_cannot_use_is_a_format_error(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "vm.xml"
    path.write_bytes(
        f'<?xml version="1.0" encoding="{encoding}"?><configuration>\x80</configuration>'.encode("latin-1")
    )
    with pytest.raises(FormatError, match="XML configuration"):
        parse_config(str(path))
