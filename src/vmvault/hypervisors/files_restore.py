"""What a clone of a VM folder leaves as it was.

A clone of a VM folder or image file (``restore --as-clone``) renames the disks and files whose
names carry the VM's name; it does not edit the other files. A VM configuration among them
(``vm.conf``, a ``.vmx``, a ``.vmcx``, a libvirt XML, a start script) may still name the original
VM or its disks by their old names, and the clone started from it would use the original's
disks. vmvault cannot rewrite a format it does not know, so it says which restored files still
name the original, in the restore's summary and its ``--json`` (``not_rewritten``).

The files are the restore's own output, read back without following links, and only up to
:data:`SEARCHED_BYTES` each: a configuration is small, a disk-sized file is not one.
"""

from __future__ import annotations

import os
import re
import stat

from vmvault import platform
from vmvault.hypervisors.base import RestoredVm, RestoreNote

__all__ = ["SEARCHED_BYTES", "after_restore"]

#: the most of one restored file searched for the original's names
SEARCHED_BYTES = 4 * 1024 * 1024


#: characters that continue a name: a match next to one is part of another name
_NAME_CHARS = rb"A-Za-z0-9_.\-"


def _pattern(name: str) -> re.Pattern[bytes]:
    """A name as a whole word, written as UTF-8 or as UTF-16LE (as Windows writes it)."""
    utf8 = re.escape(name.encode("utf-8", "surrogateescape"))
    utf16 = re.escape(name.encode("utf-16-le", "surrogatepass"))
    return re.compile(
        rb"(?<![" + _NAME_CHARS + rb"])" + utf8 + rb"(?![" + _NAME_CHARS + rb"])"
        rb"|(?<![" + _NAME_CHARS + rb"]\x00)" + utf16 + rb"(?![" + _NAME_CHARS + rb"]\x00)"
    )


def _head(path: str) -> bytes | None:
    """Up to :data:`SEARCHED_BYTES` of a restored file, or None when it cannot be read."""
    try:
        # the target is not trusted: a name swapped for a FIFO or a device since the restore
        # wrote it must neither hang the open nor be read
        fd = platform.open_nofollow(path, os.O_RDONLY | platform.O_NONBLOCK | platform.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        platform.set_blocking(fd)
        chunks: list[bytes] = []
        got = 0
        while got < SEARCHED_BYTES:
            data = platform.pread(fd, SEARCHED_BYTES - got, got)
            if not data:
                break
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def after_restore(restored: RestoredVm) -> RestoreNote:
    """For a clone: the restored files that still name the original VM or its disks' old names."""
    if restored.clone_name is None:
        return RestoreNote()
    old_vm = str(restored.vm.get("name") or "")
    # a disk's or file's old name -> the name it was restored under (only those that changed)
    renamed = {
        os.path.basename(stored): os.path.basename(path)
        for stored, path in [*restored.disks.items(), *restored.files.items()]
        if os.path.basename(stored) != os.path.basename(path)
    }
    wanted = dict(renamed)
    if old_vm and old_vm != restored.clone_name:
        wanted.setdefault(old_vm, restored.clone_name)
    patterns = {old: _pattern(old) for old in wanted}
    found: list[tuple[str, list[str]]] = []
    unread: list[str] = []
    for stored in sorted(restored.files):
        data = _head(restored.files[stored])
        if data is None:
            unread.append(stored)
            continue
        names = sorted(old for old, pattern in patterns.items() if pattern.search(data))
        if names:
            found.append((stored, names))
    note = RestoreNote(facts={"not_rewritten": [{"file": f, "names": n} for f, n in found]})
    for stored, names in found:
        named = ", ".join(
            f"{old} (restored as {renamed[old]})" if old in renamed else f"{old} (the original VM)" for old in names
        )
        note.lines.append(
            f"  warning: {stored} was not rewritten for the clone and still names {named}: "
            "edit it before starting the clone, or it uses the original's name and disks"
        )
    for stored in unread:
        note.lines.append(f"  warning: {stored} could not be read back to check it for the original's names")
    return note
