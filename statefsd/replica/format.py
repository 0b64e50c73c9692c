"""The bytes of a replica: the one module that packs and parses them
(docs/statefs.md, section 16).

A replica is a directory that peers and remotes hold without any key:

    keys.sfk                        the vault's sealed key slots, config and device records
    seg/<32 hex>.sfs                segments: one size per replica, immutable, keyed names
    head/<16 hex>-<16 hex>.sfh      signed heads: signer, counter; one new file per push

A segment is ``XChaCha20-Poly1305(header || stream bytes || zeros)``; the
stream is the image's committed transactions in commit order. A head is
signed by the device key and lists every live segment with the BLAKE3
digest of its file, so a peer checks what it holds without any key; what
the owner needs to restore (transaction ranges, the StateFS chain, the
feed cursor, snapshot roots) is sealed inside the head.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import blake3
import msgpack

from statefsd.errors import IntegrityError
from statefsd.shared.signing import verify_signature
from statefsd.vault import keys as vkeys
from statefsd.vault import records as vrec

FORMAT = 1
KEYS_FILE = "keys.sfk"
SEGMENT_DIR = "seg"
HEAD_DIR = "head"
SEGMENT_SUFFIX = ".sfs"
HEAD_SUFFIX = ".sfh"
NAME_BYTES = 16
DIGEST_BYTES = 32
REPLICA_ID_BYTES = 8

DEFAULT_SEGMENT_BYTES = 1 << 20
MIN_SEGMENT_BYTES = 64 << 10
MAX_SEGMENT_BYTES = 64 << 20
MAX_HEAD_BYTES = 16 << 20
MAX_KEYS_BYTES = 1 << 20

SEGMENT_AD = b"statefs.replica.segment.v1\x00"
HEAD_SEALED_AD = b"statefs.replica.head.v1\x00"
HEAD_SIGN_LABEL = "statefs.replica.head"
HEAD_SIGN_DOMAIN = b"statefs.replica.head.v1"
SEGMENT_MAGIC = b"SFRS"
FLAG_GENERATION_START = 1   # the stream restarts here from an empty state (a new base)

# magic, version, flags, reserved, stream bytes, seq, generation, prev digest
_SEGMENT_HEADER = struct.Struct("<4sBBHIQQ32s")
SEGMENT_HEADER_BYTES = _SEGMENT_HEADER.size
SEGMENT_OVERHEAD = vrec.SEAL_OVERHEAD + SEGMENT_HEADER_BYTES

# txn_id, chain (32), op count ; per op: key length, kind, value length
_TXN = struct.Struct("<Q32sI")
_OP = struct.Struct("<HBI")
OP_DELETE, OP_PUT = 0, 1

_SEGMENT_NAME = re.compile(r"^seg/[0-9a-f]{32}\.sfs$")
_HEAD_NAME = re.compile(r"^head/([0-9a-f]{16})-([0-9a-f]{16})\.sfh$")


# ------------------------------------------------------------------ keys

@dataclass(frozen=True)
class ReplicaKeys:
    """Purpose keys of a replica, derived from the vault's master secret
    (so the vault's passphrase or recovery secret opens a replica)."""

    replica_id: bytes
    seal: bytes
    name: bytes

    @classmethod
    def derive(cls, vault_keys: vkeys.VaultKeys) -> "ReplicaKeys":
        def k(purpose: str) -> bytes:
            return vkeys.hkdf(vault_keys.master, vault_keys.vault_id, purpose)
        return cls(k("replica-id")[:REPLICA_ID_BYTES], k("replica-seal"), k("replica-name"))


def segment_name(keys: ReplicaKeys, seq: int, push_id: bytes = b"") -> str:
    """Keyed, so a holder cannot tell a segment's place; ``push_id`` (fresh
    per push) gives a segment rewritten by a re-run push a new name, so no
    copy can keep the unlisted earlier file under the name a head lists."""
    digest = blake3.blake3(b"segment" + seq.to_bytes(8, "little") + push_id,
                           key=keys.name).digest(length=NAME_BYTES)
    return f"{SEGMENT_DIR}/{digest.hex()}{SEGMENT_SUFFIX}"


def head_name(signer: bytes, counter: int) -> str:
    return f"{HEAD_DIR}/{device_tag(signer)}-{counter:016x}{HEAD_SUFFIX}"


def device_tag(public_key: bytes) -> str:
    return blake3.blake3(public_key).digest(length=8).hex()


def is_segment_name(rel: str) -> bool:
    return bool(_SEGMENT_NAME.match(rel))


def parse_head_name(rel: str) -> tuple[str, int] | None:
    m = _HEAD_NAME.match(rel)
    return (m.group(1), int(m.group(2), 16)) if m else None


def file_digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


# ------------------------------------------------------------------ the key file

def encode_keys_file(records: dict[str, bytes]) -> bytes:
    """The vault's records a new device needs to open it: config, key
    slots, device records, all as stored (sealed or MAC'd)."""
    return msgpack.packb({"format": FORMAT, "records": dict(sorted(records.items()))}, use_bin_type=True)


def decode_keys_file(raw: bytes) -> dict[str, bytes]:
    if len(raw) > MAX_KEYS_BYTES:
        raise IntegrityError(f"{KEYS_FILE} of {len(raw)} bytes is over {MAX_KEYS_BYTES}",
                             hint="fetch the key file from another copy")
    body = _unpack(raw, KEYS_FILE)
    records = body.get("records") if isinstance(body, dict) else None
    if body.get("format") != FORMAT or not isinstance(records, dict) or not all(
            isinstance(k, str) and k.startswith(vrec.PREFIX) and isinstance(v, bytes) for k, v in records.items()):
        raise IntegrityError(f"{KEYS_FILE} is malformed", hint="fetch the key file from another copy")
    return records


# ------------------------------------------------------------------ segments

@dataclass(frozen=True)
class SegmentHeader:
    seq: int
    generation: int
    flags: int
    stream_bytes: int
    prev_digest: bytes


def capacity(segment_bytes: int) -> int:
    """Stream bytes one segment of this size carries."""
    return segment_bytes - SEGMENT_OVERHEAD


def check_segment_bytes(size: int) -> str | None:
    if not MIN_SEGMENT_BYTES <= size <= MAX_SEGMENT_BYTES or size % 4096:
        return (f"segment size {size} must be a multiple of 4096 between {MIN_SEGMENT_BYTES} "
                f"and {MAX_SEGMENT_BYTES}")
    return None


def _segment_ad(keys: ReplicaKeys, seq: int) -> bytes:
    return SEGMENT_AD + keys.replica_id + seq.to_bytes(8, "little")


def seal_segment(keys: ReplicaKeys, header: SegmentHeader, stream: bytes, segment_bytes: int) -> bytes:
    room = capacity(segment_bytes)
    if len(stream) != header.stream_bytes or len(stream) > room:
        raise ValueError(f"{len(stream)} stream bytes do not fit a segment of {segment_bytes}")
    plain = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT, header.flags, 0, header.stream_bytes, header.seq,
                                 header.generation, header.prev_digest) + stream
    sealed = vrec.seal(keys.seal, plain + bytes(room - len(stream)), _segment_ad(keys, header.seq))
    if len(sealed) != segment_bytes:
        raise ValueError("sealed segment size mismatch")   # a bug in this module, never disk input
    return sealed


