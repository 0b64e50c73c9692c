"""The feed: a mounted log's committed transactions, in commit order, with
their values, one page at a time, resumable (docs/protocol.md, "feed").

A page is read with the mount's reader and replay rules (logscan.py,
replay.py), from the start of the active region or from a cursor, up to a
log position P the writer published. Everything below P was flushed before
P was published (engine.py, rule C2), so the scan runs with P as the
durable floor: a stop before P is corruption, never a torn tail, and is
raised, never answered with a shorter history. Values are read with the
engine's checked reads (values.py): sealed values come back in plaintext,
and parity repairs apply.

The cursor is a group boundary (a logscan.ScanPoint) with the replay state
there (chain head, highest txn id), the log epoch it belongs to, and how
many transactions of the group at that boundary were already handed out (a
page stops before the transaction that would take it past its budget, and
a group may hold more than one page's worth). A compaction gives the
active region a new epoch and starts it with copies of the whole live
state: a cursor of another epoch restarts the feed at the region's start,
and the consumer must drop what it had (``reset``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from statefsd.errors import CorruptImage, InvalidArgument
from statefsd.storage import format as fmt
from statefsd.storage.index import Entry
from statefsd.storage.logscan import Group, ScanEnd, ScanPoint, scan_groups
from statefsd.storage.logwriter import LogPosition
from statefsd.storage.replay import Replayer

CURSOR_VERSION = 1
# version, epoch, offset, next seq, next group, mount_gen, chain head,
# highest txn id, transactions of the group at offset already handed out
_CURSOR = struct.Struct(">BIQQQQ32sQI")
CURSOR_BYTES = _CURSOR.size

DEFAULT_BYTES = fmt.FEED_DEFAULT_BYTES
MAX_BYTES = fmt.FEED_MAX_BYTES
MAX_OBJECTS = fmt.FEED_MAX_OBJECTS

FROM_BASE = "feed again without a cursor (after=0) to start from the base"

ValueFn = Callable[[bytes, Entry], bytes]
Txn = tuple[int, bytes, list[tuple[bytes, bytes | None]]]


@dataclass(frozen=True)
class Cursor:
    epoch: int
    point: ScanPoint
    chain: bytes
    max_txn: int
    skip: int = 0       # transactions of the group at ``point`` already handed out

    def pack(self) -> bytes:
        return _CURSOR.pack(CURSOR_VERSION, self.epoch, *self.point, self.chain, self.max_txn, self.skip)

    @classmethod
    def unpack(cls, raw: bytes) -> "Cursor":
        """A cursor as a client sent it back; InvalidArgument when it is not
        one this feed wrote (whether it fits the log is checked by read_page)."""
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != CURSOR_BYTES:
            size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise InvalidArgument(f"feed cursor of {size} bytes; a cursor is {CURSOR_BYTES} bytes",
                                  hint=FROM_BASE)
        version, epoch, offset, seq, group, mount_gen, chain, max_txn, skip = _CURSOR.unpack(raw)
        if version != CURSOR_VERSION:
            raise InvalidArgument(f"feed cursor of version {version}; this statefsd writes version "
                                  f"{CURSOR_VERSION}", hint=FROM_BASE)
        if group < 1:
            raise InvalidArgument(f"feed cursor names write group {group}; groups count from 1", hint=FROM_BASE)
        return cls(epoch, ScanPoint(offset, seq, group, mount_gen), bytes(chain), max_txn, skip)


@dataclass
class Page:
    epoch: int
    reset: bool
    txns: list[Txn]
    cursor: Cursor
    more: bool
    chain: bytes        # chain head after the last transaction of ``txns`` (else the cursor's)


def base_cursor(sb: fmt.Superblock) -> Cursor:
    """The start of the active region: where a feed without a cursor begins."""
    return Cursor(sb.log_epoch, ScanPoint(sb.active_extent[0], 0, 1, 0), sb.chain_base, 0)


def _misfit(reason: str) -> InvalidArgument:
    return InvalidArgument(f"feed cursor does not fit this log: {reason}", hint=FROM_BASE)


def _check_fits(cursor: Cursor, sb: fmt.Superblock, position: LogPosition) -> None:
    """What can be checked without reading: the cursor's offset lies on the
    region's group grid up to P, and a cursor at P names P's counters."""
    start = sb.active_extent[0]
    offset = cursor.point.offset
    if not start <= offset <= position.offset or (offset - start) % fmt.GROUP_ALIGN:
        raise _misfit(f"byte offset {offset} is no group boundary in [{start}, {position.offset}]")
    if cursor.max_txn >= position.next_txn:
        raise _misfit(f"txn {cursor.max_txn} was never given out")
    if offset == position.offset and (cursor.point.next_seq, cursor.point.next_group, cursor.chain,
                                      cursor.skip) != (position.seq, position.group, position.chain, 0):
        raise _misfit("its counters or chain head are not the log's at that offset")


def read_page(device, sb: fmt.Superblock, position: LogPosition, *, cursor: Cursor | None, max_bytes: int,
              read_value: ValueFn, cipher=None, device_key: bytes | None = None,
              before_group: Callable[[], None] | None = None) -> Page:
    """The transactions after ``cursor`` (None: from the region's start) up
    to ``position``, which the caller captured together with ``sb``; whole
    transactions, stopping before the one that would take the page past
    ``max_bytes`` (or MAX_OBJECTS), but never empty while any is left."""
    reset = cursor is None or cursor.epoch != sb.log_epoch
    if reset:
        cursor = base_cursor(sb)
    else:
        _check_fits(cursor, sb, position)
    page = _PageBuilder(cursor, max_bytes, read_value)
    replayer = Replayer(sb, cipher, device_key, on_commit=page.on_commit, chain=cursor.chain,
                        max_txn_id=cursor.max_txn)
    floor = sb.evolve(durable_end=position.offset)
    first = True
    for item in scan_groups(device, floor, upto=position.offset, start=cursor.point):
        if isinstance(item, ScanEnd):
            _check_end(item, replayer, position, first and not reset)
            break
        if before_group is not None:
            before_group()
        page.begin_group(skip=cursor.skip if first else 0)
        for rec in item:
            replayer.apply(rec)
        _check_group(item, replayer, page, first and not reset)
        first = False
        if page.stopped or page.cost >= max_bytes or page.objects >= MAX_OBJECTS:
            page.end_group(item, replayer, sb.log_epoch)
            more = page.stopped or item.after.offset < position.offset
            return Page(sb.log_epoch, reset, page.txns, page.cursor, more, page.chain)
        page.end_group(item, replayer, sb.log_epoch)
    return Page(sb.log_epoch, reset, page.txns, page.cursor, False, page.chain)


def _check_group(group: Group, replayer: Replayer, page: "_PageBuilder", from_cursor: bool) -> None:
    """Every record of the group was applied by the replay rules, and the
    group closed every transaction it opened."""
    if replayer.stopped:
        bad = replayer.findings[-1]
        if from_cursor:
            raise _misfit(f"the log from it does not check out ({bad.reason} at byte offset {bad.offset})")
        raise CorruptImage(f"corruption at byte offset {bad.offset}: {bad.reason}; the feed stops before it",
                           offset=bad.offset, hint="run statefs verify, then fsck-statefs on the image")
    if replayer.open is not None:
        at = replayer.open.prepare.offset
        raise CorruptImage(f"transaction at byte offset {at} runs past the end of its write group, which "
                           f"the writer never does", offset=at, hint="run fsck-statefs on the image")
    if from_cursor and page.skip and page.group_txns <= page.skip:
        # A page ends inside a group only before one of its transactions.
        raise _misfit(f"it skips {page.skip} transactions of a group that holds {page.group_txns}")


def _check_end(end: ScanEnd, replayer: Replayer, position: LogPosition, nothing_read: bool) -> None:
    """The scan reached P, with the chain head the engine holds there."""
    if end.offset != position.offset:
        if nothing_read:
            raise _misfit(f"no write group of this log starts at byte offset {end.offset} "
                          f"({end.stop_reason})")
        raise CorruptImage(f"the log stops at byte offset {end.stop_offset} ({end.stop_reason}), below the "
                           f"durable log position {position.offset}", offset=end.stop_offset,
                           hint="run statefs verify, then fsck-statefs on the image")
    if replayer.chain != position.chain:
        if nothing_read:
            raise _misfit("its chain head is not the log's")
        raise CorruptImage(f"the chain head at byte offset {position.offset} is {replayer.chain.hex()}, the "
                           f"engine's is {position.chain.hex()}", offset=position.offset,
                           hint="run statefs verify, then fsck-statefs on the image")


@dataclass
class _PageBuilder:
    """Collects a page's transactions as replay applies them, and the
    cursor after the last one."""

    cursor: Cursor
    max_bytes: int
    read_value: ValueFn
    txns: list[Txn] = field(default_factory=list)
    cost: int = 0
    objects: int = 0
    stopped: bool = False       # a transaction did not fit: the page ends inside this group
    skip: int = 0               # transactions of this group handed out by earlier pages
    group_txns: int = 0         # transactions of this group seen so far
    handed: int = 0             # ... of which this page took (or earlier pages did)
    group_start: Cursor | None = None
    chain: bytes = b""

    def __post_init__(self) -> None:
        self.chain = self.cursor.chain

    def begin_group(self, skip: int) -> None:
        self.skip, self.group_txns, self.handed = skip, 0, skip
        self.group_start = self.cursor

    def on_commit(self, txn_id: int, chain: bytes, changes: list[tuple[bytes, Entry | None]]) -> None:
        self.group_txns += 1
        if self.group_txns <= self.skip or self.stopped:
            if self.group_txns == self.skip:
                self.chain = chain   # where the page before this one ended
            return
        cost = fmt.FEED_TXN_OVERHEAD + sum(len(path) + fmt.FEED_CHANGE_OVERHEAD + (entry.size if entry else 0)
                                  for path, entry in changes)
        objects = 5 + 3 * len(changes)
        if self.txns and (self.cost + cost > self.max_bytes or self.objects + objects > MAX_OBJECTS):
            self.stopped = True
            return
        values = [(path, None if entry is None else self.read_value(path, entry)) for path, entry in changes]
        self.txns.append((txn_id, chain, values))
        self.cost += cost
        self.objects += objects
        self.handed += 1
        self.chain = chain

    def end_group(self, group: Group, replayer: Replayer, epoch: int) -> None:
        if self.stopped:
            self.cursor = Cursor(epoch, self.group_start.point, self.group_start.chain,
                                 self.group_start.max_txn, self.handed)
        else:
            self.cursor = Cursor(epoch, group.after, replayer.chain, replayer.max_txn_id)
