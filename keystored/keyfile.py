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
import pwd
import stat
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
from statefsd.errors import CorruptImage, FormatError, InvalidArgument, WrongPassphrase

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


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _unsafe(what: str, path: str, st: os.stat_result) -> str | None:
    """Why ``path`` cannot be trusted with the secrets (ssh's rule for ~/.ssh), or None.

    Another uid that owns it, or may write it, could have planted a key file
    of its choosing or a temporary file it holds open to catch ours.
    """
    uid = os.geteuid()
    if st.st_uid != uid:
        return (f"{what} {path} is owned by {_user(st.st_uid)} (uid {st.st_uid}), not by {_user(uid)} "
                f"(uid {uid}) that keystored runs as: that user could plant a key or read ours")
    if st.st_mode & 0o022:
        return (f"{what} {path} has mode {stat.S_IMODE(st.st_mode):o}: group or others may write it, "
                f"so another user could plant a key or catch ours")
    return None


class StateDir:
    """keystored's --state-dir, opened once without following a symlink.

    It must be owned by keystored's uid and writable by nobody else; every
    file in it (key file, its temporary, the lock) is opened relative to the
    checked directory with O_NOFOLLOW, so renaming a parent later cannot
    redirect them.
    """

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/") or "/"  # "link/" would follow the symlink
        if os.path.islink(self.path):
            raise InvalidArgument(
                f"--state-dir {self.path} is a symlink (to {os.readlink(self.path)}); keystored does not follow it",
                hint=f"give --state-dir the real directory, after checking who owns it: "
                     f"--state-dir {os.path.realpath(self.path)}")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        why = _unsafe("--state-dir", self.path, os.fstat(self.fd))
        if why:
            os.close(self.fd)
            raise InvalidArgument(why, hint=f"check that {self.path} holds nothing you did not put there, then: "
                                            f"chown {_user(os.geteuid())}: {self.path} && chmod 700 {self.path}")

    @property
    def key_path(self) -> str:
        return os.path.join(self.path, FILE_NAME)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """A file in the directory, never through a symlink (ELOOP names the path)."""
        try:
            return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                where = os.path.join(self.path, name)
                raise InvalidArgument(f"{where} is a symlink; keystored does not follow it",
                                      hint=f"remove it (rm {where}) if you did not put it there") from None
            raise

    def read_key(self) -> bytes | None:
        """The raw key file, or None if there is none yet; refused unless it is
        a regular file owned by us and writable by nobody else."""
        try:
            fd = os.open(FILE_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _damaged(f"{self.key_path}: is a symlink; refusing to follow it") from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _damaged(f"{self.key_path}: is not a regular file")
            why = _unsafe("key file", self.key_path, st)
            if why:
                raise InvalidArgument(
                    why, hint=f"if you did not put it there, remove it (a new identity is made); if it is "
                              f"yours: chown {_user(os.geteuid())}: {self.key_path} && chmod 600 {self.key_path}")
            return f.read(MAX_FILE_LEN + 1)

    def write_key(self, data: bytes) -> None:
        """Temp file, fsync, rename, fsync the directory: the file is old or new, never torn.

        The temporary is made fresh (O_EXCL): a leftover one, perhaps held
        open by whoever made it, is unlinked first and never written to.
        """
        tmp = FILE_NAME + ".tmp"
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, FILE_NAME, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
