"""An independent StateFS 2.0/2.1 image reader, written from docs/statefs.md alone.

It exists to prove the specification is complete: it imports nothing from
statefsd. Section numbers in comments refer to docs/statefs.md.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from crc32c import crc32c  # standard CRC-32C, unmasked (4.1)

BLOCK = 4096
GROUP_ALIGN = 512
HEADER = struct.Struct("<I2sBBIIQQQ8sIIH6x")  # 5.1
SUPERBLOCK = struct.Struct("<8sHHIQ16s5QBBHIQ32s32s32s16sQB35xI")  # 3.1
PREPARE, PAYLOAD, COMMIT, ABORT, DELETE, CHECKPOINT, PARITY = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16
# Every record type this reader decodes (5.3). _parse accepts exactly these;
# replay decodes those in HANDLERS, the walk those in WALK_TYPES.
RECORD_TYPES = {PREPARE: "PREPARE", PAYLOAD: "PAYLOAD", COMMIT: "COMMIT", ABORT: "ABORT",
                DELETE: "DELETE", CHECKPOINT: "CHECKPOINT", PARITY: "PARITY"}
WALK_TYPES = {PARITY}  # 6.5: parity trailers, never replayed
MAX_GROUP_BYTES = 32 * 2**20  # 6.1 rule 6
TRAILER = 1024  # 6.5: PARITY record (64 + 512) padded to 1024
GROUP_END, SEALED = 0x01, 0x02
CHUNK = 65536
MAX_PAYLOAD_SEALED = 131072 + 16
OP_PUT, OP_DELETE = 1, 2
GENESIS_LABEL = b"statefs.chain.genesis.v2\0"
KEY_CHECK_LABEL = b"statefs.keycheck.v2\0"
SEAL_AAD_LABEL = b"statefs.seal.v2\0"
CHECKPOINT_SIGN_LABEL = b"statefs.checkpoint.v1"
CHECKPOINT_MESSAGE_LABEL = b"statefs.checkpoint.v2\0"  # NUL padded to 24 bytes in the message


class Refused(Exception):
    """The spec says a reader must not decode this image (3.2, 3.3, 11.1)."""


def path_hash(path: bytes) -> bytes:
    return hashlib.blake2b(path, digest_size=8).digest()  # 4.2


def genesis_hash(device_uuid: bytes) -> bytes:
    return hashlib.sha256(GENESIS_LABEL + device_uuid).digest()  # 4.4


def key_check(key: bytes, device_uuid: bytes, salt: bytes) -> bytes:
    return hashlib.blake2b(KEY_CHECK_LABEL + device_uuid + salt, key=key, digest_size=16).digest()


def seal_nonce_aad(salt, device_uuid, txn_id, op_index, chunk_index, phash, payload_len):
    nonce = struct.pack("<8sQHIBx", salt[:8], txn_id, op_index, chunk_index, PAYLOAD)  # 11.4
    aad = struct.pack("<16s16sBQHI8sI", SEAL_AAD_LABEL, device_uuid, PAYLOAD, txn_id,
                      op_index, chunk_index, phash, payload_len)
    return nonce, aad


def checkpoint_message(device_uuid: bytes, epoch: int, seq: int, chain_head: bytes) -> bytes:
    return struct.pack("<24s16sIQ32s", CHECKPOINT_MESSAGE_LABEL, device_uuid, epoch, seq, chain_head)  # 5.3


def _signature_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """keystored's sign rule (5.3, docs/keystored.md): Ed25519 over
    b"statefs/v1/sign\0" || label || b"\0" || message."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    signed = b"statefs/v1/sign\0" + CHECKPOINT_SIGN_LABEL + b"\0" + message
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, signed)
    except (InvalidSignature, ValueError):
        return False
    return True


def _open(key, nonce, aad, sealed):
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
    from nacl.exceptions import CryptoError
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, key)
    except CryptoError:
        return None


# --- 3. Superblock --------------------------------------------------------

