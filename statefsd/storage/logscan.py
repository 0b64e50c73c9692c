"""Reading the log: find every complete write group and tell a torn tail
from corruption.

The reader is separate from the writer (logwriter.py). It walks the active
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

With redundancy on (format 2.1), every group is followed by a parity
trailer (format.PARITY_TRAILER_SIZE bytes). When a record of a group fails,
the reader finds the group's PARITY record and tries each sector the failing
record touches as the one damaged sector; the first rebuilt sector with which
the whole group checks out is the repair, reported in ``ScanEnd.repaired``.

Where the walk stops, the reader decides between a torn tail and corruption:

- a stop below the superblock's ``durable_end`` (the durable floor) is
  corruption: a superblock written after that data was flushed says so;
- so is a group longer than MAX_GROUP_BYTES: the writer never writes one;
- otherwise it looks further for a record that proves the stopping point
  was once durable: a valid record of this epoch, of this or a later mount,
  whose group is at least two past the last complete group. The writer never
  starts group g+1 before group g is flushed (DESIGN.md, invariant 7), so
  such a record means flushed data was damaged: *corruption*, reported with
  byte offset and reason. Without one the stop is a torn tail, which is not
  an error (but is reported when bytes of an incomplete group were found).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice

READ_WINDOW = 4 << 20
# The writer never writes a group this long (docs/statefs.md 6.1 rule 6), so
# a walk stopped by it is corruption or forgery, never a torn write.
OVERSIZE_GROUP = f"write group larger than {fmt.MAX_GROUP_BYTES} bytes"
# How much of a group the walk keeps before it has seen the group's end.
KEEP_BYTES = 8 << 20
KEEP_RECORDS = 4096


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


class ScanPoint(NamedTuple):
    """A group boundary of the active region and the reader's state there:
    where a scan may resume (a scan from the region's start has
    ``ScanPoint(start, 0, 1, 0)``)."""

    offset: int                 # byte offset where the next group starts
    next_seq: int
    next_group: int
    mount_gen: int              # mount_gen of the last complete group (0 if none)


class Group(list):
    """The records of one complete group, and the point right after it
    (its parity trailer included)."""

    def __init__(self, records: list[Record], after: ScanPoint) -> None:
        super().__init__(records)
        self.after = after


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
    corruption: str = ""        # non-empty: damage at or below durable data
    corruption_offset: int = -1
    evidence_offset: int = -1   # offset of the valid record proving the damage (-1: the floor does)
    repaired: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, sector) rebuilt from parity
    damaged_trailers: list[int] = field(default_factory=list)        # offsets of unreadable parity trailers

    @property
    def corrupt(self) -> bool:
        return bool(self.corruption)

    @property
    def point(self) -> ScanPoint:
        return ScanPoint(self.offset, self.next_seq, self.next_group, self.mount_gen)


class _Window:
    """Sequential reader over one region with bounded memory. Sectors
    rebuilt from parity are laid over what the device returns."""

    def __init__(self, device: BlockDevice, start: int, end: int) -> None:
        self.device, self.start, self.end = device, start, end
        self.base, self.raw, self.buf = start, b"", b""
        self.patches: dict[int, bytes] = {}

    def get(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) of the region, or None past its end."""
        if offset < self.start or offset + length > self.end:
            return None
        if offset < self.base or offset + length > self.base + len(self.buf):
            size = min(max(READ_WINDOW, length), self.end - offset)
            self.base, self.raw = offset, self.device.read(offset, size)
            self.buf = apply_patches(self.patches, offset, self.raw)
        rel = offset - self.base
        return bytes(self.buf[rel:rel + length])

    def read(self, offset: int, length: int) -> bytes:
        """Like device.read, with the patches applied (for the searches)."""
        return apply_patches(self.patches, offset, self.device.read(offset, length))

    def patch(self, offset: int, sector: bytes | None) -> None:
        """Lay ``sector`` over the device at ``offset`` (None: lift it again).
        Only the patched bytes of the buffered window are rewritten: repair
        tries many sectors of one group."""
        if sector is None:
            self.patches.pop(offset, None)
        else:
            self.patches[offset] = sector
        lo, hi = max(offset, self.base), min(offset + fmt.GROUP_ALIGN, self.base + len(self.raw))
        if lo < hi:
            if not isinstance(self.buf, bytearray):
                self.buf = bytearray(self.buf)
            src = self.raw if sector is None else sector
            start = self.base if sector is None else offset
            self.buf[lo - self.base:hi - self.base] = src[lo - start:hi - start]


