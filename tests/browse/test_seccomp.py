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


@pytest.mark.parametrize(
    ("machine", "arch", "calls"),
    [
        ("x86_64", 0xC000003E, {"read": 0, "write": 1, "mmap": 9, "futex": 202, "getrandom": 318, "mseal": 462}),
        ("aarch64", 0xC00000B7, {"read": 63, "write": 64, "mmap": 222, "futex": 98, "getrandom": 278, "mseal": 462}),
    ],
)
def test_the_program_refuses_the_denied_allows_the_rest(machine: str, arch: int, calls: dict[str, int]) -> None:
    program = _seccomp.program(machine)
    for name, nr in _seccomp.DENIED[machine].items():
        assert run(program, nr, arch) == eperm(), name
    for name, nr in calls.items():
        assert run(program, nr, arch) == ALLOW, name
    clone, clone3 = _seccomp._CLONE[machine]
    prlimit = _seccomp._PRLIMIT[machine]
    assert run(program, clone, arch, (0x00010000 | 0x00000100,)) == ALLOW  # a thread
    assert run(program, clone, arch, (0x11,)) == eperm()  # a process (fork's flags: SIGCHLD)
    assert run(program, clone3, arch) == 0x00050000 | errno.ENOSYS
    assert run(program, prlimit, arch, (0, 7)) == ALLOW  # on itself
    assert run(program, prlimit, arch, (1234, 7)) == eperm()
    assert run(program, prlimit, arch, (1 << 32, 7)) == eperm()  # high bits set: not pid 0
    newest = _seccomp.NEWEST[machine]
    for nr in (newest + 1, newest + 60, 0x3FFFFFFF):  # calls newer than the tables: as if missing
        assert run(program, nr, arch) == 0x00050000 | errno.ENOSYS, nr
    assert max(_seccomp.DENIED[machine].values()) <= newest
    assert run(program, 0, 0x40000003) == KILL  # another architecture's numbering (i386)
    if machine == "x86_64":
        assert run(program, 0x40000000 | 0, arch) == KILL  # x32


def test_an_architecture_without_a_filter_is_said() -> None:
    with pytest.raises(ValueError, match="no seccomp filter is written for riscv64"):
        _seccomp.program("riscv64")
