"""Guest filesystem images for the file-level restore tests, built with Debian tools (one mount:
exFAT's).

* ext2/3/4: ``mke2fs -d`` copies a folder tree in (names, modes, mtimes, symbolic links, sparse
  files); ``debugfs -w`` changes a file in an existing image (the checkpoint-layer tests).
* FAT12/16/32: ``mkfs.vfat``, then ``mmd`` and ``mcopy -m`` (mtimes kept) from mtools.
* NTFS: ``mkntfs``, folders made through libntfs-3g (the library ``ntfscp`` itself uses; the
  ntfs-3g package has no folder tool), files copied with ``ntfscp -t`` (mtimes kept).
* exFAT: ``mkfs.exfat``, then the tree copied in through exfat-fuse (another exFAT
  implementation than the one vmvault reads with) on a loop device: exfatprogs has no way to
  put files into an image without mounting it, and this kernel has no exFAT driver. Needs root
  and ``/dev/loop-control`` (else the tests that need files in it skip, saying so).
* XFS: ``mkfs.xfs -p PROTOFILE`` (the library cannot read XFS: it must be reported as such).
* LUKS: ``cryptsetup luksFormat`` on a file. LVM and BitLocker volumes are synthesized from
  their published signatures (``pvcreate`` refuses files; BitLocker needs Windows).
* Partition tables: ``sfdisk`` scripts (MBR with logical partitions, GPT); filesystems placed
  with positional writes. Containers: ``qemu-img convert`` to VHDX and qcow2; a Hyper-V style
  checkpoint chain (``.vhdx`` + ``.avhdx``) written with vmvault's own disk writer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from vmvault.disk import create_image, open_image

MiB = 1024 * 1024

#: tools each builder needs, with the Debian package that brings it
TOOLS = {
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mkntfs": "ntfs-3g",
    "ntfscp": "ntfs-3g",
    "mkfs.exfat": "exfatprogs",
    "mount.exfat-fuse": "exfat-fuse",
    "losetup": "mount",
    "mkfs.xfs": "xfsprogs",
    "sfdisk": "fdisk",
    "cryptsetup": "cryptsetup-bin",
    "qemu-img": "qemu-utils",
}


def need(*tools: str) -> None:
    """Skip the test, naming the Debian package, when a tool is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {TOOLS.get(tool, '?')}; scripts/setup.sh)")


