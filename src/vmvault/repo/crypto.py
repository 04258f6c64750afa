"""Keys, chunk ids and the authenticated envelope every stored object is wrapped in.

* Chunk ids are SHA-256 of the plaintext, keyed as HMAC-SHA-256 with the repository's id key
  when the repository is encrypted, so ids reveal nothing about content to the storage.
* Payloads are zstd-compressed (unless that does not help) and sealed with AES-256-GCM, a
  random 96-bit nonce per object, and associated data that binds the ciphertext to its
  identity (blob type + id, or the object's name), so an object cannot be swapped for another.
* Passphrases wrap the random master key through Argon2id (memory-hard).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmvault.errors import IntegrityError
from vmvault.repo._layout import ENVELOPE_HEADER, ENVELOPE_VERSION, TAG_SIZE, EnvelopeFlags

__all__ = ["MasterKey", "derive_passphrase_key", "open_envelope", "seal_envelope"]

_ZSTD_LEVEL = 1
#: store uncompressed when compression saves less than this fraction
_MIN_SAVING = 1 / 32


@dataclass(frozen=True)
class MasterKey:
    """The repository's secrets. ``None`` keys mean an unencrypted repository."""

    enc_key: bytes | None  # AES-256-GCM key
    id_key: bytes | None  # HMAC-SHA-256 key for chunk ids

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

    def chunk_id(self, data: bytes | memoryview) -> bytes:
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


def seal_envelope(key: MasterKey, payload: bytes | memoryview, aad: bytes, *, compress: bool = True) -> bytes:
    """Compress (when it helps) and encrypt ``payload``; ``aad`` binds it to its identity."""
    flags = 0
    body: bytes | memoryview = payload
    if compress and payload:
        packed = _compressor().compress(payload)
        if len(packed) < len(payload) * (1 - _MIN_SAVING):
            body = packed
            flags |= EnvelopeFlags.ZSTD
    if key.enc_key is None:
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, bytes(12))
        tag = hashlib.sha256(aad + header + body).digest()[:TAG_SIZE]
        return header + body + tag
    nonce = os.urandom(12)
    header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, nonce)
    return header + AESGCM(key.enc_key).encrypt(nonce, body, aad + header)


def open_envelope(key: MasterKey, sealed: bytes, aad: bytes, *, what: str) -> bytes:
    """Verify and decrypt an envelope; any mismatch is an IntegrityError naming ``what``."""
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
        try:
            body = AESGCM(key.enc_key).decrypt(nonce, sealed[ENVELOPE_HEADER.size :], aad + header)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (damaged or tampered data)") from None
    if flags & EnvelopeFlags.ZSTD:
        try:
            return _decompressor().decompress(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: cannot decompress: {exc}") from exc
    if flags & ~EnvelopeFlags.ZSTD:
        raise IntegrityError(f"{what}: unknown envelope flags {flags:#x}")
    return body


def derive_passphrase_key(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    """A 32-byte key-encryption key from a passphrase (Argon2id, parameters stored in the key file)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_kib"],
    )
    return kdf.derive(passphrase)
