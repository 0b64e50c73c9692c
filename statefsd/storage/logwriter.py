"""The log writer: the only code that writes an image's log and superblocks.

It mirrors the reader (logscan.py): the reader takes write groups apart,
the writer makes them (invariant 7: one flush per group, each group on a
fresh GROUP_ALIGN boundary, with its parity trailer when redundancy is on;
one device write, or two for a large group: its leading sectors while a
helper thread computes the COMMIT digests, then the rest). The writer is
not thread-safe: the engine calls it only from the thread that holds its
writer role (engine.py, rule C1); that thread does every device write and
waits for its helpers' work (sealing, digests) before it goes on.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

from statefsd.errors import DeviceIOError, InternalError, KeyUnavailable, NoSpace
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import AlignedBuffers, BlockDevice
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.image import Signer
from statefsd.storage.index import Entry

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
    position as it goes; nothing reaches the device here.

    A group is built in place, in one buffer (``buffers``: page-aligned
    memory the device can write without a copy; without it, a fresh
    bytearray): every value is copied once, from where the request left it
    into its PAYLOAD record (or sealed straight into it), and each record's
    CRC, the transaction digest, the chain hash and the parity are computed
    over that buffer. A returned group is a view of it, valid until this
    thread builds the next group."""

    def __init__(self, position: LogPosition, *, epoch: int, mount_gen: int, parity: bool,
                 buffers: AlignedBuffers | None = None) -> None:
        self.epoch, self.mount_gen, self.parity = epoch, mount_gen, parity
        self.offset, self.seq, self.group = position.offset, position.seq, position.group
        self.chain, self.txn_id = position.chain, position.next_txn
        self.chain_base = position.chain   # the prev_hash of the first COMMIT this cursor writes
        self._buffers = buffers

    @property
    def position(self) -> LogPosition:
        return LogPosition(self.offset, self.seq, self.group, self.chain, self.txn_id)

    def trailer_bytes(self) -> int:
        return fmt.PARITY_TRAILER_SIZE if self.parity else 0

    def encode_checkpoint(self, signer: Signer, device_uuid: bytes) -> memoryview:
        """A group holding one CHECKPOINT over the current chain head."""
        message = fmt.checkpoint_message(device_uuid, self.epoch, self.seq, self.chain)
        body = fmt.encode_checkpoint(fmt.CheckpointBody(self.chain, signer.public_key,
                                                        signer.sign(fmt.CHECKPOINT_SIGN_LABEL, message)))
        group = _Group(self, fmt.HEADER_SIZE + len(body))
        group.record(fmt.CHECKPOINT, body, flags=fmt.FLAG_GROUP_END, txn_id=0)
        return self._close_group(group)

    def encode_group(self, txns: list[Ops], cipher: RecordCipher | None, *,
                     early: Callable[[memoryview], None] | None = None, data_bytes: int | None = None,
                     ) -> tuple[memoryview, list[int], list[Applied]]:
        """One write group holding ``txns``: its bytes, the txn ids given
        out, and each transaction's index changes.

        The records are laid out first, each COMMIT's place kept; then every
        PAYLOAD is filled (sealed chunks on helper threads when there are
        many); then the digests and the chain go into the COMMITs, in order.
        ``early``, when given, is called with the group's leading whole
        sectors once they hold their final bytes (everything before the
        first COMMIT's sector), if there are at least EARLY_WRITE_MIN of
        them, while a helper thread computes the digests: the caller writes
        them meanwhile. Nothing after that changes them. ``data_bytes``: the
        sum of the transactions' txn_bytes, when the caller has added it up."""
        if data_bytes is None:
            data_bytes = sum(txn_bytes(ops, cipher is not None) for ops in txns)
        group = _Group(self, data_bytes)
        buf = group.buf
        txn_ids: list[int] = []
        applied: list[Applied] = []
        commits: list[tuple[int, int, int, int]] = []   # per txn: first record, COMMIT place, its seq, records
        chunks_to_fill: list[tuple] = []
        txn_id = self.txn_id
        for ops in txns:
            txn_ids.append(txn_id)
            first = group.record(fmt.PREPARE, fmt.encode_prepare([op for op, _ in ops]), txn_id=txn_id)
            count = 1
            entries: Applied = []
            for op_index, (op, value) in enumerate(ops):
                phash = fmt.path_hash(op.path)
                if op.kind == fmt.OP_DELETE:
                    group.record(fmt.DELETE, op.path, txn_id=txn_id, path_hash=phash, op_index=op_index)
                    count += 1
                    entries.append((op.path, None))
                    continue
                value = memoryview(value)
                chunks = []
                for chunk_index in range(fmt.chunk_count(op.value_len)):
                    piece = value[chunk_index * fmt.CHUNK_SIZE:(chunk_index + 1) * fmt.CHUNK_SIZE]
                    size = len(piece) + (fmt.SEAL_OVERHEAD if cipher else 0)
                    at, seq = group.place(size)
                    chunks.append((self.offset + at, size))
                    chunks_to_fill.append((at, seq, piece, txn_id, op_index, chunk_index, phash))
                    count += 1
                # sealed: its chunks are; an empty value has none (as replay says)
                entries.append((op.path, Entry(txn_id, op.value_len, tuple(chunks), bool(cipher and chunks))))
            at, seq = group.place(fmt.COMMIT_PAYLOAD_SIZE)
            commits.append((first, at, seq, count))
            applied.append(entries)
            txn_id += 1
        if cipher and len(chunks_to_fill) >= PARALLEL_SEAL_MIN_CHUNKS:
            # libsodium releases the GIL: half the chunks are sealed on a helper thread.
            half = len(chunks_to_fill) // 2
            other = helpers().submit(group.fill, chunks_to_fill[half:], cipher)
            try:
                group.fill(chunks_to_fill[:half], cipher)
            finally:
                other.result()
        else:
            group.fill(chunks_to_fill, cipher)
        # Each transaction's records are adjacent: one digest call over them all.
        spans = [buf[first:at] for first, at, _, _ in commits]
        head = commits[0][1] // fmt.GROUP_ALIGN * fmt.GROUP_ALIGN if commits else 0
        head_xor = None
        if early is not None and head >= EARLY_WRITE_MIN:
            # hashlib and numpy release the GIL: the helper hashes (and
            # XORs the leading sectors for the parity) while this thread writes.
            hashing = helpers().submit(_digests_and_xor, spans, buf[:head] if self.parity else None)
            try:
                early(buf[:head])
            finally:
                digests, head_xor = hashing.result()
        else:
            digests, _ = _digests_and_xor(spans, None)
        for n, ((first, at, seq, count), digest) in enumerate(zip(commits, digests)):
            body = fmt.encode_commit(fmt.CommitBody(self.chain, digest, count))
            group.stamp(at, seq, fmt.COMMIT, body, flags=fmt.FLAG_GROUP_END if n == len(commits) - 1 else 0,
                        txn_id=txn_ids[n])
            self.chain = fmt.chain_hash(buf[at:at + fmt.HEADER_SIZE + fmt.COMMIT_PAYLOAD_SIZE])
        self.txn_id = txn_id
        return self._close_group(group, head, head_xor), txn_ids, applied

    def _take(self, size: int) -> memoryview:
        if self._buffers is None:
            return memoryview(bytearray(size))
        return memoryview(self._buffers.get(size))[:size]

    def _close_group(self, group: "_Group", head: int = 0, head_xor: bytes | None = None) -> memoryview:
        """The group's bytes: records, padding, and the parity trailer
        (``head_xor``: fmt.xor_sectors of the first ``head`` bytes, if known)."""
        if group.pos != group.size:
            raise InternalError(f"a write group came out {group.pos} bytes long, its layout said {group.size}")
        end = fmt.align_up(group.pos)
        group.buf[group.pos:end] = bytes(end - group.pos)
        if self.parity:
            parity = None if head_xor is None else fmt.xor_sectors(head_xor + fmt.xor_sectors(group.buf[head:end]))
            end = fmt.pack_parity_trailer_into(group.buf, end, epoch=self.epoch, group=self.group, seq=self.seq,
                                               mount_gen=self.mount_gen, parity=parity)
        self.seq = group.seq
        self.group += 1
        self.offset += end
        return group.buf[:end]