def run(*cmd: str | os.PathLike[str], stdin: bytes | None = None) -> str:
    proc = subprocess.run([os.fspath(c) for c in cmd], input=stdin, capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout.decode(errors="replace")


# ------------------------------------------------------------------------------------ the tree


@dataclass(frozen=True)
class Expected:
    """What a restored entry must be."""

    type: str  # "file", "dir", "symlink"
    size: int = 0
    sha256: str = ""
    mtime: int | None = None  # seconds
    target: str | None = None


#: a fixed time for every file (2021-03-04 05:06:08 UTC; even seconds suit FAT's 2 s resolution)
MTIME = 1614834368


def _write(root: Path, rel: str, data: bytes, mtime: int, tree: dict[str, Expected]) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    tree["/" + rel] = Expected("file", len(data), hashlib.sha256(data).hexdigest(), mtime)


def guest_tree(
    root: Path, *, symlinks: bool = False, sparse: bool = False, unicode: bool = True
) -> dict[str, Expected]:
    """A folder tree to put into a filesystem, and what each of its entries is."""
    rng = random.Random(14)
    tree: dict[str, Expected] = {}
    root.mkdir(parents=True, exist_ok=True)
    _write(root, "hello.txt", b"hello from the guest\n", MTIME, tree)
    _write(root, "docs/report.txt", rng.randbytes(100 * 1024), MTIME + 2, tree)
    _write(root, "docs/Deep/nested/file.bin", rng.randbytes(300 * 1024 + 7), MTIME + 4, tree)
    _write(root, "docs/empty.txt", b"", MTIME + 6, tree)
    if unicode:
        _write(root, "unicode/naïve café.txt", "ünïcödé\n".encode(), MTIME + 8, tree)
    (root / "emptydir").mkdir()
    if sparse:
        path = root / "big" / "sparse.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        head, tail = rng.randbytes(4096), rng.randbytes(4096)
        with open(path, "wb") as f:
            f.write(head)
            f.seek(3 * MiB)
            f.write(tail)
            f.truncate(4 * MiB)
        os.utime(path, (MTIME, MTIME))
        data = head + bytes(3 * MiB - 4096) + tail + bytes(MiB - 4096)
        tree["/big/sparse.img"] = Expected("file", len(data), hashlib.sha256(data).hexdigest(), MTIME)
    if symlinks:
        (root / "links").mkdir()
        for name, target in (("rel", "../hello.txt"), ("abs", "/etc/passwd"), ("escape", "../../../../outside")):
            os.symlink(target, root / "links" / name)
            tree[f"/links/{name}"] = Expected("symlink", target=target)
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            rel = "/" + os.path.relpath(os.path.join(dirpath, d), root)
            tree[rel] = Expected("dir")
    return tree


# ------------------------------------------------------------------------------------ filesystems


def ext_image(out: Path, src: Path, size: int, *, kind: str = "ext4") -> Path:
    need("mke2fs")
    out.unlink(missing_ok=True)
    run("mke2fs", "-q", "-F", "-t", kind, "-d", src, "-L", "guest", "-E", "root_owner=0:0", out, f"{size // 1024}k")
    return out


def ext_replace_file(image: Path, guest_path: str, data: bytes, mtime: int, tmp: Path) -> None:
    """Replace a file's content in an ext image (``debugfs -w``, no mount)."""
    need("debugfs")
    local = tmp / "replacement"
    local.write_bytes(data)
    run("debugfs", "-w", "-R", f"rm {guest_path}", image)
    run("debugfs", "-w", "-R", f"write {local} {guest_path}", image)
    stamp = _debugfs_time(mtime)
    run("debugfs", "-w", "-R", f"set_inode_field {guest_path} mtime {stamp}", image)


def _debugfs_time(seconds: int) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(seconds))


def fat_image(out: Path, src: Path, size: int, *, bits: int) -> Path:
    need("mkfs.vfat", "mcopy", "mmd")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-F", str(bits), "-n", "GUEST", out)
    env_img = ["-i", os.fspath(out)]
    for dirpath, dirnames, filenames in sorted(os.walk(src)):
        rel = os.path.relpath(dirpath, src)
        base = "::/" if rel == "." else f"::/{rel}/"
        for d in sorted(dirnames):
            run("mmd", *env_img, base + d)
        for name in sorted(filenames):
            run("mcopy", "-m", *env_img, os.path.join(dirpath, name), base + name)
    return out