def open_segment(keys: ReplicaKeys, seq: int, sealed: bytes) -> tuple[SegmentHeader, bytes]:
    what = f"segment {seq}"
    plain = vrec.unseal(keys.seal, sealed, _segment_ad(keys, seq), what)
    if len(plain) < SEGMENT_HEADER_BYTES:
        raise IntegrityError(f"{what} is too short", hint="fetch it from another copy")
    magic, version, flags, reserved, stream_bytes, got_seq, generation, prev = _SEGMENT_HEADER.unpack_from(plain)
    body_room = len(plain) - SEGMENT_HEADER_BYTES
    if (magic != SEGMENT_MAGIC or version != FORMAT or reserved != 0 or got_seq != seq
            or flags & ~FLAG_GENERATION_START or stream_bytes > body_room
            or any(plain[SEGMENT_HEADER_BYTES + stream_bytes:])):
        raise IntegrityError(f"{what} has a malformed header", hint="fetch it from another copy")
    header = SegmentHeader(seq, generation, flags, stream_bytes, prev)
    return header, plain[SEGMENT_HEADER_BYTES:SEGMENT_HEADER_BYTES + stream_bytes]


# ------------------------------------------------------------------ the transaction stream

Change = tuple[str, bytes | None]


def encode_txn(txn_id: int, chain: bytes, changes: list[Change]) -> bytes:
    parts = [_TXN.pack(txn_id, chain, len(changes))]
    for key, value in changes:
        raw_key = key.encode("utf-8", "surrogateescape")
        parts.append(_OP.pack(len(raw_key), OP_DELETE if value is None else OP_PUT,
                              0 if value is None else len(value)))
        parts.append(raw_key)
        if value is not None:
            parts.append(value)
    return b"".join(parts)


