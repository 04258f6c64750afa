"""A seccomp filter for the filesystem worker: once it runs code a hostile filesystem planted,
the worker can make only the system calls computing needs.

The worker (:mod:`vmvault.browse._worker`) has imported everything it needs and holds only its
two pipes when it installs this filter; from then on it computes and talks over those pipes.
The filter is an **allowlist** (:data:`ALLOWED`): reading and writing its pipes (and the
``fstat``, ``lseek`` and ``ioctl`` with which Python looks at them), memory (``mmap``,
``munmap``, ``mremap``, ``mprotect``, ``madvise``, ``brk``), its own signal handlers, futexes
and threads (a ``clone`` that makes a thread; ``clone3`` answers ``ENOSYS`` so the C library
starts threads with ``clone``), time and sleeping, random bytes, its own ids, limits
(``prlimit64`` on itself only) and usage, and ending. Every other call is refused with
``EPERM``: opening any file, changing the file system, extended attributes, starting programs
or processes, sockets, signalling, tracing or limiting another process, namespaces and mounts,
System V IPC and message queues, watches on files, and the kernel's larger surface (``bpf``,
``perf_event_open``, ``userfaultfd``, ``io_uring``, keys, ``splice`` and ``vmsplice``,
``memfd_create``, ...), including whatever a later kernel adds: a call numbered above the newest
of the kernel tables these were checked against (:data:`NEWEST`) answers ``ENOSYS``, as a
kernel without it would, so the C library falls back to the calls it uses there.

Until 7 December 2026 this was a denylist (the calls named were refused, the rest allowed), so
that a call nobody foresaw could not break a listing; each kernel release added calls it did not
name (Linux 6.13's ``setxattrat`` let a taken-over worker change the extended attributes of
host files until 6 December 2026). The allowlist was drawn from the calls the worker makes over
the test suite's filesystems (NTFS, FAT, exFAT, ext4; listings, walks, reads, holes, threads,
errors), traced with ``strace`` after the filter is in place, with the calls of the same kind
the C library may use instead (``poll`` beside ``ppoll``, ``nanosleep`` beside
``clock_nanosleep``). A call missing from it fails with ``EPERM`` in the worker, which then
fails the one request it serves with an error; it never widens what the worker reaches.

The calls that read a path's metadata (``newfstatat``, which glibc's ``fstat`` of the worker's
own pipes goes through, so the two cannot be told apart) find nothing: the worker's root is a
removed empty folder (:func:`vmvault.browse._worker.confine`) where the system allows it one,
and where it does not they tell whether a host path exists, its size and times, never a byte of
a file.

A call made with another architecture's numbering (``int 0x80`` on x86-64) kills the process,
as does the x32 numbering: the numbers above would not hold there. The filter is written for
x86-64 and AArch64 (numbers checked against the kernel headers by the tests); elsewhere, or
where the kernel refuses it, the worker goes on with its other limits.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from typing import Final

__all__ = ["ALLOWED", "NEWEST", "install", "program"]

#: the calls the worker may make, with their numbers on each architecture (``uname -m``);
#: AArch64 has no ``poll`` nor ``select`` (its C library uses ``ppoll`` and ``pselect6``), and
#: its ``newfstatat`` is the generic table's ``fstatat``
ALLOWED: Final[dict[str, dict[str, int]]] = {
    "x86_64": {
        "read": 0, "write": 1, "readv": 19, "writev": 20, "close": 3, "fstat": 5, "newfstatat": 262,
        "lseek": 8, "ioctl": 16, "fcntl": 72, "dup": 32, "dup3": 292, "mmap": 9, "munmap": 11,
        "mremap": 25, "mprotect": 10, "madvise": 28, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
        "rt_sigreturn": 15, "sigaltstack": 131, "futex": 202, "set_robust_list": 273,
        "set_tid_address": 218, "rseq": 334, "gettid": 186, "getpid": 39, "getuid": 102, "geteuid": 107,
        "getgid": 104, "getegid": 108, "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
        "nanosleep": 35, "gettimeofday": 96, "sched_yield": 24, "sched_getaffinity": 204, "getrandom": 318,
        "exit": 60, "exit_group": 231, "restart_syscall": 219, "getrusage": 98, "sysinfo": 99, "uname": 63,
        "times": 100, "poll": 7, "ppoll": 271, "select": 23, "pselect6": 270, "membarrier": 324,
    },
    "aarch64": {
        "read": 63, "write": 64, "readv": 65, "writev": 66, "close": 57, "fstat": 80, "newfstatat": 79,
        "lseek": 62, "ioctl": 29, "fcntl": 25, "dup": 23, "dup3": 24, "mmap": 222, "munmap": 215,
        "mremap": 216, "mprotect": 226, "madvise": 233, "brk": 214, "rt_sigaction": 134,
        "rt_sigprocmask": 135, "rt_sigreturn": 139, "sigaltstack": 132, "futex": 98, "set_robust_list": 99,
        "set_tid_address": 96, "rseq": 293, "gettid": 178, "getpid": 172, "getuid": 174, "geteuid": 175,
        "getgid": 176, "getegid": 177, "clock_gettime": 113, "clock_getres": 114, "clock_nanosleep": 115,
        "nanosleep": 101, "gettimeofday": 169, "sched_yield": 124, "sched_getaffinity": 123,
        "getrandom": 278, "exit": 93, "exit_group": 94, "restart_syscall": 128, "getrusage": 165,
        "sysinfo": 179, "uname": 160, "times": 153, "ppoll": 73, "pselect6": 72, "membarrier": 283,
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
    if machine not in ALLOWED:
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
    steps += [(_JEQ_K, "enosys", None, clone3), (_JEQ_K, "clone", None, clone), (_JEQ_K, "prlimit", None, prlimit)]
    steps += [(_JEQ_K, "allow", None, nr) for nr in sorted(set(ALLOWED[machine].values()))]
    steps.append((_RET_K, None, None, _RET_ERRNO | errno.EPERM))  # everything else
    steps.append("prlimit")
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
