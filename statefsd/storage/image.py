"""Making and opening an image: mkfs, superblock choice, the key check and
the counter limits. statefsd's mount and fsck-statefs both open an image
through this module, so they agree on which superblock is current, which
key fits and which counters a writer can still trust.
"""

from __future__ import annotations

import os
import shlex
from typing import Callable, Protocol

from statefsd.errors import CorruptImage, FormatError, InvalidArgument, KeyUnavailable
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.logscan import first_record
from statefsd.storage.replay import ReplayResult

KeyProvider = Callable[[fmt.Superblock], bytes]
DEFAULT_REDUNDANCY = "parity"   # measured cost on commit rate: see docs/DESIGN.md
COUNTER_HEADROOM = 1 << 32      # far more ids and generations than any device will use


class Signer(Protocol):
    """The device's signing key, as keystored exposes it."""

    public_key: bytes

    def sign(self, label: str, message: bytes) -> bytes: ...


def mkfs(device: BlockDevice, *, encryption: str = "off", salt: bytes | None = None,
         key_provider: KeyProvider | None = None, redundancy: str = DEFAULT_REDUNDANCY) -> fmt.Superblock:
    """Format ``device``. With encryption on and a key provider, the
    superblock records a key check so a wrong key is refused at mount.
    With redundancy "parity" every write group carries a parity trailer
    that repairs any one damaged sector of it."""
    if encryption not in ("off", "on"):
        raise InvalidArgument(f"encryption must be 'on' or 'off', not {encryption!r}")
    modes = {name: mode for mode, name in fmt.REDUNDANCY_NAMES.items()}
    if redundancy not in modes:
        raise InvalidArgument(f"redundancy must be one of {', '.join(modes)}, not {redundancy!r}")
    if encryption == "on":
        sb = fmt.new_superblock(device.size, encryption=fmt.ENCRYPTION_XCHACHA20POLY1305,
                                key_descriptor=fmt.KEY_DESCRIPTOR_V1, salt=salt or os.urandom(32),
                                redundancy=modes[redundancy])
    else:
        sb = fmt.new_superblock(device.size, redundancy=modes[redundancy])
    # A random first epoch makes records left by an earlier file system on
    # the same device stale by rule 2 of the log reader.
    sb = sb.evolve(log_epoch=int.from_bytes(os.urandom(4), "little") or 1)
    if encryption == "on" and key_provider is not None:
        sb = sb.evolve(key_check=fmt.key_check(key_provider(sb), sb.device_uuid, sb.salt))
    block = fmt.encode_superblock(sb)
    for offset in (*fmt.SUPERBLOCK_OFFSETS, sb.identity_copy_offset):
        device.write(offset, block)
    # No log of an earlier file system may open a region: rebuilding a
    # lost superblock takes a region's first record for the start of a log.
    for start, _blocks in sb.regions:
        device.write(start * fmt.BLOCK_SIZE, bytes(fmt.BLOCK_SIZE))
    device.flush()
    return sb


def read_superblock(device: BlockDevice) -> tuple[fmt.Superblock, list[str]]:
    """The newest valid superblock, and what was wrong with the slots."""
    sb, _slot, problems = read_superblock_slot(device)
    return sb, problems


def read_superblock_slot(device: BlockDevice) -> tuple[fmt.Superblock, int, list[str]]:
    """The newest valid superblock, the slot it came from, and what was
    wrong with the slots."""
    found: list[tuple[fmt.Superblock, int]] = []
    problems: list[str] = []
    if device.size < len(fmt.SUPERBLOCK_OFFSETS) * fmt.BLOCK_SIZE:
        if fmt.has_superblock_magic(device.read(0, min(device.size, fmt.BLOCK_SIZE))):
            raise CorruptImage(f"{device.path}: only {device.size} bytes, too short for both superblock "
                               f"slots (truncated image?)")
        raise FormatError(f"{device.path} is not a StateFS image (only {device.size} bytes)")
    magic_seen = False
    for index, (name, offset) in enumerate(zip("AB", fmt.SUPERBLOCK_OFFSETS)):
        slot = device.read(offset, fmt.BLOCK_SIZE)
        magic_seen |= fmt.has_superblock_magic(slot)
        status = fmt.decode_superblock(slot)
        if status.superblock is None:
            problems.append(f"slot {name}: {status.problem}")
        else:
            found.append((status.superblock, index))
    if not found:
        if (not magic_seen and read_identity_copy(device) is None
                and first_record(device, fmt.LOG_START_BLOCK * fmt.BLOCK_SIZE) is None):
            raise FormatError(f"{device.path} is not a StateFS image (no superblock magic)")
        raise CorruptImage(f"{device.path}: both superblock slots are damaged ({'; '.join(problems)}); "
                           f"to rebuild the superblock from the identity copy and the log, run: "
                           f"fsck-statefs --repair {shlex.quote(device.path)}",
                           hint="without a superblock not even a read-only mount is possible")
    sb, slot = max(found, key=lambda pair: pair[0].generation)
    if sb.total_blocks * fmt.BLOCK_SIZE > device.size:
        raise CorruptImage(f"{device.path}: superblock describes {sb.total_blocks} blocks but the "
                           f"device has only {device.size // fmt.BLOCK_SIZE} (truncated image?)")
    return sb, slot, problems


def read_identity_copy(device: BlockDevice) -> fmt.Superblock | None:
    """The mkfs superblock kept in the device's last block (format 2.1), or
    None when that block holds no valid copy (a 2.0 image keeps log data
    there, which never passes the magic, CRC and layout checks)."""
    total_blocks = device.size // fmt.BLOCK_SIZE
    if total_blocks <= fmt.LOG_START_BLOCK:
        return None
    try:
        sb = fmt.decode_superblock(device.read(fmt.identity_copy_offset(total_blocks), fmt.BLOCK_SIZE)).superblock
    except FormatError:
        return None
    if sb is None or sb.total_blocks != total_blocks or not fmt.has_identity_copy(sb):
        return None
    return sb


def open_cipher(device: BlockDevice, sb: fmt.Superblock, key_provider: KeyProvider | None) -> RecordCipher | None:
    """The record cipher of an encrypted image (None for a plaintext one).
    A key that fails the superblock's key check is refused here: every sealed
    value would otherwise fail authentication, and a repair would drop them
    all. There is no plaintext fallback."""
    if sb.encryption == fmt.ENCRYPTION_OFF:
        return None
    if key_provider is None:
        raise KeyUnavailable(f"{device.path} is encrypted ({sb.key_descriptor}) and no keystored "
                             f"was given", hint="start keystored and pass --keystore-socket")
    key = key_provider(sb)
    if sb.key_check != bytes(16) and fmt.key_check(key, sb.device_uuid, sb.salt) != sb.key_check:
        raise KeyUnavailable(f"{device.path}: the key from keystored does not match this image; "
                             f"refusing to use it",
                             hint="use the keystored (state dir) of the device that formatted it")
    return RecordCipher(key, sb)


def counters_problem(sb: fmt.Superblock, result: ReplayResult) -> str:
    """A read-write mount must be able to count on: txn ids, generations and
    groups near the end of their range can only be forged or damaged."""
    u64 = (1 << 64) - 1
    if max(sb.txn_reserved, result.max_txn_id) > u64 - COUNTER_HEADROOM:
        return "txn id counter is at the end of its range (forged or damaged)"
    if max(sb.generation, result.end.mount_gen) > u64 - COUNTER_HEADROOM:
        return "generation counter is at the end of its range (forged or damaged)"
    if result.end.next_group > 0xFFFFFFFF - (1 << 20):
        return "group counter is at the end of its range"
    return ""
