"""The NBD protocol's wire layout, shared by vmvault's client (``hypervisors/_nbd.py``: reading
QEMU's and libvirt's exports) and its server (``engine/nbd.py``: ``vmvault serve``).

From the NBD protocol specification (doc/proto.md in the NetworkBlockDevice/nbd repository) and
QEMU's docs/interop/nbd.txt for the ``qemu:dirty-bitmap:`` context. Every field is big-endian.
"""

from __future__ import annotations

import enum
import struct

# -- handshake ("Newstyle negotiation") --------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle server, and the prefix of every option
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1

# -- transmission -------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: transmission flags (NBD_FLAG_*) announced in NBD_INFO_EXPORT
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10

#: command flags (NBD_CMD_FLAG_*)
CMD_FLAG_REQ_ONE = 1 << 3

#: NBD_REPLY_FLAG_DONE: the last chunk of a structured reply
REPLY_FLAG_DONE = 1 << 0

#: base:allocation flags ("base:allocation metadata context")
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: qemu:dirty-bitmap:NAME flags (QEMU docs/interop/nbd.txt): bit 0 set = dirty
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4


#: option replies with bit 31 set are errors (NBD_REP_ERR_*)
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1
REP_ERR_POLICY = REP_ERROR_BIT | 2
REP_ERR_INVALID = REP_ERROR_BIT | 3
REP_ERR_TLS_REQD = REP_ERROR_BIT | 5
REP_ERR_UNKNOWN = REP_ERROR_BIT | 6
REP_ERRORS = {
    REP_ERROR_BIT | 1: "unsupported option",
    REP_ERROR_BIT | 2: "policy: refused by server",
    REP_ERROR_BIT | 3: "invalid option",
    REP_ERROR_BIT | 4: "platform",
    REP_ERROR_BIT | 5: "TLS required",
    REP_ERROR_BIT | 6: "unknown export",
    REP_ERROR_BIT | 7: "server shutting down",
    REP_ERROR_BIT | 8: "block size required",
    REP_ERROR_BIT | 9: "too big",
}


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


#: errno values the server sends (NBD_EPERM ...), for messages
NBD_ERRNO = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}

# -- fixed headers --------------------------------------------------------------------------
SERVER_HELLO = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
assert SERVER_HELLO.size == 18
CLIENT_FLAGS = struct.Struct(">I")
assert CLIENT_FLAGS.size == 4
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
assert OPTION_HEADER.size == 16
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
assert OPTION_REPLY.size == 20
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
assert INFO_EXPORT.size == 12
EXPORT_NAME_REPLY = struct.Struct(">QH")  # the reply to NBD_OPT_EXPORT_NAME: size, transmission flags
assert EXPORT_NAME_REPLY.size == 10
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
assert INFO_BLOCK_SIZE.size == 14
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
assert REQUEST.size == 28
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
assert SIMPLE_REPLY.size == 16
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
assert STRUCTURED_REPLY.size == 20
BLOCK_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
assert BLOCK_DESCRIPTOR.size == 8
