"""The system under test: how the campaign formats, mounts and keys a store.

A :class:`System` is a plug-in. ``engine`` is the real StateFS engine; the
deliberately broken variants in ``variants.py`` subclass it to prove that
the checker can fail. Everything the campaign does to a store goes through
``System.mount``, so a variant changes exactly one thing.
"""

from __future__ import annotations

import hashlib
import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from statefsd.shared.signing import sign_payload
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock
from statefsd.testing.simdev import CrashModel, Outcome, SimulatedDevice

DEVICE_BYTES = 1 << 20          # the smallest image: every mount reads the whole log region
FIXED_KEY = hashlib.sha256(b"statefs.campaign.payload-key").digest()


def key_provider(sb: fmt.Superblock) -> bytes:
    """The payload key of every encrypted campaign image (a fixed test key, not keystored)."""
    return FIXED_KEY


class FixedSigner:
    """A device signing key held in-process, signing by keystored's rule (Ed25519 is
    deterministic, so signed runs reproduce byte for byte)."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(derive("signing-key", 32))
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, label: str, message: bytes) -> bytes:
        return self._key.sign(sign_payload(label, message))


def derive(label: str, size: int) -> bytes:
    """Deterministic bytes for a seed-derived field (uuid, salt, epoch)."""
    return hashlib.shake_128(b"statefs.campaign\0" + label.encode()).digest(size)


def format_image(label: str, *, encryption: bool, model: CrashModel,
                 size: int = DEVICE_BYTES) -> SimulatedDevice:
    """A freshly formatted image whose bytes depend only on ``label``.

    Engine.mkfs draws the device uuid and first log epoch from os.urandom;
    a reproduction must rebuild identical bytes, so those fields are pinned
    here from ``label`` (both slots rewritten, as mkfs leaves them). The
    returned device's trace starts after the format: a cut during mkfs is
    out of scope (an unformatted image is refused, not recovered).
    """
    dev = SimulatedDevice(size, model=model)
    salt = derive(label + "/salt", 32)
    Engine.mkfs(dev, encryption="on" if encryption else "off", salt=salt)
    sb, _ = read_superblock(dev)
    uuid = derive(label + "/uuid", 16)
    epoch = int.from_bytes(derive(label + "/epoch", 4), "little") or 1
    sb = sb.evolve(device_uuid=uuid, chain_base=fmt.genesis_hash(uuid), log_epoch=epoch)
    for offset in (*fmt.SUPERBLOCK_OFFSETS, sb.identity_copy_offset):
        dev.write(offset, fmt.encode_superblock(sb))
    dev.flush()
    return dev.crash_point().device(Outcome(()))


class DeviceProxy(BlockDevice):
    """Forwards everything to ``inner``; wrappers override what they change."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.path = inner.path

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.inner.write(offset, data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class System:
    """The real engine. Subclasses override ``wrap`` or ``engine_class``."""

    name = "engine"
    engine_class = Engine
    description = "the real StateFS engine"
    vault_kv: type | None = None    # the vault workloads' KV adapter; None: vaultkv.EngineKV

    def wrap(self, device: BlockDevice) -> BlockDevice:
        return device

    def mount(self, device: BlockDevice, *, read_only: bool = False, audit=None,
              signer: FixedSigner | None = None) -> Engine:
        # Compaction epochs drawn from the image's own superblocks: the same
        # run writes the same bytes, and every mount (a higher generation)
        # draws different ones.
        seed = device.read(0, len(fmt.SUPERBLOCK_OFFSETS) * fmt.BLOCK_SIZE)
        engine = self.engine_class.mount(self.wrap(device), read_only=read_only, audit=audit,
                                         key_provider=key_provider, signer=signer)
        engine.entropy = random.Random(hashlib.sha256(seed).digest()).randbytes
        return engine
