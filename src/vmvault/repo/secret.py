"""Secrets given to vmvault: passphrases and key files, read and judged in one place.

Every way a secret reaches vmvault (``--key-file``, ``--password-file``, ``VMVAULT_PASSWORD``
and their ``--from-`` and ``--new-`` forms, the automation configuration, a prompt) goes
through ``given_secret`` or the readers below, so the same file is read the same way
everywhere (docs/design/repository-format.md, sections 6 and 10.1):

* A **key file** must be a regular file (``/dev/null``, ``/dev/zero``, FIFOs and folders are
  refused without reading), at most ``MAX_SECRET_FILE`` bytes, and hold at least
  ``MIN_KEY_FILE_BYTES`` bytes and ``MIN_KEY_FILE_BITS`` of estimated randomness once
  surrounding whitespace is stripped: a key file's secret is not stretched, so it must be
  random itself. vmvault makes key files itself (``create_key_file``): 32 random bytes as 64
  hex digits, created with O_EXCL, mode 0600.
* A **password file** may also be a pipe (``--password-file <(pass show x)``); its secret is
  its content without the trailing line break, bounded in size, and never empty.
* A **new** passphrase (init, key add, key passwd) must have ``MIN_PASSPHRASE_CHARS``
  characters wherever it comes from: ``check_new_passphrase`` is the one rule. Opening an
  existing repository applies no minimum (that would lock out the owner of a weak one).
"""

from __future__ import annotations

import getpass
import math
import os
import shlex
import stat
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

from vmvault import platform
from vmvault.errors import ConfigError

__all__ = [
    "KEYFILE",
    "MAX_SECRET_FILE",
    "MIN_KEY_FILE_BITS",
    "MIN_KEY_FILE_BYTES",
    "MIN_PASSPHRASE_CHARS",
    "PASSPHRASE",
    "Secret",
    "check_key_material",
    "check_new_passphrase",
    "create_key_file",
    "given_secret",
    "key_file_secret",
    "prompt_new_passphrase",
    "prompt_passphrase",
    "read_key_file",
    "read_password_file",
    "run_password_command",
]

#: how long a --password-command may take (a password manager asking for a PIN is slow)
PASSWORD_COMMAND_TIMEOUT = 120.0

#: secret kinds, as key objects name them
PASSPHRASE = "passphrase"
KEYFILE = "keyfile"

#: the shortest new passphrase (the rule the prompt has always applied)
MIN_PASSPHRASE_CHARS = 8
#: a key file's secret, stripped of surrounding whitespace, is at least this long ...
MIN_KEY_FILE_BYTES = 32
#: ... and holds at least this much randomness by a byte-frequency estimate
MIN_KEY_FILE_BITS = 128
#: secret files above this size are refused unread (vmvault's key files are 65 bytes)
MAX_SECRET_FILE = 64 << 10


@dataclass(frozen=True)
class Secret:
    value: bytes
    kind: str  # PASSPHRASE or KEYFILE
    #: where it came from, for messages: "key file /root/k", "VMVAULT_PASSWORD", ...
    source: str
    #: True for a key file vmvault has just created
    created: bool = False


def _estimated_bits(data: bytes) -> float:
    """Shannon entropy of the byte histogram times the length: an upper estimate that catches
    constant and patterned content (all zeros: 0 bits; "abab...": 1 bit per byte), not a
    measure of how the bytes were made."""
    n = len(data)
    return -sum(c * math.log2(c / n) for c in Counter(data).values())


def check_key_material(secret: bytes, *, source: str) -> None:
    """Refuse a key-file secret that is too short or visibly not random."""
    if not secret:
        raise ConfigError(f"{source} is empty")
    if len(secret) < MIN_KEY_FILE_BYTES:
        raise ConfigError(
            f"{source} holds {len(secret)} bytes; a key file must hold at least {MIN_KEY_FILE_BYTES} bytes of "
            "random data (`vmvault init --key-file NEW` or `vmvault key add --new-key-file NEW` creates one)"
        )
    bits = _estimated_bits(secret)
    if bits < MIN_KEY_FILE_BITS:
        raise ConfigError(
            f"{source} is not random enough to be a key (about {bits:.0f} bits, at least {MIN_KEY_FILE_BITS} "
            "needed); let vmvault create the key file (`--key-file NEW` / `--new-key-file NEW`)"
        )


def check_new_passphrase(secret: bytes, *, source: str) -> None:
    """The one minimum for a new passphrase, wherever it comes from."""
    chars = len(secret.decode("utf-8", errors="replace"))
    if chars < MIN_PASSPHRASE_CHARS:
        raise ConfigError(
            f"the passphrase from {source} has {chars} characters: choose one of at least {MIN_PASSPHRASE_CHARS}"
        )


