"""The StateFS engine: mount, replay, index, transactions, group commit.

Invariants the engine keeps (numbered as in docs/DESIGN.md):

(1) A commit returns only after every record of its transaction is durable
    (written, then flushed).
(2) A transaction is all or nothing: its records are written as one block
    of PREPARE, PAYLOAD/DELETE records and COMMIT, and replay applies it only
    when the COMMIT and everything it vouches for is intact.
(7) Write groups: the records of one or more transactions are written with
    one device write and made durable with one flush. Group g+1 is never
    written before group g's flush has returned, so at most one group is ever
    volatile, and every group starts on a fresh GROUP_ALIGN boundary: a torn
    write can never damage bytes of an earlier, acknowledged group.
(8) Txn ids are reserved in the superblock (txn_reserved) before use; a mount
    continues above the reservation, so an id is never used twice even when
    the record that used it was lost.
(9) A mount that finds corruption followed by durable records refuses to
    mount read-write; read-only mounts serve the consistent prefix.

Concurrency: any number of threads may call commit(); the first becomes the
leader, takes every queued transaction, writes them as one group and flushes
once (group commit); followers wait for their result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import sys
import threading
import time
from typing import Callable, NamedTuple, Protocol

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.crypto import RecordCipher
from statefsd.errors import (
    CorruptImage, DeviceIOError, FormatError, IntegrityError, InvalidArgument, KeyUnavailable, NoSpace,
    NotFound, ReadOnly, StateFSError, TooBig,
)
from statefsd.storage.logscan import apply_patches, first_record, repair_record
from statefsd.storage.replay import Entry, ReplayResult, replay

AuditFn = Callable[..., None]
KeyProvider = Callable[[fmt.Superblock], bytes]
CHECKPOINT_EVERY = 1024   # commits between signed checkpoints (also at unmount and compaction)
DEFAULT_REDUNDANCY = "parity"   # measured cost on commit rate: see docs/DESIGN.md


class Signer(Protocol):
    """The device's signing key, as keystored exposes it."""

    public_key: bytes

    def sign(self, label: str, message: bytes) -> bytes: ...


class Mutation(NamedTuple):
    kind: str           # "put" or "delete"
    path: str
    value: bytes = b""


