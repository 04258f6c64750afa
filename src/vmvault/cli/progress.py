"""The CLI's ProgressReporters (vmvault.engine.progress): one bar per phase with throughput and
ETA on a terminal (TerminalReporter); warnings only (QuietReporter, JsonReporter) otherwise.
A phase counts bytes (backup, restore, disks) or, through :class:`PhaseBars`, objects (the
phases of check, prune, repair and copy: packs, index files, snapshots).

Labels (disk and file names) and warnings come from the source or the storage: they are
escaped with :func:`terminal_safe` before they are drawn."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from typing import TextIO

from vmvault import times

from ._terminal import terminal_safe

__all__ = ["JsonReporter", "PhaseBars", "QuietReporter", "TerminalReporter", "make_reporter"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _count_rate(rate: float) -> str:
    return f"{rate:,.1f}/s" if rate < 10 else f"{rate:,.0f}/s"


#: seconds of a phase before an ETA is shown: the first moments (an index loaded, holes
#: skipped at once) say nothing about the rate of what follows
ETA_AFTER = 3.0


def eta_text(done: int, total: int, elapsed: float) -> str:
    """``ETA 1:05`` from the average rate since the phase started, once :data:`ETA_AFTER`
    seconds have passed (``ETA -:--`` before, and while nothing is done)."""
    if elapsed < ETA_AFTER or done <= 0:
        return "ETA -:--"
    if done >= total:
        return "ETA 0:00"
    return f"ETA {times.clock((total - done) * elapsed / done)}"


class TerminalReporter:
    """Redraws at most 10 times a second on stderr; warnings are printed above the bar."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.label = ""
        self.total = 0
        self.done = 0
        self.started = 0.0
        self._last = 0.0
        self._lock = threading.Lock()
        self._drawn = False
        self.counted = False

    def start(self, label: str, total: int, *, counted: bool = False) -> None:
        """A phase of ``total`` bytes, or of ``total`` objects if ``counted`` (0: unknown)."""
        with self._lock:
            self.label, self.total, self.done = terminal_safe(label), total, 0
            self.counted = counted
            self.started = time.monotonic()
            self._last = 0.0
            self._draw(force=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._draw()

    def finish(self) -> None:
        with self._lock:
            self._draw(force=True)
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False

    def warn(self, text: str) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"warning: {terminal_safe(text)}\n")
            self._drawn = False
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        if not self.label:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        width = shutil.get_terminal_size((80, 20)).columns
        amount = _count if self.counted else human_bytes
        speed = _count_rate(rate) if self.counted else f"{human_bytes(rate)}/s"
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            tail = (
                f" {frac * 100:5.1f}% {amount(self.done)}/{amount(self.total)}"
                f" {speed} {eta_text(self.done, self.total, elapsed)}"
            )
        else:
            frac = 0.0
            tail = f" {amount(self.done)} {speed}"
        label = self.label if len(self.label) <= 24 else "…" + self.label[-23:]
        bar_width = max(10, width - len(label) - len(tail) - 4)
        filled = int(bar_width * frac)
        bar = "█" * filled + "░" * (bar_width - filled)
        self.stream.write(f"\r\x1b[K{label} {bar}{tail}"[: width + 8])
        self.stream.flush()
        self._drawn = True


class QuietReporter:
    """No bars (not a terminal, or --quiet); warnings still reach stderr."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def start(self, label: str, total: int, *, counted: bool = False) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def warn(self, text: str) -> None:
        self.stream.write(f"warning: {terminal_safe(text)}\n")
        self.stream.flush()


class JsonReporter(QuietReporter):
    """``--json``: warnings as JSON lines on stderr so stdout holds only the result document."""

    def warn(self, text: str) -> None:
        self.stream.write(json.dumps({"warning": text}) + "\n")
        self.stream.flush()


class PhaseBars:
    """A ``vmvault.repo.progress.PhaseCallback`` (check, prune, repair, copy) drawn as one bar
    per phase, counting the phase's objects; ``suffix`` is added to each phase's name."""

    def __init__(self, bar: TerminalReporter | QuietReporter, suffix: str = "") -> None:
        self.bar = bar
        self.suffix = suffix
        self.phase: str | None = None
        self.done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.phase != phase or done < self.done:  # (a phase may run again: a new bar)
            if self.phase is not None:
                self.bar.finish()
            self.bar.start(phase + self.suffix, total, counted=True)
            self.phase, self.done = phase, 0
        if done > self.done:
            self.bar.advance(done - self.done)
            self.done = done

    def close(self) -> None:
        """Ends the last phase's bar (also when the work failed: an error then starts a line
        of its own)."""
        if self.phase is not None:
            self.bar.finish()
            self.phase = None

    def __enter__(self) -> PhaseBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_reporter(*, quiet: bool, as_json: bool) -> TerminalReporter | QuietReporter:
    if as_json:
        return JsonReporter()
    if quiet or not sys.stderr.isatty():
        return QuietReporter()
    return TerminalReporter()
