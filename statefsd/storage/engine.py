"""The StateFS engine: a mounted image's index, reads and commits.

Invariants the engine keeps (numbered as in docs/DESIGN.md):

(1) A commit returns only after every record of its transaction is durable
    (written, then flushed).
(2) A transaction is all or nothing: its records are written as one block
    of PREPARE, PAYLOAD/DELETE records and COMMIT, and replay applies it only
    when the COMMIT and everything it vouches for is intact.
(7) Write groups (logwriter.py): one flush per group (one device write, or
    two for a large group); group g+1 is never written before group g's
    flush has returned.
(8) Txn ids are reserved in the superblock (txn_reserved) before use.
(9) A mount that finds corruption followed by durable records refuses to
    mount read-write; read-only mounts serve the consistent prefix.

Where the work lives: image.py opens an image (superblock, key, counters),
replay.py rebuilds the index, logwriter.py writes, groupcommit.py holds the
writer role and the commit queue, compaction.py rewrites the log.

Concurrency. Any number of threads may call get/list/stat/commit at once.

    field                         written by                          under
    ----------------------------  ----------------------------------  ------------------
    log.position                  commit leader, checkpoint,          writer role
                                  compaction (claim, switch)
    log.sb, log region            txn-id reservation, compaction      writer role
    log.unsigned_commits          commit leader, checkpoint           writer role
    index (entries, in place)     commit leader, after the flush      writer role
    index (replaced whole)        compaction, at its switch           writer role
    live_bytes                    commit leader, compaction           writer role
    read_only, failure            whoever meets a device error        writer role
    values (repaired sectors)     reads, write-back, compaction       the reader's lock
    role queue, holder, closing   groupcommit.WriterRole              the role's condition
    compactor thread              compaction.Compactor                its thread lock

Rules (tests cite them by number):
C1  One writer: only the thread holding the writer role writes to the
    device or changes a field marked "writer role" above (helper threads
    may seal chunks and compute digests for it; it waits for them before
    it goes on).
C2  Durable before visible: a group's index entries and the new log
    position are published only after its flush returned (invariant 1).
C3  Readers take no lock: index.get and list(index) are single dict
    operations (atomic under the GIL); log.position is one immutable value,
    read once. An entry read before a compaction keeps pointing at intact
    bytes until the compaction after it; a reader that outlives both gets
    an integrity error (headers bind txn id, key and chunk), never another value.
C4  Fairness: compaction and checkpoints wait for the role ahead of new
    commit leaders, so a stream of commits cannot starve them.
C5  Lock order: compaction lock, then writer role, then the role's
    condition; the value reader's lock is a leaf. Nobody waits for the role while
    holding it: a read that repairs a sector inside compaction keeps the
    repair in memory instead of writing it back.
C6  Checkpoints: whether one is due is decided while holding the role, so
    CHECKPOINT_EVERY commits get one checkpoint, not one per thread; a
    checkpoint that fails never turns a durable commit into an error (it
    is audited, and retried CHECKPOINT_EVERY commits later).
C7  Close refuses new commits first, then waits for a running compaction
    or scrub (none can start after), then for the commits queued before it, and
    only then writes the final checkpoint and the clean-unmount superblock.
C8  After a device error the engine is read-only for good: nobody knows
    what the page cache kept, so it stops writing rather than guess.
C9  Conditions (commit's ``expect``) are checked by the commit leader as
    each request joins its group, in queue order: against the index (only
    the role holder changes it, C1) plus the keys written by the requests
    accepted before it in the same group (txn ids are given out in group
    order, so theirs are known). A request whose condition fails gets
    Conflict and writes nothing; the rest of its group is unaffected. A
    request deferred to the next group is checked when it joins that one.
    Txn ids only grow and compaction gives every copy a new one, so a
    condition never holds for a key changed since it was read (no ABA).
C10 Scrub (verify): compaction is held off for the whole scan (the
    compaction lock; a compaction, background, `compact` or one a full
    log asks for, waits for the scrub, and the scrub for a running one).
    The log position and the superblock are then read together under the
    writer role, held only for that read; the scan reads the active region
    up to that position while commits append beyond it, and changes no
    engine state. Without a compaction the region read is never reused, and
    everything below the position was flushed (C2). Close stops a scrub
    between two groups and waits for it (C7).
C11 Feed: a feed page is read like a scrub (C10): compaction held off for
    the page, the log position, superblock and newest txn id read together
    under the writer role, the active region read up to that position with
    the replay rules, values with the checked reads. A page therefore never
    holds part of a transaction (C2: nothing below the position is half
    written), and its cursor stays valid until the next compaction, which
    gives the region a new epoch: a cursor of another epoch restarts the
    feed at the new region's start (its copies of the whole live state).
    The newest txn id (``last_txn``) changes with the index, under the role.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

from statefsd.errors import (
    Conflict, CorruptImage, DeviceIOError, InvalidArgument, NoSpace, NotFound, ReadOnly,
    StateFSError, TooBig,
)
from statefsd.storage import format as fmt
from statefsd.storage import image, scrub
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.compaction import Compactor
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.feed import DEFAULT_BYTES, FROM_BASE, MAX_BYTES, Cursor, read_page
from statefsd.storage.groupcommit import Condition, Request, WriterRole
from statefsd.storage.image import KeyProvider, Signer
from statefsd.storage.logwriter import LogPosition, LogWriter
from statefsd.storage.replay import Entry, ReplayResult, replay
from statefsd.storage.values import ValueReader

AuditFn = Callable[..., None]
CHECKPOINT_EVERY = 1024   # commits between signed checkpoints (also at unmount and compaction)


class Mutation(NamedTuple):
    kind: str           # "put" or "delete"
    path: str
    value: bytes = b""


def utf8_text(text: str, what: str) -> bytes:
    """``text`` as UTF-8 bytes; EINVAL naming ``what`` when it holds bytes
    that were not UTF-8 on the wire (decoded as lone surrogates)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} must be valid UTF-8, got {_as_sent(text[:64])}"
                              f"{'...' if len(text) > 64 else ''}",
                              hint="keys and prefixes are UTF-8 text; recode it") from None