def _read_bounded(path: str, what: str, *, regular_only: bool) -> bytes:
    # O_NONBLOCK: opening a FIFO that nobody writes must not hang a key-file read (password
    # files may be pipes: those are read blocking below)
    flags = os.O_RDONLY | platform.O_CLOEXEC | platform.O_BINARY | (platform.O_NONBLOCK if regular_only else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        why = "it is a link to a missing file" if os.path.islink(path) else exc.strerror
        raise ConfigError(f"cannot read {what} {path}: {why}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what} {path} is a folder")
        if regular_only and not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file (a device, FIFO or socket is never a key)")
        if stat.S_ISREG(st.st_mode) and st.st_size > MAX_SECRET_FILE:
            raise ConfigError(_too_large(what, path))
        if regular_only:
            os.set_blocking(fd, True)
        chunks = []
        size = 0
        while size <= MAX_SECRET_FILE:
            piece = os.read(fd, MAX_SECRET_FILE + 1 - size)
            if not piece:
                break
            chunks.append(piece)
            size += len(piece)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if size > MAX_SECRET_FILE:
        raise ConfigError(_too_large(what, path))
    return b"".join(chunks)


def _too_large(what: str, path: str) -> str:
    # a wrong path (a disk image, /dev/zero): never read whole
    return f"{what} {path} is larger than {MAX_SECRET_FILE // 1024} KiB: not a secret"


def read_key_file(path: str, *, what: str = "key file") -> bytes:
    """A key file's secret: its content without surrounding whitespace, judged random enough."""
    secret = _read_bounded(path, what, regular_only=True).strip()
    check_key_material(secret, source=f"{what} {path}")
    return secret


def read_password_file(path: str, *, what: str = "password file") -> bytes:
    """A password file's secret: its content without the trailing line break; never empty."""
    secret = _read_bounded(path, what, regular_only=False).rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"{what} {path} is empty")
    return secret


def run_password_command(command: str, *, what: str = "password command") -> bytes:
    """The passphrase a command prints (``--password-command "pass show vmvault"``): its
    output without the trailing line break. The command is split like a shell would split
    it but run without a shell; its standard error reaches the terminal (a password manager
    may ask there). A failure, a time-out, no output or output over ``MAX_SECRET_FILE``
    bytes is a one-line error; the output is never shown."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"{what} {command!r} cannot be split into words: {exc}") from None
    if not argv:
        raise ConfigError(f"{what} is empty")
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=PASSWORD_COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ConfigError(f"{what}: no program {argv[0]!r} found") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{what} {argv[0]!r} did not finish within {PASSWORD_COMMAND_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise ConfigError(f"{what} {argv[0]!r} could not be run: {exc.strerror}") from None
    if done.returncode != 0:
        raise ConfigError(f"{what} {argv[0]!r} failed (exit status {done.returncode}); no passphrase was read")
    if len(done.stdout) > MAX_SECRET_FILE:
        raise ConfigError(f"{what} {argv[0]!r} printed more than {MAX_SECRET_FILE // 1024} KiB: not a passphrase")
    secret = done.stdout.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"{what} {argv[0]!r} printed nothing")
    return secret


def create_key_file(path: str) -> bytes:
    """Create a new key file at ``path`` (which must not exist, not even as a dangling link):
    32 random bytes as 64 hex digits and a newline, mode 0600, synced before it is used."""
    secret = os.urandom(32).hex().encode()
    try:
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY,
            0o600,
        )
    except FileExistsError:
        why = "it is a link to a missing file" if os.path.islink(path) else "it exists"
        raise ConfigError(f"cannot create key file {path}: {why}; refusing to create it through a link") from None
    except FileNotFoundError:
        raise ConfigError(
            f"cannot create key file {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
            f.flush()
            os.fsync(f.fileno())
        # the key file must outlive a crash whenever the key object that needs it does
        platform.sync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise ConfigError(f"cannot write key file {path}: {exc.strerror}") from exc
    return secret


def key_file_secret(path: str) -> Secret:
    """The secret of key file ``path``, created first when nothing exists at that name."""
    if not os.path.lexists(path):
        return Secret(create_key_file(path), KEYFILE, f"key file {path}", created=True)
    return Secret(read_key_file(path), KEYFILE, f"key file {path}")


def given_secret(
    *,
    key_file: str | None = None,
    password_file: str | None = None,
    password_command: str | None = None,
    env: str | None = None,
    label: str = "",
) -> Secret | None:
    """The secret given without asking, from the first of: a key file, a password file, a
    password command, the environment variable named ``env`` (empty counts as unset). None
    when none is given. ``label`` prefixes the files' names in errors ("the source
    repository's ")."""
    if key_file:
        what = f"{label}key file"
        return Secret(read_key_file(key_file, what=what), KEYFILE, f"{what} {key_file}")
    if password_file:
        what = f"{label}password file"
        return Secret(read_password_file(password_file, what=what), PASSPHRASE, f"{what} {password_file}")
    if password_command:
        what = f"{label}password command"
        return Secret(run_password_command(password_command, what=what), PASSPHRASE, what)
    value = os.environ.get(env) if env else None
    if value:
        assert env is not None
        return Secret(value.encode(), PASSPHRASE, env)
    return None


def prompt_passphrase(label: str = "repository passphrase") -> bytes:
    if not sys.stdin.isatty():
        # not a wrong passphrase (exit 12): none was given, a usage error (exit 2)
        raise ConfigError(
            "the repository is encrypted and no passphrase was given (no terminal to ask on): give "
            "--password-file FILE (or VMVAULT_PASSWORD_FILE), --key-file FILE (or VMVAULT_KEY_FILE), "
            "--password-command COMMAND, or set VMVAULT_PASSWORD"
        )
    return getpass.getpass(f"{label}: ").encode()


def prompt_new_passphrase(label: str = "new passphrase") -> bytes:
    """Ask twice for a new passphrase on the terminal, applying the one minimum."""
    if not sys.stdin.isatty():
        raise ConfigError(
            "no terminal to ask for the new passphrase on: use a password file or VMVAULT_PASSWORD "
            "(VMVAULT_NEW_PASSWORD for key add/passwd), or a key file"
        )
    first = getpass.getpass(f"{label}: ").encode()
    check_new_passphrase(first, source="the prompt")
    if getpass.getpass("repeat it: ").encode() != first:
        raise ConfigError("the passphrases differ; nothing was changed")
    return first
