"""Offline sources: a single disk image file, or a VM folder.

A folder is a VM: every file whose content is a disk image (VHDX, VHD, qcow2) or whose name
says raw disk (``.raw``, ``.img``) is stored as a disk; every other file is stored as a file
with its mode and mtime. A differencing image whose parent is also in the folder is stored as
a *layer* of that parent, so a checkpoint chain is kept as a chain, each layer stored once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import IO

from vmvault.disk import DISK_SUFFIXES, detect_format, open_image
from vmvault.disk.base import DiskImage
from vmvault.errors import SourceError, VmvaultError
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk, SourceFile

__all__ = ["FilesSource"]

_RAW_SUFFIXES = (".raw", ".img")


def _is_disk(path: str) -> tuple[bool, str]:
    fmt = detect_format(path)
    if fmt != "raw":
        return True, fmt
    return path.lower().endswith(_RAW_SUFFIXES), "raw"


def _opener(path: str) -> Callable[[], IO[bytes]]:
    def open_file() -> IO[bytes]:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc

    return open_file


class FilesSession(BackupSession):
    def __init__(self, root: str, single: bool) -> None:
        self.vm = {"hypervisor": "files", "name": os.path.basename(root.rstrip("/")) or root}
        self.disks = []
        self.files = []
        self.consistency = "offline"
        self.warnings = []
        self.extra = {}
        self._images: list[DiskImage] = []
        try:
            if single:
                self._add_disk(os.path.dirname(root), root)
            else:
                self._scan(root)
        except BaseException:
            self.close()
            raise

    def _scan(self, root: str) -> None:
        disk_paths: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=self._walk_error):
            dirnames.sort()
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    raise SourceError(f"{full}: {exc.strerror}") from exc
                if not stat.S_ISREG(st.st_mode):
                    self.warnings.append(f"skipped {full}: not a regular file")
                    continue
                try:
                    is_disk, _fmt = _is_disk(full)
                except SourceError:
                    raise
                if is_disk:
                    disk_paths.append(full)
                else:
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    self.files.append(
                        SourceFile(rel, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, _opener(full))
                    )
        for path in disk_paths:
            self._add_disk(root, path)
        # a differencing image whose parent is in the folder becomes a layer of that parent
        by_real = {os.path.realpath(img.path): d for d, img in zip(self.disks, self._images, strict=True)}
        for disk, img in zip(self.disks, self._images, strict=True):
            parent = img.parent
            if parent is None:
                continue
            parent_disk = by_real.get(os.path.realpath(parent.path))
            if parent_disk is not None:
                disk.layer = True
                disk.parent_name = parent_disk.name
            else:
                self.warnings.append(
                    f"{disk.name}: its parent {parent.path} is outside the VM folder; storing the merged disk"
                )

    @staticmethod
    def _walk_error(exc: OSError) -> None:
        raise SourceError(f"{exc.filename}: {exc.strerror}") from exc

    def _add_disk(self, root: str, path: str) -> None:
        try:
            img = open_image(path)
        except VmvaultError:
            raise
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from exc
        self._images.append(img)
        rel = os.path.relpath(path, root).replace(os.sep, "/") if root else os.path.basename(path)
        st = os.stat(path)
        self.disks.append(
            SourceDisk(
                name=rel,
                image=img,
                format=img.format,
                meta={"file_size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)},
            )
        )

    def close(self) -> None:
        for img in self._images:
            img.close()
        self._images = []


class FilesSource(Source):
    kind = "files"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.location = self.path
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such file or folder") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from exc

    def open_session(self, previous: PreviousBackup | None) -> BackupSession:
        # Offline files have no change tracking: every backup reads all allocated data and
        # stores only new chunks.
        return FilesSession(self.path, single=os.path.isfile(self.path))


def looks_like_disk(path: str) -> bool:
    return os.path.isfile(path) and (path.lower().endswith(DISK_SUFFIXES) or detect_format(path) != "raw")