def _as_sent(text: str) -> str:
    """The bytes the client sent (undecodable ones as \\xNN), quoted."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return repr(raw)[1:]


def validate_path(path: str) -> bytes:
    """A key as stored: non-empty UTF-8 without NUL, at most MAX_KEY_BYTES."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("a key must be a non-empty string")
    raw = utf8_text(path, "a key")
    problem = fmt.path_problem(raw)
    if problem and len(raw) > fmt.MAX_KEY_BYTES:
        raise TooBig(problem, hint=f"use a key of at most {fmt.MAX_KEY_BYTES} UTF-8 bytes")
    if problem:
        raise InvalidArgument(problem)
    return raw


def mutation_op(m: Mutation) -> tuple[fmt.Op, bytes]:
    """A mutation as an op and its value: the key's form is checked here,
    whether the ops fit one transaction by fmt.transaction_problem."""
    path = validate_path(m.path)
    if m.kind == "put":
        # A read-only view (a value as the server received it) is taken as it
        # is, not copied; anything mutable is copied so the caller cannot change
        # it under the commit.
        value = m.value if _frozen_bytes_view(m.value) else bytes(m.value)
        return fmt.Op(fmt.OP_PUT, path, len(value)), value
    if m.kind == "delete":
        return fmt.Op(fmt.OP_DELETE, path), b""
    raise InvalidArgument(f"unknown operation {m.kind!r}; use 'put' or 'delete'")


def _frozen_bytes_view(value: object) -> bool:
    return (isinstance(value, memoryview) and value.readonly and value.format == "B"
            and value.c_contiguous)


def validate_mutations(mutations: list[Mutation]) -> list[tuple[fmt.Op, bytes]]:
    ops = [mutation_op(m) for m in mutations]
    problem = fmt.transaction_problem([op for op, _ in ops])
    if problem:
        raise (TooBig if ops else InvalidArgument)(problem)
    return ops


