"""Objects and their reference counts, kept transactionally without locks.

An object (a chunk of file data, or a node of a snapshot's tree) is stored
once under its keyed ID: sealed data in ``d/``, a sealed record with its
reference count in ``o/``, and a ``z/`` marker while the count is zero.
refs(o) is the number of distinct stored nodes that list o plus the number
of snapshots whose root it is. Every change of a count is a conditional
StateFS transaction on the record as it was read (ECONFLICT: read again and
retry), and a node is created in the same transaction that counts its
children, so a crash never leaves a count that disagrees with the stored
nodes, and concurrent backups and prunes never wait for each other.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from statefsd.errors import Conflict, IntegrityError, StateFSError
from statefsd.vault import kv as kvmod
from statefsd.vault import records as rec
from statefsd.vault.keys import VaultKeys

LOOKUP_BATCH = 64            # new chunks waiting for one `mget` of their records
KNOWN_IDS = 100_000           # IDs remembered as stored (bounded: memory must not grow with the vault)
TXN_OPS = 126                 # MAX_TXN_OPS 128, with room to spare
TXN_DATA_BYTES = 6 << 20      # one-shot transactions travel in one frame (8 MiB cap)
CONFLICT_RETRIES = 50


class MissingObjects(StateFSError):
    """Objects a new node would reference are gone (collected by a prune)."""

    code = IntegrityError.code

    def __init__(self, ids: list[bytes]) -> None:
        super().__init__(f"{len(ids)} object(s) this backup meant to reuse were collected by a prune "
                         f"(first {ids[0].hex()[:16]})", hint="run the backup again")
        self.ids = ids


@dataclass
class Staged:
    kind: int
    size: int
    sealed: bytes


@dataclass
class WriteStats:
    new_objects: int = 0
    new_bytes: int = 0          # plaintext bytes of objects stored by this session
    stored_bytes: int = 0       # the sealed, padded bytes they occupy
    txns: int = 0
    conflicts: int = 0


class BackgroundWriter:
    """One thread writing batches of new objects on its own connection, at
    most IN_FLIGHT batches ahead of the caller (bounded memory)."""

    IN_FLIGHT = 2

    def __init__(self, kv: kvmod.KV) -> None:
        self.kv = kv
        self.queue: queue.Queue = queue.Queue(maxsize=self.IN_FLIGHT)
        self.done: list[tuple[list, BaseException | None]] = []
        self.thread = threading.Thread(target=self._run, name="vault-writer", daemon=True)
        self.thread.start()

    def submit(self, batch: list, ops: list[tuple], expect: list[tuple[str, int]]) -> None:
        self.queue.put((batch, ops, expect))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            batch, ops, expect = item
            try:
                self.kv.apply(ops, expect)
                self.done.append((batch, None))
            except BaseException as exc:      # handed to the caller at drain
                self.done.append((batch, exc))
            self.queue.task_done()

    def drain(self) -> list[tuple[list, BaseException | None]]:
        self.queue.join()
        done, self.done = self.done, []
        return done

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.kv.close()


class ObjectStore:
    def __init__(self, kv: kvmod.KV, keys: VaultKeys, session: bytes = bytes(rec.SESSION_ID_BYTES), *,
                 pipelined: bool = False) -> None:
        self.kv = kv
        # New data is written by a second connection while this one reads and chunks on.
        self.writer = BackgroundWriter(kv.clone()) if pipelined else None
        self.inflight: set[bytes] = set()
        self.keys = keys
        self.session = session
        self.staged: dict[bytes, Staged] = {}
        self.staged_bytes = 0
        self.pending: dict[bytes, bytes] = {}     # chunk id -> data, existence not yet known
        self.damaged: set[bytes] = set()          # garbage prune found damaged and left alone
        self.pending_bytes = 0
        self.known: OrderedDict[bytes, None] = OrderedDict()
        self.stats = WriteStats()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ------------------------------------------------------------ reads

    def lookup(self, ids: list[bytes]) -> dict[bytes, tuple[rec.ObjectRecord, int]]:
        """The records (and their txn ids) of those of ``ids`` that exist."""
        found: dict[bytes, tuple[rec.ObjectRecord, int]] = {}
        if not ids:
            return found
        for oid, got in zip(ids, self.kv.mget([rec.object_key(i) for i in ids])):
            if got is not None:
                found[oid] = (rec.open_object_record(self.keys.record_seal, oid, got[0]), got[1])
        return found

    def read(self, oid: bytes, kind: int) -> bytes:
        data = next(self.read_many([(oid, kind)]))[1]
        if isinstance(data, StateFSError):
            raise data
        return data

    def read_many(self, wanted: list[tuple[bytes, int]]):
        """Yield (id, data) in order, each verified against its ID; a missing or
        damaged object yields (id, IntegrityError) so the caller can go on."""
        got = self.kv.mget([rec.data_key(oid) for oid, _ in wanted])
        for (oid, kind), item in zip(wanted, got):
            if item is None:
                yield oid, IntegrityError(f"object {oid.hex()[:16]} is missing from the vault",
                                          hint="run `statefs vault check`")
                continue
            try:
                yield oid, rec.open_object(self.keys.object_seal, self.keys.object_id, oid, kind, item[0])
            except IntegrityError as exc:
                yield oid, exc

    def read_node(self, oid: bytes) -> tuple[str, list]:
        return rec.decode_node(self.read(oid, rec.KIND_NODE), f"node {oid.hex()[:16]}")

    # ------------------------------------------------------------ new objects

    def chunk_id(self, data) -> bytes:
        return rec.object_id(self.keys.object_id, rec.KIND_CHUNK, data)

    def add_chunk(self, cid: bytes, data) -> bool:
        """Store a chunk unless the vault has it. Existence is asked in
        batches; returns False when the chunk is known to be stored already."""
        if cid in self.known:
            self.known.move_to_end(cid)
            return False
        if cid in self.pending or cid in self.staged or cid in self.inflight:
            return True
        self.pending[cid] = bytes(data)
        self.pending_bytes += len(data)
        if len(self.pending) >= LOOKUP_BATCH or self.pending_bytes >= TXN_DATA_BYTES:
            self._resolve()
        return True

    def forget_known(self, ids) -> None:
        """These IDs turned out to be gone (a prune collected them): ask again."""
        for oid in ids:
            self.known.pop(oid, None)

    def _remember(self, oid: bytes) -> None:
        self.known[oid] = None
        if len(self.known) > KNOWN_IDS:
            self.known.popitem(last=False)

    def _resolve(self) -> None:
        pending, self.pending, self.pending_bytes = self.pending, {}, 0
        found = self.lookup(list(pending))
        gone = self.adopt(found)
        for cid, data in pending.items():
            if cid in found and cid not in gone:
                self._remember(cid)
            else:
                self.stage(cid, rec.KIND_CHUNK, data)

    def adopt(self, found: dict[bytes, tuple[rec.ObjectRecord, int]]) -> set[bytes]:
        """Claim the zero-count objects among ``found`` for this session, so
        that a prune running beside it leaves them alone until this session
        references them. Returns the IDs a prune took first (store them anew)."""
        orphans = {oid: got for oid, got in found.items()
                   if got[0].refs == 0 and got[0].session != self.session}
        gone: set[bytes] = set()
        for _ in range(CONFLICT_RETRIES):
            if not orphans:
                return gone
            batch = dict(list(orphans.items())[:TXN_OPS // 2])
            ops, expect = [], []
            for oid, (record, txn) in batch.items():
                ops.append(("put", rec.object_key(oid),
                            rec.seal_object_record(self.keys.record_seal, oid, record.with_session(self.session))))
                ops.append(("put", rec.zero_key(oid), rec.packb({"session": self.session, "since": time.time_ns()})))
                expect.append((rec.object_key(oid), txn))
            try:
                self.kv.apply(ops, expect)
                for oid in batch:
                    del orphans[oid]
                self.stats.txns += 1
            except Conflict:
                self.stats.conflicts += 1
                fresh = self.lookup(list(batch))
                for oid in batch:
                    if oid not in fresh:
                        gone.add(oid)
                        del orphans[oid]
                    elif fresh[oid][0].refs != 0 or fresh[oid][0].session == self.session:
                        del orphans[oid]          # counted meanwhile: safe to reuse
                    else:
                        orphans[oid] = fresh[oid]
        raise Conflict(f"{len(orphans)} objects kept changing while this backup tried to reuse them",
                       hint="run the backup again")

    def stage(self, oid: bytes, kind: int, data) -> None:
        """Queue a new object; written at the next flush (it has no children)."""
        if oid in self.staged:
            return
        sealed = rec.seal_object(self.keys.object_seal, oid, data)
        self.staged[oid] = Staged(kind, len(data), sealed)
        self.staged_bytes += len(sealed)
        if len(self.staged) * 3 >= TXN_OPS or self.staged_bytes >= TXN_DATA_BYTES:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Write every staged object at refs 0 (with its z/ marker); with
        ``wait`` return only once all of them are durable. An object that
        appeared meanwhile (another backup stored the same data) is dropped."""
        if self.pending:
            self._resolve()
        while self.staged:
            batch: list[tuple[bytes, Staged]] = []
            size = 0
            for oid, st in self.staged.items():
                if batch and (len(batch) * 3 + 3 > TXN_OPS or size + len(st.sealed) > TXN_DATA_BYTES):
                    break
                batch.append((oid, st))
                size += len(st.sealed)
            for oid, _ in batch:
                self._unstage(oid)
            if self.writer is None:
                self._write_now(batch)
            else:
                self.writer.submit(batch, *self._batch_ops(batch))
        if wait and self.writer is not None:
            for batch, error in self.writer.drain():
                if error is None:
                    self._written(batch)
                elif isinstance(error, Conflict):
                    self._write_now(batch)      # someone stored some of them first: sort it out in order
                else:
                    raise error

    def _batch_ops(self, batch: list[tuple[bytes, Staged]]) -> tuple[list[tuple], list[tuple[str, int]]]:
        ops, expect = [], []
        now = time.time_ns()
        for oid, st in batch:
            ops += self._create_ops(oid, st.kind, st.size, st.sealed, now)
            expect.append((rec.object_key(oid), 0))
        return ops, expect

    def _write_now(self, batch: list[tuple[bytes, Staged]]) -> None:
        while batch:
            try:
                self.kv.apply(*self._batch_ops(batch))
            except Conflict:
                self.stats.conflicts += 1
                found = self.lookup([oid for oid, _ in batch])
                gone = self.adopt(found)
                for oid in found:
                    if oid not in gone:
                        self._remember(oid)
                batch = [(oid, st) for oid, st in batch if oid not in found or oid in gone]
                continue
            self._written(batch)
            return

    def _written(self, batch: list[tuple[bytes, Staged]]) -> None:
        self.stats.txns += 1
        for oid, st in batch:
            self.inflight.discard(oid)
            self._remember(oid)
            self.stats.new_objects += 1
            self.stats.new_bytes += st.size
            self.stats.stored_bytes += len(st.sealed)

    def _unstage(self, oid: bytes) -> Staged:
        st = self.staged.pop(oid)
        self.staged_bytes -= len(st.sealed)
        self.inflight.add(oid)
        return st

    def _create_ops(self, oid: bytes, kind: int, size: int, sealed: bytes, now: int) -> list[tuple]:
        record = rec.ObjectRecord(kind, 0, size, now, self.session)
        return [("put", rec.data_key(oid), sealed),
                ("put", rec.object_key(oid), rec.seal_object_record(self.keys.record_seal, oid, record)),
                ("put", rec.zero_key(oid), rec.packb({"session": self.session, "since": now}))]

    def create_node(self, tag: str, items: list) -> bytes:
        """Store a node and count a reference to each of its distinct children,
        in one transaction. Returns its ID (an existing equal node is reused).
        Raises MissingObjects if a child no longer exists."""
        raw = rec.encode_node(tag, items)
        oid = rec.object_id(self.keys.object_id, rec.KIND_NODE, raw)
        children = rec.node_children(tag, items)
        self.flush()
        sealed = None
        for _ in range(CONFLICT_RETRIES):
            found = self.lookup([oid, *children])
            if oid in found and oid not in self.adopt({oid: found[oid]}):
                return oid
            missing = [c for c in children if c not in found]
            if missing:
                raise MissingObjects(missing)
            if sealed is None:
                sealed = rec.seal_object(self.keys.object_seal, oid, raw)
            ops = self._create_ops(oid, rec.KIND_NODE, len(raw), sealed, time.time_ns())
            expect = [(rec.object_key(oid), 0)]
            for child in children:
                ops += self._count_ops(child, *found[child], +1)
                expect.append((rec.object_key(child), found[child][1]))
            if not self._try_apply(ops, expect):
                continue
            self.stats.new_objects += 1
            self.stats.new_bytes += len(raw)
            self.stats.stored_bytes += len(sealed)
            return oid
        raise Conflict(f"node {oid.hex()[:16]}: other writers changed its children {CONFLICT_RETRIES} times in a row",
                       hint="run the command again")

    def _try_apply(self, ops: list[tuple], expect: list[tuple[str, int]]) -> bool:
        """One conditional transaction; False if a condition failed (read again, retry)."""
        try:
            self.kv.apply(ops, expect)
        except Conflict:
            self.stats.conflicts += 1
            return False
        self.stats.txns += 1
        return True

    def _count_ops(self, oid: bytes, record: rec.ObjectRecord, txn: int, delta: int) -> list[tuple]:
        refs = record.refs + delta
        if refs < 0:
            raise IntegrityError(f"object {oid.hex()[:16]} would drop below zero references",
                                 hint="run `statefs vault check`")
        ops: list[tuple] = [("put", rec.object_key(oid),
                             rec.seal_object_record(self.keys.record_seal, oid, record.with_refs(refs)))]
        if refs == 0:
            ops.append(("put", rec.zero_key(oid), rec.packb({"session": b"", "since": time.time_ns()})))
        elif record.refs == 0:
            ops.append(("delete", rec.zero_key(oid)))
        return ops

    def change_count(self, oid: bytes, delta: int, extra_ops: list[tuple] = (),
                     extra_expect: list[tuple[str, int]] = ()) -> None:
        """Add ``delta`` to one object's count, atomically with ``extra_ops``
        (a snapshot record and its root count change together)."""
        for _ in range(CONFLICT_RETRIES):
            found = self.lookup([oid])
            if oid not in found:
                raise MissingObjects([oid])
            record, txn = found[oid]
            try:
                self.kv.apply([*extra_ops, *self._count_ops(oid, record, txn, delta)],
                              [*extra_expect, (rec.object_key(oid), txn)])
                self.stats.txns += 1
                return
            except Conflict:
                self.stats.conflicts += 1
                if extra_expect and self._expectations_broken(extra_expect):
                    raise
        raise Conflict(f"object {oid.hex()[:16]}: its count changed {CONFLICT_RETRIES} times in a row",
                       hint="run the command again")

    def _expectations_broken(self, expect: list[tuple[str, int]]) -> bool:
        got = self.kv.mget([k for k, _ in expect])
        return any((g[1] if g else 0) != txn for (_, txn), g in zip(expect, got))

    # ------------------------------------------------------------ collection

    def collect(self, oid: bytes, is_live_session) -> int:
        """Delete one zero-count object and count down its children, in one
        transaction. Returns the stored bytes freed (0 if it was not garbage)."""
        for _ in range(CONFLICT_RETRIES):
            found = self.lookup([oid])
            zkey = rec.zero_key(oid)
            if oid not in found:
                self.kv.apply([("delete", zkey)])   # a marker left without its object
                return 0
            record, txn = found[oid]
            if record.refs != 0:
                try:
                    self.kv.apply([("delete", zkey)], [(rec.object_key(oid), txn)])
                except Conflict:
                    continue
                return 0
            if is_live_session(record.session):
                return 0
            data = kvmod.get(self.kv, rec.data_key(oid))
            children: list[bytes] = []
            if record.kind == rec.KIND_NODE:
                try:
                    children = self._children_of(oid, data)
                except IntegrityError:
                    self.damaged.add(oid)
                    return 0
            kids = self.lookup(children)
            ops: list[tuple] = [("delete", rec.data_key(oid)), ("delete", rec.object_key(oid)), ("delete", zkey)]
            expect = [(rec.object_key(oid), txn)]
            for child in children:
                if child in kids:      # a child already gone cannot be counted down
                    ops += self._count_ops(child, *kids[child], -1)
                    expect.append((rec.object_key(child), kids[child][1]))
            if self._try_apply(ops, expect):
                return len(data[0]) if data else 0
        raise Conflict(f"object {oid.hex()[:16]} kept changing while prune tried to collect it",
                       hint="run prune again")

    def _children_of(self, oid: bytes, data: kvmod.Versioned | None) -> list[bytes]:
        if data is None:
            raise IntegrityError(f"node {oid.hex()[:16]} has a record but no data", hint="run `statefs vault check`")
        raw = rec.open_object(self.keys.object_seal, self.keys.object_id, oid, rec.KIND_NODE, data[0])
        return rec.node_children(*rec.decode_node(raw, f"node {oid.hex()[:16]}"))

    def collect_many(self, oids: list[bytes], is_live_session) -> tuple[int, int]:
        """Collect a batch of zero-count candidates with few round trips: one
        read of their records, one of the nodes' data, one of their children,
        then transactions of several objects each. A batch a concurrent
        writer touched falls back to one object at a time. Returns
        (objects collected, stored bytes freed, objects left to live sessions)."""
        found = self.lookup(oids)
        stale = [("delete", rec.zero_key(oid)) for oid in oids if oid not in found]
        garbage = [oid for oid in oids if oid in found and found[oid][0].refs == 0
                   and not is_live_session(found[oid][0].session)]
        leftovers = [oid for oid in oids if oid in found and found[oid][0].refs != 0]
        live = sum(1 for oid in oids if oid in found and found[oid][0].refs == 0
                   and is_live_session(found[oid][0].session))
        if stale:
            self.kv.apply(stale)
        nodes = [oid for oid in garbage if found[oid][0].kind == rec.KIND_NODE]
        data = dict(zip(garbage, self.kv.mget([rec.data_key(oid) for oid in garbage])))
        children: dict[bytes, list[bytes]] = {}
        for oid in nodes:
            try:
                children[oid] = self._children_of(oid, data[oid])
            except IntegrityError:
                # Its children cannot be counted down without it: leave it
                # (and them) for `check` to report rather than guess.
                self.damaged.add(oid)
                garbage.remove(oid)
        kids = self.lookup(list(dict.fromkeys(c for cs in children.values() for c in cs)))
        collected = freed = 0
        group: list[bytes] = []

        def write(group: list[bytes]) -> None:
            nonlocal collected, freed
            ops, expect, down = [], [], {}
            for oid in group:
                ops += [("delete", rec.data_key(oid)), ("delete", rec.object_key(oid)), ("delete", rec.zero_key(oid))]
                expect.append((rec.object_key(oid), found[oid][1]))
                for child in children.get(oid, ()):
                    if child in kids:
                        down[child] = down.get(child, 0) + 1
            for child, n in down.items():
                ops += self._count_ops(child, *kids[child], -n)
                expect.append((rec.object_key(child), kids[child][1]))
            try:
                self.kv.apply(ops, expect)
                self.stats.txns += 1
                collected += len(group)
                freed += sum(len(data[oid][0]) for oid in group if data[oid] is not None)
            except Conflict:
                self.stats.conflicts += 1
                for oid in group:
                    n = self.collect(oid, is_live_session)
                    collected += n > 0
                    freed += n
            for child in down:
                kids.pop(child, None)        # counted down: read again before another change

        ops_in_group = 0
        for oid in garbage:
            mine = children.get(oid, ())
            cost = 3 + 2 * len(mine)
            if group and (ops_in_group + cost > TXN_OPS or any(c not in kids for c in mine)):
                write(group)
                group, ops_in_group = [], 0
            missing = [c for c in mine if c not in kids]
            if missing:
                kids.update(self.lookup(missing))
            group.append(oid)
            ops_in_group += cost
        if group:
            write(group)
        for oid in leftovers:
            self.collect(oid, is_live_session)      # a stale marker: dropped under its record's condition
        return collected, freed, live
