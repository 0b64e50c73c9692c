"""Reading values back: every chunk checked (CRC, header, AEAD) before it
is served, and a damaged sector rebuilt from its group's parity.

Sectors rebuilt from parity are served from memory and written back in
place when the writer role is free at once (engine.py, rule C5); a
read-write mount writes back those replay rebuilt before it serves.
"""

from __future__ import annotations

import threading
from typing import Callable

from statefsd.errors import DeviceIOError, IntegrityError
from statefsd.storage import format as fmt
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.groupcommit import WriterRole
from statefsd.storage.index import Entry
from statefsd.storage.logscan import apply_patches, repair_record
from statefsd.storage.logwriter import LogWriter


class ValueReader:
    def __init__(self, log: LogWriter, role: WriterRole, repaired: dict[int, bytes], *,
                 cipher: RecordCipher | None, audit: Callable[..., None], writable: Callable[[], bool]) -> None:
        self.device = log.device
        self._log, self._role, self._cipher, self._audit, self._writable = log, role, cipher, audit, writable
        self._lock = threading.Lock()
        self._patches = dict(repaired)   # sectors rebuilt from parity: offset -> sector
        self._epoch = 0                  # bumped when compaction leaves the region they lie in

    def write_back_repairs(self) -> None:
        """The sectors replay rebuilt go back in place (a torn write of one
        leaves it exactly as repairable as before)."""
        if self._patches:
            self._log.write_sectors(self._patches)
            for offset in sorted(self._patches):
                self._audit("sector_repaired", offset=offset, source="parity")
            self._patches = {}

    def forget_repairs(self) -> None:
        """Compaction switched regions: patches lay over the old one."""
        with self._lock:
            self._patches = {}
            self._epoch += 1

    def read(self, raw: bytes, entry: Entry) -> bytes:
        """The value an index entry points at, checked (CRC, header, AEAD)."""
        path = raw.decode("utf-8", "replace")
        want_hash = fmt.path_hash(raw)
        parts = []
        for run in _runs(entry.chunks):
            first = run[0][1]
            length = run[-1][1] + fmt.HEADER_SIZE + run[-1][2] - first
            span = self._read_span(first, length)
            for index, offset, plen in run:
                rel = offset - first

                def intact() -> bool:
                    h = fmt.unpack_header(span, rel)
                    return (h.type == fmt.PAYLOAD and h.txn_id == entry.txn_id and h.chunk_index == index
                            and h.path_hash == want_hash and h.payload_len == plen
                            and fmt.record_crc_ok(span, rel, h))

                if not intact() and self._repair_sector(offset):
                    span = self._read_span(first, length)
                if not intact():
                    self._audit("integrity_failure", path=path, offset=offset, txn_id=entry.txn_id)
                    raise IntegrityError(f"value of {path!r} failed its checksum at byte offset {offset}",
                                         offset=offset)
                piece = span[rel + fmt.HEADER_SIZE:rel + fmt.HEADER_SIZE + plen]
                if entry.sealed:
                    try:
                        piece = self._cipher.open(piece, fmt.unpack_header(span, rel))
                    except IntegrityError:
                        self._audit("integrity_failure", path=path, offset=offset, txn_id=entry.txn_id,
                                    reason="authentication failed")
                        raise IntegrityError(f"value of {path!r} failed authentication at byte offset "
                                             f"{offset}", offset=offset) from None
                parts.append(piece)
        return b"".join(parts)

    def _read_span(self, offset: int, length: int) -> bytes:
        with self._lock:
            patches = dict(self._patches) if self._patches else self._patches
        return apply_patches(patches, offset, self.device.read(offset, length))

    def _repair_sector(self, record_offset: int) -> bool:
        """Rebuild a sector under a damaged record from its group's parity;
        written back in place when the writer role is free at once, kept in
        memory otherwise (the next mount writes it back)."""
        if not self._log.parity:
            return False
        with self._lock:
            epoch, patches = self._epoch, dict(self._patches)
        fix = repair_record(self.device, self._log.sb, record_offset, patches)
        if fix is None:
            return False
        offset, sector = fix
        self._audit("sector_repaired", offset=offset, source="parity", during="read")
        with self._lock:
            if epoch != self._epoch:
                return False   # compaction moved on meanwhile: the patch would lie over the wrong log
            self._patches[offset] = sector
        if not self._writable() or not self._role.try_hold():
            return True
        try:
            self._log.write_sectors({offset: sector})
            with self._lock:
                self._patches.pop(offset, None)
        except (OSError, DeviceIOError):
            pass   # still served from memory; the next mount tries again
        finally:
            self._role.release()
        return True


# Chunks this close are read as one span; farther apart (which the writer
# never does: it writes a value's chunks back to back) they are read one
# run at a time, so a value costs reads in proportion to its size, not to
# how far a forged transaction spread its chunks over the log.
RUN_GAP = fmt.HEADER_SIZE + fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD


def _runs(chunks: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """``chunks`` ((offset, payload length) in value order) as runs of
    (chunk index, offset, payload length), each run in ascending, nearby
    offsets."""
    runs: list[list[tuple[int, int, int]]] = []
    end = None
    for index, (offset, plen) in enumerate(chunks):
        if end is None or not 0 <= offset - end <= RUN_GAP:
            runs.append([])
        runs[-1].append((index, offset, plen))
        end = offset + fmt.HEADER_SIZE + plen
    return runs
