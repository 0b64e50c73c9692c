"""check: prove every retained snapshot from what is stored.

For each snapshot: its signature under its device's key, then its whole
tree read back: every node unsealed and its keyed ID recomputed, so the
root (a Merkle root over the tree) is recomputed from stored bytes; every
chunk's record must exist and count references, and with --read-data every
chunk is unsealed and its ID recomputed too. Memory is bounded: a subtree
already proven is remembered in a bounded set only, so a very large vault
costs time, not memory. Exit status follows fsck(8).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from statefsd.errors import FsckExit, StateFSError
from statefsd.vault import records as rec
from statefsd.vault.progress import Progress
from statefsd.vault.vault import Vault

PROVEN_IDS = 200_000
BATCH = 64


class Checker:
    def __init__(self, vault: Vault, read_data: bool, progress: Progress | None = None) -> None:
        self.vault = vault
        self.store = vault.objects()
        self.read_data = read_data
        self.progress = progress or Progress(None)
        self.problems: list[dict] = []
        self.proven: OrderedDict[bytes, None] = OrderedDict()
        self.nodes = self.chunks = self.chunk_bytes = 0

    def run(self, log_scan: dict | None = None) -> dict:
        started = time.time()
        snaps = self.vault.snapshots()
        for snap in snaps:
            where = f"snapshot {snap['id'].hex()[:8]}:"
            why = self.vault.verify_signature(snap)
            if why:
                self._problem(where, why)
            try:
                self._object(snap["root"], where)
            except StateFSError as exc:
                self._problem(where, exc.message)
        self.progress.done()
        chain = _chain_report(log_scan)
        if chain.get("problem"):
            self._problem("StateFS log", chain["problem"])
        return {"snapshots": len(snaps), "nodes": self.nodes, "chunks": self.chunks,
                "chunk_bytes_read": self.chunk_bytes, "read_data": self.read_data, "chain": chain,
                "problems": self.problems, "seconds": round(time.time() - started, 3),
                "exit": int(FsckExit.UNCORRECTED if self.problems else FsckExit.CLEAN)}

    def _problem(self, where: str, what: str) -> None:
        self.problems.append({"where": where, "problem": what})
        self.progress.warn(f"{where}: {what}")

    def _seen(self, oid: bytes) -> bool:
        if oid in self.proven:
            self.proven.move_to_end(oid)
            return True
        self.proven[oid] = None
        if len(self.proven) > PROVEN_IDS:
            self.proven.popitem(last=False)
        return False

    def _object(self, oid: bytes, where: str, shape: tuple[str, str] = (rec.TREE, rec.TREELIST)) -> None:
        if self._seen(oid):
            return
        found = self.store.lookup([oid])
        if oid not in found:
            self._problem(where, f"node {oid.hex()} has no record")
        elif found[oid][0].refs < 1:
            self._problem(where, f"node {oid.hex()} is used but counts {found[oid][0].refs} references")
        try:
            tag, items = self.store.read_node(oid)
        except StateFSError as exc:
            self._problem(where, exc.message)
            return
        self.nodes += 1
        if tag not in shape:
            self._problem(where, f"node {oid.hex()} is a {tag!r} where a {shape[0]!r} belongs")
            return
        if tag == rec.TREE:
            for raw in items:
                entry = rec.Entry.decode(raw)
                sub = where + "/" + entry.name.decode(errors="replace")
                if entry.content_kind == rec.KIND_CHUNK:
                    self._chunks([(entry.content, entry.size)], sub)
                elif entry.content is not None:
                    kind = (rec.TREE, rec.TREELIST) if entry.type == rec.DIR else (rec.CHUNKS, rec.CHUNKLIST)
                    self._object(entry.content, sub, kind)
        elif tag == rec.CHUNKS:
            self._chunks([(cid, size) for cid, size in items], where)
        else:
            for child in items:
                self._object(child, where, shape)

    def _chunks(self, chunks: list[tuple[bytes, int]], where: str) -> None:
        fresh = [(cid, size) for cid, size in chunks if not self._seen(cid)]
        self.chunks += len(fresh)
        found = self.store.lookup([cid for cid, _ in fresh])
        for cid, _ in fresh:
            if cid not in found:
                self._problem(where, f"chunk {cid.hex()} has no record")
            elif found[cid][0].refs < 1:
                self._problem(where, f"chunk {cid.hex()} is used but counts no reference")
        if not self.read_data:
            return
        for i in range(0, len(fresh), BATCH):
            batch = fresh[i:i + BATCH]
            sizes = dict(batch)
            for cid, data in self.store.read_many([(cid, rec.KIND_CHUNK) for cid, _ in batch]):
                if isinstance(data, StateFSError):
                    self._problem(where, f"chunk {cid.hex()}: {data.message}")
                elif len(data) != sizes[cid]:
                    self._problem(where, f"chunk {cid.hex()} holds {len(data)} bytes, its file says {sizes[cid]}")
                else:
                    self.chunk_bytes += len(data)
                    self.progress.advance(bytes=len(data))


def _chain_report(scan: dict | None) -> dict:
    """What statefsd's online verification proved: the hash chain over every
    commit up to now, and every signed checkpoint on it."""
    if scan is None:
        return {"problem": "statefsd did not verify its log", "verified": False}
    out = {k: scan.get(k) for k in ("chain_head", "committed_txns", "checkpoints", "verified_checkpoints",
                                    "chain_head_matches", "findings", "scanned_bytes")}
    if scan.get("findings"):
        out["problem"] = f"statefsd's log verification found damage: {scan['findings']}"
    elif not scan.get("chain_head_matches"):
        out["problem"] = "the hash chain read back from the device does not end where statefsd's does"
    elif scan.get("verified_checkpoints") != scan.get("checkpoints"):
        out["problem"] = (f"only {scan.get('verified_checkpoints')} of {scan.get('checkpoints')} "
                          f"signed checkpoints verify")
    out["verified"] = "problem" not in out
    return out
