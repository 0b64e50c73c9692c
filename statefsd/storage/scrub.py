"""Online verification ("scrub") of a mounted log.

The log from the start of the active region up to a position the writer
published (P) is read again with the mount's reader and replay rules
(logscan.py, replay.py): every record's CRC, the hash chain from the
superblock's chain base, the AEAD of sealed payloads when the mount has the
key, and every CHECKPOINT's signature when it has the device key. Nothing is
written and no engine state changes: sectors the scan rebuilds from parity
stay in its memory and are reported.

Everything below P was flushed before P was published (engine.py, rule C2),
so the scan runs with P as the durable floor: any stop before P is
corruption, never a torn tail. The engine holds compaction off while this
runs (rule C10), so the region read is not reused underneath it.
"""

from __future__ import annotations

import time
from typing import Callable

from statefsd.errors import DeviceIOError
from statefsd.storage import format as fmt
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.logwriter import LogPosition
from statefsd.storage.replay import replay

# Finding kinds beyond replay's ("corruption", "integrity", "orphan",
# "aborted", "torn-tail"); docs/protocol.md, "verify".
REPAIRABLE = "repairable-sector"    # a damaged sector the group's parity rebuilds
DAMAGED_PARITY = "damaged-parity"   # a group's parity trailer does not check out
SHORT_SCAN = "short-scan"           # the scan ended elsewhere than at P
CHAIN_MISMATCH = "chain-mismatch"   # the chain at P is not the one the engine holds
READ_ERROR = "read-error"           # the device failed a read


def verify_log(device, sb: fmt.Superblock, position: LogPosition, *, cipher: RecordCipher | None,
               device_key: bytes | None, before_group: Callable[[], None] | None = None) -> dict:
    """The verify map (docs/protocol.md) for the log of ``sb`` up to
    ``position``, which the caller captured together with ``sb``."""
    began = time.monotonic()
    start, at = sb.active_extent[0], position.offset
    findings: dict[str, int] = {}
    first: list[dict] = []

    def found(kind: str, offset: int, reason: str, count: int = 1) -> None:
        findings[kind] = findings.get(kind, 0) + count
        if not first:
            first.append({"kind": kind, "offset": offset, "reason": reason})

    verdict = {"log_epoch": sb.log_epoch, "position": at, "scanned_bytes": 0, "records": 0,
               "committed_txns": 0, "checkpoints": 0, "verified_checkpoints": 0, "chain_head": "",
               "chain_head_matches": False, "last_checkpoint_offset": -1}
    try:
        result = replay(device, sb.evolve(durable_end=at), cipher, device_key, upto=at,
                        before_group=before_group)
    except DeviceIOError as exc:
        found(READ_ERROR, -1, exc.message)
        return {**verdict, "findings": findings, "first_finding": first[0],
                "seconds": round(time.monotonic() - began, 3)}
    end = result.end
    for f in result.findings:
        found(f.kind, f.offset, f.reason)
    for offset, _sector in end.repaired:
        found(REPAIRABLE, offset, "damaged sector rebuilt from its group's parity in the scrub's memory "
                                  "only; the next read-write mount writes it back")
    for offset in end.damaged_trailers:
        found(DAMAGED_PARITY, offset, "parity trailer does not check out: the group lost its protection")
    if end.offset != at and not result.corruption:
        found(SHORT_SCAN, end.offset, f"scan ended at byte offset {end.offset}, not at the log "
                                      f"position {at} ({end.stop_reason})")
    matches = result.chain_hash == position.chain
    if not matches and not result.corruption:
        found(CHAIN_MISMATCH, at, f"chain head at byte offset {at} is {result.chain_hash.hex()}, "
                                  f"the engine's is {position.chain.hex()}")
    verdict.update(scanned_bytes=min(end.offset, at) - start, records=result.records,
                   committed_txns=result.committed, checkpoints=result.checkpoints,
                   verified_checkpoints=result.verified_checkpoints, chain_head=result.chain_hash.hex(),
                   chain_head_matches=matches, last_checkpoint_offset=result.last_checkpoint)
    return {**verdict, "findings": findings, "first_finding": first[0] if first else None,
            "seconds": round(time.monotonic() - began, 3)}