def apply_patches(patches: dict[int, bytes], offset: int, data: bytes) -> bytes:
    """``data`` read at ``offset`` with every overlapping patched sector laid over it."""
    if not patches:
        return data
    end = offset + len(data)
    hits = [(at, sector) for at, sector in patches.items() if at < end and at + len(sector) > offset]
    if not hits:
        return data
    out = bytearray(data)
    for at, sector in hits:
        lo, hi = max(at, offset), min(at + len(sector), end)
        out[lo - offset:hi - offset] = sector[lo - at:hi - at]
    return bytes(out)


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
    if h.type == fmt.PARITY:
        return None, "PARITY record where a group record belongs"
    payload = window.get(offset + fmt.HEADER_SIZE, h.payload_len)
    if payload is None:
        return None, "record runs past the end of the region"
    if fmt.record_crc(raw, payload) != h.crc:
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


class _Stop(NamedTuple):
    offset: int                 # where the group's walk stopped
    reason: str


def _read_group(window: _Window, start: int, sb: fmt.Superblock,
                cur: _Cursor) -> tuple[list[Record] | None, _Stop]:
    """The records of the complete group starting at ``start``, or None and
    where and why the walk stopped. ``cur`` is not changed.

    Records are kept while the group is small (KEEP_BYTES, KEEP_RECORDS);
    past that the walk only looks for the group's end and reads a complete
    group again. A group that never closes (torn, or forged to run on to
    MAX_GROUP_BYTES in tiny records) thus costs bounded memory."""
    probe = _Cursor(cur.seq, cur.group, cur.mount_gen)
    records: list[Record] | None = []
    pos = start
    while True:
        if pos - start > fmt.MAX_GROUP_BYTES:
            return None, _Stop(pos, OVERSIZE_GROUP)
        rec, reason = _check(window, pos, sb, probe)
        if rec is None:
            return None, _Stop(pos, reason)
        if records is not None:
            records.append(rec)
            if len(records) > KEEP_RECORDS or pos - start > KEEP_BYTES:
                records = None
        probe.seq += 1
        pos = rec.end
        if rec.header.flags & fmt.FLAG_GROUP_END:
            break
    if records is not None:
        return records, _Stop(pos, "")
    end, records = pos, []
    probe.seq, pos = cur.seq, start
    while pos < end:
        rec, reason = _check(window, pos, sb, probe)
        if rec is None:     # the device answered differently the second time
            return None, _Stop(pos, reason)
        records.append(rec)
        probe.seq += 1
        pos = rec.end
    return records, _Stop(pos, "")


def scan_groups(device: BlockDevice, sb: fmt.Superblock, *, upto: int | None = None,
                start: ScanPoint | None = None) -> Iterator[Group | ScanEnd]:
    """Yield each complete group (a list of records) in log order, then one
    ScanEnd describing the end of the log. With ``upto`` (a log position a
    writer published) nothing at or past it is read: the walk treats it as
    the end of the region, so a scrub ignores what commits append meanwhile.
    With ``start`` (a point an earlier scan reported: a Group's ``after``
    or a ScanEnd's ``point``) the walk resumes there instead of at the
    region's start."""
    region, length = sb.active_extent
    limit = region + length if upto is None else upto
    if upto is not None and not region <= upto <= region + length:
        raise ValueError(f"scan limit {upto} outside the active region [{region}, {region + length}]")
    if start is not None and (not region <= start.offset <= limit or (start.offset - region) % fmt.GROUP_ALIGN
                              or start.next_group < 1 or start.next_seq < 0 or start.mount_gen < 0):
        raise ValueError(f"scan start {tuple(start)} is no group boundary in [{region}, {limit}]")
    window = _Window(device, region, limit)
    parity = sb.redundancy == fmt.REDUNDANCY_PARITY
    if start is None:
        start = ScanPoint(region, 0, 1, 0)
    cur = _Cursor(start.next_seq, start.next_group - 1, start.mount_gen)
    group_start = start.offset
    repaired: list[tuple[int, bytes]] = []
    damaged_trailers: list[int] = []
    while True:
        records, stop = _read_group(window, group_start, sb, cur)
        if records is None and parity:
            fix = _repair_group(window, group_start, sb, cur, stop)
            if fix is not None:
                repaired.append(fix)
                records, stop = _read_group(window, group_start, sb, cur)
        if records is None:
            break
        cur.seq += len(records)
        cur.group = records[-1].header.group
        cur.mount_gen = records[-1].header.mount_gen
        data_end = fmt.align_up(records[-1].end)
        group_start = data_end
        if parity:
            # A trailer that does not check out leaves the group's data
            # valid (its records did); only its protection is gone.
            if _parity_record(window, data_end, sb, records[0].header, data_end - records[0].offset) is None:
                damaged_trailers.append(data_end)
            group_start = data_end + fmt.PARITY_TRAILER_SIZE
        yield Group(records, ScanPoint(group_start, cur.seq, cur.group + 1, cur.mount_gen))
    end = ScanEnd(offset=group_start, next_seq=cur.seq, next_group=cur.group + 1,
                  mount_gen=cur.mount_gen, stop_offset=stop.offset, stop_reason=stop.reason,
                  torn_bytes=stop.offset - group_start, repaired=repaired,
                  damaged_trailers=damaged_trailers)
    decide_stop(window, sb, end)
    yield end


