"""Power-cut states from a real guest's write log, under the simulated device's crash model.

The log (qemu/logwrites.py) holds every write and flush the guest issued, in order.
Crash point k is the moment just before flush k+1 (or the end of the log): the disk
holds what flush k made durable, and every write since then is still in the volatile
cache. Those writes are fed to a ``statefsd.testing.simdev.SimulatedDevice`` as unflushed
writes, so ``point.outcomes()`` / ``point.device(outcome)`` give exactly the crashed
states the simulated device would give for the same writes: one crash model for the
power-loss campaign and for the real guest.

What must survive at point k: every acknowledged transaction whose COMMIT record was in
the durable image at some flush up to k. The COMMIT records are found here by scanning
the bytes each flush made durable for valid record headers (magic, type, CRC), so the
requirement comes from the disk's contents, not from the engine being judged.

Log entries: FLUSH (with data: the flush comes first, then the write, as Linux's
PREFLUSH), DISCARD (pending zeros), MARK (ignored). FUA is treated as an ordinary
write, durable only at the next flush: it can only make the requirement weaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import SECTOR
from statefsd.errors import CorruptImage
from statefsd.testing.simdev import CrashModel, CrashPoint, SimulatedDevice

from qemu.logwrites import DISCARD, Log

COMMIT_RECORD = fmt.HEADER_SIZE + fmt.COMMIT_PAYLOAD_SIZE
MAGIC_AT = 4  # offset of the record magic inside a record header


@dataclass(frozen=True)
class LogPoint:
    number: int                 # k: the crash point's number, from 0
    durable_at: int             # log index of the flush that made the durable image (-1: none)
    cut_before: int             # log index of the flush the cut came before (-1: end of log)
    point: CrashPoint           # durable image + the pending writes
    commits: frozenset[int]     # txn ids whose COMMIT was durable at some flush up to here

    def where(self) -> str:
        cut = f"before log entry #{self.cut_before}" if self.cut_before >= 0 else "at the end of the log"
        return (f"point {self.number} (durable at flush #{self.durable_at}, cut {cut}, "
                f"{len(self.point.pending)} pending write(s))")


def crash_points(log: Log, initial: bytes, model: CrashModel = CrashModel()) -> Iterator[LogPoint]:
    """Every crash point with at least one pending write, in log order, then the end of
    the log (with or without pending writes)."""
    if not initial or len(initial) % SECTOR:
        raise CorruptImage(f"initial image of {len(initial)} bytes is not a whole number of sectors")
    dev = SimulatedDevice(len(initial), image=initial, model=model, record=False)
    commits: set[int] = set()
    touched: list[tuple[int, int]] = []
    durable_at = -1
    number = 0
    for e in log.entries:
        if e.is_flush:
            if touched:
                yield LogPoint(number, durable_at, e.index, dev.crash_point(), frozenset(commits))
                number += 1
            dev.flush()
            commits |= commit_ids(dev, touched)
            touched = []
            durable_at = e.index
        if e.flags & DISCARD:
            data = bytes(e.length)
        elif e.is_write:
            data = e.data
        else:
            continue
        if e.offset + len(data) > dev.size:
            raise CorruptImage(f"log entry #{e.index} writes past the end of the "
                               f"{dev.size}-byte disk ({e.offset}+{len(data)})")
        dev.write(e.offset, data)
        touched.append((e.offset, len(data)))
    # The end of the log is always a point, pending writes or not: it holds every commit.
    yield LogPoint(number, durable_at, -1, dev.crash_point(), frozenset(commits))


def commit_ids(dev: SimulatedDevice, ranges: list[tuple[int, int]]) -> set[int]:
    """Txn ids of valid COMMIT records that overlap any of ``ranges`` on ``dev``."""
    found: set[int] = set()
    for lo, hi in _merge((max(0, off - COMMIT_RECORD), min(dev.size, off + n)) for off, n in ranges):
        buf = dev.read(lo, min(dev.size, hi + COMMIT_RECORD) - lo)
        hit = buf.find(fmt.RECORD_MAGIC, MAGIC_AT)
        while hit != -1:
            start = hit - MAGIC_AT
            if start >= hi - lo:
                break
            if start + fmt.HEADER_SIZE <= len(buf):
                h = fmt.unpack_header(buf, start)
                if (h.type == fmt.COMMIT and not fmt.header_problem(h)
                        and fmt.record_crc_ok(buf, start, h)):
                    found.add(h.txn_id)
            hit = buf.find(fmt.RECORD_MAGIC, hit + 1)
    return found


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]
