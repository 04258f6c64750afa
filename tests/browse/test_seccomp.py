"""The worker's seccomp filter as a program: run by a small classic-BPF interpreter for every
architecture it is written for (AArch64's is never installed on these machines)."""

from __future__ import annotations

import errno
import struct

import pytest

from vmvault.browse import _seccomp

ALLOW, KILL = 0x7FFF0000, 0x80000000


def run(program: list[tuple[int, int, int, int]], nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel would return for a call ``nr`` with ``args`` (struct seccomp_data)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    acc, pc = 0, 0
    for _ in range(len(program)):  # every jump goes forward: at most one pass
        code, jt, jf, k = program[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unknown instruction {code:#x}")
    raise AssertionError("ran off the program")


def eperm() -> int:
    return 0x00050000 | errno.EPERM


#: calls the filter refused when it was a denylist, a few newer ones it did not know then, and
#: some of the kernel's surface no listing needs; each is refused now because it is not allowed
REFUSED = {
    "x86_64": {
        "open": 2, "openat": 257, "openat2": 437, "execve": 59, "fork": 57, "vfork": 58, "socket": 41,
        "ptrace": 101, "kill": 62, "tgkill": 234, "unlink": 87, "rename": 82, "chmod": 90, "truncate": 76,
        "setxattr": 188, "setxattrat": 463, "removexattrat": 466, "file_setattr": 469, "shmget": 29,
        "mq_open": 240, "inotify_init1": 294, "sync": 162, "bpf": 321, "io_uring_setup": 425,
        "userfaultfd": 323, "splice": 275, "vmsplice": 278, "tee": 276, "memfd_create": 319,
        "memfd_secret": 447, "pipe2": 293, "eventfd2": 290, "timerfd_create": 283, "epoll_create1": 291,
        "statx": 332, "readlink": 89, "access": 21, "getcwd": 79, "chdir": 80, "fchdir": 81,
        "landlock_create_ruleset": 444, "seccomp": 317, "prctl": 157, "arch_prctl": 158, "mseal": 462,
    },
    "aarch64": {
        "openat": 56, "openat2": 437, "execve": 221, "socket": 198, "ptrace": 117, "kill": 129, "tgkill": 131,
        "unlinkat": 35, "renameat": 38, "fchmodat": 53, "truncate": 45, "setxattr": 5, "setxattrat": 463,
        "removexattrat": 466, "file_setattr": 469, "shmget": 194, "mq_open": 180, "inotify_init1": 26,
        "sync": 81, "bpf": 280, "io_uring_setup": 425, "userfaultfd": 282, "splice": 76, "vmsplice": 75,
        "tee": 77, "memfd_create": 279, "memfd_secret": 447, "pipe2": 59, "eventfd2": 19,
        "timerfd_create": 85, "epoll_create1": 20, "statx": 291, "readlinkat": 78, "faccessat": 48,
        "getcwd": 17, "chdir": 49, "fchdir": 50, "landlock_create_ruleset": 444, "seccomp": 277,
        "prctl": 167, "mseal": 462,
    },
}  # fmt: skip


@pytest.mark.parametrize(("machine", "arch"), [("x86_64", 0xC000003E), ("aarch64", 0xC00000B7)])
def test_the_program_allows_what_computing_needs_and_refuses_the_rest(machine: str, arch: int) -> None:
    program = _seccomp.program(machine)
    allowed = set(_seccomp.ALLOWED[machine].values())
    clone, clone3 = _seccomp._CLONE[machine]
    prlimit = _seccomp._PRLIMIT[machine]
    newest = _seccomp.NEWEST[machine]
    assert max(allowed) <= newest and not allowed & {clone, clone3, prlimit}
    for name, nr in _seccomp.ALLOWED[machine].items():
        assert run(program, nr, arch) == ALLOW, name
    for name, nr in REFUSED[machine].items():
        assert nr not in allowed and run(program, nr, arch) == eperm(), name
    for nr in range(newest + 1):  # every call of the tables but the allowed and the three below
        if nr not in allowed | {clone, clone3, prlimit}:
            assert run(program, nr, arch) == eperm(), nr
    assert run(program, clone, arch, (0x00010000 | 0x00000100,)) == ALLOW  # a thread
    assert run(program, clone, arch, (0x11,)) == eperm()  # a process (fork's flags: SIGCHLD)
    assert run(program, clone3, arch) == 0x00050000 | errno.ENOSYS
    assert run(program, prlimit, arch, (0, 7)) == ALLOW  # on itself
    assert run(program, prlimit, arch, (1234, 7)) == eperm()
    assert run(program, prlimit, arch, (1 << 32, 7)) == eperm()  # high bits set: not pid 0
    for nr in (newest + 1, newest + 60, 0x3FFFFFFF):  # calls newer than the tables: as if missing
        assert run(program, nr, arch) == 0x00050000 | errno.ENOSYS, nr
    assert run(program, 0, 0x40000003) == KILL  # another architecture's numbering (i386)
    if machine == "x86_64":
        assert run(program, 0x40000000 | 0, arch) == KILL  # x32


def test_an_architecture_without_a_filter_is_said() -> None:
    with pytest.raises(ValueError, match="no seccomp filter is written for riscv64"):
        _seccomp.program("riscv64")
