"""The log writer: the only code that writes an image's log and superblocks.

It mirrors the reader (logscan.py): the reader takes write groups apart,
the writer makes them (invariant 7: one device write and one flush per
group, each group on a fresh GROUP_ALIGN boundary, with its parity trailer
when redundancy is on). The writer is not thread-safe: the engine calls it
only from the thread that holds its writer role (engine.py, rule C1).
"""

from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple

from statefsd.errors import DeviceIOError, KeyUnavailable, NoSpace
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.image import Signer
from statefsd.storage.replay import Entry

Ops = list[tuple[fmt.Op, bytes]]           # one transaction: ops and their values
Applied = list[tuple[bytes, Entry | None]]  # what a transaction does to the index (None: deleted)


class LogPosition(NamedTuple):
    """Where the log ends, published as one immutable value: a reader sees
    the offset, counters and chain head of one and the same group."""

    offset: int      # byte offset where the next write group starts
    seq: int         # seq of the next record
    group: int       # number of the next write group
    chain: bytes     # chain head: hash of the last COMMIT
    next_txn: int    # the next txn id to use


class LogCursor:
    """Encodes transactions and checkpoints as write groups, advancing a
    position as it goes; nothing reaches the device here."""

    def __init__(self, position: LogPosition, *, epoch: int, mount_gen: int, parity: bool) -> None:
        self.epoch, self.mount_gen, self.parity = epoch, mount_gen, parity
        self.offset, self.seq, self.group = position.offset, position.seq, position.group
        self.chain, self.txn_id = position.chain, position.next_txn
        self.chain_base = position.chain   # the prev_hash of the first COMMIT this cursor writes

    @property
    def position(self) -> LogPosition:
        return LogPosition(self.offset, self.seq, self.group, self.chain, self.txn_id)

    def trailer_bytes(self) -> int:
        return fmt.PARITY_TRAILER_SIZE if self.parity else 0

    def encode_checkpoint(self, signer: Signer, device_uuid: bytes) -> bytearray:
        """A group holding one CHECKPOINT over the current chain head."""
        message = fmt.checkpoint_message(device_uuid, self.epoch, self.seq, self.chain)
        payload = fmt.encode_checkpoint(fmt.CheckpointBody(self.chain, signer.public_key,
                                                           signer.sign(fmt.CHECKPOINT_SIGN_LABEL, message)))
        group = self._packer(fmt.HEADER_SIZE + len(payload))
        group.record(fmt.CHECKPOINT, 0, payload, fmt.FLAG_GROUP_END)
        return self._close_group(group)

    def encode_group(self, txns: list[Ops], cipher: RecordCipher | None,
                     data_bytes: int | None = None) -> tuple[bytearray, list[int], list[Applied]]:
        """One write group holding ``txns``: its bytes, the txn ids given
        out, and each transaction's index changes. ``data_bytes``, the sum
        of their txn_bytes, when the caller has added it up already."""
        sealed = cipher is not None
        if data_bytes is None:
            data_bytes = sum(txn_bytes(ops, sealed) for ops in txns)
        group = self._packer(data_bytes)
        record, view, base = group.record, group.view, self.offset
        payload_flags = fmt.FLAG_SEALED if sealed else 0
        txn_ids: list[int] = []
        applied: list[Applied] = []
        txn_id = self.txn_id
        for n, ops in enumerate(txns):
            txn_ids.append(txn_id)
            first_seq = group.seq
            prepare = record(fmt.PREPARE, txn_id, fmt.encode_prepare([op for op, _ in ops]))
            entries: Applied = []
            for op_index, (op, value) in enumerate(ops):
                phash = fmt.path_hash(op.path)
                if op.kind == fmt.OP_DELETE:
                    record(fmt.DELETE, txn_id, op.path, 0, phash, 0, op_index)
                    entries.append((op.path, None))
                    continue
                chunks = []
                for chunk_index in range(fmt.chunk_count(op.value_len)):
                    piece = value[chunk_index * fmt.CHUNK_SIZE:(chunk_index + 1) * fmt.CHUNK_SIZE]
                    if sealed:
                        piece = cipher.seal(piece, txn_id=txn_id, op_index=op_index,
                                            chunk_index=chunk_index, phash=phash)
                    at = record(fmt.PAYLOAD, txn_id, piece, payload_flags, phash, chunk_index, op_index)
                    chunks.append((base + at, len(piece)))
                entries.append((op.path, Entry(txn_id, op.value_len, tuple(chunks), sealed)))
            # The transaction's records lie next to each other: one digest
            # update over them all, and the chain hashes the COMMIT's bytes.
            digest = hashlib.sha256(view[prepare:group.end]).digest()
            body = fmt.encode_commit(fmt.CommitBody(self.chain, digest, group.seq - first_seq))
            commit = record(fmt.COMMIT, txn_id, body, fmt.FLAG_GROUP_END if n == len(txns) - 1 else 0)
            self.chain = fmt.chain_hash(view[commit:group.end])
            applied.append(entries)
            txn_id += 1
        self.txn_id = txn_id
        return self._close_group(group), txn_ids, applied

    def _packer(self, data_bytes: int) -> fmt.GroupPacker:
        return fmt.GroupPacker(data_bytes, epoch=self.epoch, group=self.group, seq=self.seq,
                               mount_gen=self.mount_gen, parity=self.parity)

    def _close_group(self, group: fmt.GroupPacker) -> bytearray:
        """The group's bytes (records, padding, parity trailer); the cursor
        moves past them."""
        blob = group.finish()
        self.seq = group.seq
        self.group += 1
        self.offset += len(blob)
        return blob