class _Ntfs:
    """Folders in an unmounted NTFS image through libntfs-3g (ntfs-3g has no folder tool)."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("ntfs-3g") or "libntfs-3g.so.89"
        lib = ctypes.CDLL(path, use_errno=True)
        lib.ntfs_mount.restype = ctypes.c_void_p
        lib.ntfs_mount.argtypes = [ctypes.c_char_p, ctypes.c_ulong]
        lib.ntfs_pathname_to_inode.restype = ctypes.c_void_p
        lib.ntfs_pathname_to_inode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        lib.ntfs_mbstoucs.restype = ctypes.c_int
        lib.ntfs_mbstoucs.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.ntfs_create.restype = ctypes.c_void_p
        lib.ntfs_create.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint8, ctypes.c_uint32]
        lib.ntfs_inode_close.argtypes = [ctypes.c_void_p]
        lib.ntfs_umount.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.lib = lib

    def mkdirs(self, image: Path, folders: Iterable[str]) -> None:
        lib = self.lib
        vol = lib.ntfs_mount(os.fsencode(image), 0)
        assert vol, f"libntfs-3g cannot open {image} (errno {ctypes.get_errno()})"
        try:
            for folder in folders:  # parents first
                parent_path, _, name = folder.rstrip("/").rpartition("/")
                parent = lib.ntfs_pathname_to_inode(vol, None, (parent_path or "/").encode())
                assert parent, f"no NTFS folder {parent_path or '/'}"
                ucs = ctypes.c_void_p()
                n = lib.ntfs_mbstoucs(name.encode(), ctypes.byref(ucs))
                assert n > 0
                child = lib.ntfs_create(parent, 0, ucs, n, stat.S_IFDIR)
                assert child, f"libntfs-3g cannot create {folder}"
                lib.ntfs_inode_close(child)
                lib.ntfs_inode_close(parent)
        finally:
            lib.ntfs_umount(vol, 0)


def ntfs_image(out: Path, src: Path, size: int) -> Path:
    need("mkntfs", "ntfscp")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run("mkntfs", "-q", "-F", "-Q", "-L", "GUEST", out)
    folders, files = [], []
    for dirpath, dirnames, filenames in sorted(os.walk(src)):
        rel = os.path.relpath(dirpath, src)
        prefix = "" if rel == "." else "/" + rel
        folders += [f"{prefix}/{d}" for d in sorted(dirnames)]
        files += [(os.path.join(dirpath, n), f"{prefix}/{n}") for n in sorted(filenames)]
    _Ntfs().mkdirs(out, sorted(folders, key=lambda p: p.count("/")))
    for local, guest in files:
        ntfs_write(out, local, guest)
    return out


def ntfs_write(image: Path, local: str | os.PathLike[str], guest_path: str) -> None:
    """Copy a file into an NTFS image (creating or overwriting it), keeping its mtime."""
    run("ntfscp", "-q", "-t", "-f", image, local, guest_path)


def exfat_image(out: Path, src: Path | None, size: int) -> Path:
    """exFAT holding the tree ``src`` (nothing: an empty root, no mount), mtimes kept."""
    need("mkfs.exfat")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run("mkfs.exfat", "-L", "GUEST", out)
    if src is not None:
        try:
            _copy_in_through_exfat_fuse(out, src)
        except BaseException:
            out.unlink(missing_ok=True)  # never left half filled for the next test to take
            raise
    return out


def _copy_in_through_exfat_fuse(image: Path, src: Path) -> None:
    need("mount.exfat-fuse", "losetup")
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not os.path.exists("/dev/fuse"):
        pytest.skip("filling an exFAT image needs root, /dev/loop-control and /dev/fuse (a loop device for exfat-fuse)")
    loop = subprocess.run(
        ["losetup", "--find", "--show", os.fspath(image)], capture_output=True, text=True, check=False
    )
    if loop.returncode != 0:
        pytest.skip(f"no loop device for the exFAT image: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    mnt = image.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    try:
        run("mount.exfat-fuse", device, mnt)
        try:
            for dirpath, dirnames, filenames in sorted(os.walk(src)):
                rel = os.path.relpath(dirpath, src)
                for d in sorted(dirnames):
                    (mnt / rel / d).mkdir()
                for name in sorted(filenames):
                    shutil.copyfile(os.path.join(dirpath, name), mnt / rel / name)
                    mtime = os.stat(os.path.join(dirpath, name)).st_mtime
                    os.utime(mnt / rel / name, (mtime, mtime))
        finally:
            run("umount", mnt)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        mnt.rmdir()


def xfs_image(out: Path, src: Path, size: int) -> Path:
    """XFS built from ``src`` with a protofile (mkfs.xfs needs at least 300 MiB)."""
    need("mkfs.xfs")
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def add(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            pad = " " * depth
            if any(c.isspace() for c in entry.name):
                continue  # a protofile cannot name it
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                add(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry}")

    add(src, 1)
    lines.append("$")
    proto = out.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(max(size, 320 * MiB))
    run("mkfs.xfs", "-q", "-p", proto, out)
    return out


def luks_image(out: Path, size: int) -> Path:
    need("cryptsetup")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    key = out.with_suffix(".key")
    key.write_bytes(b"not a real secret")
    run(
        "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, out,
    )  # fmt: skip
    return out


def lvm_image(out: Path, size: int) -> Path:
    """An LVM2 physical volume's label (sector 1: "LABELONE", "LVM2 001"), synthesized."""
    data = bytearray(size)
    data[512:520] = b"LABELONE"
    data[512 + 24 : 512 + 32] = b"LVM2 001"
    out.write_bytes(bytes(data))
    return out


