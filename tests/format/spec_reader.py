"""An independent StateFS 2.0 image reader, written from docs/statefs.md alone.

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
SUPERBLOCK = struct.Struct("<8sHHIQ16s5QBBHIQ32s32s32s16s44xI")  # 3.1
PREPARE, PAYLOAD, COMMIT, ABORT, DELETE = 0x10, 0x11, 0x12, 0x13, 0x14
GROUP_END, SEALED = 0x01, 0x02
CHUNK = 65536
MAX_PAYLOAD_SEALED = 131072 + 16
OP_PUT, OP_DELETE = 1, 2
GENESIS_LABEL = b"statefs.chain.genesis.v2\0"
KEY_CHECK_LABEL = b"statefs.keycheck.v2\0"
SEAL_AAD_LABEL = b"statefs.seal.v2\0"


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
     epoch, reserved, desc, salt, chain_base, kcheck, _crc) = SUPERBLOCK.unpack_from(raw)
    if major != 2 or minor > 0:
        raise Refused(f"unsupported format version {major}.{minor}")
    ok = (bsize == BLOCK and active in (0, 1) and enc in (0, 1) and flags == 0
          and r0s >= 2 and r0b >= 1 and r0s + r0b <= total
          and r1s >= r0s + r0b and r1b >= 1 and r1s + r1b <= total)
    if not ok:
        return None, True
    return dict(generation=gen, device_uuid=uuid, total_blocks=total,
                regions=((r0s, r0b), (r1s, r1b)), active_region=active, encryption=enc,
                log_epoch=epoch, txn_reserved=reserved, salt=salt, chain_base=chain_base,
                key_check=kcheck,
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
    if magic != b"R2" or not PREPARE <= typ <= DELETE or flags & ~0x03:
        return None, "bad header"
    end = pos + 64 + rec.payload_len
    if rec.payload_len > MAX_PAYLOAD_SEALED or end > region_end:
        return None, "bad payload length"
    if crc32c(dev[pos + 4:end]) != crc:
        return None, "crc mismatch"
    rec.raw = dev[pos:end]
    return rec, None


def _check(dev, pos, region_end, epoch, seq, last_group, last_mount_gen):
    if pos + 64 > region_end:
        return None, "end of region"
    if dev[pos:pos + 64] == bytes(64):
        return None, "zeroed space (clean end)"
    rec, reason = _parse(dev, pos, region_end)
    if rec is None:
        return None, reason
    if rec.epoch != epoch:
        return None, "stale epoch"
    if rec.seq != seq:
        return None, "sequence break"
    if rec.mount_gen < last_mount_gen:
        return None, "stale mount generation"
    if rec.group != last_group + 1:
        return None, "group break"
    return rec, None


def walk(dev: bytes, sb: dict):
    start, blocks = sb["regions"][sb["active_region"]]
    region_end = (start + blocks) * BLOCK
    pos = group_start = start * BLOCK
    seq = last_group = last_mount_gen = 0
    pending, groups = [], []
    while True:
        rec, reason = _check(dev, pos, region_end, sb["log_epoch"], seq, last_group, last_mount_gen)
        if rec is None:
            break
        pending.append(rec)
        seq += 1
        pos = rec.off + len(rec.raw)
        if rec.flags & GROUP_END:
            groups.append(pending)
            pending = []
            last_group, last_mount_gen = rec.group, rec.mount_gen
            pos = group_start = -(-pos // GROUP_ALIGN) * GROUP_ALIGN
    # 6.4: a sound record two groups past the last complete one proves corruption.
    evidence = None
    o = dev.find(b"R2", group_start + 4, region_end)
    while o != -1 and o - 4 <= region_end - 64:
        rec, _ = _parse(dev, o - 4, region_end)
        if (rec is not None and rec.epoch == sb["log_epoch"] and rec.group >= last_group + 2
                and rec.mount_gen >= last_mount_gen and rec.seq >= seq - len(pending)):
            evidence = o - 4
            break
        o = dev.find(b"R2", o + 1, region_end)
    return dict(groups=groups, log_end=group_start, stop=pos, stop_reason=reason,
                torn_tail_bytes=pos - group_start, evidence=evidence, next_seq=seq - len(pending),
                next_group=last_group + 1, last_mount_gen=last_mount_gen)


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


def replay(groups, sb: dict, key: bytes | None):
    index, chain, max_txn = {}, sb["chain_base"], 0
    txn, findings = None, []
    enc = sb["encryption"] != 0
    try:
        for rec in (r for g in groups for r in g):
            if rec.type == PREPARE:
                if txn is not None:
                    findings.append(("orphan", txn["id"]))
                txn = None
                if rec.txn_id <= max_txn or rec.flags & SEALED:
                    raise _Corrupt("PREPARE txn id not increasing or sealed")
                ops = _decode_prepare(rec.payload)
                max_txn = rec.txn_id
                txn = dict(id=rec.txn_id, ops=ops, records=1, digest=hashlib.sha256(rec.raw),
                           auth_failed=False)
            elif rec.type in (PAYLOAD, DELETE):
                if txn is None or txn["id"] != rec.txn_id or rec.op_index >= len(txn["ops"]):
                    raise _Corrupt("record outside its transaction")
                op = txn["ops"][rec.op_index]
                if rec.path_hash != path_hash(op["path"]):
                    raise _Corrupt("path hash mismatch")
                txn["records"] += 1
                txn["digest"].update(rec.raw)
                if rec.type == PAYLOAD:
                    plain = min(CHUNK, op["value_len"] - rec.chunk_index * CHUNK)
                    if (op["kind"] != OP_PUT or rec.chunk_index != len(op["chunks"])
                            or bool(rec.flags & SEALED) != enc or plain <= 0
                            or rec.payload_len != plain + (16 if enc else 0)):
                        raise _Corrupt("bad PAYLOAD")
                    data = rec.payload
                    if enc:
                        data = None
                        if key is not None:
                            nonce, aad = seal_nonce_aad(sb["salt"], sb["device_uuid"], rec.txn_id,
                                                        rec.op_index, rec.chunk_index,
                                                        rec.path_hash, rec.payload_len)
                            data = _open(key, nonce, aad, rec.payload)
                            txn["auth_failed"] |= data is None
                    op["chunks"].append(data)
                else:
                    if op["kind"] != OP_DELETE or rec.payload != op["path"] or op["deleted"]:
                        raise _Corrupt("bad DELETE")
                    op["deleted"] = True
            elif rec.type == COMMIT:
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
                if prev != chain:
                    raise _Corrupt("hash chain broken")
                chain = hashlib.sha256(rec.raw).digest()
                if txn["auth_failed"]:
                    findings.append(("integrity", txn["id"]))
                else:
                    for op in txn["ops"]:  # 7.3: list order, the last op on a path wins
                        if op["kind"] == OP_DELETE:
                            index.pop(op["path"], None)
                        elif any(c is None for c in op["chunks"]):
                            index[op["path"]] = None  # encrypted, no key: size only (11.5)
                        else:
                            index[op["path"]] = b"".join(op["chunks"])
                txn = None
            else:  # ABORT
                if txn is not None and txn["id"] == rec.txn_id:
                    findings.append(("aborted", txn["id"]))
                    txn = None
                elif rec.txn_id > max_txn:
                    max_txn = rec.txn_id
        if txn is not None:
            findings.append(("orphan", txn["id"]))
    except _Corrupt as exc:
        findings.append(("corruption", f"{exc} at offset {rec.off}"))
    return index, chain, max_txn, findings


def read_image(path_or_bytes, key: bytes | None = None) -> dict:
    """Decode an image (14). With encryption on and no key, values are None (11.5)."""
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
    log = walk(dev, sb)
    index, chain, max_txn, findings = replay(log["groups"], sb, key)
    corrupt = log["evidence"] is not None or any(k == "corruption" for k, _ in findings)
    return {"state": {p.decode("utf-8"): v for p, v in index.items()}, "chain_head": chain,
            "max_txn_id": max_txn, "log_end": log["log_end"],
            "torn_tail_bytes": log["torn_tail_bytes"], "corrupt": corrupt,
            "stop_reason": log["stop_reason"], "evidence": log["evidence"], "findings": findings,
            "next_seq": log["next_seq"], "next_group": log["next_group"],
            "last_mount_gen": log["last_mount_gen"], "superblock": sb}
