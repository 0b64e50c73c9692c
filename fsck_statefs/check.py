"""Checking an image: both superblock slots, every record of the active log
region (through statefsd's own reader and replayer, so fsck and mount can
never disagree about the format), authentication of sealed payloads when a
key is given, checkpoint signatures when the device key is given, txn id
reservation, 64-bit counter sanity, and space accounting.

Caps (docs/statefs.md, "Limits") are checked where the format defines them:
format.header_problem (payload length) stops the reader, and
format.decode_prepare (op count, key and value sizes, txn bytes) makes replay
report corruption; so fsck enforces exactly what mount enforces.

Read-only: nothing here writes to the device (the power-loss campaign
relies on that: statefsd/testing/campaign/fsckhook.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.image import KeyProvider, counters_problem, open_cipher, read_superblock_slot
from statefsd.errors import CorruptImage, FormatError, KeyUnavailable
from statefsd.storage.logscan import ScanEnd, scan_groups
from statefsd.storage.replay import Replayer, ReplayResult

from fsck_statefs.report import ERROR, NOTE, Report

Progress = Callable[[int, int], None]   # (bytes scanned, bytes in the region)

# Replay finding kinds that are damage (exit 4) rather than crash leftovers.
ERROR_KINDS = {"corruption", "integrity"}



@dataclass
class Checked:
    """A report plus what a repair needs to act on it."""

    report: Report
    sb: fmt.Superblock | None = None
    sb_slot: int = 0                    # the slot the active superblock came from
    result: ReplayResult | None = None
    cipher: RecordCipher | None = None
    max_txn_seen: int = 0               # highest txn id of any record the reader accepted
    max_mount_gen: int = 0              # highest mount_gen of any record the reader accepted

    @property
    def can_rewrite(self) -> bool:
        """Repair rewrites every live value: an encrypted one needs the key."""
        return self.sb is not None and (self.cipher is not None or self.sb.encryption == fmt.ENCRYPTION_OFF)

    @property
    def needs_repair(self) -> bool:
        return any(i.repairable for i in self.report.errors)


def check(device: BlockDevice, *, key_provider: KeyProvider | None = None,
          device_key: bytes | None = None, progress: Progress | None = None) -> Checked:
    """Check ``device``. With ``key_provider`` every sealed payload is
    authenticated; with ``device_key`` (the device's Ed25519 public key from
    keystored) every checkpoint signature is verified. Raises FormatError
    (not a StateFS image, unsupported version), KeyUnavailable (including a
    key that does not match the image) or DeviceIOError when the image cannot
    be checked at all; everything else becomes a finding in the report."""
    report = Report(image=device.path)
    checked = Checked(report)
    slots = _inspect_slots(device)
    try:
        sb, checked.sb_slot, _ = read_superblock_slot(device)
    except CorruptImage as exc:
        sb = None
        report.add(ERROR, "superblock", exc.message)
    report.superblocks = _mark_active(slots, sb, report)
    if sb is None:
        return checked
    checked.sb = sb
    report.superblock = _describe(sb)

    if sb.encryption != fmt.ENCRYPTION_OFF and key_provider is not None:
        checked.cipher = open_cipher(device, sb, key_provider)
        report.authentication = "verified"
    elif sb.encryption != fmt.ENCRYPTION_OFF:
        report.authentication = "skipped"
    elif key_provider is not None:
        report.add(NOTE, "key", "the image is not encrypted; the key was not needed")

    _replay(device, sb, checked, device_key, progress)
    _txn_reservation(sb, checked)
    _counter_limits(sb, checked)
    report.space = _space(sb, checked.result, device)
    return checked


# ----------------------------------------------------------- superblocks

def _inspect_slots(device: BlockDevice) -> list[dict]:
    slots = []
    for name, offset in zip("AB", fmt.SUPERBLOCK_OFFSETS):
        try:
            if offset + fmt.BLOCK_SIZE > device.size:
                raise FormatError(f"slot past the end of a {device.size}-byte device (truncated image?)")
            status = fmt.decode_superblock(device.read(offset, fmt.BLOCK_SIZE))
            sb, problem = status.superblock, status.problem
        except FormatError as exc:
            sb, problem = None, exc.message
        slots.append({"slot": name, "offset": offset, "valid": sb is not None, "problem": problem,
                      "generation": sb.generation if sb else None, "active": False, "_sb": sb})
    return slots


def slot_table(device: BlockDevice) -> list[dict]:
    """Both slots as the report shows them, when neither is valid."""
    return _mark_active(_inspect_slots(device), None, Report(image=device.path))


def _mark_active(slots: list[dict], sb: fmt.Superblock | None, report: Report) -> list[dict]:
    """The slots as reported (the chosen one marked active); notes for the invalid ones."""
    for slot in slots:
        if sb is not None and slot["_sb"] == sb:
            slot["active"] = True
            break
    for slot in slots:
        del slot["_sb"]
        if not slot["valid"] and sb is not None:
            # Not an error: the other slot describes a consistent state, and
            # the engine writes the slots alternately (generation % 2).
            report.add(NOTE, "superblock",
                       f"slot {slot['slot']} is invalid ({slot['problem']}); a torn superblock write "
                       f"leaves this, and statefsd's alternating superblock writes replace it", offset=slot["offset"])
    return slots


def _describe(sb: fmt.Superblock) -> dict:
    start, length = sb.active_extent
    return {"format": f"{sb.version_major}.{sb.version_minor}", "generation": sb.generation,
            "device_uuid": sb.device_uuid.hex(), "total_blocks": sb.total_blocks,
            "regions": [list(r) for r in sb.regions], "active_region": sb.active_region,
            "active_region_offset": start, "active_region_bytes": length,
            "log_epoch": sb.log_epoch, "txn_reserved": sb.txn_reserved,
            "encryption": fmt.ENCRYPTION_NAMES[sb.encryption], "key_descriptor": sb.key_descriptor,
            "chain_base": sb.chain_base.hex(), "key_check": sb.key_check.hex()}


# ---------------------------------------------------------------- the log

def _replay(device: BlockDevice, sb: fmt.Superblock, checked: Checked, device_key: bytes | None,
            progress: Progress | None) -> None:
    """statefsd's replay, driven here so fsck can show progress, time the
    scan and see every record the reader accepts (also after corruption)."""
    report = checked.report
    start, length = sb.active_extent
    replayer = Replayer(sb, checked.cipher, device_key)
    commits_after_stop = 0
    began = time.perf_counter()
    apply, max_txn, max_gen = replayer.apply, 0, 0
    for item in scan_groups(device, sb):
        if isinstance(item, ScanEnd):
            end = item
            break
        for rec in item:
            h = rec.header
            if h.txn_id > max_txn:
                max_txn = h.txn_id
            if h.mount_gen > max_gen:
                max_gen = h.mount_gen
            if replayer.stopped and h.type == fmt.COMMIT:
                commits_after_stop += 1
            apply(rec)
        if progress is not None:
            progress(item[-1].end - start, length)
    checked.max_txn_seen, checked.max_mount_gen = max_txn, max_gen
    result = replayer.finish(end)
    seconds = time.perf_counter() - began
    if progress is not None:
        progress(length, length)
    checked.result = result
    scanned = max(end.stop_offset - start, 0)
    report.scan = {"bytes": scanned, "seconds": round(seconds, 6),
                   "mb_per_s": round(scanned / seconds / 1e6, 1) if seconds > 0 else 0.0}
    report.summary = result.summary()
    repairable = checked.can_rewrite

    for f in result.findings:
        rtype, hdr_txn = _record_at(device, f.offset)
        severity = ERROR if f.kind in ERROR_KINDS else NOTE
        reason = f.reason
        if f.kind == "corruption":
            reason += (f"; {result.committed} committed transactions before it are intact"
                       + (f", {commits_after_stop} later COMMIT records are not trusted"
                          if commits_after_stop else ""))
        report.add(severity, f.kind, reason, offset=f.offset, record=rtype,
                   txn_id=f.txn_id or hdr_txn, repairable=severity == ERROR and repairable)
    for offset, _sector in end.repaired:
        report.add(ERROR, "sector", f"damaged sector rebuilt from its write group's parity (the copy "
                   f"on disk is still damaged: --repair writes the rebuilt sector back)",
                   offset=offset, repairable=repairable)
    for offset in end.damaged_trailers:
        report.add(NOTE, "parity", "parity trailer damaged: its write group reads intact but is no "
                   "longer protected (--repair rewrites the log with fresh trailers)", offset=offset)
    if end.corrupt and end.evidence_offset >= 0:
        checked.max_txn_seen = max(checked.max_txn_seen, _record_at(device, end.evidence_offset)[1])
    if result.checkpoints > result.verified_checkpoints:
        report.add(NOTE, "checkpoint",
                   f"{result.checkpoints} checkpoints match the hash chain; their signatures were not "
                   f"verified (no device key; pass --keystore-socket)")
    if report.authentication == "skipped" and result.unverified_chunks:
        report.add(NOTE, "authentication",
                   f"authentication skipped: {result.unverified_chunks} sealed chunks were not verified "
                   f"(no key; pass --keystore-socket to check them)")


def _record_at(device: BlockDevice, offset: int) -> tuple[str, int]:
    """Record type name and txn id of the header at ``offset``, if it parses
    (a damaged header's fields are shown only when its structure is sane)."""
    if offset < 0 or offset + fmt.HEADER_SIZE > device.size:
        return "", 0
    h = fmt.unpack_header(device.read(offset, fmt.HEADER_SIZE))
    if fmt.header_problem(h):
        return "", 0
    return fmt.RECORD_TYPES[h.type], h.txn_id


def _txn_reservation(sb: fmt.Superblock, checked: Checked) -> None:
    # Invariant 8: ids are reserved (flushed) before any record uses them;
    # a crash cannot produce a record above the reservation.
    if checked.max_txn_seen > sb.txn_reserved:
        checked.report.add(ERROR, "txn-reserve",
                           f"txn id {checked.max_txn_seen} is used in the log but the superblock reserves "
                           f"only through {sb.txn_reserved} (invariant 8; nonces could repeat)",
                           txn_id=checked.max_txn_seen, repairable=checked.can_rewrite)


def _counter_limits(sb: fmt.Superblock, checked: Checked) -> None:
    # The engine's own rule (engine.counters_problem), so fsck and a
    # read-write mount agree; fed every record the reader accepted, trusted
    # or not, because a repair must continue above all of them.
    result = checked.result
    probe = dataclasses.replace(
        result, max_txn_id=max(result.max_txn_id, checked.max_txn_seen),
        end=dataclasses.replace(result.end, mount_gen=max(result.end.mount_gen, checked.max_mount_gen)))
    problem = counters_problem(sb, probe)
    if problem:
        checked.report.add(ERROR, "counter-limit",
                           f"{problem}; a writer would overflow it, so statefsd refuses a read-write "
                           f"mount (restore from a trusted copy)")


def _space(sb: fmt.Superblock, result: ReplayResult, device: BlockDevice) -> dict:
    start, length = sb.active_extent
    used = result.end.offset - start
    live_records = sum(len(e.chunks) * fmt.HEADER_SIZE + sum(n for _, n in e.chunks)
                       for e in result.index.values())
    return {"device_bytes": device.size, "log_size": length, "log_used": used, "log_free": length - used,
            "torn_bytes": result.end.torn_bytes, "live_keys": len(result.index),
            "live_bytes": result.index.value_bytes,
            "live_record_bytes": live_records, "reclaimable_bytes": max(used - live_records, 0)}
