"""Read a dm-log-writes log: the guest's writes and flushes, in the order the disk saw them.

QEMU's blklogwrites driver (run_guest.Guest(log_writes=...)) and Linux's dm-log-writes
target write this format. A host harness replays it to rebuild the disk as it was at
any flush, then drops, reorders or tears the writes after it: the states a power cut
can leave behind.

Layout (little-endian; S = the superblock's sectorsize, the log's unit):

  sector 0       superblock: u64 magic 0x6a736677736872 | u64 version 1 |
                             u64 nr_entries | u32 sectorsize | zero padding to S
  sector 1 ...   nr_entries entries, each:
                   one sector: u64 sector | u64 nr_sectors | u64 flags | u64 data_len |
                               data_len bytes of mark name (MARK only) | zero padding
                   then nr_sectors * S bytes of written data (none for DISCARD)

``sector`` and ``nr_sectors`` count S-sized sectors of the logged device. flags:
FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16 (Linux only). QEMU logs a flush as an
entry with FLUSH and no data, after the image's fdatasync returned; Linux may put
FLUSH on a write, meaning: the flush comes first, then the data.

QEMU rewrites the superblock only at each flush. After a kill, entries past
nr_entries may exist (written after the last flush): read_log returns them marked
``after_last_flush`` and stops quietly at the first that is torn or blank, while
damage inside the counted range is an error (CorruptImage).
"""

from __future__ import annotations

import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statefsd.errors import CorruptImage, FormatError  # noqa: E402

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
assert SUPER.size == 28
ENTRY = struct.Struct("<QQQQ")
assert ENTRY.size == 32

FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA


@dataclass(frozen=True)
class Entry:
    index: int
    offset: int          # byte offset on the logged device
    length: int          # bytes written (or discarded)
    flags: int
    data: bytes          # the written bytes; b"" for flushes, discards and marks
    mark: str = ""
    after_last_flush: bool = False

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_write(self) -> bool:
        return self.length > 0 and not self.flags & (DISCARD | MARK)

    def __repr__(self) -> str:
        names = [n for n, bit in (("FLUSH", FLUSH), ("FUA", FUA), ("DISCARD", DISCARD),
                                  ("MARK", MARK), ("META", METADATA)) if self.flags & bit]
        return (f"Entry(#{self.index} {'|'.join(names) or 'WRITE'} "
                f"off={self.offset} len={self.length}{' tail' if self.after_last_flush else ''})")


@dataclass(frozen=True)
class Log:
    sector_size: int
    nr_entries: int      # entries counted by the superblock (up to the last flush)
    entries: list[Entry]

    def flush_indexes(self) -> list[int]:
        return [e.index for e in self.entries if e.is_flush]


def read_log(path: Path | str) -> Log:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < SUPER.size:
            raise FormatError(f"{path}: not a dm-log-writes log ({size} bytes, no superblock)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse(buf, str(path))


def parse(buf: bytes | mmap.mmap, name: str = "<log>") -> Log:
    if len(buf) < SUPER.size:
        raise FormatError(f"{name}: not a dm-log-writes log (no superblock)")
    magic, version, nr_entries, ssize = SUPER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"{name}: not a dm-log-writes log (magic {magic:#x})")
    if version != VERSION:
        raise FormatError(f"{name}: unsupported dm-log-writes version {version}")
    if ssize < 512 or ssize >= 1 << 24 or ssize & (ssize - 1):
        raise FormatError(f"{name}: bad sector size {ssize}")

    entries: list[Entry] = []
    pos = ssize
    index = 0
    while True:
        counted = index < nr_entries
        where = f"{name}: entry {index} at byte {pos}"
        if pos + ssize > len(buf):
            if counted:
                raise CorruptImage(f"{where}: log ends inside the entry header")
            break
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(buf, pos)
        if not counted and not (nr_sectors or flags or data_len):
            break  # blank: the end of what was logged
        problem = None
        if flags & ~KNOWN_FLAGS:
            problem = f"unknown flags {flags:#x}"
        elif data_len > ssize - ENTRY.size:
            problem = f"mark of {data_len} bytes does not fit its sector"
        nbytes = 0 if flags & DISCARD else nr_sectors * ssize
        data_at = pos + ssize
        if problem is None and data_at + nbytes > len(buf):
            problem = f"{nbytes} bytes of data run past the end of the log"
        if problem is not None:
            if counted:
                raise CorruptImage(f"{where}: {problem}")
            break  # torn entry written after the last flush: the log ends before it
        mark = ""
        if flags & MARK:
            mark = bytes(buf[pos + ENTRY.size:pos + ENTRY.size + data_len]).decode(
                "utf-8", "replace")
        entries.append(Entry(index=index, offset=sector * ssize, length=nr_sectors * ssize,
                             flags=flags, data=bytes(buf[data_at:data_at + nbytes]),
                             mark=mark, after_last_flush=not counted))
        pos = data_at + nbytes
        index += 1
    return Log(sector_size=ssize, nr_entries=nr_entries, entries=entries)


def replay(entries: list[Entry], disk: bytearray) -> bytearray:
    """Apply writes in log order to `disk` (the image as it was when logging began)."""
    for e in entries:
        if e.flags & DISCARD:
            disk[e.offset:e.offset + e.length] = bytes(e.length)
        elif e.is_write:
            if e.offset + e.length > len(disk):
                raise CorruptImage(f"entry {e.index} writes past the end of the disk "
                                   f"({e.offset + e.length} > {len(disk)})")
            disk[e.offset:e.offset + e.length] = e.data
    return disk


def states_at_flushes(log: Log, initial: bytes):
    """Yield (flush entry index, disk bytes) for every flush: what that flush made durable."""
    disk = bytearray(initial)
    done = 0
    for e in log.entries:
        if e.is_flush:
            replay(log.entries[done:e.index], disk)
            done = e.index
            yield e.index, bytes(disk)


def main(argv: list[str] | None = None) -> int:
    """Print the entries of a log: python qemu/logwrites.py LOG"""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(main.__doc__, file=sys.stderr)
        return 2
    log = read_log(args[0])
    print(f"sector size {log.sector_size}, {log.nr_entries} entries up to the last flush, "
          f"{len(log.entries)} read")
    for e in log.entries:
        print(repr(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