class StreamDecoder:
    """Transactions out of a generation's stream, fed one segment's bytes
    at a time (a transaction may span segments)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.last_txn = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes, list[Change]]]:
        self._buf += data
        out, pos, buf = [], 0, self._buf
        while True:
            parsed = _parse_txn(buf, pos)
            if parsed is None:
                break
            txn, pos = parsed
            if txn[0] <= self.last_txn:
                raise IntegrityError(f"txn {txn[0]} in the stream is not above txn {self.last_txn}",
                                     hint="the replica is damaged; restore from another copy")
            self.last_txn = txn[0]
            out.append(txn)
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def _parse_txn(buf: bytearray, pos: int):
    if len(buf) - pos < _TXN.size:
        return None
    txn_id, chain, count = _TXN.unpack_from(buf, pos)
    at = pos + _TXN.size
    changes: list[Change] = []
    for _ in range(count):
        if len(buf) - at < _OP.size:
            return None
        key_len, kind, value_len = _OP.unpack_from(buf, at)
        if kind not in (OP_DELETE, OP_PUT) or (kind == OP_DELETE and value_len):
            raise IntegrityError(f"txn {txn_id} has a malformed op", hint="restore from another copy")
        end = at + _OP.size + key_len + value_len
        if len(buf) < end:
            return None
        key = bytes(buf[at + _OP.size:at + _OP.size + key_len]).decode("utf-8", "surrogateescape")
        changes.append((key, bytes(buf[at + _OP.size + key_len:end]) if kind == OP_PUT else None))
        at = end
    return (txn_id, chain, changes), at


# ------------------------------------------------------------------ heads

@dataclass
class SegmentEntry:
    name: str
    digest: bytes


@dataclass
class Head:
    """A push's signed statement of what the replica holds."""

    replica_id: bytes
    signer: bytes
    counter: int
    segments: list[SegmentEntry]        # live, by seq order
    retired: list[str]                  # segment and older head names a peer may delete
    keys_digest: bytes
    sealed: bytes                       # HeadState, sealed with the replica key
    body: bytes = b""                   # the signed bytes as stored
    signature: bytes = b""


@dataclass
class HeadState:
    """What only the owner reads (sealed inside the head)."""

    first_seq: int                      # seq of segments[0]
    generations: list[dict] = field(default_factory=list)   # {"gen", "first_seq", "first_txn", "last_txn"}
    last_txn: int = 0
    chain: bytes = b"\x00" * 32         # the StateFS chain head after last_txn
    epoch: int = 0
    cursor: bytes = b""
    max_txn: int = 0
    snapshots: list[str] = field(default_factory=list)     # vault snapshot keys at last_txn
    time_ns: int = 0


def head_signing_bytes(body: bytes) -> bytes:
    """What the device key signs: the body's BLAKE3, not the body, since a
    head lists every live segment and keystored signs messages of at most
    64 KiB."""
    return HEAD_SIGN_DOMAIN + b"\x00" + blake3.blake3(body).digest()