def decide_stop(window: _Window, sb: fmt.Superblock, end: ScanEnd) -> None:
    """Torn tail or corruption (see the module docstring)."""
    if end.stop_reason == OVERSIZE_GROUP:   # reported where the group starts
        end.corruption = f"{OVERSIZE_GROUP} (its records run on to byte offset {end.stop_offset})"
        end.corruption_offset = end.offset
        return
    if sb.durable_end and end.offset < sb.durable_end:
        end.corruption = f"{end.stop_reason} (below the durable floor at byte offset {sb.durable_end})"
        end.corruption_offset = end.stop_offset
        return
    _look_for_durable_records_beyond(window, sb, end)


def first_record(device: BlockDevice, offset: int) -> fmt.RecordHeader | None:
    """The header at ``offset`` if it opens a log: a valid record (checksum
    included) of group 1, seq 0. Any epoch: this is how a log is found
    without a superblock."""
    if offset + fmt.HEADER_SIZE > device.size:
        return None
    h = fmt.unpack_header(device.read(offset, fmt.HEADER_SIZE))
    if fmt.header_problem(h) or h.type == fmt.PARITY or h.group != 1 or h.seq != 0:
        return None
    if not fmt.record_crc_ok(device.read(offset, fmt.HEADER_SIZE + h.payload_len), 0, h):
        return None
    return h


# ------------------------------------------------------------------ parity

def _parity_record(window: _Window, at: int, sb: fmt.Superblock, first: fmt.RecordHeader,
                   data_bytes: int) -> bytes | None:
    """The parity sector of the PARITY record at ``at`` if it is the
    trailer of the group whose first record has header ``first``."""
    raw = window.get(at, fmt.HEADER_SIZE + fmt.GROUP_ALIGN)
    if raw is None:
        return None
    h = fmt.unpack_header(raw)
    if (fmt.header_problem(h) or h.type != fmt.PARITY or h.epoch != sb.log_epoch or h.group != first.group
            or h.seq != first.seq or h.mount_gen != first.mount_gen
            or fmt.parity_sectors(h) * fmt.GROUP_ALIGN != data_bytes
            or not fmt.record_crc_ok(raw, 0, h)):
        return None
    return raw[fmt.HEADER_SIZE:]


def find_parity(window: _Window, sb: fmt.Superblock, group_start: int,
                group: int | None = None) -> tuple[int, bytes] | None:
    """Offset and parity sector of the trailer of the group starting at
    ``group_start`` (of number ``group`` when given), searched for within
    MAX_GROUP_BYTES."""
    limit = min(window.end, group_start + fmt.MAX_GROUP_BYTES + fmt.PARITY_TRAILER_SIZE)
    for at, h in _headers_of_epoch(window, sb, group_start + fmt.GROUP_ALIGN, limit):
        if (h.type == fmt.PARITY and (at - group_start) % fmt.GROUP_ALIGN == 0
                and fmt.parity_sectors(h) * fmt.GROUP_ALIGN == at - group_start
                and (group is None or h.group == group)):
            raw = window.get(at, fmt.HEADER_SIZE + fmt.GROUP_ALIGN)
            if raw is not None and not fmt.header_problem(h) and fmt.record_crc_ok(raw, 0, h):
                return at, raw[fmt.HEADER_SIZE:]
    return None


