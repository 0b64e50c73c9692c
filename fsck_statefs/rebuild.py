"""Rebuilding a superblock when both slots are lost.

The fields no record carries (device uuid, encryption, salt, key check,
redundancy, region layout) come from the identity copy in the device's last
block (format 2.1; mkfs writes it). The rest comes from the log, read with
statefsd's own reader: each region whose first bytes hold the first record
of a log (group 1, seq 0, a valid checksum) is walked under that record's
epoch, and the region written last is the active one. Nothing here writes
except write_superblock, which ``fsck-statefs --repair`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.image import read_identity_copy
from statefsd.errors import FormatError
from statefsd.storage.logscan import ScanEnd, first_record, scan_groups
from statefsd.storage.replay import replay

from fsck_statefs.repair import highest_counters_on_device


@dataclass
class Candidate:
    """A log region walked as if it were the active one."""

    region: int
    sb: fmt.Superblock          # the superblock under which the walk was made
    groups: int = 0
    records: int = 0
    max_mount_gen: int = 0
    max_txn: int = 0
    sealed: bool = False        # a sealed PAYLOAD was seen (the image is encrypted)
    checkpoints: int = 0
    chain_from: str = ""        # which record pinned the chain base ("" : none did)
    damaged_trailers: int = 0
    chain_hashes: set[bytes] = field(default_factory=set)   # hash of every COMMIT walked
    deleted: dict[bytes, int] = field(default_factory=dict)  # path -> highest txn id of a DELETE of it
    end: ScanEnd | None = None  # where and why the walk stopped

    @property
    def rank(self) -> tuple[int, int]:
        return self.max_mount_gen, self.max_txn


@dataclass
class Rebuild:
    sb: fmt.Superblock | None           # None: nothing can be rebuilt (see problem)
    steps: list[str] = field(default_factory=list)   # what --repair does, in words
    notes: list[str] = field(default_factory=list)   # what the rebuilt superblock cannot bring back
    losses: list[str] = field(default_factory=list)  # committed data the rebuild cannot bring back
    problem: str = ""
    identity: bool = False              # identity fields came from the identity copy


def slots_lost(device: BlockDevice) -> bool:
    """Neither superblock slot is valid. (A slot of a version this code must
    refuse is not lost: the normal check reports it.)"""
    if device.size < len(fmt.SUPERBLOCK_OFFSETS) * fmt.BLOCK_SIZE:
        return False
    for offset in fmt.SUPERBLOCK_OFFSETS:
        try:
            if fmt.decode_superblock(device.read(offset, fmt.BLOCK_SIZE)).superblock is not None:
                return False
        except FormatError:
            return False
    return True


def looks_like_statefs(device: BlockDevice) -> bool:
    """Lost slots on something that was a StateFS image: a slot kept the
    magic, the identity copy is there, or the log's first record is."""
    if any(fmt.has_superblock_magic(device.read(offset, fmt.SUPERBLOCK_MAGIC_END))
           for offset in fmt.SUPERBLOCK_OFFSETS):
        return True
    if read_identity_copy(device) is not None:
        return True
    return first_record(device, fmt.LOG_START_BLOCK * fmt.BLOCK_SIZE) is not None