def validate_conditions(expect) -> tuple[Condition, ...]:
    """``expect`` ((key, txn id) pairs; txn 0: the key must be absent) as
    checked conditions, at most MAX_TXN_CONDITIONS of them."""
    pairs = list(expect)
    if len(pairs) > fmt.MAX_TXN_CONDITIONS:
        raise TooBig(f"{len(pairs)} conditions exceed the limit of {fmt.MAX_TXN_CONDITIONS} per transaction",
                     hint="split the transaction, or condition it on fewer keys")
    conditions = []
    for n, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            what = f"{len(pair)} items" if isinstance(pair, (tuple, list)) else type(pair).__name__
            raise InvalidArgument(f"condition {n} must be a (key, txn id) pair, got {what}")
        path, txn_id = pair
        try:
            raw = validate_path(path)
        except StateFSError as exc:
            raise type(exc)(f"condition {n}: {exc.message}", **exc.details) from None
        if not isinstance(txn_id, int) or isinstance(txn_id, bool) or txn_id < 0:
            shown = txn_id if type(txn_id) is int else type(txn_id).__name__
            raise InvalidArgument(f"condition {n} on key {path!r}: the expected txn id must be an integer "
                                  f">= 0 (0: the key must be absent), got {shown}")
        conditions.append(Condition(path, raw, txn_id))
    return tuple(conditions)


def _changed(condition: Condition, now: int | None) -> Conflict | None:
    """Conflict when ``condition`` does not hold for a key whose current
    txn id is ``now`` (None: absent)."""
    if now == (condition.txn_id or None):
        return None
    expected = f"txn {condition.txn_id}" if condition.txn_id else "it absent"
    found = f"it is now txn {now}" if condition.txn_id and now else \
        f"it exists (txn {now})" if now else "it is absent"
    return Conflict(f"key {condition.path!r} changed: expected {expected}, {found}; nothing was written")


def _no_audit(event: str, **fields) -> None:
    pass