# A group whose first COMMIT lies at least this far in has its leading
# sectors written while the COMMIT digests are computed (LogWriter.append):
# SHA-256 runs at about 1.4 GB/s, so a 1 MiB transaction's digest takes as
# long as writing it. Below this the extra write costs more than it hides.
EARLY_WRITE_MIN = 256 << 10
# Sealed chunks per group from which half of them are sealed on a helper thread.
PARALLEL_SEAL_MIN_CHUNKS = 4

def _digests_and_xor(spans: list[memoryview], sectors: memoryview | None) -> tuple[list[bytes], bytes | None]:
    """The SHA-256 of each span, and fmt.xor_sectors of ``sectors`` (if given)."""
    return [hashlib.sha256(span).digest() for span in spans], None if sectors is None else fmt.xor_sectors(sectors)


_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def helpers() -> ThreadPoolExecutor:
    """The process's helper threads for the writer role holder: they seal
    chunks and compute digests, never touch a device. A helper runs one
    leaf task and never waits on anything, so the writers of several
    engines may share them."""
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="statefs-writer-helper")
        return _helpers


def _forget_helpers_in_child() -> None:
    # A forked child inherits the pool but not its threads: the pool would
    # count them idle and start none, and the child's next large commit
    # would wait forever for its digests.
    global _helpers, _helpers_lock
    _helpers, _helpers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_helpers_in_child)


