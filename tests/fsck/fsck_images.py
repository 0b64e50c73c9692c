"""Real images for the fsck tests, and the ways they get damaged.

Damage is written with statefsd.storage.format (pack_record, encode_commit, ...), so
the tests never re-declare the on-disk layout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.image import read_superblock
from statefsd.storage.logscan import Record, ScanEnd, scan_groups

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))


def fixed_key(sb: fmt.Superblock) -> bytes:
    """The in-process key provider of encrypted test images."""
    return KEY


def make_image(path, size: int = 2 << 20, *, encryption: str = "off", redundancy: str = "parity") -> str:
    path = str(path)
    create_image(path, size)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, encryption=encryption, redundancy=redundancy)
    return path


def mount(path: str, **kw) -> Engine:
    if "key_provider" not in kw:
        kw["key_provider"] = fixed_key
    return Engine.mount(FileDevice(path, read_only=kw.get("read_only", False)), **kw)


def put_each(path: str, values: dict[str, bytes], **kw) -> None:
    """One transaction (one write group) per key, in order."""
    with mount(path, **kw) as e:
        for key, value in values.items():
            e.commit([Mutation("put", key, value)])


def state(path: str, **kw) -> dict[str, bytes]:
    with mount(path, read_only=True, **kw) as e:
        return {k: e.get(k) for k in e.list()}


def records(path: str) -> tuple[list[Record], ScanEnd, fmt.Superblock]:
    """Every record the log reader accepts, the end of the log, the superblock."""
    with FileDevice(path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        out: list[Record] = []
        for item in scan_groups(dev, sb):
            if isinstance(item, ScanEnd):
                return out, item, sb
            out.extend(item)
    raise AssertionError("scan_groups ended without a ScanEnd")


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def repack(rec: Record, payload: bytes) -> bytes:
    """The record with a new payload and a *valid* checksum (what an attacker
    who knows the format can write)."""
    h = rec.header
    return fmt.pack_record(h.type, flags=h.flags, epoch=h.epoch, group=h.group, seq=h.seq,
                           mount_gen=h.mount_gen, txn_id=h.txn_id, payload=payload,
                           path_hash=h.path_hash, chunk_index=h.chunk_index, op_index=h.op_index)


def txn_records(recs: list[Record], txn_id: int) -> list[Record]:
    return [r for r in recs if r.header.txn_id == txn_id]


def tamper_sealed_txn(path: str, txn_id: int) -> int:
    """Flip one ciphertext bit of ``txn_id``'s first chunk and make every
    checksum and the txn digest agree again, so that only authentication can
    tell. Returns the offset of the tampered chunk. (The txn should be the
    last one: its COMMIT's hash changes, so a later COMMIT's chain breaks.)"""
    recs, _, _ = records(path)
    mine = txn_records(recs, txn_id)
    chunk = next(r for r in mine if r.header.type == fmt.PAYLOAD)
    payload = bytearray(chunk.payload)
    payload[0] ^= 0x01
    patched = {chunk.offset: repack(chunk, bytes(payload))}
    d = hashlib.sha256()
    for r in mine:
        if r.header.type == fmt.COMMIT:
            body = fmt.decode_commit(r.payload)
            patched[r.offset] = repack(r, fmt.encode_commit(body._replace(txn_digest=d.digest())))
        else:
            d.update(patched.get(r.offset, r.raw()))
    for offset, raw in patched.items():
        patch(path, offset, raw)
    return chunk.offset


def append_group(path: str, rtype: int, *, txn_id: int, payload: bytes, group_end: bool,
                 mount_gen: int | None = None) -> int:
    """Write one record where the next write group would start, continuing
    the log's epoch, seq, group and mount_gen. Returns its offset."""
    _, end, sb = records(path)
    rec = fmt.pack_record(rtype, flags=fmt.FLAG_GROUP_END if group_end else 0, epoch=sb.log_epoch,
                          group=end.next_group, seq=end.next_seq,
                          mount_gen=max(end.mount_gen, 1) if mount_gen is None else mount_gen,
                          txn_id=txn_id, payload=payload)
    patch(path, end.offset, rec + bytes(fmt.align_up(len(rec)) - len(rec)))
    return end.offset


def fsck(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """The real command line, as a separate process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "fsck_statefs", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    if "Traceback" in proc.stderr:
        raise AssertionError(f"fsck-statefs crashed:\n{proc.stderr}")
    return proc


def forge_superblock(path: str, **changes) -> None:
    """Rewrite both slots with these fields and valid checksums (what a forger can do)."""
    with FileDevice(path) as dev:
        sb, _ = read_superblock(dev)
        block = fmt.encode_superblock(sb.evolve(**changes))
        for offset in fmt.SUPERBLOCK_OFFSETS:
            dev.write(offset, block)
        dev.flush()