def encode_head_body(head: Head) -> bytes:
    return msgpack.packb({
        "format": FORMAT, "replica": head.replica_id, "signer": head.signer, "counter": head.counter,
        "segments": [[s.name, s.digest] for s in head.segments], "retired": list(head.retired),
        "keys": head.keys_digest, "sealed": head.sealed}, use_bin_type=True)


def encode_head_file(body: bytes, signature: bytes) -> bytes:
    return msgpack.packb({"body": body, "sig": signature}, use_bin_type=True)


def decode_head_file(raw: bytes, rel: str) -> Head:
    """Parse and check the signature of a head file; the caller decides
    whether the signer is one it trusts."""
    if len(raw) > MAX_HEAD_BYTES:
        raise IntegrityError(f"{rel}: head of {len(raw)} bytes is over {MAX_HEAD_BYTES}")
    outer = _unpack(raw, rel)
    body, sig = outer.get("body"), outer.get("sig")
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise IntegrityError(f"{rel}: not a head file")
    m = _unpack(body, rel)
    segments, retired = m.get("segments"), m.get("retired")
    fields_ok = (m.get("format") == FORMAT and _is_bytes(m.get("replica"), REPLICA_ID_BYTES)
                 and _is_bytes(m.get("signer"), 32) and type(m.get("counter")) is int and m["counter"] > 0
                 and _is_bytes(m.get("keys"), DIGEST_BYTES) and isinstance(m.get("sealed"), bytes)
                 and isinstance(segments, list) and isinstance(retired, list))
    if not fields_ok:
        raise IntegrityError(f"{rel}: malformed head")
    entries = []
    for item in segments:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and is_segment_name(item[0]) and _is_bytes(item[1], DIGEST_BYTES)):
            raise IntegrityError(f"{rel}: malformed segment entry")
        entries.append(SegmentEntry(item[0], item[1]))
    if not all(isinstance(n, str) and (is_segment_name(n) or parse_head_name(n)) for n in retired):
        raise IntegrityError(f"{rel}: malformed retired list")
    if not verify_signature(m["signer"], HEAD_SIGN_LABEL, head_signing_bytes(body), sig):
        raise IntegrityError(f"{rel}: head signature does not verify: forged or damaged",
                             hint="fetch the heads from another copy")
    return Head(m["replica"], m["signer"], m["counter"], entries, retired, m["keys"], m["sealed"],
                body, sig)


def seal_head_state(keys: ReplicaKeys, counter: int, state: HeadState) -> bytes:
    return vrec.seal(keys.seal, msgpack.packb(state.__dict__, use_bin_type=True),
                     HEAD_SEALED_AD + keys.replica_id + counter.to_bytes(8, "little"))


def open_head_state(keys: ReplicaKeys, head: Head) -> HeadState:
    raw = vrec.unseal(keys.seal, head.sealed, HEAD_SEALED_AD + keys.replica_id + head.counter.to_bytes(8, "little"),
                      f"head {head.counter}")
    m = _unpack(raw, f"head {head.counter}")
    try:
        state = HeadState(**m)
    except TypeError:
        raise IntegrityError(f"head {head.counter}: malformed sealed state") from None
    ints = (state.first_seq, state.last_txn, state.epoch, state.max_txn, state.time_ns)
    if not (all(type(v) is int and v >= 0 for v in ints) and _is_bytes(state.chain, 32)
            and isinstance(state.cursor, bytes) and isinstance(state.generations, list)
            and all(isinstance(g, dict) and all(type(g.get(k)) is int for k in ("gen", "first_seq", "first_txn", "last_txn"))
                    and _is_bytes(g.get("chain", bytes(32)), 32) for g in state.generations)
            and isinstance(state.snapshots, list) and all(isinstance(s, str) for s in state.snapshots)):
        raise IntegrityError(f"head {head.counter}: malformed sealed state")
    return state


def _is_bytes(value: object, length: int) -> bool:
    return isinstance(value, bytes) and len(value) == length


def _unpack(raw: bytes, what: str) -> dict:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:
        raise IntegrityError(f"{what}: not valid msgpack", hint="fetch it from another copy") from None
    if not isinstance(value, dict):
        raise IntegrityError(f"{what}: not a map", hint="fetch it from another copy")
    return value
