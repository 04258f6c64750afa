"""Text made safe for a terminal.

Names that reach the terminal come from places vmvault does not trust: VM, disk, file and
host names and tags read from the repository's storage, file names in a VM folder, error
messages quoting them. A terminal acts on what it is sent: an ESC sequence can clear the
screen, rewrite earlier lines, set the window title or (on some terminals) answer back
into the input; CR overwrites the line; a bidi override (U+202E) makes ``gpj.exe`` read
as ``exe.jpg``. So every human-readable line vmvault prints passes through
:func:`terminal_safe`, which escapes every character Python itself does not consider
printable: C0 and C1 controls, DEL, bidi and other format characters (Unicode Cf), line
and paragraph separators, lone surrogates from undecodable file names, private-use and
unassigned code points, and spaces other than the ASCII one. JSON output is not passed
through it: JSON escaping already keeps a document exact and inert.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["SafeLogFormatter", "StderrHandler", "install_log_handler", "terminal_safe"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def terminal_safe(text: str, *, newlines: bool = False) -> str:
    """``text`` with every non-printable character written as a Python-style escape
    (``\\x1b``, ``\\r``, ``\\u202e``). ``newlines=True`` keeps ``\\n`` for multi-line
    reports vmvault composes itself; a single value (a name, a table cell, an error) is
    escaped whole, so it can neither move the cursor nor start a line of its own."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or (newlines and ch == "\n") else _escape(ch) for ch in text)


class SafeLogFormatter(logging.Formatter):
    """Log lines with the message escaped whole (a traceback, when logged, stays as Python
    formats it: its lines are vmvault's own)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = terminal_safe(record.message)
        return super().formatMessage(record)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the
    moment it was made, which a test harness may have closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def install_log_handler() -> None:
    """Warnings that vmvault's modules log (backend retries, connector notices) reach stderr
    escaped, instead of through Python's unformatted last-resort handler."""
    logger = logging.getLogger("vmvault")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(SafeLogFormatter("vmvault: %(message)s"))
        logger.addHandler(handler)
