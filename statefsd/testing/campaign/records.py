"""Which txn ids and nonces were written to the device: invariants (8) and (10).

Every record the engine writes is parsed out of the device writes of a
trace (a write group starts with a record; records follow each other up to
the zero padding). For every PREPARE we note its txn id, for every sealed
PAYLOAD its nonce ``format.seal_nonce(salt, txn_id, op_index, chunk_index)``
(the key is fixed per image, so the nonce alone names the (key, nonce)
pair). Writing the same bytes again under the same nonce leaks nothing (a
verbatim copy, as compaction may make), so a repeat counts only when the
sealed bytes differ; likewise a txn id counts as reused only when its
PREPARE names different operations.

A :class:`History` is what was issued before a cut, possibly over several
traces (the workload, then a recovery that was itself cut); any id or nonce
a later recovery writes again is a violation, whether or not the earlier
write survived the cut: a dropped write may still have reached the medium
in part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from statefsd.storage import format as fmt
from statefsd.testing.simdev import Trace

from statefsd.testing.campaign.timeline import Violation


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def records_in(data: bytes):
    """(header, payload) of each record from the start of a write up to the padding."""
    pos = 0
    while pos + fmt.HEADER_SIZE <= len(data):
        h = fmt.unpack_header(data, pos)
        end = pos + fmt.HEADER_SIZE + h.payload_len
        if fmt.header_problem(h) or end > len(data):
            return
        yield h, data[pos + fmt.HEADER_SIZE:end]
        pos = end


@dataclass
class WriteIndex:
    """First trace op that wrote each txn id / nonce in one trace (with a digest of what it
    wrote), plus the repeats inside that trace."""

    txn_ids: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    nonces: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    repeats: list[tuple[int, str]] = field(default_factory=list)   # (op index, description)

    @classmethod
    def of(cls, trace: Trace, salt: bytes) -> "WriteIndex":
        index = cls()
        for op in trace:
            if op.kind != "write" or (op.offset in fmt.SUPERBLOCK_OFFSETS and op.length == fmt.BLOCK_SIZE):
                continue
            for h, payload in records_in(op.data):
                if h.type == fmt.PREPARE:
                    index._note(index.txn_ids, h.txn_id, op.index, payload, f"txn id {h.txn_id}")
                elif h.type == fmt.PAYLOAD and h.flags & fmt.FLAG_SEALED:
                    nonce = fmt.seal_nonce(salt, h.txn_id, h.op_index, h.chunk_index)
                    index._note(index.nonces, nonce, op.index, payload, _nonce_name(h))
        return index

    def _note(self, table: dict, key, at: int, payload: bytes, what: str) -> None:
        content = digest(payload)
        first, old = table.setdefault(key, (at, content))
        if old != content:
            self.repeats.append((at, f"{what} written at op #{first} and with other bytes at op #{at}"))


@dataclass(frozen=True)
class History:
    """Writes issued before a cut: layers of (trace index, ops issued), oldest first."""

    layers: tuple[tuple[WriteIndex, int, str], ...] = ()

    def then(self, index: WriteIndex, upto: int, label: str) -> "History":
        return History(self.layers + ((index, upto, label),))

    def check(self, new: WriteIndex, upto: int | None = None) -> list[Violation]:
        """Violations for ids/nonces ``new`` issued (its first ``upto`` ops) that an earlier layer
        issued before its cut, or that ``new`` issued twice."""
        out = []
        limit = float("inf") if upto is None else upto
        for at, what in new.repeats:
            if at < limit:
                out.append(Violation(10 if what.startswith("nonce") else 8, f"{what} (same trace)"))
        for inv, table in ((8, "txn_ids"), (10, "nonces")):
            for key, (at, content) in getattr(new, table).items():
                if at >= limit:
                    continue
                for old, cut, label in self.layers:
                    first, old_content = getattr(old, table).get(key, (None, None))
                    if first is not None and first < cut and old_content != content:
                        what = f"txn id {key}" if inv == 8 else f"nonce {key.hex()}"
                        out.append(Violation(inv, f"{what} was written by the {label} at op #{first} "
                                                  f"(before its cut) and with other bytes after recovery "
                                                  f"at op #{at}"))
                        break
        return out


def _nonce_name(h: fmt.RecordHeader) -> str:
    return f"nonce of txn {h.txn_id} op {h.op_index} chunk {h.chunk_index}"