def bitlocker_image(out: Path, size: int) -> Path:
    """A BitLocker volume's boot sector signature ("-FVE-FS-" at offset 3), synthesized."""
    data = bytearray(size)
    data[0:3] = b"\xeb\x58\x90"
    data[3:11] = b"-FVE-FS-"
    data[510:512] = b"\x55\xaa"
    out.write_bytes(bytes(data))
    return out


# ------------------------------------------------------------------------------------ disks


@dataclass(frozen=True)
class Part:
    """A partition to make: its filesystem image (None: left empty), type, and size (default:
    the image's size)."""

    image: Path | None
    type: str
    size: int = 0


def partitioned_disk(out: Path, size: int, scheme: str, parts: list[Part], *, logical_from: int = 0) -> Path:
    """A raw disk with an MBR ("dos") or GPT table, each partition aligned to 1 MiB and filled
    from its image. With ``logical_from`` (MBR), partitions from that index on are logical ones
    inside an extended partition."""
    need("sfdisk")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    lines = [f"label: {scheme}"]
    starts = []
    pos = MiB
    number = 0
    for i, part in enumerate(parts):
        psize = part.size or (part.image.stat().st_size if part.image else 8 * MiB)
        if logical_from and i == logical_from:
            number += 1
            lines.append(f"{out}{number} : start={pos // 512}, type=5")  # extended: the rest of the disk
            number = 4
        if logical_from and i >= logical_from:
            pos += MiB  # room for the EBR in front of each logical partition
        number += 1
        lines.append(f"{out}{number} : start={pos // 512}, size={psize // 512}, type={part.type}")
        starts.append(pos)
        pos += psize
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", out, stdin=("\n".join(lines) + "\n").encode())
    found = json.loads(run("sfdisk", "--json", out))["partitiontable"]["partitions"]
    with open(out, "r+b") as f:
        for part, start in zip(parts, starts, strict=True):
            assert any(p["start"] * 512 == start for p in found), (start, found)
            if part.image is not None:
                _copy_sparse(part.image, f, start)
    return out


