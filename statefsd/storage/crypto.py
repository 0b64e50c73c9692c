"""Sealing of PAYLOAD chunks with XChaCha20-Poly1305 (libsodium via PyNaCl).

The byte layout of nonce and AAD is owned by format.py; this module only
applies the AEAD. The key comes from keystored (label
format.RECORD_KEY_LABEL, context format.record_key_context) and never
touches the disk.
"""

from __future__ import annotations

import nacl.bindings as sodium
from nacl._sodium import ffi as _ffi, lib as _lib
from nacl.exceptions import CryptoError

from statefsd.storage import format as fmt
from statefsd.errors import IntegrityError, KeyUnavailable

sodium.sodium_init()  # picks libsodium's fast implementations (idempotent)


class RecordCipher:
    def __init__(self, key: bytes, sb: fmt.Superblock) -> None:
        if len(key) != 32:
            raise KeyUnavailable("the payload key must be 32 bytes")
        self._key = key
        self._salt = sb.salt
        self._uuid = sb.device_uuid

    def key_check(self) -> bytes:
        return fmt.key_check(self._key, self._uuid, self._salt)

    def _nonce_aad(self, txn_id: int, op_index: int, chunk_index: int, phash: bytes, sealed_len: int):
        return (fmt.seal_nonce(self._salt, txn_id, op_index, chunk_index),
                fmt.seal_aad(self._uuid, fmt.PAYLOAD, txn_id, op_index, chunk_index, phash, sealed_len))

    def seal_into(self, out, plaintext, *, txn_id: int, op_index: int, chunk_index: int, phash: bytes) -> int:
        """Seal ``plaintext`` (any buffer) straight into ``out`` (a writable
        buffer of at least its length + SEAL_OVERHEAD bytes); returns the
        sealed length. libsodium's own call, not PyNaCl's wrapper: that one
        takes only bytes and copies the result out, two copies of every
        chunk written; the call releases the GIL, so chunks may be sealed
        on several threads at once."""
        size = len(plaintext) + fmt.SEAL_OVERHEAD
        if len(out) < size:
            raise ValueError(f"sealing {len(plaintext)} bytes needs {size} bytes of room, got {len(out)}")
        nonce, aad = self._nonce_aad(txn_id, op_index, chunk_index, phash, size)
        if _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
                _ffi.from_buffer(out, require_writable=True), _ffi.NULL, _ffi.from_buffer(plaintext),
                len(plaintext), aad, len(aad), _ffi.NULL, nonce, self._key) != 0:
            raise CryptoError("sealing failed")
        return size

    def open(self, sealed: bytes, h: fmt.RecordHeader) -> bytes:
        """Plaintext of a sealed PAYLOAD record, or IntegrityError."""
        nonce, aad = self._nonce_aad(h.txn_id, h.op_index, h.chunk_index, h.path_hash, len(sealed))
        try:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(sealed), aad, nonce, self._key)
        except CryptoError:
            raise IntegrityError(f"sealed payload of txn {h.txn_id} failed authentication") from None
