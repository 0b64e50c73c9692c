"""Repair: rebuild the active log without what cannot be trusted.

No ciphertext is ever edited. The replay that fsck just ran already holds the
consistent committed state: the transactions before the first corruption,
minus every transaction whose sealed payload failed authentication. Repair
hands that state to statefsd's own engine and lets its compaction path write
it, as fresh transactions (new txn ids, hence new nonces), into the other log
region, then switch the superblock with one slot write (DESIGN.md, "Space,
ENOSPC and compaction"). A cut at any point leaves either the old region
active (unchanged) or the new one complete.
"""

from __future__ import annotations

import dataclasses

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.engine import Engine

from fsck_statefs.check import Checked

SWEEP_WINDOW = 4 << 20


def blockers(checked: Checked) -> list[str]:
    """Why the errors of ``checked`` cannot be repaired ([] when they can)."""
    out = []
    result = checked.result
    integrity = [i for i in checked.report.errors if i.kind == "integrity"]
    if integrity and result is not None and not any(e.sealed for e in result.index.values()):
        # Not one sealed value authenticates: a wrong key (an image formatted
        # without a key check) looks exactly like this. Dropping every
        # transaction would be a guess, and DESIGN.md says no guessing.
        out.append("no sealed value authenticates with this key (wrong key?); refusing to drop "
                   f"all {len(integrity)} transactions")
    for issue in checked.report.errors:
        if issue.repairable:
            continue
        if issue.kind == "superblock":
            out.append("no valid superblock describes the image; restore it from a trusted copy")
        elif checked.sb is not None and not checked.can_rewrite:
            out.append("the image is encrypted: rewriting its values needs the key (--keystore-socket)")
        else:
            out.append(f"{issue.kind}: {issue.reason}")
    return sorted(set(out))


def plan(checked: Checked, signed: bool = False) -> list[str]:
    """What repair would do, in words (also what --dry-run prints);
    ``signed``: a device key is at hand to sign a checkpoint."""
    sb, result = checked.sb, checked.result
    dropped = [i for i in checked.report.errors if i.kind in ("corruption", "integrity")]
    target = 1 - sb.active_region
    steps = []
    for issue in dropped:
        what = "stop trusting the log at" if issue.kind == "corruption" else "drop"
        txn = f" txn {issue.txn_id}" if issue.txn_id else ""
        steps.append(f"{what}{txn} at offset {issue.offset} ({issue.kind}: {issue.reason})")
    steps.append(f"reserve txn ids above {max(checked.max_txn_seen, result.max_txn_id, sb.txn_reserved)} "
                 f"in the superblock")
    sealed = ", sealed again under new txn ids (new nonces)" if checked.cipher else ""
    steps.append(f"rewrite the committed state ({len(result.index)} keys, "
                 f"{result.index.value_bytes} value bytes from {result.committed} "
                 f"transactions) into log region {target} under a fresh log epoch{sealed}")
    if signed:
        steps.append("sign a checkpoint over the new chain head with the device key")
    elif result.checkpoints:
        steps.append("write no signed checkpoint (no device key; pass --keystore-socket to sign one)")
    steps.append(f"switch the superblock to log region {target} (one slot write, then flush)")
    return steps


def repair(device: BlockDevice, checked: Checked, audit=None, signer=None) -> dict:
    """Carry out plan(checked) on ``device`` (opened read-write and locked).
    With ``signer`` (the device key through keystored) the rewritten log
    gets a signed checkpoint, as compaction in statefsd does. Returns the
    compaction statistics. Raises StateFSError on failure; the old region
    stays active unless the final superblock write happened."""
    result = checked.result
    # Nonces derive from txn ids (invariant 10): continue above every id any
    # record on the device carries, trusted or not.
    highest = max(checked.max_txn_seen, result.max_txn_id, highest_txn_id_on_device(device, checked.sb))
    result = dataclasses.replace(result, max_txn_id=highest)
    engine = Engine.from_replay(device, checked.sb, checked.sb_slot, result, cipher=checked.cipher,
                                read_only=False, audit=audit, signer=signer)
    stats = engine.compact()
    # The engine is not closed: closing would close the device and drop the
    # flock before fsck re-checks its own result.
    device.flush()
    return stats


def highest_txn_id_on_device(device: BlockDevice, sb: fmt.Superblock) -> int:
    """The highest txn id of any checksummed record in either log region."""
    return highest_counters_on_device(device, sb.regions)[0]


def highest_counters_on_device(device: BlockDevice, regions) -> tuple[int, int]:
    """The highest txn id and the highest mount_gen of any checksummed
    record in the log regions ((start block, blocks) pairs)."""
    txn = mount_gen = 0
    for start_block, blocks in regions:
        start, end = start_block * fmt.BLOCK_SIZE, (start_block + blocks) * fmt.BLOCK_SIZE
        pos = start
        while pos < end:
            length = min(SWEEP_WINDOW + fmt.HEADER_SIZE + fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD, end - pos)
            chunk = device.read(pos, length)
            hit = chunk.find(fmt.RECORD_MAGIC, fmt.RECORD_MAGIC_OFFSET)
            while hit != -1 and hit - fmt.RECORD_MAGIC_OFFSET < SWEEP_WINDOW:
                at = hit - fmt.RECORD_MAGIC_OFFSET
                if at + fmt.HEADER_SIZE <= len(chunk):
                    h = fmt.unpack_header(chunk, at)
                    if ((h.txn_id > txn or h.mount_gen > mount_gen) and not fmt.header_problem(h)
                            and fmt.record_crc_ok(chunk, at, h)):
                        txn, mount_gen = max(txn, h.txn_id), max(mount_gen, h.mount_gen)
                hit = chunk.find(fmt.RECORD_MAGIC, hit + 1)
            pos += SWEEP_WINDOW
    return txn, mount_gen
