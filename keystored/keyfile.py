"""The key file: the one place the device identity rests on disk.

Layout (big-endian; every byte is described in docs/keystored.md):

    off  len  field
      0    8  magic b"STATEFSK"
      8    2  format version (1)
     10    1  seal: 0 = plain, 1 = Argon2id + XChaCha20-Poly1305
     11    1  reserved, 0
     12    4  Argon2id time cost         (0 when plain)
     16    4  Argon2id memory cost, KiB  (0 when plain)
     20    4  Argon2id parallelism       (0 when plain)
     24   16  Argon2id salt              (zeros when plain)
     40   24  XChaCha20-Poly1305 nonce   (zeros when plain)
     64    N  body: plain = root secret (32) || Ed25519 seed (32), N = 64;
              sealed = AEAD(secrets, aad = bytes 0..63), N = 80
   64+N    4  CRC32C of bytes 0 .. 63+N

The CRC separates "the file is damaged" (ECORRUPT, never regenerate) from
"the passphrase is wrong" (the AEAD tag fails on an intact file).
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import crc32c
from argon2.low_level import Type, hash_secret_raw
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from keystored import entropy
from keystored.identity import SECRETS_LEN, Identity
from statefsd.errors import CorruptImage, FormatError, WrongPassphrase

FILE_NAME = "identity.key"
MAGIC = b"STATEFSK"
VERSION = 1
SEAL_PLAIN = 0
SEAL_ARGON2ID_XCHACHA20POLY1305 = 1

_HEADER = struct.Struct(">8sHBBIII16s24s")
HEADER_LEN = _HEADER.size  # 64
TAG_LEN = 16
CRC_LEN = 4
BODY_LEN = {SEAL_PLAIN: SECRETS_LEN, SEAL_ARGON2ID_XCHACHA20POLY1305: SECRETS_LEN + TAG_LEN}
MAX_FILE_LEN = 4096  # far above any version-1 file; bounds what we read

# errors.HINTS speaks of images; a damaged key file needs its own advice.
DAMAGED_HINT = ("restore the key file from a backup; keystored never overwrites it "
                "(moving it away makes a NEW identity: keys derived from the old one are gone)")


def _damaged(message: str) -> CorruptImage:
    return CorruptImage(message, hint=DAMAGED_HINT)


@dataclass(frozen=True)
class SealParams:
    """Argon2id cost. Stored in the file so it can be raised without a format change."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 1

    def check(self, where: str) -> None:
        # Bounds refuse a damaged or hostile header that would make us spin
        # for hours or allocate terabytes before the tag could even fail.
        if not (1 <= self.time_cost <= 64 and 1 <= self.parallelism <= 64
                and 8 * self.parallelism <= self.memory_cost_kib <= 4 * 1024 * 1024):
            raise _damaged(f"{where}: Argon2id parameters out of range {self}; the key file is damaged")


def _seal_key(passphrase: bytes, salt: bytes, params: SealParams) -> bytes:
    return hash_secret_raw(
        secret=passphrase, salt=salt, time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib, parallelism=params.parallelism,
        hash_len=32, type=Type.ID,
    )


def encode(identity: Identity, passphrase: bytes | None, params: SealParams = SealParams()) -> bytes:
    """The key file bytes; sealed when a passphrase is given."""
    if passphrase is None:
        header = _HEADER.pack(MAGIC, VERSION, SEAL_PLAIN, 0, 0, 0, 0, bytes(16), bytes(24))
        body = identity.secrets()
    else:
        salt_nonce = entropy.random_bytes(16 + 24)
        salt, nonce = salt_nonce[:16], salt_nonce[16:]
        header = _HEADER.pack(MAGIC, VERSION, SEAL_ARGON2ID_XCHACHA20POLY1305, 0, params.time_cost,
                              params.memory_cost_kib, params.parallelism, salt, nonce)
        key = _seal_key(passphrase, salt, params)
        body = crypto_aead_xchacha20poly1305_ietf_encrypt(identity.secrets(), header, nonce, key)
    data = header + body
    return data + crc32c.crc32c(data).to_bytes(CRC_LEN, "big")


def decode(data: bytes, passphrase: bytes | None, where: str = FILE_NAME) -> tuple[Identity, bool]:
    """Parse and check a key file; returns (identity, sealed).

    Raises CorruptImage (damaged), FormatError (newer version) or
    WrongPassphrase (sealed and the passphrase is missing or wrong).
    """
    if len(data) < HEADER_LEN:
        raise _damaged(f"{where}: truncated ({len(data)} bytes, header alone is {HEADER_LEN})")
    magic, version, seal, reserved, t_cost, m_cost, par, salt, nonce = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _damaged(f"{where}: bad magic {magic!r}, expected {MAGIC!r}: not a keystored key file")
    if version != VERSION:
        raise FormatError(f"{where}: key file format version {version}; this keystored reads version {VERSION}",
                          hint="run the keystored release that wrote this key file")
    if seal not in BODY_LEN:
        raise _damaged(f"{where}: unknown seal type {seal}")
    expected = HEADER_LEN + BODY_LEN[seal] + CRC_LEN
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise _damaged(f"{where}: {what} ({len(data)} bytes, expected {expected})")
    stored_crc = int.from_bytes(data[-CRC_LEN:], "big")
    if crc32c.crc32c(data[:-CRC_LEN]) != stored_crc:
        raise _damaged(f"{where}: CRC32C mismatch: the key file is damaged")
    if reserved != 0:
        raise _damaged(f"{where}: reserved byte is {reserved}, expected 0")
    body = data[HEADER_LEN:-CRC_LEN]
    if seal == SEAL_PLAIN:
        if (t_cost, m_cost, par) != (0, 0, 0) or any(salt) or any(nonce):
            raise _damaged(f"{where}: plain key file has non-zero seal fields")
        return Identity.from_secrets(body), False
    params = SealParams(t_cost, m_cost, par)
    params.check(where)
    if not passphrase:
        raise WrongPassphrase(f"{where} is sealed with a passphrase and none was given "
                              "(set STATEFS_KEY_PASSPHRASE or use --passphrase-env)")
    key = _seal_key(passphrase, salt, params)
    try:
        secrets = crypto_aead_xchacha20poly1305_ietf_decrypt(body, data[:HEADER_LEN], nonce, key)
    except CryptoError:
        # The CRC matched, so the file is intact: the passphrase is what is wrong.
        raise WrongPassphrase(f"wrong passphrase for {where} (the sealed secrets did not authenticate)") from None
    return Identity.from_secrets(secrets), True


def read(path: str) -> bytes | None:
    """The raw key file, or None if there is none yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _damaged(f"{path}: is a symlink; refusing to follow it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_FILE_LEN + 1)


def write_atomic(path: str, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the directory: the file is old or new, never torn."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case a stale temp file had looser bits
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