def plan_rebuild(device: BlockDevice) -> Rebuild:
    """The superblock to write into both slots, and why; reads only."""
    total_blocks = device.size // fmt.BLOCK_SIZE
    identity = read_identity_copy(device)
    notes: list[str] = []
    if identity is not None:
        bases = [identity]
        source = (f"take the identity fields (device uuid, encryption, key check, redundancy, region "
                  f"layout) from the identity copy in block {total_blocks - 1}")
    else:
        # A format 2.0 image keeps no copy. Without one the layout follows
        # from the device size; the redundancy mode shows in the log (a
        # parity trailer exists only in 2.1, whose layout keeps the copy's block).
        # The 2.0 layout comes first: it wins a tie (its region 0 is the longer).
        fresh = fmt.new_superblock(device.size)
        bases = [fresh.evolve(regions=fmt.region_layout(total_blocks, identity_copy=False)), fresh,
                 fresh.evolve(redundancy=fmt.REDUNDANCY_PARITY)]
        source = ("take a fresh device uuid and the region layout of the device size: there is no identity "
                  "copy (a format 2.0 image, or the copy is damaged too)")
    best = _newest_base(device, bases)
    if not best and identity is None:
        return Rebuild(None, problem="both superblock slots are lost, there is no identity copy and no log "
                                     "record to rebuild from; restore the image from a copy")
    if identity is None and any(c.sealed for c in best):
        return Rebuild(None, problem="both superblock slots are lost and the image is encrypted, but there is "
                                     "no identity copy: the device uuid and salt its values are sealed under "
                                     "are gone, so no superblock can be rebuilt; restore the image from a copy")
    losses: list[str] = []
    if best:
        active, why = _choose_active(device, best, losses)
        sb = active.sb
        chain = (f"take the chain base from the {active.chain_from} of region {active.region}"
                 if active.chain_from else "take the genesis hash as the chain base (the region holds no COMMIT)")
    else:
        active, sb = None, identity
        why = "make log region 0 active as mkfs left it: no region holds a complete write group"
        chain = "take the genesis hash as the chain base"
    txn, mount_gen = highest_counters_on_device(device, sb.regions)
    sb = sb.evolve(generation=max(mount_gen, sb.generation) + 1, txn_reserved=txn + fmt.TXN_RESERVE_BATCH,
                   durable_end=0, version_minor=fmt.VERSION_MINOR)
    if identity is None:
        notes.append("the device uuid is new (the old one was kept only in the lost superblocks): checkpoints "
                     "signed under the old uuid no longer verify")
        if active is not None and active.checkpoints:
            notes.append(f"the log holds {active.checkpoints} signed checkpoints; statefsd started with "
                         f"--keystore-socket will refuse them as forged (restore from a copy to keep them)")
    steps = [source, why, chain,
             f"reserve txn ids through {sb.txn_reserved} and take generation {sb.generation} (above every txn "
             f"id and mount generation on the device); durable floor unknown (0)",
             "write the rebuilt superblock to both slots, then flush"]
    return Rebuild(sb, steps, notes, losses, identity=identity is not None)


def _newest_base(device: BlockDevice, bases: list[fmt.Superblock]) -> list[Candidate]:
    """The candidate regions, newest first, under the base superblock
    (layout, redundancy) that fits the log best."""
    best: list[Candidate] = []
    for base in bases:
        found = [c for c in (_walk(device, base, r) for r in (0, 1)) if c is not None]
        found.sort(key=lambda c: c.rank, reverse=True)
        if found and (not best or _fit(found[0]) > _fit(best[0])):
            best = found
    return best


def _choose_active(device: BlockDevice, found: list[Candidate], losses: list[str]) -> tuple[Candidate, str]:
    """The region written last, unless it is a compaction cut before its
    switch. What cannot be told apart and may be lost goes to ``losses``."""
    newest = found[0]
    why = (f"make log region {newest.region} active, the newest log on the device (epoch "
           f"{newest.sb.log_epoch}: {newest.groups} write groups, mount generation {newest.max_mount_gen}, "
           f"txn ids through {newest.max_txn})")
    if len(found) == 1:
        return newest, why
    other = found[1]
    lacking = _unfinished_compaction(device, newest, other)
    if lacking is None:
        return newest, why + (f"; region {other.region} holds an older log (mount generation "
                              f"{other.max_mount_gen}, txn ids through {other.max_txn})")
    if newest.end is not None and newest.end.corrupt:
        # Damage inside a finished compaction looks the same as a cut one:
        # the older region is then the most that is left.
        losses.append(f"log region {newest.region} is damaged at byte offset {newest.end.corruption_offset} "
                      f"({newest.end.corruption}): it may have been a finished compaction, so whatever it "
                      f"committed after its copy of region {other.region} is lost")
    return other, (f"make log region {other.region} active (epoch {other.sb.log_epoch}: {other.groups} write "
                   f"groups): region {newest.region}, though written later, holds a compaction cut before its "
                   f"superblock switch (it lacks the newest version of {lacking.decode('utf-8', 'replace')!r} "
                   f"of region {other.region})")


