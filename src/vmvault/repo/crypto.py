"""Keys, chunk ids and the authenticated envelope every stored object is wrapped in.

* Chunk ids (of data chunks and index blocks) are a hash of the plaintext keyed with a secret
  of the repository when it is encrypted, so ids reveal nothing about content to the
  storage. Which hash is the repository's choice, named in its config (``chunk_id``;
  repository-format.md, sections 3 and 4): keyed BLAKE3 (new repositories: about 3.5 times
  less CPU per byte than HMAC-SHA-256 on 256 KiB chunks, and the backup hashes every byte it
  reads) or HMAC-SHA-256 (repositories made before, and on request). Unencrypted
  repositories use the same hash unkeyed (BLAKE3, SHA-256).
* Payloads are zstd-compressed (unless that does not help) and sealed with AES-256-GCM, a
  random 96-bit nonce per object, and associated data that binds the ciphertext to its
  identity (blob type + id, or the object's name), so an object cannot be swapped for another.
* Passphrases wrap the random master key through Argon2id (memory-hard).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmvault.errors import IntegrityError, require
from vmvault.repo._layout import ENVELOPE_HEADER, ENVELOPE_VERSION, TAG_SIZE, EnvelopeFlags

if TYPE_CHECKING:
    from blake3 import blake3 as Blake3

__all__ = [
    "BLAKE3",
    "CHUNK_ID_FUNCTIONS",
    "HMAC_SHA256",
    "KDF_BOUNDS",
    "MasterKey",
    "blake3_id_key",
    "check_kdf_params",
    "derive_passphrase_key",
    "open_envelope",
    "require_id_function",
    "seal_envelope",
    "seal_envelope_parts",
]

#: the chunk id functions, as the config names them (repository-format.md, section 3):
#: HMAC-SHA-256 under the id key (SHA-256 unencrypted), and BLAKE3 keyed with a key derived
#: from the id key (BLAKE3 unencrypted)
HMAC_SHA256 = "hmac-sha256"
BLAKE3 = "blake3"
CHUNK_ID_FUNCTIONS = (HMAC_SHA256, BLAKE3)
#: BLAKE3's key derivation context for the keyed-BLAKE3 id key: fixed for all time, and used for
#: nothing else (BLAKE3's derive_key mode is domain-separated from its hash and keyed-hash modes)
BLAKE3_ID_CONTEXT = "vmvault 2026-12-03 keyed-BLAKE3 chunk id key"

_ZSTD_LEVEL = 1
#: the envelope's flag as a plain int: ``int & IntFlag`` builds a new IntFlag through the
#: enum machinery (0.7 us here, three times for every blob opened), and ``~EnvelopeFlags.ZSTD``
#: is the empty flag, not the other bits
_FLAG_ZSTD: Final[int] = int(EnvelopeFlags.ZSTD)
#: store uncompressed when compression saves less than this fraction
_MIN_SAVING = 1 / 32


@functools.cache
def _blake3() -> type[Blake3]:
    # imported on first use: a repository with HMAC-SHA-256 ids does not need the package
    module = require("blake3", purpose="a repository whose chunk ids are BLAKE3")
    hasher: type[Blake3] = module.blake3
    return hasher


def require_id_function(name: str) -> None:
    """ValueError for a name that is not a chunk id function; MissingDependencyError (one
    line, with the install command) when its package is not installed."""
    if name not in CHUNK_ID_FUNCTIONS:
        raise ValueError(f"unknown chunk id function {name[:40]!r} (one of {', '.join(CHUNK_ID_FUNCTIONS)})")
    if name == BLAKE3:
        _blake3()


def blake3_id_key(id_key: bytes) -> bytes:
    """The 32-byte key of keyed-BLAKE3 chunk ids: BLAKE3's key derivation from the id key
    (repository-format.md, section 6). Nothing else is keyed with it, and it is not the id
    key, which keeps keying the config's MAC (HMAC-SHA-256)."""
    return _blake3()(id_key, derive_key_context=BLAKE3_ID_CONTEXT).digest()


