"""Online compaction: the live state written into the other log region,
then one superblock write to switch to it (docs/DESIGN.md, "Space, ENOSPC
and compaction").

Commits and reads go on while the snapshot is written; commits pause only
while the transactions they made meanwhile are copied over and the
superblock is switched.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Callable

from statefsd.errors import DeviceIOError, ReadOnly, StateFSError
from statefsd.storage import format as fmt
from statefsd.storage.index import KeyIndex
from statefsd.storage.logwriter import LogPosition, Ops

if TYPE_CHECKING:
    from statefsd.storage.engine import Engine


class Compactor:
    """One compaction at a time per engine, in the foreground (ENOSPC,
    `statefs compact`, fsck's repair) or on a background thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._running = threading.Lock()    # one compaction at a time
        self._thread_lock = threading.Lock()  # guards _thread and _stopped
        self._thread: threading.Thread | None = None
        self._stopped = False

    def due(self) -> bool:
        """Policy (docs/DESIGN.md): the log is over 75% full and holds more
        than twice the live bytes."""
        log = self._engine.log
        return log.used > log.size * 3 // 4 and log.used > 2 * self._engine.live_bytes

    def run(self) -> dict:
        if self._engine.read_only:
            raise ReadOnly(f"{self._engine.device.path} is mounted read-only")
        with self._running:
            return self._compact()

    def make_room(self, needed: int) -> bool:
        """Compact (once, waiting for one already running) when that frees
        room for a transaction of ``needed`` bytes; False when it cannot."""
        log = self._engine.log
        with self._running:
            if log.group_fits(log.position.offset + needed, False):
                return True   # a compaction that just finished made room
            if not self._would_free(needed):
                return False
            self._compact()
            return True

    def start_in_background(self) -> None:
        with self._thread_lock:
            if self._stopped or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._background, name="statefs-compactor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No background compaction starts from now on; one running ends
        first, and so does a foreground one or a scrub holding compaction off."""
        with self._thread_lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._running:
            pass

    @contextlib.contextmanager
    def held_off(self):
        """No compaction runs while this is held (an online scrub or a feed
        page reads the active region, which the compaction after next would
        reuse); waits for one that is running. Commits go on (engine.py,
        rules C10 and C11)."""
        with self._running:
            yield

    def _background(self) -> None:
        try:
            self.run()
        except StateFSError as exc:  # ENOSPC: live data too large; commits will say so
            self._engine.audit("compaction_failed", reason=str(exc))

    def _would_free(self, needed: int) -> bool:
        # live bytes plus a generous per-key allowance for headers and paths
        engine, log = self._engine, self._engine.log
        live = engine.live_bytes + len(engine.index) * (fmt.HEADER_SIZE * 2 + fmt.MAX_KEY_BYTES // 4)
        return live * 5 // 4 + needed < log.size - log.delete_reserve and log.used > live * 5 // 4

    def _compact(self) -> dict:
        engine, log = self._engine, self._engine.log
        region = 1 - log.sb.active_region
        start_block, blocks = log.sb.regions[region]
        start, end = start_block * fmt.BLOCK_SIZE, (start_block + blocks) * fmt.BLOCK_SIZE
        limit = end - log.delete_reserve
        # A fresh random epoch per attempt: the records of an earlier attempt
        # that never got its superblock switch stay stale by the epoch rule.
        epoch = log.sb.log_epoch
        while epoch in (0, log.sb.log_epoch):
            epoch = int.from_bytes(engine.entropy(4), "little")
        began = time.monotonic()
        with engine.role.exclusive():  # phase 0: a consistent snapshot, and txn ids for it
            snapshot = engine.index.copy()
            items = sorted(snapshot.sizes())
            claimed = len(_batches(items, _put_op))   # at most this many: phase 1 copies a subset
            first_id = log.claim_txn_ids(claimed)
            cur = log.cursor(LogPosition(start, 0, 1, log.position.chain, first_id), epoch=epoch)
            used_before = log.used
        index = KeyIndex()
        pause = 0.0
        written = copied = 0
        try:
            # Phase 1, commits going on in the old region: the snapshot, less
            # what was overwritten or deleted since. Phase 2 writes those keys'
            # newest state once; copying the snapshot's version as well would
            # write them twice (write amplification under a busy writer).
            unchanged = (item for item in items if engine.index.txn_id(item[0]) == snapshot.txn_id(item[0]))
            for batch in fmt.iter_transactions(unchanged, _put_op, _BATCH_VALUE_BUDGET):
                if written >= claimed:   # never reached while phase 1 copies a subset of the snapshot
                    with engine.role.exclusive():
                        cur.txn_id = log.claim_txn_ids(1)
                ops = [(_put_op(item), engine.values.read(item[0], snapshot[item[0]])) for item in batch]
                self._copy(cur, ops, index, limit)
                written += 1
                copied += len(ops)
            with engine.role.exclusive():  # phase 2: what changed meanwhile, then the switch
                paused = time.monotonic()
                changed, deleted = engine.index.changes_since(snapshot)
                delta = [(fmt.Op(fmt.OP_PUT, path, entry.size), engine.values.read(path, entry))
                         for path, entry in changed]
                delta += [(fmt.Op(fmt.OP_DELETE, path), b"") for path in deleted if path in index]
                catch_up = _batches(delta, lambda pair: pair[0])
                for ops in catch_up:
                    cur.txn_id = log.claim_txn_ids(1)
                    self._copy(cur, ops, index, limit)
                    written += 1
                log.switch_region(cur, region)
                engine.adopt_compacted(index, cur.txn_id - 1 if written else 0)
                pause = time.monotonic() - paused
        except (OSError, DeviceIOError) as exc:
            err = exc if isinstance(exc, DeviceIOError) else DeviceIOError(f"{engine.device.path}: compaction: {exc}")
            engine.fail([], err)
            raise err from None
        stats = {"live_keys": len(index), "live_bytes": engine.live_bytes,
                 "log_before": used_before, "log_after": cur.offset - start, "epoch": epoch,
                 "snapshot_keys": len(snapshot), "snapshot_copied": copied, "delta_ops": len(delta), "pause_ms": round(pause * 1000, 3),
                 "duration_ms": round((time.monotonic() - began) * 1000, 3)}
        engine.audit("compaction", **stats)
        return stats

    def _copy(self, cur, ops: Ops, index: KeyIndex, limit: int) -> None:
        for path, entry in self._engine.log.write_copy(cur, ops, limit):
            if entry is None:
                index.discard(path)
            else:
                index[path] = entry


_BATCH_VALUE_BUDGET = fmt.MAX_TXN_BYTES // 4


def _put_op(item: tuple[bytes, int]) -> fmt.Op:
    path, size = item
    return fmt.Op(fmt.OP_PUT, path, size)


def _batches(items: list, op_of: Callable) -> list[list]:
    """Cut compaction's snapshot or catch-up ops into transactions by the
    transaction rule, with at most MAX_TXN_BYTES / 4 of values per batch (a
    larger single value forms its own) so that each group stays modest."""
    return fmt.split_into_transactions(items, op_of, value_budget=_BATCH_VALUE_BUDGET)
