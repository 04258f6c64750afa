"""A seccomp filter for the filesystem worker: the system calls a hostile filesystem could use
once it runs code in the worker are refused.

The worker (:mod:`vmvault.browse._worker`) has imported everything it needs and holds only its
two pipes when it installs this filter; from then on it computes and talks over those pipes.
The filter refuses, with ``EPERM``, every call that reaches anything outside the process:

* opening any file (``open``, ``openat``, ``openat2``, ``creat``, by handle): the files its user
  may read are out of reach, not only the ones ``nobody`` may not read;
* changing the file system (unlink, rename, mkdir, rmdir, link, symlink, chmod, chown,
  truncate, mknod, times, extended attributes, with Linux 6.13's ``setxattrat`` and
  ``removexattrat`` and 6.17's ``file_setattr``): ``RLIMIT_FSIZE`` stops writing a file's bytes,
  not these, and a worker that kept root's user id could otherwise remove any file;
* reading what a path holds besides its bytes: extended attributes (``getxattr``,
  ``listxattr``, their ``l`` and ``*at`` forms, ``file_getattr``), watches on files
  (``inotify``, ``fanotify_mark``), the mount table (``statmount``, ``listmount``, ``listns``),
  the kernel's log (``syslog``);
* System V IPC and POSIX message queues (``shmget``, ``shmat``, ``semop``, ``msgrcv``,
  ``mq_open`` and the rest): shared memory, semaphores and queues of the user's other
  processes (the worker also takes an IPC namespace of its own where the system allows);
* starting programs or processes (``execve``, ``fork``, ``vfork``, a ``clone`` that is not a
  thread's; ``clone3`` answers ``ENOSYS`` so the C library starts threads with ``clone``);
* the network and local sockets (``socket``, ``socketpair``, ``connect``, ``bind``, ``listen``,
  ``accept``): the network namespace already has no route, and this also closes unix sockets;
* other processes (``ptrace``, ``process_vm_readv``/``writev``, ``kill``, ``tkill``,
  ``tgkill``, ``rt_sigqueueinfo``, the ``pidfd`` calls, ``kcmp``, ``process_madvise``,
  ``move_pages``) and their share of the machine (``setpriority``, the scheduler and I/O
  priority calls, ``setrlimit``, and ``prlimit64`` but on itself);
* namespaces, mounts, changes of user or group, and the kernel's larger attack surface
  (``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring``, ``keyctl``, modules, kexec,
  reboot, swap, the clock, ``personality``, ``modify_ldt``, ``uselib``, ``lookup_dcookie``,
  ``vhangup``, quotas), and the machine's disks (``sync``, ``syncfs``).

A call made with another architecture's numbering (``int 0x80`` on x86-64) kills the process,
as does the x32 numbering: the numbers above would not hold there. The filter is written for
x86-64 and AArch64 (numbers checked against the kernel headers by the tests); elsewhere, or where
the kernel refuses it, the worker goes on with its other limits.

A denylist, not an allowlist: what Python and the library need to compute (memory, the pipes,
signals, time, threads) is left alone, so a call that neither reaches outside nor was foreseen
cannot break a listing. The calls that read a path's metadata stay open (``newfstatat``, which
glibc's ``fstat`` of the worker's own pipes goes through, so the two cannot be told apart;
``statx``, ``readlink``, ``access``): they find nothing, for the worker's root is a removed
empty folder (:func:`vmvault.browse._worker.confine`) where the system allows it one, and where
it does not they tell whether a host path exists, its size and times, never a byte of a file. A
call added to Linux after the kernel these tables were checked against (:data:`NEWEST`) is
refused with ``ENOSYS``, as a kernel without it answers, so the C library falls back to the
older calls it uses there: a new call that reaches outside the process is not open until someone
has looked at it (Linux 6.13's ``setxattrat`` was, before 6 December 2026).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from typing import Final

__all__ = ["DENIED", "NEWEST", "install", "program"]

#: the refused calls with their numbers on each architecture (``uname -m``); AArch64 has no
#: ``open``, ``fork``, ``unlink`` and the like (its C library uses the ``*at`` forms)
DENIED: Final[dict[str, dict[str, int]]] = {
    "x86_64": {
        "open": 2, "openat": 257, "openat2": 437, "creat": 85, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "execve": 59, "execveat": 322, "fork": 57, "vfork": 58,
        "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43,
        "accept4": 288, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kill": 62,
        "tkill": 200, "tgkill": 234, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "mount_setattr": 442, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "move_mount": 429, "open_tree": 428, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
        "iopl": 172, "ioperm": 173, "quotactl": 179, "acct": 163, "settimeofday": 164,
        "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170,
        "setdomainname": 171, "personality": 135, "unlink": 87, "unlinkat": 263, "rename": 82,
        "renameat": 264, "renameat2": 316, "mkdir": 83, "mkdirat": 258, "rmdir": 84, "link": 86,
        "linkat": 265, "symlink": 88, "symlinkat": 266, "chmod": 90, "fchmod": 91, "fchmodat": 268,
        "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "truncate": 76,
        "ftruncate": 77, "mknod": 133, "mknodat": 259, "utime": 132, "utimes": 235, "utimensat": 280,
        "futimesat": 261, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
        "lremovexattr": 198, "fremovexattr": 199, "setuid": 105, "setgid": 106, "setreuid": 113,
        "setregid": 114, "setresuid": 117, "setresgid": 119, "setgroups": 116, "setfsuid": 122,
        "setfsgid": 123, "fanotify_init": 300, "setrlimit": 160, "setpriority": 141,
        "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314,
        "ioprio_set": 251, "migrate_pages": 256, "move_pages": 279, "process_madvise": 440, "kcmp": 312,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
        "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240,
        "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
        "mq_getsetattr": 245, "getxattr": 191, "lgetxattr": 192, "listxattr": 194, "llistxattr": 195,
        "setxattrat": 463, "getxattrat": 464, "listxattrat": 465, "removexattrat": 466,
        "file_getattr": 468, "file_setattr": 469, "open_tree_attr": 467, "statmount": 457,
        "listmount": 458, "listns": 470, "quotactl_fd": 443, "inotify_init": 253,
        "inotify_add_watch": 254, "inotify_init1": 294, "fanotify_mark": 301, "syslog": 103,
        "uselib": 134, "modify_ldt": 154, "lookup_dcookie": 212, "vhangup": 153, "sync": 162,
        "syncfs": 306,
    },
    "aarch64": {
        "openat": 56, "openat2": 437, "open_by_handle_at": 265, "name_to_handle_at": 264, "execve": 221,
        "execveat": 281, "socket": 198, "socketpair": 199, "connect": 203, "bind": 200, "listen": 201,
        "accept": 202, "accept4": 242, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "kill": 129, "tkill": 130, "tgkill": 131, "pidfd_open": 434, "pidfd_getfd": 438,
        "pidfd_send_signal": 424, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "unshare": 97, "setns": 268, "mount_setattr": 442, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294,
        "reboot": 142, "swapon": 224, "swapoff": 225, "quotactl": 60, "acct": 89, "settimeofday": 170,
        "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "sethostname": 161,
        "setdomainname": 162, "personality": 92, "unlinkat": 35, "renameat": 38, "renameat2": 276,
        "mkdirat": 34, "linkat": 37, "symlinkat": 36, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452,
        "fchown": 55, "fchownat": 54, "truncate": 45, "ftruncate": 46, "mknodat": 33, "utimensat": 88,
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
        "fremovexattr": 16, "setuid": 146, "setgid": 144, "setreuid": 145, "setregid": 143,
        "setresuid": 147, "setresgid": 149, "setgroups": 159, "setfsuid": 151, "setfsgid": 152,
        "fanotify_init": 262, "setrlimit": 164, "setpriority": 140, "sched_setaffinity": 122,
        "sched_setscheduler": 119, "sched_setparam": 118, "sched_setattr": 274, "ioprio_set": 30,
        "migrate_pages": 238, "move_pages": 239, "process_madvise": 440, "kcmp": 272, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197,
        "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193, "msgget": 186, "msgctl": 187,
        "msgrcv": 188, "msgsnd": 189, "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182,
        "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185, "getxattr": 8, "lgetxattr": 9,
        "listxattr": 11, "llistxattr": 12, "setxattrat": 463, "getxattrat": 464, "listxattrat": 465,
        "removexattrat": 466, "file_getattr": 468, "file_setattr": 469, "open_tree_attr": 467,
        "statmount": 457, "listmount": 458, "listns": 470, "quotactl_fd": 443, "inotify_init1": 26,
        "inotify_add_watch": 27, "fanotify_mark": 263, "syslog": 116, "lookup_dcookie": 18,
        "vhangup": 58, "sync": 81, "syncfs": 267,
    },
}  # fmt: skip

#: ``clone`` and ``clone3`` per architecture: a clone is allowed when it makes a thread
_CLONE: Final[dict[str, tuple[int, int]]] = {"x86_64": (56, 435), "aarch64": (220, 435)}
#: ``prlimit64``: allowed on the worker itself only
_PRLIMIT: Final[dict[str, int]] = {"x86_64": 302, "aarch64": 261}
#: the newest call of the kernel tables these lists were checked against (Linux 6.19: ``listns``,
#: 470, on both architectures): every call numbered above it is refused with ``ENOSYS``
NEWEST: Final[dict[str, int]] = {"x86_64": 470, "aarch64": 470}
#: ``AUDIT_ARCH_*`` (linux/audit.h)
_AUDIT_ARCH: Final[dict[str, int]] = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: x86-64's x32 numbering sets this bit
_X32_BIT: Final[int] = 0x40000000
_CLONE_THREAD: Final[int] = 0x00010000

# classic BPF (linux/filter.h, linux/seccomp.h)
_LD_W_ABS: Final[int] = 0x20
_JEQ_K: Final[int] = 0x15
_JGE_K: Final[int] = 0x35
_JSET_K: Final[int] = 0x45
_RET_K: Final[int] = 0x06
_RET_ALLOW: Final[int] = 0x7FFF0000
_RET_KILL_PROCESS: Final[int] = 0x80000000
_RET_ERRNO: Final[int] = 0x00050000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR: Final[int] = 0
_ARCH: Final[int] = 4
_ARG0_LOW: Final[int] = 16  # little-endian: the low 32 bits of args[0]
_PR_SET_SECCOMP: Final[int] = 22
_SECCOMP_MODE_FILTER: Final[int] = 2

_Insn = tuple[int, int, int, int]


def program(machine: str | None = None) -> list[_Insn]:
    """The filter for ``machine`` (``platform.machine()``) as ``(code, jt, jf, k)`` instructions;
    ValueError for an architecture it is not written for."""
    machine = machine or platform.machine()
    if machine not in DENIED:
        raise ValueError(f"no seccomp filter is written for {machine}")
    clone, clone3 = _CLONE[machine]
    prlimit = _PRLIMIT[machine]
    # (code, true label, false label, k): a label is where a jump goes, None the next instruction
    Step = tuple[int, str | None, str | None, int]
    steps: list[Step | str] = [(_LD_W_ABS, None, None, _ARCH), (_JEQ_K, None, "kill", _AUDIT_ARCH[machine])]
    steps.append((_LD_W_ABS, None, None, _NR))
    if machine == "x86_64":
        steps.append((_JGE_K, "kill", None, _X32_BIT))
    steps.append((_JGE_K, "enosys", None, NEWEST[machine] + 1))
    steps += [(_JEQ_K, "eperm", None, nr) for nr in sorted(set(DENIED[machine].values()))]
    steps += [(_JEQ_K, "enosys", None, clone3), (_JEQ_K, "clone", None, clone), (_JEQ_K, None, "allow", prlimit)]
    # prlimit64 on itself only (pid 0: glibc's getrlimit and setrlimit); on another process it
    # would lower that one's limits (vmvault's own, when the worker kept root's user id)
    steps += [(_LD_W_ABS, None, None, _ARG0_LOW), (_JEQ_K, None, "eperm", 0)]
    steps += [(_LD_W_ABS, None, None, _ARG0_LOW + 4), (_JEQ_K, "allow", "eperm", 0)]
    steps += ["clone", (_LD_W_ABS, None, None, _ARG0_LOW), (_JSET_K, "allow", "eperm", _CLONE_THREAD)]
    steps += ["allow", (_RET_K, None, None, _RET_ALLOW), "enosys", (_RET_K, None, None, _RET_ERRNO | errno.ENOSYS)]
    steps += ["eperm", (_RET_K, None, None, _RET_ERRNO | errno.EPERM), "kill", (_RET_K, None, None, _RET_KILL_PROCESS)]
    labels: dict[str, int] = {}
    count = 0
    for step in steps:
        if isinstance(step, str):
            labels[step] = count
        else:
            count += 1
    out: list[_Insn] = []
    for step in steps:
        if not isinstance(step, str):
            code, true, false, k = step
            here = len(out) + 1  # jumps count from the next instruction
            out.append((code, _jump(labels, true, here), _jump(labels, false, here), k))
    return out


def _jump(labels: dict[str, int], label: str | None, here: int) -> int:
    distance = 0 if label is None else labels[label] - here
    if not 0 <= distance <= 255:  # pragma: no cover - the tables are far below this
        raise ValueError("seccomp program too long for its jumps")
    return distance


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> str | None:
    """Install the filter on this process (for good: no call removes it); None when it is in
    place, else why not (another architecture, a kernel without seccomp, ``no_new_privs``
    not set). Threads started afterwards inherit it; threads already running do not."""
    try:
        insns = program()
    except ValueError as exc:
        return str(exc)
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(insns), ctypes.cast(buffer, ctypes.c_void_p))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:  # pragma: no cover - a system without a C library to ask
        return f"no C library: {exc}"
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        return f"the kernel refused the seccomp filter: {errno.errorcode.get(ctypes.get_errno(), '?')}"
    return None
