"""Replay: turn the complete groups of the log into the committed state.

Only committed transactions become visible. A transaction is applied when,
and only when, its COMMIT is found and everything about it checks out:

1. its PREPARE parsed, its txn id is above every earlier txn id;
2. every PUT op has all its PAYLOAD chunks, in order, with the right path
   hash and sizes; every DELETE op has its DELETE record naming the path;
3. the COMMIT's record count and digest (SHA-256 of the txn's records)
   match, and its prev_hash equals the hash of the previous COMMIT (the
   chain), starting from the superblock's chain_base.

A CHECKPOINT must name the current chain head; with the device's public key
at hand its Ed25519 signature must verify too (else: corruption, since
someone rewrote history without the device key).

A PREPARE with no COMMIT before the next PREPARE or the end of the log is an
orphan: dropped whole, reported, not an error. A txn closed by ABORT is
dropped. Records with good checksums that break the rules above cannot come
from a crash (a crash only truncates), so they are *corruption* findings.

Replay is a pure function of the record stream: replaying the same image
twice yields the same state (DESIGN.md invariant 4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

CommitFn = Callable[[int, bytes, list[tuple[bytes, "Entry | None"]]], None]

from statefsd.storage import format as fmt
from statefsd.errors import IntegrityError
from statefsd.storage.index import Entry, KeyIndex
from statefsd.shared.signing import verify_signature
from statefsd.storage.logscan import OVERSIZE_GROUP, Record, ScanEnd, scan_groups


@dataclass
class Finding:
    offset: int
    kind: str           # "corruption", "integrity", "orphan", "aborted", "torn-tail"
    reason: str
    txn_id: int = 0

    def as_dict(self) -> dict:
        return {"offset": self.offset, "kind": self.kind, "reason": self.reason, "txn_id": self.txn_id}


@dataclass
class _OpenTxn:
    prepare: Record
    ops: list[fmt.Op]
    digest: "hashlib._Hash"
    records: int = 1
    next_chunk: list[int] = field(default_factory=list)
    chunks: list[list[tuple[int, int]]] = field(default_factory=list)
    deleted: list[bool] = field(default_factory=list)
    sealed: bool = False
    tampered_at: int = -1       # offset of a sealed chunk that failed authentication


@dataclass
class ReplayResult:
    index: KeyIndex
    end: ScanEnd
    chain_hash: bytes
    max_txn_id: int
    committed: int = 0
    records: int = 0
    findings: list[Finding] = field(default_factory=list)
    unverified_chunks: int = 0  # sealed chunks not authenticated (no key given)
    checkpoints: int = 0        # CHECKPOINT records whose chain head matched
    verified_checkpoints: int = 0   # ... and whose signature verified under the device key
    last_checkpoint: int = -1   # offset of the last CHECKPOINT whose chain head matched (-1: none)
    last_committed: int = 0     # txn id of the last transaction applied (0: none)

    @property
    def corruption(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "corruption"]

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for f in self.findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return {"committed_txns": self.committed, "records": self.records, "keys": len(self.index),
                "max_txn_id": self.max_txn_id, "log_end": self.end.offset,
                "torn_tail_bytes": self.end.torn_bytes, "stop_reason": self.end.stop_reason,
                "unverified_chunks": self.unverified_chunks, "checkpoints": self.checkpoints,
                "verified_checkpoints": self.verified_checkpoints, "findings": kinds}


class Replayer:
    """Applies records in log order; see the module docstring for the rules.

    ``on_commit(txn_id, chain head after it, [(path, Entry or None for a
    delete), ...])`` is called for each transaction as it is applied. A
    replay resumed at a group boundary inside the active region
    (logscan.ScanPoint) starts from the ``chain`` head and ``max_txn_id``
    the replay up to that boundary had (no transaction is open there: the
    writer puts each one whole into one group)."""

    def __init__(self, sb: fmt.Superblock, cipher=None, device_key: bytes | None = None, *,
                 on_commit: CommitFn | None = None, chain: bytes | None = None, max_txn_id: int = 0) -> None:
        self.sb = sb
        self.cipher = cipher
        self.device_key = device_key    # Ed25519 public key checkpoints must verify under
        self.checkpoints = 0
        self.verified_checkpoints = 0
        self.last_checkpoint = -1
        self.unverified_chunks = 0
        self.index = KeyIndex()
        self.chain = sb.chain_base if chain is None else chain
        self.max_txn_id = max_txn_id
        self.last_committed = 0
        self.on_commit = on_commit
        self.open: _OpenTxn | None = None
        self.findings: list[Finding] = []
        self.committed = 0
        self.records = 0
        self.stopped = False    # set at the first corruption: nothing after it is trusted

    def corrupt(self, rec: Record, reason: str) -> None:
        self.findings.append(Finding(rec.offset, "corruption", reason, rec.header.txn_id))
        self.stopped = True

    def apply(self, rec: Record) -> None:
        if self.stopped:
            return
        self.records += 1
        h = rec.header
        handler = _HANDLERS[h.type]
        handler(self, rec, h)

    def finish(self, end: ScanEnd) -> ReplayResult:
        if self.open is not None and not self.stopped:
            self._drop_open("orphan", "prepared but never committed")
        if end.corrupt and not self.stopped:
            if end.evidence_offset >= 0:
                proof = f"a durable record follows at offset {end.evidence_offset}"
            elif end.stop_reason == OVERSIZE_GROUP:
                proof = "no writer writes such a group: the log was damaged or forged"
            else:
                proof = "the superblock recorded it as flushed"
            self.findings.append(Finding(end.corruption_offset, "corruption", f"{end.corruption}; {proof}"))
        elif (end.torn_bytes or not _clean_stop(end.stop_reason)) and not self.stopped:
            self.findings.append(Finding(end.offset, "torn-tail",
                                         f"incomplete last group of {end.torn_bytes} bytes discarded "
                                         f"({end.stop_reason}): a write cut by power loss, or damage "
                                         f"past the durable floor that cannot be told from one"))
        return ReplayResult(self.index, end, self.chain, self.max_txn_id, self.committed,
                            self.records, self.findings, self.unverified_chunks, self.checkpoints,
                            self.verified_checkpoints, self.last_checkpoint, self.last_committed)

    # -- record handlers ----------------------------------------------------

    def _drop_open(self, kind: str, reason: str) -> None:
        p = self.open.prepare
        self.findings.append(Finding(p.offset, kind, reason, p.header.txn_id))
        self.open = None

    def _prepare(self, rec: Record, h: fmt.RecordHeader) -> None:
        if self.open is not None:
            self._drop_open("orphan", f"superseded by txn {h.txn_id} before its COMMIT")
        if h.txn_id <= self.max_txn_id:
            return self.corrupt(rec, f"txn id {h.txn_id} not above earlier txn id {self.max_txn_id}")
        if h.flags & fmt.FLAG_SEALED:
            return self.corrupt(rec, "PREPARE must not be sealed")
        try:
            ops = fmt.decode_prepare(rec.payload)
        except ValueError as exc:
            return self.corrupt(rec, str(exc))
        self.max_txn_id = h.txn_id
        digest = hashlib.sha256(rec.raw())
        self.open = _OpenTxn(rec, ops, digest, next_chunk=[0] * len(ops),
                             chunks=[[] for _ in ops], deleted=[False] * len(ops))

    def _member(self, rec: Record, h: fmt.RecordHeader) -> _OpenTxn | None:
        """The open txn this record belongs to, or None after reporting why not."""
        txn = self.open
        if txn is None or txn.prepare.header.txn_id != h.txn_id:
            self.corrupt(rec, f"{fmt.RECORD_TYPES[h.type]} of txn {h.txn_id} outside its transaction")
            return None
        if h.op_index >= len(txn.ops):
            self.corrupt(rec, f"op index {h.op_index} beyond the {len(txn.ops)} prepared ops")
            return None
        if fmt.path_hash(txn.ops[h.op_index].path) != h.path_hash:
            self.corrupt(rec, "path hash does not match the prepared path")
            return None
        txn.records += 1
        txn.digest.update(rec.raw_header)
        txn.digest.update(rec.payload)
        return txn

    def _payload(self, rec: Record, h: fmt.RecordHeader) -> None:
        txn = self._member(rec, h)
        if txn is None:
            return
        op = txn.ops[h.op_index]
        if op.kind != fmt.OP_PUT:
            return self.corrupt(rec, "PAYLOAD for a DELETE op")
        if h.chunk_index != txn.next_chunk[h.op_index]:
            return self.corrupt(rec, f"chunk {h.chunk_index}, expected {txn.next_chunk[h.op_index]}")
        plain = min(fmt.CHUNK_SIZE, op.value_len - h.chunk_index * fmt.CHUNK_SIZE)
        sealed = bool(h.flags & fmt.FLAG_SEALED)
        if sealed != (self.sb.encryption != fmt.ENCRYPTION_OFF):
            return self.corrupt(rec, "sealed flag does not match the image's encryption mode")
        want = plain + (fmt.SEAL_OVERHEAD if sealed else 0)
        if plain <= 0 or h.payload_len != want:
            return self.corrupt(rec, f"chunk payload of {h.payload_len} bytes, expected {want}")
        txn.sealed = sealed
        if sealed:
            self._authenticate(txn, rec)
        txn.next_chunk[h.op_index] += 1
        txn.chunks[h.op_index].append((rec.offset, h.payload_len))

    def _authenticate(self, txn: _OpenTxn, rec: Record) -> None:
        if self.cipher is None:
            self.unverified_chunks += 1
            return
        try:
            self.cipher.open(rec.payload, rec.header)
        except IntegrityError:
            if txn.tampered_at < 0:
                txn.tampered_at = rec.offset

    def _delete(self, rec: Record, h: fmt.RecordHeader) -> None:
        txn = self._member(rec, h)
        if txn is None:
            return
        op = txn.ops[h.op_index]
        if op.kind != fmt.OP_DELETE or rec.payload != op.path or txn.deleted[h.op_index]:
            return self.corrupt(rec, "DELETE record does not match its prepared op")
        txn.deleted[h.op_index] = True

    def _commit(self, rec: Record, h: fmt.RecordHeader) -> None:
        txn = self.open
        if txn is None or txn.prepare.header.txn_id != h.txn_id:
            return self.corrupt(rec, f"COMMIT of txn {h.txn_id} without its PREPARE")
        try:
            body = fmt.decode_commit(rec.payload)
        except ValueError as exc:
            return self.corrupt(rec, str(exc))
        for i, op in enumerate(txn.ops):
            if op.kind == fmt.OP_PUT and txn.next_chunk[i] != op.chunk_count:
                return self.corrupt(rec, f"txn {h.txn_id} committed with {txn.next_chunk[i]} of "
                                         f"{op.chunk_count} chunks of op {i}")
            if op.kind == fmt.OP_DELETE and not txn.deleted[i]:
                return self.corrupt(rec, f"txn {h.txn_id} committed without the DELETE of op {i}")
        if body.record_count != txn.records:
            return self.corrupt(rec, f"COMMIT counts {body.record_count} records, found {txn.records}")
        if body.txn_digest != txn.digest.digest():
            return self.corrupt(rec, "transaction digest mismatch: records were altered")
        if body.prev_hash != self.chain:
            return self.corrupt(rec, "hash chain broken: prev_hash does not match the previous COMMIT")
        self.chain = fmt.chain_hash(rec.raw())
        self.open = None
        if txn.tampered_at >= 0:
            # The records are intact but a sealed chunk does not authenticate:
            # the whole txn is dropped, the same way on every replay.
            self.findings.append(Finding(txn.tampered_at, "integrity",
                                         "sealed payload failed authentication; transaction discarded",
                                         h.txn_id))
            return
        # An entry is sealed when its chunks are (all of a txn's are, or
        # none: _payload): an empty value has none, in any image.
        index, txn_id, sealed = self.index, h.txn_id, txn.sealed
        for op, chunks in zip(txn.ops, txn.chunks):
            if op.kind == fmt.OP_PUT:
                index.put(op.path, txn_id, op.value_len, chunks, sealed and bool(chunks))
            else:
                index.discard(op.path)
        self.committed += 1
        self.last_committed = txn_id
        if self.on_commit is not None:
            self.on_commit(txn_id, self.chain, [
                (op.path, Entry(txn_id, op.value_len, tuple(chunks), sealed and bool(chunks))
                 if op.kind == fmt.OP_PUT else None) for op, chunks in zip(txn.ops, txn.chunks)])

    def _checkpoint(self, rec: Record, h: fmt.RecordHeader) -> None:
        if self.open is not None:
            self._drop_open("orphan", "checkpoint before its COMMIT")
        try:
            body = fmt.decode_checkpoint(rec.payload)
        except ValueError as exc:
            return self.corrupt(rec, str(exc))
        if body.chain_head != self.chain:
            return self.corrupt(rec, "checkpoint does not match the hash chain: history was rewritten")
        self.checkpoints += 1
        self.last_checkpoint = rec.offset
        if self.device_key is None:
            return
        if body.public_key != self.device_key:
            return self.corrupt(rec, "checkpoint signed by a key that is not this device's")
        message = fmt.checkpoint_message(self.sb.device_uuid, h.epoch, h.seq, body.chain_head)
        if not verify_signature(body.public_key, fmt.CHECKPOINT_SIGN_LABEL, message, body.signature):
            return self.corrupt(rec, "checkpoint signature does not verify: forged history")
        self.verified_checkpoints += 1

    def _abort(self, rec: Record, h: fmt.RecordHeader) -> None:
        if self.open is not None and self.open.prepare.header.txn_id == h.txn_id:
            self._drop_open("aborted", "transaction aborted")
        elif h.txn_id > self.max_txn_id:
            self.max_txn_id = h.txn_id   # an ABORT may burn an id whose PREPARE never landed


def _clean_stop(reason: str) -> bool:
    """Stops that a log ends with normally: never-written space, the end of
    the region, or stale records of an earlier epoch or mount. Anything else
    past the durable floor is a tear, or damage that cannot be told from one:
    reported, never silent."""
    return reason.startswith("zeroed space") or reason == "end of region" or reason.endswith("(stale)")


_HANDLERS = {
    fmt.PREPARE: Replayer._prepare,
    fmt.PAYLOAD: Replayer._payload,
    fmt.DELETE: Replayer._delete,
    fmt.COMMIT: Replayer._commit,
    fmt.ABORT: Replayer._abort,
    fmt.CHECKPOINT: Replayer._checkpoint,
}


def replay(device, sb: fmt.Superblock, cipher=None, device_key: bytes | None = None, *,
           upto: int | None = None, before_group: Callable[[], None] | None = None) -> ReplayResult:
    """Scan the active region and rebuild the committed state. With a
    cipher, every sealed chunk is authenticated; without, it is counted as
    unverified. With the device's public key, every checkpoint signature is
    verified too. ``upto`` ends the scan at that log position (an online
    scrub, logscan.scan_groups); ``before_group`` runs before each group is
    applied and may raise to abandon the scan (the engine is closing)."""
    r = Replayer(sb, cipher, device_key)
    for item in scan_groups(device, sb, upto=upto):
        if isinstance(item, ScanEnd):
            return r.finish(item)
        if before_group is not None:
            before_group()
        for rec in item:
            r.apply(rec)
    raise AssertionError("scan_groups always ends with a ScanEnd")  # pragma: no cover
