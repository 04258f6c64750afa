"""The NBD reader against qemu-nbd, cross-checked with libnbd, nbdinfo and qemu-img."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import require_tool
from vmvault.disk.base import Extent, ExtentKind
from vmvault.errors import SourceError
from vmvault.hypervisors._nbd import (
    BASE_ALLOCATION,
    MAX_READ,
    STRUCTURED_REPLY,
    NbdConnection,
    NbdImage,
    ReplyChunk,
    import_libnbd,
)

MiB = 1024 * 1024
SIZE = 40 * MiB + 4096  # not a multiple of the cluster size: the last extent is short

#: (offset, length, pattern) written after the bitmap was added; pattern None = write zeroes
WRITES = [(0, MiB, 0x11), (5 * MiB + 333, 70_000, 0x22), (12 * MiB, MAX_READ // 4, 0x33), (39 * MiB, MiB, None)]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """qemu-nbd serving a qcow2 (read-only) with persistent bitmap ``b0``; yields (socket, content)."""
    qemu_img, qemu_io, qemu_nbd = (require_tool(t) for t in ("qemu-img", "qemu-io", "qemu-nbd"))
    d = tmp_path_factory.mktemp("nbd")
    img = str(d / "disk.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", img, str(SIZE)], check=True)
    subprocess.run(
        [qemu_io, "-f", "qcow2", "-c", f"write -P 0x99 {20 * MiB} {MiB}", img], check=True, capture_output=True
    )
    subprocess.run([qemu_img, "bitmap", "--add", img, "b0"], check=True)
    for off, n, pat in WRITES:
        cmd = f"write -z {off} {n}" if pat is None else f"write -P {pat:#x} {off} {n}"
        subprocess.run([qemu_io, "-f", "qcow2", "-c", cmd, img], check=True, capture_output=True)
    raw = d / "disk.raw"
    subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", img, str(raw)], check=True)
    sock = str(d / "nbd.sock")
    proc = subprocess.Popen(
        [qemu_nbd, "-r", "-f", "qcow2", "-k", sock, "-x", "disk", "-B", "b0", "--shared=8", "--persistent", img]
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        yield sock, raw.read_bytes()
    finally:
        proc.terminate()
        proc.wait()


def dirty_expected() -> list[tuple[int, int]]:
    gran = 64 * 1024
    clusters = sorted({k for off, n, _ in WRITES for k in range(off // gran, -(-(off + n) // gran))})
    out: list[tuple[int, int]] = []
    for k in clusters:
        if out and out[-1][0] + out[-1][1] == k * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran)
        else:
            out.append((k * gran, gran))
    return [(o, min(n, SIZE - o)) for o, n in out]


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["python", "libnbd"])
def test_reader_matches_the_image(export: tuple[str, bytes], backend: str) -> None:
    sock, content = export
    if backend == "libnbd" and import_libnbd() is None:
        pytest.skip("libnbd's Python bindings do not load for this Python (Debian: python3-libnbd)")
    with NbdImage(sock, "disk", bitmap="b0", backend=backend) as img:
        assert img.size == SIZE and img.format == "nbd"
        extents = list(img.extents())
        assert extents[0].offset == 0 and extents[-1].end == SIZE
        # everything outside DATA extents reads as zeros; the zero-written range is not DATA
        for ext in extents:
            if ext.kind is ExtentKind.ZERO:
                assert content[ext.offset : ext.end].count(0) == ext.length
        assert not any(e.kind is ExtentKind.DATA and e.offset <= 39 * MiB < e.end for e in extents)
        assert sum(e.length for e in extents if e.kind is ExtentKind.DATA) < SIZE // 2
        assert img.dirty_extents() == dirty_expected()
        assert img.read(0, SIZE) == content  # > 32 MiB: split
        assert img.read(5 * MiB + 1, 3 * MiB + 7) == content[5 * MiB + 1 : 8 * MiB + 8]
        assert img.read(SIZE - 10, 100) == content[-10:]
        assert img.read(SIZE, 10) == b""


@pytest.mark.integration
def test_parity_with_nbdinfo(export: tuple[str, bytes]) -> None:
    sock, _ = export
    nbdinfo = require_tool("nbdinfo")
    url = f"nbd+unix:///disk?socket={sock}"

    def nbd_map(context: str) -> list[dict[str, object]]:
        out = subprocess.run([nbdinfo, "--json", f"--map={context}", url], check=True, capture_output=True)
        return list(json.loads(out.stdout))

    with NbdImage(sock, "disk", bitmap="b0") as img:
        zero = [
            Extent(int(e["offset"]), int(e["length"]), ExtentKind.ZERO if int(e["type"]) & 2 else ExtentKind.DATA)  # type: ignore[call-overload]
            for e in nbd_map("base:allocation")
        ]
        assert list(img.extents()) == [e for e in zero if e.length]
        dirty = [(int(e["offset"]), int(e["length"])) for e in nbd_map("qemu:dirty-bitmap:b0") if int(e["type"]) & 1]  # type: ignore[call-overload]
        assert img.dirty_extents() == dirty


@pytest.mark.integration
def test_errors_are_source_errors(export: tuple[str, bytes], tmp_path: Path) -> None:
    sock, _ = export
    with pytest.raises(SourceError, match="unknown export"):
        NbdImage(sock, "nope")
    with pytest.raises(SourceError, match="qemu:dirty-bitmap:absent"):
        NbdImage(sock, "disk", bitmap="absent")
    with pytest.raises(SourceError, match="cannot connect"):
        NbdImage(str(tmp_path / "absent.sock"), "disk")
    img = NbdImage(sock, "disk")
    with pytest.raises(SourceError, match="no dirty bitmap"):
        img.dirty_extents()
    img.close()
    with pytest.raises(SourceError, match="closed"):
        img.read(0, 10)

    # something that is not an NBD server
    path = str(tmp_path / "junk.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def junk() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    t = threading.Thread(target=junk)
    t.start()
    try:
        with pytest.raises(SourceError, match="not a newstyle NBD server"):
            NbdImage(path, "disk")
    finally:
        t.join()
        server.close()


@pytest.mark.integration
def test_connection_pool_under_threads(export: tuple[str, bytes]) -> None:
    sock, content = export
    with NbdImage(sock, "disk") as img:
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for i in range(10):
                    off = ((k * 7 + i) * 1_000_003) % (SIZE - MiB)
                    assert img.read(off, MiB) == content[off : off + MiB]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert 1 <= img.connections <= 4
    assert img.connections == 0


class _NoSystemNbd:
    """``import nbd`` fails unless the private folder import_libnbd links into is on sys.path."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "nbd" and not any("vmvault-import-nbd-" in entry for entry in sys.path):
            raise ModuleNotFoundError("No module named 'nbd'", name="nbd")