def _decode_slot(raw: bytes):
    """Returns (superblock dict | None, had_magic); raises Refused on a version mismatch."""
    if raw[:8] != b"STATEFS\0":
        return None, False
    if crc32c(raw[:252]) != struct.unpack_from("<I", raw, 252)[0]:
        return None, True
    (_, major, minor, bsize, gen, uuid, total, r0s, r0b, r1s, r1b, active, enc, flags,
     epoch, reserved, desc, salt, chain_base, kcheck, durable_end, redundancy, _crc) = SUPERBLOCK.unpack_from(raw)
    if major != 2 or minor > 1:
        raise Refused(f"unsupported format version {major}.{minor}")
    ok = (bsize == BLOCK and active in (0, 1) and enc in (0, 1) and flags == 0
          and r0s >= 2 and r0b >= 1 and r0s + r0b <= total
          and r1s >= r0s + r0b and r1b >= 1 and r1s + r1b <= total)
    a_start, a_blocks = ((r0s, r0b), (r1s, r1b))[active] if active in (0, 1) else (0, 0)
    ok = ok and redundancy in (0, 1) and (
        durable_end == 0 or a_start * BLOCK <= durable_end <= (a_start + a_blocks) * BLOCK)
    if not ok:
        return None, True
    return dict(generation=gen, device_uuid=uuid, total_blocks=total,
                regions=((r0s, r0b), (r1s, r1b)), active_region=active, encryption=enc,
                log_epoch=epoch, txn_reserved=reserved, salt=salt, chain_base=chain_base,
                key_check=kcheck, durable_end=durable_end, redundancy=redundancy, version_minor=minor,
                key_descriptor=desc.rstrip(b"\0").decode("utf-8", "replace")), True


def choose_superblock(dev: bytes) -> dict:
    slots = [_decode_slot(dev[i * BLOCK:(i + 1) * BLOCK].ljust(BLOCK, b"\0")) for i in (0, 1)]
    valid = [sb for sb, _ in slots if sb is not None]
    if not valid:
        if not any(magic for _, magic in slots):
            raise Refused("not a StateFS image")
        raise Refused("both superblocks damaged")
    sb = max(valid, key=lambda s: s["generation"])  # max() keeps the first (slot A) on a tie
    if sb["total_blocks"] * BLOCK > len(dev):
        raise Refused("image truncated")
    return sb


# --- 6. The log walk ------------------------------------------------------

@dataclass
class Record:
    off: int
    type: int
    flags: int
    epoch: int
    group: int
    seq: int
    mount_gen: int
    txn_id: int
    path_hash: bytes
    payload_len: int
    chunk_index: int
    op_index: int
    raw: bytes  # header and payload, as stored

    @property
    def payload(self) -> bytes:
        return self.raw[64:]


def _parse(dev: bytes, pos: int, region_end: int):
    """6.2 rule 1: a record whose fields and CRC are sound, or a reason."""
    crc, magic, typ, flags, *rest = HEADER.unpack_from(dev, pos)
    rec = Record(pos, typ, flags, *rest, raw=b"")
    if magic != b"R2" or typ not in RECORD_TYPES or flags & ~0x03:
        return None, "bad header"
    end = pos + 64 + rec.payload_len
    if rec.payload_len > MAX_PAYLOAD_SEALED or end > region_end:
        return None, "bad payload length"
    if typ == PARITY and (rec.payload_len != 512 or flags):
        return None, "malformed PARITY record"  # 6.2 rule 1
    if crc32c(dev[pos + 4:end]) != crc:
        return None, "crc mismatch"
    rec.raw = bytes(dev[pos:end])
    return rec, None


def _check(dev, pos, region_end, epoch, seq, last_group, last_mount_gen):
    if pos + 64 > region_end:
        return None, "end of region"
    if dev[pos:pos + 64] == bytes(64):
        return None, "zeroed space (clean end)"
    rec, reason = _parse(dev, pos, region_end)
    if rec is None:
        return None, reason
    if rec.type == PARITY:
        return None, "PARITY record outside a trailer"  # 6.2 rule 1
    if rec.epoch != epoch:
        return None, "stale epoch"
    if rec.seq != seq:
        return None, "sequence break"
    if rec.mount_gen < last_mount_gen:
        return None, "stale mount generation"
    if rec.group != last_group + 1:
        return None, "group break"
    return rec, None


