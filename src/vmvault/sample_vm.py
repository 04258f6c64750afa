"""Sample VMs with realistic disks, for ``vmvault demo`` and for tests.

A guest disk is mostly unallocated; what is allocated mixes file-system-like text and
binaries (compressible), media and archives (incompressible), zero-filled regions, and the
same files stored in several places. ``make_disk`` lays out such a disk as a sparse raw file
from a seed; ``guest_writes`` changes it the way a running guest does between two backups
(bursts of 4 KiB-aligned writes clustered in a few hot regions).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

__all__ = ["SampleVm", "guest_writes", "make_disk", "make_sample_vm"]

_BLOCK = 64 * 1024


def _vocabulary(rng: random.Random) -> list[bytes]:
    letters = b"etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(len(letters))]
    return [bytes(rng.choices(letters, weights, k=rng.randint(1, 12))) for _ in range(3000)]


def _text_corpus(rng: random.Random, words: list[bytes], size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choices(words, k=rng.randint(3, 14)))
        out += line + (b"\r\n" if rng.random() < 0.3 else b"\n")
    return bytes(out[:size])


def _binary_corpus(rng: random.Random, size: int) -> bytes:
    # executable-like: short repeated opcodes and small integers, compresses about 2:1
    out = bytearray()
    while len(out) < size:
        pattern = rng.randbytes(rng.randint(16, 256))
        for _ in range(64):
            out += pattern[: rng.randint(4, len(pattern))] + rng.randbytes(rng.randint(2, 24))
    return bytes(out[:size])


def _slice(rng: random.Random, corpus: bytes) -> bytes:
    """A block from a corpus, with a few edits so no two blocks are byte-identical by accident."""
    start = rng.randrange(0, len(corpus) - _BLOCK)
    block = bytearray(corpus[start : start + _BLOCK])
    for _ in range(16):
        block[rng.randrange(_BLOCK)] = rng.randrange(256)
    return bytes(block)


def make_disk(path: str, size: int, *, seed: int, fill: float = 0.5) -> int:
    """Write a sparse raw disk of ``size`` bytes; returns the bytes allocated."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    text = _text_corpus(rng, words, 4 << 20)
    binary = _binary_corpus(rng, 4 << 20)
    written: list[int] = []
    allocated = 0
    with open(path, "w+b") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            run = min(rng.randint(8, 256) * _BLOCK, size - pos)
            if rng.random() < fill:
                for off in range(pos, pos + run, _BLOCK):
                    kind = rng.random()
                    if kind < 0.35:
                        data = _slice(rng, text)
                    elif kind < 0.55:
                        data = _slice(rng, binary)
                    elif kind < 0.80:
                        data = rng.randbytes(_BLOCK)
                    elif kind < 0.88:
                        data = bytes(_BLOCK)
                    elif written:
                        f.seek(rng.choice(written))
                        data = f.read(_BLOCK)
                    else:
                        data = rng.randbytes(_BLOCK)
                    f.seek(off)
                    f.write(data)
                    written.append(off)
                    allocated += _BLOCK
            pos += run
    return allocated


def guest_writes(path: str, *, percent: float, seed: int) -> int:
    """Overwrite about ``percent`` % of the disk in clustered 4 KiB-aligned bursts; returns bytes written.

    Raw files are written directly; VHDX and qcow2 images through vmvault's own writers, the
    way the hypervisor would write them for a running guest.
    """
    from vmvault.disk import detect_format, open_image

    rng = random.Random(seed)
    fmt = detect_format(path)
    if fmt == "raw":
        size = os.path.getsize(path)
    else:
        with open_image(path) as img:
            size = img.size
    budget = int(size * percent / 100)
    hot = [rng.randrange(0, max(1, size - (64 << 20))) for _ in range(4)]
    writes = []
    done = 0
    while done < budget:
        length = min(4096 * rng.randint(1, 32), budget - done)
        length = max(4096, length // 4096 * 4096)
        base = rng.choice(hot) if rng.random() < 0.7 else rng.randrange(0, size - length)
        offset = min(size - length, base + rng.randrange(0, 64 << 20)) // 4096 * 4096
        writes.append((offset, rng.randbytes(length)))
        done += length
    if fmt == "raw":
        with open(path, "r+b") as f:
            for offset, data in writes:
                f.seek(offset)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        from vmvault.disk.chain import open_for_write

        with open_for_write(path) as writer:
            for offset, data in writes:
                writer.write(offset, data)
    return done


@dataclass
class SampleVm:
    folder: str
    disks: list[str]
    config: str


def make_sample_vm(
    folder: str,
    *,
    name: str = "demo-vm",
    disk_sizes: tuple[int, ...] = (384 << 20, 128 << 20),
    formats: tuple[str, ...] = ("vhdx", "qcow2"),
) -> SampleVm:
    """A VM folder: a small configuration file and sparse disks with realistic content.

    Disk ``i`` is written as ``formats[i]`` (raw, vhdx, vhd or qcow2) by vmvault's own writers.
    """
    from vmvault.disk.chain import convert

    os.makedirs(folder, exist_ok=True)
    disks = []
    for i, size in enumerate(disk_sizes):
        fmt = formats[i % len(formats)] if formats else "raw"
        path = os.path.join(folder, f"{name}-disk{i}.{fmt}")
        raw = path if fmt == "raw" else path + ".tmp-raw"
        make_disk(raw, size, seed=1000 + i, fill=0.55 if i == 0 else 0.35)
        if fmt != "raw":
            try:
                convert(raw, path, fmt)
            finally:
                os.unlink(raw)
        disks.append(path)
    config = os.path.join(folder, f"{name}.conf")
    with open(config, "w") as f:
        f.write(f"name = {name}\nmemory = 2048\ncpus = 2\n")
        for i, d in enumerate(disks):
            f.write(f"disk{i} = {os.path.basename(d)}\n")
    return SampleVm(folder, disks, config)