def test_import_libnbd_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Debian fallback really runs (a stand-in dist-packages with a pure-Python ``nbd.py``):
    its private folder is made, imported from and removed, and sys.path is restored."""
    dist = tmp_path / "dist-packages"
    dist.mkdir()
    (dist / "nbd.py").write_text("STAND_IN = True\n")
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    (dist / f"libnbdmod.{tag}-x86_64-linux-gnu.so").write_bytes(b"")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("vmvault.hypervisors._debian.DIST_PACKAGES", str(dist))
    monkeypatch.delitem(sys.modules, "nbd", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoSystemNbd(), *sys.meta_path])
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args: object, **kwargs: object) -> str:
        folder = mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append(str(folder))
        return str(folder)

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    path_before = list(sys.path)
    module = import_libnbd()
    sys.modules.pop("nbd", None)
    assert module is not None and module.STAND_IN is True
    assert len(made) == 1 and os.path.dirname(made[0]) == str(scratch)
    assert not os.path.exists(made[0]) and os.listdir(scratch) == []
    assert sys.path == path_before


@pytest.mark.integration
def test_server_error_keeps_the_connection_in_step(export: tuple[str, bytes]) -> None:
    sock, content = export
    conn = NbdConnection(sock, "disk", (BASE_ALLOCATION,))
    try:
        assert conn.structured and conn.size == SIZE and BASE_ALLOCATION in conn.context_ids
        with pytest.raises(SourceError, match="NBD server error"):
            conn.read(SIZE - 512, 4096)  # past the end: QEMU answers with an error chunk
        assert conn.read(0, 4096) == content[:4096]  # the next reply is read correctly
        with pytest.raises(SourceError, match="not negotiated"):
            conn.block_status("qemu:dirty-bitmap:b0", 0, 4096)
    finally:
        conn.close()


@given(
    flags=st.integers(0, 0xFFFF),
    rtype=st.integers(0, 0xFFFF),
    cookie=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
)
def test_reply_chunk_round_trip(flags: int, rtype: int, cookie: int, length: int) -> None:
    chunk = ReplyChunk(flags, rtype, cookie, length)
    raw = chunk.pack()
    assert len(raw) == STRUCTURED_REPLY.size
    assert ReplyChunk.unpack(raw) == chunk
    assert chunk.done is bool(flags & 1)
    with pytest.raises(ValueError, match="magic"):
        ReplyChunk.unpack(b"\0" + raw[1:])
