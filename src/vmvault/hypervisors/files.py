"""Offline sources: a single disk image file, a VM folder, or one VM of a Hyper-V host folder.

A folder is a VM: every file whose content is a disk image (VHDX, VHD, qcow2) or whose name
says raw disk (``.raw``, ``.img``) is stored as a disk; every other regular file is stored as
a file with its mode and mtime. A differencing image whose parent is also in the folder is
stored as a *layer* of that parent, so a checkpoint chain is kept as a chain, each layer
stored once.

``HOSTFOLDER#VM`` names one VM of a Hyper-V host folder (every VM's configuration in one
shared ``Virtual Machines``, disks in a shared ``Virtual Hard Disks``; ``hyperv_model``,
"host folders"): only that VM's files are stored, laid out as a VM folder (``Virtual
Machines/<ID>.vmcx`` and its companions, ``Snapshots/`` with its checkpoints', ``Virtual Hard
Disks/`` with every disk its configurations reference and their parents), so a restore gives
a folder that reads as that one VM. Disks are looked for below the host folder, in its
sibling ``Virtual Hard Disks`` and in the ``allow_parent_dirs`` folders. A configuration that
cannot be read, or a disk it names that is not found, fails the backup: which files are the
VM's could not be told.

Whoever writes the folder is not trusted (``docs/design/repository-format.md`` section 10.4):

* Only regular files and folders are read. Links (unless ``follow_links``), FIFOs, sockets,
  devices and entries that cannot be read are not backed up, and each is named in a warning
  (recorded in the snapshot and printed with the result). A folder holding no disk image is
  warned about; one holding nothing to store at all is an error.
* With ``follow_links``, a link is followed only when it leads inside the VM folder or an
  allowed folder.
* A guest writes its raw disk's first bytes and can make them look like another format: a
  disk named ``.raw`` is read raw whatever they say; one of another name (``.img``) that the
  previous snapshot recorded as raw is read raw again, with a warning (``_format_of``). The
  format decided when the folder is scanned is the one the file is read in: a header the guest
  writes between that look and the reading changes nothing.
* Disk parents (backing files, parent locators) must lie inside the VM folder, or inside a
  folder given in ``allow_parent_dirs``; for a single image, inside the image's own folder
  (``vmvault.disk.ParentRule``). Anything else is refused with an error naming the disk and
  the parent.
* Every file is opened without following a link in its last component and without blocking,
  and must be the very file the scan saw (device and inode). A file replaced after the scan is
  not stored (a warning says so); one whose size or modification time changed is stored as
  read, with a warning. An image backed up alone is opened by its name once (a link there is
  followed: the user named it) and probed, read and described through that descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmvault import platform
from vmvault.disk import (
    DISK_SUFFIXES,
    FALLBACK_FORMAT,
    ParentRule,
    describe_mode,
    detect_format_fd,
    disk_format,
    open_checked,
    open_image,
)
from vmvault.disk.base import DiskImage
from vmvault.errors import SourceError, VmvaultError
from vmvault.hypervisors import walk
from vmvault.hypervisors.base import (
    DEFAULT_OPTIONS,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Source,
    SourceDisk,
    SourceFile,
)
from vmvault.hypervisors.openers import checked_opener
from vmvault.hypervisors.walk import MAX_ENTRIES

if TYPE_CHECKING:
    from vmvault.hypervisors.hyperv_model import HostFolder, HyperVVm

__all__ = ["FilesSource"]

#: names that mark a raw disk (any other file no format recognises is a plain file)
_RAW_SUFFIXES = disk_format(FALLBACK_FORMAT).suffixes
#: names that mark a disk image of some format: such a file that cannot be read fails the backup
_DISK_NAMES = DISK_SUFFIXES


class FilesSession(BackupSession):
    def __init__(
        self,
        root: str,
        *,
        single: bool,
        allow_parent_dirs: Sequence[str] = (),
        follow_links: bool = False,
        previous: PreviousBackup | None = None,
    ) -> None:
        self.vm = {"hypervisor": "files", "name": os.path.basename(root.rstrip("/")) or root}
        self.disks = []
        self.files = []
        self.consistency = "offline"
        self.warnings = []
        self.extra = {}
        self._images: list[DiskImage] = []
        self._follow_links = follow_links
        self._previous = previous
        home = os.path.dirname(root) if single else root
        #: where disk parents, and followed links, may lead
        self._rule = ParentRule.inside([home, *allow_parent_dirs])
        try:
            if single:
                # opened by its name once: probed and read through the same descriptor, so
                # a name replaced meanwhile (by a link elsewhere, say) changes nothing
                name = os.path.basename(root)
                fd, st = open_checked(root, block_devices=True)
                try:
                    fmt = self._format_of(name, detect_format_fd(fd, root))
                except BaseException:
                    os.close(fd)
                    raise
                self._add_disk(root, name, st, fmt, fd=fd)
            else:
                self._scan(root)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------- the folder scan

    def _skip(self, rel: str, why: str) -> None:
        self.warnings.append(f"{rel}: not backed up: {why}")

    def _scan(self, root: str) -> None:
        disks: list[tuple[str, str, os.stat_result, str]] = []
        skipped_before = len(self.warnings)
        self._gather(root, disks)
        for path, rel, st, fmt in disks:
            self._add_disk(path, rel, st, fmt)
        self._link_layers(root)
        skipped = len(self.warnings) - skipped_before
        if not self.disks and not self.files:
            more = "; " + "; ".join(self.warnings[skipped_before:]) if skipped else ""
            raise SourceError(f"{root}: nothing to back up: no disk image and no file{more}")
        if not self.disks:
            self.warnings.append(
                f"no disk image found in {root}: only its {len(self.files)} other file(s) are stored; "
                "is this the VM's folder?"
            )

    def _gather(self, root: str, disks: list[tuple[str, str, os.stat_result, str]]) -> None:
        """Every entry of the VM: here, the whole folder."""
        try:
            top = os.stat(root)
        except OSError as exc:
            raise SourceError(f"{root}: {exc.strerror}") from exc
        self._walk(root, (top.st_dev, top.st_ino), disks)

    def _walk(
        self,
        root: str,
        top: tuple[int, int],
        disks: list[tuple[str, str, os.stat_result, str]],
    ) -> None:
        """Every entry below ``root``: a folder's files before its subfolders, names sorted.

        Iterative: a hostile folder may be nested thousands deep.
        """
        # (folder, name prefix, its lstat as listed (None: the root), (device, inode) of the
        # folders that contain it)
        Pending = tuple[str, str, os.stat_result | None, frozenset[tuple[int, int]]]
        stack: list[Pending] = [(root, "", None, frozenset({top}))]
        examined = 0
        while stack:
            folder, prefix, seen, above = stack.pop()
            try:
                # the very folder listed above, never where a link swapped in since leads
                entries = platform.list_folder(folder, seen, limit=MAX_ENTRIES - examined)
            except OSError as exc:
                if exc.errno == errno.E2BIG:  # each entry costs memory until the snapshot is saved
                    raise walk.too_many(root, MAX_ENTRIES) from exc
                if folder == root:
                    raise SourceError(f"{root}: cannot list: {exc.strerror}") from exc
                self._skip(prefix.rstrip("/"), f"the folder cannot be listed ({exc.strerror})")
                continue
            below: list[Pending] = []
            examined += len(entries)
            for name, looked in entries:
                rel = prefix + name
                if isinstance(looked, OSError):
                    self._skip(rel, f"cannot be examined ({looked.strerror})")
                    continue
                found = self._examine(os.path.join(folder, name), rel, looked)
                if found is None:
                    continue
                path, st = found
                if stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in above:
                        self._skip(rel, "it is a link back to a folder that contains it (a loop)")
                        continue
                    below.append((path, rel + "/", st, above | {key}))
                elif stat.S_ISREG(st.st_mode):
                    self._classify(path, rel, st, disks)
                else:
                    self._skip(rel, f"it is {describe_mode(st.st_mode)}; only regular files and folders are")
            stack.extend(reversed(below))

    def _examine(self, path: str, rel: str, st: os.stat_result | None = None) -> tuple[str, os.stat_result] | None:
        """(path, stat) of an entry (``st``: its ``lstat``, when the listing took it), a link
        followed where allowed; None (and a warning) when it cannot be examined or is a link
        not followed."""
        try:
            st = st or os.lstat(path)
        except OSError as exc:
            self._skip(rel, f"cannot be examined ({exc.strerror})")
            return None
        if stat.S_ISLNK(st.st_mode):
            return self._follow(rel, path)
        return path, st

    def _follow(self, rel: str, path: str) -> tuple[str, os.stat_result] | None:
        """Where a link leads, if it is followed: (real path, its stat); else None (and a warning)."""
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if not self._follow_links:
            self._skip(rel, f"it is a link (to {target}); links are not followed (see --follow-links)")
            return None
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            self._skip(rel, f"it is a link (to {target}) that leads nowhere ({exc.strerror})")
            return None
        if not self._rule.allows(real):
            self._skip(
                rel,
                f"it is a link to {real}, outside the VM folder and the allowed folders ({self._rule.describe()})",
            )
            return None
        return real, st

    def _classify(
        self, path: str, rel: str, st: os.stat_result, disks: list[tuple[str, str, os.stat_result, str]]
    ) -> None:
        disk_name = rel.lower().endswith(_DISK_NAMES)
        try:
            fd, _ = open_checked(
                path, block_devices=False, nofollow=True, expect=(st.st_dev, st.st_ino), inside=self._rule
            )
        except SourceError as exc:
            if disk_name:
                raise SourceError(f"{rel}: a disk image that cannot be read: {exc}") from exc
            self._skip(rel, str(exc))
            return
        try:
            fmt = detect_format_fd(fd, path)
        finally:
            os.close(fd)
        if fmt != FALLBACK_FORMAT or rel.lower().endswith(_RAW_SUFFIXES):
            disks.append((path, rel, st, self._format_of(rel, fmt)))
        else:
            self.files.append(
                SourceFile(
                    rel,
                    st.st_size,
                    stat.S_IMODE(st.st_mode),
                    st.st_mtime_ns,
                    checked_opener(path, rel, st, self.warnings, inside=self._rule),
                )
            )

    def _format_of(self, rel: str, probed: str) -> str:
        """The format to read disk ``rel`` in, its content said ``probed``. Always a format
        named, never "the content's" again: the file is opened once more to be read, and a guest
        writing its disk meanwhile must not change what it is read as after this was decided.

        A guest writes the content of its raw disk and can make it begin like a qcow2 (with a
        backing file naming another VM's disk), a VHD or a VHDX: qemu's format probing issue.
        A disk named ``.raw`` is raw whatever its first bytes say (``detect_format_fd``); one
        the previous snapshot recorded as raw (an ``.img``) is read raw again; any other change
        of format since that snapshot is read as the content says, with a warning, as is an
        ``.img`` that is not raw at its first backup."""
        was = self._previous.formats.get(rel) if self._previous is not None else None
        if was is None and probed != FALLBACK_FORMAT and rel.lower().endswith(_RAW_SUFFIXES):
            # its first backup: nothing tells a qcow2 named .img from a raw disk whose guest
            # wrote a qcow2 header, so say it once (later backups keep what this one records)
            self.warnings.append(
                f"{rel}: read as a {probed} image, as its content says; if it is a raw disk, what its guest "
                "wrote decided that: name raw disks .raw"
            )
        if was is None or was == probed:
            return probed
        snap = self._previous.snapshot_id[:8] if self._previous is not None else "?"
        if was == FALLBACK_FORMAT:
            self.warnings.append(
                f"{rel}: read as raw, as snapshot {snap} recorded it, though it now begins like a {probed} image "
                f"(a guest can write such a header into its raw disk; if the file was converted to {probed}, "
                f"give it that format's name, e.g. .{probed})"
            )
            return FALLBACK_FORMAT
        self.warnings.append(f"{rel}: snapshot {snap} recorded it as {was}; it now reads as {probed}")
        return probed

    # ---------------------------------------------------------------------------- disks

    def _add_disk(self, path: str, rel: str, st: os.stat_result, fmt: str, *, fd: int | None = None) -> None:
        """Store the image at ``path`` as disk ``rel``: the very file ``st`` describes (the one
        the scan saw, or the one open as ``fd``, which this takes over); its mode, owner and
        times are recorded from ``st``, never from another look at the name."""
        try:
            if fd is None:
                img = open_image(path, format=fmt, rule=self._rule, expect=(st.st_dev, st.st_ino))
            else:
                img = open_image(path, format=fmt, rule=self._rule, fd=fd)
        except VmvaultError:
            raise
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from exc
        self._images.append(img)
        self.disks.append(
            SourceDisk(
                name=rel,
                image=img,
                format=img.format,
                meta={
                    "file_size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "mode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                },
            )
        )

    def _link_layers(self, root: str) -> None:
        """A differencing image whose parent is a disk of the folder becomes a layer of that parent."""
        by_real = {os.path.realpath(img.path): d for d, img in zip(self.disks, self._images, strict=True)}
        home = os.path.realpath(root)
        for disk, img in zip(self.disks, self._images, strict=True):
            parent = img.parent
            if parent is None:
                continue
            real = os.path.realpath(parent.path)
            parent_disk = by_real.get(real)
            if parent_disk is not None:
                disk.layer = True
                disk.parent_name = parent_disk.name
            elif real.startswith(home + os.sep):
                self.warnings.append(
                    f"{disk.name}: its parent {parent.path} is not stored as a disk (its name is no disk "
                    "image name); storing the merged disk"
                )
            else:
                self.warnings.append(
                    f"{disk.name}: its parent {parent.path} is outside the VM folder (in an allowed folder); "
                    "storing the merged disk"
                )

    def close(self) -> None:
        for img in self._images:
            img.close()
        self._images = []


class HostVmSession(FilesSession):
    """One VM of a host folder: its files only, stored as a VM folder (see the module
    documentation)."""

    def __init__(
        self,
        host: HostFolder,
        vm: HyperVVm,
        *,
        allow_parent_dirs: Sequence[str],
        follow_links: bool,
        previous: PreviousBackup | None = None,
    ) -> None:
        self._members = _host_members(host, vm)
        super().__init__(
            host.root,
            single=False,
            allow_parent_dirs=[*host.disk_folders[1:], *allow_parent_dirs],
            follow_links=follow_links,
            previous=previous,
        )
        self.vm = {"hypervisor": "files", "name": vm.name, "id": vm.vm_id, "generation": vm.generation}
        self.extra = {"hyperv_host_folder": {"folder": host.root, "configuration": vm.config_path}}
        self.warnings[:0] = vm.warnings

    def _gather(self, root: str, disks: list[tuple[str, str, os.stat_result, str]]) -> None:
        for member, rel in self._members:
            found = self._examine(member, rel)
            if found is None:
                continue
            path, st = found
            if stat.S_ISREG(st.st_mode):
                self._classify(path, rel, st, disks)
            else:
                self._skip(rel, f"it is {describe_mode(st.st_mode)}; only regular files are")


def _host_members(host: HostFolder, vm: HyperVVm) -> list[tuple[str, str]]:
    """(path, stored name) of every file of ``vm``: its configuration files as they lie below
    the host folder, its disks below ``Virtual Hard Disks/`` (those below the host folder keep
    their place there). Refuses a VM whose files cannot be told (SourceError)."""
    from vmvault.hypervisors.hyperv_model import DISK_FOLDER

    where = host.location(vm)
    if vm.config_error is not None:
        raise SourceError(
            f"{where}: configuration unreadable ({vm.config_error}); which files are this VM's cannot be told, "
            "so nothing is backed up"
        )
    if vm.missing:
        slot, pathname = sorted(vm.missing.items())[0]
        raise SourceError(
            f"{where}: disk {pathname} ({slot}) named by the configuration is not among the files here "
            f"(looked in {', '.join(host.disk_folders)}; --allow-parent-dir DIR adds a folder)"
        )
    members = [(os.path.join(host.root, rel), rel) for rel in vm.other_files]
    taken: dict[str, str] = {rel.lower(): os.path.join(host.root, rel) for rel in vm.other_files}
    for path, disk in sorted(vm.disks.items()):
        rel = disk.rel if not os.path.isabs(disk.rel) else f"{DISK_FOLDER}/{os.path.basename(path)}"
        other = taken.get(rel.lower())
        if other is not None:
            raise SourceError(f"{where}: {path} and {other} would both be stored as {rel}; rename one")
        taken[rel.lower()] = path
        members.append((path, rel))
    return members


class FilesSource(Source):
    """A VM folder, one image file, or one VM of a Hyper-V host folder (``HOSTFOLDER#VM``, by
    name or ID). Its options (``BackupOptions``): ``allow_parent_dirs``, folders outside the VM
    folder (or the image's folder) where disk parents (and a host folder's disks) may be, and
    links lead when ``follow_links``."""

    kind = "files"
    formats_pinned = True

    def __init__(self, path: str) -> None:
        self._host_vm: tuple[str, str] | None = None
        if "#" in path and not os.path.lexists(path):
            # the Hyper-V layout is read only for a HOSTFOLDER#VM source
            from vmvault.hypervisors.hyperv_model import VM_FOLDER, split_host_spec

            self._host_vm = split_host_spec(path)
        if self._host_vm is not None:
            root, selector = self._host_vm
            if not os.path.isdir(os.path.join(root, VM_FOLDER)):
                raise SourceError(
                    f"{path}: {root} has no {VM_FOLDER!r} folder; HOSTFOLDER#VM names a VM of a Hyper-V host folder"
                )
            self.path = root
            self.location = f"{root}#{selector}"
            return
        self.path = os.path.abspath(path)
        self.location = self.path
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            hint = " (HOSTFOLDER#VM needs HOSTFOLDER to be a folder)" if "#" in path else ""
            raise SourceError(f"{path}: no such file or folder{hint}") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from exc
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise SourceError(f"{path}: is {describe_mode(st.st_mode)}; vmvault backs up VM folders and disk images")
        self._single = not stat.S_ISDIR(st.st_mode)

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        allow = options.parent_folders()
        # Offline files have no change tracking: every backup reads all allocated data and
        # stores only new chunks.
        if self._host_vm is not None:
            from vmvault.hypervisors.hyperv_model import discover_host

            host = discover_host(self._host_vm[0], disk_folders=tuple(allow))
            vm = host.select(self._host_vm[1])
            return HostVmSession(
                host, vm, allow_parent_dirs=allow, follow_links=options.follow_links, previous=previous
            )
        return FilesSession(
            self.path,
            single=self._single,
            allow_parent_dirs=allow,
            follow_links=options.follow_links,
            previous=previous,
        )
