"""The vault's keys: one master secret, purpose keys derived from it, and
the key slots that seal it (passphrase, recovery secret, device).

The master secret, not a keystored key, is the root of every vault key: a
user who lost the device must still open the vault with a passphrase on a
new machine, and several devices will share one vault. keystored wraps the
master for its device (a derived key with its own label), so a device opens
its vault without a passphrase, and signs snapshots with the device key.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import blake3
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from statefsd.errors import IntegrityError, InvalidArgument, WrongPassphrase
from statefsd.vault import records as rec

MASTER_BYTES = 32
RECOVERY_BYTES = 32
HKDF_INFO_PREFIX = b"statefs.vault.v1/"
ARGON2 = {"t": 3, "m": 65536, "p": 4}     # 64 MiB, as keystored seals its key file
PASSPHRASE_SLOT = "passphrase"
RECOVERY_SLOT = "recovery"
DEVICE_SLOT_PREFIX = "device-"


def hkdf(secret: bytes, salt: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=HKDF_INFO_PREFIX + purpose.encode()).derive(secret)


@dataclass(frozen=True)
class VaultKeys:
    """The purpose keys of one vault (docs/statefs.md, "Vault keys")."""

    vault_id: bytes
    master: bytes
    object_id: bytes
    object_seal: bytes
    record_seal: bytes
    path_key: bytes
    config_mac: bytes
    chunker_seed: int

    @classmethod
    def derive(cls, vault_id: bytes, master: bytes) -> "VaultKeys":
        def k(purpose: str) -> bytes:
            return hkdf(master, vault_id, purpose)
        seed = int.from_bytes(k("chunker-seed")[:8], "little") & (2**63 - 1)
        return cls(vault_id, master, k("object-id"), k("object-seal"), k("record-seal"), k("path-id"),
                   k("config-mac"), seed)

    def path_id(self, path: bytes) -> bytes:
        return blake3.blake3(path, key=self.path_key).digest(length=rec.PATH_ID_BYTES)


# ------------------------------------------------------------------ slots

def _slot_ad(vault_id: bytes, slot: str) -> bytes:
    return rec.KEYSLOT_AD + vault_id + slot.encode()


def make_slot(vault_id: bytes, slot: str, kek: bytes, master: bytes, kdf: dict) -> bytes:
    return rec.packb({"kdf": kdf, "sealed": rec.seal(kek, master, _slot_ad(vault_id, slot))})


def read_slot(raw: bytes, slot: str) -> dict:
    slot_map = rec.unpackb(raw, f"key slot {slot}")
    if not (isinstance(slot_map, dict) and isinstance(slot_map.get("kdf"), dict)
            and isinstance(slot_map.get("sealed"), bytes)):
        raise IntegrityError(f"key slot {slot!r} is malformed", hint="open the vault with another slot")
    return slot_map


def open_slot(vault_id: bytes, slot: str, slot_map: dict, kek: bytes) -> bytes:
    try:
        master = rec.unseal(kek, slot_map["sealed"], _slot_ad(vault_id, slot), f"key slot {slot}")
    except IntegrityError:
        raise WrongPassphrase(f"the {slot} key slot does not open with what was given",
                              hint=_WRONG_HINT.get(slot, "check the secret and try again")) from None
    if len(master) != MASTER_BYTES:
        raise IntegrityError(f"key slot {slot!r} holds a {len(master)}-byte secret")
    return master


_WRONG_HINT = {
    PASSPHRASE_SLOT: "check the passphrase ($STATEFS_VAULT_PASSPHRASE or --passphrase-file), "
                     "or open with --recovery-file",
    RECOVERY_SLOT: "check the recovery secret file (the text `statefs vault key export-recovery` printed)",
}


def passphrase_kek(passphrase: str, salt: bytes, params: dict | None = None) -> tuple[bytes, dict]:
    p = dict(ARGON2 if params is None else params)
    if set(p) - {"t", "m", "p", "salt", "kind"} or not all(type(p[x]) is int and p[x] > 0 for x in "tmp"):
        raise IntegrityError(f"passphrase slot has bad Argon2id parameters {p}")
    if p["m"] > 4 * 1024 * 1024 or p["t"] > 64:
        raise IntegrityError(f"passphrase slot asks for Argon2id t={p['t']} m={p['m']} KiB: refused as unreasonable")
    kek = hash_secret_raw(passphrase.encode(), salt, time_cost=p["t"], memory_cost=p["m"],
                          parallelism=p["p"], hash_len=32, type=Type.ID)
    return kek, {"kind": "argon2id", "t": p["t"], "m": p["m"], "p": p["p"], "salt": salt}


def passphrase_slot(vault_id: bytes, master: bytes, passphrase: str) -> bytes:
    if not passphrase:
        raise InvalidArgument("an empty passphrase would not protect the vault",
                              hint="set $STATEFS_VAULT_PASSPHRASE or pass --passphrase-file")
    kek, kdf = passphrase_kek(passphrase, os.urandom(16))
    return make_slot(vault_id, PASSPHRASE_SLOT, kek, master, kdf)


def open_passphrase_slot(vault_id: bytes, raw: bytes, passphrase: str) -> bytes:
    slot_map = read_slot(raw, PASSPHRASE_SLOT)
    kdf = slot_map["kdf"]
    if kdf.get("kind") != "argon2id" or not isinstance(kdf.get("salt"), bytes):
        raise IntegrityError("passphrase slot names an unknown key derivation")
    kek, _ = passphrase_kek(passphrase, kdf["salt"], {k: kdf[k] for k in "tmp" if k in kdf})
    return open_slot(vault_id, PASSPHRASE_SLOT, slot_map, kek)


def recovery_kek(vault_id: bytes, secret: bytes) -> bytes:
    return hkdf(secret, vault_id, "recovery-slot")


def new_recovery_secret() -> bytes:
    return os.urandom(RECOVERY_BYTES)


def format_recovery(secret: bytes) -> str:
    text = base64.b32encode(secret).decode().rstrip("=")
    return "-".join(text[i:i + 4] for i in range(0, len(text), 4))


def parse_recovery(text: str) -> bytes:
    clean = "".join(ch for ch in text.upper() if ch.isalnum())
    try:
        secret = base64.b32decode(clean + "=" * (-len(clean) % 8))
    except ValueError:
        secret = b""
    if len(secret) != RECOVERY_BYTES:
        raise InvalidArgument("that is not a vault recovery secret (expected 52 base32 characters in groups of 4)",
                              hint="use the text `statefs vault key export-recovery` printed")
    return secret


def device_slot_name(device_id: str) -> str:
    return DEVICE_SLOT_PREFIX + device_id
