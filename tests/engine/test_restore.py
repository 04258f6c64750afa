"""The restore's writing thread (``_Placer``): pieces written in order and progress advanced
as they are, memory bounded by what is queued, and a write's error raised in the restoring
thread, never a hang."""

from __future__ import annotations

import threading
import time

import pytest

from vmvault.disk.base import DiskWriter
from vmvault.engine.progress import NullReporter
from vmvault.engine.restore import _Flusher, _Placer
from vmvault.errors import TargetFullError


class Recorder(DiskWriter):
    """A writer that records its writes, can be slow, and can fail at the n-th write."""

    format = "test"

    def __init__(self, *, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.fail_at = fail_at

    @property
    def size(self) -> int:
        return 1 << 40

    def write(self, offset: int, data: bytes) -> None:
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise TargetFullError("disk.raw: write failed at offset 0x0: No space left on device")
        if self.delay:
            time.sleep(self.delay)
        self.writes.append((offset, data))

    def close(self) -> None:
        pass


class Counted(NullReporter):
    def __init__(self) -> None:
        super().__init__()
        self.done = 0
        self.threads: set[int] = set()

    def advance(self, n: int) -> None:
        self.done += n
        self.threads.add(threading.get_ident())


def test_pieces_are_written_in_order_by_one_thread_and_counted_as_written() -> None:
    writer, progress = Recorder(), Counted()
    placer = _Placer(writer, _Flusher(-1), progress)
    pieces = [(n * 4096, bytes([n]) * 4096) for n in range(200)]
    try:
        for offset, data in pieces:
            placer.put(offset, data)
        placer.finish()
    finally:
        placer.close()
    assert writer.writes == pieces
    assert progress.done == 200 * 4096
    assert len(writer.threads) == 1 and writer.threads == progress.threads
    assert writer.threads != {threading.get_ident()}


def test_what_is_queued_is_bounded_when_the_writes_are_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Placer, "MAX_QUEUED", 64 * 1024)
    writer = Recorder(delay=0.002)
    placer = _Placer(writer, _Flusher(-1), NullReporter())
    most = 0
    try:
        for n in range(100):
            placer.put(n * 16384, bytes(16384))
            most = max(most, placer._queued)
        placer.finish()
    finally:
        placer.close()
    assert len(writer.writes) == 100
    assert most <= 64 * 1024 + 16384, "at most MAX_QUEUED bytes (and the piece that reached it) wait"


@pytest.mark.parametrize("at", [0, 7, 99])
def test_a_write_error_is_raised_in_the_restoring_thread(at: int) -> None:
    writer = Recorder(fail_at=at)
    placer = _Placer(writer, _Flusher(-1), NullReporter())
    try:
        with pytest.raises(TargetFullError, match="No space left"):
            for n in range(100):
                placer.put(n * 4096, bytes(4096))
            placer.finish()
    finally:
        placer.close()
    assert len(writer.writes) == at, "nothing is written after the failed write"
    assert not placer._thread.is_alive()


def test_closing_early_stops_the_thread_and_drops_what_is_queued() -> None:
    """The restoring thread stops on an error of its own (a damaged chunk): no hang, and
    pieces still queued are not written."""
    writer = Recorder(delay=0.01)
    placer = _Placer(writer, _Flusher(-1), NullReporter())
    for n in range(50):
        placer.put(n * 4096, bytes(4096))
    while not writer.writes:  # the thread has taken what was queued and is writing it
        time.sleep(0.001)
    started = time.monotonic()
    placer.close()
    assert time.monotonic() - started < 5 * 0.01 * 50
    assert not placer._thread.is_alive()
    assert len(writer.writes) < 10, "the thread stops between two writes"
    placer.close()  # twice is harmless