class Engine:
    # Where compaction draws its fresh log epochs; a test rig that must
    # reproduce a run byte for byte pins it per mount.
    entropy = staticmethod(os.urandom)
    mkfs = staticmethod(image.mkfs)

    @classmethod
    def mount(cls, device: BlockDevice, *, read_only: bool = False, audit: AuditFn | None = None,
              key_provider: KeyProvider | None = None, signer: Signer | None = None) -> "Engine":
        """Mount ``device`` (the engine owns it from now on, and closes it
        on failure too). An encrypted image needs ``key_provider``, which
        returns the payload key for a superblock (from keystored); there is
        no plaintext fallback. With a ``signer`` (the device key, through
        keystored) every checkpoint is verified at mount and new ones are
        signed."""
        audit = audit or _no_audit
        try:
            return cls._mount(device, read_only, audit, key_provider, signer)
        except StateFSError as exc:
            audit("mount_refused", image=device.path, code=exc.code.name, reason=exc.message)
            device.close()
            raise
        except BaseException:
            device.close()
            raise

    @classmethod
    def _mount(cls, device: BlockDevice, read_only: bool, audit: AuditFn,
               key_provider: KeyProvider | None, signer: Signer | None) -> "Engine":
        sb, slot, slot_problems = image.read_superblock_slot(device)
        cipher = image.open_cipher(device, sb, key_provider)
        result = replay(device, sb, cipher, signer.public_key if signer else None)
        audit("replay", image=device.path, generation=sb.generation, slot_problems=slot_problems,
              **result.summary())
        for f in result.findings:
            audit("replay_finding", **f.as_dict())
        bad = result.corruption
        if bad and not read_only:
            first = bad[0]
            raise CorruptImage(f"{device.path}: corruption at byte offset {first.offset}: {first.reason}; "
                               f"refusing to mount read-write", offset=first.offset,
                               hint=f"run fsck-statefs {device.path}; statefsd --read-only serves the "
                                    f"{result.committed} committed transactions before it")
        if not read_only:
            problem = image.counters_problem(sb, result)
            if problem:
                raise CorruptImage(f"{device.path}: {problem}; refusing to mount read-write")
        engine = cls.from_replay(device, sb, slot, result, cipher=cipher, read_only=read_only, audit=audit,
                                 signer=signer)
        if bad:
            audit("mount_read_only_prefix", image=device.path, committed=result.committed,
                  offset=bad[0].offset, reason=bad[0].reason)
            print(f"statefsd: WARNING: {device.path} is damaged at byte offset {bad[0].offset} "
                  f"({bad[0].reason}); serving the {result.committed} transactions before it READ-ONLY",
                  file=sys.stderr)
        audit("mount", image=device.path, read_only=read_only, generation=engine.sb.generation,
              keys=len(engine.index), encryption=fmt.ENCRYPTION_NAMES[sb.encryption])
        return engine

    @classmethod
    def from_replay(cls, device: BlockDevice, sb: fmt.Superblock, sb_slot: int, result: ReplayResult, *,
                    cipher: RecordCipher | None, read_only: bool, audit: AuditFn | None = None,
                    signer: Signer | None = None) -> "Engine":
        """An engine serving what ``result`` replayed from ``device``, as
        found, without the mount's refusals: fsck's repair hands it the
        state it trusts and lets compaction rewrite it."""
        return cls(device, sb, sb_slot, result, cipher=cipher, read_only=read_only,
                   audit=audit or _no_audit, signer=signer)

    def __init__(self, device: BlockDevice, sb: fmt.Superblock, sb_slot: int, result: ReplayResult, *,
                 cipher: RecordCipher | None, read_only: bool, audit: AuditFn, signer: Signer | None) -> None:
        self.device, self.cipher, self.signer, self.audit = device, cipher, signer, audit
        self.read_only = read_only
        self.failure: StateFSError | None = None
        self.index: dict[bytes, Entry] = result.index
        self.live_bytes = sum(e.size for e in self.index.values())
        self.last_txn = result.last_committed   # newest txn committed in the active region (C11)
        self.replay_summary = result.summary()
        self.role = WriterRole(device.path)
        self.compactor = Compactor(self)
        self._checkpoint_due = CHECKPOINT_EVERY
        end = result.end
        position = LogPosition(end.offset, end.next_seq, end.next_group, result.chain_hash,
                               max(sb.txn_reserved, result.max_txn_id) + 1)
        self.log = LogWriter(device, sb, sb_slot, position, cipher=cipher, signer=signer, audit=audit)
        self.values = ValueReader(self.log, self.role, result.end.repaired, cipher=cipher, audit=audit,
                                  writable=lambda: not self.read_only)
        if not read_only:
            self._take_over(sb, result)

    def _take_over(self, sb: fmt.Superblock, result: ReplayResult) -> None:
        """What a read-write mount writes before serving."""
        log = self.log
        self.values.write_back_repairs()
        # What replay read may still sit in a volatile cache (a process crash
        # loses nothing from it, a power cut could): flush it, so the durable
        # floor written below tells the truth.
        self.device.flush()
        # This mount's generation is above every mount_gen in the log, even
        # if the newest superblock slot was damaged and an older one chosen.
        log.sb = sb.evolve(generation=max(sb.generation, result.end.mount_gen))
        if self.cipher is not None and sb.key_check == bytes(16):
            # Formatted without a keystore at hand: remember this key from now on.
            log.sb = log.sb.evolve(key_check=self.cipher.key_check())
            log.write_identity_copy()
        log.reserve_txn_ids(log.position.next_txn)
        log.mount_gen = log.sb.generation

    def close(self) -> None:
        if not self.role.begin_close():
            return
        self.compactor.stop()
        try:
            with self.role.last_hold():
                if not self.read_only and self.signer is not None and self.log.unsigned_commits:
                    try:
                        self.log.append_checkpoint()
                    except StateFSError as exc:
                        self.audit("checkpoint_failed", reason=str(exc))
                if not self.read_only:
                    self.device.flush()
                    # A clean unmount records the whole log as durable (the floor).
                    self.log.write_superblock(self.sb.evolve(generation=self.sb.generation + 1,
                                                             durable_end=self.log.position.offset))
        finally:
            self.device.close()
            self.audit("unmount", image=self.device.path)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sb(self) -> fmt.Superblock:
        return self.log.sb

    @property
    def log_end(self) -> int:
        """Byte offset where the next write group will start."""
        return self.log.position.offset

    # ---------------------------------------------------------------- reads

    def _entry(self, path: str) -> tuple[bytes, Entry]:
        raw = validate_path(path)
        entry = self.index.get(raw)
        if entry is None:
            raise NotFound(f"no such key: {path}")
        return raw, entry

    def get(self, path: str) -> bytes:
        return self.get_versioned(path)[0]

    def get_versioned(self, path: str) -> tuple[bytes, int]:
        """The value and the txn id that wrote it (what a condition expects)."""
        return self._versioned(*self._entry(path))

    def get_many(self, paths: list[str], max_bytes: int | None = None) -> list[tuple[bytes, int] | None]:
        """(value, txn id) per path in order, None for a missing key. With
        ``max_bytes`` the list stops before the value that would take its
        values past it (the first value is always given), so it may be
        shorter than ``paths``. Each key is read as it is reached: not a
        snapshot of all of them at one instant."""
        found: list[tuple[bytes, int] | None] = []
        total = 0
        for raw in [validate_path(path) for path in paths]:
            entry = self.index.get(raw)
            if entry is None:
                found.append(None)
                continue
            if max_bytes is not None and total and total + entry.size > max_bytes:
                break
            total += entry.size
            found.append(self._versioned(raw, entry))
        return found

    def _versioned(self, raw: bytes, entry: Entry) -> tuple[bytes, int]:
        return self.values.read(raw, entry), entry.txn_id

    def stat(self, path: str) -> dict:
        _, entry = self._entry(path)
        return {"path": path, "size": entry.size, "txn_id": entry.txn_id}

    def list(self, prefix: str = "") -> list[str]:
        raw = utf8_text(prefix, "a list prefix")
        return sorted(p.decode("utf-8") for p in list(self.index) if p.startswith(raw))

    def info(self) -> dict:
        log, position = self.log, self.log.position
        return {
            "image": self.device.path, "device_bytes": self.device.size,
            "device_uuid": self.sb.device_uuid.hex(), "read_only": self.read_only,
            "encryption": fmt.ENCRYPTION_NAMES[self.sb.encryption],
            "format": f"{self.sb.version_major}.{self.sb.version_minor}",
            "generation": self.sb.generation, "log_epoch": self.sb.log_epoch,
            "keys": len(self.index), "live_bytes": self.live_bytes,
            "log_used": position.offset - log.region_start, "log_size": log.size,
            "next_txn_id": position.next_txn, "chain_head": position.chain.hex(),
            "replay": self.replay_summary,
        }

    # --------------------------------------------------------------- writes

    def put(self, path: str, value: bytes) -> int:
        return self.commit([Mutation("put", path, value)])

    def delete(self, path: str) -> int:
        self._entry(path)  # NotFound for a single delete of a missing key
        return self.commit([Mutation("delete", path)])

    def commit(self, mutations: list[Mutation], expect=()) -> int:
        """Apply all mutations atomically; returns the txn id once durable.
        ``expect``: (key, txn id) pairs that must all still hold when the
        transaction is written (txn 0: the key is absent), else Conflict
        and nothing is written (rule C9). A full log is compacted once
        before ENOSPC is returned; the log is also compacted after a commit
        when compaction is due."""
        self._check_writable()
        conditions = validate_conditions(expect)
        if conditions and not mutations:
            raise InvalidArgument("a transaction with conditions needs at least one put or delete; "
                                  "nothing was checked")
        ops = validate_mutations(mutations)
        try:
            txn_id = self._commit_ops(ops, conditions)
        except NoSpace:
            if not self.compactor.make_room(self.log.txn_bytes(ops)):
                raise
            txn_id = self._commit_ops(ops, conditions)
        if self.compactor.due():
            self.compactor.start_in_background()
        elif self.signer is not None and self.log.unsigned_commits >= self._checkpoint_due:
            self._checkpoint_if_due()
        return txn_id

    def compact(self) -> dict:
        """Rewrite the live state into the other log region (compaction.py)."""
        return self.compactor.run()

    def verify(self) -> dict:
        """Scrub the log online (scrub.py, rule C10): the verify map. What
        the scan finds is in its ``findings``, never raised; an error here
        means no verdict (the engine is closing, or a bug)."""
        with self.compactor.held_off():
            self._check_open()
            with self.role.exclusive():
                position, sb = self.log.position, self.log.sb
            verdict = scrub.verify_log(self.device, sb, position, cipher=self.cipher,
                                       device_key=self.signer.public_key if self.signer else None,
                                       before_group=self._check_open)
        self.audit("verify", **{k: v for k, v in verdict.items() if k != "first_finding"})
        return verdict

    def feed(self, after: int = 0, cursor: bytes | None = None, max_bytes: int = DEFAULT_BYTES) -> dict:
        """The committed transactions after ``cursor`` in commit order, with
        their values (feed.py, rule C11; docs/protocol.md, "feed"). Without
        a cursor (``after`` must then be 0), or with one of an earlier log
        epoch, the page starts at the active region's first transaction and
        ``reset`` tells the consumer to drop what it had."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise InvalidArgument(f"feed 'after' must be a txn id >= 0, got {after!r}")
        if cursor is None and after:
            raise InvalidArgument(f"feed after txn {after} needs the cursor the feed returned with it",
                                  hint=FROM_BASE)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise InvalidArgument(f"feed 'max_bytes' must be a positive integer, got {max_bytes!r}",
                                  hint=f"ask for at most {MAX_BYTES} bytes per page")
        start = None if cursor is None else Cursor.unpack(cursor)
        with self.compactor.held_off():
            self._check_open("feed")
            with self.role.exclusive():
                position, sb, last_txn = self.log.position, self.log.sb, self.last_txn
            page = read_page(self.device, sb, position, cursor=start, max_bytes=min(max_bytes, MAX_BYTES),
                             read_value=self.values.read, cipher=self.cipher,
                             device_key=self.signer.public_key if self.signer else None,
                             before_group=lambda: self._check_open("feed"))
        return {"epoch": page.epoch, "reset": page.reset,
                "txns": [[txn_id, chain, [[path.decode("utf-8"), value] for path, value in changes]]
                         for txn_id, chain, changes in page.txns],
                "cursor": page.cursor.pack(), "more": page.more, "max_txn": last_txn, "chain": page.chain,
                # The region's history starts from an empty store (it was never
                # compacted): every one of its transactions is a whole state.
                "from_empty": sb.chain_base == fmt.genesis_hash(sb.device_uuid)}

    def _check_open(self, op: str = "verify") -> None:
        if self.role.closing:
            outcome = "nothing was verified" if op == "verify" else f"the {op} stopped"
            raise ReadOnly(f"{self.device.path} is being unmounted; {outcome}",
                           hint=f"{op} again once statefsd has restarted")

    def checkpoint(self) -> None:
        """Append a CHECKPOINT signed by the device key over the chain head."""
        self._check_writable()
        with self.role.exclusive():
            self._check_writable()
            self._checkpoint()

    def _checkpoint_if_due(self) -> None:
        with self.role.exclusive():   # C6: decided while holding the role
            if self.read_only or self.role.closing or self.log.unsigned_commits < self._checkpoint_due:
                return
            try:
                self._checkpoint()
                self._checkpoint_due = CHECKPOINT_EVERY
            except StateFSError as exc:
                self._checkpoint_due = self.log.unsigned_commits + CHECKPOINT_EVERY
                self.audit("checkpoint_failed", reason=str(exc), retry_after_commits=CHECKPOINT_EVERY)

    def _checkpoint(self) -> None:
        try:
            self.log.append_checkpoint()
        except DeviceIOError as exc:
            self.fail([], exc)
            raise

    def _check_writable(self) -> None:
        if self.failure is not None:
            raise ReadOnly(f"{self.device.path} is read-only after a write failure: {self.failure.message}",
                           hint="nothing more is written; check the device, then restart statefsd")
        if self.read_only:
            raise ReadOnly(f"{self.device.path} is mounted read-only")

    def _commit_ops(self, ops: list[tuple[fmt.Op, bytes]], conditions: tuple[Condition, ...] = ()) -> int:
        req = Request(ops, conditions)
        self.role.commit(req, self._write_group)
        if req.error is not None:
            raise req.error
        return req.txn_id

    def _write_group(self, batch: list[Request]) -> list[Request]:
        """Leader only (C1): write every request that fits as one group, one
        flush, after checking each one's conditions (C9). Returns the
        requests left for the next group (a group holds at most
        MAX_GROUP_BYTES)."""
        log = self.log
        if self.failure is not None:
            self.fail(batch, self.failure)
            return []
        accepted: list[Request] = []
        start = pos = log.position.offset
        deferred: list[Request] = []
        written: dict[bytes, int | None] = {}   # key -> txn id it gets in this group (None: deleted)
        for n, req in enumerate(batch):
            size = log.txn_bytes(req.ops)
            if accepted and pos + size - start > fmt.MAX_GROUP_BYTES:
                deferred = batch[n:]
                break
            conflict = self._conflict(req, written)
            if conflict is not None:
                req.error = conflict
                req.done = True
                continue
            if not log.group_fits(pos + size, all(op.kind == fmt.OP_DELETE for op, _ in req.ops)):
                left = log.region_end - start
                req.error = NoSpace(f"{self.device.path}: log full ({left} bytes left, transaction needs {size})")
                self.audit("enospc", needed=size, left=left)
                req.done = True
                continue
            txn_id = log.position.next_txn + len(accepted)   # ids go out in group order
            written.update((op.path, None if op.kind == fmt.OP_DELETE else txn_id) for op, _ in req.ops)
            accepted.append(req)
            pos += size
        if not accepted:
            return deferred
        try:
            txn_ids, applied = log.append([req.ops for req in accepted], size=pos - start)
        except StateFSError as exc:
            self.fail(accepted + deferred, exc)
            return []
        # Durable: now (and only now) make the transactions visible (C2).
        for req, txn_id, entries in zip(accepted, txn_ids, applied):
            for path, entry in entries:
                old = self.index.pop(path, None) if entry is None else self.index.get(path)
                if entry is not None:
                    self.index[path] = entry
                    self.live_bytes += entry.size
                if old is not None:
                    self.live_bytes -= old.size
            req.txn_id = txn_id
            req.done = True
        self.last_txn = txn_ids[-1]
        return deferred

    def _conflict(self, req: Request, written: dict[bytes, int | None]) -> Conflict | None:
        """The first of ``req``'s conditions that does not hold against the
        index plus the keys ``written`` earlier in this group (C9)."""
        for condition in req.expect:
            if condition.raw in written:
                now = written[condition.raw]
            else:
                entry = self.index.get(condition.raw)
                now = entry.txn_id if entry is not None else None
            conflict = _changed(condition, now)
            if conflict is not None:
                return conflict
        return None

    def fail(self, requests: list[Request], exc: StateFSError) -> None:
        """A write or flush failed (C8): fail ``requests`` and write no more."""
        if self.failure is None:
            self.failure = exc
            self.read_only = True
            self.audit("write_failure", reason=str(exc), action="now read-only")
        for req in requests:
            req.error = exc
            req.done = True

    def adopt_compacted(self, index: dict[bytes, Entry], last_txn: int) -> None:
        """Compaction's switch (writer role held): serve the new region,
        whose newest transaction is ``last_txn`` (0: it holds none)."""
        self.values.forget_repairs()
        self.last_txn = last_txn
        self.index = index
        self.live_bytes = sum(e.size for e in index.values())