def validate_path(path: str) -> bytes:
    """A key as stored: non-empty UTF-8 without NUL, at most MAX_KEY_BYTES."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("a key must be a non-empty string")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("a key must be valid UTF-8") from None
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
        value = bytes(m.value)
        return fmt.Op(fmt.OP_PUT, path, len(value)), value
    if m.kind == "delete":
        return fmt.Op(fmt.OP_DELETE, path), b""
    raise InvalidArgument(f"unknown operation {m.kind!r}; use 'put' or 'delete'")


def _no_audit(event: str, **fields) -> None:
    pass


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
        if device.read(0, min(device.size, 8)) == fmt.SUPERBLOCK_MAGIC:
            raise CorruptImage(f"{device.path}: only {device.size} bytes, too short for both superblock "
                               f"slots (truncated image?)")
        raise FormatError(f"{device.path} is not a StateFS image (only {device.size} bytes)")
    magic_seen = False
    for index, (name, offset) in enumerate(zip("AB", fmt.SUPERBLOCK_OFFSETS)):
        slot = device.read(offset, fmt.BLOCK_SIZE)
        magic_seen |= slot[:8] == fmt.SUPERBLOCK_MAGIC
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


COUNTER_HEADROOM = 1 << 32   # far more ids and generations than any device will use


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


class _Request:
    __slots__ = ("ops", "done", "txn_id", "error")

    def __init__(self, ops: list[tuple[fmt.Op, bytes]]) -> None:
        self.ops = ops
        self.done = False
        self.txn_id = 0
        self.error: StateFSError | None = None


class Engine:
    # Where compaction draws its fresh log epochs; a test rig that must
    # reproduce a run byte for byte pins it per mount.
    entropy = staticmethod(os.urandom)

    def __init__(self, device: BlockDevice, sb: fmt.Superblock, result: ReplayResult, *,
                 read_only: bool, audit: AuditFn, cipher: RecordCipher | None = None,
                 sb_slot: int, signer: "Signer | None" = None) -> None:
        self.device = device
        self._sb_slot = sb_slot
        self._parity = sb.redundancy == fmt.REDUNDANCY_PARITY
        self.signer = signer
        self._unsigned_commits = 0
        self.cipher = cipher
        self.sb = sb
        self.read_only = read_only
        self.audit = audit
        self.index: dict[bytes, Entry] = result.index
        self._live_bytes = sum(e.size for e in self.index.values())  # kept up to date by the writer
        self.replay_summary = result.summary()
        self._chain = result.chain_hash
        self._pos = result.end.offset
        self._seq = result.end.next_seq
        self._group = result.end.next_group
        self._next_txn = max(sb.txn_reserved, result.max_txn_id) + 1
        region_start, region_len = sb.active_extent
        self._region_start = region_start
        self._region_end = region_start + region_len
        # Deletes may use the last stretch of the log so that a full device can still shrink.
        self._delete_reserve = min(256 << 10, region_len // 8)
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._writing = False
        self._exclusive_waiters = 0
        self._compact_lock = threading.Lock()
        self._compactor: threading.Thread | None = None
        self._closed = False
        self._mount_gen = sb.generation
        self._patches = dict(result.end.repaired)   # sectors rebuilt from parity, served from memory
        if not read_only:
            self._write_back_repairs()
            # What replay read may still sit in a volatile cache (a process
            # crash loses nothing from it, a power cut could): flush it, so
            # the durable floor written below tells the truth.
            self.device.flush()
            # This mount's generation is above every mount_gen in the log, even
            # if the newest superblock slot was damaged and an older one chosen.
            self.sb = sb.evolve(generation=max(sb.generation, result.end.mount_gen))
            if cipher is not None and sb.key_check == bytes(16):
                # Formatted without a keystore at hand: remember this key from now on.
                self.sb = self.sb.evolve(key_check=cipher.key_check())
                if fmt.has_identity_copy(self.sb):
                    self.device.write(self.sb.identity_copy_offset,
                                      fmt.encode_superblock(self.sb.evolve(generation=1, txn_reserved=0,
                                                                           durable_end=0)))
            self._reserve_txn_ids(self._next_txn)
            self._mount_gen = self.sb.generation

    def _write_back_repairs(self) -> None:
        """Sectors replay rebuilt from parity go back in place. A torn write
        of one of them leaves it exactly as repairable as before."""
        if not self._patches:
            return
        for offset, sector in sorted(self._patches.items()):
            self.device.write(offset, sector)
            self.audit("sector_repaired", offset=offset, source="parity")
        self.device.flush()
        self._patches = {}

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def mkfs(cls, device: BlockDevice, *, encryption: str = "off", salt: bytes | None = None,
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

    @classmethod
    def mount(cls, device: BlockDevice, *, read_only: bool = False,
              audit: AuditFn | None = None, key_provider: KeyProvider | None = None,
              signer: "Signer | None" = None) -> "Engine":
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
               key_provider: KeyProvider | None, signer: "Signer | None") -> "Engine":
        sb, slot, slot_problems = read_superblock_slot(device)
        cipher = None
        if sb.encryption != fmt.ENCRYPTION_OFF:
            if key_provider is None:
                raise KeyUnavailable(f"{device.path} is encrypted ({sb.key_descriptor}) and no keystored "
                                     f"was given", hint="start keystored and pass --keystore-socket")
            key = key_provider(sb)
            if sb.key_check != bytes(16) and fmt.key_check(key, sb.device_uuid, sb.salt) != sb.key_check:
                raise KeyUnavailable(f"{device.path}: the key from keystored does not match this image; "
                                     f"refusing to mount",
                                     hint="use the keystored (state dir) of the device that formatted it")
            cipher = RecordCipher(key, sb)
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
            problem = counters_problem(sb, result)
            if problem:
                raise CorruptImage(f"{device.path}: {problem}; refusing to mount read-write")
        engine = cls(device, sb, result, read_only=read_only, audit=audit, cipher=cipher, sb_slot=slot,
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

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.join()
        if not self.read_only and self.signer is not None and self._unsigned_commits:
            try:
                self.checkpoint()
            except StateFSError as exc:
                self.audit("checkpoint_failed", reason=str(exc))
        with self._cv:
            while self._writing:
                self._cv.wait()
            if self._closed:
                return
            self._closed = True
        try:
            if not self.read_only:
                self.device.flush()
                # A clean unmount records the whole log as durable (the floor).
                self._write_superblock(self.sb.evolve(generation=self.sb.generation + 1,
                                                      durable_end=self._pos))
        finally:
            self.device.close()
            self.audit("unmount", image=self.device.path)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def log_end(self) -> int:
        """Byte offset where the next write group will start."""
        return self._pos

    # ---------------------------------------------------------------- reads

    def _entry(self, path: str) -> tuple[bytes, Entry]:
        raw = validate_path(path)
        entry = self.index.get(raw)
        if entry is None:
            raise NotFound(f"no such key: {path}")
        return raw, entry

    def get(self, path: str) -> bytes:
        raw, entry = self._entry(path)
        return self._read(raw, entry)

    def _read(self, raw: bytes, entry: Entry) -> bytes:
        """The value an index entry points at, checked (CRC, header, AEAD)."""
        path = raw.decode("utf-8", "replace")
        if not entry.chunks:
            return b""
        first = entry.chunks[0][0]
        last_off, last_len = entry.chunks[-1]
        span = self._read_span(first, last_off + fmt.HEADER_SIZE + last_len - first)
        want_hash = fmt.path_hash(raw)
        parts = []
        for index, (offset, plen) in enumerate(entry.chunks):
            rel = offset - first

            def intact() -> bool:
                h = fmt.unpack_header(span, rel)
                return (h.type == fmt.PAYLOAD and h.txn_id == entry.txn_id and h.chunk_index == index
                        and h.path_hash == want_hash and h.payload_len == plen
                        and fmt.record_crc_ok(span, rel, h))

            if not intact() and self._repair_sector(offset):
                span = self._read_span(first, len(span))
            h = fmt.unpack_header(span, rel)
            if not intact():
                self.audit("integrity_failure", path=path, offset=offset, txn_id=entry.txn_id)
                raise IntegrityError(f"value of {path!r} failed its checksum at byte offset {offset}",
                                     offset=offset)
            piece = span[rel + fmt.HEADER_SIZE:rel + fmt.HEADER_SIZE + plen]
            if entry.sealed:
                try:
                    piece = self.cipher.open(piece, h)
                except IntegrityError:
                    self.audit("integrity_failure", path=path, offset=offset, txn_id=entry.txn_id,
                               reason="authentication failed")
                    raise IntegrityError(f"value of {path!r} failed authentication at byte offset "
                                         f"{offset}", offset=offset) from None
            parts.append(piece)
        return b"".join(parts)

    def _read_span(self, offset: int, length: int) -> bytes:
        return apply_patches(self._patches, offset, self.device.read(offset, length))

    def _repair_sector(self, record_offset: int) -> bool:
        """Rebuild a sector under a damaged record from its group's parity;
        written back in place on a read-write mount, kept in memory otherwise."""
        if not self._parity:
            return False
        fix = repair_record(self.device, self.sb, record_offset, self._patches)
        if fix is None:
            return False
        offset, sector = fix
        self.audit("sector_repaired", offset=offset, source="parity", during="read")
        self._patches[offset] = sector
        if not self.read_only:
            # Written back only when the writer role is free at once: a read
            # inside compaction's catch-up (which holds it) must not wait on
            # itself. Otherwise the next mount writes it back.
            with self._cv:
                if self._writing or self._closed:
                    return True
                self._writing = True
            try:
                self.device.write(offset, sector)
                self.device.flush()
                del self._patches[offset]
            finally:
                with self._cv:
                    self._writing = False
                    self._cv.notify_all()
        return True

    def stat(self, path: str) -> dict:
        _, entry = self._entry(path)
        return {"path": path, "size": entry.size, "txn_id": entry.txn_id}

    def list(self, prefix: str = "") -> list[str]:
        raw = prefix.encode("utf-8")
        return sorted(p.decode("utf-8") for p in list(self.index) if p.startswith(raw))

    def info(self) -> dict:
        entries = list(self.index.values())
        return {
            "image": self.device.path, "device_bytes": self.device.size,
            "device_uuid": self.sb.device_uuid.hex(), "read_only": self.read_only,
            "encryption": fmt.ENCRYPTION_NAMES[self.sb.encryption],
            "format": f"{self.sb.version_major}.{self.sb.version_minor}",
            "generation": self.sb.generation, "log_epoch": self.sb.log_epoch,
            "keys": len(entries), "live_bytes": self._live_bytes,
            "log_used": self._pos - self._region_start,
            "log_size": self._region_end - self._region_start,
            "next_txn_id": self._next_txn, "chain_head": self._chain.hex(),
            "replay": self.replay_summary,
        }

    # --------------------------------------------------------------- writes

    def put(self, path: str, value: bytes) -> int:
        return self.commit([Mutation("put", path, value)])

    def delete(self, path: str) -> int:
        self._entry(path)  # NotFound for a single delete of a missing key
        return self.commit([Mutation("delete", path)])

    def commit(self, mutations: list[Mutation]) -> int:
        """Apply all mutations atomically; returns the txn id once durable.
        A full log is compacted once before ENOSPC is returned; the log is
        also compacted after a commit when compaction_due()."""
        if self.read_only:
            raise ReadOnly(f"{self.device.path} is mounted read-only")
        ops = self._validate(mutations)
        try:
            txn_id = self._commit_ops(ops)
        except NoSpace:
            needed = self._txn_bytes(ops)
            with self._compact_lock:  # waits for a compaction already running
                if self._region_end - self._pos < needed + self._delete_reserve:
                    if not self._compaction_would_free(needed):
                        raise
                    self._compact()
            txn_id = self._commit_ops(ops)
        if self.compaction_due():
            self._compact_in_background()
        elif self.signer is not None and self._unsigned_commits >= CHECKPOINT_EVERY:
            self.checkpoint()
        return txn_id

    def _compact_in_background(self) -> None:
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            try:
                self.compact()
            except StateFSError as exc:  # ENOSPC: live data too large; commits will say so
                self.audit("compaction_failed", reason=str(exc))

        self._compactor = threading.Thread(target=run, name="statefs-compactor", daemon=True)
        self._compactor.start()

    def _compaction_would_free(self, needed: int) -> bool:
        # live bytes plus a generous per-key allowance for headers and paths
        live = self._live_bytes + len(self.index) * (fmt.HEADER_SIZE * 2 + fmt.MAX_KEY_BYTES // 4)
        size = self._region_end - self._region_start - self._delete_reserve
        return live * 5 // 4 + needed < size and self._pos - self._region_start > live * 5 // 4

    def _commit_ops(self, ops: list[tuple[fmt.Op, bytes]]) -> int:
        req = _Request(ops)
        with self._cv:
            if self._closed:
                raise ReadOnly(f"{self.device.path} is unmounted")
            self._queue.append(req)
            while not req.done:
                if self._writing or self._exclusive_waiters:
                    self._cv.wait()
                    continue
                batch, self._queue = self._queue, []
                self._writing = True
                self._cv.release()
                deferred: list[_Request] = []
                try:
                    deferred = self._write_group(batch)
                finally:
                    self._cv.acquire()
                    self._queue[:0] = deferred
                    self._writing = False
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        return req.txn_id

    @staticmethod
    def _validate(mutations: list[Mutation]) -> list[tuple[fmt.Op, bytes]]:
        ops = [mutation_op(m) for m in mutations]
        problem = fmt.transaction_problem([op for op, _ in ops])
        if problem:
            raise (TooBig if ops else InvalidArgument)(problem)
        return ops

    def _txn_bytes(self, ops: list[tuple[fmt.Op, bytes]]) -> int:
        per_chunk = fmt.HEADER_SIZE + (fmt.SEAL_OVERHEAD if self.cipher else 0)
        size = 2 * fmt.HEADER_SIZE + fmt.prepare_size([op for op, _ in ops]) + fmt.COMMIT_PAYLOAD_SIZE
        for op, _ in ops:
            if op.kind == fmt.OP_PUT:
                size += op.chunk_count * per_chunk + op.value_len
            else:
                size += fmt.HEADER_SIZE + len(op.path)
        return size

    def _write_group(self, batch: list[_Request]) -> list[_Request]:
        """Leader only: write every request that fits as one group, one
        flush. Returns the requests left for the next group (a group holds
        at most MAX_GROUP_BYTES)."""
        accepted: list[_Request] = []
        pos = self._pos
        trailer = fmt.PARITY_TRAILER_SIZE if self._parity else 0
        for n, req in enumerate(batch):
            size = self._txn_bytes(req.ops)
            if accepted and pos + size - self._pos > fmt.MAX_GROUP_BYTES:
                deferred = batch[n:]
                break
            only_deletes = all(op.kind == fmt.OP_DELETE for op, _ in req.ops)
            limit = self._region_end - (0 if only_deletes else self._delete_reserve)
            if fmt.align_up(pos + size) + trailer > limit:
                req.error = NoSpace(f"{self.device.path}: log full ({self._region_end - self._pos} bytes "
                                    f"left, transaction needs {size})")
                self.audit("enospc", needed=size, left=self._region_end - self._pos)
                req.done = True
                continue
            accepted.append(req)
            pos += size
        else:
            deferred = []
        if not accepted:
            return deferred
        try:
            if self._next_txn + len(accepted) - 1 > self.sb.txn_reserved:
                self._reserve_txn_ids(self._next_txn + len(accepted))
            blob, applied = self._encode_group(accepted)
            self.device.write(self._pos, blob)
            self.device.flush()
        except StateFSError as exc:
            self._fail(accepted + deferred, exc)
            return []
        except OSError as exc:
            self._fail(accepted + deferred, DeviceIOError(f"{self.device.path}: {exc}"))
            return []
        # Durable: now (and only now) make the transactions visible.
        self._pos += len(blob)
        self._seq, self._group, self._chain, self._next_txn = applied["state"]
        for req, entries in zip(accepted, applied["entries"]):
            for path, entry in entries:
                old = self.index.pop(path, None) if entry is None else self.index.get(path)
                if entry is not None:
                    self.index[path] = entry
                    self._live_bytes += entry.size
                if old is not None:
                    self._live_bytes -= old.size
            req.done = True
        self._unsigned_commits += len(accepted)
        return deferred

    def _fail(self, accepted: list[_Request], exc: StateFSError) -> None:
        # After a failed write or flush nobody knows what is durable (the
        # page cache may have dropped it): stop writing rather than guess.
        self.read_only = True
        self._failure = exc
        self.audit("write_failure", reason=str(exc), action="now read-only")
        for req in accepted:
            req.error = exc
            req.done = True

    def _cursor(self) -> "_LogCursor":
        return _LogCursor(epoch=self.sb.log_epoch, group=self._group, seq=self._seq, offset=self._pos,
                          chain=self._chain, txn_id=self._next_txn, mount_gen=self._mount_gen,
                          parity=self._parity)

    def _encode_group(self, accepted: list[_Request]):
        cur = self._cursor()
        blob, all_entries = cur.encode_group([req.ops for req in accepted], self.cipher)
        for req, txn_id in zip(accepted, cur.txn_ids):
            req.txn_id = txn_id
        return blob, {"state": (cur.seq, cur.group, cur.chain, cur.txn_id), "entries": all_entries}

    # ----------------------------------------------------------- compaction

    def compaction_due(self) -> bool:
        """Policy (docs/DESIGN.md): the log is over 75% full and holds more
        than twice the live bytes."""
        used = self._pos - self._region_start
        size = self._region_end - self._region_start
        return used > size * 3 // 4 and used > 2 * self._live_bytes

    def compact(self) -> dict:
        """Write the live state into the other region and switch to it with
        one superblock write, online: commits and reads go on while the
        snapshot is written; commits pause only while the transactions they
        made meanwhile are copied over and the superblock is switched."""
        if self.read_only:
            raise ReadOnly(f"{self.device.path} is mounted read-only")
        with self._compact_lock:
            return self._compact()

    @contextlib.contextmanager
    def _writer(self):
        """Hold the log's single writer role (the group-commit leader's).
        Waiting here keeps new commit leaders out, so a stream of commits
        cannot starve compaction or a checkpoint."""
        with self._cv:
            self._exclusive_waiters += 1
            while self._writing:
                self._cv.wait()
            self._exclusive_waiters -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cv:
                self._writing = False
                self._cv.notify_all()

    def _compact(self) -> dict:
        region = 1 - self.sb.active_region
        start_block, blocks = self.sb.regions[region]
        start, end = start_block * fmt.BLOCK_SIZE, (start_block + blocks) * fmt.BLOCK_SIZE
        limit = end - self._delete_reserve
        # A fresh random epoch per attempt: the records of an earlier attempt
        # that never got its superblock switch stay stale by the epoch rule.
        epoch = self.sb.log_epoch
        while epoch in (0, self.sb.log_epoch):
            epoch = int.from_bytes(self.entropy(4), "little")
        began = time.monotonic()
        with self._writer():  # phase 0: a consistent snapshot, and txn ids for it
            snapshot = dict(self.index)
            batches = _compaction_batches(sorted(snapshot.items()),
                                          lambda item: fmt.Op(fmt.OP_PUT, item[0], item[1].size))
            cur = _LogCursor(epoch=epoch, group=1, seq=0, offset=start, chain=self._chain,
                             txn_id=self._next_txn, mount_gen=self._mount_gen, parity=self._parity)
            self._next_txn += len(batches)
            if self._next_txn - 1 > self.sb.txn_reserved:
                self._reserve_txn_ids(self._next_txn)
            used_before = self._pos - self._region_start
        index: dict[bytes, Entry] = {}
        pause = 0.0
        try:
            for batch in batches:  # phase 1: commits go on in the old region
                ops = [(fmt.Op(fmt.OP_PUT, path, entry.size), self._read(path, entry)) for path, entry in batch]
                self._append_snapshot_txn(cur, ops, index, limit)
            with self._writer():  # phase 2: what changed meanwhile, then the switch
                paused = time.monotonic()
                delta = [(fmt.Op(fmt.OP_PUT, path, entry.size), self._read(path, entry))
                         for path, entry in self.index.items() if snapshot.get(path) is not entry]
                delta += [(fmt.Op(fmt.OP_DELETE, path), b"") for path in snapshot if path not in self.index]
                for ops in _compaction_batches(delta, lambda pair: pair[0]):
                    cur.txn_id = self._next_txn
                    if cur.txn_id > self.sb.txn_reserved:
                        self._reserve_txn_ids(cur.txn_id)
                    self._append_snapshot_txn(cur, ops, index, limit)
                    self._next_txn = cur.txn_id
                if self.signer is not None:
                    blob = cur.encode_checkpoint(self.signer, self.sb.device_uuid)
                    self.device.write(cur.offset - len(blob), blob)
                self.device.flush()
                # The commit point of compaction: one superblock write, then flush.
                self._write_superblock(self.sb.evolve(
                    generation=self.sb.generation + 1, active_region=region, log_epoch=epoch,
                    chain_base=cur.chain_base, durable_end=cur.offset))
                # The same superblock into the other slot too: should the switch
                # slot rot later, the surviving one must not name the old region.
                self._write_superblock(self.sb.evolve(generation=self.sb.generation + 1))
                self._region_start, self._region_end = start, end
                self._pos, self._seq, self._group, self._chain = cur.offset, cur.seq, cur.group, cur.chain
                self.index = index
                self._patches = {}   # they lay over the old region
                self._live_bytes = sum(e.size for e in index.values())
                self._unsigned_commits = 0 if self.signer else self._unsigned_commits
                pause = time.monotonic() - paused
        except (OSError, DeviceIOError) as exc:
            err = exc if isinstance(exc, DeviceIOError) else DeviceIOError(f"{self.device.path}: compaction: {exc}")
            self._fail([], err)
            raise err from None
        stats = {"live_keys": len(index), "live_bytes": self._live_bytes,
                 "log_before": used_before, "log_after": cur.offset - start, "epoch": epoch,
                 "delta_ops": len(delta), "pause_ms": round(pause * 1000, 3),
                 "duration_ms": round((time.monotonic() - began) * 1000, 3)}
        self.audit("compaction", **stats)
        return stats

    def _append_snapshot_txn(self, cur: "_LogCursor", ops, index: dict, limit: int) -> None:
        if cur.offset + fmt.align_up(self._txn_bytes(ops)) + cur.trailer_bytes() > limit:
            raise NoSpace(f"{self.device.path}: live data does not fit in a log region",
                          hint="delete keys (compaction cannot help); committed data is intact")
        at = cur.offset
        blob, entries = cur.encode_group([ops], self.cipher)
        self.device.write(at, blob)
        for path, entry in entries[0]:
            if entry is None:
                index.pop(path, None)
            else:
                index[path] = entry

    def checkpoint(self) -> None:
        """Append a CHECKPOINT signed by the device key over the chain head,
        as a group of its own (one write, one flush)."""
        if self.signer is None:
            raise KeyUnavailable("checkpoints need the device key",
                                 hint="start statefsd with --keystore-socket")
        if self.read_only:
            raise ReadOnly(f"{self.device.path} is mounted read-only")
        with self._writer():
            cur = self._cursor()
            start = cur.offset
            blob = cur.encode_checkpoint(self.signer, self.sb.device_uuid)
            if start + len(blob) > self._region_end:
                raise NoSpace(f"{self.device.path}: no room for a checkpoint")
            try:
                self.device.write(start, blob)
                self.device.flush()
            except DeviceIOError as exc:
                self._fail([], exc)
                raise
            self._pos, self._seq, self._group = cur.offset, cur.seq, cur.group
            self._unsigned_commits = 0
            self.audit("checkpoint", chain_head=cur.chain.hex(), seq=cur.seq - 1)

    def _reserve_txn_ids(self, upto: int) -> None:
        """Durably reserve txn ids through at least ``upto`` (invariant 8)."""
        new = self.sb.evolve(generation=self.sb.generation + 1,
                             txn_reserved=upto + fmt.TXN_RESERVE_BATCH - 1, durable_end=self._pos)
        self._write_superblock(new)

    def _write_superblock(self, sb: fmt.Superblock) -> None:
        """Write ``sb`` into the slot *not* holding the current superblock
        (slot = generation % 2, so the generation may skip one): a torn
        write can then only damage the older copy."""
        if sb.generation % 2 == self._sb_slot:
            sb = sb.evolve(generation=sb.generation + 1)
        self.device.write(fmt.SUPERBLOCK_OFFSETS[sb.generation % 2], fmt.encode_superblock(sb))
        self.device.flush()
        self.sb = sb
        self._sb_slot = sb.generation % 2


def _compaction_batches(items: list, op_of: Callable) -> list[list]:
    """Cut compaction's snapshot or catch-up ops into transactions by the
    transaction rule, with at most MAX_TXN_BYTES / 4 of values per batch (a
    larger single value forms its own) so that each group stays modest."""
    return fmt.split_into_transactions(items, op_of, value_budget=fmt.MAX_TXN_BYTES // 4)


class _LogCursor:
    """Where the next record goes, and the chain and txn id it continues.
    encode_group() turns transactions into one write group (invariant 7)."""

    def __init__(self, *, epoch: int, group: int, seq: int, offset: int, chain: bytes, txn_id: int,
                 mount_gen: int, parity: bool) -> None:
        self.epoch, self.group, self.seq, self.offset = epoch, group, seq, offset
        self.chain, self.txn_id, self.mount_gen = chain, txn_id, mount_gen
        self.parity = parity      # every group gets a parity trailer (redundancy on)
        self.chain_base = chain   # the prev_hash of the first COMMIT this cursor writes
        self.txn_ids: list[int] = []

    def encode_checkpoint(self, signer: "Signer", device_uuid: bytes) -> bytes:
        """A group holding one CHECKPOINT over the current chain head."""
        message = fmt.checkpoint_message(device_uuid, self.epoch, self.seq, self.chain)
        body = fmt.CheckpointBody(self.chain, signer.public_key,
                                  signer.sign(fmt.CHECKPOINT_SIGN_LABEL, message))
        rec = fmt.pack_record(fmt.CHECKPOINT, flags=fmt.FLAG_GROUP_END, epoch=self.epoch, group=self.group,
                              seq=self.seq, mount_gen=self.mount_gen, txn_id=0,
                              payload=fmt.encode_checkpoint(body))
        return self._close_group([rec], self.seq + 1)

    def trailer_bytes(self) -> int:
        return fmt.PARITY_TRAILER_SIZE if self.parity else 0

    def _close_group(self, parts: list[bytes], next_seq: int) -> bytes:
        """The group's bytes: records, padding, and the parity trailer."""
        # One copy of the group for records and padding, one more only for the
        # trailer: groups reach 32 MiB and this runs on every commit.
        size = sum(map(len, parts))
        blob = b"".join([*parts, bytes(fmt.align_up(size) - size)])
        if self.parity:
            blob = b"".join((blob, fmt.pack_parity_trailer(blob, epoch=self.epoch, group=self.group,
                                                           seq=self.seq, mount_gen=self.mount_gen)))
        self.seq = next_seq
        self.group += 1
        self.offset += len(blob)
        return blob

    def encode_group(self, txns: list[list[tuple[fmt.Op, bytes]]], cipher: RecordCipher | None):
        parts: list[bytes] = []
        all_entries = []
        txn_id = self.txn_id
        seq, offset = self.seq, self.offset

        def emit(rtype: int, payload: bytes = b"", *, flags: int = 0, **kw) -> bytes:
            nonlocal seq, offset
            rec = fmt.pack_record(rtype, flags=flags, epoch=self.epoch, group=self.group, seq=seq,
                                  mount_gen=self.mount_gen, txn_id=txn_id, payload=payload, **kw)
            parts.append(rec)
            seq += 1
            offset += len(rec)
            return rec

        for n, ops in enumerate(txns):
            self.txn_ids.append(txn_id)
            digest = hashlib.sha256(emit(fmt.PREPARE, fmt.encode_prepare([op for op, _ in ops])))
            count = 1
            entries = []
            for op_index, (op, value) in enumerate(ops):
                phash = fmt.path_hash(op.path)
                if op.kind == fmt.OP_DELETE:
                    digest.update(emit(fmt.DELETE, op.path, path_hash=phash, op_index=op_index))
                    count += 1
                    entries.append((op.path, None))
                    continue
                chunks = []
                for chunk_index in range(op.chunk_count):
                    piece = value[chunk_index * fmt.CHUNK_SIZE:(chunk_index + 1) * fmt.CHUNK_SIZE]
                    flags = 0
                    if cipher:
                        piece = cipher.seal(piece, txn_id=txn_id, op_index=op_index,
                                            chunk_index=chunk_index, phash=phash)
                        flags = fmt.FLAG_SEALED
                    chunks.append((offset, len(piece)))
                    digest.update(emit(fmt.PAYLOAD, piece, flags=flags, path_hash=phash,
                                       op_index=op_index, chunk_index=chunk_index))
                    count += 1
                entries.append((op.path, Entry(txn_id, op.value_len, tuple(chunks), bool(cipher))))
            body = fmt.encode_commit(fmt.CommitBody(self.chain, digest.digest(), count))
            last = n == len(txns) - 1
            self.chain = fmt.chain_hash(emit(fmt.COMMIT, body, flags=fmt.FLAG_GROUP_END if last else 0))
            all_entries.append(entries)
            txn_id += 1
        self.txn_id = txn_id
        return self._close_group(parts, seq), all_entries