def txn_bytes(ops: Ops, sealed: bool) -> int:
    """The bytes one transaction takes in a group, padding and trailer aside."""
    per_chunk = fmt.HEADER_SIZE + (fmt.SEAL_OVERHEAD if sealed else 0)
    bare = [op for op, _ in ops]
    size = 2 * fmt.HEADER_SIZE + fmt.prepare_size(bare) + fmt.COMMIT_PAYLOAD_SIZE
    for op in bare:
        if op.kind == fmt.OP_PUT:
            size += fmt.chunk_count(op.value_len) * per_chunk + op.value_len
        else:
            size += fmt.HEADER_SIZE + len(op.path)
    return size


class LogWriter:
    """Writes one mounted image: write groups into the active region,
    checkpoints, txn-id reservations and superblocks. Every method that
    returns has made what it wrote durable; ``position`` moves only then."""

    def __init__(self, device: BlockDevice, sb: fmt.Superblock, sb_slot: int, position: LogPosition, *,
                 cipher: RecordCipher | None, signer: Signer | None, audit: Callable[..., None]) -> None:
        self.device, self.sb, self._sb_slot = device, sb, sb_slot
        self.position = position
        self.cipher, self.signer, self.audit = cipher, signer, audit
        self.parity = sb.redundancy == fmt.REDUNDANCY_PARITY
        self.mount_gen = sb.generation
        self.unsigned_commits = 0
        self.set_region(*sb.active_extent)

    def set_region(self, start: int, length: int) -> None:
        self.region_start, self.region_end = start, start + length
        # Deletes may use the last stretch of the log so that a full device can still shrink.
        self.delete_reserve = min(256 << 10, length // 8)

    @property
    def used(self) -> int:
        return self.position.offset - self.region_start

    @property
    def size(self) -> int:
        return self.region_end - self.region_start

    def cursor(self, position: LogPosition | None = None, *, epoch: int | None = None) -> LogCursor:
        return LogCursor(position or self.position, epoch=self.sb.log_epoch if epoch is None else epoch,
                         mount_gen=self.mount_gen, parity=self.parity)

    def txn_bytes(self, ops: Ops) -> int:
        return txn_bytes(ops, self.cipher is not None)

    def group_fits(self, end: int, only_deletes: bool) -> bool:
        """Whether a group whose records end at ``end`` fits the region,
        trailer included (deletes may use the delete reserve)."""
        limit = self.region_end - (0 if only_deletes else self.delete_reserve)
        return fmt.align_up(end) + (fmt.PARITY_TRAILER_SIZE if self.parity else 0) <= limit

    def append(self, txns: list[Ops], data_bytes: int | None = None) -> tuple[list[int], list[Applied]]:
        """Write ``txns`` as one group and flush (invariant 1); the txn ids
        they got and their index changes, once durable. ``data_bytes``: as
        for encode_group."""
        last_id = self.position.next_txn + len(txns) - 1
        if last_id > self.sb.txn_reserved:
            self.reserve_txn_ids(last_id + 1)
        cur = self.cursor()
        blob, txn_ids, applied = cur.encode_group(txns, self.cipher, data_bytes)
        self._write_and_flush(self.position.offset, blob)
        self.position = cur.position
        self.unsigned_commits += len(txns)
        return txn_ids, applied

    def append_checkpoint(self) -> None:
        """A CHECKPOINT signed by the device key over the chain head, as a
        group of its own (one write, one flush)."""
        if self.signer is None:
            raise KeyUnavailable("checkpoints need the device key", hint="start statefsd with --keystore-socket")
        cur = self.cursor()
        blob = cur.encode_checkpoint(self.signer, self.sb.device_uuid)
        if self.position.offset + len(blob) > self.region_end:
            raise NoSpace(f"{self.device.path}: no room for a checkpoint")
        self._write_and_flush(self.position.offset, blob)
        self.position = cur.position
        self.unsigned_commits = 0
        self.audit("checkpoint", chain_head=cur.chain.hex(), seq=cur.seq - 1)

    def claim_txn_ids(self, count: int) -> int:
        """Take ``count`` txn ids for compaction's copies (reserved durably
        before use); commits go on above them. Returns the first."""
        first = self.position.next_txn
        self.position = self.position._replace(next_txn=first + count)
        if first + count - 1 > self.sb.txn_reserved:
            self.reserve_txn_ids(first + count)
        return first

    def write_copy(self, cur: LogCursor, ops: Ops, limit: int) -> Applied:
        """One transaction of compaction's copy, written at ``cur`` in the
        other region (made durable by switch_region's flush)."""
        if cur.offset + fmt.align_up(self.txn_bytes(ops)) + cur.trailer_bytes() > limit:
            raise NoSpace(f"{self.device.path}: live data does not fit in a log region",
                          hint="delete keys (compaction cannot help); committed data is intact")
        at = cur.offset
        blob, _txn_ids, applied = cur.encode_group([ops], self.cipher)
        self.device.write(at, blob)
        return applied[0]

    def switch_region(self, cur: LogCursor, region: int) -> None:
        """The commit point of compaction: the copy (and a checkpoint over
        it, with a device key) flushed, then one superblock write names the
        new region, epoch and chain base."""
        if self.signer is not None:
            blob = cur.encode_checkpoint(self.signer, self.sb.device_uuid)
            self.device.write(cur.offset - len(blob), blob)
        self.device.flush()
        self.write_superblock(self.sb.evolve(
            generation=self.sb.generation + 1, active_region=region, log_epoch=cur.epoch,
            chain_base=cur.chain_base, durable_end=cur.offset))
        # The same superblock into the other slot too: should the switch
        # slot rot later, the surviving one must not name the old region.
        self.write_superblock(self.sb.evolve(generation=self.sb.generation + 1))
        self.set_region(*self.sb.active_extent)
        self.position = LogPosition(cur.offset, cur.seq, cur.group, cur.chain, self.position.next_txn)
        if self.signer is not None:
            self.unsigned_commits = 0

    def reserve_txn_ids(self, upto: int) -> None:
        """Durably reserve txn ids through at least ``upto`` (invariant 8).
        The log end is recorded as the durable floor at the same time."""
        self.write_superblock(self.sb.evolve(generation=self.sb.generation + 1,
                                             txn_reserved=upto + fmt.TXN_RESERVE_BATCH - 1,
                                             durable_end=self.position.offset))

    def write_superblock(self, sb: fmt.Superblock) -> None:
        """Write ``sb`` into the slot *not* holding the current superblock
        (slot = generation % 2, so the generation may skip one): a torn
        write can then only damage the older copy."""
        if sb.generation % 2 == self._sb_slot:
            sb = sb.evolve(generation=sb.generation + 1)
        self._write_and_flush(fmt.SUPERBLOCK_OFFSETS[sb.generation % 2], fmt.encode_superblock(sb))
        self.sb = sb
        self._sb_slot = sb.generation % 2

    def write_identity_copy(self) -> None:
        """The identity copy follows a key check learnt after mkfs."""
        if fmt.has_identity_copy(self.sb):
            self.device.write(self.sb.identity_copy_offset, fmt.encode_superblock(
                self.sb.evolve(generation=1, txn_reserved=0, durable_end=0)))

    def write_sectors(self, sectors: dict[int, bytes]) -> None:
        """Sectors rebuilt from parity, back in place. A torn write of one
        leaves it exactly as repairable as before."""
        for offset, sector in sorted(sectors.items()):
            self.device.write(offset, sector)
        self.device.flush()

    def _write_and_flush(self, offset: int, blob: bytes) -> None:
        try:
            self.device.write_durable(offset, blob)
        except OSError as exc:
            raise DeviceIOError(f"{self.device.path}: {exc}") from None