def _copy_sparse(src: Path, dst: BinaryIO, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, leaving all-zero blocks as holes."""
    with open(src, "rb") as f:
        pos = 0
        for block in iter(lambda: f.read(MiB), b""):
            if block.strip(b"\0"):
                dst.seek(offset + pos)
                dst.write(block)
            pos += len(block)


def convert(raw: Path, fmt: str, out: Path) -> Path:
    """``raw`` as a VHDX (dynamic) or qcow2 image."""
    need("qemu-img")
    out.unlink(missing_ok=True)
    options = ["-o", "subformat=dynamic"] if fmt == "vhdx" else []
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, raw, out)
    return out


def checkpoint_chain(folder: Path, before: Path, after: Path, *, name: str = "guest") -> tuple[Path, Path]:
    """A Hyper-V style chain in ``folder``: ``<name>.vhdx`` holding ``before`` and the checkpoint
    ``<name>_ckpt.avhdx`` holding only the 64 KiB blocks where ``after`` differs."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"{name}.vhdx"
    child = folder / f"{name}_ckpt.avhdx"
    size = before.stat().st_size
    assert after.stat().st_size == size
    with create_image(str(base), "vhdx", size) as w, open(before, "rb") as f:
        for off in range(0, size, MiB):
            block = f.read(MiB)
            if block.strip(b"\0"):
                w.write(off, block)
    changed = 0
    with create_image(str(child), "vhdx", size, parent=str(base)) as w, open(before, "rb") as a, open(after, "rb") as b:
        step = 64 * 1024
        for off in range(0, size, step):
            old, new = a.read(step), b.read(step)
            if old != new:
                w.write(off, new)
                changed += 1
    assert changed, "the checkpoint changed nothing"
    with open_image(str(child)) as img:
        assert img.read(0, 4096) == after.read_bytes()[:4096]
    return base, child


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ the set


#: filesystem images: kind -> (size, tree variant)
_FS = {
    "ext2": (12 * MiB, "ext"),
    "ext3": (12 * MiB, "ext"),
    "ext4": (24 * MiB, "ext"),
    "fat12": (4 * MiB, "fat"),
    "fat16": (16 * MiB, "fat"),
    "fat32": (40 * MiB, "fat"),
    "ntfs": (24 * MiB, "ntfs"),
    "exfat": (8 * MiB, "ntfs"),
}

#: disks: name -> (scheme, [(filesystem kind or special, partition type)], logical_from)
DISKS: dict[str, tuple[str, list[tuple[str, str]], int]] = {
    "mbr": ("dos", [("ext4", "83"), ("fat32", "c"), ("ntfs", "7"), ("fat16", "e")], 2),
    "gpt": ("gpt", [("fat16", "uefi"), ("ntfs", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"), ("ext4", "linux")], 0),
    "odd": (
        "gpt",
        [
            ("exfat", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"),
            ("xfs", "linux"),
            ("luks", "ca7d7ccb-63ed-4c53-861c-1742536059cc"),
            ("lvm", "lvm"),
            ("bitlocker", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"),
            ("empty", "linux"),
            ("fat12", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"),
            ("ext2", "linux"),
            ("ext3", "linux"),
        ],
        0,
    ),
}


class GuestImages:
    """Builds each image once per test session, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._trees: dict[str, dict[str, Expected]] = {}

    def tree(self, variant: str) -> tuple[Path, dict[str, Expected]]:
        src = self.root / f"tree-{variant}"
        if variant not in self._trees:
            self._trees[variant] = guest_tree(
                src, symlinks=variant == "ext", sparse=variant == "ext", unicode=variant != "fat"
            )
        return src, self._trees[variant]

    def filesystem(self, kind: str) -> tuple[Path, dict[str, Expected]]:
        """A filesystem image of ``kind`` and the tree it holds (empty for the volumes vmvault
        cannot read)."""
        out = self.root / f"fs-{kind}.img"
        if kind in _FS:
            size, variant = _FS[kind]
            src, tree = self.tree(variant)
            if not out.exists():
                if kind.startswith("ext"):
                    ext_image(out, src, size, kind=kind)
                elif kind.startswith("fat"):
                    fat_image(out, src, size, bits=int(kind[3:]))
                elif kind == "exfat":
                    exfat_image(out, src, size)
                else:
                    ntfs_image(out, src, size)
            return out, tree
        if not out.exists():
            if kind == "xfs":
                xfs_image(out, self.tree("ext")[0], 320 * MiB)
            elif kind == "luks":
                luks_image(out, 20 * MiB)
            elif kind == "lvm":
                lvm_image(out, 4 * MiB)
            elif kind == "bitlocker":
                bitlocker_image(out, 4 * MiB)
            elif kind == "empty":
                with open(out, "wb") as f:
                    f.truncate(2 * MiB)
            else:
                raise KeyError(kind)
        return out, {}

    def disk(self, name: str) -> Path:
        """A raw disk: ``mbr``, ``gpt``, ``odd`` (see DISKS) or ``bare`` (NTFS, no table)."""
        out = self.root / f"disk-{name}.raw"
        if out.exists():
            return out
        if name == "bare":
            fs, _ = self.filesystem("ntfs")
            shutil.copyfile(fs, out)
            return out
        scheme, layout, logical_from = DISKS[name]
        parts = [Part(self.filesystem(kind)[0], ptype) for kind, ptype in layout]
        size = sum(p.image.stat().st_size for p in parts if p.image) + (len(parts) + 4) * MiB
        return partitioned_disk(out, size, scheme, parts, logical_from=logical_from)

    def partition_of(self, name: str, kind: str) -> int:
        """The partition number of the first ``kind`` filesystem on disk ``name``."""
        _, layout, logical_from = DISKS[name]
        index = [k for k, _ in layout].index(kind)
        if logical_from and index >= logical_from:
            return 5 + index - logical_from
        return index + 1

    def container(self, name: str, fmt: str) -> Path:
        """Disk ``name`` as ``fmt`` ("raw", "vhdx", "qcow2"), alone in a folder of its own."""
        folder = self.root / f"vm-{name}-{fmt}"
        out = folder / f"{name}.{fmt}"
        if not out.exists():
            folder.mkdir(exist_ok=True)
            raw = self.disk(name)
            if fmt == "raw":
                shutil.copyfile(raw, out)
            else:
                convert(raw, fmt, out)
        return out

    def chain(self) -> tuple[Path, dict[str, bytes]]:
        """A Hyper-V style VM folder: the ``gpt`` disk as ``guest.vhdx`` and a checkpoint
        ``guest_ckpt.avhdx`` in which the guest rewrote ``/hello.txt`` on NTFS (partition 2) and
        added ``/new.txt`` on ext4 (partition 3). Returns the folder and the new contents."""
        folder = self.root / "vm-chain"
        changes = {"ntfs:/hello.txt": b"rewritten inside the checkpoint\n" * 3, "ext4:/new.txt": b"born later\n"}
        if folder.exists():
            return folder, changes
        work = self.root / "chain-work"
        work.mkdir(exist_ok=True)
        before = self.disk("gpt")
        ntfs, _ = self.filesystem("ntfs")
        ext4, _ = self.filesystem("ext4")
        ntfs2, ext42 = work / "ntfs.img", work / "ext4.img"
        shutil.copyfile(ntfs, ntfs2)
        shutil.copyfile(ext4, ext42)
        local = work / "hello.txt"
        local.write_bytes(changes["ntfs:/hello.txt"])
        os.utime(local, (MTIME + 86400, MTIME + 86400))
        ntfs_write(ntfs2, local, "/hello.txt")
        ext_new = work / "new.txt"
        ext_new.write_bytes(changes["ext4:/new.txt"])
        ext_write_new(ext42, ext_new, "/new.txt", MTIME + 86400)
        after = work / "after.raw"
        shutil.copyfile(before, after)
        starts = {kind: i for i, (kind, _) in enumerate(DISKS["gpt"][1])}
        table = json.loads(run("sfdisk", "--json", before))["partitiontable"]["partitions"]
        with open(after, "r+b") as f:
            for kind, image in (("ntfs", ntfs2), ("ext4", ext42)):
                start = int(table[starts[kind]]["start"]) * 512
                f.seek(start)
                f.write(image.read_bytes())
        checkpoint_chain(folder, before, after)
        return folder, changes


def ext_write_new(image: Path, local: Path, guest_path: str, mtime: int) -> None:
    """Add a new file to an ext image (``debugfs -w``, no mount)."""
    need("debugfs")
    run("debugfs", "-w", "-R", f"write {local} {guest_path}", image)
    run("debugfs", "-w", "-R", f"set_inode_field {guest_path} mtime {_debugfs_time(mtime)}", image)
