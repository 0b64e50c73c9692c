"""Opening a vault: its config, its keys, its device, sessions and snapshots."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
import blake3

from statefsd.errors import IntegrityError, InvalidArgument, KeyUnavailable, NotFound, StateFSError
from statefsd.vault import keys as vkeys
from statefsd.vault import kv as kvmod
from statefsd.vault import records as rec
from statefsd.vault.objects import ObjectStore

# Default chunk sizes, from the measured dedup-vs-overhead curve (bench/README.md).
CHUNKER = {"min": 64 << 10, "avg": 256 << 10, "max": 1 << 20}
SESSION_STALE_NS = 15 * 60 * 10**9     # a session silent this long is dead (no manual unlock)
HEARTBEAT_NS = 30 * 10**9


@dataclass(frozen=True)
class Secret:
    """What the user gave to open the vault (any one may be None)."""

    passphrase: str | None = None
    recovery: bytes | None = None


class Device:
    """This machine's keystored identity: wraps the master, signs snapshots."""

    def __init__(self, signer) -> None:
        self.signer = signer
        self.public_key: bytes = signer.public_key
        self.id = device_id(self.public_key)

    def wrap_key(self, vault_id: bytes) -> bytes:
        return self.signer.derive(rec.DEVICE_WRAP_LABEL, vault_id)

    def sign(self, message: bytes) -> bytes:
        return self.signer.sign(rec.SNAPSHOT_SIGN_LABEL, message)


def device_id(public_key: bytes) -> str:
    return blake3.blake3(public_key).digest(length=16).hex()


def init(kv: kvmod.KV, secret: Secret, device: Device | None, *, chunker: dict | None = None) -> "Vault":
    if kvmod.get(kv, rec.CONFIG_KEY) is not None:
        raise InvalidArgument("this image already holds a vault", hint="use it, or make a new image for another vault")
    if not secret.passphrase:
        raise InvalidArgument("a new vault needs a passphrase (it opens the vault on any machine)",
                              hint="set $STATEFS_VAULT_PASSPHRASE or pass --passphrase-file")
    vault_id, master = os.urandom(16), os.urandom(vkeys.MASTER_BYTES)
    keys = vkeys.VaultKeys.derive(vault_id, master)
    config = {"format": rec.FORMAT, "vault_id": vault_id, "created": time.time_ns(),
              "chunker": dict(chunker or CHUNKER), "padding": "padme"}
    config["mac"] = rec.config_mac(keys.config_mac, config)
    ops = [("put", rec.CONFIG_KEY, rec.packb(config)),
           ("put", rec.keyslot_key(vkeys.PASSPHRASE_SLOT), vkeys.passphrase_slot(vault_id, master, secret.passphrase))]
    if device is not None:
        ops += _device_ops(keys, device)
    kv.apply(ops, [(rec.CONFIG_KEY, 0)])
    return Vault(kv, keys, config, device)


def _device_ops(keys: vkeys.VaultKeys, device: Device) -> list[tuple]:
    slot = vkeys.device_slot_name(device.id)
    record = {"device": device.id, "public_key": device.public_key, "host": socket.gethostname(),
              "added": time.time_ns()}
    return [("put", rec.keyslot_key(slot),
             vkeys.make_slot(keys.vault_id, slot, device.wrap_key(keys.vault_id), keys.master, {"kind": "keystored"})),
            ("put", rec.device_key(device.id), rec.seal_record(keys.record_seal, rec.device_key(device.id), record))]


def open_vault(kv: kvmod.KV, secret: Secret, device: Device | None, *, join: bool = False) -> "Vault":
    """Open with the secret given (recovery, passphrase) or this device's slot.
    With ``join``, a device opened by passphrase gets its own slot, so it opens
    the vault alone from then on (backup does this; reading commands never write)."""
    got = kvmod.get(kv, rec.CONFIG_KEY)
    if got is None:
        raise NotFound("this image holds no vault", hint="create one with `statefs vault init`")
    config = rec.check_config(rec.unpackb(got[0], rec.CONFIG_KEY))
    vault_id = config["vault_id"]
    master = _open_master(kv, vault_id, secret, device)
    keys = vkeys.VaultKeys.derive(vault_id, master)
    if rec.config_mac(keys.config_mac, config) != config["mac"]:
        raise IntegrityError("vault/config was changed by someone without the vault key",
                             hint="run `statefs vault check`; restore the image from a good copy")
    vault = Vault(kv, keys, config, device)
    if join and device is not None and secret != Secret() and kvmod.get(kv, rec.device_key(device.id)) is None:
        kv.apply(_device_ops(keys, device))    # this machine joins: it can open the vault alone from now on
    return vault


