"""Wire layout of the SSH File Transfer Protocol, version 3, and of the OpenSSH extensions the
SFTP backend uses.

References: draft-ietf-secsh-filexfer-02 (SFTP version 3), sections 3 (packet format and
types), 4 (initialization), 5 (file attributes), 6 (requests) and 7 (responses); OpenSSH's
PROTOCOL file, section 4 (``posix-rename``, ``statvfs``, ``fsync`` and ``limits`` extensions).
Every integer is big-endian (the draft's ``uint32``/``uint64``); a ``string`` is a uint32
length followed by that many bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "ATTR_ACMODTIME",
    "ATTR_EXTENDED",
    "ATTR_PERMISSIONS",
    "ATTR_SIZE",
    "ATTR_UIDGID",
    "HEADER",
    "MAX_HANDLE",
    "STATVFS_FIELDS",
    "U32",
    "U64",
    "VERSION",
    "Attrs",
    "OpenFlag",
    "Packet",
    "Status",
    "pack_string",
]

#: the protocol version this client speaks (section 4)
VERSION = 3

#: a packet's first bytes: uint32 length (of what follows), byte type, uint32 request id.
#: Every reply but VERSION carries the id of the request it answers (section 7).
HEADER = struct.Struct(">IBI")
assert HEADER.size == 9
U32 = struct.Struct(">I")
assert U32.size == 4
U64 = struct.Struct(">Q")
assert U64.size == 8
#: READ's arguments after the handle: uint64 offset, uint32 length (section 6.4)
READ_ARGS = struct.Struct(">QI")
assert READ_ARGS.size == 12
#: WRITE's arguments after the handle: uint64 offset, then the data's string length (section 6.4)
WRITE_ARGS = struct.Struct(">QI")
assert WRITE_ARGS.size == 12

#: handles are opaque strings of at most 256 bytes (section 6.2)
MAX_HANDLE = 256

#: statvfs@openssh.com answers 11 uint64: f_bsize f_frsize f_blocks f_bfree f_bavail f_files
#: f_ffree f_favail f_fsid f_flag f_namemax (OpenSSH PROTOCOL section 4.4)
STATVFS_FIELDS = 11


class Packet(enum.IntEnum):
    """Packet types (section 3)."""

    INIT = 1
    VERSION = 2
    OPEN = 3
    CLOSE = 4
    READ = 5
    WRITE = 6
    LSTAT = 7
    FSTAT = 8
    SETSTAT = 9
    FSETSTAT = 10
    OPENDIR = 11
    READDIR = 12
    REMOVE = 13
    MKDIR = 14
    RMDIR = 15
    REALPATH = 16
    STAT = 17
    RENAME = 18
    READLINK = 19
    SYMLINK = 20
    STATUS = 101
    HANDLE = 102
    DATA = 103
    NAME = 104
    ATTRS = 105
    EXTENDED = 200
    EXTENDED_REPLY = 201


class Status(enum.IntEnum):
    """SSH_FXP_STATUS error codes (section 7)."""

    OK = 0
    EOF = 1
    NO_SUCH_FILE = 2
    PERMISSION_DENIED = 3
    FAILURE = 4
    BAD_MESSAGE = 5
    NO_CONNECTION = 6
    CONNECTION_LOST = 7
    OP_UNSUPPORTED = 8


class OpenFlag(enum.IntFlag):
    """SSH_FXF_* flags of OPEN (section 6.3)."""

    READ = 0x01
    WRITE = 0x02
    APPEND = 0x04
    CREAT = 0x08
    TRUNC = 0x10
    EXCL = 0x20


# attribute flags (section 5)
ATTR_SIZE = 0x00000001
ATTR_UIDGID = 0x00000002
ATTR_PERMISSIONS = 0x00000004
ATTR_ACMODTIME = 0x00000008
ATTR_EXTENDED = 0x80000000


def pack_string(data: bytes) -> bytes:
    """A ``string``: uint32 length, then the bytes."""
    return U32.pack(len(data)) + data


@dataclass(frozen=True)
class Attrs:
    """File attributes (section 5); a field the server left out is None. Extended attribute
    pairs are read past and not kept: the backend uses none."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    #: st_mode: file type and permission bits
    mode: int | None = None
    atime: int | None = None
    mtime: int | None = None

    def pack(self, extended: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """The wire form (used for the empty attributes of OPEN and MKDIR, and by tests)."""
        flags = 0
        out = b""
        if self.size is not None:
            flags |= ATTR_SIZE
            out += U64.pack(self.size)
        if self.uid is not None or self.gid is not None:
            flags |= ATTR_UIDGID
            out += U32.pack(self.uid or 0) + U32.pack(self.gid or 0)
        if self.mode is not None:
            flags |= ATTR_PERMISSIONS
            out += U32.pack(self.mode)
        if self.atime is not None or self.mtime is not None:
            flags |= ATTR_ACMODTIME
            out += U32.pack(self.atime or 0) + U32.pack(self.mtime or 0)
        if extended:
            flags |= ATTR_EXTENDED
            out += U32.pack(len(extended)) + b"".join(pack_string(k) + pack_string(v) for k, v in extended)
        return U32.pack(flags) + out
