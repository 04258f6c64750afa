"""Hyper-V VM configuration files: VMCX/VMRS ("HyperVStorage" container) and the older XML.

Both read back as the same tree: nested dicts keyed by node name (``configuration`` →
``properties`` → ``name``), with str/int/float/bool/bytes leaves. ``VmConfig.from_tree``
takes out what a backup needs: VM name and ID, generation, the disks on each controller,
and checkpoint facts.

The container format is undocumented. What this reader relies on (vhdx-format.md Appendix B,
cross-read with dissect.hypervisor's description of VmDataStore.dll):

* two 0x2E-byte headers at 0x0000 and 0x1000; the active one is the valid one with the
  larger sequence number; the checksum is CRC-32 (zlib) over the header with the field zeroed;
* version 0x400 only (the only version seen in real files);
* an object table at 0x2000 (signature 0x01110001) listing key tables (type 2) and file
  objects (type 3) by absolute offset and size, and further object tables (type 1), which
  are followed (a loop or a bad signature is a FormatError);
* key tables (u16 signature 0x0002, u16 index, u16 sequence, u32 checksum) holding entries:
  u16 type|flags<<8, u32 size, u16 parent table index, u32 parent offset, u32 checksum,
  u32 insertion sequence, u8 data offset, then the key (UTF-8, NUL-terminated; ``data offset``
  counts it) and the value. Entry size 0 ends a table. Flag 0x01: the value lives in a file
  object (u32 size, u64 absolute offset);
* values: Int/UInt/Double 8 bytes, Bool u32, String (UTF-16LE) and Array (bytes) as u32
  length + data, Node = a tree node others point to by (table index, entry offset).

Checksums of object-table and key-table entries use algorithms no sample has confirmed, so
they are not checked; the header CRC is. A replay log with entries is refused (the file is
dirty and would read stale). Anything unexpected raises ``FormatError`` naming the structure
and offset, so a caller can fall back to discovering disks from the files.

The XML form (Hyper-V 2012 R2 and older) is ``<configuration>`` with typed leaves
(``type="string|integer|bool|bytes"``).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import uuid
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk import open_checked
from vmvault.errors import FormatError, SourceError

__all__ = [
    "IDE_CONTROLLER",
    "SCSI_CONTROLLER",
    "ConfigTree",
    "Drive",
    "VmConfig",
    "parse_config",
    "parse_vmcx",
    "parse_xml_config",
    "render_xml_config",
]

ConfigTree = dict[str, Any]

STORAGE_SIGNATURE = 0x01282014
REPLAY_LOG_SIGNATURE = 0x01110003
OBJECT_TABLE_SIGNATURE = 0x01110001
KEY_TABLE_SIGNATURE = 0x0002
SUPPORTED_VERSION = 0x400
HEADER_OFFSETS = (0x0000, 0x1000)
OBJECT_TABLE_OFFSET = 0x2000

# signature, checksum, sequence, version, unknown, alignment, log offset, log size, header size
HEADER = struct.Struct("<IIHIQIQQI")
assert HEADER.size == 0x2E
REPLAY_LOG = struct.Struct("<IIIBIIIIIB")  # signature, checksum, entry count, ...
assert REPLAY_LOG.size == 0x22
OBJECT_TABLE = struct.Struct("<II")  # signature, entry count
assert OBJECT_TABLE.size == 8
OBJECT_ENTRY = struct.Struct("<BIQIB")  # type, checksum, offset, size, allocated
assert OBJECT_ENTRY.size == 0x12
KEY_TABLE = struct.Struct("<HHHI")  # signature, index, sequence, checksum
assert KEY_TABLE.size == 0xA
KEY_ENTRY = struct.Struct("<HIHIIIB")  # type|flags, size, parent table, parent offset, checksum, seq, data off
assert KEY_ENTRY.size == 21

OBJ_OBJECT_TABLE, OBJ_KEY_TABLE, OBJ_FILE = 1, 2, 3
MAX_OBJECT_TABLES = 64
T_FREE, T_INT, T_UINT, T_DOUBLE, T_STRING, T_ARRAY, T_BOOL, T_NODE = 1, 3, 4, 5, 6, 7, 8, 9
FLAG_FILE_OBJECT = 0x01
MAX_CONFIG_SIZE = 64 * 1024 * 1024
#: how deep a configuration's nodes may nest (what a backup reads is 4 levels down,
#: configuration/_<controller>_/controllerN/driveN): a 64 MiB file can chain millions of
#: nodes, and an XML tree 1,000 deep exhausts the recursion of its reading
MAX_TREE_DEPTH = 64

#: controller device types (``configuration/manifest/vdevNNN/device``)
IDE_CONTROLLER = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI_CONTROLLER = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"


def _bad(path: str, structure: str, offset: int | None, message: str) -> FormatError:
    return FormatError(message, path=path, structure=structure, offset=offset)


# ============================================================================ VMCX / VMRS


@dataclass(frozen=True)
class StorageHeader:
    signature: int
    checksum: int
    sequence: int
    version: int
    unknown: int
    alignment: int
    replay_log_offset: int
    replay_log_size: int
    header_size: int

    @classmethod
    def unpack(cls, raw: bytes) -> StorageHeader:
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(
            self.signature,
            self.checksum,
            self.sequence,
            self.version,
            self.unknown,
            self.alignment,
            self.replay_log_offset,
            self.replay_log_size,
            self.header_size,
        )

    def computed_checksum(self) -> int:
        raw = bytearray(self.pack())
        raw[4:8] = bytes(4)
        return zlib.crc32(bytes(raw)) & 0xFFFFFFFF

    def valid(self) -> bool:
        return self.signature == STORAGE_SIGNATURE and self.checksum == self.computed_checksum()


def _read_exact(data: bytes, offset: int, size: int, path: str, structure: str) -> bytes:
    if offset < 0 or offset + size > len(data):
        raise _bad(path, structure, offset, f"{size} bytes needed but the file ends at {len(data):#x}")
    return data[offset : offset + size]


@dataclass
class _Entry:
    table: int
    offset: int
    type: int
    key: str
    value: Any
    parent: tuple[int, int] | None


def _decode_value(
    data: bytes, kind: int, flags: int, raw: bytes, where: int, objects: dict[int, int], path: str
) -> Any:
    if flags & FLAG_FILE_OBJECT:
        if len(raw) < 12:
            raise _bad(path, "key entry file-object pointer", where, "truncated")
        size, off = struct.unpack_from("<IQ", raw)
        if off not in objects or size > objects[off]:
            raise _bad(path, "key entry file-object pointer", where, f"no file object of {size} bytes at {off:#x}")
        payload = _read_exact(data, off, size, path, "file object")
    else:
        payload = raw
    if kind in (T_INT, T_UINT, T_DOUBLE):
        if len(payload) < 8:
            raise _bad(path, "key entry value", where, "numeric value truncated")
        fmt = {T_INT: "<q", T_UINT: "<Q", T_DOUBLE: "<d"}[kind]
        return struct.unpack_from(fmt, payload)[0]
    if kind == T_BOOL:
        if len(payload) < 4:
            raise _bad(path, "key entry value", where, "bool value truncated")
        return struct.unpack_from("<I", payload)[0] != 0
    if kind in (T_STRING, T_ARRAY):
        if not flags & FLAG_FILE_OBJECT:
            if len(payload) < 4:
                raise _bad(path, "key entry value", where, "length truncated")
            (n,) = struct.unpack_from("<I", payload)
            if 4 + n > len(payload):
                raise _bad(path, "key entry value", where, f"value of {n} bytes overruns the entry")
            payload = payload[4 : 4 + n]
        if kind == T_ARRAY:
            return bytes(payload)
        try:
            return payload.decode("utf-16-le").rstrip("\x00")
        except UnicodeDecodeError as exc:
            raise _bad(path, "key entry string", where, "not UTF-16LE") from exc
    return None  # nodes carry no value


def parse_vmcx(data: bytes, path: str = "<vmcx>") -> ConfigTree:
    """The tree stored in a VMCX/VMRS container. Raises FormatError on anything unexpected."""
    headers = []
    for off in HEADER_OFFSETS:
        h = StorageHeader.unpack(_read_exact(data, off, HEADER.size, path, "storage header"))
        if h.valid():
            headers.append(h)
    if not headers:
        raw_sig = struct.unpack_from("<I", data)[0] if len(data) >= 4 else None
        if raw_sig != STORAGE_SIGNATURE:
            raise _bad(path, "storage header", 0, "not a HyperVStorage file (signature 0x01282014 missing)")
        raise _bad(path, "storage header", 0, "both headers fail their CRC-32")
    header = max(headers, key=lambda h: h.sequence)
    if header.version != SUPPORTED_VERSION:
        raise _bad(path, "storage header", None, f"version {header.version:#x} is not supported (only 0x400)")
    if header.replay_log_offset:
        log = _read_exact(data, header.replay_log_offset, REPLAY_LOG.size, path, "replay log")
        sig, _ck, n_entries = struct.unpack_from("<III", log)
        if sig != REPLAY_LOG_SIGNATURE:
            raise _bad(path, "replay log", header.replay_log_offset, f"bad signature {sig:#x}")
        if n_entries:
            # The file is dirty: Hyper-V would replay the log first; reading it as is could be stale.
            raise _bad(path, "replay log", header.replay_log_offset, f"{n_entries} unreplayed log entries")

    # object tables: the first at 0x2000; an entry of type 1 points to the next one (a large
    # file has several), so every table of the chain is read, each once
    key_tables: list[tuple[int, int]] = []
    objects: dict[int, int] = {}
    pending, visited, total = [OBJECT_TABLE_OFFSET], set(), 0
    while pending:
        table_off = pending.pop(0)
        if table_off in visited:
            raise _bad(path, "object table", table_off, "the chain of object tables loops")
        visited.add(table_off)
        if len(visited) > MAX_OBJECT_TABLES:
            raise _bad(path, "object table", table_off, f"more than {MAX_OBJECT_TABLES} chained object tables")
        raw = _read_exact(data, table_off, OBJECT_TABLE.size, path, "object table")
        sig, count = OBJECT_TABLE.unpack(raw)
        if sig != OBJECT_TABLE_SIGNATURE:
            raise _bad(path, "object table", table_off, f"bad signature {sig:#x}")
        total += count
        if count > 65536 or total > 65536:
            raise _bad(path, "object table", table_off, f"implausible entry count {count}")
        for i in range(count):
            pos = table_off + OBJECT_TABLE.size + i * OBJECT_ENTRY.size
            kind, _ck, off, size, allocated = OBJECT_ENTRY.unpack(
                _read_exact(data, pos, OBJECT_ENTRY.size, path, "object table entry")
            )
            if not allocated:
                continue
            if off + size > len(data):
                raise _bad(path, "object table entry", pos, f"object at {off:#x}+{size:#x} lies past the end")
            if kind == OBJ_KEY_TABLE:
                key_tables.append((off, size))
            elif kind == OBJ_FILE:
                objects[off] = size
            elif kind == OBJ_OBJECT_TABLE:
                pending.append(off)
    if not key_tables:
        raise _bad(path, "object table", OBJECT_TABLE_OFFSET, "no key tables")

    # key tables: keep the highest sequence of each index
    tables: dict[int, tuple[int, int, int]] = {}
    for off, size in key_tables:
        sig, index, seq, _ck = KEY_TABLE.unpack(_read_exact(data, off, KEY_TABLE.size, path, "key table"))
        if sig != KEY_TABLE_SIGNATURE:
            raise _bad(path, "key table", off, f"bad signature {sig:#x}")
        if index not in tables or seq > tables[index][2]:
            tables[index] = (off, size, seq)
    entries: dict[tuple[int, int], _Entry] = {}
    for index, (off, size, _seq) in tables.items():
        pos = KEY_TABLE.size
        while pos + KEY_ENTRY.size <= size:
            where = off + pos
            tflags, esize, ptable, poff, _ck, _ins, doff = KEY_ENTRY.unpack_from(data, where)
            if esize == 0:
                break
            if esize < KEY_ENTRY.size or pos + esize > size:
                raise _bad(path, "key entry", where, f"size {esize} does not fit the table")
            kind, flags = tflags & 0xFF, tflags >> 8
            if kind > T_NODE or kind in (0, 2):
                raise _bad(path, "key entry", where, f"unknown type {kind}")
            if kind != T_FREE:
                body = data[where + KEY_ENTRY.size : where + esize]
                if doff == 0 or doff > len(body) or body[doff - 1] != 0:
                    raise _bad(path, "key entry", where, "key name not NUL-terminated within the entry")
                try:
                    key = body[: doff - 1].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _bad(path, "key entry", where, "key name is not UTF-8") from exc
                value = _decode_value(data, kind, flags, body[doff:], where, objects, path)
                parent = (ptable, poff) if ptable else None
                entries[(index, pos)] = _Entry(index, pos, kind, key, value, parent)
            pos += esize

    # link children to parents
    nodes: dict[tuple[int, int], ConfigTree] = {k: {} for k, e in entries.items() if e.type == T_NODE}
    root: ConfigTree = {}
    for loc, e in entries.items():
        if e.parent is None:
            container = root
        else:
            parent_node = nodes.get(e.parent)
            if parent_node is None:
                raise _bad(path, "key entry", tables[e.table][0] + e.offset, f"parent {e.parent} is not a node")
            container = parent_node
        container[e.key] = nodes[loc] if e.type == T_NODE else e.value
    # a chain of nodes as deep as the file allows would make every walk of the tree costly
    _check_depth(root, path)
    return root


def _check_depth(tree: ConfigTree, path: str) -> None:
    """Refuse a tree nested deeper than MAX_TREE_DEPTH, in time linear in its size.

    Every entry has one parent, so a node reachable from the root is never its own ancestor;
    a loop would in any case exceed the depth. (Carrying each node's set of ancestors, as this
    once did, cost time quadratic in the depth: a chain of 20,000 nodes took 1.6 s of CPU, and
    a 64 MiB file holds ~2.9 million.)
    """
    stack: list[tuple[ConfigTree, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise _bad(path, "key tree", None, f"nodes nested deeper than {MAX_TREE_DEPTH} levels")
        stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict))


# ============================================================================ XML (2012 R2 and older)


def parse_xml_config(data: bytes, path: str = "<xml>") -> ConfigTree:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise _bad(path, "XML configuration", None, f"not well-formed XML: {exc}") from exc
    except (LookupError, ValueError) as exc:
        # the declaration's encoding is the file's to name: unknown ("ATF-16", LookupError), not
        # a text encoding ("rot13", LookupError), multi-byte ("UTF-32", ValueError) or failing
        # to decode ("idna", "punycode": UnicodeError, a ValueError)
        raise _bad(path, "XML configuration", None, f"unusable encoding: {exc}") from exc
    # convert() below recurses once per level: the depth is checked first, without recursion
    levels: list[tuple[ET.Element, int]] = [(root, 0)]
    while levels:
        el, depth = levels.pop()
        if depth > MAX_TREE_DEPTH:
            raise _bad(path, "XML configuration", None, f"elements nested deeper than {MAX_TREE_DEPTH} levels")
        levels.extend((child, depth + 1) for child in el)

    def convert(el: ET.Element) -> Any:
        kind = el.get("type")
        if kind is None and len(el):
            return {child.tag: convert(child) for child in el}
        text = el.text or ""
        if kind == "integer":
            try:
                return int(text.strip())
            except ValueError as exc:
                raise _bad(path, f"XML element {el.tag}", None, f"not an integer: {text!r}") from exc
        if kind == "bool":
            return text.strip().lower() == "true"
        if kind == "bytes":
            try:
                return base64.b64decode(text.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:  # ValueError: text that is not ASCII
                raise _bad(path, f"XML element {el.tag}", None, "bytes are not base64") from exc
        if kind is None and not text.strip():
            return {}
        return text

    return {root.tag: convert(root)}


def render_xml_config(tree: ConfigTree) -> bytes:
    """The tree in the XML form (UTF-16, as Hyper-V wrote it)."""
    (top, body), *rest = tree.items()
    if rest:
        raise ValueError("an XML configuration has exactly one root")

    def build(tag: str, value: Any) -> ET.Element:
        el = ET.Element(tag)
        if isinstance(value, dict):
            for k, v in value.items():
                el.append(build(k, v))
        elif isinstance(value, bool):
            el.set("type", "bool")
            el.text = "True" if value else "False"
        elif isinstance(value, int):
            el.set("type", "integer")
            el.text = str(value)
        elif isinstance(value, bytes):
            el.set("type", "bytes")
            el.text = base64.b64encode(value).decode()
        else:
            el.set("type", "string")
            el.text = str(value)
        return el

    el = build(top, body)
    ET.indent(el)
    text = '<?xml version="1.0" encoding="UTF-16" standalone="yes"?>\n' + ET.tostring(el, encoding="unicode") + "\n"
    return text.encode("utf-16")


def parse_config(path: str) -> ConfigTree:
    """Read ``path`` as VMCX/VMRS or XML, by content."""
    try:
        # a VM folder may hold a FIFO or a device under a configuration's name: never block on it
        fd, _st = open_checked(path, block_devices=False, what="a VM configuration")
    except SourceError as exc:
        raise FormatError(str(exc), path=path) from exc
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror}", path=path) from exc
    if len(data) > MAX_CONFIG_SIZE:
        raise _bad(path, "configuration", None, "larger than 64 MiB; not a VM configuration")
    if data[:4] == struct.pack("<I", STORAGE_SIGNATURE):
        return parse_vmcx(data, path)
    head = data[:64]
    if head.startswith((b"\xff\xfe<", b"\xfe\xff\x00<", b"<?xml", b"<configuration", b"\xef\xbb\xbf<")):
        return parse_xml_config(data, path)
    raise _bad(path, "configuration", 0, "neither a HyperVStorage (VMCX) file nor an XML configuration")


# ============================================================================ what a backup needs


@dataclass(frozen=True)
class Drive:
    controller: str  # "ide" / "scsi" / "unknown"
    controller_index: int
    location: int
    type: str  # VHD / ISO / VFD / NONE
    pathname: str

    @property
    def slot(self) -> str:
        return f"{self.controller}{self.controller_index}:{self.location}"


@dataclass
class VmConfig:
    name: str
    vm_id: str
    generation: int
    drives: list[Drive] = field(default_factory=list)
    #: the checkpoint the current state descends from ("" = none)
    parent_checkpoint_id: str = ""
    #: for a checkpoint's configuration: its kind ("standard", "production", "recovery")
    checkpoint_type: str = ""
    creation_time: float | None = None

    @staticmethod
    def from_tree(tree: ConfigTree, *, file_name: str = "", path: str = "<config>") -> VmConfig:
        conf = tree.get("configuration")
        if not isinstance(conf, dict):
            raise _bad(path, "configuration tree", None, "no 'configuration' node")
        props = conf.get("properties") if isinstance(conf.get("properties"), dict) else {}
        assert isinstance(props, dict)
        name = props.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(path, "configuration tree", None, "no configuration/properties/name")
        vm_id = str(props.get("global_id") or "")
        stem = os.path.splitext(file_name)[0]
        if not vm_id:
            try:
                vm_id = str(uuid.UUID(stem)).upper()
            except ValueError:
                vm_id = ""
        subtype = props.get("subtype", 0)
        generation = 2 if subtype == 1 else 1
        ctime = props.get("creation_time")
        creation: float | None = None
        if isinstance(ctime, int | float) and not isinstance(ctime, bool):
            creation = float(ctime)
        elif isinstance(ctime, bytes) and len(ctime) == 8:
            # FILETIME: 100 ns since 1601-01-01
            creation = struct.unpack("<Q", ctime)[0] / 1e7 - 11644473600
        cfg = VmConfig(
            name=name,
            vm_id=vm_id.upper(),
            generation=generation,
            parent_checkpoint_id=str(props.get("parent_snapshot_id") or "").upper(),
            checkpoint_type=str(props.get("snapshot_type") or ""),
            creation_time=creation,
        )
        # controller instance -> kind, from the manifest
        kinds: dict[str, str] = {}
        manifest = conf.get("manifest")
        if isinstance(manifest, dict):
            for dev in manifest.values():
                if isinstance(dev, dict) and isinstance(dev.get("instance"), str):
                    device = str(dev.get("device", "")).strip("{}").lower()
                    kind = {IDE_CONTROLLER: "ide", SCSI_CONTROLLER: "scsi"}.get(device, "other")
                    kinds[str(dev["instance"]).strip("{}").lower()] = kind
        for key in sorted(conf):
            node = conf[key]
            if not (key.startswith("_") and key.endswith("_") and isinstance(node, dict)):
                continue
            instance = key.strip("_").lower()
            kind = kinds.get(instance, "unknown")
            if kind == "other":
                continue
            for ckey in sorted(node):
                cnode = node[ckey]
                if not (ckey.startswith("controller") and isinstance(cnode, dict)):
                    continue
                try:
                    cidx = int(ckey[len("controller") :])
                except ValueError:
                    continue
                for dkey in sorted(cnode):
                    dnode = cnode[dkey]
                    if not (dkey.startswith("drive") and isinstance(dnode, dict)):
                        continue
                    try:
                        loc = int(dkey[len("drive") :])
                    except ValueError:
                        continue
                    dtype = str(dnode.get("type", "NONE"))
                    pathname = dnode.get("pathname", "")
                    if not isinstance(pathname, str):
                        raise _bad(path, f"{key}/{ckey}/{dkey}/pathname", None, "not a string")
                    cfg.drives.append(Drive(kind, cidx, loc, dtype, pathname))
        return cfg

    @property
    def disks(self) -> list[Drive]:
        return [d for d in self.drives if d.type.upper() == "VHD" and d.pathname]