def _open_master(kv: kvmod.KV, vault_id: bytes, secret: Secret, device: Device | None) -> bytes:
    if secret.recovery is not None:
        raw = _slot(kv, vkeys.RECOVERY_SLOT, "no recovery secret was ever exported for this vault")
        return vkeys.open_slot(vault_id, vkeys.RECOVERY_SLOT, vkeys.read_slot(raw, vkeys.RECOVERY_SLOT),
                               vkeys.recovery_kek(vault_id, secret.recovery))
    if device is not None:
        # A joined device opens its own slot first: no Argon2id (64 MiB, a
        # fifth of a second) on every command of a device that holds the key.
        slot = vkeys.device_slot_name(device.id)
        got = kvmod.get(kv, rec.keyslot_key(slot))
        if got is not None:
            return vkeys.open_slot(vault_id, slot, vkeys.read_slot(got[0], slot), device.wrap_key(vault_id))
    if secret.passphrase:
        raw = _slot(kv, vkeys.PASSPHRASE_SLOT, "the vault has no passphrase slot")
        return vkeys.open_passphrase_slot(vault_id, raw, secret.passphrase)
    raise KeyUnavailable("no way to open the vault was given",
                         hint="set $STATEFS_VAULT_PASSPHRASE, pass --passphrase-file or --recovery-file, "
                              "or run on a device that joined the vault (with $STATEFS_KEYSTORE_SOCKET)")


def _slot(kv: kvmod.KV, slot: str, missing: str) -> bytes:
    got = kvmod.get(kv, rec.keyslot_key(slot))
    if got is None:
        raise KeyUnavailable(missing, hint="open the vault with its passphrase")
    return got[0]


