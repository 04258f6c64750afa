"""Walking folders that someone else writes: a VM folder, a Hyper-V host folder, swtpm's state.

Whoever writes such a folder can race a walk and fill it. Every folder is listed through
``platform.list_folder``: a subfolder swapped for a link after the listing above saw it is not
entered (the walk would go where the link leads, into a host folder), and links are never
followed. A walk examines at most a fixed number of entries in all its folders, and a
folder's listing stops one past what is left: millions of empty files would otherwise have
the walk hold their names, and the backup hold what it records of each, without bound.

``vmvault.hypervisors.files`` walks VM folders itself (it follows links where allowed and
names every entry it leaves out) with the same listing and the same bound.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence

from vmvault import platform
from vmvault.errors import SourceError

__all__ = ["HINT_DISKS", "HINT_HOST", "HINT_TPM", "HINT_VM", "MAX_ENTRIES", "regular_files", "too_many"]

#: entries (files, folders, anything) one walk examines at most: a VM folder holds a few
#: dozen, a host folder a few dozen per VM
MAX_ENTRIES = 100_000


#: what a walk's "too many" error asks, by the kind of folder walked
HINT_VM = "a VM folder holds a few dozen: is this the VM's folder? Nothing was backed up"
HINT_HOST = "a host folder holds a few dozen per VM: is this where the host keeps its VMs? Nothing was backed up"
HINT_DISKS = "a disk folder holds a few files per disk: are these where the host keeps its disks? Nothing was backed up"
HINT_TPM = "swtpm keeps a few files per VM"


def too_many(root: str, limit: int, hint: str = HINT_VM) -> SourceError:
    """The error of a walk below ``root`` that found more than ``limit`` entries; ``hint``
    says what such a folder usually holds (``HINT_VM``, ``HINT_HOST``, …)."""
    return SourceError(f"{root}: more than {limit:,} files and folders; {hint}")


def regular_files(
    folders: Sequence[str], warnings: list[str], *, limit: int = MAX_ENTRIES, hint: str = HINT_VM
) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of every regular file below ``folders``, each walked in turn: a
    folder's files in name order, then its subfolders'; a file reached twice (hard links,
    folders within one another) once.

    Links, and anything that is neither a regular file nor a folder, are passed over. A
    subfolder that cannot be listed (or was swapped since it was seen) is named in
    ``warnings``; the first folder that cannot be listed, and more than ``limit`` entries in
    all (``too_many`` with ``hint``, naming the folder whose listing went past), are a
    SourceError. Iterative: a hostile folder may be nested thousands deep.
    """
    seen_files: set[tuple[int, int]] = set()
    examined = 0
    # (folder, its lstat as listed above: None for the folders given)
    stack: list[tuple[str, os.stat_result | None]] = [(f, None) for f in reversed(folders)]
    while stack:
        folder, seen = stack.pop()
        try:
            entries = platform.list_folder(folder, seen, limit=limit - examined)
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                raise too_many(folder, limit, hint) from exc
            if folder == folders[0]:
                raise SourceError(f"{folder}: cannot list: {exc.strerror}") from exc
            warnings.append(f"{folder}: cannot list: {exc.strerror}")
            continue
        examined += len(entries)
        below: list[tuple[str, os.stat_result | None]] = []
        for name, st in entries:
            path = os.path.join(folder, name)
            if isinstance(st, OSError):
                if not isinstance(st, FileNotFoundError):  # one removed meanwhile is no news
                    warnings.append(f"{path}: cannot be examined: {st.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                below.append((path, st))
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                yield path, st
        stack.extend(reversed(below))