def _repair_group(window: _Window, group_start: int, sb: fmt.Superblock, cur: _Cursor,
                  stop: _Stop) -> tuple[int, bytes] | None:
    """Rebuild the one damaged sector of the group at ``group_start`` from
    its parity trailer, if that makes the whole group check out."""
    found = find_parity(window, sb, group_start, cur.group + 1)
    if found is None:
        return None
    trailer, parity = found
    data = window.get(group_start, trailer - group_start)
    group_xor = fmt.xor_sectors(data)
    for sector in candidate_sectors(window, stop.offset, group_start, trailer):
        rebuilt = fmt.rebuild_sector(data, (sector - group_start) // fmt.GROUP_ALIGN, parity, group_xor)
        window.patch(sector, rebuilt)
        records, _ = _read_group(window, group_start, sb, cur)
        if records is not None and fmt.align_up(records[-1].end) == trailer:
            return sector, rebuilt
        window.patch(sector, None)
    return None


def repair_record(device: BlockDevice, sb: fmt.Superblock, offset: int,
                  patches: dict[int, bytes]) -> tuple[int, bytes] | None:
    """Rebuild the one damaged sector under the record at ``offset`` (a
    record replay once accepted) from its group's parity trailer: the
    sector with which the record's CRC checks out again."""
    start, length = sb.active_extent
    window = _Window(device, start, start + length)
    window.patches = dict(patches)
    limit = min(window.end, offset + fmt.MAX_GROUP_BYTES + fmt.PARITY_TRAILER_SIZE)
    for at, h in _headers_of_epoch(window, sb, offset + fmt.HEADER_SIZE, limit):
        covered = fmt.parity_sectors(h) * fmt.GROUP_ALIGN
        if h.type != fmt.PARITY or (at - start) % fmt.GROUP_ALIGN or at - covered > offset:
            continue
        raw = window.get(at, fmt.HEADER_SIZE + fmt.GROUP_ALIGN)
        if raw is None or fmt.header_problem(h) or not fmt.record_crc_ok(raw, 0, h):
            continue
        group_start, parity = at - covered, raw[fmt.HEADER_SIZE:]
        data = window.get(group_start, covered)
        group_xor = fmt.xor_sectors(data)
        for sector in candidate_sectors(window, offset, group_start, at):
            rebuilt = fmt.rebuild_sector(data, (sector - group_start) // fmt.GROUP_ALIGN, parity, group_xor)
            window.patch(sector, rebuilt)
            head = window.get(offset, fmt.HEADER_SIZE)
            rh = fmt.unpack_header(head)
            if not fmt.header_problem(rh):
                body = window.get(offset, fmt.HEADER_SIZE + rh.payload_len)
                if body is not None and fmt.record_crc_ok(body, 0, rh):
                    return sector, rebuilt
            window.patch(sector, None)
        return None
    return None


def candidate_sectors(window: _Window, failed_at: int, group_start: int, trailer: int) -> range:
    """The sectors one of which must be damaged for the record at
    ``failed_at`` to fail: those under its header and, when the header's
    length is sane, its payload (never past the group's data)."""
    span = fmt.HEADER_SIZE
    raw = window.get(failed_at, fmt.HEADER_SIZE)
    if raw is not None:
        h = fmt.unpack_header(raw)
        if h.payload_len <= fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD:
            span += h.payload_len
    first = group_start + (failed_at - group_start) // fmt.GROUP_ALIGN * fmt.GROUP_ALIGN
    last = min(failed_at + span, trailer)
    return range(first, max(last, first + 1), fmt.GROUP_ALIGN)


# ---------------------------------------------------------- the far search

def _headers_of_epoch(window: _Window, sb: fmt.Superblock, start: int,
                      end: int) -> Iterator[tuple[int, fmt.RecordHeader]]:
    """Every offset in [start, end) where a header of this epoch with the
    record magic could start, with the header parsed (not yet checked).

    Candidates are found by searching for this epoch's four bytes (at
    RECORD_EPOCH_OFFSET), not the record magic: a region is full of stale
    records of older epochs, and the epoch is random, so this keeps the
    search at memory speed instead of parsing every stale header."""
    epoch_at = fmt.RECORD_EPOCH_OFFSET
    needle = fmt.epoch_field(sb.log_epoch)
    pos = start
    step = READ_WINDOW
    while pos < end:
        chunk = window.read(pos, min(step + fmt.HEADER_SIZE, end - pos))
        hit = chunk.find(needle, epoch_at)
        while hit != -1 and hit - epoch_at < step:
            at = hit - epoch_at
            if at + fmt.HEADER_SIZE <= len(chunk) and fmt.record_magic_at(chunk, at):
                yield pos + at, fmt.unpack_header(chunk, at)
            hit = chunk.find(needle, hit + 1)
        pos += step


def _look_for_durable_records_beyond(window: _Window, sb: fmt.Superblock, end: ScanEnd) -> None:
    """Search past the stop for a record that could only exist if the
    stopping point had been flushed (see the module docstring)."""
    for at, h in _headers_of_epoch(window, sb, end.offset, window.end):
        if (h.group >= end.next_group + 1 and h.mount_gen >= end.mount_gen
                and h.seq >= end.next_seq and not fmt.header_problem(h)
                and _crc_ok_at(window, at, h)):
            end.corruption = end.stop_reason
            end.corruption_offset = end.stop_offset
            end.evidence_offset = at
            return


def _crc_ok_at(window: _Window, offset: int, h: fmt.RecordHeader) -> bool:
    if offset + fmt.HEADER_SIZE + h.payload_len > window.end:
        return False
    raw = window.read(offset, fmt.HEADER_SIZE + h.payload_len)
    return fmt.record_crc_ok(raw, 0, h)
