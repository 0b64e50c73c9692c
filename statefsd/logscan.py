"""Reading the log: find every complete write group and tell a torn tail
from corruption.

The reader is separate from the writer (engine.py). It walks the active
region from its start and accepts a record only if *all* hold:

1. magic, type, flags and length are valid and the CRC32C matches;
2. ``epoch`` equals the superblock's ``log_epoch`` (older epochs are stale
   data from before a compaction, or from an earlier file system);
3. ``seq`` is exactly one more than the previous record's;
4. ``mount_gen`` is not lower than that of the last complete group (a
   lower one is stale tail data of an earlier mount that a later mount has
   partly overwritten);
5. ``group`` is exactly one more than the last complete group's.

Records are handed out one *complete* group at a time: a group whose last
record (flag GROUP_END) is missing is discarded whole, deterministically, so
the same image always yields the same state.

Where the walk stops, the reader looks further for a record that proves the
stopping point was once durable: a valid record of this epoch, of this or a
later mount, whose group is at least two past the last complete group. The
writer never starts group g+1 before group g is flushed (DESIGN.md,
invariant 7), so such a record means flushed data was damaged: *corruption*,
reported with byte offset and reason. Without one the stop is a torn tail,
which is not an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from statefsd import format as fmt
from statefsd.blockdev import BlockDevice

READ_WINDOW = 4 << 20


class Record(NamedTuple):
    offset: int                 # byte offset of the header on the device
    header: fmt.RecordHeader
    raw_header: bytes           # the 64 header bytes exactly as on disk
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + fmt.HEADER_SIZE + self.header.payload_len

    def raw(self) -> bytes:
        """The record's exact bytes (header + payload), as hashed by the chain."""
        return self.raw_header + self.payload


@dataclass
class ScanEnd:
    """Where the valid log ends and why."""

    offset: int                 # next write position (GROUP_ALIGN aligned)
    next_seq: int
    next_group: int
    mount_gen: int              # mount_gen of the last complete group (0 if none)
    stop_offset: int            # where the walk stopped
    stop_reason: str            # why the record at stop_offset was not accepted
    torn_bytes: int = 0         # bytes of an incomplete last group that were discarded
    corruption: str = ""        # non-empty: damage followed by durable records
    corruption_offset: int = -1
    evidence_offset: int = -1   # offset of the valid record proving the damage

    @property
    def corrupt(self) -> bool:
        return bool(self.corruption)


class _Window:
    """Sequential reader over one region with bounded memory."""

    def __init__(self, device: BlockDevice, start: int, end: int) -> None:
        self.device, self.start, self.end = device, start, end
        self.base, self.buf = start, b""

    def get(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) of the region, or None past its end."""
        if offset < self.start or offset + length > self.end:
            return None
        if offset < self.base or offset + length > self.base + len(self.buf):
            size = min(max(READ_WINDOW, length), self.end - offset)
            self.base, self.buf = offset, self.device.read(offset, size)
        rel = offset - self.base
        return self.buf[rel:rel + length]


@dataclass
class _Cursor:
    seq: int = 0
    group: int = 0              # last complete group (0: none yet)
    mount_gen: int = 0


def _check(window: _Window, offset: int, sb: fmt.Superblock,
           cur: _Cursor) -> tuple[Record | None, str]:
    raw = window.get(offset, fmt.HEADER_SIZE)
    if raw is None:
        return None, "end of region"
    if raw == bytes(fmt.HEADER_SIZE):
        return None, "zeroed space (clean end)"
    h = fmt.unpack_header(raw)
    problem = fmt.header_problem(h)
    if problem:
        return None, problem
    payload = window.get(offset + fmt.HEADER_SIZE, h.payload_len)
    if payload is None:
        return None, "record runs past the end of the region"
    if fmt.crc32c(payload, fmt.crc32c(raw[4:])) != h.crc:
        return None, "checksum mismatch"
    if h.epoch != sb.log_epoch:
        return None, f"record of epoch {h.epoch}, not {sb.log_epoch} (stale)"
    if h.seq != cur.seq:
        return None, f"sequence {h.seq}, expected {cur.seq}"
    if h.mount_gen < cur.mount_gen:
        return None, f"mount generation {h.mount_gen} below {cur.mount_gen} (stale)"
    want_group = cur.group + 1
    if h.group != want_group:
        return None, f"group {h.group}, expected {want_group}"
    return Record(offset, h, bytes(raw), bytes(payload)), ""


def scan_groups(device: BlockDevice, sb: fmt.Superblock) -> Iterator[list[Record] | ScanEnd]:
    """Yield each complete group (a list of records) in log order, then one
    ScanEnd describing the end of the log."""
    start, length = sb.active_extent
    window = _Window(device, start, start + length)
    cur = _Cursor()
    group_start = start
    pending: list[Record] = []
    pos = start
    while True:
        rec, reason = _check(window, pos, sb, cur)
        if rec is None:
            break
        pending.append(rec)
        cur.seq += 1
        pos = rec.end
        if rec.header.flags & fmt.FLAG_GROUP_END:
            yield pending
            pending = []
            cur.group = rec.header.group
            cur.mount_gen = rec.header.mount_gen
            pos = group_start = fmt.align_up(pos)
    end = ScanEnd(offset=group_start, next_seq=cur.seq - len(pending), next_group=cur.group + 1,
                  mount_gen=cur.mount_gen, stop_offset=pos, stop_reason=reason,
                  torn_bytes=pos - group_start)
    _look_for_durable_records_beyond(window, sb, end)
    yield end


def _look_for_durable_records_beyond(window: _Window, sb: fmt.Superblock, end: ScanEnd) -> None:
    """Search past the stop for a record that could only exist if the
    stopping point had been flushed (see the module docstring).

    Candidates are found by searching for this epoch's four bytes (at header
    offset 8), not the record magic: a region is full of stale records of
    older epochs, and the epoch is random, so this keeps the search at
    memory speed instead of parsing every stale header."""
    epoch_at = 8
    needle = struct.pack("<I", sb.log_epoch)
    pos = end.offset
    step = READ_WINDOW
    while pos < window.end:
        chunk = window.device.read(pos, min(step + fmt.HEADER_SIZE, window.end - pos))
        hit = chunk.find(needle, epoch_at)
        while hit != -1 and hit - epoch_at < step:
            start = hit - epoch_at
            if start + fmt.HEADER_SIZE <= len(chunk) and chunk[start + 4:start + 6] == fmt.RECORD_MAGIC:
                h = fmt.unpack_header(chunk, start)
                if (h.group >= end.next_group + 1 and h.mount_gen >= end.mount_gen
                        and h.seq >= end.next_seq and not fmt.header_problem(h)
                        and _crc_ok_at(window, pos + start, h)):
                    end.corruption = end.stop_reason
                    end.corruption_offset = end.stop_offset
                    end.evidence_offset = pos + start
                    return
            hit = chunk.find(needle, hit + 1)
        pos += step


def _crc_ok_at(window: _Window, offset: int, h: fmt.RecordHeader) -> bool:
    if offset + fmt.HEADER_SIZE + h.payload_len > window.end:
        return False
    raw = window.device.read(offset, fmt.HEADER_SIZE + h.payload_len)
    return fmt.record_crc_ok(raw, 0, h)