@dataclass(frozen=True)
class MasterKey:
    """The repository's secrets, and how its chunk ids are computed with them. ``None`` keys
    mean an unencrypted repository."""

    enc_key: bytes | None  # AES-256-GCM key
    id_key: bytes | None  # HMAC-SHA-256 key for the config's MAC and HMAC-SHA-256 chunk ids
    #: the repository's chunk id function (its config's ``chunk_id``): ``with_id_function``
    id_function: str = HMAC_SHA256
    #: the keyed-BLAKE3 id key (``blake3_id_key``) when ``id_function`` is BLAKE3 and the
    #: repository is encrypted
    blake3_key: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(32), os.urandom(32))

    @classmethod
    def unencrypted(cls) -> MasterKey:
        return cls(None, None)

    @property
    def encrypted(self) -> bool:
        return self.enc_key is not None

    def to_bytes(self) -> bytes:
        assert self.enc_key is not None and self.id_key is not None
        return self.enc_key + self.id_key

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != 64:
            raise IntegrityError("master key material has the wrong length")
        return cls(raw[:32], raw[32:])

    def with_id_function(self, name: str) -> MasterKey:
        """This key computing chunk ids with ``name`` (one of ``CHUNK_ID_FUNCTIONS``)."""
        require_id_function(name)  # a missing package is a clear error now, not at the first chunk
        b3_key = blake3_id_key(self.id_key) if name == BLAKE3 and self.id_key is not None else None
        return dataclasses.replace(self, id_function=name, blake3_key=b3_key)

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The id of a chunk or index block whose plaintext is ``data``."""
        if self.id_function == BLAKE3:
            # (BLAKE3 releases the GIL on inputs of 2 KiB and more, as hashlib does: the
            # backup's workers hash in parallel)
            if self.blake3_key is None:
                return _blake3()(data).digest()
            return _blake3()(data, key=self.blake3_key).digest()
        if self.id_key is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self.id_key, data, "sha256")


# zstd contexts are not thread-safe; one per thread keeps the pipeline lock-free.
_tls = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_tls, "comp", None)
    if comp is None:
        comp = _tls.comp = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_tls, "dec", None)
    if dec is None:
        dec = _tls.dec = zstandard.ZstdDecompressor()
    return dec


#: ``AESGCM.encrypt_into`` (cryptography 47 and later) writes into a buffer the caller gives
_ENCRYPT_INTO: Final[bool] = hasattr(AESGCM, "encrypt_into")
#: ``AESGCM.decrypt_into`` likewise (older releases allocate each plaintext: the fallback)
_DECRYPT_INTO: Final[bool] = hasattr(AESGCM, "decrypt_into")


def _body(payload: bytes | memoryview, compress: bool) -> tuple[int, bytes | memoryview]:
    """The envelope's flags and the body to seal: ``payload`` compressed when that helps."""
    if compress and payload:
        packed = _compressor().compress(payload)
        if len(packed) < len(payload) * (1 - _MIN_SAVING):
            return _FLAG_ZSTD, packed
    return 0, payload


def seal_envelope_parts(key: MasterKey, payload: bytes | memoryview, aad: bytes) -> tuple[bytes, bytes]:
    """``seal_envelope`` of ``payload`` as two parts whose concatenation is the envelope: the
    header, and the ciphertext with its tag.

    For a caller that joins many envelopes anyway (a pack's blobs): the ciphertext is the one
    buffer AES-GCM writes, with no zeroed buffer before it and no copy after it, which
    ``seal_envelope`` needs to return one ``bytes``. Both hold the GIL (cryptography's AES-GCM
    does), in every backup worker for every chunk.
    """
    flags, body = _body(payload, True)
    if key.enc_key is None:
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, bytes(12))
        return header, bytes(body) + hashlib.sha256(aad + header + body).digest()[:TAG_SIZE]
    nonce = os.urandom(12)
    header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, nonce)
    return header, _cipher(key.enc_key).encrypt(nonce, body, aad + header)


def seal_envelope(key: MasterKey, payload: bytes | memoryview, aad: bytes, *, compress: bool = True) -> bytes:
    """Compress (when it helps) and encrypt ``payload``; ``aad`` binds it to its identity."""
    flags, body = _body(payload, compress)
    if key.enc_key is None:
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, bytes(12))
        tag = hashlib.sha256(aad + header + body).digest()[:TAG_SIZE]
        return header + body + tag
    nonce = os.urandom(12)
    header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, nonce)
    cipher = _cipher(key.enc_key)
    if not _ENCRYPT_INTO:
        return header + cipher.encrypt(nonce, body, aad + header)
    # the ciphertext written behind the header, then one copy into bytes: 31 us for a 180 KiB
    # chunk against 163 us for ``header + encrypt(...)`` (two fresh buffers), all of it with
    # the GIL held, which the backup's workers and planning thread share
    out = bytearray(ENVELOPE_HEADER.size + len(body) + TAG_SIZE)
    out[: ENVELOPE_HEADER.size] = header
    cipher.encrypt_into(nonce, body, aad + header, memoryview(out)[ENVELOPE_HEADER.size :])
    return bytes(out)


@functools.lru_cache(maxsize=8)
def _cipher(enc_key: bytes) -> AESGCM:
    # (its key schedule once per key, not once per envelope; AESGCM objects are thread-safe)
    return AESGCM(enc_key)


#: a thread's decryption buffer grows to at most this; a larger envelope gets its own buffer
_MAX_SCRATCH = 16 << 20
#: and starts at least this large
_MIN_SCRATCH = 64 << 10