class _Group:
    """The buffer one group is being built in, and where its next record goes."""

    def __init__(self, cursor: LogCursor, size: int) -> None:
        self.cursor, self.size = cursor, size
        self.buf = cursor._take(fmt.align_up(size) + cursor.trailer_bytes())
        self.pos, self.seq = 0, cursor.seq

    def place(self, size: int) -> tuple[int, int]:
        """Keep room for the next record, of ``size`` payload bytes: its offset and seq."""
        at, seq = self.pos, self.seq
        self.pos += fmt.HEADER_SIZE + size
        self.seq += 1
        return at, seq

    def record(self, rtype: int, payload: bytes, *, txn_id: int, flags: int = 0, path_hash: bytes = fmt.NO_PATH_HASH,
               op_index: int = 0) -> int:
        """Append a record holding ``payload``; returns where it starts."""
        at, seq = self.place(len(payload))
        self.stamp(at, seq, rtype, payload, txn_id=txn_id, flags=flags, path_hash=path_hash, op_index=op_index)
        return at

    def stamp(self, at: int, seq: int, rtype: int, payload: bytes | None = None, *, txn_id: int, size: int = 0,
              flags: int = 0, path_hash: bytes = fmt.NO_PATH_HASH, chunk_index: int = 0, op_index: int = 0) -> None:
        """Write the record placed at ``at``: ``payload``, or the ``size``
        bytes already behind its header, and the header."""
        if payload is not None:
            size = len(payload)
            self.buf[at + fmt.HEADER_SIZE:at + fmt.HEADER_SIZE + size] = payload
        cur = self.cursor
        fmt.pack_record_into(self.buf, at, rtype, flags=flags, epoch=cur.epoch, group=cur.group, seq=seq,
                             mount_gen=cur.mount_gen, txn_id=txn_id, payload_len=size, path_hash=path_hash,
                             chunk_index=chunk_index, op_index=op_index)

    def fill(self, chunks: list[tuple], cipher: RecordCipher | None) -> None:
        """Copy (or seal) value chunks into the PAYLOAD records placed for them."""
        buf = self.buf
        for at, seq, piece, txn_id, op_index, chunk_index, phash in chunks:
            start = at + fmt.HEADER_SIZE
            if cipher:
                size = cipher.seal_into(buf[start:], piece, txn_id=txn_id, op_index=op_index,
                                        chunk_index=chunk_index, phash=phash)
            else:
                size = len(piece)
                buf[start:start + size] = piece
            self.stamp(at, seq, fmt.PAYLOAD, size=size, flags=fmt.FLAG_SEALED if cipher else 0, txn_id=txn_id,
                       path_hash=phash, op_index=op_index, chunk_index=chunk_index)


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
        self.buffers = AlignedBuffers()   # groups are built here (one buffer per writing thread)
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
                         mount_gen=self.mount_gen, parity=self.parity, buffers=self.buffers)

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
        offset = self.position.offset
        written: list[int] = []   # bytes of the group written early

        def write_early(head: memoryview) -> None:
            try:
                self.device.write(offset, head)
            except OSError as exc:
                raise DeviceIOError(f"{self.device.path}: {exc}") from None
            written.append(len(head))

        blob, txn_ids, applied = cur.encode_group(txns, self.cipher, early=write_early, data_bytes=data_bytes)
        head = written[0] if written else 0
        # The rest, and one flush for the whole group (invariant 1): nothing
        # of it counts as written before that flush has returned.
        self._write_and_flush(offset + head, blob[head:])
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