def write_superblock(device: BlockDevice, sb: fmt.Superblock) -> None:
    """Both slots get the same block, as mkfs writes them."""
    block = fmt.encode_superblock(sb)
    for offset in fmt.SUPERBLOCK_OFFSETS:
        device.write(offset, block)
    device.flush()


def _unfinished_compaction(device: BlockDevice, newer: Candidate, older: Candidate) -> bytes | None:
    """A path whose newest version in ``older`` ``newer`` does not carry,
    when ``newer`` was compacted from ``older``; None otherwise.

    A compaction copies every live path under txn ids above every id of
    the old region, and its catch-up transactions carry what changed while
    it copied, so a finished one holds a later version (or a later DELETE)
    of every path the old region ends with. One cut before its superblock
    switch leaves the new region written later (higher txn ids, perhaps a
    newer mount) but short of some paths: mount_gen and txn ids alone would
    adopt it and lose them."""
    if newer.sb.chain_base not in older.chain_hashes | {older.sb.chain_base}:
        return None     # not compacted from this region (e.g. an earlier file system's records)
    new_live, old_live = _live(device, newer), _live(device, older)
    for path in sorted(old_live.keys() | older.deleted.keys()):
        put, deleted = old_live.get(path, 0), older.deleted.get(path, 0)
        if put > deleted:
            if max(new_live.get(path, 0), newer.deleted.get(path, 0)) <= put:
                return path
        elif 0 < new_live.get(path, deleted) < deleted:
            return path     # the compaction copied it before its deletion, and never caught up
    return None


def _live(device: BlockDevice, c: Candidate) -> dict[bytes, int]:
    """Path -> txn id of its committed value, by statefsd's replay."""
    return {path: entry.txn_id for path, entry in replay(device, c.sb).index.items()}


def _fit(c: Candidate) -> tuple:
    """How well a guessed layout and redundancy mode fit the log: the right
    ones find the newest region and read it furthest, with intact trailers."""
    return c.rank, c.records, -c.damaged_trailers


def _walk(device: BlockDevice, base: fmt.Superblock, region: int) -> Candidate | None:
    """Walk ``region`` with statefsd's reader as the active region under the
    epoch of its first record; None when it holds no complete write group."""
    first = first_record(device, base.regions[region][0] * fmt.BLOCK_SIZE)
    if first is None:
        return None
    sb = base.evolve(active_region=region, log_epoch=first.epoch, durable_end=0)
    c = Candidate(region, sb)
    chain_base = None
    for item in scan_groups(device, sb):
        if isinstance(item, ScanEnd):
            c.damaged_trailers, c.end = len(item.damaged_trailers), item
            break
        c.groups += 1
        for rec in item:
            h = rec.header
            c.records += 1
            c.max_txn = max(c.max_txn, h.txn_id)
            c.max_mount_gen = max(c.max_mount_gen, h.mount_gen)
            c.sealed |= bool(h.flags & fmt.FLAG_SEALED)
            c.checkpoints += h.type == fmt.CHECKPOINT
            if h.type == fmt.COMMIT:
                c.chain_hashes.add(fmt.chain_hash(rec.raw()))
            elif h.type == fmt.DELETE:
                c.deleted[rec.payload] = max(c.deleted.get(rec.payload, 0), h.txn_id)
            if chain_base is None:
                chain_base, c.chain_from = _chain_pin(rec)
    if not c.groups:
        return None
    # The chain of a region starts at its first COMMIT's prev_hash (or at a
    # checkpoint written before any COMMIT, which names the chain head).
    c.sb = sb.evolve(chain_base=chain_base or fmt.genesis_hash(sb.device_uuid))
    return c


def _chain_pin(rec) -> tuple[bytes | None, str]:
    try:
        if rec.header.type == fmt.COMMIT:
            return fmt.decode_commit(rec.payload).prev_hash, "first COMMIT"
        if rec.header.type == fmt.CHECKPOINT:
            return fmt.decode_checkpoint(rec.payload).chain_head, "CHECKPOINT before the first COMMIT"
    except ValueError:
        pass    # a malformed record: replay reports it as corruption
    return None, ""
