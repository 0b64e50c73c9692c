"""The key-file format, in process: documented layout, damage detection, sealing."""

from __future__ import annotations

import struct

import crc32c
import pytest

from keystored import keyfile
from keystored.client import verify_signature
from keystored.identity import Identity
from statefsd.errors import CorruptImage, FormatError, WrongPassphrase

CHEAP = keyfile.SealParams(time_cost=1, memory_cost_kib=64, parallelism=1)
ROOT = bytes(range(32))
SEED = bytes(range(32, 64))


def _identity() -> Identity:
    return Identity(ROOT, SEED)


def test_plain_key_file_layout_matches_the_documented_offsets():
    data = keyfile.encode(_identity(), None)
    assert len(data) == 132
    assert data[0:8] == b"STATEFSK"
    assert data[8:10] == b"\x00\x01"          # version 1, big-endian
    assert data[10] == 0 and data[11] == 0    # plain, reserved
    assert data[12:64] == bytes(52)           # no seal parameters
    assert data[64:96] == ROOT and data[96:128] == SEED
    assert data[128:132] == crc32c.crc32c(data[:128]).to_bytes(4, "big")


def test_sealed_key_file_layout_matches_the_documented_offsets():
    data = keyfile.encode(_identity(), b"pw", CHEAP)
    assert len(data) == 148
    assert data[10] == 1
    assert struct.unpack(">III", data[12:24]) == (1, 64, 1)
    assert any(data[24:40]) and any(data[40:64])  # salt, nonce
    assert ROOT not in data and SEED not in data
    assert data[144:148] == crc32c.crc32c(data[:144]).to_bytes(4, "big")


def test_sealing_uses_fresh_salt_and_nonce_each_time():
    a, b = (keyfile.encode(_identity(), b"pw", CHEAP) for _ in range(2))
    assert a[24:64] != b[24:64] and a[64:144] != b[64:144]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_every_single_byte_change_is_detected_as_damage(passphrase):
    data = keyfile.encode(_identity(), passphrase, CHEAP)
    for at in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = data[:at] + bytes([data[at] ^ mask]) + data[at + 1:]
            with pytest.raises((CorruptImage, FormatError)):
                keyfile.decode(damaged, passphrase)


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_every_truncation_is_detected(passphrase):
    data = keyfile.encode(_identity(), passphrase, CHEAP)
    for length in range(len(data)):
        with pytest.raises(CorruptImage):
            keyfile.decode(data[:length], passphrase)


def test_sealed_round_trip_restores_the_same_identity():
    data = keyfile.encode(_identity(), b"pw", CHEAP)
    identity, sealed = keyfile.decode(data, b"pw")
    assert sealed and identity.secrets() == ROOT + SEED


def test_wrong_or_missing_passphrase_is_wrong_passphrase_not_damage():
    data = keyfile.encode(_identity(), b"pw", CHEAP)
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        keyfile.decode(data, b"pW")
    with pytest.raises(WrongPassphrase, match="none was given"):
        keyfile.decode(data, None)


def test_hostile_argon2_cost_is_refused_before_hashing():
    data = bytearray(keyfile.encode(_identity(), b"pw", CHEAP))
    data[16:20] = (0xFFFFFFFF).to_bytes(4, "big")  # 4 TiB of memory
    data[-4:] = crc32c.crc32c(bytes(data[:-4])).to_bytes(4, "big")
    with pytest.raises(CorruptImage, match="Argon2id parameters out of range"):
        keyfile.decode(bytes(data), b"pw")


def test_key_file_is_written_atomically_with_mode_0600_and_a_fresh_temporary(tmp_path):
    path = tmp_path / "identity.key"
    (tmp_path / "identity.key.tmp").write_bytes(b"stale temp from a crash")
    (tmp_path / "identity.key.tmp").chmod(0o644)
    with open(tmp_path / "identity.key.tmp", "rb") as stale:  # whoever made it still holds it
        state_dir = keyfile.StateDir(str(tmp_path))
        state_dir.write_key(b"new")
        state_dir.close()
        assert stale.read() == b"stale temp from a crash"
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o600
    assert not (tmp_path / "identity.key.tmp").exists()


def test_verify_signature_treats_malformed_key_or_signature_as_invalid():
    identity = _identity()
    sig = identity.sign("statefs.sb", b"m")
    assert verify_signature(identity.public_key, "statefs.sb", b"m", sig)
    assert not verify_signature(identity.public_key[:31], "statefs.sb", b"m", sig)
    assert not verify_signature(identity.public_key, "statefs.sb", b"m", sig[:63])
    assert not verify_signature(b"\xff" * 32, "statefs.sb", b"m", sig)
