"""The CLI's bars: bytes for backup and restore, counts for the phases of check, prune,
repair and copy (a phase of 3,000 packs is not "2.9 KiB"); prune and check draw them."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from vmvault.cli import _common
from vmvault.cli.progress import PhaseBars, QuietReporter, TerminalReporter
from vmvault.sample_vm import guest_writes

from .admin import env, make_vm, run

__all__ = ["env"]


def drawn(stream: io.StringIO) -> list[str]:
    """The states of the bar as a terminal would have shown them, one per redraw."""
    return [part for part in re.split(r"\r\x1b\[K", stream.getvalue()) if part.strip()]


def last_drawn(label: str, total: int, done: int, *, counted: bool = False) -> str:
    """What a terminal shows last of a phase of ``total`` with ``done`` of it done."""
    stream = io.StringIO()
    bar = TerminalReporter(stream)
    bar.start(label, total, counted=counted)
    bar.advance(done)
    bar.finish()
    return drawn(stream)[-1]


def test_a_byte_phase_is_drawn_in_bytes() -> None:
    assert "0 B/4.0 GiB" in last_drawn("web01.raw", 4 << 30, 0)


def test_a_counted_phase_is_drawn_as_a_count_with_a_rate_per_second() -> None:
    last = last_drawn("packs", 3000, 1500, counted=True)
    assert "1,500/3,000" in last and "50.0%" in last
    assert re.search(r" [\d,.]+/s ", last) and "B/s" not in last and "KiB" not in last


def test_a_phase_of_unknown_length_shows_what_is_done() -> None:
    last = last_drawn("list packs", 0, 12345, counted=True)
    assert "12,345 " in last and "%" not in last and "ETA" not in last


def test_phase_bars_start_one_bar_per_phase_and_a_new_one_when_a_phase_runs_again() -> None:
    calls: list[tuple[str, object, ...]] = []

    class Recorder(QuietReporter):
        def start(self, label: str, total: int, *, counted: bool = False) -> None:
            calls.append(("start", label, total, counted))

        def advance(self, n: int) -> None:
            calls.append(("advance", n))

        def finish(self) -> None:
            calls.append(("finish",))

    with PhaseBars(Recorder(), suffix=" snapshots") as bars:
        bars("copy", 0, 4)
        bars("copy", 3, 4)
        bars("copy", 3, 4)  # no step back, no empty step
        bars("index", 1, 2)
        bars("index", 0, 2)  # the phase again, from its start
        bars("index", 2, 2)
    assert calls == [
        ("start", "copy snapshots", 4, True),
        ("advance", 3),
        ("finish",),
        ("start", "index snapshots", 2, True),
        ("advance", 1),
        ("finish",),
        ("start", "index snapshots", 2, True),
        ("advance", 2),
        ("finish",),
    ]


def test_phase_bars_end_the_line_when_the_work_fails() -> None:
    stream = io.StringIO()
    with pytest.raises(RuntimeError), PhaseBars(TerminalReporter(stream)) as bars:
        bars("packs", 1, 10)
        raise RuntimeError("storage gone")
    assert stream.getvalue().endswith("\n")


@pytest.mark.parametrize("command", [["check"], ["prune"], ["forget", "--keep-last", "1", "--prune"]])
def test_check_and_prune_show_their_phases_as_counts(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    vm = make_vm(env / "vms", "web01", seed=1)
    assert run(capsys, "init")[0] == 0
    for n in range(2):
        guest_writes(str(vm / "web01.raw"), percent=5, seed=n)
        assert run(capsys, "backup", str(vm))[0] == 0
    stream = io.StringIO()
    monkeypatch.setattr(_common, "make_reporter", lambda **_: TerminalReporter(stream))
    assert run(capsys, *command)[0] == 0
    states = drawn(stream)
    labels = {state.split(" ", 1)[0] for state in states}
    assert "snapshots" in labels, states
    for state in states:  # "12/40 … 3.0/s", or "12 … 3.0/s" while the total is unknown
        assert re.search(r" \d[\d,]*(/\d[\d,]*)? ", state) and "/s" in state, state
        assert not re.search(r"\d (B|KiB|MiB|GiB)\b", state), state