def _scratch(size: int) -> memoryview:
    """A writable view of ``size`` bytes of this thread's decryption buffer, valid until this
    thread's next call: for plaintext that is consumed at once (a compressed body). The buffer
    starts at what the first envelope needs (a thread that opens only small index blocks holds
    no MiB for them) and at least doubles when it grows."""
    if size > _MAX_SCRATCH:
        return memoryview(bytearray(size))
    buf: bytearray | None = getattr(_tls, "scratch", None)
    if buf is None or len(buf) < size:
        grown = max(size, _MIN_SCRATCH, 2 * len(buf) if buf is not None else 0)
        buf = _tls.scratch = bytearray(min(grown, _MAX_SCRATCH))
    return memoryview(buf)[:size]


#: no payload vmvault writes decompresses to more than this (repo/_limits.py has the tighter
#: bounds callers pass); a frame claiming more is refused before anything is allocated
MAX_PAYLOAD = 1 << 30


def open_envelope(
    key: MasterKey, sealed: bytes | memoryview, aad: bytes, *, what: str, max_size: int = MAX_PAYLOAD
) -> bytes:
    """Verify and decrypt an envelope; any mismatch is an IntegrityError naming ``what``.

    A compressed payload whose frame says it is larger than ``max_size`` is refused unread.
    """
    if len(sealed) < ENVELOPE_HEADER.size + TAG_SIZE:
        raise IntegrityError(f"{what}: truncated ({len(sealed)} bytes)")
    version, flags, _reserved, nonce = ENVELOPE_HEADER.unpack_from(sealed)
    if version != ENVELOPE_VERSION:
        raise IntegrityError(f"{what}: unknown envelope version {version}")
    header = sealed[: ENVELOPE_HEADER.size]
    if key.enc_key is None:
        body = sealed[ENVELOPE_HEADER.size : -TAG_SIZE]
        if not hmac.compare_digest(hashlib.sha256(aad + header + body).digest()[:TAG_SIZE], sealed[-TAG_SIZE:]):
            raise IntegrityError(f"{what}: checksum mismatch (damaged data)")
    else:
        # (views: slicing bytes would copy the whole chunk first, with the GIL held)
        ciphertext = memoryview(sealed)[ENVELOPE_HEADER.size :]
        try:
            if flags & _FLAG_ZSTD and _DECRYPT_INTO:
                # the compressed body is needed only until it is decompressed: decrypted into
                # this thread's buffer, not a new one each time (AES-GCM holds the GIL, and a
                # fresh buffer's page faults would be taken while holding it)
                body = _scratch(len(ciphertext) - TAG_SIZE)
                _cipher(key.enc_key).decrypt_into(nonce, ciphertext, aad + header, body)
            else:
                body = _cipher(key.enc_key).decrypt(nonce, ciphertext, aad + header)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (damaged or tampered data)") from None
    # (authentic, so written by a writer that knows a flag this reader does not: a flag may
    # change what the body means)
    if flags & ~_FLAG_ZSTD:
        raise IntegrityError(f"{what}: unknown envelope flags {flags:#x}")
    if flags & _FLAG_ZSTD:
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: cannot decompress: {exc}") from exc
        if not 0 <= size <= max_size:
            raise IntegrityError(f"{what}: decompresses to {size} bytes, more than the {max_size} allowed")
        try:
            return _decompressor().decompress(body, max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: cannot decompress: {exc}") from exc
    # (an unencrypted envelope's body is a slice of ``sealed``, which may be a view)
    return body if isinstance(body, bytes) else bytes(body)


#: bounds on Argon2id parameters read from a key object: what vmvault writes (keys.DEFAULT_KDF:
#: 64 MiB, 3 passes, 4 lanes) with room to raise them later, and no more. The parameters come
#: from the storage: 2**31 KiB of memory or 2**32-1 passes would exhaust memory or never end.
KDF_BOUNDS: dict[str, tuple[int, int]] = {"memory_kib": (8, 1 << 20), "iterations": (1, 16), "lanes": (1, 16)}


def check_kdf_params(params: object) -> dict[str, int]:
    """``params`` as Argon2id parameters within KDF_BOUNDS; ValueError naming what is not."""
    if not isinstance(params, dict) or set(params) != set(KDF_BOUNDS):
        raise ValueError(f"KDF parameters must be exactly {', '.join(sorted(KDF_BOUNDS))}")
    out: dict[str, int] = {}
    for name, (low, high) in KDF_BOUNDS.items():
        value = params[name]
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"KDF parameter {name} = {str(value)[:40]} is outside {low}..{high}")
        out[name] = value
    if out["memory_kib"] < 8 * out["lanes"]:
        raise ValueError("KDF memory is below 8 KiB per lane")
    return out


def derive_passphrase_key(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    """A 32-byte key-encryption key from a passphrase (Argon2id, parameters stored in the key
    object and bounded by KDF_BOUNDS)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    checked = check_kdf_params(params)
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=checked["iterations"],
        lanes=checked["lanes"],
        memory_cost=checked["memory_kib"],
    )
    return kdf.derive(passphrase)