class Vault:
    def __init__(self, kv: kvmod.KV, keys: vkeys.VaultKeys, config: dict, device: Device | None) -> None:
        self.kv = kv
        self.keys = keys
        self.config = config
        self.device = device

    @property
    def vault_id(self) -> bytes:
        return self.keys.vault_id

    def objects(self, session: bytes | None = None, *, pipelined: bool = False) -> ObjectStore:
        return ObjectStore(self.kv, self.keys, session or bytes(rec.SESSION_ID_BYTES), pipelined=pipelined)

    # ------------------------------------------------------------ records

    def read_record(self, name: str) -> tuple[object, int] | None:
        got = kvmod.get(self.kv, name)
        if got is None:
            return None
        return rec.unseal_record(self.keys.record_seal, name, got[0]), got[1]

    def record_op(self, name: str, value: object) -> tuple:
        return ("put", name, rec.seal_record(self.keys.record_seal, name, value))

    # ------------------------------------------------------------ keys

    def set_passphrase(self, passphrase: str) -> None:
        self.kv.apply([("put", rec.keyslot_key(vkeys.PASSPHRASE_SLOT),
                        vkeys.passphrase_slot(self.vault_id, self.keys.master, passphrase))])

    def export_recovery(self) -> str:
        secret = vkeys.new_recovery_secret()
        slot = vkeys.make_slot(self.vault_id, vkeys.RECOVERY_SLOT, vkeys.recovery_kek(self.vault_id, secret),
                               self.keys.master, {"kind": "recovery"})
        self.kv.apply([("put", rec.keyslot_key(vkeys.RECOVERY_SLOT), slot)])
        return vkeys.format_recovery(secret)

    def device_public_key(self, dev: str) -> bytes | None:
        got = self.read_record(rec.device_key(dev))
        if got is None or not isinstance(got[0], dict) or not isinstance(got[0].get("public_key"), bytes):
            return None
        return got[0]["public_key"]

    # ------------------------------------------------------------ sessions

    def start_session(self, kind: str) -> "Session":
        return Session(self, kind)

    def live_sessions(self) -> set[bytes]:
        return {sid for sid in (rec.id_from_key(name, rec.SESSION_PREFIX, rec.SESSION_ID_BYTES)
                                for name in kvmod.iter_keys(self.kv, rec.SESSION_PREFIX))
                if self.session_is_live(sid)}

    def session_is_live(self, sid: bytes) -> bool:
        """A session announces itself before it stores anything, so reading its
        record after an object's record tells whether its writer may still
        reference the object."""
        if not any(sid):
            return False        # counted down to zero by a forget or prune: nobody's new object
        got = self.read_record(rec.session_key(sid))
        return bool(got and isinstance(got[0], dict)
                    and time.time_ns() - int(got[0].get("heartbeat", 0)) < SESSION_STALE_NS)

    # ------------------------------------------------------------ snapshots

    def snapshots(self, *, include_forgotten: bool = False) -> list[dict]:
        """Every snapshot record, oldest first, each checked against its key name."""
        out = []
        for name in kvmod.iter_keys(self.kv, rec.SNAPSHOT_PREFIX):
            snap = self.snapshot_at(name)
            if snap is not None and (include_forgotten or not snap.get("forgotten")):
                out.append(snap)
        out.sort(key=lambda s: (s["time"], s["id"]))
        return out

    def snapshot_at(self, name: str) -> dict | None:
        got = self.read_record(name)
        if got is None:
            return None
        snap, txn = got
        sid = rec.id_from_key(name, rec.SNAPSHOT_PREFIX, rec.SNAPSHOT_ID_BYTES)
        if not isinstance(snap, dict) or snap.get("id") != sid:
            raise IntegrityError(f"{name} does not hold the snapshot its name says", hint="run `statefs vault check`")
        snap["_txn"] = txn
        return snap

    def find_snapshot(self, ref: str) -> dict:
        """A snapshot by ID prefix (as printed), or "latest"."""
        snaps = self.snapshots()
        if ref == "latest":
            if not snaps:
                raise NotFound("the vault has no snapshot yet", hint="make one with `statefs vault backup PATH`")
            return snaps[-1]
        found = [s for s in snaps if s["id"].hex().startswith(ref.lower())] if ref else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFound(f"no snapshot {ref!r}", hint="list them with `statefs vault snapshots`")
        raise InvalidArgument(f"{ref!r} names {len(found)} snapshots", hint="give more characters of the ID")

    def verify_signature(self, snap: dict) -> str | None:
        """None if the snapshot's signature verifies against its device's key, else why not."""
        from statefsd.shared.signing import verify_signature
        key = self.device_public_key(snap.get("device", ""))
        if key is None:
            return f"signed by unknown device {snap.get('device')!r}"
        signed = rec.snapshot_signed_bytes(self.vault_id, snap)
        if not verify_signature(key, rec.SNAPSHOT_SIGN_LABEL, signed, snap.get("sig") or b""):
            return f"signature by device {snap.get('device')} does not verify"
        return None


class Session:
    """A backup or prune in progress: announced so that a prune leaves its
    new objects alone, forgotten when it ends or once silent for 15 minutes."""

    def __init__(self, vault: Vault, kind: str) -> None:
        self.vault = vault
        self.id = os.urandom(rec.SESSION_ID_BYTES)
        self.name = rec.session_key(self.id)
        self.started = time.time_ns()
        self.kind = kind
        self.last_beat = 0
        self.beat()

    def beat(self, force: bool = True) -> None:
        now = time.time_ns()
        if not force and now - self.last_beat < HEARTBEAT_NS:
            return
        self.vault.kv.apply([self.vault.record_op(self.name, {
            "kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self.started, "heartbeat": now})])
        self.last_beat = now

    def end(self) -> None:
        self.vault.kv.apply([("delete", self.name)])

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.end()
        except StateFSError:
            pass      # a stale session record is ignored after 15 minutes