def _align(n: int) -> int:
    return -(-n // GROUP_ALIGN) * GROUP_ALIGN


def _read_group(dev, start, region_end, sb, seq, last_group, last_mount_gen):
    """6.2 over one group: (records, end of its data) or (None, stop offset, reason)."""
    pos, records = start, []
    while True:
        if pos - start > MAX_GROUP_BYTES:
            return None, pos, "group longer than MAX_GROUP_BYTES"  # 6.5
        rec, reason = _check(dev, pos, region_end, sb["log_epoch"], seq + len(records),
                             last_group, last_mount_gen)
        if rec is None:
            return None, pos, reason
        records.append(rec)
        pos = rec.off + len(rec.raw)
        if rec.flags & GROUP_END:
            return records, _align(pos), None


def _find_parity(dev, s, region_end, sb, group):
    """6.5: the lowest PARITY record of group `group` that covers exactly from `s`."""
    for t in range(s + 512, min(s + MAX_GROUP_BYTES + TRAILER, region_end) - 64 + 1, 512):
        if dev[t + 4:t + 7] != b"R2" + bytes([PARITY]):
            continue
        rec, _ = _parse(dev, t, region_end)
        if (rec is not None and rec.epoch == sb["log_epoch"] and rec.group == group
                and rec.chunk_index * 512 == t - s):
            return t, rec.payload
    return None


def _xor(*sectors) -> bytes:
    acc = 0
    for s in sectors:
        acc ^= int.from_bytes(s, "little")
    return acc.to_bytes(512, "little")


def _repair(dev: bytearray, s, stop, region_end, sb, seq, last_group, last_mount_gen):
    """6.5: rebuild, from the group's parity, the one sector under the record the
    walk stopped at with which the whole group reads complete up to its trailer."""
    found = _find_parity(dev, s, region_end, sb, last_group + 1)
    if found is None:
        return None
    t, parity = found
    span = 64
    if stop + 64 <= region_end:
        payload_len = struct.unpack_from("<I", dev, stop + 48)[0]
        if payload_len <= MAX_PAYLOAD_SEALED:
            span += payload_len
    first = s + (stop - s) // 512 * 512
    for at in range(first, max(min(stop + span, t), first + 1), 512):
        others = [dev[o:o + 512] for o in range(s, t, 512) if o != at]
        sector, old = _xor(parity, *others), bytes(dev[at:at + 512])
        dev[at:at + 512] = sector
        records, end, _ = _read_group(dev, s, region_end, sb, seq, last_group, last_mount_gen)
        if records is not None and end == t:
            return at, sector
        dev[at:at + 512] = old
    return None


def walk(dev: bytearray, sb: dict):
    """6.2-6.5. `dev` is a private copy: sectors rebuilt from parity are laid into it."""
    start, blocks = sb["regions"][sb["active_region"]]
    region_end = (start + blocks) * BLOCK
    group_start = start * BLOCK
    seq = last_group = last_mount_gen = 0
    groups, repaired = [], []
    while True:
        records, pos, reason = _read_group(dev, group_start, region_end, sb, seq, last_group, last_mount_gen)
        if records is None and sb["redundancy"] == 1:
            fix = _repair(dev, group_start, pos, region_end, sb, seq, last_group, last_mount_gen)
            if fix is not None:
                repaired.append(fix)
                records, pos, reason = _read_group(dev, group_start, region_end, sb, seq, last_group,
                                                   last_mount_gen)
        if records is None:
            break
        groups.append(records)
        seq += len(records)
        last_group, last_mount_gen = records[-1].group, records[-1].mount_gen
        group_start = pos
        if sb["redundancy"] == 1:
            group_start += TRAILER
    # 6.4: below the durable floor a stop is corruption; above it a sound record
    # two groups past the last complete one proves corruption.
    below_floor = bool(sb["durable_end"]) and group_start < sb["durable_end"]
    evidence = None
    o = dev.find(b"R2", group_start + 4, region_end)
    while o != -1 and o - 4 <= region_end - 64:
        rec, _ = _parse(dev, o - 4, region_end)
        if (rec is not None and rec.epoch == sb["log_epoch"] and rec.group >= last_group + 2
                and rec.mount_gen >= last_mount_gen and rec.seq >= seq):
            evidence = o - 4
            break
        o = dev.find(b"R2", o + 1, region_end)
    if reason == "group longer than MAX_GROUP_BYTES":  # 6.4: no writer writes one
        outcome = "corruption"
    elif below_floor:
        outcome = "corruption below the durable floor"
    elif evidence is not None:
        outcome = "corruption"
    else:
        clean_stop = reason in ("zeroed space (clean end)", "end of region", "stale epoch",
                                "stale mount generation")  # 6.4: a clean stop
        outcome = "torn tail" if pos > group_start or not clean_stop else "clean end"
    return dict(groups=groups, log_end=group_start, stop=pos, stop_reason=reason,
                torn_tail_bytes=pos - group_start, evidence=evidence, next_seq=seq,
                next_group=last_group + 1, last_mount_gen=last_mount_gen, below_floor=below_floor,
                outcome=outcome, repaired=repaired)


# --- 7. Replay ------------------------------------------------------------

class _Corrupt(Exception):
    pass


def _decode_prepare(p: bytes):
    """5.3: the op list [(kind, path, value_len)], or raise _Corrupt."""
    if len(p) < 2:
        raise _Corrupt("short PREPARE")
    (count,), pos, ops, total = struct.unpack_from("<H", p), 2, [], 0
    if not 1 <= count <= 128:
        raise _Corrupt("bad op_count")
    for _ in range(count):
        if pos + 8 > len(p):
            raise _Corrupt("op entry outside payload")
        kind, rsv, plen, vlen = struct.unpack_from("<BBHI", p, pos)
        path = p[pos + 8:pos + 8 + plen]
        pos += 8 + plen
        if (kind not in (OP_PUT, OP_DELETE) or rsv or not 1 <= plen <= 512 or pos > len(p)
                or vlen > 8 * 2**20 or (kind == OP_DELETE and vlen)):
            raise _Corrupt("bad op entry")
        try:
            ok = b"\0" not in path and path.decode("utf-8") is not None
        except UnicodeDecodeError:
            ok = False
        if not ok:
            raise _Corrupt("bad path")
        ops.append(dict(kind=kind, path=path, value_len=vlen, chunks=[], deleted=False))
        total += vlen
    if pos != len(p) or total > 16 * 2**20:
        raise _Corrupt("trailing bytes or transaction too large")
    return ops


class _Replay:
    """7.2: one method per record type; a rule broken raises _Corrupt."""

    def __init__(self, sb: dict, key: bytes | None, device_key: bytes | None):
        self.sb, self.key, self.device_key = sb, key, device_key
        self.enc = sb["encryption"] != 0
        self.index, self.chain, self.max_txn = {}, sb["chain_base"], 0
        self.txn, self.findings = None, []
        self.checkpoints = self.verified_checkpoints = 0

    def _orphan_open_txn(self):
        if self.txn is not None:
            self.findings.append(("orphan", self.txn["id"]))
        self.txn = None

    def prepare(self, rec):
        self._orphan_open_txn()
        if rec.txn_id <= self.max_txn or rec.flags & SEALED:
            raise _Corrupt("PREPARE txn id not increasing or sealed")
        ops = _decode_prepare(rec.payload)
        self.max_txn = rec.txn_id
        self.txn = dict(id=rec.txn_id, ops=ops, records=1, digest=hashlib.sha256(rec.raw),
                        auth_failed=False)

    def _member(self, rec):
        txn = self.txn
        if txn is None or txn["id"] != rec.txn_id or rec.op_index >= len(txn["ops"]):
            raise _Corrupt("record outside its transaction")
        op = txn["ops"][rec.op_index]
        if rec.path_hash != path_hash(op["path"]):
            raise _Corrupt("path hash mismatch")
        txn["records"] += 1
        txn["digest"].update(rec.raw)
        return txn, op

    def payload(self, rec):
        txn, op = self._member(rec)
        plain = min(CHUNK, op["value_len"] - rec.chunk_index * CHUNK)
        if (op["kind"] != OP_PUT or rec.chunk_index != len(op["chunks"])
                or bool(rec.flags & SEALED) != self.enc or plain <= 0
                or rec.payload_len != plain + (16 if self.enc else 0)):
            raise _Corrupt("bad PAYLOAD")
        data = rec.payload
        if self.enc:
            data = None
            if self.key is not None:
                nonce, aad = seal_nonce_aad(self.sb["salt"], self.sb["device_uuid"], rec.txn_id,
                                            rec.op_index, rec.chunk_index, rec.path_hash, rec.payload_len)
                data = _open(self.key, nonce, aad, rec.payload)
                txn["auth_failed"] |= data is None
        op["chunks"].append(data)

    def delete(self, rec):
        _, op = self._member(rec)
        if op["kind"] != OP_DELETE or rec.payload != op["path"] or op["deleted"]:
            raise _Corrupt("bad DELETE")
        op["deleted"] = True

    def commit(self, rec):
        txn = self.txn
        if txn is None or txn["id"] != rec.txn_id or rec.payload_len != 68:
            raise _Corrupt("COMMIT outside its transaction or wrong size")
        prev, digest, count = struct.unpack("<32s32sI", rec.payload)
        for op in txn["ops"]:
            if op["kind"] == OP_PUT and len(op["chunks"]) != -(-op["value_len"] // CHUNK):
                raise _Corrupt("missing chunks")
            if op["kind"] == OP_DELETE and not op["deleted"]:
                raise _Corrupt("missing DELETE")
        if count != txn["records"] or digest != txn["digest"].digest():
            raise _Corrupt("record count or digest mismatch")
        if prev != self.chain:
            raise _Corrupt("hash chain broken")
        self.chain = hashlib.sha256(rec.raw).digest()
        self.txn = None
        if txn["auth_failed"]:
            self.findings.append(("integrity", txn["id"]))
            return
        for op in txn["ops"]:  # 7.3: list order, the last op on a path wins
            if op["kind"] == OP_DELETE:
                self.index.pop(op["path"], None)
            elif any(c is None for c in op["chunks"]):
                self.index[op["path"]] = None  # encrypted, no key: size only (11.5)
            else:
                self.index[op["path"]] = b"".join(op["chunks"])

    def abort(self, rec):
        if self.txn is not None and self.txn["id"] == rec.txn_id:
            self.findings.append(("aborted", self.txn["id"]))
            self.txn = None
        elif rec.txn_id > self.max_txn:
            self.max_txn = rec.txn_id

    def checkpoint(self, rec):
        """7.2 CHECKPOINT rules 1-5; txn_id, flags and the group's other records are not checked."""
        self._orphan_open_txn()
        if rec.payload_len != 128:
            raise _Corrupt("CHECKPOINT payload is not 128 bytes")
        chain_head, public_key, signature = struct.unpack("<32s32s64s", rec.payload)
        if chain_head != self.chain:
            raise _Corrupt("checkpoint does not match the chain: history was rewritten")
        self.checkpoints += 1
        if self.device_key is None:
            return  # unverified
        if public_key != self.device_key:
            raise _Corrupt("checkpoint signed by a key that is not this device's")
        message = checkpoint_message(self.sb["device_uuid"], rec.epoch, rec.seq, chain_head)
        if not _signature_ok(public_key, message, signature):
            raise _Corrupt("checkpoint signature does not verify: forged history")
        self.verified_checkpoints += 1


HANDLERS = {PREPARE: _Replay.prepare, PAYLOAD: _Replay.payload, COMMIT: _Replay.commit,
            ABORT: _Replay.abort, DELETE: _Replay.delete, CHECKPOINT: _Replay.checkpoint}


def replay(groups, sb: dict, key: bytes | None, device_key: bytes | None = None) -> _Replay:
    r = _Replay(sb, key, device_key)
    rec = None
    try:
        for rec in (r for g in groups for r in g):
            HANDLERS[rec.type](r, rec)
        r._orphan_open_txn()
    except _Corrupt as exc:
        r.findings.append(("corruption", f"{exc} at offset {rec.off}"))
    return r


def read_image(path_or_bytes, key: bytes | None = None, device_key: bytes | None = None) -> dict:
    """Decode an image (14). With encryption on and no key, values are None (11.5).
    ``device_key`` is the device's Ed25519 public key, handed in from outside
    the image (7.2); without it checkpoints are matched but not verified."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        dev = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            dev = f.read()
    sb = choose_superblock(dev)
    if sb["encryption"] and key is not None:
        if len(key) != 32:
            raise Refused("payload key must be 32 bytes")
        if sb["key_check"] != bytes(16) and key_check(key, sb["device_uuid"], sb["salt"]) != sb["key_check"]:
            raise Refused("wrong key")
    log = walk(bytearray(dev), sb)
    r = replay(log["groups"], sb, key, device_key)
    corrupt = (log["below_floor"] or log["evidence"] is not None or log["outcome"] == "corruption"
               or any(k == "corruption" for k, _ in r.findings))
    return {"state": {p.decode("utf-8"): v for p, v in r.index.items()}, "chain_head": r.chain,
            "max_txn_id": r.max_txn, "log_end": log["log_end"],
            "torn_tail_bytes": log["torn_tail_bytes"], "corrupt": corrupt,
            "stop_reason": log["stop_reason"], "evidence": log["evidence"], "findings": r.findings,
            "next_seq": log["next_seq"], "next_group": log["next_group"],
            "last_mount_gen": log["last_mount_gen"], "superblock": sb,
            "checkpoints": r.checkpoints, "verified_checkpoints": r.verified_checkpoints,
            "outcome": log["outcome"], "repaired": log["repaired"],
            "group_starts": [g[0].off for g in log["groups"]]}
